"""Q8_A/Q8_B/Q4_A figures side by side with numpy float32, interleaved in one process.

    nice .venv/bin/python scripts/seeds_ab.py [--formats Q8_A,Q8_B,Q4_A] [--ops quantize,decode,prefill]
        [--repeat 9] [--shape 11008,4096] [--ref main]

Every repeat times, back to back: float32 `W @ x` (decode baseline), float32 `X @ W.T` with 128 rows (prefill
baseline), then each format's quantize / qmatmul(n=1) / qmatmul(n=128). Prints medians, ratios to the float32
baseline (decode, prefill) and quantize in GB/s of float32 input, plus the min/max of the per-repeat ratios
(a wide spread with a narrow float32 spread points at the kernel, not the machine). With --ref, the formats'
modules of that git ref (copied as scripts/quantize_side_by_side.py does) are timed in the same repeats too
("old ..." lines).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import quantfmt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="Q8_A,Q8_B,Q4_A")
    ap.add_argument("--ops", default="quantize,decode,prefill")
    ap.add_argument("--shape", default="11008,4096")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--ref", default="", help="also time this git ref's modules of the formats")
    a = ap.parse_args()
    olds = {}
    if a.ref:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quantize_side_by_side import _copy_plugins, _format

        tmp = tempfile.mkdtemp(prefix="seeds_ab_")
        _copy_plugins(a.ref, Path(tmp))
        sys.path.insert(0, tmp)
        olds = {t: _format(importlib.import_module("oldplugins." + t.lower())) for t in a.formats.split(",")}
    rows, cols = (int(v) for v in a.shape.split(","))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    x1 = rng.standard_normal((1, cols), dtype=np.float32)
    x128 = rng.standard_normal((128, cols), dtype=np.float32)
    ops = a.ops.split(",")
    fns = {"f32 decode": lambda: w @ x1[0], "f32 prefill": lambda: x128 @ w.T}
    for tag in a.formats.split(","):
        for who, fmt in ([("old", olds[tag])] if olds else []) + [("", quantfmt.get_format(tag))]:
            name = f"{who}{tag}"
            data = fmt.quantize(w)
            prep = fmt.prepare(fmt._bytes_input(data, w.shape), rows, cols)
            if "quantize" in ops:
                fns[f"{name} quantize"] = lambda f=fmt: f.quantize(w)
            if "decode" in ops:
                fns[f"{name} decode"] = lambda f=fmt, d=data, p=prep: f.qmatmul(d, (rows, cols), x1, prepared=p)
            if "prefill" in ops:
                fns[f"{name} prefill"] = lambda f=fmt, d=data, p=prep: f.qmatmul(d, (rows, cols), x128, prepared=p)
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        if k.endswith("quantize"):
            print(f"{k:16} {med[k] * 1e3:8.2f} ms  {w.nbytes / med[k] / 1e9:5.2f} GB/s "
                  f"(range {w.nbytes / max(v) / 1e9:.2f}-{w.nbytes / min(v) / 1e9:.2f})")
        elif k.startswith("f32"):
            print(f"{k:16} {med[k] * 1e3:8.2f} ms  (range {min(v) * 1e3:.2f}-{max(v) * 1e3:.2f})")
        else:
            base = times["f32 " + k.split()[1]]
            r = [t / b for t, b in zip(v, base, strict=True)]
            print(f"{k:16} {med[k] * 1e3:8.2f} ms  ratio {med[k] / med['f32 ' + k.split()[1]]:5.2f} "
                  f"(per-repeat {min(r):.2f}-{max(r):.2f}) {fmt_path(k, rows)}")


def fmt_path(k: str, rows: int) -> str:
    tag, op = k.split()
    tag = tag.removeprefix("old")
    return quantfmt.get_format(tag).kernel_path("qmatmul", 1 if op == "decode" else 128, "f32")


if __name__ == "__main__":
    main()
