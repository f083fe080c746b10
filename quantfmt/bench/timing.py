"""How the benchmark measures: thread settings, the one timing statistic, first-call cost, the probes.

The statistic of every timed figure, in process or of a child process, is `median_time`: the median
of the timed calls after one untimed warm-up call. Calls shorter than a few ms are looped and divided
so timer resolution does not matter. The prefill figures, judged as ratios to numpy's float32 matmul,
take both medians from `paired_medians`, whose samples alternate (baseline, ours, baseline, ...): a
shared machine's load drifts over seconds, and two blocks of samples taken one after the other would
see different loads. (A first call, a cold cache or a cold page cache happens once by nature: those
figures are single runs, and say so.)
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import time
from collections.abc import Callable

# A sample shorter than this is a loop of calls, divided: timer resolution and call jitter fade.
MIN_SAMPLE_SECONDS = 0.005
# Sampling one figure stops once its samples add up to this (after at least one sample).
SAMPLE_BUDGET_SECONDS = 4.0

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


# ---- thread settings --------------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    """The environment a benchmark child runs with: every thread pool pinned to `threads`."""
    env = dict(os.environ)
    env.update(dict.fromkeys(THREAD_VARS, str(threads)))
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
        # the symbol differs between OpenBLAS builds (numpy's wheels ship a prefixed, 64-bit-int one)
        for sym in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                return int(fn())
    return None


def set_numba_threads(threads: int) -> int:
    import numba

    n = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    numba.set_num_threads(n)
    return n


def cpu_model() -> str | None:
    """The CPU's model name as the OS reports it (Linux /proc/cpuinfo), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every OS
        return None


# ---- timing -----------------------------------------------------------------------------


def median_time(
    fn: Callable[[], object],
    repeat: int,
    budget: float | None = None,
    info: dict | None = None,
    between: Callable[[], object] | None = None,
) -> float:
    """Median seconds per call of fn over up to `repeat` samples, after one untimed warm-up call.

    Sampling stops early once the samples add up to `budget` seconds (at least one sample is
    always taken), so a call of many seconds costs a warm-up and one or two samples, not
    `repeat`; `info["samples"]` says how many were taken. `between` runs untimed right before
    every timed call (then calls are never looped: each one must follow it).
    """
    budget = SAMPLE_BUDGET_SECONDS if budget is None else budget
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    looped = between is None and first < MIN_SAMPLE_SECONDS
    inner = min(1000, math.ceil(MIN_SAMPLE_SECONDS / max(first, 1e-7))) if looped else 1
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max(1, repeat) and (not samples or spent < budget):
        if between is not None:
            between()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        dt = time.perf_counter() - t0
        spent += dt
        samples.append(dt / inner)
    if info is not None:
        info["samples"] = len(samples)
    return float(statistics.median(samples))


def paired_medians(
    fns: list[Callable[[], object]],
    pauses: list[float],
    repeat: int,
    budget: float | None = None,
    info: dict | None = None,
) -> list[float]:
    """The median seconds per call of each of fns, their samples taken in rounds: every round sleeps
    pauses[i] (untimed) and then times one sample of fns[i], for each i in turn.

    Each function gets two untimed warm-up calls first (the first may compile or prepare; the second
    says whether its samples must be loops of calls, as in median_time). Rounds stop at `repeat`, or
    once the samples add up to `budget` seconds (one round at least); `info["samples"]` is the count.
    The pauses are why this exists beside median_time: after a BLAS call OpenBLAS's threads spin for
    ~0.1 s, after a parallel numba kernel its pool does, and a sample taken then shares a core with them.
    """
    budget = SAMPLE_BUDGET_SECONDS if budget is None else budget
    inner = []
    for fn in fns:
        fn()
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        inner.append(min(1000, math.ceil(MIN_SAMPLE_SECONDS / max(first, 1e-7))) if first < MIN_SAMPLE_SECONDS else 1)
    samples: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    while len(samples[0]) < max(1, repeat) and (not samples[0] or spent < budget):
        for fn, pause, k, into in zip(fns, pauses, inner, samples, strict=True):
            if pause > 0:
                time.sleep(pause)
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            dt = time.perf_counter() - t0
            spent += dt
            into.append(dt / k)
    if info is not None:
        info["samples"] = len(samples[0])
    return [float(statistics.median(s)) for s in samples]


def first_call(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds of the first call, seconds of a second call): their difference is compile/cache-load time."""
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    fn()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


# ---- probes -----------------------------------------------------------------------------

_PSUM = None


def numba_parallel_sum(a) -> float:
    """A parallel numba reduction: the bandwidth probe for threaded code, and what spins up numba's pool.

    Vectorized on purpose (fastmath, float32 lanes). The first version summed into a float64 without
    fastmath: IEEE order forbids reassociating that sum, so it compiled to one scalar convert+add
    chain per element (vcvtss2sd, vaddsd) bound by the add's latency, not by memory: on the 2-core
    Xeon 1.7 GB/s on one thread against 12 GB/s for the fastmath float32 loop (same process), and
    the 4.6 GB/s "numba parallel sum" of issue 11 item 7 was that chain on two threads, not a slow
    numba thread pool.
    """
    global _PSUM
    if _PSUM is None:  # compiled on first use, so importing the benchmark never touches numba
        import numba
        import numpy as np

        @numba.njit(parallel=True, cache=True, fastmath=True)
        def psum(a):
            s = np.float32(0.0)
            for i in numba.prange(a.size):
                s += a[i]
            return s

        _PSUM = psum
    return _PSUM(a)


def bandwidth_probes(a, threads: int, numba_too: bool) -> list[tuple[str, Callable[[], object], int]]:
    """(what, call, bytes moved) of each memory-bandwidth probe over the float32 array `a` (far above any
    cache): numpy's single-thread sum and copy, and numba's parallel sum."""
    import numpy as np

    b = np.empty_like(a)
    probes = [
        ("numpy sum (1 thread)", a.sum, a.nbytes),
        ("numpy copy (read+write)", lambda: np.copyto(b, a), 2 * a.nbytes),
    ]
    if numba_too:
        numba_parallel_sum(a[:1024])  # compile (or load) outside the timing
        label = f"numba parallel sum ({threads} thread{'s' if threads > 1 else ''})"
        probes.append((label, lambda: numba_parallel_sum(a), a.nbytes))
    return probes
