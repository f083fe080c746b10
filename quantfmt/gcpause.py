"""`paused()`: Python's cyclic garbage collector off while a header becomes many small objects.

Opening a file of 2**20 tiny tensors builds millions of container objects (entries, shapes,
sources) that hold no reference cycles. CPython runs a collection every ~700 new containers and
walks every young object each time, which cost ~40 % of opening and planning such a file. The
readers and the recipe planner build their per-tensor objects inside `paused()`; collection
resumes at exit (and the objects are then examined once, not many times).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic collection inside; re-enabled at exit only if it was enabled at entry, so
    nesting, threads that overlap and a caller who disabled it themselves all end as they began."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
