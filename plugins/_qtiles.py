"""Row tiles: the repacked weight layout behind the fast qmatmul of Q4_0, Q4_1 and Q8_0.

Owns: the tile geometry, the `Prepared` object those formats' `prepare()` returns, the
padding of activations to whole block groups, and the BLAS driver that serves batches.
The kernels themselves live in the format files, next to the layout comment of each.

Why tiles. ggml's bytes put the 32 weights of one block of one row together. A numba
kernel walking them computes one row at a time: every block ends in a horizontal sum
and a scalar scale, so it runs 2-3x slower than float32 BLAS although it reads 4-7x
fewer bytes (see /work/shared/notes/numba-kernels.md). prepare() therefore repacks a
matrix once into tiles of T = 32 rows, interleaved so that the fastest-varying index is
the row within the tile:

    q[tile, block, k, t]   the k-th quant unit of `block` of row tile*T + t
    d[tile, block, t]      its scale, float32 (and m, Q4_1's minimum, the same way)

Then the inner loop of a kernel is "for t in range(T)": T independent sums (one per
row), each activation value loaded once and broadcast over T rows, no horizontal sums,
contiguous vector loads. LLVM vectorizes it across t (checked with inspect_asm). Rows
are padded to a multiple of T and blocks to a multiple of G = 4 with zero scales, so
the kernels have no tail code; padded outputs are dropped.

Batches (n >= BLAS_MIN_ROWS activation rows, e.g. a prompt) go to BLAS instead:
CHUNK_BYTES of tiles at a time are dequantized into a float32 buffer laid out as W.T
(cols x rows: contiguous runs of T per weight column, which is how tiles decode) and
multiplied by sgemm. Dequantizing a weight costs a few operations; sgemm then spends
n multiply-adds on it, so for large n the cost is that of float32 BLAS.
"""

from __future__ import annotations

import numba
import numpy as np

from quantfmt.families import parallel_rows, prefill_threads, tiles_prefill

QK = 32  # weights per ggml block
T = 32  # rows per tile
G = 4  # blocks are padded to a multiple of G: kernels finish G blocks per scale pass
# From this many activation rows on, dequantized tiles + sgemm beat the per-row kernels.
BLAS_MIN_ROWS = 8
# Float32 bytes dequantized per sgemm call (a transient buffer): 64 MiB = 4096 rows of
# 4096 columns. On a quiet machine chunks of 256..2048 rows all ran sgemm ~7% faster than
# one call on the whole float matrix; on a busy one every call's thread barrier waits for
# a descheduled thread, and 4 MiB chunks measured 11-20x slower than one sgemm, 64 MiB 1.9x.
CHUNK_BYTES = 64 << 20

# fastmath for qmatmul kernels, minus `reassoc`: with it LLVM re-chains the partial sums
# we split on purpose (4 independent FMA chains hide the FMA latency).
FASTMATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


class Prepared:
    """The tiled form of one matrix: what Q4_0/Q4_1/Q8_0 `prepare()` return.

    q: quants (tiles, nbp, k, T); d: scales (tiles, nbp, T) float32; m: Q4_1's minimums
    like d, or an empty array. nbp = blocks per row padded to a multiple of G. raw: the
    ggml bytes themselves (a reference, not a copy), which the int8 prefill kernels read
    (plugins/_i8gemm.py), or None.
    """

    __slots__ = ("rows", "cols", "_q", "_make_q", "d", "m", "raw", "lut", "dec", "i8")

    def __init__(self, rows: int, cols: int, q, d: np.ndarray, m: np.ndarray,
                 raw: np.ndarray | None = None):
        # q: the tiles, or a callable making them on first use (Q4_0: a matrix only multiplied with
        # quantized activations never needs them, see q4_0.nibble_qmatmul)
        self._q, self._make_q = (None, q) if callable(q) else (q, None)
        self.rows, self.cols, self.d, self.m, self.raw = rows, cols, d, m, raw
        self.lut = None  # Q4_0's decode form for plugins/_i4dot.py, made on first use
        self.dec = None  # Q8_0's decode tiles for plugins/_i8dot.py, made on first use
        self.i8 = None  # Q5_0's and Q5_1's int8 prefill operands (plugins/_i8tiles.py), made on first use

    @property
    def q(self) -> np.ndarray:
        if self._q is None:
            self._q = self._make_q()
        return self._q

    @property
    def tiles(self) -> int:
        return self.d.shape[0]

    @property
    def nbp(self) -> int:
        return self.d.shape[1]

    @property
    def nbytes(self) -> int:
        made = [a for a in (self._q, self.d, self.m, self.dec) if a is not None]
        if self.lut is not None:
            made += [self.lut.d] + ([self.lut._qn] if self.lut._qn is not None else [])
        # each array once: the decode form's d is this d (q4_0.lut_prepared)
        return sum({id(a): a.nbytes for a in made}.values())

    def __repr__(self) -> str:
        return f"<Prepared {self.rows}x{self.cols} in {self.tiles} tiles of {T} rows, {self.nbytes} bytes>"


def padded_blocks(cols: int) -> int:
    nb = cols // QK
    return -(-nb // G) * G


def to_tiles(a: np.ndarray, rows: int) -> np.ndarray:
    """(rows, nb, *unit) -> (tiles, nbp, *unit, T), zero-padded rows and blocks, C-contiguous."""
    nb = a.shape[1]
    nbp = -(-nb // G) * G
    tiles = -(-rows // T)
    z = np.zeros((tiles * T, nbp) + a.shape[2:], a.dtype)
    z[:rows, :nb] = a
    z = z.reshape((tiles, T, nbp) + a.shape[2:])
    return np.ascontiguousarray(np.moveaxis(z, 1, -1))


def tile_units(blocks: np.ndarray, rows: int, start: int, unit_bytes: int) -> np.ndarray:
    """Quant bytes blocks[:, :, start:] (rows, nb, block bytes), read as units of unit_bytes,
    -> uint8 (tiles, nbp, units, T, unit_bytes): to_tiles of the units, by a parallel kernel
    (numpy's transpose of int8 data with 32-byte runs takes ~1 s for a 4096 x 11008 matrix)."""
    nb = blocks.shape[1]
    units = (blocks.shape[2] - start) // unit_bytes
    nbp = -(-nb // G) * G
    out = np.zeros((-(-rows // T), nbp, units, T, unit_bytes), np.uint8)
    # Python threads over ranges of tiles (families.parallel_rows): a parallel=True driver compiled
    # ~2x slower cold (every tiled format's first qmatmul paid it), for the same speed.
    parallel_rows(_tile_units, out.shape[0], nb * units * T * unit_bytes, blocks, start, out, weights=1 << 20)
    return out


@numba.njit(cache=True, nogil=True)
def _tile_units(blocks, start, out, tl0, tl1):
    rows, nb = blocks.shape[0], blocks.shape[1]
    _, _, units, tt, ub = out.shape
    for tl in range(tl0, tl1):
        for t in range(min(tt, rows - tl * tt)):
            r = tl * tt + t
            for b in range(nb):
                for k in range(units):
                    for c in range(ub):
                        out[tl, b, k, t, c] = blocks[r, b, start + k * ub + c]


def pad_cols(x: np.ndarray, nbp: int) -> np.ndarray:
    """(n, cols) -> (n, nbp*32) zero-padded, C-contiguous, same dtype."""
    n, cols = x.shape
    if cols == nbp * QK:
        return np.ascontiguousarray(x)
    out = np.zeros((n, nbp * QK), x.dtype)
    out[:, :cols] = x
    return out


def pad_blocks(a: np.ndarray, nbp: int) -> np.ndarray:
    """(n, nb, ...) -> (n, nbp, ...) zero-padded, C-contiguous."""
    if a.shape[1] == nbp:
        return np.ascontiguousarray(a)
    out = np.zeros((a.shape[0], nbp) + a.shape[2:], a.dtype)
    out[:, : a.shape[1]] = a
    return out


def blas_matmul(dequant_tiles, prep: Prepared, x: np.ndarray) -> np.ndarray:
    """x (n, cols) float32 @ W.T via dequantized chunks of tiles and sgemm -> (n, rows).

    `dequant_tiles(prep, t0, t1, wt, serial)` writes tiles [t0, t1) as W.T into wt
    (nbp*32, (t1-t0)*T); the padded columns of x are dropped instead (rows of wt past cols).
    Where quantfmt.families.prefill_threads() allows, each thread dequantizes its own tiles
    (serial=True) and multiplies them by its own sgemm (families.tiles_prefill); else chunks
    dequantized in parallel, each multiplied on BLAS's threads.

    Why W.T (x @ wt, sgemm NN) and not W's rows (x @ w.T, NT), though the rows fill faster from the
    ggml bytes (~0.29 vs ~0.36-0.44 ms per 1M weights on one thread): OpenBLAS's one-thread sgemm took
    1.74 ms on a 256-row tile NN against 1.96 ms NT (n=128, 4096 columns). Q8_0 and Q4_1 with rows
    from their dequantize kernels ran n=128 on 11008x4096 at 1.03-1.04x float32, on these tiles at
    0.87-0.90x (interleaved, 0.3 s pauses, quiet 2-core Xeon).
    """
    n, cols = x.shape
    if prefill_threads():
        prep.q  # noqa: B018  (tiles made on first use: here, once, not by every prefill thread)

        def fill(r0: int, r1: int, wt: np.ndarray) -> None:
            dequant_tiles(prep, r0 // T, -(-r1 // T), wt, True)

        return tiles_prefill(fill, prep.rows, cols, x, group=T, width=prep.nbp * QK)
    tiles = prep.tiles
    out = np.empty((n, tiles * T), np.float32)
    chunk = max(1, min(tiles, CHUNK_BYTES // (prep.nbp * QK * T * 4)))
    buf = np.empty((prep.nbp * QK, chunk * T), np.float32)
    for t0 in range(0, tiles, chunk):
        t1 = min(tiles, t0 + chunk)
        # the last, shorter chunk: the front of the same buffer, still C-contiguous
        wt = buf.reshape(-1)[: buf.shape[0] * (t1 - t0) * T].reshape(buf.shape[0], (t1 - t0) * T)
        dequant_tiles(prep, t0, t1, wt)
        np.matmul(x, wt[:cols], out=out[:, t0 * T : t1 * T])
    return out[:, : prep.rows]
