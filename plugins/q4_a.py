"""Q4_A: quantfmt's own 4-bit codebook format, 256 weights along a row, 16 sorted-bin means.

From the llama2.c quantization brainstorm (karpathy/llama2.c issue 277). A block is 256
consecutive weights of one row (block_shape (1, 256)). Its values are sorted and cut into
16 bins of 16; the 16 bin means, ascending, are the block's codebook, and every weight
stores the 4-bit index of its nearest codebook entry.

Byte layout (little-endian), per block (blocks in row-major order, a row = cols/256 blocks):
    float32 c[16]      offset 0: the codebook, ascending
    uint8   p[128]     offset 64: p[i] = idx[i] | (idx[i + 128] << 4)
i.e. the low nibble of byte i is weight i, the high nibble weight i + 128 (contiguous halves,
so a SIMD kernel unpacks 128 bytes into weights 0..127 and 128..255 without shuffles).
192 bytes per block of 256 = 6 bits per weight. A row group is one row.

Arithmetic (formats.md is normative; this is the same text):
    v      = the block's 256 values sorted ascending (as float32 numbers; -0.0 == 0.0)
    c[k]   = float32(S_k / 16.0), S_k = sequential float64 sum of float64(v[16k]), ...,
             float64(v[16k + 15]) starting from +0.0
    idx[i] = the k minimizing d_k = |float64(w_i) - float64(c[k])| (float64 subtraction),
             the LOWEST such k on ties
    dequantize: w'_i = c[idx[i]]
The codebook depends only on the multiset of values, so the sort's stability does not matter.
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.format import TILE_ELEMENTS, Format

QK = 256
NBINS = 16
BLOCK_BYTES = 4 * NBINS + QK // 2


# ---- numpy reference ------------------------------------------------------------------


def pack(c: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Bytes from codebooks float32 (nblocks, 16) and indices uint8 (nblocks, 256) in 0..15."""
    out = np.empty((c.shape[0], BLOCK_BYTES), np.uint8)
    out[:, : 4 * NBINS] = c.astype("<f4").view(np.uint8).reshape(-1, 4 * NBINS)
    out[:, 4 * NBINS :] = idx[:, : QK // 2] | (idx[:, QK // 2 :] << 4)
    return out.reshape(-1)


def unpack(data: np.ndarray):
    """codebooks float32 (nblocks, 16) (a view) and indices uint8 (nblocks, 256)."""
    b = data.reshape(-1, BLOCK_BYTES)
    p = b[:, 4 * NBINS :]
    return b[:, : 4 * NBINS].view("<f4"), np.concatenate([p & 15, p >> 4], axis=1)


def quantize_ref(w: np.ndarray) -> np.ndarray:
    """float32 (rows, cols), cols % 256 == 0 -> Q4_A bytes."""
    wb = w.reshape(-1, QK)
    v = np.sort(wb, axis=1).astype(np.float64).reshape(-1, NBINS, QK // NBINS)
    acc = np.zeros(v.shape[:2])
    for j in range(QK // NBINS):  # the sequential sum of each bin, in sorted order
        acc = acc + v[:, :, j]
    c = (acc / 16.0).astype(np.float32)
    idx = np.empty(wb.shape, np.uint8)
    for b0 in range(0, wb.shape[0], 1024):  # in chunks: the distance table is 256x16 float64 per block
        wc, cc = wb[b0 : b0 + 1024].astype(np.float64), c[b0 : b0 + 1024].astype(np.float64)
        d = np.abs(wc[:, :, None] - cc[:, None, :])
        idx[b0 : b0 + 1024] = np.argmin(d, axis=2)  # argmin returns the first (lowest) on ties
    return pack(c, idx)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    c, idx = unpack(data)
    return np.take_along_axis(c, idx.astype(np.intp), axis=1).reshape(rows, cols)


# ---- numba kernels --------------------------------------------------------------------
# Quantize: no fastmath (the means and distances must match the reference exactly).


@numba.njit(cache=True, parallel=True)
def _quantize_kernel(w, out):
    rows, cols = w.shape
    nb = cols // QK
    for row in numba.prange(rows):
        for b in range(nb):
            o = (row * nb + b) * BLOCK_BYTES
            c = out[o : o + 4 * NBINS].view(np.float32)
            p = out[o + 4 * NBINS : o + BLOCK_BYTES]
            wb = w[row, b * QK : (b + 1) * QK]
            v = np.sort(wb)
            for k in range(NBINS):
                acc = 0.0
                for j in range(QK // NBINS):
                    acc += np.float64(v[k * (QK // NBINS) + j])
                c[k] = np.float32(acc / 16.0)
            for i in range(QK // 2):
                lo = _nearest(np.float64(wb[i]), c)
                hi = _nearest(np.float64(wb[i + QK // 2]), c)
                p[i] = np.uint8(lo | (hi << 4))


@numba.njit(cache=True, inline="always")
def _nearest(x, c):
    best = 0
    bd = abs(x - np.float64(c[0]))
    for k in range(1, NBINS):
        d = abs(x - np.float64(c[k]))
        if d < bd:  # strict: the lowest index wins ties
            bd = d
            best = k
    return best


@numba.njit(cache=True)
def _dequantize_row(data, nb, row, out):
    for b in range(nb):
        o = (row * nb + b) * BLOCK_BYTES
        c = data[o : o + 4 * NBINS].view(np.float32)
        p = data[o + 4 * NBINS : o + BLOCK_BYTES]
        for i in range(QK // 2):
            out[b * QK + i] = c[p[i] & 15]
            out[b * QK + QK // 2 + i] = c[p[i] >> 4]


@numba.njit(cache=True, parallel=True)
def _dequantize_kernel(data, rows, cols, out):
    for row in numba.prange(rows):
        _dequantize_row(data, cols // QK, row, out[row])


@numba.njit(cache=True)
def _get_rows_kernel(data, cols, idx, out):
    for k in range(idx.size):
        _dequantize_row(data, cols // QK, idx[k], out[k])


@numba.njit(cache=True, parallel=True, fastmath=True)
def _matvec_kernel(data, rows, cols, x, out):
    n = x.shape[0]
    nb = cols // QK
    for row in numba.prange(rows):
        for k in range(n):
            acc = np.float32(0.0)
            for b in range(nb):
                o = (row * nb + b) * BLOCK_BYTES
                c = data[o : o + 4 * NBINS].view(np.float32)
                p = data[o + 4 * NBINS : o + BLOCK_BYTES]
                xb = x[k, b * QK : (b + 1) * QK]
                for i in range(QK // 2):
                    acc += c[p[i] & 15] * xb[i] + c[p[i] >> 4] * xb[i + QK // 2]
            out[k, row] = acc


# ---- the format -----------------------------------------------------------------------

MATVEC_MAX_N = 4  # larger batches: BLAS on dequantized tiles


class Q4A(Format):
    tag = "Q4_A"
    version = 1
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    summary = "4-bit indices into 16 sorted-bin means per 256 weights along a row (llama2.c brainstorm)"

    def _quantize(self, w):
        rows, cols = w.shape
        out = np.empty(rows * cols // QK * BLOCK_BYTES, np.uint8)
        _quantize_kernel(w, out)
        return out

    def _dequantize(self, data, rows, cols):
        out = np.empty((rows, cols), np.float32)
        _dequantize_kernel(data, rows, cols, out)
        return out

    def _get_rows(self, data, rows, cols, idx):
        out = np.empty((idx.size, cols), np.float32)
        _get_rows_kernel(data, cols, idx, out)
        return out

    def _qmatmul(self, data, rows, cols, x, mode):
        if x.shape[0] > MATVEC_MAX_N and rows * cols > TILE_ELEMENTS:
            return super()._qmatmul(data, rows, cols, x, mode)
        out = np.empty((x.shape[0], rows), np.float32)
        _matvec_kernel(data, rows, cols, x, out)
        return out


@quantfmt.hookimpl
def register_formats(register):
    register(Q4A())
