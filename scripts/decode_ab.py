"""Mode-"q8_0" decode (one activation row) of Q8_0, Q4_1 and Q4_0 against float32 `W @ x`, side by side.

    nice .venv/bin/python scripts/decode_ab.py [--rounds 7] [--threads 2] [--shape 11008,4096]

Kernels, each timed as a block of 9 back-to-back calls (L3-warm, as the bench times them) between two
float32 blocks (a 0.2 s pause after each: OpenBLAS's threads spin after a call and take the second core):
  Q8_0 int8   plugins/_i8dot.py (the default path on a CPU with AVX2)
  Q8_0 float  the float tiles (q8_0.tiles_dot), its previous path (_i8dot.PATH forced to "portable")
  Q4_1        _i4dot's decode with ggml's Q8_1 term m*s in the kernel
  Q4_1 numpy  the same kernel without it, the term added after by numpy (its previous path)
  Q4_0        _i4dot's decode
Prints per round each median and its ratio to the mean of the two float32 medians around it, then the
median and the smallest ratio per kernel. --threads 1 runs numba and BLAS on one thread each (a steadier
figure on a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import numba
import numpy as np

import quantfmt
from quantfmt import blas
from quantfmt_formats import _i4dot, _i8dot, q4_0
from quantfmt_formats._ggml import fp16_table, quantize_activations
from quantfmt_formats._qtiles import pad_blocks


def median_time(fn, k: int = 9) -> float:
    ts = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", default="11008,4096")
    a = ap.parse_args()
    rows, cols = (int(v) for v in a.shape.split(","))
    numba.set_num_threads(a.threads)
    ctx = blas.one_thread() if a.threads == 1 else contextlib.nullcontext()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    x1 = rng.standard_normal(cols, dtype=np.float32)
    x = x1[None, :]
    got = {}
    for tag in ("Q8_0", "Q4_1", "Q4_0"):
        fmt = quantfmt.get_format(tag)
        data = fmt.quantize(w).reshape(-1)
        got[tag] = (fmt, data, fmt.prepare(data, rows, cols))
    p41 = got["Q4_1"][2]
    int8 = _i8dot.PATH

    def call(tag):
        fmt, data, prep = got[tag]
        return lambda: fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)

    def q8(path):
        _i8dot.PATH = path
        return call("Q8_0")()

    def q41_numpy():
        out = _i4dot.qmatmul(q4_0.lut_prepared(p41), x, "q8_0", "Q4_1")
        _, s16, _ = quantize_activations(x, with_sum=True, tag="Q4_1")
        e = pad_blocks(fp16_table()[s16], p41.nbp)
        out += np.moveaxis(np.matmul(e, p41.m), 0, 1).reshape(1, -1)[:, :rows]
        return out

    kernels = {"Q8_0 int8": lambda: q8(int8), "Q8_0 float": lambda: q8("portable"), "Q4_1": call("Q4_1"),
               "Q4_1 numpy": q41_numpy, "Q4_0": call("Q4_0")}
    print(f"{rows}x{cols}, {a.threads} thread(s), Q8_0 int8 path {int8}, load {os.getloadavg()}")
    ratios: dict[str, list[float]] = {k: [] for k in kernels}
    with ctx:
        for fn in kernels.values():
            fn()
        np.testing.assert_allclose(kernels["Q4_1"](), kernels["Q4_1 numpy"](), rtol=1e-4, atol=1e-3)
        for r in range(a.rounds):
            line = []
            for name, fn in kernels.items():
                time.sleep(0.05)
                b0 = median_time(lambda: w @ x1)
                time.sleep(0.2)
                t = median_time(fn)
                b1 = median_time(lambda: w @ x1)
                time.sleep(0.2)
                ratios[name].append(t / ((b0 + b1) / 2))
                line.append(f"{name} {t * 1e3:.2f} ms {ratios[name][-1]:.3f}")
            print(f"round {r}: " + " | ".join(line), flush=True)
    print(f"load {os.getloadavg()}")
    for name, v in ratios.items():
        print(f"{name:12s} median ratio {statistics.median(v):.3f}  min {min(v):.3f}")


if __name__ == "__main__":
    main()
