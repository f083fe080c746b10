"""F16 / BF16 qmatmul kernels of this tree against those of another git revision, side by side in one process.

    nice .venv/bin/python scripts/half_ab.py [--ref main] [--repeat 9] [--shape 11008x4096] [--ns 1,128,512]

For each format and activation count n, times float32 BLAS (`x @ W.T`), the reference revision's kernel
and this tree's, interleaved in every repeat (a burst of load on a shared machine hits all three), and
prints medians and ratios to float32. The reference's plugins/_half.py is loaded from `git show REF:...`
as a module of its own; its prefill is the tile loop plain.py ran around it (one converting thread,
BLAS's own threads per tile) unless the module has prefill() itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import quantfmt  # noqa: F401  (numba's settings, made before the kernels load)
from quantfmt_formats import _half


def load_ref(ref: str):
    src = subprocess.run(["git", "show", f"{ref}:plugins/_half.py"], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    d = tempfile.mkdtemp(prefix="half_ab_")
    path = os.path.join(d, "half_ref.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("half_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def old_prefill(mod, kind, w, x, tile_elements=1 << 22):
    rows, cols = w.shape
    step = max(1, min(rows, tile_elements // cols))
    tile = np.empty((step, cols), np.float32)
    out_t = np.empty((rows, x.shape[0]), np.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        t = mod.tile_to_f32(kind, w, np.arange(r0, r1, dtype=np.int64), tile[: r1 - r0])
        np.matmul(t, x.T, out=out_t[r0:r1])
    return np.ascontiguousarray(out_t.T)


def kernel(mod, kind, w, x, max_n=16):
    n = x.shape[0]
    if n <= max_n:
        out = np.empty((n, w.shape[0]), np.float32)
        return lambda: mod.matvec(kind, w, x, out)
    if hasattr(mod, "prefill") and mod.prefill_threads():
        return lambda: mod.prefill(kind, w, x)
    return lambda: old_prefill(mod, kind, w, x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="main")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--shape", default="11008x4096")
    ap.add_argument("--ns", default="1,128,512")
    ap.add_argument("--formats", default="F16,BF16")
    a = ap.parse_args()
    ref = load_ref(a.ref)
    rows, cols = (int(v) for v in a.shape.split("x"))
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((rows, cols), dtype=np.float32)
    print(f"ref {a.ref} vs this tree | load {[round(v, 1) for v in os.getloadavg()]}")
    for kind in a.formats.split(","):
        if kind == "F16":
            w = w32.astype(np.float16).view(np.uint16)
            wf = w.view(np.float16).astype(np.float32)
        else:
            w = (w32.view(np.uint32) >> 16).astype(np.uint16)
            wf = (w.astype(np.uint32) << 16).view(np.float32)
        for n in (int(v) for v in a.ns.split(",")):
            x = rng.standard_normal((n, cols), dtype=np.float32)
            fns = {"f32": (lambda x=x, wf=wf: wf @ x[0]) if n == 1 else (lambda x=x, wf=wf: x @ wf.T),
                   "ref": kernel(ref, kind, w, x), "new": kernel(_half, kind, w, x)}
            times = {k: [] for k in fns}
            for f in fns.values():
                f()
            for _ in range(a.repeat):
                for k, f in fns.items():
                    f()  # untimed: BLAS threads still spinning after the previous call hit this one
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{kind:4s} n={n:<4d} f32 {med['f32'] * 1e3:8.2f} ms  ref {med['ref'] / med['f32']:5.2f}x  "
                  f"new {med['new'] / med['f32']:5.2f}x  (new/ref {med['new'] / med['ref']:5.2f})")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
