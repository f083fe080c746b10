"""One-row decode with the weights coming from DRAM, as in a model's token: GB/s of each format's kernel.

    .venv/bin/python scripts/decode_stream.py [--formats Q4_K,Q6_K,Q4_0,Q8_0] [--shape 5632,2048] [--mb 400]

The bench times a kernel on ONE matrix called again and again (it then sits in the L3: 11008x4096 Q4_0 is
25 MB). A model's token reads each matrix once, and a model larger than the L3 reads it from DRAM. Here
copies of one quantized matrix, --mb megabytes of them in all (more than the L3), are multiplied one after
the other by a row of activations through QTensor.matvec_fn (the runner's path, in the format's "auto"
mode) and each pass is timed; printed: the median ms per call and the weight bytes per second, with the
row split over the threads as decode_threads decides ("auto"), and forced to one thread and to all.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import quantfmt
from quantfmt import families
from quantfmt.llm.model import AUTO_MODES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="Q4_K,Q6_K,Q4_0,Q8_0")
    ap.add_argument("--shape", default="5632,2048")
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--passes", type=int, default=9)
    a = ap.parse_args()
    rows, cols = (int(v) for v in a.shape.split(","))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    x = rng.standard_normal((1, cols), dtype=np.float32)
    default = families.MIN_THREADED_WEIGHTS
    for tag in a.formats.split(","):
        base = quantfmt.QTensor.quantize(w, tag)
        mode = next((m for m in AUTO_MODES if m in base.fmt.modes), "f32")
        n = max(2, a.mb * 1_000_000 // base.nbytes)
        ts = [quantfmt.QTensor("w", base.fmt, base.shape, base.data.copy()) for _ in range(n)]
        out = []
        for label, threshold in (("auto", default), ("1 thread", 1 << 62), ("all threads", 1)):
            families.MIN_THREADED_WEIGHTS = threshold
            try:
                fns = [t.matvec_fn(mode) for t in ts]
                for f in fns:
                    f(x)
                per = []
                for _ in range(a.passes):
                    t0 = time.perf_counter()
                    for f in fns:
                        f(x)
                    per.append((time.perf_counter() - t0) / n)
            finally:
                families.MIN_THREADED_WEIGHTS = default
            sec = statistics.median(per)
            out.append(f"{label} {sec * 1e3:.3f} ms {base.nbytes / sec / 1e9:.1f} GB/s")
        print(f"{tag} {mode} {rows}x{cols} x{n}: " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
