"""Quick qmatmul figures for the ggml formats: ratios against numpy float32 measured in the same process.

    nice .venv/bin/python scripts/bench_qmatmul.py [--formats Q4_0,Q8_0] [--n 1,128] [--modes q8_0] [--repeat 5]

For each n: the float32 baseline (W @ x or X @ W.T) is timed right before each format's modes,
medians of --repeat calls
(quantfmt.bench.timing.median_time, as `quantfmt bench`); the kernel path each call took is printed.
"""

from __future__ import annotations

import argparse

import numpy as np

import quantfmt
from quantfmt import cpu
from quantfmt.bench.timing import median_time


def median(f, repeat):
    # the bench's one statistic (warm-up call, median of samples, short calls looped)
    return median_time(f, repeat, budget=10.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="Q4_0,Q8_0,Q4_1")
    ap.add_argument("--n", default="1,128")
    ap.add_argument("--modes", default="")
    ap.add_argument("--shape", default="11008,4096")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--int8-path", default="", help="force an int8 prefill path (plugins/_i8gemm.py PATHS)")
    a = ap.parse_args()
    if a.int8_path:
        from quantfmt_formats import _i8gemm

        _i8gemm.PATH = a.int8_path
    rows, cols = (int(v) for v in a.shape.split(","))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    print("cpu:", " ".join(cpu.reported()))
    for tag in a.formats.split(","):
        fmt = quantfmt.get_format(tag)
        data = fmt.quantize(w)
        prep = fmt.prepare(data, rows, cols)
        for n in (int(v) for v in a.n.split(",")):
            x = rng.standard_normal((n, cols), dtype=np.float32)
            for mode in a.modes.split(",") if a.modes else fmt.modes:
                if n == 1:
                    base = median(lambda x=x: w @ x[0], a.repeat)
                else:
                    base = median(lambda x=x: x @ w.T, a.repeat)
                sec = median(lambda f=fmt, d=data, x=x, m=mode, p=prep: f.qmatmul(d, (rows, cols), x, m, prepared=p),
                             a.repeat)
                print(f"{tag:5} n={n:<4} {mode:5} {fmt.kernel_path('qmatmul', n, mode):>22}  "
                      f"{sec * 1e3:8.2f} ms  f32 {base * 1e3:8.2f} ms  ratio {sec / base:5.2f}", flush=True)


if __name__ == "__main__":
    main()
