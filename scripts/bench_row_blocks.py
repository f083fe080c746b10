"""What converting a large tensor in row blocks costs (quantfmt.ops.convert.ROW_BLOCK_BYTES): the
quantize step of one memory-mapped float32 tensor, whole vs in blocks of several sizes, alternated in
one process (medians; ratios to the whole-tensor time).

    nice .venv/bin/python scripts/bench_row_blocks.py [--shape 11008x4096] [--formats Q4_0,Q8_0,Q4_K] [--repeat 7]

Each run gives the tensor's mapped pages back afterwards (as convert does), so every run faults them in.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import quantfmt
from quantfmt.io import files
from quantfmt.io.safetensors import write_safetensors
from quantfmt.ops import convert

SIZES = {"whole": 1 << 60, "16MiB": 16 << 20, "32MiB": 32 << 20, "64MiB": 64 << 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="11008x4096")
    ap.add_argument("--formats", default="Q4_0,Q8_0,Q4_K")
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    shape = tuple(int(d) for d in a.shape.split("x"))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.safetensors"
        write_safetensors(path, [files.TensorPlan("w", "F32", shape, lambda: (
            np.random.default_rng(0).standard_normal(shape, np.float32) * np.float32(0.02)).view(np.uint8))])
        with quantfmt.load(path) as m:
            t = m["w"]
            for tag in a.formats.split(","):
                times: dict[str, list[float]] = {k: [] for k in SIZES}
                convert._requantize(t, tag, str(path))  # compiled and warm
                for _ in range(a.repeat):
                    for name, size in SIZES.items():
                        convert.ROW_BLOCK_BYTES = size
                        t0 = time.perf_counter()
                        out = convert._requantize(t, tag, str(path))
                        times[name].append(time.perf_counter() - t0)
                        del out
                        files.release_pages(t.data)
                whole = statistics.median(times["whole"])
                ratios = ", ".join(f"{k} {statistics.median(v) / whole:.3f}x" for k, v in times.items() if k != "whole")
                print(f"{tag} {shape}: whole {whole * 1e3:.1f} ms; in blocks of {ratios}")


if __name__ == "__main__":
    main()
