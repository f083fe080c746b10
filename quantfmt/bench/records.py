"""The benchmark's record schema and its stated targets (standard library only).

Every measurement is one record (a dict, one JSON line with --json):
    {"op", "format", "shape": [rows, cols], "n", "seconds", "baseline", "baseline_seconds",
     "ratio": seconds / baseline_seconds, "gbps", ...}
with extra keys: "mode", "target", "status" (PASS/MISS), "note", and per-op details.
The report (report.py) reads records only, so a saved records file re-prints without measuring.
"""

from __future__ import annotations

PREFILL_N = 128
GET_ROWS_N = 64
TARGET_SHAPE = (11008, 4096)  # the shape the qmatmul targets are stated for (a llama-7B FFN matrix)

# qmatmul targets, seconds / numpy float32 seconds at TARGET_SHAPE: (n, tag) -> at most this ratio.
QMATMUL_TARGETS = {
    (1, "Q4_0"): 0.25,
    (1, "Q8_0"): 0.45,
    (1, "Q4_1"): 0.3,
    (1, "Q8_A"): 0.6,
    (1, "Q8_B"): 0.6,
    (1, "Q4_A"): 0.6,
    (PREFILL_N, "Q4_0"): 1.0,
    (PREFILL_N, "Q8_0"): 1.0,
    (1, "F16"): 0.6, (1, "BF16"): 0.6, (PREFILL_N, "F16"): 1.1, (PREFILL_N, "BF16"): 1.1,  # issue 11, item 2
}
QUANTIZE_GBPS = {"Q4_0": 3.0, "Q8_0": 1.5}
DEQUANTIZE_GBPS = {"Q4_0": 4.0, "Q8_0": 4.0}
GGUF_SPEEDUP = 4.0  # our quantizer at least 4x gguf's numpy one
STARTUP_SECONDS = 0.3
CONVERT_GBPS = 1.0
# parallel conversion (issue 12): --jobs 2 at >= 1.7x the --jobs 1 throughput (seconds ratio <= 1/1.7), >= 1.5 GB/s
# of input; a 2-worker Dask LocalCluster within 1.3x of --jobs 2; peak RSS per worker <= 2x the largest tensor (f32)
PARALLEL_RATIO = 0.59  # 1 / 1.7
PARALLEL_GBPS = 1.5
DASK_RATIO = 1.3
WORKER_RSS_RATIO = 2.0


def record(
    op, fmt=None, shape=None, n=None, seconds=None, baseline=None, baseline_seconds=None, nbytes=None, **extra
) -> dict:
    """One measurement; ratio and GB/s are derived here, so every record computes them the same way."""
    ratio = seconds / baseline_seconds if seconds is not None and baseline_seconds else None
    gbps = nbytes / seconds / 1e9 if nbytes and seconds else None
    rec = {
        "op": op,
        "format": fmt,
        "shape": list(shape) if shape is not None else None,
        "n": n,
        "seconds": seconds,
        "baseline": baseline,
        "baseline_seconds": baseline_seconds,
        "ratio": ratio,
        "gbps": gbps,
    }
    rec.update(extra)
    return rec


def judge(rec: dict, kind: str, value: float) -> dict:
    """Attach one target to `rec` and PASS/MISS. kind "ratio<=": seconds / baseline; "gbps>=": GB/s;
    "seconds<": wall time."""
    if kind == "ratio<=":
        ok = rec["ratio"] is not None and rec["ratio"] <= value
        rec["target"] = f"<= {value:g}x"
    elif kind == "gbps>=":
        ok = rec["gbps"] is not None and rec["gbps"] >= value
        rec["target"] = f">= {value:g} GB/s"
    elif kind == "seconds<":
        ok = rec["seconds"] is not None and rec["seconds"] < value
        rec["target"] = f"< {value:g} s"
    else:  # pragma: no cover - a programming error
        raise ValueError(kind)
    rec["status"] = "PASS" if ok else "MISS"
    return rec


def with_target(rec: dict) -> dict:
    """Attach the stated kernel target (if any) for this record and PASS/MISS."""
    op, tag, shape, n = rec["op"], rec["format"], tuple(rec["shape"] or ()), rec["n"]
    vs_gguf = (rec.get("baseline") or "").startswith("gguf")
    if op == "qmatmul" and shape == TARGET_SHAPE and (n, tag) in QMATMUL_TARGETS:
        return judge(rec, "ratio<=", QMATMUL_TARGETS[(n, tag)])
    if op == "quantize" and tag in QUANTIZE_GBPS:
        judge(rec, "gbps>=", QUANTIZE_GBPS[tag])
        if vs_gguf:  # both targets must hold: report them together
            gguf_ok = judge(dict(rec), "ratio<=", 1 / GGUF_SPEEDUP)["status"] == "PASS"
            rec["target"] += f", <= {1 / GGUF_SPEEDUP:g}x gguf"
            rec["status"] = "PASS" if rec["status"] == "PASS" and gguf_ok else "MISS"
        return rec
    if op == "quantize" and vs_gguf:
        return judge(rec, "ratio<=", 1 / GGUF_SPEEDUP)
    if op == "dequantize" and tag in DEQUANTIZE_GBPS:
        return judge(rec, "gbps>=", DEQUANTIZE_GBPS[tag])
    return rec
