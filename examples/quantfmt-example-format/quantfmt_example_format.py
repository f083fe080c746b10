"""Q3_X: a 3-bit symmetric block format, shipped as a third-party quantfmt plugin.

This file is the whole plugin: the byte layout, a numpy reference, numba kernels, the
Format subclass and the `register_formats` hook. The distribution that holds it declares
it in the entry-point group "quantfmt"; quantfmt finds it there without any change to
quantfmt itself. (The same file also works dropped into a `--plugins-dir` folder.)

Layout: blocks of 1x32 weights (32 consecutive weights of one row), 14 bytes each,
3.5 bits per weight; a row is its blocks in order, a tensor its rows in order.

    offset  size  field
    0       2     d: the scale, IEEE fp16, little-endian
    2       8     lo: the low 2 bits of the 32 codes; byte j (0..7) holds codes j, j+8,
                  j+16, j+24 in bits 0-1, 2-3, 4-5, 6-7
    10      4     hi: bit 2 of the codes; bit k of byte j (0..3) is code 4k + j's

A code c in 0..7 stands for the weight d * (c - 4), i.e. the levels -4d .. 3d.

Quantize, per block: m = the weight of largest magnitude (the first one on a tie), with
its sign; d = fp16(m / -4), so m itself lands exactly on the level -4d (an extreme
value is where rounding costs most; the lone positive level 3d goes to the other side).
With id = 1/d (0 if d is 0, float32), c = clamp(floor(w * id + 4.5), 0, 7), computed
in float32 without fused multiply-add, i.e. round half up of w/d + 4, clamped (the low
clamp matters only when fp16 rounding shrank a subnormal scale).
A block whose d would overflow fp16 (|m| >= 262016) is a RangeError. All-zero blocks
store d = 0 and codes 4, and dequantize to exact zeros.

Kernels: quantize and dequantize are numba loops over 3-D views (rows, blocks, bytes),
bit-exact with the numpy reference (no fastmath there: FMA contraction would change the
rounding). qmatmul decodes a weight row once and dots it with every activation row; it
may use fastmath, as its result is compared with a tolerance. (Single-threaded on
purpose: an example should compile fast; a production kernel would add prange.) The fp16
scales are widened to float32 in numpy, since numba cannot take float16.
"""

from __future__ import annotations

import numba
import numpy as np
import quantfmt
from quantfmt.errors import RangeError
from quantfmt.format import Format

QK = 32  # weights per block
BLOCK_BYTES = 14
F16_LE = np.dtype("<f2")

# ---- numpy reference -------------------------------------------------------------------


def _signed_max(b: np.ndarray) -> np.ndarray:
    """Per block (last axis), the value of largest magnitude, first on a tie."""
    i = np.argmax(np.abs(b), axis=-1)
    return np.take_along_axis(b, i[..., None], axis=-1)[..., 0]


def _scales_f16(w: np.ndarray) -> np.ndarray:
    """fp16 scales (rows, blocks) of float32 weights (rows, cols); RangeError on overflow."""
    rows, cols = w.shape
    d = _signed_max(w.reshape(rows, cols // QK, QK)) / np.float32(-4)
    with np.errstate(over="ignore"):
        d16 = d.astype(F16_LE)
    if not np.isfinite(d16).all():
        r, b = np.argwhere(~np.isfinite(d16))[0]
        raise RangeError(
            f"Q3_X: block {b} of row {r} (columns {b * QK}..{b * QK + QK - 1}, matrix shape {w.shape}) "
            f"has a weight of magnitude {abs(float(d[r, b])) * 4:.6g}; "
            "Q3_X's fp16 scale limits weights to < 262016"
        )
    return d16


def _inverse(d: np.ndarray) -> np.ndarray:
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)


def quantize_ref(w: np.ndarray) -> np.ndarray:
    """Reference quantizer: float32 (rows, cols), cols % 32 == 0 -> uint8 bytes."""
    rows, cols = w.shape
    nb = cols // QK
    d16 = _scales_f16(w)
    d = d16.astype(np.float32)
    t = w.reshape(rows, nb, QK) * _inverse(d)[..., None] + np.float32(4.5)
    c = np.clip(np.floor(t), 0, 7).astype(np.uint8)
    out = np.empty((rows, nb, BLOCK_BYTES), np.uint8)
    out[..., 0:2] = d16.view(np.uint8).reshape(rows, nb, 2)
    lo = c & 3
    out[..., 2:10] = lo[..., 0:8] | lo[..., 8:16] << 2 | lo[..., 16:24] << 4 | lo[..., 24:32] << 6
    hi = (c >> 2).reshape(rows, nb, 8, 4)  # hi[..., k, j] = bit 2 of code 4k + j
    out[..., 10:14] = sum(hi[..., k, :] << k for k in range(8)).astype(np.uint8)
    return out.reshape(-1)


def _codes_ref(data: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    blk = data.reshape(rows, cols // QK, BLOCK_BYTES)
    d = blk[..., 0:2].copy().view(F16_LE)[..., 0].astype(np.float32)
    lo = np.concatenate([(blk[..., 2:10] >> (2 * a)) & 3 for a in range(4)], axis=-1)
    hi = np.concatenate([(blk[..., 10:14] >> k) & 1 for k in range(8)], axis=-1)
    return d, lo | hi << 2


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Reference dequantizer: bytes -> float32 (rows, cols)."""
    d, c = _codes_ref(data, rows, cols)
    return (d[..., None] * (c.astype(np.float32) - np.float32(4))).reshape(rows, cols)


# ---- numba kernels ---------------------------------------------------------------------


@numba.njit(cache=True)
def _signed_max_kernel(w3, out):
    for r in range(w3.shape[0]):
        for b in range(w3.shape[1]):
            m = w3[r, b, 0]
            for i in range(1, QK):
                if abs(w3[r, b, i]) > abs(m):
                    m = w3[r, b, i]
            out[r, b] = m / np.float32(-4.0)


@numba.njit(cache=True)
def _pack_kernel(w3, d, out):
    half = np.float32(4.5)
    for r in range(w3.shape[0]):
        for b in range(w3.shape[1]):
            inv = np.float32(0.0)
            if d[r, b] != 0:
                inv = np.float32(1.0) / d[r, b]
            c = np.empty(QK, np.uint8)
            for i in range(QK):
                t = np.floor(w3[r, b, i] * inv + half)
                c[i] = 7 if t > 7 else (0 if t < 0 else np.uint8(t))
            for j in range(8):
                out[r, b, 2 + j] = (
                    (c[j] & 3) | (c[j + 8] & 3) << 2 | (c[j + 16] & 3) << 4 | (c[j + 24] & 3) << 6
                )
            for j in range(4):
                h = 0
                for k in range(8):
                    h |= (c[4 * k + j] >> 2) << k
                out[r, b, 10 + j] = h


@numba.njit(cache=True, inline="always")
def _decode_row(blk, r, out):
    """Codes - 4 of row r, as float32 (cols,): the scale is applied by the caller."""
    for b in range(blk.shape[1]):
        for a in range(4):
            for j in range(8):
                i = 8 * a + j
                lo = (blk[r, b, 2 + j] >> (2 * a)) & 3
                hi = (blk[r, b, 10 + (i & 3)] >> (i >> 2)) & 1
                out[b * QK + i] = np.float32(lo | hi << 2) - np.float32(4.0)


@numba.njit(cache=True)
def _dequantize_kernel(blk, d, idx, out):
    vals = np.empty(out.shape[1], np.float32)
    for k in range(idx.shape[0]):
        r = idx[k]
        _decode_row(blk, r, vals)
        for b in range(blk.shape[1]):
            for i in range(QK):
                out[k, b * QK + i] = d[r, b] * vals[b * QK + i]


@numba.njit(cache=True, fastmath=True)
def _qmatmul_kernel(blk, d, x, out):
    rows, nb = d.shape
    n = x.shape[0]
    vals = np.empty(nb * QK, np.float32)
    for r in range(rows):
        _decode_row(blk, r, vals)
        for m in range(n):
            acc = np.float32(0.0)
            for b in range(nb):
                s = np.float32(0.0)
                for i in range(QK):
                    s += vals[b * QK + i] * x[m, b * QK + i]
                acc += d[r, b] * s
            out[m, r] = acc


# ---- the format ------------------------------------------------------------------------


class Q3_X(Format):
    tag = "Q3_X"
    version = 1
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    modes = ("f32",)
    summary = "3-bit symmetric, fp16 scale per 32 (example third-party plugin)"
    # Measured about 0.18 on N(0,1); the conformance kit holds us to this.
    max_rel_rmse = 0.2

    def _quantize(self, w):
        rows, cols = w.shape
        w3 = w.reshape(rows, cols // QK, QK)
        d = np.empty((rows, cols // QK), np.float32)
        _signed_max_kernel(w3, d)
        with np.errstate(over="ignore"):
            d16 = d.astype(F16_LE)
        if not np.isfinite(d16).all():
            _scales_f16(w)  # raises the RangeError naming the block
        out = np.empty((rows, cols // QK, BLOCK_BYTES), np.uint8)
        out[..., 0:2] = d16.view(np.uint8).reshape(rows, cols // QK, 2)
        _pack_kernel(w3, d16.astype(np.float32), out)
        return out.reshape(-1)

    def prepare(self, data, rows, cols):
        # The fp16 scales widened once, so repeated matmuls skip the conversion.
        blk = data.reshape(rows, cols // QK, BLOCK_BYTES)
        return blk, np.ascontiguousarray(blk[..., 0:2]).view(F16_LE)[..., 0].astype(np.float32)

    def _get_rows(self, data, rows, cols, idx):
        blk, d = self.prepare(data, rows, cols)
        out = np.empty((idx.size, cols), np.float32)
        _dequantize_kernel(blk, d, idx, out)
        return out

    def _dequantize(self, data, rows, cols):
        return self._get_rows(data, rows, cols, np.arange(rows, dtype=np.int64))

    def _qmatmul(self, prep, rows, cols, x, mode):
        blk, d = prep
        out = np.empty((x.shape[0], rows), np.float32)
        _qmatmul_kernel(blk, d, x, out)
        return out


@quantfmt.hookimpl
def register_formats(register):
    register(Q3_X())
