"""quantfmt.load, open_model, recipes, convert and compare (library level)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_container import mixed_model, toy  # noqa: F401  (toy: a fixture)

import quantfmt
import quantfmt as loader
from quantfmt.errors import FileFormatError, OutputExistsError, RecipeError
from quantfmt.io import safetensors as container
from quantfmt.recipe import Recipe
from quantfmt.tensor import Model, QTensor


def float_model(rng, path):
    m = Model({
        "tok_embd.weight": QTensor.quantize(rng.standard_normal((32, 64)).astype(np.float32), "F32"),
        "blk.0.attn_q.weight": QTensor.quantize(rng.standard_normal((64, 64)).astype(np.float32), "F32"),
        "blk.0.attn_norm.weight": QTensor.quantize(rng.standard_normal(64).astype(np.float32), "F32"),
        "blk.0.ffn_norm.weight": QTensor.quantize(rng.standard_normal((1, 64)).astype(np.float32), "F16"),
        "blk.0.bias": QTensor.quantize(rng.standard_normal(64).astype(np.float32), "BF16"),
        "blk.0.odd.weight": QTensor.quantize(rng.standard_normal((8, 60)).astype(np.float32), "F32"),
    }, {"arch": "toy"})
    quantfmt.save(m, path)
    return m


def test_load_without_recipe_is_lazy(toy, tmp_path, rng):  # noqa: F811
    p = tmp_path / "m.safetensors"
    quantfmt.save(mixed_model(rng), p)
    m = quantfmt.load(p)
    assert isinstance(m, Model) and m["tq8"].tag == "TQ8"
    m.close()


def test_load_with_recipe_quantizes_in_memory(toy, tmp_path, rng):  # noqa: F811
    p = tmp_path / "f.safetensors"
    src = float_model(rng, p)
    before = sorted(x.name for x in tmp_path.iterdir())
    m = quantfmt.load(p, "TQ8")
    assert sorted(x.name for x in tmp_path.iterdir()) == before  # nothing written
    tags = {n: t.tag for n, t in m.items()}
    assert tags == {"tok_embd.weight": "TQ8", "blk.0.attn_q.weight": "TQ8", "blk.0.attn_norm.weight": "F32",
                    "blk.0.ffn_norm.weight": "F16", "blk.0.bias": "BF16", "blk.0.odd.weight": "F16"}
    # same bytes as quantizing directly
    w = src["blk.0.attn_q.weight"].dequantize()
    assert m["blk.0.attn_q.weight"].data.tobytes() == QTensor.quantize(w, "TQ8").data.tobytes()
    rec = m.metadata[container.RECIPE_KEY]
    assert rec["fallbacks"] == {"blk.0.odd.weight": {"wanted": "TQ8", "used": "F16"}}
    assert m.metadata["arch"] == "toy"
    m.close()


def test_rules_first_match_wins_and_can_name_norms(toy, tmp_path, rng):  # noqa: F811
    p = tmp_path / "f.safetensors"
    float_model(rng, p)
    r = Recipe(default="F16", rules=[("*norm*", "F32"), ("blk.*", "TQ8"), ("tok_embd.*", "keep")], fallback="BF16")
    with quantfmt.load(p, r) as m:
        tags = {n: t.tag for n, t in m.items()}
    # blk.* does not name the 1-D bias explicitly: it stays BF16
    assert tags == {"tok_embd.weight": "F32", "blk.0.attn_q.weight": "TQ8", "blk.0.attn_norm.weight": "F32",
                    "blk.0.ffn_norm.weight": "F32", "blk.0.bias": "BF16", "blk.0.odd.weight": "BF16"}
    r = Recipe(default="F16", rules=[("blk.*", "TQ8"), ("blk.0.bias", "TQ8")])
    with quantfmt.load(p, r) as m:
        tags = {n: t.tag for n, t in m.items()}
    assert tags["blk.0.bias"] == "TQ8" and tags["blk.0.ffn_norm.weight"] == "F16" and tags["tok_embd.weight"] == "F16"
    with quantfmt.load(p, Recipe(default="F32", protect=False)) as m:
        assert {t.tag for t in m.values()} == {"F32"}


def test_strict_recipe_refuses_a_fallback(toy, tmp_path, rng):  # noqa: F811
    p = tmp_path / "f.safetensors"
    float_model(rng, p)
    with pytest.raises(RecipeError, match="blk.0.odd.weight.*TQ8 cannot take shape \\(8, 60\\)"):
        quantfmt.load(p, "TQ8", strict=True)


def test_recipe_files_and_errors(toy, tmp_path):  # noqa: F811
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"default": "TQ8", "fallback": "F32", "rules": [{"pattern": "a*", "tag": "F16"}]}))
    r = Recipe.from_options(rules=["b*=keep"], file=str(f))
    assert r.to_dict() == {"default": "TQ8", "fallback": "F32", "protect": True, "promote_output": True,
                           "rules": [{"pattern": "b*", "tag": "keep"}, {"pattern": "a*", "tag": "F16"}]}
    assert Recipe.from_options(to="F16", strict=True).fallback is None
    for text in ["noequals", "=F16", "x="]:
        with pytest.raises(RecipeError, match="PATTERN=TAG"):
            Recipe.parse_rule(text)
    with pytest.raises(RecipeError, match="unknown format tag 'Q9ZZ'"):
        Recipe(default="Q9ZZ")
    with pytest.raises(RecipeError, match="rule x=NOPE"):
        Recipe(rules=[("x", "NOPE")])
    for bad in ["[1]", '{"default": "F16", "color": 1}', '{"rules": [["a", "F16"]]}', "{"]:
        f.write_text(bad)
        with pytest.raises(RecipeError):
            Recipe.load(f)


def test_open_model_dispatch(toy, tmp_path, rng):  # noqa: F811
    p = tmp_path / "m.safetensors"
    quantfmt.save(mixed_model(rng), p)
    with loader.open_model(p) as m:
        assert "tq8" in m
    with loader.open_model(tmp_path) as m:
        assert "tq8" in m
    with pytest.raises(FileFormatError, match="no such file"):
        loader.open_model(tmp_path / "missing")
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(quantfmt.QuantfmtError):
        loader.open_model(g)


def test_convert_copies_unchanged_tensors_byte_for_byte(toy, tmp_path, rng):  # noqa: F811
    p, out = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    src = mixed_model(rng)
    quantfmt.save(src, p)
    rep = loader.convert(p, out, Recipe(default="F16", rules=[("tq8", "keep")]))
    assert {s.name for s in rep.steps if s.copy} == {"tq8", "bf16", "f16"}
    with quantfmt.load(out) as m:
        for n in ("tq8", "bf16", "f16"):
            assert m[n].data.tobytes() == src[n].data.tobytes()
        assert m["f32"].tag == "F16"
    # requantizing an already quantized tensor is flagged
    rep = loader.convert(p, out, Recipe(rules=[("tq8", "TSLO")]), overwrite=True)
    assert [s.name for s in rep.requantized] == ["tq8"]
    rep = loader.convert(p, out, Recipe(rules=[("tq8", "F16")]), overwrite=True)
    assert rep.requantized == []  # back to float: not a requantization
    with pytest.raises(OutputExistsError):
        loader.convert(p, out, "F16")
    with pytest.raises(OutputExistsError, match="same file as the input"):
        loader.convert(p, p, "F16", overwrite=True)


def test_convert_sharded_input(tmp_path, rng):
    from test_container import write_shards

    index, names = write_shards(tmp_path, rng)
    out = tmp_path / "one.safetensors"
    loader.convert(index, out, "F16")
    with quantfmt.load(out) as m:
        assert sorted(m) == sorted(names)
    for shard in set(names.values()):  # an output that is one of the shards is refused
        with pytest.raises(OutputExistsError, match="same file as the input"):
            loader.convert(index, tmp_path / shard, "F16", overwrite=True)


def test_compare_figures(toy, tmp_path, rng):  # noqa: F811
    p = tmp_path / "f.safetensors"
    float_model(rng, p)
    res = loader.compare(p, ["F32", "TQ8", "BF16"])
    by = {(r["tensor"], r["format"]): r for r in res["tensors"]}
    exact = by[("blk.0.attn_q.weight", "F32")]
    assert exact["rmse"] == 0 and exact["snr_db"] is None and exact["max_abs"] == 0
    assert exact["matmul_rel_err"] < 1e-6
    q = by[("blk.0.attn_q.weight", "TQ8")]
    assert q["bits_per_weight"] == 12.0 and 30 < q["snr_db"] < 60 and 0 < q["matmul_rel_err"] < 0.05
    # the error figures agree with a direct computation
    w = np.asarray(QTensor("w", "F32", (64, 64), container.open_safetensors(p)["blk.0.attn_q.weight"].data)
                   .dequantize(), np.float64)
    wq = QTensor.quantize(w.astype(np.float32), "TQ8").dequantize().astype(np.float64)
    assert math.isclose(q["rmse"], float(np.sqrt(np.mean((w - wq) ** 2))), rel_tol=1e-9)
    # TQ8 cannot take 8x60: the F16 fallback stands in, so every format covers the same tensors
    odd = by[("blk.0.odd.weight", "TQ8")]
    assert odd["fallback"] and odd["tag"] == "F16" and odd["format"] == "TQ8" and odd["bits_per_weight"] == 16.0
    assert not res["skipped"]
    assert res["summary"]["TQ8"]["tensors"] == res["summary"]["F32"]["tensors"] == 4
    assert res["summary"]["TQ8"]["fallbacks"] == 1 and res["summary"]["F32"]["snr_db"] is None
    strict = loader.compare(p, ["TQ8"], fallback=None)
    assert {"tensor": "blk.0.odd.weight", "tag": "TQ8", "shape": [8, 60]}.items() <= strict["skipped"][0].items()
    json.dumps(res, allow_nan=False)
