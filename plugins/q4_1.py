"""Q4_1: ggml's 4-bit format with an fp16 scale and an fp16 minimum per 32 weights (5 bits per weight).

Owns the Q4_1 layout, its numpy reference, its numba kernels and the Format class.

One block = 32 consecutive weights of a row, 20 bytes:

    bytes 0-1    d      fp16, little-endian: the scale
    bytes 2-3    m      fp16, little-endian: the block minimum
    bytes 4-19   qs[16] qs[j] = (q[j] & 15) | (q[j+16] << 4), q in 0..15

    weight w[j] = d * q[j] + m          (a float32 product, then a float32 sum; no FMA)

Quantize (gguf-py's `quants.Q4_1`, byte for byte; ggml's quantize_row_q4_1_ref):
    min, max = the smallest and largest x
    d   = (max - min) / 15               float32
    id  = 1/d, or 0 if d == 0            float32
    q   = min(15, trunc((x - min)*id + 0.5))
    d and m = min are stored as fp16 (round to nearest even); either reaching 65520 in
    magnitude is a RangeError. If id is infinite, (x-min)*id is inf or NaN, which numpy
    casts to 0: q = 0.
    Signed zeros: when the minimum (or, in an all-zero block, the maximum) is a zero and
    the block holds both +0.0 and -0.0, we take the first of them in block order, as
    ggml's C loop does (`if (v < min) min = v`). gguf-py's numpy min/max picks one by its
    SIMD reduction order, which depends on the array's shape and the CPU; only the sign
    bit of the stored m (or d) can differ, never a decoded weight.

qmatmul mode "q8_0": ggml pairs Q4_1 weights with Q8_1 activations (a Q8_0 block plus
s = d_x * sum(q_x) as fp16), because sum_j (d_w q_w + m)(d_x q_x) = d_w d_x sum(q_w q_x)
+ m * s. Per ggml_vec_dot_q4_1_q8_1 the first terms are summed over blocks in one float32
accumulator, the m*s terms in another, and the two added at the end.
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.families import GGMLFormat, parallel_rows

from . import _i8gemm
from ._ggml import (
    NONFINITE_ROW,
    QK,
    f32_to_f16_bits,
    fp16_table,
    has_nonfinite,
    vec_dot_ref,
)
from ._qtiles import Prepared, to_tiles
from .q4_0 import nibble_matvec_fn, nibble_qmatmul, tile_nibbles

BLOCK_BYTES = 20
RULE = "needs max - min below 982800 (= 65520*15) and |min| below 65520"

# ---- numpy reference ----------------------------------------------------------------------


def _first_extreme(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The element equal to v (per block) that comes first: fixes the sign of a zero extreme."""
    i = (x == v[:, None]).argmax(axis=-1)
    return x[np.arange(x.shape[0]), i]


def quantize_ref(w: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(w, np.float32).reshape(-1, QK)
    mn = _first_extreme(x, x.min(axis=-1))
    mx = _first_extreme(x, x.max(axis=-1))
    with np.errstate(over="ignore"):
        d = (mx - mn) / np.float32(15)
    bad = ~((d < np.float32(65520)) & (np.abs(mn) < np.float32(65520)))
    if bad.any():
        r, b = divmod(int(np.flatnonzero(bad)[0]), w.shape[1] // QK)
        raise Q4_1().range_error(w, r, b)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        idd = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        t = np.trunc((x - mn[:, None]) * idd[:, None] + np.float32(0.5))
    t[~((t >= 0) & (t < 256))] = 0  # numpy's cast of inf/NaN to uint8 gives 0
    q = np.minimum(t, 15).astype(np.uint8)
    out = np.empty((x.shape[0], BLOCK_BYTES), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    out[:, 2:4] = mn.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    out[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(-1)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    blk = data.reshape(-1, BLOCK_BYTES)
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blk[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blk[:, 4:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(rows, cols)


def qmatmul_q8_ref(data: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_q4_1_q8_1: sum over blocks of sumi * (d_w*d_x) + m_w * s_x, with
    sumi = sum(q_w * q_x)."""
    blk = data.reshape(rows, cols // QK, BLOCK_BYTES)
    dw = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    mw = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qw = np.concatenate([blk[..., 4:] & 15, blk[..., 4:] >> 4], axis=-1)
    return vec_dot_ref(qw, dw, x, mw)


# ---- numba kernels ------------------------------------------------------------------------
# No fastmath in quantize/dequantize (FMA would change last bits).


@numba.njit(cache=True, nogil=True)
def _quantize_rows(w, out, bad, r0, r1):
    # Rows r0..r1-1 of w (float32) into out (rows, nb, 20).
    nb = w.shape[1] // 32
    for r in range(r0, r1):
        bad[r] = -1
        if has_nonfinite(w[r]):  # (checks_finite: quantize does not scan the tensor first)
            bad[r] = NONFINITE_ROW
            continue
        wr = w[r]  # the row's view, once: the per-block slices then skip a 2-D index (~6% on one thread)
        orow = out[r]
        for b in range(nb):
            xb = wr[b * 32 : b * 32 + 32]
            mn = xb[0]
            mx = xb[0]
            for j in range(1, 32):  # strict comparisons: the first of equal extremes stays
                if xb[j] < mn:
                    mn = xb[j]
                if xb[j] > mx:
                    mx = xb[j]
            d = (mx - mn) / np.float32(15.0)
            if not (d < np.float32(65520.0) and abs(mn) < np.float32(65520.0)):
                if bad[r] < 0:
                    bad[r] = b
                continue
            idd = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            hd = f32_to_f16_bits(d)
            hm = f32_to_f16_bits(mn)
            o = orow[b]
            o[0] = np.uint8(hd & 0xFF)
            o[1] = np.uint8(hd >> 8)
            o[2] = np.uint8(hm & 0xFF)
            o[3] = np.uint8(hm >> 8)
            for j in range(16):
                t0 = np.floor((xb[j] - mn) * idd + np.float32(0.5))
                t1 = np.floor((xb[j + 16] - mn) * idd + np.float32(0.5))
                t0 = min(t0, np.float32(15.0)) if (t0 >= 0 and t0 < 256) else np.float32(0.0)
                t1 = min(t1, np.float32(15.0)) if (t1 >= 0 and t1 < 256) else np.float32(0.0)
                o[4 + j] = np.uint8(t0 + np.float32(16.0) * t1)


def _quantize_kernel(w, out, bad):
    # Python threads over ~1M-weight row ranges, not a parallel=True driver: as fast, and a cold start
    # compiles _quantize_rows once instead of ~2x its cost (see families.parallel_rows). 64K-weight
    # ranges ran ~1.15x slower than the prange driver (a busy machine: each range waits for the GIL).
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, out, bad, weights=1 << 20)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, lut, idx, out, k0, k1, half):
    # As Q4_0's: direct indexing and a run-time trip count so the loop vectorizes.
    nb = blocks.shape[1]
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = lut[np.int32(blocks[r, b, 0]) | (np.int32(blocks[r, b, 1]) << 8)]
            m = lut[np.int32(blocks[r, b, 2]) | (np.int32(blocks[r, b, 3]) << 8)]
            for j in range(half):
                v = np.float32(blocks[r, b, 4 + j])
                hi = np.floor(v * np.float32(0.0625))
                lo = v - np.float32(16.0) * hi
                out[k, b * 32 + j] = d * lo + m
                out[k, b * 32 + 16 + j] = d * hi + m


def _dequantize_kernel(blocks, lut, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, lut, idx, out, tail=(16,))


# ---- fast qmatmul ---------------------------------------------------------------------------
# Q4_1 shares Q4_0's row tiles and kernels (q4_0.py, "fast qmatmul"): the same nibbles
# regrouped into tiles of 32 rows, plus the minimums m in a float32 array shaped like d
# (0.75 byte per weight, 1.2x the bytes). Mode "q8_0" adds m_w * s_x per block with ggml's
# fp16 s_x of the Q8_1 activation block, as ggml_vec_dot_q4_1_q8_1 does.


# ---- the format ---------------------------------------------------------------------------


class Q4_1(GGMLFormat):
    tag = "Q4_1"
    rows_independent = True  # blocks along a row, nothing tensor-wide
    layout_version = 1
    ggml_type = "Q4_1"
    vec_dot_type = "Q8_1"
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    modes = ("f32", "q8_0")
    max_abs = 65520.0  # a block whose minimum is -65520 or less; any block below it in magnitude fits
    range_rule = RULE
    summary = "ggml Q4_1: per 32 weights fp16 scale d and min m, 4-bit q, w = d*q + m; gguf-identical bytes"
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # each row kernel flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)

    def prepare(self, data, rows, cols):
        # The nibble tiles are made on first use, as Q4_0's: mode "q8_0" never reads them (batches: the
        # ggml bytes, plugins/_i8gemm.py; decode: _i4dot's own tiles, see q4_0.nibble_qmatmul).
        blk = np.asarray(data).reshape(rows, cols // QK, BLOCK_BYTES)
        lut = fp16_table()
        d = to_tiles(lut[blk[:, :, 0].astype(np.uint16) | (blk[:, :, 1].astype(np.uint16) << 8)], rows)
        m = to_tiles(lut[blk[:, :, 2].astype(np.uint16) | (blk[:, :, 3].astype(np.uint16) << 8)], rows)
        return Prepared(rows, cols, lambda: tile_nibbles(data, rows, cols, BLOCK_BYTES)[0], d, m, data)

    def _qmatmul(self, prep, rows, cols, x, mode):
        # f32 batches: W.T tiles per thread (q4_0.nibble_qmatmul -> _qtiles.blas_matmul), the sgemm NN
        return nibble_qmatmul(prep, x, mode, self.tag)

    def matvec_fn(self, prep, rows, cols, mode):
        return nibble_matvec_fn(prep, mode)

    def kernel_path(self, op, n=1, mode="f32"):
        return _i8gemm.qmatmul_path(op, n, mode, "q4_1")


@quantfmt.hookimpl
def register_formats(register):
    register(Q4_1())
