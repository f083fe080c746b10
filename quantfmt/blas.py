"""numpy's BLAS thread count, for kernels that run one single-threaded sgemm per thread of their own.

Owns: finding numpy's OpenBLAS in this process (`available()`), and `one_thread()`, a context in which
every BLAS call runs on the thread that makes it (OpenBLAS set to one thread, the previous count put
back after).

Why: prefill kernels that convert weights to float32 tiles for sgemm ran the conversion on one thread
and then one 2-thread sgemm per tile. OpenBLAS splits each call into one fixed share per thread, so a
call waits for its slowest thread (on a busy machine, a descheduled one), and a core idles while the
other converts. With one thread per core each converting a tile and multiplying it alone, the threads
take tiles from a shared counter and nobody waits for anybody (quantfmt.families.parallel_rows).

Caveat: OpenBLAS's thread count is one process-wide setting (`openblas_set_num_threads_local` is global
too in OpenBLAS's pthreads build), so a BLAS call another Python thread makes meanwhile also runs on one
thread; quantfmt's own kernels take turns (quantfmt.format.kernel_section). Found through
/proc/self/maps (Linux) only; elsewhere, or with another BLAS (MKL, Accelerate), `available()` is False
and callers keep BLAS's own threading.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator

# (getter, setter) symbol pairs: scipy-openblas wheels (numpy's own), 64-bit-int builds, plain OpenBLAS
_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)

#: Tests set this False to take the path for a BLAS whose threads cannot be controlled.
ENABLED = True


def _openblas_paths() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    # numpy's own (in numpy.libs / numpy/.libs) first: another package may load another OpenBLAS
    return sorted(paths, key=lambda p: ("numpy" not in p, p))


@functools.cache
def _controls():
    """(get, set) ctypes functions of numpy's OpenBLAS, or None."""
    import numpy  # noqa: F401  (loads its BLAS, so /proc/self/maps lists it)

    for path in _openblas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                return get, set_
    return None


def available() -> bool:
    """Whether `one_thread()` really makes BLAS calls single-threaded here (numpy's OpenBLAS found)."""
    return ENABLED and os.name == "posix" and _controls() is not None


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """BLAS calls made inside run on the calling thread (no-op where `available()` is False)."""
    c = _controls() if available() else None
    if c is None:
        yield
        return
    get, set_ = c
    old = get()
    if old != 1:
        set_(1)
    try:
        yield
    finally:
        if old != 1:
            set_(old)
