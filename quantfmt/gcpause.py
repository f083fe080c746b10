"""`paused()`: Python's cyclic garbage collector off while a header becomes many small objects.

Opening a file of 2**20 tiny tensors builds millions of container objects (entries, shapes,
sources) that hold no reference cycles. CPython runs a collection every ~700 new containers and
walks every young object each time, which cost ~40 % of opening and planning such a file. The
readers and the recipe planner build their per-tensor objects inside `paused()`; collection
resumes at exit (and the objects are then examined once, not many times).

`paused(freeze=True)` (plugin imports) also hands what exists at exit to `gc.freeze()` when the
process asked for it with `freeze_imports()`: the `quantfmt` command does, a library never does
for its host program (a frozen object is never collected).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_freeze = False


def freeze_imports() -> None:
    """From now on, objects that exist when a `paused(freeze=True)` block ends (numba, a plugin's
    modules and kernels: ~75 000 objects, nearly all of them alive until the process ends) leave
    the collector's generations for good (gc.freeze), instead of being examined by the collection
    that follows (measured 34-50 ms for the one after Q4_0's plugin on a busy 2-core machine, 85
    objects freed) and again by every older-generation collection after it. For a short-lived
    process only: the price is that any garbage cycle among the frozen objects is never freed."""
    global _freeze
    _freeze = True


@contextlib.contextmanager
def paused(freeze: bool = False) -> Iterator[None]:
    """No automatic collection inside; re-enabled at exit only if it was enabled at entry, so
    nesting, threads that overlap and a caller who disabled it themselves all end as they began.
    `freeze`: see freeze_imports()."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze and _freeze:
            gc.freeze()
        if was:
            gc.enable()
