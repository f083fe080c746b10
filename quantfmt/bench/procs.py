"""Figures measured in child processes: start-up, numba's on-disk cache cold vs warm, and files end to end
(`quantfmt convert` wall time and peak RSS, opening a file and reading one row).

The children use quantfmt's public API or run the `quantfmt` CLI itself, so these figures are what a user
sees. Each function takes the running Bench (for its settings, `add` and progress) and adds records.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

from .records import (
    CONVERT_GBPS,
    DASK_RATIO,
    PARALLEL_GBPS,
    PARALLEL_RATIO,
    STARTUP_SECONDS,
    WORKER_RSS_RATIO,
    judge,
    record,
)
from .timing import median_time, thread_env


def _quantfmt_command() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "quantfmt")
    if os.path.exists(exe):
        return [exe]
    found = shutil.which("quantfmt")
    return [found] if found else [sys.executable, "-m", "quantfmt.cli"]


def _run_quiet(cmd: list[str], env=None) -> None:
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def _last_line(text: str) -> list[str]:
    return text.strip().splitlines()[-1:]


# ---- start-up ---------------------------------------------------------------------------

# Runs `quantfmt --help` in-process and names the heavy modules it imported (it should import none).
_HEAVY_IMPORTS_CHILD = """
import sys
from quantfmt.cli import cli
try:
    cli.main(['--help'], prog_name='quantfmt', standalone_mode=False)
except SystemExit:
    pass
print(','.join(m for m in ('numpy', 'numba', 'quantfmt_formats') if m in sys.modules), file=sys.stderr)
"""


def startup(b) -> None:
    """Wall time of `quantfmt --help` against `python -c pass`, and which heavy modules it imports."""
    reps = max(3, b.repeat)
    cmd = _quantfmt_command() + ["--help"]
    # the warm-up run also warms the OS file cache; no budget: every start-up counts
    sec = median_time(lambda: _run_quiet(cmd), reps, budget=math.inf)
    base = median_time(lambda: _run_quiet([sys.executable, "-c", "pass"]), reps, budget=math.inf)
    probe = subprocess.run([sys.executable, "-c", _HEAVY_IMPORTS_CHILD], capture_output=True, text=True)
    heavy = "".join(_last_line(probe.stderr)) or "none"
    rec = record("startup", None, None, None, sec, "python -c pass", base, command=" ".join(cmd), heavy_imports=heavy)
    b.add(judge(rec, "seconds<", STARTUP_SECONDS))


# ---- numba's on-disk cache ----------------------------------------------------------------

# Times the first call of every kernel of every format on a tiny problem, with whatever numba cache
# NUMBA_CACHE_DIR points at. Prints one JSON object.
_CACHE_CHILD = r"""
import json, math, sys, time
t0 = time.perf_counter()
import numpy as np
from quantfmt import QTensor, formats
fmts = formats()
out = {"_import": time.perf_counter() - t0}
# numba's one-time start in a process (LLVM and its target) is paid by whichever kernel runs
# first; a trivial uncached function pays it here so the per-format figures exclude it.
import numba
t0 = time.perf_counter()
numba.njit(lambda: 1)()
out["_numba_init"] = time.perf_counter() - t0
rng = np.random.default_rng(0)
for tag in json.loads(sys.argv[1]) or [t for t, f in fmts.items() if f.can_quantize and f.value_kind == "f"]:
    fmt = fmts[tag]
    br, bc = fmt.block_shape
    shape = (math.lcm(br, 64), math.lcm(bc, 256))
    w = rng.standard_normal(shape, dtype=np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    t = QTensor.quantize(w, tag)
    t.dequantize()
    t.rows(np.arange(0, shape[0], 3))
    for mode in fmt.modes:
        t.matmul(w[0], mode)
        t.matmul(w, mode)
    out[tag] = time.perf_counter() - t0
    out["cpu:" + tag] = time.process_time() - c0  # compiling is one thread: robust on a shared machine
print(json.dumps(out))
"""

_CACHE_PARTS = (
    ("import", "import numpy, numba, quantfmt + load plugins"),
    ("numba_init", "numba's one-time start (first jit in a process)"),
)


def cache_cold_warm(b, tags=None) -> None:
    """Run the kernels' first calls in fresh processes with an empty, then a filled, NUMBA_CACHE_DIR."""
    tags = list(tags or b.tags)
    with tempfile.TemporaryDirectory(prefix="quantfmt-numba-cache-") as cache:
        env = thread_env(b.threads)
        env["NUMBA_CACHE_DIR"] = cache
        runs = {}
        for label in ("cold", "warm"):  # one run each: a cache is cold only once
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", _CACHE_CHILD, json.dumps(tags)], env=env, capture_output=True,
                               text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                b.add(record("cache", None, note=f"{label} run failed: {_last_line(p.stderr)}"))
                return
            runs[label] = {**json.loads(p.stdout.strip().splitlines()[-1]), "_wall": wall}
        files = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs]
        size = sum(os.path.getsize(f) for f in files)
    cold, warm, vs = runs["cold"], runs["warm"], "warm cache (second process)"
    for tag in tags:
        c, w = cold[tag], warm[tag]
        b.add(record("cache", tag, None, None, c, vs, w, cold_seconds=c, warm_seconds=w,
                     cold_cpu_seconds=round(cold[f"cpu:{tag}"], 3), warm_cpu_seconds=round(warm[f"cpu:{tag}"], 3)))
    for key, what in _CACHE_PARTS:
        b.add(record("cache", key, None, None, cold[f"_{key}"], vs, warm[f"_{key}"], what=what))
    b.add(record("cache", "all", None, None, cold["_wall"], vs, warm["_wall"], what="whole process wall time",
                 cache_files=len(files), cache_bytes=size))


# ---- files end to end ---------------------------------------------------------------------

# Opens a file, reads one row of one tensor: how long, how much memory, and how many bytes of the
# file ended up mapped into this process. Prints JSON.
_OPEN_ROW_CHILD = r"""
import json, os, sys, time
import numpy as np
import quantfmt
from quantfmt.tensor import QTensor

path, name, row = sys.argv[1], sys.argv[2], int(sys.argv[3])
open_model = quantfmt.open_model  # resolved (imported) here, so the timed open is not an import


def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024


def mapped(path):
    # Resident bytes of this process's mappings of `path` (pages touched, plus kernel fault-around).
    total, cur = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if head and "-" in head[0] and len(head) >= 5:
                cur = len(head) == 6 and os.path.realpath(head[5].strip()) == os.path.realpath(path)
            elif cur and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


# Load plugins and the row kernel (numba compile or cache load) first: not part of the figure. Also on
# read-only bytes, as a file's map is: numba compiles that signature apart (~0.2 s on an empty cache).
fmts = quantfmt.formats()
for tag in {"F32", sys.argv[4]}:
    fmt = fmts[tag]
    br, bc = fmt.block_shape
    q = QTensor.quantize(np.ones((br * 2, bc * 8), np.float32), tag)
    q.row(1)
    ro = np.array(q.data)
    ro.setflags(write=False)
    QTensor(q.name, q.fmt, q.shape, ro).row(1)
r0 = rss()
t0 = time.perf_counter()
m = open_model(path)
t1 = time.perf_counter()
v = m[name].row(row)
t2 = time.perf_counter()
out = {"open": t1 - t0, "row": t2 - t1, "rss_delta": rss() - r0, "mapped": mapped(path),
       "row_bytes": v.nbytes, "tensors": len(m)}
m.close()
print(json.dumps(out))
"""

# Runs the quantfmt CLI with the given arguments and, at exit, prints this process's own peak
# resident memory (VmHWM). Not ru_maxrss from wait4: on Linux a child's ru_maxrss includes the
# parent's resident memory at fork/exec time, which here is the whole benchmark's.
_PEAK_CHILD = r"""
import atexit, sys


def _peak():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    sys.stderr.write("\nQUANTFMT_BENCH_VMHWM %d\n" % (int(line.split()[1]) * 1024))
    except OSError:
        pass


atexit.register(_peak)
from quantfmt.cli import main
sys.argv = ["quantfmt", *sys.argv[1:]]
main()
"""


def _e2e_shapes(mb: int) -> list[tuple[int, int]]:
    """A llama-like set of float32 matrices of about `mb` MB (per 500 MB: two FFN, two attention, one small)."""
    if mb >= 450:  # the set again per ~500 MB (--e2e-mb 2000: four of them, the 2 GB model)
        return [(11008, 4096), (4096, 4096), (11008, 4096), (4096, 4096), (576, 1536)] * max(1, round(mb / 500))
    return [(max(32, (mb << 20) // (4 * 1024) // 32 * 32), 1024)]


def _write_f32_safetensors(path, tensors: list[tuple[str, tuple[int, int]]], rng) -> None:
    """A plain float32 safetensors file (as a Hugging Face checkpoint is), from random normal weights.

    Written by hand from the format's spec (8-byte little-endian header size, JSON header, the data),
    one tensor at a time, so the benchmark never holds the whole model and needs no writer internals.
    """
    header, offset = {}, 0
    for name, shape in tensors:
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, shape in tensors:
            f.write((rng.standard_normal(shape, dtype="float32") * 0.02).astype("<f4").tobytes())


def _missing_bytecode() -> list[str]:
    """quantfmt's modules a conversion imports that the children would compile from source in every run:
    Python told not to write bytecode (PYTHONDONTWRITEBYTECODE, inherited) and no .pyc cached for them
    (an editable install run that way never gets them). Measured ~0.1 s of CPU per `quantfmt convert`
    on a 2-core machine. An installed package has them: `pip install .` compiles every module at install
    (checked: it does so with PYTHONDONTWRITEBYTECODE=1 set too)."""
    import importlib.util

    if not (os.environ.get("PYTHONDONTWRITEBYTECODE") or sys.flags.dont_write_bytecode):
        return []
    missing = []
    for mod in ("quantfmt.cli", "quantfmt.ops.convert", "quantfmt_formats.q4_0"):
        spec = importlib.util.find_spec(mod)
        src = spec.origin if spec is not None else None
        if src and src.endswith(".py") and not os.path.exists(importlib.util.cache_from_source(src)):
            missing.append(mod)
    return missing


def _with_bytecode(env: dict, pycache: str) -> dict:
    """`env` with bytecode written and read in the private folder `pycache` (PYTHONPYCACHEPREFIX), so
    that after one untimed run every module the command imports has its .pyc, as in an installed
    package; nothing is written next to the user's sources."""
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def _evict(path) -> None:
    """Drop this file's pages from the OS page cache, so the next read is cold (best effort)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _run_peak(args: list[str], env=None) -> tuple[float, int | None, int, str]:
    """Run `quantfmt ARGS`; (wall seconds, peak RSS bytes of that process or None, return code, output)."""
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-c", _PEAK_CHILD, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    peaks = [int(line.split()[1]) for line in text.splitlines() if line.startswith("QUANTFMT_BENCH_VMHWM ")]
    return wall, (peaks[-1] if peaks else None), rc, text


# Converts with the public API in a fresh process and prints the conversion's own wall time (pool start-up
# included: it is part of every --jobs N run) and each worker's peak RSS. "daskN": a fresh Dask LocalCluster of
# N single-threaded worker processes, started before the clock starts (a cluster runs before a job is sent).
_PARALLEL_CHILD = r"""
import json, sys, time
import quantfmt
src, out, tag, mode = sys.argv[1:5]
quantfmt.formats()  # the plugins, as the CLI loads them before converting
executor, jobs = None, 1
if mode.startswith("dask"):
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=int(mode[4:]), threads_per_worker=1, processes=True, dashboard_address=None,
                           host="127.0.0.1")
    executor = Client(cluster)
else:
    jobs = int(mode)
t0 = time.perf_counter()
rep = quantfmt.convert(src, out, tag, jobs=jobs, executor=executor)
sec = time.perf_counter() - t0
print(json.dumps({"seconds": sec, "workers": list(rep.workers.values()),
                  "start": list(rep.worker_start_rss.values())}))
"""


def parallel_convert(b, src: str, dst: str, tag: str, size: int, largest: int, env: dict | None = None) -> None:
    """--jobs 2 against --jobs 1, a 2-worker Dask LocalCluster against --jobs 2, and the workers' peak RSS
    against the largest tensor's float32 size. Runs interleaved (jobs 1, jobs 2, dask), median of each."""
    import importlib.util
    import statistics

    modes = ["1", "2"] + (["dask2"] if b.e2e_dask and importlib.util.find_spec("distributed") else [])
    if b.e2e_dask and "dask2" not in modes:
        b.add(record("e2e", tag, note="Dask row skipped: distributed is not installed (pip install 'quantfmt[dask]')"))
    env = env if env is not None else thread_env(b.threads)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(max(1, min(3, b.repeat))):
        for m in modes:
            if os.path.exists(dst):
                os.remove(dst)
            b._progress(f"convert --jobs {m}" if m.isdigit() else "convert on a Dask LocalCluster")
            p = subprocess.run([sys.executable, "-c", _PARALLEL_CHILD, src, dst, tag, m], env=env,
                               capture_output=True, text=True)
            if p.returncode != 0:
                b.add(record("e2e", tag, note=f"parallel convert ({m}) failed: {_last_line(p.stderr)}"))
                return
            runs[m].append(json.loads(p.stdout.strip().splitlines()[-1]))
    sec = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    common = {"nbytes": size, "file_mb": size / 1e6, "largest_mb": largest / 1e6, "runs": len(runs["1"])}

    def peak(m):
        return max((max(r["workers"]) for r in runs[m] if r["workers"]), default=None)

    b.add(record("parallel", tag, None, 1, sec["1"], None, None, what="--jobs 1 (this process, numba threads = "
                 f"{b.threads})", **common))
    b.add(judge(record("parallel", tag, None, 2, sec["2"], "--jobs 1", sec["1"], what="--jobs 2 vs --jobs 1",
                       peak_rss_mb=(peak("2") or 0) / 1e6, **common), "ratio<=", PARALLEL_RATIO))
    b.add(judge(record("parallel", tag, None, 2, sec["2"], None, None, what="--jobs 2 input throughput",
                       **common), "gbps>=", PARALLEL_GBPS))
    if "dask2" in sec:
        b.add(judge(record("parallel", tag, None, 2, sec["dask2"], "--jobs 2", sec["2"],
                           what="Dask LocalCluster (2 workers x 1 thread) vs --jobs 2", peak_rss_mb=(peak("dask2") or 0)
                           / 1e6, **common), "ratio<=", DASK_RATIO))
    p2 = peak("2")
    if p2:
        start = min((min(r["start"]) for r in runs["2"] if r["start"]), default=None)
        rec = record("parallel", tag, None, 2, None, None, None, what="peak RSS per worker (--jobs 2) / largest "
                     "tensor's float32 size", peak_rss_mb=p2 / 1e6, **common,
                     worker_start_mb=start / 1e6 if start else None)
        rec["ratio"] = p2 / largest
        b.add(judge(rec, "ratio<=", WORKER_RSS_RATIO))


def end_to_end(b) -> None:
    """File figures: `quantfmt convert` of a ~500 MB float32 model (wall time and peak RSS of the child;
    input in and out of the page cache), then open each file and read one row (cold and warm page cache).
    One run each: a cold page cache happens once."""
    import numpy as np

    tag = "Q4_0" if "Q4_0" in b.all_formats else "BF16"
    shapes = _e2e_shapes(b.e2e_mb)
    names = [f"blk.{i}.weight" for i in range(len(shapes))]
    with tempfile.TemporaryDirectory(prefix="quantfmt-bench-") as tmp:
        src = os.path.join(tmp, "model-f32.safetensors")
        dst = os.path.join(tmp, f"model-{tag}.safetensors")
        b._progress(f"writing a {sum(r * c * 4 for r, c in shapes) / 1e6:.0f} MB float32 model")
        _write_f32_safetensors(src, list(zip(names, shapes, strict=True)), np.random.default_rng(1))
        size = os.path.getsize(src)
        env = thread_env(b.threads)
        startup_sec = next((r["seconds"] for r in b.records if r["op"] == "startup"), None)
        args = ["convert", src, dst, "--to", tag, "--jobs", "1"]

        def run(env) -> tuple[float, int | None] | None:
            if os.path.exists(dst):
                os.remove(dst)
            wall, peak, rc, text = _run_peak(args, env)
            if rc != 0:
                b.add(record("e2e", tag, note=f"convert failed: {_last_line(text)}"))
                return None
            return wall, peak

        # What a user runs has its bytecode (see _missing_bytecode). When this environment would make every
        # child compile quantfmt from source, the timed runs read bytecode that the untimed warm-up wrote into
        # a private folder, and runs without it, interleaved with them, are recorded beside
        # (no_bytecode_seconds): the cost is shown, not hidden, and not counted as the command's.
        missing = _missing_bytecode()
        plain_env, extra = env, {"bytecode": "installed (.pyc next to the sources)"}
        if missing:
            env = _with_bytecode(env, os.path.join(tmp, "pycache"))
            extra = {"bytecode": "compiled once by the untimed warm-up into a private PYTHONPYCACHEPREFIX (as "
                                 "`pip install` compiles at install)"}
        b._progress("convert (untimed warm-up: bytecode, numba's cache files, the input in the page cache)")
        if run(env) is None:
            return
        # In the page cache: the median of a few runs (one run on a shared machine was +-30 %); evicted: one
        # run, as a cold page cache happens once.
        for label, evict, reps in (("input in page cache", False, max(1, min(3, b.repeat))),
                                   ("input evicted from page cache", True, 1)):
            runs: list[tuple[float, int | None]] = []
            plain: list[tuple[float, int | None]] = []
            for _ in range(reps):
                for envs, into in ((env, runs), (plain_env, plain)) if missing and not evict else ((env, runs),):
                    if evict:
                        _evict(src)
                    b._progress(f"convert ({label}{', no bytecode' if into is plain else ''})")
                    got = run(envs)
                    if got is None:
                        return
                    into.append(got)
            walls = sorted(w for w, _ in runs)
            peaks = [p for _, p in runs if p]
            more: dict = dict(extra)
            if plain:
                nobc = sorted(w for w, _ in plain)[len(plain) // 2]
                more.update(no_bytecode_seconds=nobc, bytecode_note=(
                    f"no cached bytecode for {', '.join(missing)} and PYTHONDONTWRITEBYTECODE set: compiling "
                    f"quantfmt from source in every run, as this environment would, took {nobc:.2f} s (median, "
                    "interleaved); the figure reads bytecode compiled once, as an installed package has it"))
            rec = record("convert", tag, None, None, walls[len(walls) // 2], "quantfmt --help (process start-up)",
                         startup_sec, nbytes=size, what=f"quantfmt convert F32 -> {tag} --jobs 1 ({label})",
                         file_mb=size / 1e6, out_mb=os.path.getsize(dst) / 1e6,
                         peak_rss_mb=max(peaks) / 1e6 if peaks else None, runs=reps, **more)
            b.add(judge(rec, "gbps>=", CONVERT_GBPS))

        parallel_convert(b, src, os.path.join(tmp, "parallel-out.safetensors"), tag, size,
                         4 * max(r * c for r, c in shapes), env)

        big = max(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1])
        row = shapes[big][0] // 2
        for path, ftag in ((src, "F32"), (dst, tag)):
            for label, evict in (("cold page cache", True), ("warm page cache", False)):
                if evict:
                    _evict(path)
                p = subprocess.run([sys.executable, "-c", _OPEN_ROW_CHILD, path, names[big], str(row), ftag],
                                   env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    b.add(record("e2e", ftag, note=f"open+row failed: {_last_line(p.stderr)}"))
                    continue
                d = json.loads(p.stdout.strip().splitlines()[-1])
                b.add(record("open_row", ftag, shapes[big], 1, d["open"] + d["row"], None, None,
                             what=f"open + read row {row} of {names[big]} ({label})",
                             file_mb=os.path.getsize(path) / 1e6, open_seconds=d["open"], row_seconds=d["row"],
                             rss_delta_mb=d["rss_delta"] / 1e6, touched_mb=d["mapped"] / 1e6, tensors=d["tensors"]))
