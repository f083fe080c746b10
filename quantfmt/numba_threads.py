"""numba's thread pool as quantfmt's kernels use it: the threading layer, and work handed out on demand.

Owns: `choose_layer()`, which picks numba's threading layer before the first parallel kernel runs
(unless NUMBA_THREADING_LAYER says otherwise), and `claim`, an atomic counter a parallel kernel takes
its chunks of work from (`for _ in prange(threads): while (c := claim(counter)) < chunks: ...`, with
`threads = numba.get_num_threads()` passed in as an argument: read inside a kernel, it makes numba
refuse to cache the kernel).

Why (measured on a 2-core Intel Xeon shared with other work, numba 0.68, issue 11 items 5 and 7):
- numba's prange hands each thread one fixed, equal share of the iterations (the OpenMP layer's
  `omp for` is a static schedule, the workqueue layer queues one slice per thread). When one thread
  is descheduled, the region waits for it, and its whole share is still to do when it comes back:
  on a busy machine medians sat on multiples of the scheduler's 4 ms tick. With chunks claimed from
  a counter, the thread that runs takes the work of the one that does not, and the region waits at
  most for the straggler's current chunk (plus its wake-up).
- OpenBLAS's worker threads spin (sched_yield loops) for a while after every BLAS call: measured
  ~20 ms of CPU burnt in the 100 ms after a float32 `W @ x`. A numba kernel started right then shares
  a core with that spinner. Claimed chunks let the thread on the free core do most of the work.
- GNU OpenMP's default wait policy spins after each region; the workqueue layer and OpenMP with
  OMP_WAIT_POLICY=passive sleep instead. See choose_layer() for the one chosen and the figures.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .numba_cache import THREADING_LAYER

#: When set, the user chose the threading layer: choose_layer() leaves it alone.
USER_LAYER_VAR = "NUMBA_THREADING_LAYER"


@intrinsic
def claim(typingctx, counter):
    """Atomically `counter[0] += 1` and return the old value: the index of the next chunk of work.
    `counter` is an int64 array, zeroed before the parallel region."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", arr.data, ir.Constant(ir.IntType(64), 1), "monotonic")

    return sig, codegen


def choose_layer() -> str | None:
    """Set numba's threading layer for this process unless the user set one (NUMBA_THREADING_LAYER);
    returns the layer chosen here, or None. Call before the first parallel kernel runs. (The registry
    does this before loading any plugin, through numba_cache, which does not import numba.)"""
    from .numba_cache import choose_threading_layer

    return choose_threading_layer()


#: The layer choose_layer() sets (see its measurements in the module docstring).
LAYER = THREADING_LAYER
