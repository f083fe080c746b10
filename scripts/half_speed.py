"""F16 / BF16 kernel speed as ratios to numpy float32 measured in the same process (issue 11, item 2).

    nice .venv/bin/python scripts/half_speed.py [--repeat 7] [--shape 11008x4096]

Each figure is a median of --repeat timed calls. Every repeat times the float32 baseline and the kernel
back to back, so a burst of load on a shared machine hits both; each timed call follows an untimed call
of the same function (OpenBLAS's threads spin for a while after a call and would slow a numba kernel
timed right after the baseline, which is a cost of mixing the two pools, not of the kernel).
Prints the CPU features, the kernel path each op took, and per op: ms, ratio to the baseline, GB/s.
Baselines: decode W @ x and prefill X @ W.T in float32 (BLAS); dequantize and get_rows against
numpy's own float32 copy of the same float32 bytes (memory speed) and numpy's astype of the half bits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from quantfmt import QTensor, cpu

STAT = statistics.median
TARGETS = {"decode": 0.6, "prefill128": 1.1, "prefill512": 1.1}


def paired(base, fn, repeat):
    base(), fn()
    tb, tf = [], []
    for _ in range(repeat):
        for f, times in ((base, tb), (fn, tf)):
            f()
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
    return STAT(tb), STAT(tf)


def bench_format(tag: str, w: np.ndarray, rng, repeat: int) -> None:
    rows, cols = w.shape
    t = QTensor.quantize(w, tag, "w")
    wf = t.dequantize()  # the float32 weights the baseline multiplies: the same values
    f = t.fmt
    print(f"{tag}: paths decode={f.kernel_path('qmatmul', 1)} prefill={f.kernel_path('qmatmul', 128)} "
          f"dequantize={f.kernel_path('dequantize')} get_rows={f.kernel_path('get_rows')}")
    for name, n in (("decode", 1), ("prefill128", 128), ("prefill512", 512)):
        x = rng.standard_normal((n, cols), dtype=np.float32)
        if n == 1:
            b, k = paired(lambda x=x: wf @ x[0], lambda x=x: t.matmul(x[0]), repeat)
        else:
            b, k = paired(lambda x=x: x @ wf.T, lambda x=x: t.matmul(x), repeat)
        ok = "PASS" if k / b <= TARGETS[name] else "MISS"
        print(f"  {name:11s} f32 {b * 1e3:8.2f} ms  {tag} {k * 1e3:8.2f} ms  ratio {k / b:5.2f}  "
              f"(target <= {TARGETS[name]}: {ok})")
    moved = wf.nbytes + t.data.nbytes  # read half, write float32
    b, k = paired(wf.copy, t.dequantize, repeat)
    line = (f"  dequantize  f32 copy {b * 1e3:6.2f} ms ({2 * wf.nbytes / b / 1e9:5.1f} GB/s)  "
            f"{tag} {k * 1e3:6.2f} ms ({moved / k / 1e9:5.1f} GB/s)  ratio {k / b:5.2f}")
    if tag == "F16":
        half = t.data.view("<f2")
        _, m = paired(lambda: None, lambda: half.astype(np.float32), repeat)
        line += f"  | numpy astype {m * 1e3:6.2f} ms"
    print(line)
    idx = rng.integers(0, rows, 64)
    b, k = paired(lambda: wf[idx], lambda: t.rows(idx), repeat)
    print(f"  get_rows64  f32 take {b * 1e6:6.1f} us  {tag} {k * 1e6:6.1f} us  ratio {k / b:5.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--shape", default="11008x4096")
    ap.add_argument("--formats", default="F16,BF16")
    ap.add_argument("--min", action="store_true", help="the fastest call instead of the median (the kernel's "
                    "speed with the least interference on a shared machine)")
    a = ap.parse_args()
    global STAT
    STAT = min if a.min else statistics.median
    rows, cols = (int(v) for v in a.shape.split("x"))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    print("cpu:", ",".join(cpu.reported()), "| load", [round(v, 1) for v in os.getloadavg()])
    for tag in a.formats.split(","):
        bench_format(tag, w, rng, a.repeat)


if __name__ == "__main__":
    main()
