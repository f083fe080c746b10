"""`quantfmt convert` of a ~500 MB float32 model, whole command, two versions of quantfmt side by side:
A = this checkout, B = another quantfmt package folder (e.g. `git archive main quantfmt | tar -x -C /tmp/b`),
run alternately A B A B ... (pairs; medians of wall time, CPU time and their paired ratios A/B).

    .venv/bin/python scripts/convert_ab.py /tmp/b [--pairs 11] [--evict] [--no-bytecode] [--mb 500]

Each run is the bench's child (`quantfmt convert IN OUT --to Q4_0 --jobs 1`, OUT removed first). By default
both read bytecode from a private PYTHONPYCACHEPREFIX (as an installed package has it; see
quantfmt.bench.procs); --no-bytecode keeps this environment's PYTHONDONTWRITEBYTECODE as it is. --evict drops
the input from the page cache before every run. Also printed: the time from the last tensor produced to the
exit seen here (the output's fsync, rename and the process exit). The plugins of both are the installed
quantfmt_formats (this checkout's with `pip install -e .`).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# The child: the CLI, with the time the last tensor was produced printed at exit.
CHILD = r"""
import atexit, sys, time
import quantfmt.ops.convert as C
produce, last = C._Plan.produce, [0.0]
def timed(self):
    try:
        return produce(self)
    finally:
        last[0] = time.monotonic()
C._Plan.produce = timed
atexit.register(lambda: sys.stderr.write("LAST %r\n" % last[0]))
from quantfmt.cli import main
sys.argv = ["quantfmt", *sys.argv[1:]]
main()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="folder holding the B version's quantfmt package")
    ap.add_argument("--pairs", type=int, default=11)
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--evict", action="store_true")
    ap.add_argument("--no-bytecode", action="store_true")
    args = ap.parse_args()
    from quantfmt.bench.procs import _e2e_shapes, _evict, _write_f32_safetensors

    with tempfile.TemporaryDirectory(prefix="quantfmt-convert-ab-") as tmp:
        src = os.path.join(tmp, "model-f32.safetensors")
        shapes = _e2e_shapes(args.mb)
        _write_f32_safetensors(src, [(f"blk.{i}.weight", s) for i, s in enumerate(shapes)], np.random.default_rng(1))

        def run(base: str | None) -> tuple[float, float, float]:
            env = dict(os.environ)
            if not args.no_bytecode:
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                env["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
            # The child runs in `tmp`: python -c puts the working directory first on sys.path, which must not
            # be a checkout. A's package: this script's checkout; B's: `base`.
            env["PYTHONPATH"] = base or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            dst = os.path.join(tmp, "out-b.safetensors" if base else "out-a.safetensors")
            if os.path.exists(dst):
                os.remove(dst)
            if args.evict:
                _evict(src)
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.monotonic()
            p = subprocess.run([sys.executable, "-c", CHILD, "convert", src, dst, "--to", "Q4_0", "--jobs", "1"],
                               capture_output=True, text=True, env=env, cwd=tmp)
            t1 = time.monotonic()
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if p.returncode != 0:
                sys.exit(p.stderr[-2000:])
            last = float([ln for ln in p.stderr.splitlines() if ln.startswith("LAST ")][-1].split()[1])
            return t1 - t0, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), t1 - last

        run(None), run(args.base)  # warm-up: bytecode, numba's cache files, the input in the page cache
        a, b = [], []
        for _ in range(args.pairs):
            a.append(run(None))
            b.append(run(args.base))
    for name, i in (("wall", 0), ("cpu", 1), ("tail", 2)):
        ma, mb = statistics.median(x[i] for x in a), statistics.median(x[i] for x in b)
        ratio = statistics.median(x[i] / y[i] for x, y in zip(a, b, strict=True))
        print(f"{name:4s}  A {ma:7.3f} s   B {mb:7.3f} s   paired A/B {ratio:.3f}")


if __name__ == "__main__":
    main()
