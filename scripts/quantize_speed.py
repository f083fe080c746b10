"""Quantize speed of formats against Q4_0's, in one process, interleaved.

    python scripts/quantize_speed.py [--rows 4096] [--cols 4096] [--repeat 5] [--ref main] Q2_K Q4_K ...

Each repeat quantizes the same float32 standard-normal matrix once with Q4_0 and once with every
format given (Format.quantize, through the registry), in that order; prints each format's median
as GB/s of float32 input and its ratio to Q4_0's median (the machine is shared: the ratio is what
means something; issue 11's target is about 0.55x Q4_0 or better). With --ref, the formats of that
git ref (its plugins/ copied as scripts/quantize_side_by_side.py does) run in the same repeats, as
"<tag>@<ref>" lines: before and after in one run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import quantfmt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("formats", nargs="*", default=["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4N", "IQ4X"])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ref", default=None, help="also time this git ref's formats (e.g. main)")
    a = ap.parse_args()
    w = np.random.default_rng(0).standard_normal((a.rows, a.cols), dtype=np.float32)
    tags = ["Q4_0", *[t for t in a.formats if t != "Q4_0"]]
    fmts = {t: quantfmt.get_format(t) for t in tags}
    if a.ref:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quantize_side_by_side import _copy_plugins, _format

        tmp = tempfile.mkdtemp(prefix="quantize_speed_")
        _copy_plugins(a.ref, Path(tmp))
        sys.path.insert(0, tmp)
        for t in tags[1:]:
            mod = type(fmts[t]).__module__.rsplit(".", 1)[1]
            fmts[f"{t}@{a.ref}"] = _format(importlib.import_module("oldplugins." + mod))
        tags = list(fmts)
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
