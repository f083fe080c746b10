"""qmatmul speed of Q4_0, Q4_1, Q8_0 as ratios to float32 numpy on the same matrix, same run.

    .venv/bin/python scripts/bench_qmatmul.py [--rows 11008] [--cols 4096] [--n 128] [--rounds 40]

Decode: one activation vector, `W @ x` (OpenBLAS sgemv) vs `fmt.qmatmul(..., prepared=)`.
Prefill: n activation vectors, `X @ W.T` (sgemm) vs the same. Both modes. Synthetic weights
(normal, 0.02 scale) quantized by gguf's reference quantizer. Times are the minimum over
interleaved rounds (baseline, kernel, baseline, ...), the estimate least disturbed by other
processes on a shared machine; the ratio is kernel / float32.
"""

from __future__ import annotations

import argparse
import functools
import time

import gguf
import numba
import numpy as np
from gguf.quants import quantize

from quantfmt.plugins import get_format


def best(f, reps):
    t = 1e9
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - t0)
    return t


def race(base, kern, rounds, reps):
    tb = tk = 1e9
    for _ in range(rounds):
        tb = min(tb, best(base, reps))
        tk = min(tk, best(kern, reps))
    return tb, tk


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="Q4_0,Q8_0,Q4_1")
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((a.rows, a.cols), dtype=np.float32) * np.float32(0.02)).astype(np.float32)
    x = rng.standard_normal(a.cols).astype(np.float32)
    X = rng.standard_normal((a.n, a.cols)).astype(np.float32)
    print(f"W {a.rows}x{a.cols}, prefill n={a.n}, numba threads {numba.get_num_threads()}")
    print(f"{'format':6} {'mode':5} {'decode':>22} {'prefill':>24}  prepare (extra bytes)")
    for tag in a.formats.split(","):
        fmt = get_format(tag)
        data = quantize(w, getattr(gguf.GGMLQuantizationType, tag)).reshape(-1)
        t0 = time.perf_counter()
        prep = fmt.prepare(data, a.rows, a.cols)
        tp = time.perf_counter() - t0
        for mode in ("f32", "q8_0"):
            dec = functools.partial(fmt.qmatmul, data, w.shape, x, mode, prepared=prep)
            pre = functools.partial(fmt.qmatmul, data, w.shape, X, mode, prepared=prep)
            dec(), pre()  # compile
            tb, tk = race(lambda: w @ x, dec, a.rounds, 4)
            pb, pk = race(lambda: X @ w.T, pre, max(2, a.rounds // 8), 1)
            print(
                f"{tag:6} {mode:5} {tk / tb:6.3f}x ({tk * 1e3:6.2f} ms) {pk / pb:6.3f}x ({pk * 1e3:7.1f} ms)"
                f"  {tp * 1e3:.0f} ms ({prep.nbytes / data.nbytes:.2f}x of {data.nbytes / 2**20:.1f} MiB)",
                flush=True,
            )
        print(f"{'F32':6} {'':5} {'1':>6}x ({tb * 1e3:6.2f} ms) {'1':>6}x ({pb * 1e3:7.1f} ms)", flush=True)


if __name__ == "__main__":
    main()
