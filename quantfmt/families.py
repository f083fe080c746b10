"""Format families: the bodies that formats of one kind share, written once.

A format subclasses the family that fits it and supplies only what is its own:

`BlockFormat`, the simple route (as gguf-py's `quants.py`): blocks of K weights along a row.
    The plugin writes two numpy functions on whole blocks,
        quantize_blocks(blocks: float32 (n, K)) -> uint8 (n, block_bytes)
        dequantize_blocks(blocks: uint8 (n, block_bytes)) -> float32 (n, K)
    and gets quantize, dequantize, get_rows (only the wanted rows' blocks) and qmatmul
    (dequantized tiles into BLAS) from here. Fast kernels can come later, one at a time.

`GGMLFormat`: ggml's block formats (blocks of `qk` weights along a row, stored as ggml does).
    The module supplies two parallel numba kernels over rows,
        quantize_kernel(w, out, bad)          w float32 (rows, cols); out uint8 (rows, nb, block_bytes);
                                              bad int64 (rows,): per row the first block whose scale
                                              does not fit its storage, or -1
        dequantize_kernel(blocks, lut, idx, out)   rows idx of blocks into out float32 (len(idx), cols);
                                              lut = fp16_table() (fp16 bits -> float32)
    plus `range_rule` (the RangeError's explanation), `ggml_type` (its GGUF type name) and
    `vec_dot_type` (the activation blocks ggml pairs it with in qmatmul). Quantize, dequantize,
    get_rows and the range error are here; qmatmul stays the format's (repacked tiles). The small
    prange drivers stay in each format's module on purpose: numba's on-disk cache does not keep a
    driver that takes another kernel as an argument or closes over it (measured: a cache miss in
    every new process), so a shared generic numba driver would recompile on every start. A driver
    may instead be Python: `parallel_rows` runs a cached nogil row kernel on threads, as fast, and
    spares a cold start the parallel=True driver's compile (Q4_0, Q8_0 and the k-quants quantize so).

`KernelFormat`: quantfmt's own research formats (Q8_A, Q8_B, Q4_A), whose numba kernels take the
    whole tensor: quantize_kernel(w, out) (quantize_kernel(w, out, bad) for a format with checks_finite:
    it writes NONFINITE_ROW in bad[r], int64 (rows,), for a row holding NaN/inf, and need not quantize
    that row's group), dequantize_kernel(data, rows, cols, out),
    get_rows_kernel(data, cols, idx, out) and a `matvec(prep, rows, cols, x, out)` for small
    batches; batches of more than `matvec_max_n` rows go to dequantized tiles + BLAS.
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np

from . import blas, gemm
from .errors import RangeError
from .format import Format, nonfinite_rows


@functools.lru_cache(maxsize=1)
def fp16_table() -> np.ndarray:
    """float32 value of every fp16 bit pattern (256 KiB): decoding a scale is one load."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def n_chunks(rows: int, cols: int, weights: int = 65536) -> int:
    """How many row ranges a prange driver splits `rows` rows into: about `weights` (64K) weights
    each, enough to balance two or more threads without per-row scheduling overhead."""
    return max(1, min(rows, rows * cols // weights))


#: Decode kernels of fewer weights than MIN_THREADED_WEIGHTS * T / (T - 1) on T threads run on the
#: calling thread alone (decode_threads): handing work to another thread costs a fixed ~0.1 ms (its
#: wake-up, then the GIL), which splitting over T threads pays back only once the one-thread time is
#: about T/(T-1) times that. Measured with 2 threads (one decode call, 1 vs 2 threads alternating, the
#: 2-core Xeon): Q4_0 q8_0 at 4M weights 0.15 vs 0.26 ms, 8M 0.27 vs 0.34, 16M 0.43 vs 0.44; Q4_K
#: q8_k 4M 0.19 vs 0.25, 8M 0.36 vs 0.36, 16M 0.59 vs 0.51; Q8_0 q8_0 16M 0.67 vs 0.52 ms. SmolLM2
#: (576x576 to 576x1536 matrices) decoded Q4_0 at 16 tokens/s threaded and 36 on one thread.
MIN_THREADED_WEIGHTS = 1 << 22


def num_threads() -> int:
    """numba.get_num_threads(), without starting numba's thread pool only to read it.

    numba.get_num_threads() launches the threading layer first (its library, multiprocessing's
    import, a thread per CPU): 19-36 ms measured on a 2-core machine, a few % of a `quantfmt
    convert`, which runs no parallel=True kernel (parallel_rows uses Python threads). Until the
    layer is launched nobody can have called numba.set_num_threads (it launches it too), so the
    answer is then numba's documented default, config.NUMBA_NUM_THREADS."""
    import numba
    from numba.np.ufunc import parallel

    if getattr(parallel, "_is_initialized", True) is False:
        return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]  # (numba ships no stubs)
    return numba.get_num_threads()


def decode_threads(rows: int, cols: int) -> int:
    """Threads a decode kernel of a rows x cols matrix should claim work on (see MIN_THREADED_WEIGHTS)."""
    if rows * cols < MIN_THREADED_WEIGHTS:
        return 1  # without reading the thread count: a small model's token makes hundreds of these calls
    t = num_threads()
    return t if t > 1 and rows * cols * (t - 1) >= MIN_THREADED_WEIGHTS * t else 1


_in_rows = threading.local()  # .active: this thread is running a range of parallel_rows


def parallel_rows(kernel, rows: int, cols: int, *args, weights: int = 65536, tail: tuple = (),
                  chunks: int = 0) -> None:
    """Run `kernel(*args, r0, r1, *tail)` over the row ranges n_chunks(rows, cols, weights) gives (or
    `chunks` ranges), on numba.get_num_threads() threads (the calling one included), each taking the
    next range.

    The driver a `parallel=True` numba kernel would be, in Python: `kernel` must be compiled with
    nogil=True (else the threads take turns) and write only rows r0..r1-1 of its outputs. Why: a
    parallel=True driver costs a cold start more than its body (numba's parfor passes, then the whole
    body optimized again inside the gufunc and again in the driver: measured 1.7 s for Q4_0's
    one-line quantize driver, 7.5 s for Q4_K's, on a busy 2-core machine), while calling the cached
    row kernel from threads runs as fast (the same row kernel; measured equal on 4096x4096 Q4_0).
    The other threads are _RowsPool's helpers; the caller never waits for one that has not started.
    """
    nchunk = min(rows, chunks) if chunks > 0 else n_chunks(rows, cols, weights)
    # one range: no thread count to read (num_threads() costs ~5-10 us, numba's launch check and a
    # lock; a decoded SmolLM2 token makes ~400 such calls: its activations, its small matrices)
    nthreads = 1 if nchunk <= 1 else min(num_threads(), nchunk)  # honours numba.set_num_threads, as prange does
    if nthreads <= 1 or getattr(_in_rows, "active", False):
        # one range, or called from inside a range (a prefill tile's dequantize_kernel): this thread
        # does it all; handing work to the pool from one of its own threads could wait forever
        kernel(*args, 0, rows, *tail)
        return
    pool = _RowsPool.get()
    if not pool.busy.acquire(blocking=False):
        # another thread's call has the helpers: the cores are busy anyway, this thread does it all
        kernel(*args, 0, rows, *tail)
        return
    try:
        job = _Job(kernel, args, tail, rows, nchunk, nthreads - 1)
        pool.start(job)
        try:
            job.run()
        except BaseException:
            job.close()
            raise
        finally:
            try:
                job.finish()  # waits for the helpers inside a range: they write the outputs the caller reads
            finally:
                pool.clear(job)
    finally:
        pool.busy.release()
    if job.error is not None:
        raise job.error


class _Job:
    """One parallel_rows call: its ranges, handed out one by one, and the helpers inside it."""

    def __init__(self, kernel, args: tuple, tail: tuple, rows: int, nchunk: int, helpers: int) -> None:
        self.kernel, self.args, self.tail = kernel, args, tail
        self.rows, self.nchunk, self.helpers = rows, nchunk, helpers
        self.next = 0
        self.closed = False  # no range is handed out any more: all taken, or a thread failed (or Ctrl-C)
        self.active = 0  # helpers inside the job
        self.error: BaseException | None = None  # a helper's, re-raised by the caller
        self.lock = threading.Lock()
        self.left = threading.Condition(self.lock)  # notified when the last helper leaves

    def run(self) -> None:
        _in_rows.active = True
        try:
            while True:
                with self.lock:
                    if self.closed or self.next >= self.nchunk:
                        self.closed = True
                        return
                    c = self.next
                    self.next += 1
                self.kernel(*self.args, c * self.rows // self.nchunk, (c + 1) * self.rows // self.nchunk, *self.tail)
        finally:
            _in_rows.active = False

    def close(self) -> None:
        with self.lock:
            self.closed = True

    def join(self, index: int) -> bool:
        """A helper enters if it is one of the job's and ranges are left."""
        with self.lock:
            if self.closed or index >= self.helpers or self.next >= self.nchunk:
                return False
            self.active += 1
            return True

    def help(self) -> None:
        try:
            self.run()
        except BaseException as e:  # handed to the caller, which re-raises it
            with self.lock:
                self.closed = True
                self.error = self.error or e
        finally:
            with self.lock:
                self.active -= 1
                if self.active == 0:
                    self.left.notify_all()

    def finish(self) -> None:
        with self.lock:
            self.closed = True
            while self.active:
                self.left.wait()


class _RowsPool:
    """parallel_rows' helper threads (daemons, started when a call first needs them), waiting on a
    condition variable for the next call's job.

    Why not a ThreadPoolExecutor (before): the caller waited for every helper it had submitted to,
    started or not. A helper woken late (its queue, then the GIL: 0.14 ms to over 2 ms after the call
    began, on the shared 2-core Xeon) held up calls it took no range of; here a helper that comes after
    the last range finds the job closed, and the caller waits only for helpers inside a range. Measured
    against it, medians of 200 back-to-back decode calls, alternating processes: Q4_0 2048x2048 q8_0
    0.34 -> 0.22 ms, Q4_K 4096x4096 q8_k 0.62 -> 0.52 ms, Q4_0 4096x4096 f32 0.65 -> 0.48-0.57 ms.
    Helpers that busy-wait a while after each call (as OpenMP's and OpenBLAS's do) gained nothing more:
    a woken helper still waits for the GIL, which Python hands over by a condition variable too.
    """

    _current: _RowsPool | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.generation = 0  # bumped for each job
        self.stopping = False
        self.cond = threading.Condition()
        self.job: _Job | None = None
        self.threads: list[threading.Thread] = []
        self.busy = threading.Lock()  # one job at a time

    @classmethod
    def get(cls) -> _RowsPool:
        pool = cls._current
        if pool is None:
            with cls._lock:
                if cls._current is None:
                    import atexit

                    cls._current = _RowsPool()
                    atexit.register(cls._current.shutdown)
                pool = cls._current
        return pool

    def start(self, job: _Job) -> None:
        while len(self.threads) < job.helpers:
            t = threading.Thread(target=self._helper, args=(len(self.threads),),
                                 name=f"quantfmt-rows-{len(self.threads)}", daemon=True)
            t.start()
            self.threads.append(t)
        with self.cond:
            self.job = job
            self.generation += 1
            self.cond.notify_all()

    def clear(self, job: _Job) -> None:
        with self.cond:
            if self.job is job:
                self.job = None  # drop the call's arrays (a helper that comes late finds nothing)

    def _helper(self, index: int) -> None:
        seen = 0
        while True:
            with self.cond:
                while self.generation == seen and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                seen, job = self.generation, self.job
            if job is not None and job.join(index):
                job.help()
            del job

    def shutdown(self) -> None:
        """At exit: let the helpers finish their range (a kernel without the GIL must not outlive the
        arrays it writes) and stop."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(1.0)


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    _RowsPool._current = None
    _RowsPool._lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


# ---- prefill: float32 tiles of W, one single-threaded sgemm per thread -----------------------------
# The driver behind every format's mode-"f32" batches (plugins/_half.py's F16/BF16 prefill, generalized):
# each thread takes the next range of rows (parallel_rows), dequantizes it into its own float32 tile
# (on that thread, so the tile is still in its L2 when read) and multiplies it by a sgemm on that thread
# alone (quantfmt.blas.one_thread), writing out[:, r0:r1] in place (a strided BLAS output, ldc = rows).
# What it replaces: one dequantizing pass (a parallel kernel, or a single thread while a core idles),
# then one sgemm per chunk on OpenBLAS's threads, whose fixed per-thread shares make every call wait for
# a descheduled thread on a shared machine. Measured (scripts/prefill_ab.py, 11008x4096, loaded 2-core
# Xeon, ratio to float32 x @ W.T, fallback -> per-thread): n=128 Q4_0 2.09 -> 0.99x, Q8_0 2.02 -> 0.99x,
# Q4_K 13.1 -> 0.98x, Q8_A 1.95 -> 1.08x; n=512 Q4_0 1.57 -> 1.18x, Q6_K 1.66 -> 0.98x.

#: Tests set this False to take each format's fallback (tiles dequantized, then BLAS's own threads).
PER_THREAD_PREFILL = True
#: Weights per tile at the least: 1 M = 4 MiB of float32, about one core's L2.
PREFILL_TILE = 1 << 20


def prefill_threads() -> int:
    """Threads tiles_prefill() runs its sgemms on, or 0 where callers must keep their fallback: numpy's
    BLAS threads cannot be set here (quantfmt.blas.available()), or there is one thread only."""
    t = num_threads()
    return t if PER_THREAD_PREFILL and t > 1 and blas.available() else 0


def per_thread_sgemm() -> str:
    """What multiplies a tile on its own thread (kernel_path's "+X-per-thread"): "gemm512" where
    quantfmt.gemm's AVX-512 kernels run, else "blas" (numpy's BLAS, one thread)."""
    return "gemm512" if gemm.use() else "blas"


def prefill_path() -> str:
    """kernel_path of a batch that goes to dequantized tiles and sgemm: "tiles+gemm512-per-thread" or
    "tiles+blas-per-thread" where tiles_prefill runs, else "blas-tiles" (tiles dequantized, then BLAS's
    own threads)."""
    return f"tiles+{per_thread_sgemm()}-per-thread" if prefill_threads() else "blas-tiles"


def prefill_tile_rows(n: int, cols: int, group: int = 1) -> int:
    """Rows of W per tile for n activation rows: 2n rows' worth of weights within [1, 4] PREFILL_TILE, a
    multiple of `group`. Every single-threaded sgemm packs all of x again, so more activation rows want
    taller tiles (11008x4096, loaded 2-core Xeon, interleaved, ratio to float32 for tiles of
    128/256/512/1024 rows: Q4_K n=128 1.04/0.80/0.81/0.95, Q4_0 n=128 1.05/0.80/0.84/0.88; n=512, tiles
    of 512/1024/2048 rows: Q8_0 1.08/0.98/1.01, Q4_K 1.06/0.94/0.93; F16 alike, plugins/_half.py).
    quantfmt.gemm's kernels pack x once per call, not per tile, and add each K-block into their (tile rows, n)
    product, which should stay in L2: there PREFILL_TILE weights up to n = 256, fewer above (256 KiB of
    product; n=512, 11008x4096, 128-row tiles against 1024: Q8_0 1.07x against 1.29x float32)."""
    weights = gemm_tile_weights(n, PREFILL_TILE) if gemm.use() else min(max(PREFILL_TILE, 2 * n * cols),
                                                                        4 * PREFILL_TILE)
    return max(group, weights // max(cols, 1) // group * group)


def gemm_tile_weights(n: int, tile: int) -> int:
    """Weights per prefill tile for n activation rows where quantfmt.gemm multiplies the tiles."""
    return min(tile, tile * 256 // max(n, 1))


def tiles_prefill(fill, rows: int, cols: int, x: np.ndarray, *args, group: int = 1, width: int = 0,
                  tile_rows: int = 0) -> np.ndarray:
    """out (n, rows) = x (n, cols) float32 @ W.T, W given tile by tile by `fill(*args, r0, r1, buf)`.

    fill writes rows r0..r1-1 of W as float32 into buf (C-contiguous, 64-byte aligned), on the calling
    thread (a nogil kernel, or a dequantize_kernel that goes through parallel_rows, which runs inline):
      width == 0: buf is (r1 - r0, cols), W's rows (sgemm x @ buf.T);
      width > 0:  buf is (width, group * ceil((r1 - r0) / group)), W.T with its columns padded to `width`
                  and its rows to whole groups (tiled layouts, plugins/_qtiles.py); only [:cols, :r1-r0]
                  is read.
    r0 is a multiple of `group` (a column-block format's row group, a tile of T rows); r1 too, or rows.
    Call only where prefill_threads() is not 0."""
    n = x.shape[0]
    out = np.empty((n, rows), np.float32)
    step = tile_rows or prefill_tile_rows(n, cols, group)
    step = max(group, step // group * group)
    units = -(-rows // group)
    bufs: dict[int, np.ndarray] = {}  # per thread, for this call only (nothing held between calls)
    own = gemm.use()
    # (cols, n): W's rows times it, see tile_times_xt; quantfmt.gemm's kernels want it for W.T too
    xt = padded_xt(x) if own else np.ascontiguousarray(x.T) if width == 0 else x
    # the activations as the gemm kernels read them, made once for every tile
    xp = (gemm.panels(xt, n) if width > 0 else gemm.blocks(xt)) if own else None

    def work(u0: int, u1: int) -> None:
        r0, r1 = u0 * group, min(rows, u1 * group)
        shape = ((u1 - u0) * group, cols) if width == 0 else (width, (u1 - u0) * group)
        size = shape[0] * shape[1]
        flat = bufs.get(threading.get_ident())
        if flat is None or flat.size < size:
            raw = np.empty(size + 16, np.float32)  # started on a 64-byte boundary: aligned vector stores
            a = (-raw.ctypes.data // 4) % 16
            flat = bufs[threading.get_ident()] = raw[a : a + size]
        buf = flat[:size].reshape(shape)
        fill(*args, r0, r1, buf)
        if width == 0:
            tile_times_xt(buf[: r1 - r0], xt, out, r0, xp)
        elif own:
            gemm.times_cols(xt, buf[:cols], out[:, r0:r1], xp)
        else:
            np.matmul(x, buf[:cols, : r1 - r0], out=out[:, r0:r1])

    with blas.one_thread():
        parallel_rows(work, units, cols * group, chunks=balanced_chunks(units, cols * group, step * cols))
    return out


def padded_xt(x: np.ndarray) -> np.ndarray:
    """x.T (cols, n16), C-contiguous, its columns past n zero: quantfmt.gemm's operand (n16 = n rounded up
    to 16, whole vectors)."""
    n, cols = x.shape
    xt = np.empty((cols, -(-n // 16) * 16), np.float32)
    xt[:, :n] = x.T
    xt[:, n:] = 0
    return xt


def tile_times_xt(w: np.ndarray, xt: np.ndarray, out: np.ndarray, r0: int, xb: np.ndarray | None = None) -> None:
    """out[:, r0:r0 + len(w)] = (w @ xt).T for W's rows w (r, cols) and xt = x.T C-contiguous (cols, n),
    on this thread: quantfmt.gemm's kernels where they run (xt from padded_xt), else BLAS. Why not
    x @ w.T into out directly: OpenBLAS's one-thread sgemm packs a transposed B slower; for a 256-row
    tile, n = 128 and 4096 columns, x @ w.T took 2.21 ms, w @ xt 1.74 (and x @ w.T with w.T stored, NN,
    1.88). The (r, n) product is small (128 KB here) and still in L2 when it is copied, transposed, into
    out."""
    if gemm.use():
        ct = np.empty((w.shape[0], xt.shape[1]), np.float32)
        gemm.rows_times(w, xt, ct, xb)
        out[:, r0 : r0 + w.shape[0]] = ct[:, : out.shape[0]].T
    else:
        out[:, r0 : r0 + w.shape[0]] = np.matmul(w, xt).T


def balanced_chunks(units: int, unit_weights: int, weights: int) -> int:
    """How many ranges of about `weights` weights a prefill splits into: n_chunks' count rounded up to a
    multiple of the thread count, so that threads running alike finish together (11 ranges of 1024 rows
    on two threads kept one thread busy 6/5.5 = 9% longer than the even split)."""
    n = n_chunks(units, unit_weights, weights)
    t = num_threads()
    return min(units, -(-n // t) * t) if n > 1 else n


def rows_prefill(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """out (n, rows) = x (n, cols) float32 @ w.T for w float32 (rows, cols) already in memory (F32): the
    split of tiles_prefill (ranges of rows taken by threads one after another, one single-threaded
    sgemm each, written in place) on w's own rows, nothing converted. Call only where prefill_threads()
    is not 0."""
    rows, cols = w.shape
    out = np.empty((x.shape[0], rows), np.float32)
    step = prefill_tile_rows(x.shape[0], cols)
    xt = padded_xt(x) if gemm.use() else np.ascontiguousarray(x.T)
    xb = gemm.blocks(xt) if gemm.use() else None

    def work(r0: int, r1: int) -> None:
        tile_times_xt(w[r0:r1], xt, out, r0, xb)

    with blas.one_thread():
        parallel_rows(work, rows, cols, chunks=balanced_chunks(rows, cols, step * cols))
    return out


class BlockFormat(Format):
    """Blocks of `block_shape = (1, K)` along a row, from two numpy functions on (n, K) blocks."""

    #: Rows per numpy call in quantize: bounds the temporaries of quantize_blocks.
    rows_per_call: int = 1024

    def quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _blocks_out(self, out, n: int, what: str) -> np.ndarray:
        k = self.block_shape[1]
        want = (n, self.block_bytes) if what == "quantize_blocks" else (n, k)
        dtype = np.uint8 if what == "quantize_blocks" else np.float32
        out = np.asarray(out)
        if out.shape != want or out.dtype != dtype:
            raise TypeError(f"{self.tag}.{what} returned {out.dtype}{out.shape}, expected {np.dtype(dtype)}{want}")
        return out

    def _quantize(self, w):
        rows, cols = w.shape
        k = self.block_shape[1]
        out = np.empty((rows, cols // k, self.block_bytes), np.uint8)
        step = max(1, self.rows_per_call)
        for r0 in range(0, rows, step):
            blocks = w[r0 : r0 + step].reshape(-1, k)
            q = self._blocks_out(self.quantize_blocks(blocks), blocks.shape[0], "quantize_blocks")
            out[r0 : r0 + step] = q.reshape(-1, cols // k, self.block_bytes)
        return out.reshape(-1)

    def _dequantize(self, data, rows, cols):
        blocks = data.reshape(-1, self.block_bytes)
        return self._blocks_out(self.dequantize_blocks(blocks), blocks.shape[0], "dequantize_blocks").reshape(
            rows, cols
        )

    def _get_rows(self, data, rows, cols, idx):
        blocks = data.reshape(rows, -1)[idx].reshape(-1, self.block_bytes)
        return self._blocks_out(self.dequantize_blocks(blocks), blocks.shape[0], "dequantize_blocks").reshape(
            idx.size, cols
        )

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.block_shape[0] != 1:
            raise TypeError(f"{cls.__name__}: a BlockFormat's blocks lie along a row: block_shape must be (1, K)")


class GGMLFormat(Format):
    """ggml-style block formats: quantize/dequantize/get_rows/range errors from two row kernels."""

    #: ggml's activation type for this format's integer dot product ("Q8_0", "Q8_1", "Q8_K").
    vec_dot_type: str | None = None
    #: Why a block can fail (the end of the RangeError message).
    range_rule: str = ""
    #: Weights at least this large are refused up front: the reference quantizer's float32 sums
    #: overflow on them and it would write a zero scale silently (ggml does the same). Far above
    #: where the fp16 scale already overflows, so it refuses nothing that fit before.
    overflow_abs: float | None = None

    @staticmethod
    def quantize_kernel(w, out, bad):  # pragma: no cover - supplied by the format
        raise NotImplementedError

    @staticmethod
    def dequantize_kernel(blocks, lut, idx, out):  # pragma: no cover - supplied by the format
        raise NotImplementedError

    @property
    def qk(self) -> int:
        return self.block_shape[1]

    def _quantize(self, w):
        rows, cols = w.shape
        if self.overflow_abs is not None:
            big = np.flatnonzero(np.abs(w).max(axis=1) >= self.overflow_abs)
            if big.size:
                r = int(big[0])
                raise self.range_error(w, r, int(np.argmax(np.abs(w[r]) >= self.overflow_abs)) // self.qk)
        out = np.empty((rows, cols // self.qk, self.block_bytes), np.uint8)
        bad = np.empty(rows, np.int64)
        self.quantize_kernel(w, out, bad)
        nonfinite_rows(bad)  # (a kernel of a checks_finite format flags NaN/inf rows; first, as the old scan was)
        hit = np.flatnonzero(bad >= 0)
        if hit.size:
            r = int(hit[0])
            raise self.range_error(w, r, int(bad[r]))
        return out.reshape(-1)

    def _dequantize(self, data, rows, cols):
        return self._get_rows(data, rows, cols, np.arange(rows, dtype=np.int64))

    def _get_rows(self, data, rows, cols, idx):
        out = np.empty((idx.size, cols), np.float32)
        self.dequantize_kernel(data.reshape(rows, cols // self.qk, self.block_bytes), fp16_table(), idx, out)
        return out

    def _blas_tiles(self, data, rows, cols, x):
        # Batches: each thread dequantizes its own rows with the format's dequantize_kernel (its
        # parallel_rows runs inline on a prefill thread) and multiplies them by its own sgemm.
        if not prefill_threads():
            return super()._blas_tiles(data, rows, cols, x)
        blocks = data.reshape(rows, cols // self.qk, self.block_bytes)
        lut, idx = fp16_table(), np.arange(rows, dtype=np.int64)

        def fill(r0: int, r1: int, buf: np.ndarray) -> None:
            self.dequantize_kernel(blocks, lut, idx[r0:r1], buf)

        return tiles_prefill(fill, rows, cols, x)

    def range_error(self, w: np.ndarray, r: int, b: int) -> RangeError:
        """The RangeError for the block at row r, block b of weights w."""
        qk = self.qk
        xb = w[r, b * qk : (b + 1) * qk]
        return RangeError(
            f"{self.tag}: weights of shape {w.shape}: the block at row {r}, columns {b * qk}..{b * qk + qk - 1} "
            f"(min {float(xb.min()):g}, max {float(xb.max()):g}) needs an fp16 value of 65520 or more, "
            f"which would be stored as infinity: {self.range_rule}"
        )

    def info(self) -> dict:
        return {**super().info(), "vec_dot_type": self.vec_dot_type}


class KernelFormat(Format):
    """Formats whose numba kernels take the whole tensor, with a matvec for small batches."""

    #: Batches of more activation rows than this go to dequantized tiles + BLAS.
    matvec_max_n: int = 4
    #: Weights per dequantized tile on the BLAS path.
    prefill_tile_elements = 1 << 24

    @staticmethod
    def quantize_kernel(w, out):  # pragma: no cover - supplied by the format
        raise NotImplementedError

    @staticmethod
    def dequantize_kernel(data, rows, cols, out):  # pragma: no cover - supplied by the format
        raise NotImplementedError

    @staticmethod
    def get_rows_kernel(data, cols, idx, out):  # pragma: no cover - supplied by the format
        raise NotImplementedError

    def check_quantized(self, w: np.ndarray, out: np.ndarray) -> None:
        """Raise RangeError if the quantized bytes `out` of `w` hold a value that overflowed."""

    def matvec(self, prep, rows: int, cols: int, x: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    def prepare(self, data, rows, cols):
        """(bytes, anything the matvec kernel wants precomputed)."""
        return data, None

    def _quantize(self, w):
        out = np.empty(self.nbytes(w.shape), np.uint8)
        if self.checks_finite:
            bad = np.full(w.shape[0], -1, np.int64)
            self.quantize_kernel(w, out, bad)
            nonfinite_rows(bad)
        else:
            self.quantize_kernel(w, out)
        self.check_quantized(w, out)
        return out

    def _dequantize(self, data, rows, cols):
        out = np.empty((rows, cols), np.float32)
        self.dequantize_kernel(data, rows, cols, out)
        return out

    def _get_rows(self, data, rows, cols, idx):
        out = np.empty((idx.size, cols), np.float32)
        self.get_rows_kernel(data, cols, idx, out)
        return out

    def kernel_path(self, op: str, n: int = 1, mode: str = "f32") -> str:
        if op == "qmatmul":
            return prefill_path() if n > self.matvec_max_n else "matvec"
        return "numba"

    def _blas_tiles(self, data, rows, cols, x):
        # Batches: each thread fills its own tiles of whole row groups (get_rows_kernel must be nogil)
        # and multiplies them by its own sgemm.
        if not prefill_threads():
            return super()._blas_tiles(data, rows, cols, x)
        idx = np.arange(rows, dtype=np.int64)
        kernel = self.get_rows_kernel

        def fill(r0: int, r1: int, buf: np.ndarray) -> None:
            kernel(data, cols, idx[r0:r1], buf)

        return tiles_prefill(fill, rows, cols, x, group=self.block_shape[0])

    def _qmatmul(self, prep, rows, cols, x, mode):
        if x.shape[0] > self.matvec_max_n:
            return self._blas_tiles(prep[0], rows, cols, x)
        out = np.empty((x.shape[0], rows), np.float32)
        self.matvec(prep, rows, cols, x, out)
        return out
