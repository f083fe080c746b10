"""Q6_K: ggml's 6-bit k-quant, super-blocks of 256 weights (6.5625 bits per weight).

Owns the Q6_K layout, its numpy reference, its numba kernels and the Format class.

One super-block = 256 consecutive weights of a row, 210 bytes, sixteen sub-blocks of 16:

    bytes 0-127    ql[128]     low 4 bits of q; bytes 64-127 serve the second half (n = 128)
    bytes 128-191  qh[64]      high 2 bits of q; bytes 160-191 serve the second half
    bytes 192-207  scales[16]  int8 scale of each sub-block of 16
    bytes 208-209  d           fp16 super-block scale

    In each half h (elements 128h .. 128h+127), for l = 0..31, with ql, qh of that half:
        q[l]      = (ql[l]    & 15) | ((qh[l] >> 0) & 3) << 4
        q[l + 32] = (ql[l+32] & 15) | ((qh[l] >> 2) & 3) << 4
        q[l + 64] = (ql[l]    >> 4) | ((qh[l] >> 4) & 3) << 4
        q[l + 96] = (ql[l+32] >> 4) | ((qh[l] >> 6) & 3) << 4
    weight e = (d * scales[e // 16]) * (q[e] - 32)        (float32, in that order)

Quantize (ggml's quantize_row_q6_K_ref, byte for byte; float32, no FMA):
    per sub-block j of 16 values x: scale_j = make_qx_quants(nmax 32, rmse_type 1):
        i = first index of the largest |x|, max = x[i] (signed); all |x| < 1e-15: scale 0, L = 0;
        iscale = -32/max; L = clamp(nearest_int(iscale*x), -32, 31); with w = x*x,
        scale = sum(w*x*L)/sum(w*L*L); then for is = -9..9 (not 0) iscale = -(32 + 0.1*is)/max,
        kept when sum(w*x*L)^2 > best*sum(w*L*L) (best = scale*sum(w*x*L)).
    the scale of largest |scale| (first of equals), max_scale; if its |.| < 1e-15: all 210 bytes 0.
    iscale = -128/max_scale; d = fp16(1/iscale); scales[j] = int8(min(127, nearest_int(iscale*scale_j)))
    then D = fp16value(d)*scales[j]; if D != 0: q = clamp(nearest_int(x/D), -32, 31) + 32,
    else q stays the search's L + 32 (0 for an all-zero sub-block).
    nearest_int is ggml's round-half-to-even through the float32 bits of f + 12582912.
    A |d| of 65520 or more (fp16 infinity) is a RangeError.

With importance weights qw (ggml's quantize_row_q6_K_impl, `quantize_weighted`): the same with
w = qw in make_qx_quants.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

import quantfmt
from quantfmt.families import parallel_rows

from ._ggml import NONFINITE_ROW, f32_to_f16_bits, has_nonfinite
from ._klanes import qdiv
from ._kquants import (
    F32,
    GROUP_MAX_EPS,
    OVERFLOW_ABS,
    QK_K,
    KQuant,
    f16_bits_to_f32,
    f16_round_np,
    first_big_block,
    make_qx_quants_np,
    nearest_int,
    nearest_int_np,
    quantize_checked,
    qx_lanes32,
)

BLOCK_BYTES = 210
RULE = "the super-block scale |max scale|/128 must stay below 65520"

# ---- numpy reference ---------------------------------------------------------------------


def quantize_ref(w: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> bytes, as ggml's quantize_q6_K (quant_weights: ggml's imatrix,
    shape (cols,) or that of w); raises RangeError like the kernel."""
    w = np.ascontiguousarray(w, np.float32)
    x = w.reshape(-1, QK_K)
    n = x.shape[0]
    qw = None
    if quant_weights is not None:
        qw = np.broadcast_to(np.asarray(quant_weights, np.float32), w.shape).reshape(n * 16, 16)
    with np.errstate(all="ignore"):
        scales, L = make_qx_quants_np(x.reshape(n * 16, 16), 32, qw)
        scales = scales.reshape(n, 16)
        L = L.reshape(n, 16, 16)
        amax = np.zeros(n, np.float32)
        max_scale = np.zeros(n, np.float32)
        for j in range(16):
            a = np.abs(scales[:, j])
            up = a > amax
            amax = np.where(up, a, amax)
            max_scale = np.where(up, scales[:, j], max_scale)
        zero = amax < GROUP_MAX_EPS
        iscale = F32(-128) / max_scale
        d = F32(1) / iscale
        bad = ~zero & ~(np.abs(d) < F32(65520))
        if bad.any():
            blk = int(np.flatnonzero(bad)[0])
            r, b = divmod(blk, w.shape[1] // QK_K)
            raise Q6_K().range_error(w, r, b)
        hd, df = f16_round_np(np.where(zero, F32(0), d))
        sc = np.minimum(nearest_int_np(iscale[:, None] * scales), 127).astype(np.int8)  # C's int8 store wraps
        dsub = df[:, None] * sc.astype(np.float32)
        Ln = np.clip(nearest_int_np(x.reshape(n, 16, 16) / dsub[..., None]), -32, 31) + 32
        L = np.where(dsub[..., None] != 0, Ln, L).reshape(n, 2, 4, 32).astype(np.uint8)
    out = np.empty((n, BLOCK_BYTES), np.uint8)
    ql = out[:, 0:128].reshape(n, 2, 2, 32)
    ql[:, :, 0] = (L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4)
    ql[:, :, 1] = (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)
    out[:, 128:192].reshape(n, 2, 32)[:] = (
        (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    )
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = hd[:, None].view(np.uint8)
    out[zero] = 0
    return out.reshape(-1)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    blk = data.reshape(-1, BLOCK_BYTES)
    n = blk.shape[0]
    ql = blk[:, 0:128].reshape(n, 2, 2, 32)
    qh = blk[:, 128:192].reshape(n, 2, 1, 32)
    lo = np.concatenate([ql & 15, ql >> 4], axis=2)  # (n, 2, 4, 32): q[l], q[l+32], q[l+64], q[l+96]
    hi = (qh >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3
    q = (lo | (hi << 4)).astype(np.float32) - F32(32)
    sc = blk[:, 192:208].view(np.int8).astype(np.float32)
    d = blk[:, 208:210].copy().view(np.float16).astype(np.float32)
    return ((d * sc)[..., None] * q.reshape(n, 16, 16)).reshape(rows, cols)


def int_parts(data: np.ndarray, rows: int, cols: int):
    """The weights as ggml's dot product sees them: (qi, sc, mi, dw, mw), see _kquants."""
    blk = data.reshape(-1, BLOCK_BYTES)
    n = blk.shape[0]
    ql = blk[:, 0:128].reshape(n, 2, 2, 32)
    qh = blk[:, 128:192].reshape(n, 2, 1, 32)
    lo = np.concatenate([ql & 15, ql >> 4], axis=2)
    hi = (qh >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3
    qi = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8)
    sc = blk[:, 192:208].view(np.int8).astype(np.int16)
    dw = blk[:, 208:210].copy().view(np.float16)[:, 0].astype(np.float32)
    nb = cols // QK_K
    return (qi.reshape(rows, nb, QK_K), sc.reshape(rows, nb, 16), np.zeros((rows, nb, 16), np.int16),
            dw.reshape(rows, nb), np.zeros((rows, nb), np.float32))


_QDIV16 = qdiv(16, False)  # the final pass of a sub-block, one vector division

# ---- numba kernels ---------------------------------------------------------------------------
# Scalar code that follows the C statement by statement; no fastmath (byte-identity).


@numba.njit(cache=True, error_model="numpy", inline="always")
def _quantize_block(x, out, L, scales):
    """One super-block x (256,) into out (210,), given its sixteen sub-blocks' make_qx_quants (L (256,),
    scales (16,): make_qx_lanes over the whole row in _quantize_rows); True if d overflows fp16."""
    amax = np.float32(0.0)
    max_scale = np.float32(0.0)
    for j in range(16):
        v = scales[j]
        if abs(v) > amax:
            amax = abs(v)
            max_scale = v
    if amax < np.float32(1e-15):
        for i in range(BLOCK_BYTES):
            out[i] = 0
        return False
    iscale = np.float32(-128.0) / max_scale
    d = np.float32(1.0) / iscale
    if not (abs(d) < np.float32(65520.0)):
        return True
    hd = f32_to_f16_bits(d)
    out[208] = np.uint8(hd & 0xFF)
    out[209] = np.uint8(hd >> 8)
    df = f16_bits_to_f32(np.int64(hd))
    for j in range(16):
        v = min(127, nearest_int(iscale * scales[j])) & 255  # C stores it in an int8: wraps
        out[192 + j] = np.uint8(v)
        dj = df * np.float32(v - 256 if v > 127 else v)
        if dj == 0:
            continue
        _QDIV16(x, 16 * j, np.float32(0.0), dj, -32, 31, 32, L, 16 * j)  # L = clamp(nearest_int(x/dj)) + 32
    for h in range(2):
        e = 128 * h
        for i in range(32):
            l0 = np.int64(L[e + i])
            l1 = np.int64(L[e + i + 32])
            l2 = np.int64(L[e + i + 64])
            l3 = np.int64(L[e + i + 96])
            out[64 * h + i] = np.uint8((l0 & 15) | ((l2 & 15) << 4))
            out[64 * h + i + 32] = np.uint8((l1 & 15) | ((l3 & 15) << 4))
            out[128 + 32 * h + i] = np.uint8((l0 >> 4) | ((l1 >> 4) << 2) | ((l2 >> 4) << 4) | ((l3 >> 4) << 6))
    return False


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _rows(w, qw, out, bad, r0, r1, xt, Lt, qt, scales, L):
    nb = w.shape[1] // QK_K
    M = 16 * nb
    # the row's 16*nb sub-blocks side by side (element-major), searched in lock step (one call per
    # row: its vector code runs 16 lanes at a time). Work space (_work): xt, qt (16, Mp) with the lanes
    # padded with zeros to a multiple of 32, so qx_lanes32 runs only the 32-lane vector kernels (the pad
    # lanes are searched and ignored; cold start: two kernels, not four and a loop), Lt (16, Mp) int8,
    # scales (Mp,), L (256,) int8.
    # qw None (quantize) or the importance weights (quantize_weighted): `qw is None` is decided when the
    # kernel is compiled, so each compiles only its own path (quantize never compiles the weighted
    # vector kernel, ~1 s of a cold start)
    for r in range(r0, r1):
        bad[r] = -1
        if has_nonfinite(w[r]):  # (checks_finite: quantize does not scan the tensor first)
            bad[r] = NONFINITE_ROW
            continue
        if qw is None:  # (quantize_weighted has no overflow_abs test)
            big = first_big_block(w[r])
            if big >= 0:
                bad[r] = -2 - big
                continue
        # (the transposes as row slices, branch-free inner loops: ~2x the 2-D indexing with the
        # has_qw test inside)
        wr = w[r]
        for k in range(M):
            for i in range(16):
                xt[i, k] = wr[16 * k + i]
        if qw is None:
            qx_lanes32(xt, Lt, 32, None, scales)
        else:
            qr = qw[r]
            for k in range(M):
                for i in range(16):
                    qt[i, k] = qr[16 * k + i]
            qx_lanes32(xt, Lt, 32, qt, scales)
        for b in range(nb):
            c = b * QK_K
            for i in range(16):
                li = Lt[i]
                for j in range(16):
                    L[16 * j + i] = li[16 * b + j]
            if _quantize_block(w[r, c : c + QK_K], out[r, b], L, scales[16 * b : 16 * b + 16]):
                if bad[r] < 0:
                    bad[r] = b


_WORK = threading.local()


def _work(nb: int):
    """This thread's work space for rows of nb super-blocks (xt, Lt, qt, scales, L): made once per thread
    and row length, not in the kernel (numba's np.zeros/np.empty compile anew in every process: part of
    a cold start). xt and qt keep their zero pad lanes (the row kernel writes the first 16 * nb columns)."""
    w = getattr(_WORK, "q6", None)
    if w is None or w[0].shape[1] != (16 * nb + 31) // 32 * 32:
        m = (16 * nb + 31) // 32 * 32
        w = (np.zeros((16, m), np.float32), np.zeros((16, m), np.int8), np.zeros((16, m), np.float32),
             np.zeros(m, np.float32), np.zeros(QK_K, np.int8))
        _WORK.q6 = w
    return w


def _quantize_rows(w, qw, out, bad, r0, r1):
    """Rows r0..r1-1 (the kernel of parallel_rows), with this thread's work space."""
    _rows(w, qw, out, bad, r0, r1, *_work(w.shape[1] // QK_K))


def _quantize_kernel_qw(w, qw, out, bad):
    # Python threads over ~64K-weight row ranges (a call costs ~7 us of dispatch and work space: 16K
    # ranges spent ~5% of the time there), not a parallel=True driver: as fast, and a cold
    # start compiles the deep _quantize_rows chain once instead of twice more (families.parallel_rows).
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, qw, out, bad, weights=65536)


def _quantize_kernel(w, out, bad):
    _quantize_kernel_qw(w, None, out, bad)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, lut, idx, out, k0, k1, half):
    # Loops of `half` (16) known only at run time, 3-D indexing with loop variables and the bit
    # fields split in float (exact): this vectorizes; integer shifts would be widened to int64.
    nb = blocks.shape[1]
    ds = np.empty(16, np.float32)
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = lut[np.int64(blocks[r, b, 208]) | (np.int64(blocks[r, b, 209]) << 8)]
            for j in range(16):
                s = np.int64(blocks[r, b, 192 + j])
                ds[j] = d * np.float32(s - 256 if s > 127 else s)
            for h in range(2):
                for g in range(2):  # elements l = 16g .. 16g+15 of each quarter: sub-blocks 8h + g + 2t
                    o = b * QK_K + 128 * h + 16 * g
                    s0, s1, s2, s3 = ds[8 * h + g], ds[8 * h + g + 2], ds[8 * h + g + 4], ds[8 * h + g + 6]
                    for i in range(half):
                        l = 16 * g + i
                        a = np.float32(blocks[r, b, 64 * h + l])
                        c = np.float32(blocks[r, b, 64 * h + 32 + l])
                        hb = np.float32(blocks[r, b, 128 + 32 * h + l])
                        ah = np.floor(a * np.float32(0.0625))
                        al = a - np.float32(16.0) * ah
                        ch = np.floor(c * np.float32(0.0625))
                        cl = c - np.float32(16.0) * ch
                        t1 = np.floor(hb * np.float32(0.25))
                        h0 = hb - np.float32(4.0) * t1
                        t2 = np.floor(t1 * np.float32(0.25))
                        h1 = t1 - np.float32(4.0) * t2
                        h3 = np.floor(t2 * np.float32(0.25))
                        h2 = t2 - np.float32(4.0) * h3
                        out[k, o + i] = s0 * (al + np.float32(16.0) * h0 - np.float32(32.0))
                        out[k, o + 32 + i] = s1 * (cl + np.float32(16.0) * h1 - np.float32(32.0))
                        out[k, o + 64 + i] = s2 * (ah + np.float32(16.0) * h2 - np.float32(32.0))
                        out[k, o + 96 + i] = s3 * (ch + np.float32(16.0) * h3 - np.float32(32.0))


def _dequantize_kernel(blocks, lut, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, lut, idx, out, tail=(16,))


# ---- the format ------------------------------------------------------------------------------


class Q6_K(KQuant):
    tag = "Q6_K"
    ggml_type = "Q6_K"
    block_bytes = BLOCK_BYTES
    overflow_abs = OVERFLOW_ABS  # sums of squares of 16 weights overflow float32 from ~4.6e18: silent zeros
    safe_abs = 1.0e7  # measured worst fp16 scale ~0.00026 * max|w|: 25x margin
    range_rule = RULE
    summary = "ggml Q6_K: per 256 weights an fp16 d, sixteen int8 sub-block scales and 6-bit q; ggml-identical bytes"
    quantize_kernel = staticmethod(_quantize_kernel)
    dequantize_kernel = staticmethod(_dequantize_kernel)
    int_parts = staticmethod(int_parts)
    weighted_kernel = staticmethod(_quantize_kernel_qw)

    def _quantize(self, w):
        return quantize_checked(self, w)  # overflow_abs tested in the row kernel (first_big_block)


@quantfmt.hookimpl
def register_formats(register):
    register(Q6_K())
