"""Mode-"f32" prefill of every format: per-thread tiles (families.tiles_prefill) against the fallback, side by side.

    nice .venv/bin/python scripts/prefill_ab.py [--formats Q4_0,Q8_A] [--n 128,512] [--repeat 7] [--shape 11008,4096]

For each format and n: float32 BLAS (`x @ W.T`), qmatmul with families.PER_THREAD_PREFILL False (each format's
previous path: tiles dequantized, then BLAS's own threads), per-thread tiles through OpenBLAS's one-thread sgemm
(quantfmt.gemm.ENABLED False) and per-thread tiles through quantfmt.gemm (where the CPU has AVX-512), interleaved
in every repeat (a burst of load on a shared machine hits all of them), with a 0.2 s pause after the float32
baseline and the fallback (OpenBLAS's threads spin for ~0.1 s after a call and would take a core from whatever
runs next); prints medians, ratios to float32 and the kernel path of each.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np

import quantfmt
from quantfmt import families, gemm

ALL = "Q4_0,Q4_1,Q8_0,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_A,Q8_B,Q4_A,IQ4N,IQ4X,MXF4,F16,BF16,F32"


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

    def run(per_thread: bool, own: bool):
        families.PER_THREAD_PREFILL, gemm.ENABLED = per_thread, own
        try:
            return fmt.qmatmul(data, shape, x, prepared=prep)
        finally:
            families.PER_THREAD_PREFILL, gemm.ENABLED = True, True
            if not per_thread:
                time.sleep(0.2)  # it ran on OpenBLAS's threads: let them stop spinning

    def f32():
        r = x @ wf.T
        time.sleep(0.2)
        return r

    modes = {"old": (False, False), "blas1": (True, False)}
    if gemm.use():
        modes["gemm"] = (True, True)
    fns = {"f32": f32, **{k: functools.partial(run, *v) for k, v in modes.items()}}
    ref = x @ wf.T
    for f in fns.values():
        f()
    err = float(np.abs(fns[list(modes)[-1]]() - ref).max() / np.abs(ref).max())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t - (0.2 if k in ("f32", "old") else 0))
    med = {k: statistics.median(v) for k, v in times.items()}
    cols = []
    for k, (per_thread, own) in modes.items():
        families.PER_THREAD_PREFILL, gemm.ENABLED = per_thread, own
        cols.append(f"{k} {med[k] / med['f32']:5.2f}x ({fmt.kernel_path('qmatmul', n, 'f32')})")
    families.PER_THREAD_PREFILL, gemm.ENABLED = True, True
    print(f"{fmt.tag:5} n={n:4} f32 {med['f32'] * 1e3:7.1f} ms  " + "  ".join(cols) + f"  max rel err {err:.1e}",
          flush=True)


if __name__ == "__main__":
    main()
