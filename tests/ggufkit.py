"""Test helpers for GGUF: valid files from the gguf package's own writer, and a raw builder for crafted ones.

Valid files come from gguf.GGUFWriter (code we did not write), so the reader is checked
against an independent producer. `raw_gguf` assembles header bytes field by field, so a
test can put any value (a 2**63 length, an overlapping offset) exactly where it wants.
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V


def sample_tensors(seed: int = 0) -> dict[str, tuple[np.ndarray, T]]:
    """name -> (what GGUFWriter.add_tensor takes, ggml type), covering every ggml type quantfmt maps."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    bf = np.asarray(w.view(np.uint32) >> 16, dtype=np.uint16)  # truncated bf16: any bits are valid
    return {
        "token_embd.weight": (gguf.quants.quantize(w, T.Q8_0), T.Q8_0),
        "blk.0.attn_norm.weight": (rng.standard_normal(64).astype(np.float32), T.F32),
        "blk.0.attn_q.weight": (gguf.quants.quantize(w, T.Q4_0), T.Q4_0),
        "blk.0.ffn_up.weight": (gguf.quants.quantize(w, T.Q4_1), T.Q4_1),
        "blk.0.ffn_down.weight": (w.astype(np.float16), T.F16),
        "blk.0.attn_k.weight": (bf, T.BF16),
        "blk.0.cube": (rng.standard_normal((2, 3, 32)).astype(np.float32), T.F32),
    }


def write_sample(path, *, tensors=None, alignment: int | None = None, extra_kv=()) -> None:
    """A small llama-like GGUF written by gguf.GGUFWriter: typed key-values of every kind and tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("llama.block_count", 1)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_uint64("test.u64", 2**64 - 1)
    w.add_int64("test.i64", -(2**63))
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("test.f32.odd", 0.1)
    w.add_float64("test.f64", 1e-300)
    w.add_bool("test.bool", True)
    w.add_string("general.name", "tiny ünïcode ✓")
    w.add_key_value("test.bytes", b"\xff\xfe not utf-8", V.STRING)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "Ġb", ""])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25])
    w.add_array("tokenizer.ggml.token_type", [1, 3, 1])
    w.add_key_value("test.u8s", [1, 2, 255], V.ARRAY, sub_type=V.UINT8)
    w.add_key_value("test.bools", [True, False], V.ARRAY, sub_type=V.BOOL)
    w.add_key_value("test.nested", [[1, 2], [3]], V.ARRAY)
    for k, v, t in extra_kv:
        w.add_key_value(k, v, t)
    for name, (arr, qtype) in (sample_tensors() if tensors is None else tensors).items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- raw builder for crafted headers --------------------------------------------------


def s(text: bytes | str) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name: str, dims, ggml_type: int, offset: int) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def raw_gguf(kvs=(), infos=(), data: bytes = b"", *, version: int = 3, n_kv=None, n_tensors=None,
             alignment: int = 32, magic: bytes = b"GGUF") -> bytes:
    """Header fields as given (counts default to the real ones), padding, then `data`."""
    head = (magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos))
    return head + b"\0" * (-len(head) % alignment) + data
