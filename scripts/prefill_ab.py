"""Mode-"f32" prefill of every format: per-thread tiles (families.tiles_prefill) against the fallback, side by side.

    nice .venv/bin/python scripts/prefill_ab.py [--formats Q4_0,Q8_A] [--n 128,512] [--repeat 7] [--shape 11008,4096]

For each format and n: float32 BLAS (`x @ W.T`), qmatmul with families.PER_THREAD_PREFILL False (each format's
previous path: tiles dequantized, then BLAS's own threads) and True, interleaved in every repeat (a burst of
load on a shared machine hits all three); prints medians, ratios to float32 and the kernel path of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import quantfmt
from quantfmt import families

ALL = "Q4_0,Q4_1,Q8_0,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_A,Q8_B,Q4_A,IQ4N,IQ4X,MXF4"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default=ALL)
    ap.add_argument("--n", default="128,512")
    ap.add_argument("--shape", default="11008,4096")
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    rows, cols = (int(v) for v in a.shape.split(","))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    for tag in a.formats.split(","):
        fmt = quantfmt.get_format(tag)
        data = fmt.quantize(w)
        prep = fmt.prepare(fmt._bytes_input(data, w.shape), rows, cols)
        wf = fmt.dequantize(data, w.shape)
        for n in (int(v) for v in a.n.split(",")):
            ab(fmt, data, prep, wf, rng.standard_normal((n, cols), dtype=np.float32), a.repeat)


def ab(fmt, data, prep, wf, x, repeat: int) -> None:
    n = x.shape[0]
    shape = (wf.shape[0], wf.shape[1])

    def old():
        families.PER_THREAD_PREFILL = False
        try:
            return fmt.qmatmul(data, shape, x, prepared=prep)
        finally:
            families.PER_THREAD_PREFILL = True

    def new():
        return fmt.qmatmul(data, shape, x, prepared=prep)

    fns = {"f32": lambda: x @ wf.T, "old": old, "new": new}
    ref = x @ wf.T
    for f in fns.values():
        f()
    err = float(np.abs(new() - ref).max() / np.abs(ref).max())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    families.PER_THREAD_PREFILL = False
    p_old = fmt.kernel_path("qmatmul", n, "f32")
    families.PER_THREAD_PREFILL = True
    p_new = fmt.kernel_path("qmatmul", n, "f32")
    print(f"{fmt.tag:5} n={n:4} f32 {med['f32'] * 1e3:7.1f} ms  old {med['old'] / med['f32']:5.2f}x ({p_old})  "
          f"new {med['new'] / med['f32']:5.2f}x ({p_new})  max rel err {err:.1e}", flush=True)

if __name__ == "__main__":
    main()
