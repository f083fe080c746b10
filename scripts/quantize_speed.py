"""Quantize speed of formats against Q4_0's, in one process, interleaved.

    python scripts/quantize_speed.py [--rows 4096] [--cols 4096] [--repeat 5] Q2_K Q4_K ...

Each repeat quantizes the same float32 standard-normal matrix once with Q4_0 and once with every
format given (QTensor.quantize, through the registry), in that order; prints each format's median
as GB/s of float32 input and its ratio to Q4_0's median (the machine is shared: the ratio is what
means something; issue 11's target is about 0.55x Q4_0 or better).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import quantfmt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("formats", nargs="*", default=["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4N", "IQ4X"])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    w = np.random.default_rng(0).standard_normal((a.rows, a.cols), dtype=np.float32)
    tags = ["Q4_0", *[t for t in a.formats if t != "Q4_0"]]
    fmts = {t: quantfmt.get_format(t) for t in tags}
    for f in fmts.values():
        f.quantize(w)  # compile or cache load
    times: dict[str, list[float]] = {t: [] for t in tags}
    for _ in range(a.repeat):
        for t, f in fmts.items():
            t0 = time.perf_counter()
            f.quantize(w)
            times[t].append(time.perf_counter() - t0)
    base = float(np.median(times["Q4_0"]))
    for t in tags:
        m = float(np.median(times[t]))
        print(f"{t:6s} {w.nbytes / m / 1e9:6.3f} GB/s   {base / m:5.2f}x Q4_0", flush=True)


if __name__ == "__main__":
    main()
