"""Integer, bool, float64 and scalar tensors (issue 10, item 1): a BERT-style checkpoint with an
int64 `embeddings.position_ids` buffer, and a GGUF with I8..I64/F64 tensors, pass through every
command unchanged: copied byte for byte, listed with their dtype, skipped by compare, readable."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import quantfmt
from quantfmt.cli import cli
from quantfmt.recipe import RecipeWarning
from quantfmt.tensor import QTensor


def write_st(path, tensors: dict[str, np.ndarray]):
    """A plain safetensors file as `transformers` writes one (no quantfmt metadata)."""
    hdr, blobs, pos = {"__metadata__": {"format": "pt"}}, [], 0
    names = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64", np.dtype("bool"): "BOOL", np.dtype("<f8"): "F64",
             np.dtype("<i4"): "I32", np.dtype("uint8"): "U8"}
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        hdr[name] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    text = json.dumps(hdr).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.fixture
def bert(tmp_path):
    rng = np.random.default_rng(0)
    t = {
        "embeddings.word_embeddings.weight": rng.standard_normal((64, 128)).astype(np.float32),
        "embeddings.position_ids": np.arange(32, dtype=np.int64)[None, :],
        "embeddings.LayerNorm.weight": np.ones(128, np.float32),
        "encoder.layer.0.attention.self.query.weight": rng.standard_normal((128, 128)).astype(np.float32),
        "encoder.layer.0.attention.self.query.bias": np.zeros(128, np.float32),
        "attention_mask": rng.integers(0, 2, (4, 8)).astype(bool),
        "logit_scale": np.array(2.5, np.float32),  # a scalar
        "counts": np.arange(6, dtype=np.float64).reshape(2, 3),
    }
    p = tmp_path / "bert.safetensors"
    write_st(p, t)
    return p, t


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_every_command_passes_integer_buffers_through(bert, tmp_path):
    p, t = bert
    d = json.loads(run("inspect", "--json", p).stdout)
    tags = {x["name"]: (x["tag"], x["shape"]) for x in d["tensors"]}
    assert tags["embeddings.position_ids"] == ("I64", [1, 32])
    assert tags["attention_mask"] == ("BOOL", [4, 8]) and tags["logit_scale"] == ("F32", [])
    assert tags["counts"] == ("F64", [2, 3])
    out = tmp_path / "q.safetensors"
    r = run("convert", p, out, "--to", "Q8_0", "--rule", "embeddings.position_ids=Q8_0")
    with quantfmt.load(out) as m:
        assert m["encoder.layer.0.attention.self.query.weight"].tag == "Q8_0"
        for name in ("embeddings.position_ids", "attention_mask", "logit_scale"):
            np.testing.assert_array_equal(m[name].to_numpy(), t[name])
        assert m["embeddings.position_ids"].to_numpy().dtype == np.int64
    assert "non-float" in r.output or "protected" in r.output
    deq = tmp_path / "d.safetensors"
    run("dequantize", out, deq)
    with quantfmt.load(deq) as m:
        assert m["embeddings.position_ids"].tag == "I64" and m["attention_mask"].tag == "BOOL"
        assert m["encoder.layer.0.attention.self.query.weight"].tag == "F32"
    res = json.loads(run("compare", p, "--formats", "Q8_0,Q4_0", "--json").stdout)
    # integer buffers are not compared; the F64 2x3 matrix fits neither format's blocks: F16 stands in
    assert {x["tensor"] for x in res["tensors"]} == {"embeddings.word_embeddings.weight", "counts",
                                                     "encoder.layer.0.attention.self.query.weight"}
    assert {(x["format"], x["tag"]) for x in res["tensors"] if x["fallback"]} == {("Q8_0", "F16"), ("Q4_0", "F16")}
    run("check-file", out, "--against", out)
    # the safetensors library reads our output's integer tensors as we wrote them
    from safetensors.numpy import load_file

    theirs = load_file(str(out))
    np.testing.assert_array_equal(theirs["embeddings.position_ids"], t["embeddings.position_ids"])
    np.testing.assert_array_equal(theirs["attention_mask"], t["attention_mask"])


def test_load_with_a_recipe_keeps_buffers_and_says_why(bert):
    p, t = bert
    # a rule naming the int64 buffer cannot apply: it is kept, and the rule is reported as doing nothing
    with pytest.warns(RecipeWarning, match="embeddings.position_ids=Q4_0 matches only protected"):
        m = quantfmt.load(p, quantfmt.Recipe("Q4_0", rules=[("embeddings.position_ids", "Q4_0")]))
    with m:
        assert m["embeddings.position_ids"].tag == "I64" and m["attention_mask"].tag == "BOOL"
        assert m["encoder.layer.0.attention.self.query.weight"].tag == "Q4_0"
        steps = {s.name: s for s in quantfmt.Recipe("Q4_0").plan(quantfmt.open_model(p))}
        assert steps["embeddings.position_ids"].why == "non-float kept"


def test_from_numpy_and_to_numpy_round_trip():
    for a in (np.arange(5, dtype=np.int64), np.array([True, False]), np.array(3.0), np.ones((2, 2), np.float64),
              np.arange(4, dtype=np.uint16)):
        q = QTensor.from_numpy(a, "x")
        back = q.to_numpy()
        assert back.dtype == a.dtype.newbyteorder("<") and back.shape == a.shape
        np.testing.assert_array_equal(back, a)


def test_gguf_with_integer_tensors_converts_and_loads(tmp_path):
    p = tmp_path / "ints.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    arrays = {"ids.i8": np.arange(32, dtype=np.int8), "ids.i16": np.arange(32, dtype=np.int16),
              "ids.i32": np.arange(64, dtype=np.int32).reshape(2, 32), "ids.i64": np.arange(32, dtype=np.int64),
              "vals.f64": np.linspace(0, 1, 32), "w": np.ones((4, 32), np.float32)}
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with quantfmt.load(p) as m:
        assert {n: m[n].tag for n in arrays} == {"ids.i8": "I8", "ids.i16": "I16", "ids.i32": "I32",
                                                  "ids.i64": "I64", "vals.f64": "F64", "w": "F32"}
        for n, a in arrays.items():
            np.testing.assert_array_equal(m[n].to_numpy(), a)
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.gguf"
    run("convert", p, mid)
    run("convert", mid, back)
    assert back.read_bytes() == p.read_bytes()
