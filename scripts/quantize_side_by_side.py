"""Quantize speed of this tree's formats against another git ref's, in one process, interleaved.

    python scripts/quantize_side_by_side.py [--ref main] [--rows 11008] [--cols 4096] [--repeat 3] iq4_nl q4_k ...

The ref's plugins/ folder is copied (git show) into a temporary package `oldplugins`, imported next to
this tree's `quantfmt_formats` (both on this tree's quantfmt core), and each format's quantize of the
same float32 matrix runs alternately, old then new, `--repeat` times; prints the medians as GB/s of
float32 input, their ratio, and checks that the bytes are identical. On a shared machine only the
ratio means much (both sides see the same load).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _copy_plugins(ref: str, dest: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    names = subprocess.run(["git", "ls-tree", "--name-only", ref, "plugins/"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split()
    pkg = dest / "oldplugins"
    pkg.mkdir()
    for name in names:
        text = subprocess.run(["git", "show", f"{ref}:{name}"], cwd=root, check=True, capture_output=True).stdout
        (pkg / Path(name).name).write_bytes(text)


def _format(module):
    return next(v for v in vars(module).values()
                if isinstance(v, type) and v.__module__ == module.__name__ and getattr(v, "tag", None))()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="+", help="plugin module names, e.g. iq4_nl q4_k")
    ap.add_argument("--ref", default="main")
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="quantize_side_by_side_")
    _copy_plugins(a.ref, Path(tmp))
    sys.path.insert(0, tmp)
    w = np.random.default_rng(0).standard_normal((a.rows, a.cols), dtype=np.float32)
    for m in a.modules:
        old = _format(importlib.import_module("oldplugins." + m))
        new = _format(importlib.import_module("quantfmt_formats." + m))
        same = np.array_equal(old.quantize(w), new.quantize(w))  # also the first calls (compile or cache load)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(a.repeat):
            for k, f in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                f.quantize(w)
                times[k].append(time.perf_counter() - t0)
        mo, mn = float(np.median(times["old"])), float(np.median(times["new"]))
        print(f"{new.tag:6s} {a.ref} {w.nbytes / mo / 1e9:6.3f} GB/s   this tree {w.nbytes / mn / 1e9:6.3f} GB/s   "
              f"{mo / mn:5.2f}x   bytes {'identical' if same else 'DIFFER'}   path {new.kernel_path('quantize')}",
              flush=True)


if __name__ == "__main__":
    main()
