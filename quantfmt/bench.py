"""The benchmark behind `quantfmt bench` / `make bench`: speed and memory figures, honestly measured.

Owns: timing every format's kernels the way users call them (QTensor.quantize, .dequantize,
.rows, .matmul) next to baselines measured in the same process (numpy float32 matmul,
a memory-bandwidth probe, gguf's numpy quantizers), the targets with PASS/MISS, and the
figures that need subprocesses (start-up time, numba's on-disk cache cold vs warm).

How it stays honest:
- every timed figure is the median of several calls after one untimed warm-up call;
  calls shorter than a few ms are repeated in a loop and divided, so timer resolution does
  not matter;
- a kernel's first call (numba compile, or loading numba's on-disk cache) is timed on its
  own, per format, on a tiny problem, before any big problem runs;
- thread counts are explicit: the CLI runs the benchmark in a child process whose
  OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / NUMBA_NUM_THREADS are set before numpy is
  imported, and the BLAS thread count in force is read back from OpenBLAS itself;
- the float32 baselines are measured before any numba kernel has run, again after, and
  interleaved with a parallel numba kernel, so a numba thread pool that slows BLAS shows.

Every measurement is one record (a dict, one JSON line with --json):
    {"op", "format", "shape": [rows, cols], "n", "seconds", "baseline", "baseline_seconds",
     "ratio": seconds / baseline_seconds, "gbps", ...}
with extra keys: "mode", "target", "status" (PASS/MISS), "note", and per-op details.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

DEFAULT_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (576, 1536)]
QUICK_SHAPES = [(11008, 4096)]  # the shape the qmatmul targets are stated for
KERNEL_OPS = ("qmatmul", "quantize", "dequantize", "get_rows")
OPS = (*KERNEL_OPS, "startup", "cache", "e2e")
QUICK_OPS = ("qmatmul", "quantize", "dequantize", "get_rows", "startup")
PREFILL_N = 128
GET_ROWS_N = 64
TARGET_SHAPE = (11008, 4096)  # the shape the qmatmul targets are stated for (a llama-7B FFN matrix)

# Types gguf's numpy code can quantize, by our tag (F16/F32 there are plain casts, not quantizers).
GGUF_QUANTIZERS = ("Q4_0", "Q4_1", "Q8_0", "BF16")

# Targets: (op, n, tag) -> (kind, value). kind "ratio<=": seconds / baseline; "gbps>=": effective GB/s.
QMATMUL_TARGETS = {
    (1, "Q4_0"): 0.25,
    (1, "Q8_0"): 0.45,
    (1, "Q4_1"): 0.3,
    (1, "Q8_A"): 0.6,
    (1, "Q8_B"): 0.6,
    (1, "Q4_A"): 0.6,
    (PREFILL_N, "Q4_0"): 1.0,
    (PREFILL_N, "Q8_0"): 1.0,
}
QUANTIZE_GBPS = {"Q4_0": 3.0, "Q8_0": 1.5}
DEQUANTIZE_GBPS = {"Q4_0": 4.0, "Q8_0": 4.0}
GGUF_SPEEDUP = 4.0  # our quantizer at least 4x gguf's numpy one
STARTUP_SECONDS = 0.3
CONVERT_GBPS = 1.0

# A sample shorter than this is a loop of calls, divided: timer resolution and call jitter fade.
MIN_SAMPLE_SECONDS = 0.005
# Sampling one figure stops once its samples add up to this (after at least one sample).
SAMPLE_BUDGET_SECONDS = 4.0


# ---- thread settings --------------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    """The environment a benchmark child runs with: every thread pool pinned to `threads`."""
    env = dict(os.environ)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = str(threads)
    return env


def blas_threads() -> int | None:
    """The thread count OpenBLAS (loaded by numpy) is using, read from the library; None if unknown."""
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in (
            "scipy_openblas_get_num_threads64_",
            "openblas_get_num_threads64_",
            "openblas_get_num_threads",
        ):
            fn = getattr(lib, sym, None)
            if fn is not None:
                return int(fn())
    return None


def set_numba_threads(threads: int) -> int:
    import numba

    n = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


# ---- timing -----------------------------------------------------------------------------


def median_time(
    fn: Callable[[], object], repeat: int, budget: float | None = None, info: dict | None = None
) -> float:
    """Median seconds per call of fn over up to `repeat` samples, after one untimed warm-up call.

    Sampling stops early once the samples add up to `budget` seconds (at least one sample is
    always taken), so a call of many seconds costs a warm-up and one or two samples, not
    `repeat`; `info["samples"]` says how many were taken.
    """
    budget = SAMPLE_BUDGET_SECONDS if budget is None else budget
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    inner = 1 if first >= MIN_SAMPLE_SECONDS else min(1000, math.ceil(MIN_SAMPLE_SECONDS / max(first, 1e-7)))
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max(1, repeat) and (not samples or spent < budget):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        dt = time.perf_counter() - t0
        spent += dt
        samples.append(dt / inner)
    if info is not None:
        info["samples"] = len(samples)
    return float(np.median(samples))


def first_call(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds of the first call, seconds of a second call): their difference is compile/cache-load time."""
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    fn()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _parallel_sum_kernel():
    # Defined on first use so importing this module never touches numba.
    import numba

    @numba.njit(parallel=True, cache=True)
    def psum(a):
        s = 0.0
        for i in numba.prange(a.size):
            s += a[i]
        return s

    return psum


_PSUM = None


def numba_parallel_sum(a: np.ndarray) -> float:
    """A parallel numba reduction: the bandwidth probe for threaded code, and what spins up numba's pool."""
    global _PSUM
    if _PSUM is None:
        _PSUM = _parallel_sum_kernel()
    return _PSUM(a)


# ---- records ----------------------------------------------------------------------------


def record(
    op, fmt=None, shape=None, n=None, seconds=None, baseline=None, baseline_seconds=None, nbytes=None, **extra
) -> dict:
    ratio = seconds / baseline_seconds if seconds is not None and baseline_seconds else None
    gbps = nbytes / seconds / 1e9 if nbytes and seconds else None
    rec = {
        "op": op,
        "format": fmt,
        "shape": list(shape) if shape is not None else None,
        "n": n,
        "seconds": seconds,
        "baseline": baseline,
        "baseline_seconds": baseline_seconds,
        "ratio": ratio,
        "gbps": gbps,
    }
    rec.update(extra)
    return rec


def _judge(rec: dict, kind: str, value: float) -> dict:
    if kind == "ratio<=":
        ok = rec["ratio"] is not None and rec["ratio"] <= value
        rec["target"] = f"<= {value:g}x"
    elif kind == "gbps>=":
        ok = rec["gbps"] is not None and rec["gbps"] >= value
        rec["target"] = f">= {value:g} GB/s"
    elif kind == "seconds<":
        ok = rec["seconds"] is not None and rec["seconds"] < value
        rec["target"] = f"< {value:g} s"
    else:  # pragma: no cover - a programming error
        raise ValueError(kind)
    rec["status"] = "PASS" if ok else "MISS"
    return rec


def _targets(rec: dict) -> dict:
    """Attach the stated target (if any) for this record and PASS/MISS."""
    op, tag, shape, n = rec["op"], rec["format"], tuple(rec["shape"] or ()), rec["n"]
    if op == "qmatmul" and shape == TARGET_SHAPE and (n, tag) in QMATMUL_TARGETS:
        return _judge(rec, "ratio<=", QMATMUL_TARGETS[(n, tag)])
    if op == "quantize":
        if tag in QUANTIZE_GBPS:
            _judge(rec, "gbps>=", QUANTIZE_GBPS[tag])
            if rec.get("baseline", "").startswith("gguf"):
                # both targets hold: report them together
                gb = _judge(dict(rec), "ratio<=", 1 / GGUF_SPEEDUP)
                rec["target"] += f", <= {1 / GGUF_SPEEDUP:g}x gguf"
                rec["status"] = "PASS" if rec["status"] == gb["status"] == "PASS" else "MISS"
            return rec
        if rec.get("baseline", "").startswith("gguf"):
            return _judge(rec, "ratio<=", 1 / GGUF_SPEEDUP)
    if op == "dequantize" and tag in DEQUANTIZE_GBPS:
        return _judge(rec, "gbps>=", DEQUANTIZE_GBPS[tag])
    return rec


# ---- the run ----------------------------------------------------------------------------


class Bench:
    """One benchmark run; `emit` receives every record as it is measured."""

    def __init__(
        self,
        formats=None,
        shapes=None,
        ops=None,
        repeat=5,
        threads=None,
        quick=False,
        emit: Callable[[dict], None] | None = None,
        progress: Callable[[str], None] | None = None,
        seed: int = 0,
        probe_mb: int = 256,
        e2e_mb: int = 500,
    ):
        from .plugins import formats as registered

        self.all_formats = registered()
        self.tags = list(formats) if formats else list(self.all_formats)
        unknown = [t for t in self.tags if t not in self.all_formats]
        if unknown:
            from .plugins import get_format

            get_format(unknown[0])  # raises UnknownFormatError listing the known tags
        self.shapes = [tuple(s) for s in (shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES))]
        self.ops = tuple(ops) if ops else (QUICK_OPS if quick else OPS)
        self.repeat = max(1, int(repeat))
        self.threads = threads or os.cpu_count() or 1
        self.quick = quick
        self.records: list[dict] = []
        self._emit = emit
        self._progress = progress or (lambda msg: None)
        self.rng = np.random.default_rng(seed)
        self.probe_elements = max(1024, probe_mb << 18)  # float32 elements
        self.e2e_mb = e2e_mb
        self.probe_gbps = 0.0

    def add(self, rec: dict) -> dict:
        if rec["op"] in ("qmatmul", "quantize", "dequantize") and rec["gbps"] and self.probe_gbps:
            rec["of_probe"] = rec["gbps"] / self.probe_gbps  # the share of the best bandwidth probe
        rec = _targets(rec)
        self.records.append(rec)
        if self._emit:
            self._emit(rec)
        return rec

    # -- environment and baselines --

    def env_record(self) -> dict:
        import numba

        numba_threads = set_numba_threads(self.threads)
        return self.add(
            record(
                "env",
                threads=self.threads,
                blas_threads=blas_threads(),
                numba_threads=numba_threads,
                numba_threading_layer=numba.config.THREADING_LAYER,
                numpy=np.__version__,
                numba=numba.__version__,
                cpu_count=os.cpu_count(),
                loadavg=_loadavg(),
                env={
                    k: os.environ.get(k)
                    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")
                },
            )
        )

    def matrices(self, shape):
        rows, cols = shape
        w = self.rng.standard_normal(shape, dtype=np.float32)
        x = self.rng.standard_normal(cols, dtype=np.float32)
        xs = self.rng.standard_normal((PREFILL_N, cols), dtype=np.float32)
        return w, x, xs

    def float_baselines(self, data, when: str, between: Callable[[], object] | None = None) -> dict:
        """numpy float32 W @ x and X @ W.T per shape; `between` runs (untimed) before every timed call."""
        out = {}
        for shape, (w, x, xs) in data.items():
            for n, fn, what in (
                (1, lambda w=w, x=x: w @ x, "W @ x"),
                (PREFILL_N, lambda w=w, xs=xs: xs @ w.T, "X @ W.T"),
            ):
                if between is None:
                    sec = median_time(fn, self.repeat)
                else:
                    sec = _median_interleaved(fn, between, self.repeat)
                out[(shape, n)] = sec
                nbytes = w.nbytes + (x.nbytes + 4 * shape[0]) * n
                self.add(
                    record(
                        "f32_matmul",
                        "numpy-f32",
                        shape,
                        n,
                        sec,
                        nbytes=nbytes,
                        when=when,
                        what=f"numpy float32 {what}",
                    )
                )
        return out

    def bandwidth_probes(self, numba_too: bool) -> float:
        a = self.rng.standard_normal(
            self.probe_elements, dtype=np.float32
        )  # default 256 MB, far above any cache
        b = np.empty_like(a)
        best = 0.0
        probes = [
            ("numpy sum (1 thread)", lambda: a.sum(), a.nbytes),
            ("numpy copy (read+write)", lambda: np.copyto(b, a), 2 * a.nbytes),
        ]
        if numba_too:
            numba_parallel_sum(a[:1024])  # compile (or load) outside the timing
            threads = f"{self.threads} thread" + ("s" if self.threads > 1 else "")
            probes.append((f"numba parallel sum ({threads})", lambda: numba_parallel_sum(a), a.nbytes))
        for what, fn, nbytes in probes:
            sec = median_time(fn, self.repeat)
            rec = self.add(record("membw", None, [a.size], None, sec, nbytes=nbytes, what=what))
            best = max(best, rec["gbps"])
        return best

    # -- one format --

    def compile_times(self, fmt) -> dict:
        """First call vs second call of every kernel on a tiny problem: numba compile or cache load."""
        from .tensor import QTensor

        br, bc = fmt.block_shape
        shape = (math.lcm(br, 64), math.lcm(bc, 256))
        w = self.rng.standard_normal(shape, dtype=np.float32)
        kernels = {}
        t = None

        def q():
            nonlocal t
            t = QTensor.quantize(w, fmt.tag, name="tiny")

        kernels["quantize"] = first_call(q)
        kernels["dequantize"] = first_call(t.dequantize)
        idx = np.arange(0, shape[0], 3)
        kernels["get_rows"] = first_call(lambda: t.rows(idx))
        for mode in fmt.modes:
            for n in (1, PREFILL_N):
                x = self.rng.standard_normal((n, shape[1]), dtype=np.float32)
                x = x[0] if n == 1 else x
                fresh = QTensor("tiny", fmt, shape, t.data)  # prepare() happens in the first call too
                kernels[f"qmatmul[{mode},n={n}]"] = first_call(
                    lambda fresh=fresh, x=x, mode=mode: fresh.matmul(x, mode)
                )
        first = sum(a for a, _ in kernels.values())
        steady = sum(b for _, b in kernels.values())
        return self.add(
            record(
                "compile",
                fmt.tag,
                shape,
                None,
                first - steady,
                baseline="second calls (same kernels)",
                baseline_seconds=steady,
                kernels={k: round(a - b, 4) for k, (a, b) in kernels.items()},
                note="first call = numba compile or on-disk cache load",
            )
        )

    def bench_format(self, fmt, data, f32: dict, probe_gbps: float) -> None:
        from .tensor import QTensor

        gg = _gguf_type(fmt.tag)
        for shape, (w, x, xs) in data.items():
            if not fmt.accepts(shape):
                self.add(
                    record("skip", fmt.tag, shape, note=f"shape does not fit blocks of {fmt.block_shape}")
                )
                continue
            rows, cols = shape
            self._progress(f"{fmt.tag} {rows}x{cols}")
            t = QTensor.quantize(w, fmt.tag, name="w")
            qbytes = t.nbytes
            common = {"bytes": qbytes, "bpw": fmt.bits_per_weight}

            if "quantize" in self.ops:
                sec = median_time(lambda w=w: QTensor.quantize(w, fmt.tag, name="w"), self.repeat)
                if gg is not None:
                    from gguf import quants

                    base = median_time(lambda w=w: quants.quantize(w, gg), min(self.repeat, 3))
                    what = "gguf numpy quantize"
                else:
                    base = median_time(lambda w=w: w.copy(), self.repeat)
                    what = "numpy float32 copy"
                self.add(record("quantize", fmt.tag, shape, None, sec, what, base, nbytes=w.nbytes, **common))

            if "dequantize" in self.ops:
                sec = median_time(t.dequantize, self.repeat)
                if gg is not None:
                    from gguf import quants

                    gq = quants.quantize(w, gg)
                    base = median_time(lambda gq=gq: quants.dequantize(gq, gg), min(self.repeat, 3))
                    what = "gguf numpy dequantize"
                else:
                    base = median_time(lambda w=w: w.copy(), self.repeat)
                    what = "numpy float32 copy"
                self.add(
                    record("dequantize", fmt.tag, shape, None, sec, what, base, nbytes=w.nbytes, **common)
                )

            if "get_rows" in self.ops:
                k = min(GET_ROWS_N, rows)
                idx = self.rng.choice(rows, k, replace=False)
                sec = median_time(lambda t=t, idx=idx: t.rows(idx), self.repeat)
                base = median_time(lambda w=w, idx=idx: w[idx], self.repeat)
                br = fmt.block_shape[0]
                touched = len({int(i) // br for i in idx}) * fmt.row_group_bytes(cols)
                self.add(
                    record(
                        "get_rows",
                        fmt.tag,
                        shape,
                        k,
                        sec,
                        "numpy float32 W[idx]",
                        base,
                        nbytes=touched + k * cols * 4,
                        **common,
                    )
                )

            if "qmatmul" in self.ops:
                t0 = time.perf_counter()
                fmt.prepare(t.data, rows, cols)
                prep = time.perf_counter() - t0
                for n, act in ((1, x), (PREFILL_N, xs)):
                    # The float32 baseline again, right before this format's figures: the machine's
                    # load drifts over a run and a ratio must compare like with like. The pause lets
                    # numba's spinning pool threads go idle first (see the "interleaved" figures).
                    time.sleep(0.05)
                    if n == 1:
                        base = median_time(lambda w=w, x=x: w @ x, self.repeat)
                    else:
                        base = median_time(lambda w=w, xs=xs: xs @ w.T, self.repeat, budget=2.0)
                    what = "numpy float32 W @ x" if n == 1 else "numpy float32 X @ W.T"
                    for mode in fmt.modes:
                        tm = QTensor("w", fmt, shape, t.data)
                        # the untimed warm-up call does prepare() and any compile left
                        info: dict = {}
                        sec = median_time(
                            lambda tm=tm, act=act, mode=mode: tm.matmul(act, mode), self.repeat, info=info
                        )
                        nbytes = qbytes + (cols * 4 + rows * 4) * n
                        self.add(
                            record(
                                "qmatmul",
                                fmt.tag,
                                shape,
                                n,
                                sec,
                                what,
                                base,
                                nbytes=nbytes,
                                mode=mode,
                                prepare_seconds=prep,
                                samples=info["samples"],
                                baseline_before_numba=f32[(shape, n)],
                                **common,
                            )
                        )

    # -- the whole run --

    def run(self) -> list[dict]:
        self.env_record()
        kernels = any(op in self.ops for op in KERNEL_OPS)
        data = {s: self.matrices(s) for s in self.shapes} if kernels else {}
        need_f32 = "qmatmul" in self.ops
        f32 = self.float_baselines(data, "before numba") if need_f32 else {}
        # after the float baselines: the numba probe is the first numba kernel of the run
        probe = self.probe_gbps = self.bandwidth_probes(numba_too=True) if kernels else 0.0
        for tag in self.tags if kernels else ():
            fmt = self.all_formats[tag]
            self._progress(f"{tag}: first calls")
            self.compile_times(fmt)
            self.bench_format(fmt, data, f32, probe)
        if need_f32:
            self._progress("float32 baselines after numba")
            self.float_baselines(data, "after numba")
            spin = self.rng.standard_normal(1 << 20, dtype=np.float32)
            self.float_baselines(
                data, "interleaved with a numba parallel kernel", lambda: numba_parallel_sum(spin)
            )
        del data
        if "startup" in self.ops:
            self._progress("start-up")
            startup(self)
        if "cache" in self.ops:
            self._progress("numba cache: cold vs warm (subprocesses)")
            cache_cold_warm(self)
        if "e2e" in self.ops:
            self._progress("end-to-end (files)")
            end_to_end(self)
        self.add(record("env", note="end of run", loadavg=_loadavg()))
        return self.records


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every OS
        return None


def _median_interleaved(fn, between, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(max(1, repeat)):
        between()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def _gguf_type(tag: str):
    if tag not in GGUF_QUANTIZERS:
        return None
    try:
        from gguf import GGMLQuantizationType
    except ImportError:  # pragma: no cover - gguf is a dependency
        return None
    return GGMLQuantizationType[tag]


# ---- subprocess figures: start-up, numba cache -------------------------------------------


def _quantfmt_command() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "quantfmt")
    if os.path.exists(exe):
        return [exe]
    found = shutil.which("quantfmt")
    return [found] if found else [sys.executable, "-m", "quantfmt.cli"]


def _wall(cmd: list[str], env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


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


def startup(b: Bench) -> None:
    reps = max(3, b.repeat)
    cmd = _quantfmt_command() + ["--help"]
    _wall(cmd)  # warm the OS file cache
    sec = float(np.median([_wall(cmd) for _ in range(reps)]))
    _wall([sys.executable, "-c", "pass"])
    base = float(np.median([_wall([sys.executable, "-c", "pass"]) for _ in range(reps)]))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            _HEAVY_IMPORTS_CHILD,
        ],
        capture_output=True,
        text=True,
    )
    heavy = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else ""
    rec = record(
        "startup",
        None,
        None,
        None,
        sec,
        "python -c pass",
        base,
        command=" ".join(cmd),
        heavy_imports=heavy or "none",
    )
    b.add(_judge(rec, "seconds<", STARTUP_SECONDS))


# The child of cache_cold_warm: times the first call of every kernel of every format on a tiny
# problem, with whatever numba cache NUMBA_CACHE_DIR points at. Prints one JSON object.
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
for tag in json.loads(sys.argv[1]) or list(fmts):
    fmt = fmts[tag]
    br, bc = fmt.block_shape
    shape = (math.lcm(br, 64), math.lcm(bc, 256))
    w = rng.standard_normal(shape, dtype=np.float32)
    t0 = time.perf_counter()
    t = QTensor.quantize(w, tag)
    t.dequantize()
    t.rows(np.arange(0, shape[0], 3))
    for mode in fmt.modes:
        t.matmul(w[0], mode)
        t.matmul(w, mode)
    out[tag] = time.perf_counter() - t0
print(json.dumps(out))
"""


def cache_cold_warm(b: Bench, tags=None) -> None:
    """Run the kernels' first calls in fresh processes with an empty, then a filled, NUMBA_CACHE_DIR."""
    tags = list(tags or b.tags)
    with tempfile.TemporaryDirectory(prefix="quantfmt-numba-cache-") as cache:
        env = thread_env(b.threads)
        env["NUMBA_CACHE_DIR"] = cache
        runs = {}
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "-c", _CACHE_CHILD, json.dumps(tags)],
                env=env,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                b.add(record("cache", None, note=f"{label} run failed: {p.stderr.strip().splitlines()[-1:]}"))
                return
            runs[label] = json.loads(p.stdout.strip().splitlines()[-1])
            runs[label]["_wall"] = wall
        files = sum(len(fs) for _, _, fs in os.walk(cache))
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
    for tag in tags:
        cold, warm = runs["cold"][tag], runs["warm"][tag]
        b.add(
            record(
                "cache",
                tag,
                None,
                None,
                cold,
                "warm cache (second process)",
                warm,
                cold_seconds=cold,
                warm_seconds=warm,
            )
        )
    for key, what in (
        ("_import", "import numpy, numba, quantfmt + load plugins"),
        ("_numba_init", "numba's one-time start (first jit in a process)"),
    ):
        b.add(
            record(
                "cache",
                key.strip("_"),
                None,
                None,
                runs["cold"][key],
                "warm cache (second process)",
                runs["warm"][key],
                what=what,
            )
        )
    b.add(
        record(
            "cache",
            "all",
            None,
            None,
            runs["cold"]["_wall"],
            "warm cache (second process)",
            runs["warm"]["_wall"],
            what="whole process wall time",
            cache_files=files,
            cache_bytes=size,
        )
    )


# The child of end_to_end's open figure: open a file, read one row of one tensor; how long, how
# much memory, and how many bytes of the file ended up mapped into this process. Prints JSON.
_OPEN_ROW_CHILD = r"""
import json, os, sys, time
import numpy as np
import quantfmt
import quantfmt.ops.convert  # noqa: F401  (imported here so the timed open is not an import)
from quantfmt.tensor import QTensor

path, name, row = sys.argv[1], sys.argv[2], int(sys.argv[3])


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


# Load plugins and the row kernel (numba compile or cache load) first: not part of the figure.
fmts = quantfmt.formats()
for tag in {"F32", sys.argv[4]}:
    fmt = fmts[tag]
    br, bc = fmt.block_shape
    QTensor.quantize(np.ones((br * 2, bc * 8), np.float32), tag).row(1)
r0 = rss()
t0 = time.perf_counter()
m = quantfmt.open_model(path)
t1 = time.perf_counter()
v = m[name].row(row)
t2 = time.perf_counter()
out = {"open": t1 - t0, "row": t2 - t1, "rss_delta": rss() - r0, "mapped": mapped(path),
       "row_bytes": v.nbytes, "tensors": len(m)}
m.close()
print(json.dumps(out))
"""


def _e2e_shapes(mb: int) -> list[tuple[int, int]]:
    """A llama-like set of float32 matrices of about `mb` MB (the default 500: two FFN, two attention)."""
    if mb >= 450:
        return [(11008, 4096), (4096, 4096), (11008, 4096), (4096, 4096), (576, 1536)]
    return [(max(32, (mb << 20) // (4 * 1024) // 32 * 32), 1024)]


def _evict(path) -> None:
    """Drop this file's pages from the OS page cache, so the next read is cold (best effort)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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


def _run_peak(args: list[str], env=None) -> tuple[float, int | None, int, str]:
    """Run `quantfmt ARGS`; (wall seconds, peak RSS bytes of that process or None, return code, output)."""
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        rc = subprocess.call(
            [sys.executable, "-c", _PEAK_CHILD, *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        wall = time.perf_counter() - t0
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    peak = None
    for line in text.splitlines():
        if line.startswith("QUANTFMT_BENCH_VMHWM "):
            peak = int(line.split()[1])
    return wall, peak, rc, text


def end_to_end(b: Bench) -> None:
    """File figures: open a ~500 MB file and read one row (cold and warm page cache), and
    `quantfmt convert` of a ~500 MB float32 model (wall time and peak RSS of the subprocess)."""
    from .io import safetensors as container
    from .plugins import formats as registered

    tag = "Q4_0" if "Q4_0" in registered() else "BF16"
    shapes = _e2e_shapes(b.e2e_mb)
    names = [f"blk.{i}.weight" for i in range(len(shapes))]
    with tempfile.TemporaryDirectory(prefix="quantfmt-bench-") as tmp:
        src = os.path.join(tmp, "model-f32.safetensors")
        dst = os.path.join(tmp, f"model-{tag}.safetensors")
        rng = np.random.default_rng(1)
        plans = [
            container.TensorPlan(n, "F32", s, lambda s=s: rng.standard_normal(s, dtype=np.float32) * 0.02)
            for n, s in zip(names, shapes, strict=True)
        ]
        b._progress(f"writing a {sum(r * c * 4 for r, c in shapes) / 1e6:.0f} MB float32 model")
        container.write_safetensors(src, plans)
        size = os.path.getsize(src)
        env = thread_env(b.threads)

        for label, evict in (("input in page cache", False), ("input evicted from page cache", True)):
            if os.path.exists(dst):
                os.remove(dst)
            if evict:
                _evict(src)
            wall, peak, rc, text = _run_peak(["convert", src, dst, "--to", tag], env)
            if rc != 0:
                b.add(record("e2e", tag, note=f"convert failed: {text.strip().splitlines()[-1:]}"))
                return
            rec = record(
                "convert",
                tag,
                None,
                None,
                wall,
                "quantfmt --help (process start-up)",
                None,
                nbytes=size,
                what=f"quantfmt convert F32 -> {tag} ({label})",
                file_mb=size / 1e6,
                out_mb=os.path.getsize(dst) / 1e6,
                peak_rss_mb=peak / 1e6 if peak else None,
            )
            rec["baseline_seconds"] = next((r["seconds"] for r in b.records if r["op"] == "startup"), None)
            rec["ratio"] = wall / rec["baseline_seconds"] if rec["baseline_seconds"] else None
            b.add(_judge(rec, "gbps>=", CONVERT_GBPS))

        big = max(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1])
        row = shapes[big][0] // 2
        for path, ftag in ((src, "F32"), (dst, tag)):
            for label, evict in (("cold page cache", True), ("warm page cache", False)):
                if evict:
                    _evict(path)
                p = subprocess.run(
                    [sys.executable, "-c", _OPEN_ROW_CHILD, path, names[big], str(row), ftag],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if p.returncode != 0:
                    b.add(record("e2e", ftag, note=f"open+row failed: {p.stderr.strip().splitlines()[-1:]}"))
                    continue
                d = json.loads(p.stdout.strip().splitlines()[-1])
                b.add(
                    record(
                        "open_row",
                        ftag,
                        shapes[big],
                        1,
                        d["open"] + d["row"],
                        None,
                        None,
                        what=f"open + read row {row} of {names[big]} ({label})",
                        file_mb=os.path.getsize(path) / 1e6,
                        open_seconds=d["open"],
                        row_seconds=d["row"],
                        rss_delta_mb=d["rss_delta"] / 1e6,
                        touched_mb=d["mapped"] / 1e6,
                        tensors=d["tensors"],
                    )
                )


# ---- printing ---------------------------------------------------------------------------


def _fmt_s(s) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt(v, spec=".2f", suffix="") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _shape(r) -> str:
    return "x".join(str(d) for d in r["shape"]) if r.get("shape") else "-"


def tables(records: list[dict], echo: Callable[[str], None] = print) -> None:
    """One table per op family, for people."""
    by = {}
    for r in records:
        by.setdefault(r["op"], []).append(r)

    def table(title, headers, rows, right=()):
        if not rows:
            return
        echo("")
        echo(title)
        cells = [[str(c) for c in row] for row in rows]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

        def line(cs):
            return "  ".join(
                c.rjust(wd) if i in right else c.ljust(wd)
                for i, (c, wd) in enumerate(zip(cs, widths, strict=True))
            ).rstrip()

        echo(line(headers))
        echo("  ".join("-" * wd for wd in widths))
        for c in cells:
            echo(line(c))

    envs = by.get("env", [])
    if envs:
        env = envs[0]
        echo(
            f"threads {env.get('threads')} (BLAS reports {env.get('blas_threads')}, "
            f"numba {env.get('numba_threads')}, "
            f"layer {env.get('numba_threading_layer')}); numpy {env.get('numpy')}, numba {env.get('numba')}, "
            f"{env.get('cpu_count')} CPUs; load average at start {env.get('loadavg')}"
            + (f", at end {envs[-1].get('loadavg')}" if len(envs) > 1 else "")
        )

    table(
        "Memory bandwidth probes",
        ["probe", "median", "GB/s"],
        [[r["what"], _fmt_s(r["seconds"]), _fmt(r["gbps"], ".1f")] for r in by.get("membw", [])],
        right={1, 2},
    )

    f32 = by.get("f32_matmul", [])
    if f32:
        keyed = {}
        for r in f32:
            keyed.setdefault((tuple(r["shape"]), r["n"]), {})[r["when"]] = r["seconds"]
        rows = []
        for (shape, n), d in keyed.items():
            before = d.get("before numba")
            after = d.get("after numba")
            inter = d.get("interleaved with a numba parallel kernel")
            rows.append(
                [
                    "x".join(map(str, shape)),
                    n,
                    _fmt_s(before),
                    _fmt_s(after),
                    _fmt(after / before if after and before else None, ".2f", "x"),
                    _fmt_s(inter),
                    _fmt(inter / before if inter and before else None, ".2f", "x"),
                ]
            )
        table(
            "numpy float32 baselines (W @ x for n=1, X @ W.T for n=128): before numba ran, after, "
            "interleaved (each call right after a parallel numba kernel)",
            ["shape", "n", "before", "after", "after/before", "interleaved", "inter/before"],
            rows,
            right={1, 2, 3, 4, 5, 6},
        )

    q = by.get("qmatmul", [])
    for n, title in (
        (1, "qmatmul decode (n=1), QTensor.matmul vs numpy float32 W @ x measured just before"),
        (
            PREFILL_N,
            f"qmatmul prefill (n={PREFILL_N}), QTensor.matmul vs numpy float32 X @ W.T measured just before",
        ),
    ):
        rows = [
            [
                r["format"],
                _shape(r),
                r["mode"],
                _fmt_s(r["seconds"]),
                _fmt_s(r["baseline_seconds"]),
                _fmt(r["ratio"], ".3f", "x"),
                _fmt(r["gbps"], ".1f"),
                _fmt(r.get("of_probe"), ".0%"),
                _fmt_s(r["prepare_seconds"]),
                r.get("target", ""),
                r.get("status", ""),
            ]
            for r in q
            if r["n"] == n
        ]
        table(
            title,
            [
                "format",
                "shape",
                "mode",
                "median",
                "float32",
                "ratio",
                "GB/s",
                "of probe",
                "prepare",
                "target",
                "status",
            ],
            rows,
            right={3, 4, 5, 6, 7, 8},
        )

    for op, title in (
        ("quantize", "quantize (QTensor.quantize), GB/s of float32 input"),
        ("dequantize", "dequantize (QTensor.dequantize), GB/s of float32 output"),
    ):
        rows = [
            [
                r["format"],
                _shape(r),
                _fmt_s(r["seconds"]),
                r["baseline"],
                _fmt_s(r["baseline_seconds"]),
                _fmt(r["ratio"], ".3f", "x"),
                _fmt(r["gbps"], ".2f"),
                _fmt(r.get("of_probe"), ".0%"),
                r.get("target", ""),
                r.get("status", ""),
            ]
            for r in by.get(op, [])
        ]
        table(
            title,
            [
                "format",
                "shape",
                "median",
                "baseline",
                "base median",
                "ratio",
                "GB/s",
                "of probe",
                "target",
                "status",
            ],
            rows,
            right={2, 4, 5, 6, 7},
        )

    rows = [
        [
            r["format"],
            _shape(r),
            r["n"],
            _fmt_s(r["seconds"]),
            _fmt_s(r["baseline_seconds"]),
            _fmt(r["ratio"], ".2f", "x"),
            _fmt(r["gbps"], ".2f"),
        ]
        for r in by.get("get_rows", [])
    ]
    table(
        f"get_rows ({GET_ROWS_N} random rows, QTensor.rows) vs numpy float32 W[idx]",
        ["format", "shape", "rows", "median", "float32", "ratio", "GB/s"],
        rows,
        right={2, 3, 4, 5, 6},
    )

    rows = [
        [
            r["format"],
            _fmt_s(r["seconds"] + r["baseline_seconds"]),
            _fmt_s(r["baseline_seconds"]),
            _fmt_s(max(0.0, r["seconds"])),
            ", ".join(f"{k} {v:.2f}" for k, v in r["kernels"].items() if v >= 0.005) or "-",
        ]
        for r in by.get("compile", [])
    ]
    table(
        "first calls per format (tiny problem, this process): numba compile or on-disk cache load",
        ["format", "first calls", "second calls", "difference", "per kernel (s, >= 5 ms)"],
        rows,
        right={1, 2, 3},
    )

    c = by.get("cache", [])
    rows = [
        [
            r["format"],
            _fmt_s(r["seconds"]),
            _fmt_s(r["baseline_seconds"]),
            _fmt(r["ratio"], ".1f", "x"),
            r.get("what", "first call of every kernel") if r["seconds"] else r.get("note", ""),
        ]
        for r in c
    ]
    table(
        "numba on-disk cache: a fresh process with an empty NUMBA_CACHE_DIR (cold), then another (warm)",
        ["format", "cold", "warm", "cold/warm", "what"],
        rows,
        right={1, 2, 3},
    )
    for r in c:
        if r.get("cache_files") is not None:
            echo(f"cache dir after the cold run: {r['cache_files']} files, {r['cache_bytes'] / 1e6:.1f} MB")

    rows = [
        [
            r["command"],
            _fmt_s(r["seconds"]),
            _fmt_s(r["baseline_seconds"]),
            r["heavy_imports"],
            r.get("target", ""),
            r.get("status", ""),
        ]
        for r in by.get("startup", [])
    ]
    table(
        "start-up (subprocess wall time, median)",
        ["command", "median", "python -c pass", "heavy imports", "target", "status"],
        rows,
        right={1, 2},
    )

    rows = [
        [
            r["what"],
            _fmt(r["file_mb"], ".0f"),
            _fmt(r["out_mb"], ".0f"),
            _fmt_s(r["seconds"]),
            _fmt(r["gbps"] * 1e3 if r["gbps"] else None, ".0f"),
            _fmt(r["peak_rss_mb"], ".0f"),
            r.get("target", ""),
            r.get("status", ""),
        ]
        for r in by.get("convert", [])
    ]
    table(
        "quantfmt convert of a float32 model (subprocess: wall time incl. start-up; its peak RSS)",
        ["what", "in MB", "out MB", "wall", "MB/s in", "peak RSS MB", "target", "status"],
        rows,
        right={1, 2, 3, 4, 5},
    )
    rows = [
        [
            r["format"],
            r["what"],
            _fmt(r["file_mb"], ".0f"),
            _fmt_s(r["open_seconds"]),
            _fmt_s(r["row_seconds"]),
            _fmt(r["rss_delta_mb"], ".1f"),
            _fmt(r["touched_mb"], ".2f"),
        ]
        for r in by.get("open_row", [])
    ]
    table(
        "open a file and read one row (fresh process; 'file MB mapped' = resident pages of its mapping)",
        ["format", "what", "file MB", "open", "row", "RSS delta MB", "file MB mapped"],
        rows,
        right={2, 3, 4, 5, 6},
    )
    for r in by.get("e2e", []):
        echo(f"end to end: {r.get('note')}")

    skips = by.get("skip", [])
    if skips:
        echo("")
        for r in skips:
            echo(f"skipped {r['format']} {_shape(r)}: {r['note']}")

    judged = [r for r in records if r.get("status")]
    if judged:
        miss = [r for r in judged if r["status"] == "MISS"]
        echo("")
        echo(f"targets: {len(judged) - len(miss)} PASS, {len(miss)} MISS")
        for r in miss:
            echo(
                f"  MISS {r['op']} {r['format'] or ''} {_shape(r)} n={r['n']} {r.get('mode', '') or ''}: "
                f"target {r['target']}, got ratio {_fmt(r['ratio'], '.3f')} / {_fmt(r['gbps'], '.2f')} GB/s "
                f"/ {_fmt_s(r['seconds'])}"
            )


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """ "4096x4096,576x1536" -> [(4096, 4096), (576, 1536)]; ValueError naming the bad part."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        dims = part.split("x")
        if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"shape {part!r} is not ROWSxCOLS with positive integers (e.g. 4096x4096)")
        out.append((int(dims[0]), int(dims[1])))
    if not out:
        raise ValueError("no shape given")
    return out


def _label(r: dict) -> str:
    n = "" if r["n"] is None else f" n={r['n']}"
    mode = f" {r['mode']}" if r.get("mode") else ""
    return f"{r['op']}{n}{mode}"


def markdown(records: list[dict], shape=TARGET_SHAPE) -> str:
    """A compact Markdown summary (the README's performance section): kernels at `shape`, then the rest."""
    shape = list(shape)
    out = []
    envs = [r for r in records if r["op"] == "env"]
    if envs:
        e = envs[0]
        out.append(
            f"Threads: {e.get('threads')} (OpenBLAS reports {e.get('blas_threads')}, "
            f"numba {e.get('numba_threads')}, layer {e.get('numba_threading_layer')}); "
            f"load average at start {e.get('loadavg')}, at end {envs[-1].get('loadavg')}."
        )
    f32 = {
        (r["n"], r["when"]): r["seconds"] for r in records if r["op"] == "f32_matmul" and r["shape"] == shape
    }
    if f32:
        out.append(
            f"numpy float32 at {shape[0]}x{shape[1]}: W @ x {_fmt_s(f32.get((1, 'before numba')))} "
            f"(after numba ran: {_fmt_s(f32.get((1, 'after numba')))}; right after a numba parallel kernel: "
            f"{_fmt_s(f32.get((1, 'interleaved with a numba parallel kernel')))}); "
            f"X @ W.T with 128 rows {_fmt_s(f32.get((PREFILL_N, 'before numba')))}."
        )
    probes = [r for r in records if r["op"] == "membw"]
    if probes:
        out.append(
            "Bandwidth probes: " + ", ".join(f"{r['what']} {r['gbps']:.1f} GB/s" for r in probes) + "."
        )
    out += [
        "",
        f"Kernels at {shape[0]}x{shape[1]}; qmatmul as time / numpy float32 time (median), "
        "quantize/dequantize as GB/s of float32 (and x faster than gguf's numpy code):",
        "",
        "| format | bpw | decode f32 | decode q8_0 | prefill f32 | prefill q8_0 | quantize GB/s "
        "| dequantize GB/s | get_rows 64 | targets |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tags = list(dict.fromkeys(r["format"] for r in records if r["op"] in ("qmatmul", "quantize")))
    for tag in tags:
        mine = [r for r in records if r["format"] == tag and r["shape"] == shape]
        if not mine:
            continue

        def q(n, mode, mine=mine):
            r = next(
                (r for r in mine if r["op"] == "qmatmul" and r["n"] == n and r.get("mode") == mode), None
            )
            return f"{r['ratio']:.2f}x ({_fmt_s(r['seconds'])})" if r else "-"

        def g(op, mine=mine):
            r = next((r for r in mine if r["op"] == op), None)
            if not r:
                return "-"
            vs = f" ({1 / r['ratio']:.1f}x gguf)" if r["baseline"].startswith("gguf") else ""
            return f"{r['gbps']:.2f}{vs}"

        rows = next((r for r in mine if r["op"] == "get_rows"), None)
        verdict = ", ".join(f"{_label(r)} {r['status']}" for r in mine if r.get("status")) or "-"
        bpw = next((r.get("bpw") for r in mine if r.get("bpw")), 0)
        cells = [
            tag,
            f"{bpw:g}",
            q(1, "f32"),
            q(1, "q8_0"),
            q(PREFILL_N, "f32"),
            q(PREFILL_N, "q8_0"),
            g("quantize"),
            g("dequantize"),
            _fmt_s(rows["seconds"]) if rows else "-",
            verdict,
        ]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    cache = {r["format"]: r for r in records if r["op"] == "cache" and r["seconds"]}
    comp = [r for r in records if r["op"] == "cache" and r["format"] in tags]
    if comp:
        line = "numba first calls per format in a fresh process (every kernel, tiny problem), "
        line += "cold cache -> warm: "
        line += ", ".join(
            f"{r['format']} {r['seconds']:.1f} s -> {r['baseline_seconds']:.2f} s" for r in comp
        )
        if "numba_init" in cache:
            line += f"; numba's own start {cache['numba_init']['baseline_seconds']:.1f} s"
        if "import" in cache:
            line += f"; import + plugins {cache['import']['baseline_seconds']:.1f} s"
        if "all" in cache:
            a = cache["all"]
            line += f"; whole process {a['seconds']:.0f} s cold, {a['baseline_seconds']:.1f} s warm"
        out.append(line + ".")
    for r in records:
        if r["op"] == "startup":
            out.append(
                f"`quantfmt --help`: {_fmt_s(r['seconds'])} (python -c pass {_fmt_s(r['baseline_seconds'])}; "
                f"heavy imports: {r['heavy_imports']}); target < 0.3 s {r['status']}."
            )
        elif r["op"] == "convert":
            out.append(
                f"{r['what']}: {r['file_mb']:.0f} MB -> {r['out_mb']:.0f} MB in {r['seconds']:.2f} s "
                f"({r['gbps'] * 1e3:.0f} MB/s of input, wall time incl. start-up), "
                f"peak RSS {_fmt(r['peak_rss_mb'], '.0f')} MB; target >= 1 GB/s {r['status']}."
            )
        elif r["op"] == "open_row":
            out.append(
                f"{r['format']} file of {r['file_mb']:.0f} MB, {r['what']}: "
                f"open {_fmt_s(r['open_seconds'])}, "
                f"row {_fmt_s(r['row_seconds'])}, RSS +{r['rss_delta_mb']:.1f} MB, "
                f"{r['touched_mb'] * 1e3:.0f} KB of the file mapped."
            )
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover - `python -m quantfmt.bench RECORDS.jsonl` re-prints the tables
    with open(sys.argv[1]) as f:
        recs = [json.loads(line) for line in f if line.startswith("{")]
    print(markdown(recs)) if "--markdown" in sys.argv else tables(recs)
