"""Q2_K: ggml's 2-bit k-quant, super-blocks of 256 weights (2.625 bits per weight).

Owns the Q2_K layout, its numpy reference, its numba kernels and the Format class.

One super-block = 256 consecutive weights of a row, 84 bytes, sixteen sub-blocks of 16:

    bytes 0-15    scales[16]  sub-block j: low nibble sc[j] (scale), high nibble m[j] (minimum)
    bytes 16-79   qs[64]      2-bit q: in half h (elements 128h..128h+127), bits 2k..2k+1 of
                              qs[32h + l] belong to element 128h + 32k + l
    bytes 80-81   d           fp16 scale of the sub-block scales
    bytes 82-83   dmin        fp16 scale of the sub-block minimums

    weight = (d*sc[j]) * q - (dmin*m[j])      (float32, in that order)

Quantize (ggml's quantize_row_q2_K_ref, byte for byte; float32, no FMA):
    per sub-block j of 16 values x: weight_i = |x_i|;
        (scale_j, min_j) = make_qkx2_quants(nmax 3, rmin -0.5, rdelta 0.1, nstep 15, absolute error)
        (see q4_k.py: the asymmetric search, here minimizing sum(weight*|scale*L + min - x|)).
    max_scale = max_j scale_j, max_min = max_j min_j (both from 0 upwards, strict >)
    if max_scale > 0: sc[j] = nearest_int(15/max_scale * scale_j) (low nibble), d = fp16(max_scale/15);
        else sc = 0, d = 0.
    if max_min > 0: m[j] = nearest_int(15/max_min * min_j) (high nibble), dmin = fp16(max_min/15);
        else dmin = 0 (m stays 0).
    then D = fp16value(d)*sc[j]; if D != 0: q = clamp(nearest_int((x + fp16value(dmin)*m[j]) / D), 0, 3),
    else q stays the search's L. nearest_int: ggml's round-half-to-even through the float32 bits of
    f + 12582912. A d or dmin of 65520 or more (fp16 infinity) is a RangeError.

With importance weights qw (ggml's quantize_row_q2_K_impl, `quantize_weighted`):
    sigma2 = sum(x*x over the 256)/256; weight_i = qw_i*sqrt(sigma2 + x_i*x_i); sw_j = sum of a
    sub-block's weights; (scale_j, min_j) = make_qkx3_quants(nmax 3, rmin -0.9, rdelta 0.05, nstep 36,
    squared error); sc and m = make_qp_quants(nmax 15, weights sw) over the sixteen scales (minimums),
    d and dmin = fp16 of what it returns; the same final pass.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

import quantfmt
from quantfmt.families import parallel_rows

from ._ggml import NONFINITE_ROW, f32_to_f16_bits, has_nonfinite
from ._klanes import nibbles, qdiv
from ._kquants import (
    _TR16,
    F32,
    QK_K,
    REDO,
    KQuant,
    f16_bits_to_f32,
    f16_round_np,
    make_qkx2_quants_np,
    make_qkx3_quants_np,
    make_qp_quants,
    make_qp_quants_np,
    nearest_int,
    nearest_int_np,
    qkx2_lanes16,
    redo_rows,
)

BLOCK_BYTES = 84
RULE = "the super-block scales max(scale)/15 and max(min)/15 must stay below 65520"

# ---- numpy reference ---------------------------------------------------------------------


def quantize_ref(w: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> bytes, as ggml's quantize_q2_K (quant_weights: ggml's imatrix,
    shape (cols,) or that of w); raises RangeError like the kernel."""
    w = np.ascontiguousarray(w, np.float32)
    x = w.reshape(-1, QK_K)
    n = x.shape[0]
    xs = x.reshape(n * 16, 16)
    with np.errstate(all="ignore"):
        if quant_weights is None:
            scales, mins, L = make_qkx2_quants_np(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
            scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
            max_scale = np.zeros(n, np.float32)
            max_min = np.zeros(n, np.float32)
            for j in range(16):
                max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
                max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
            has_s = max_scale > 0
            has_m = max_min > 0
            ls = np.where(has_s[:, None], nearest_int_np((F32(15) / max_scale)[:, None] * scales), 0)
            lm = np.where(has_m[:, None], nearest_int_np((F32(15) / max_min)[:, None] * mins), 0)
            packed = ((ls & 255) | ((lm << 4) & 255)).astype(np.uint8)  # C's uint8 stores
            d = np.where(has_s, max_scale / F32(15), F32(0)).astype(np.float32)
            dmin = np.where(has_m, max_min / F32(15), F32(0)).astype(np.float32)
        else:
            qw = np.broadcast_to(np.asarray(quant_weights, np.float32), w.shape).reshape(n * 16, 16)
            sum_x2 = np.zeros(n, np.float32)
            for i in range(QK_K):
                sum_x2 = sum_x2 + x[:, i] * x[:, i]
            sigma2 = sum_x2 / F32(QK_K)
            weights = qw * np.sqrt(np.repeat(sigma2, 16)[:, None] + xs * xs)
            sw = np.zeros(n * 16, np.float32)
            for i in range(16):
                sw = sw + weights[:, i]
            scales, mins, L = make_qkx3_quants_np(xs, weights, 3, -0.9, 0.05, 36, False)
            d, ls = make_qp_quants_np(scales.reshape(n, 16), 15, sw.reshape(n, 16))
            dmin, lm = make_qp_quants_np(mins.reshape(n, 16), 15, sw.reshape(n, 16))
            packed = ((ls & 255) | ((lm << 4) & 255)).astype(np.uint8)
        bad = ~((d < F32(65520)) & (dmin < F32(65520)))
        if bad.any():
            blk = int(np.flatnonzero(bad)[0])
            r, b = divmod(blk, w.shape[1] // QK_K)
            raise Q2_K().range_error(w, r, b)
        hd, df = f16_round_np(d)
        hm, dmf = f16_round_np(dmin)
        dsub = df[:, None] * (packed & 15).astype(np.float32)
        msub = dmf[:, None] * (packed >> 4).astype(np.float32)
        xb = x.reshape(n, 16, 16)
        Ln = np.clip(nearest_int_np((xb + msub[..., None]) / dsub[..., None]), 0, 3)
        L = np.where(dsub[..., None] != 0, Ln, L.reshape(n, 16, 16)).astype(np.uint8).reshape(n, 2, 4, 32)
    out = np.empty((n, BLOCK_BYTES), np.uint8)
    out[:, 0:16] = packed
    out[:, 16:80] = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(n, 64)
    out[:, 80:82] = hd[:, None].view(np.uint8)
    out[:, 82:84] = hm[:, None].view(np.uint8)
    return out.reshape(-1)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    blk = data.reshape(-1, BLOCK_BYTES)
    n = blk.shape[0]
    d = blk[:, 80:82].copy().view(np.float16).astype(np.float32)
    dmin = blk[:, 82:84].copy().view(np.float16).astype(np.float32)
    dl = (d * (blk[:, 0:16] & 15).astype(np.float32))[..., None]
    ml = (dmin * (blk[:, 0:16] >> 4).astype(np.float32))[..., None]
    q = (blk[:, 16:80].reshape(n, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    return (dl * q.reshape(n, 16, 16).astype(np.float32) - ml).reshape(rows, cols)


def int_parts(data: np.ndarray, rows: int, cols: int):
    """The weights as ggml's dot product sees them: (qi, sc, mi, dw, mw), see _kquants."""
    blk = data.reshape(-1, BLOCK_BYTES)
    n = blk.shape[0]
    q = (blk[:, 16:80].reshape(n, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    dw = blk[:, 80:82].copy().view(np.float16)[:, 0].astype(np.float32)
    mw = blk[:, 82:84].copy().view(np.float16)[:, 0].astype(np.float32)
    nb = cols // QK_K
    return (q.astype(np.int8).reshape(rows, nb, QK_K), (blk[:, 0:16] & 15).astype(np.int16).reshape(rows, nb, 16),
            (blk[:, 0:16] >> 4).astype(np.int16).reshape(rows, nb, 16), dw.reshape(rows, nb), mw.reshape(rows, nb))


_QDIV = qdiv(16, True)  # the final pass of a sub-block, one vector division
_PACK = nibbles("q2")  # its packing, two <32 x i8> vectors

# ---- numba kernels ---------------------------------------------------------------------------
# Scalar code that follows the C statement by statement; no fastmath (byte-identity).


@numba.njit(cache=True, error_model="numpy", inline="always")
def _quantize_block(x, qw, out, L, Lt, k0, scales, mins, sw, lq):
    """One super-block x (256,) into out (84,), given its sixteen sub-blocks' make_qkx2_quants
    results (quants Lt[:, k0 + j] of sub-block j, read where its stored scale is 0; L (256,) work
    space; scales, mins (16,); sw (16,) the sums of the importance weights when qw,
    the row kernel's, is not None: decided at compile time); True if d or dmin overflows fp16."""
    s = out[0:16]
    if qw is None:
        max_scale = np.float32(0.0)
        max_min = np.float32(0.0)
        for j in range(16):
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        if max_scale > 0:
            isc = np.float32(15.0) / max_scale
            for j in range(16):
                s[j] = np.uint8(nearest_int(isc * scales[j]) & 255)
            d = max_scale / np.float32(15.0)
        else:
            for j in range(16):
                s[j] = 0
            d = np.float32(0.0)
        if max_min > 0:
            isc = np.float32(15.0) / max_min
            for j in range(16):
                s[j] = np.uint8((np.int64(s[j]) | (nearest_int(isc * mins[j]) << 4)) & 255)
            dmin = max_min / np.float32(15.0)
        else:
            dmin = np.float32(0.0)
    else:
        d = make_qp_quants(scales, lq, 15, sw)
        for j in range(16):
            s[j] = lq[j]
        dmin = make_qp_quants(mins, lq, 15, sw)
        for j in range(16):
            s[j] = np.uint8((np.int64(s[j]) | (np.int64(lq[j]) << 4)) & 255)
    if not (d < np.float32(65520.0) and dmin < np.float32(65520.0)):
        return True
    hd = f32_to_f16_bits(d)
    hm = f32_to_f16_bits(dmin)
    out[80] = np.uint8(hd & 0xFF)
    out[81] = np.uint8(hd >> 8)
    out[82] = np.uint8(hm & 0xFF)
    out[83] = np.uint8(hm >> 8)
    df = f16_bits_to_f32(np.int64(hd))
    dmf = f16_bits_to_f32(np.int64(hm))
    for j in range(16):
        dj = df * np.float32(np.int64(s[j]) & 15)
        if dj == 0:  # ggml keeps the search's L
            for i in range(16):
                L[16 * j + i] = Lt[i, k0 + j]
            continue
        mj = dmf * np.float32(np.int64(s[j]) >> 4)
        _QDIV(x, 16 * j, mj, dj, 0, 3, 0, L, 16 * j)  # L = clamp(nearest_int((x + mj)/dj), 0, 3)
    _PACK(L, out, 16)  # out[16 + 32h + i] = OR_j L[128h + 32j + i] << 2j
    return False


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _rows(w, qw, out, bad, r0, r1, xt, wt, Lt, scales, mins, sw, L, lq, exact=None):
    # qw None (quantize) or the importance weights (quantize_weighted): `qw is None` is decided when the
    # kernel is compiled, so quantize compiles neither the weighted search nor make_qp_quants.
    # All 16 * nb sub-blocks of a row side by side (element-major), searched in lock step: long lane
    # loops vectorize far better than one super-block's sixteen. Work space (_work): xt, wt (16, M)
    # with M = 16 * nb padded with zero lanes to a multiple of 32, so qkx2_lanes16 runs only the 32-lane
    # vector kernels (the pad lanes are searched and ignored; cold start: two kernels, not four and a loop)
    nb = w.shape[1] // QK_K
    for r in range(r0, r1):
        bad[r] = -1
        if has_nonfinite(w[r]):  # (checks_finite: quantize does not scan the tensor first)
            bad[r] = NONFINITE_ROW
            continue
        for k0 in range(0, 16 * nb, 16):
            _TR16(w, r, xt, k0)  # 16 sub-blocks at a time, vector shuffles (plugins/_klanes.py)
        if qw is None:
            for i in range(16):
                for k in range(16 * nb):
                    wt[i, k] = abs(xt[i, k])
            flagged = qkx2_lanes16(xt, wt, Lt, 3, np.float32(-0.5), np.float32(0.1), 15, True, scales, mins, exact)
        else:
            for b in range(nb):
                sum_x2 = np.float32(0.0)
                for i in range(QK_K):
                    xv = w[r, QK_K * b + i]
                    sum_x2 += xv * xv
                sigma2 = sum_x2 / np.float32(QK_K)
                for j in range(16):
                    k = 16 * b + j
                    sumw = np.float32(0.0)
                    for i in range(16):
                        wt[i, k] = qw[r, 16 * k + i] * np.float32(np.sqrt(sigma2 + xt[i, k] * xt[i, k]))
                        sumw += wt[i, k]
                    sw[k] = sumw
            flagged = qkx2_lanes16(xt, wt, Lt, 3, np.float32(-0.9), np.float32(0.05), 36, False, scales, mins, exact)
        if flagged:
            bad[r] = REDO  # redo_rows
            continue
        for b in range(nb):
            c = b * QK_K
            sl = slice(16 * b, 16 * b + 16)
            if _quantize_block(w[r, c : c + QK_K], qw, out[r, b], L, Lt, 16 * b, scales[sl], mins[sl], sw[sl], lq):
                if bad[r] < 0:
                    bad[r] = b


_WORK = threading.local()


def _work(nb: int):
    """This thread's work space for rows of nb super-blocks (xt, wt, Lt, scales, mins, sw, L, lq): made
    once per thread and row length, not in the kernel (numba's np.zeros/np.empty compile anew in every
    process: part of a cold start)."""
    w = getattr(_WORK, "q2", None)
    if w is None or w[5].shape[0] != 16 * nb:
        m = (16 * nb + 31) // 32 * 32
        f = np.float32
        w = (np.zeros((16, m), f), np.zeros((16, m), f), np.zeros((16, m), np.uint8), np.zeros(m, f), np.zeros(m, f),
             np.zeros(16 * nb, f), np.zeros(QK_K, np.uint8), np.zeros(16, np.uint8))
        _WORK.q2 = w
    return w


def _quantize_rows(w, qw, out, bad, r0, r1, exact=None):
    """Rows r0..r1-1 (the kernel of parallel_rows and redo_rows), with this thread's work space."""
    if exact is None:  # (omitted, not None: `exact is None` is pruned when _rows is compiled)
        _rows(w, qw, out, bad, r0, r1, *_work(w.shape[1] // QK_K))
    else:
        _rows(w, qw, out, bad, r0, r1, *_work(w.shape[1] // QK_K), exact)


def _quantize_kernel_qw(w, qw, out, bad):
    # Python threads over ~64K-weight row ranges (a call costs ~7 us of dispatch and work space: 16K
    # ranges spent ~5% of the time there), not a parallel=True driver: as fast, and a cold
    # start compiles the deep _quantize_rows chain once instead of twice more (families.parallel_rows).
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, qw, out, bad, weights=65536)
    redo_rows(_quantize_rows, w, qw, out, bad)


def _quantize_kernel(w, out, bad):
    _quantize_kernel_qw(w, None, out, bad)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, lut, idx, out, k0, k1, half):
    # Loops of `half` (16) known only at run time, 3-D indexing, 2-bit fields split in float (exact).
    nb = blocks.shape[1]
    dl = np.empty(16, np.float32)
    ml = np.empty(16, np.float32)
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = lut[np.int64(blocks[r, b, 80]) | (np.int64(blocks[r, b, 81]) << 8)]
            dmin = lut[np.int64(blocks[r, b, 82]) | (np.int64(blocks[r, b, 83]) << 8)]
            for j in range(16):
                v = np.int64(blocks[r, b, j])
                dl[j] = d * np.float32(v & 15)
                ml[j] = dmin * np.float32(v >> 4)
            for hh in range(2):
                for g in range(2):  # l = 16g .. 16g+15: sub-blocks 8hh + g + 2kk
                    o = b * QK_K + 128 * hh + 16 * g
                    t0, t1, t2, t3 = 8 * hh + g, 8 * hh + g + 2, 8 * hh + g + 4, 8 * hh + g + 6
                    for i in range(half):
                        v = np.float32(blocks[r, b, 16 + 32 * hh + 16 * g + i])
                        a1 = np.floor(v * np.float32(0.25))
                        q0 = v - np.float32(4.0) * a1
                        a2 = np.floor(a1 * np.float32(0.25))
                        q1 = a1 - np.float32(4.0) * a2
                        q3 = np.floor(a2 * np.float32(0.25))
                        q2 = a2 - np.float32(4.0) * q3
                        out[k, o + i] = dl[t0] * q0 - ml[t0]
                        out[k, o + 32 + i] = dl[t1] * q1 - ml[t1]
                        out[k, o + 64 + i] = dl[t2] * q2 - ml[t2]
                        out[k, o + 96 + i] = dl[t3] * q3 - ml[t3]


def _dequantize_kernel(blocks, lut, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, lut, idx, out, tail=(16,))


# ---- the format ------------------------------------------------------------------------------


class Q2_K(KQuant):
    tag = "Q2_K"
    ggml_type = "Q2_K"
    block_bytes = BLOCK_BYTES
    safe_abs = 3.0e5  # measured worst fp16 scale (dmin) ~0.1 * max|w|: 2x margin
    range_rule = RULE
    summary = ("ggml Q2_K: per 256 weights fp16 d, dmin and sixteen 4-bit (scale, min) pairs, 2-bit q; "
               "ggml-identical bytes")
    quantize_kernel = staticmethod(_quantize_kernel)
    dequantize_kernel = staticmethod(_dequantize_kernel)
    int_parts = staticmethod(int_parts)
    weighted_kernel = staticmethod(_quantize_kernel_qw)


@quantfmt.hookimpl
def register_formats(register):
    register(Q2_K())
