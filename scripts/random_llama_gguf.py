"""A Llama GGUF of a realistic size with random weights, for decode/prefill speed where no such checkpoint
can be downloaded: SmolLM2's tokenizer and metadata, TinyLlama-1.1B's shapes (hidden 2048, FFN 5632, 32
heads, 4 KV heads), N layers, float32; then, optionally, llama.cpp's own quantization of it.

    .venv/bin/python scripts/random_llama_gguf.py demo/smollm2-f32.gguf /tmp/tl-f32.gguf --layers 12 \
        [--llama-quantize /tmp/tl-q4km.gguf:15 /tmp/tl-q4_0.gguf:2]

(ftype numbers as llama.cpp's llama_ftype: 2 Q4_0, 7 Q8_0, 15 Q4_K_M, 17 Q5_K_M; needs llama_cpp, see
../shared/notes/ggml-oracle.md.) 12 layers: 0.68B parameters, 2.9 GB float32, 434 MB in Q4_K_M: more than
the L3 of the 2-core Xeon, so every token reads its weights from DRAM, as a real model's do. Random weights
(normal, std 0.02) make no sense as text: only timings mean anything.
"""

from __future__ import annotations

import argparse

import gguf
import numpy as np
from gguf import GGUFValueType

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 49152


def write(src: str, dst: str, layers: int, seed: int = 0) -> None:
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "llama")
    dims = {"llama.block_count": layers, "llama.embedding_length": HIDDEN, "llama.feed_forward_length": FFN,
            "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV_HEADS,
            "llama.context_length": 2048, "llama.rope.dimension_count": HIDDEN // HEADS, "llama.vocab_size": VOCAB}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = dims.get(k, f.contents())
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(k, v, GGUFValueType.ARRAY, sub_type=f.types[1])
        else:
            w.add_key_value(k, v, f.types[0])
    rng = np.random.default_rng(seed)

    def rnd(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    kv = HIDDEN // HEADS * KV_HEADS
    w.add_tensor("token_embd.weight", rnd(VOCAB, HIDDEN))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.add_tensor("output.weight", rnd(VOCAB, HIDDEN))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for name, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (kv, HIDDEN)), ("attn_v", (kv, HIDDEN)),
                            ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (FFN, HIDDEN)),
                            ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN))):
            w.add_tensor(p + name + ".weight", rnd(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize(src: str, dst: str, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to ftype {ftype}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("metadata_from", help="a GGUF whose tokenizer and metadata to copy (SmolLM2's)")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--llama-quantize", nargs="*", default=[], metavar="PATH:FTYPE")
    a = ap.parse_args()
    write(a.metadata_from, a.out, a.layers)
    print("wrote", a.out)
    for spec in a.llama_quantize:
        path, ftype = spec.rsplit(":", 1)
        llama_quantize(a.out, path, int(ftype))
        print("wrote", path)


if __name__ == "__main__":
    main()
