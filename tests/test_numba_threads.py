"""quantfmt.numba_threads: the threading layer choice, chunks claimed once each, kernels safe from threads."""

import os
import subprocess
import sys

import numba
import numpy as np

from quantfmt.numba_threads import LAYER, claim


@numba.njit(parallel=True)
def _count_claims(chunks, threads, hits):
    counter = np.empty(1, np.int64)
    counter[0] = 0
    for t in numba.prange(threads):
        c = claim(counter)
        while c < chunks:
            hits[c, t] += 1
            c = claim(counter)
    return counter[0]


def test_every_chunk_is_claimed_exactly_once():
    threads = numba.get_num_threads()
    for chunks in (0, 1, 7, 1000):
        hits = np.zeros((chunks, threads), np.int64)
        final = _count_claims(chunks, threads, hits)
        assert (hits.sum(axis=1) == 1).all()
        assert final == chunks + threads  # each thread's last claim found the work gone


_LAYER_CHILD = """
import numpy as np, numba
from quantfmt import QTensor
t = QTensor.quantize(np.ones((128, 256), np.float32), "Q8_A", name="w")
t.matmul(np.ones(256, np.float32))
numba.get_num_threads()  # starts numba's pool (quantize's Python threads and a small decode need none)
print(numba.threading_layer())
"""


def _layer(**env) -> str:
    e = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    e.update(env)
    return subprocess.check_output([sys.executable, "-c", _LAYER_CHILD], env=e, text=True).strip().splitlines()[-1]


def test_the_layer_is_chosen_unless_the_user_chose_one():
    assert _layer() == LAYER
    # a user's choice stands (the omp layer is there where an OpenMP runtime is; else numba says so)
    code = "from numba.np.ufunc import omppool"
    if subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0:
        assert _layer(NUMBA_THREADING_LAYER="omp") == "omp"


_THREADS_CHILD = """
import threading, numpy as np
from quantfmt import QTensor
rng = np.random.default_rng(0)
w = rng.standard_normal((256, 1024), dtype=np.float32)
x = rng.standard_normal(1024, dtype=np.float32)
ts = [QTensor.quantize(w, tag, name="w") for tag in ("Q8_A", "Q8_B", "Q4_A", "Q4_0")]
want = [t.matmul(x) for t in ts]
bad = []
def work():
    for _ in range(10):
        for t, ref in zip(ts, want):
            if not np.array_equal(t.matmul(x), ref):
                bad.append(t.fmt.tag)
            QTensor.quantize(w, t.fmt.tag, name="w").dequantize()
th = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in th]
[t.join() for t in th]
print("bad", len(bad))
"""


def test_kernels_called_from_several_python_threads_at_once():
    # The workqueue layer terminates the process when two threads launch parallel kernels at once;
    # quantfmt's kernels take turns (format.kernel_section), so this must run to the end, correctly.
    p = subprocess.run([sys.executable, "-c", _THREADS_CHILD], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "bad 0"


_POOL_CHILD = """
import numpy as np, numba
from numba.np.ufunc import parallel
from quantfmt.families import num_threads
from quantfmt import QTensor
QTensor.quantize(np.ones((1024, 4096), np.float32), "Q4_0")  # parallel_rows: Python threads
before = (parallel._is_initialized, num_threads())
print(before[0], before[1] == numba.get_num_threads(), parallel._is_initialized)
numba.set_num_threads(1)
print(num_threads())
"""


def test_num_threads_reads_numbas_count_without_starting_its_pool():
    out = subprocess.check_output([sys.executable, "-c", _POOL_CHILD], text=True).strip().splitlines()
    assert out[-2:] == ["False True True", "1"]
