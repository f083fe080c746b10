"""Q3_K: ggml's 3-bit k-quant, super-blocks of 256 weights (3.4375 bits per weight).

Owns the Q3_K layout, its numpy reference, its numba kernels and the Format class.

One super-block = 256 consecutive weights of a row, 110 bytes, sixteen sub-blocks of 16:

    bytes 0-31    hmask[32]   high bit of q: bit k of hmask[l] belongs to element 32k + l
    bytes 32-95   qs[64]      low 2 bits of q: in half h (elements 128h..128h+127), bits 2k..2k+1
                              of qs[32h + l] belong to element 128h + 32k + l
    bytes 96-107  scales[12]  sixteen 6-bit scales s[j] (stored biased by 32):
                              low 4 bits: j < 8: scales[j] & 15, j >= 8: scales[j-8] >> 4
                              high 2 bits: (scales[8 + j%4] >> 2*(j//4)) & 3
    bytes 108-109 d           fp16 super-block scale

    q = low2 | 4*highbit (0..7);  weight = (d * (s[j] - 32)) * (q - 4)     (float32, in that order)

Quantize (ggml's quantize_row_q3_K_ref, byte for byte; float32, no FMA):
    per sub-block j of 16 values x: scale_j = make_q3_quants(nmax 4, with refinement):
        i = first index of the largest |x|, max = x[i] (signed); all |x| < 1e-15: scale 0, L = 0;
        L = clamp(nearest_int(-4/max * x), -4, 3); w = x*x; sumlx = sum(w*x*L), suml2 = sum(w*L*L);
        up to 5 passes over i: slx = sumlx - w*x*L_i; if slx > 0: sl2 = suml2 - w*L_i*L_i,
            new = clamp(nearest_int(x*sl2/slx), -4, 3); if new != L_i, slx += w*x*new, sl2 += w*new*new,
            and if sl2 > 0 and slx*slx*suml2 > sumlx*sumlx*sl2 take it (L_i, sumlx, suml2 = new, slx, sl2);
            a pass that changes nothing ends the search; scale = sumlx/suml2 (0 if suml2 <= 0).
    the scale of largest |scale| (first of equals), max_scale; if max_scale == 0: d = 0, scales = 0.
    else iscale = -32/max_scale; s[j] = clamp(int8(nearest_int(iscale*scale_j)), -32, 31) + 32;
        d = fp16(1/iscale).
    then D = fp16value(d)*(s[j] - 32); if D != 0: q = clamp(nearest_int(x/D), -4, 3) + 4, else q stays
    the search's L + 4 (0 for an all-zero sub-block). nearest_int: ggml's round-half-to-even through
    the float32 bits of f + 12582912. A |d| of 65520 or more (fp16 infinity) is a RangeError.

With importance weights qw (ggml's quantize_row_q3_K_impl, `quantize_weighted`):
    sigma2 = 2*sum(x*x over the 256)/256; weight_i = qw_i*sqrt(sigma2 + x_i*x_i); sw_j = sum of a
    sub-block's weights; scale_j = make_qx_quants(nmax 4, weights) (see q6_k.py); the biased 6-bit
    scales and d = fp16(.) come from make_qx_quants(nmax 32, weights sw) over the sixteen scale_j;
    the same final pass.
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.families import parallel_rows

from ._ggml import NONFINITE_ROW, f32_to_f16_bits, has_nonfinite
from ._klanes import qdiv
from ._kquants import (
    F32,
    OVERFLOW_ABS,
    QK_K,
    KQuant,
    f16_bits_to_f32,
    f16_round_np,
    first_big_block,
    make_q3_lanes,
    make_q3_quants_np,
    make_qx_quants,
    make_qx_quants_np,
    nearest_int,
    nearest_int_np,
    quantize_checked,
)

BLOCK_BYTES = 110
RULE = "the super-block scale |max scale|/32 must stay below 65520"

# ---- numpy reference ---------------------------------------------------------------------


def _pack_scales_np(s: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit scales (n, 16), already biased to 0..63 -> the 12 bytes."""
    s = s.astype(np.uint8)
    out = np.empty((s.shape[0], 12), np.uint8)
    out[:, 0:8] = (s[:, 0:8] & 15) | ((s[:, 8:16] & 15) << 4)
    hi = (s >> 4).reshape(-1, 4, 4)  # [j // 4, j % 4]
    out[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return out


def _unpack_scales_np(b: np.ndarray) -> np.ndarray:
    """The 12 bytes (n, 12) -> the sixteen biased scales (n, 16), int64 0..63."""
    b = b.astype(np.int64)
    lo = np.concatenate([b[:, 0:8] & 15, b[:, 0:8] >> 4], axis=1)
    hi = (b[:, None, 8:12] >> (2 * np.arange(4))[None, :, None]) & 3  # [j // 4, j % 4]
    return lo | (hi.reshape(-1, 16) << 4)


def quantize_ref(w: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> bytes, as ggml's quantize_q3_K (quant_weights: ggml's imatrix,
    shape (cols,) or that of w); raises RangeError like the kernel."""
    w = np.ascontiguousarray(w, np.float32)
    x = w.reshape(-1, QK_K)
    n = x.shape[0]
    xs = x.reshape(n * 16, 16)
    with np.errstate(all="ignore"):
        if quant_weights is None:
            scales, L = make_q3_quants_np(xs, 4)
            scales = scales.reshape(n, 16)
            amax = np.zeros(n, np.float32)
            max_scale = np.zeros(n, np.float32)
            for j in range(16):
                a = np.abs(scales[:, j])
                up = a > amax
                amax = np.where(up, a, amax)
                max_scale = np.where(up, scales[:, j], max_scale)
            some = max_scale != 0
            iscale = F32(-32) / max_scale
            l8 = (nearest_int_np(iscale[:, None] * scales) & 255).astype(np.uint8).view(np.int8)  # C's int8
            sc = np.where(some[:, None], np.clip(l8.astype(np.int64), -32, 31) + 32, 0)
            d = np.where(some, F32(1) / iscale, F32(0)).astype(np.float32)
            packed = np.where(some[:, None], _pack_scales_np(sc), 0).astype(np.uint8)
        else:
            qw = np.broadcast_to(np.asarray(quant_weights, np.float32), w.shape).reshape(n * 16, 16)
            sum_x2 = np.zeros(n, np.float32)
            for i in range(QK_K):
                sum_x2 = sum_x2 + x[:, i] * x[:, i]
            sigma2 = F32(2) * sum_x2 / F32(QK_K)
            weights = qw * np.sqrt(np.repeat(sigma2, 16)[:, None] + xs * xs)
            sw = np.zeros(n * 16, np.float32)
            for i in range(16):
                sw = sw + weights[:, i]
            scales, L = make_qx_quants_np(xs, 4, weights)
            d, Ls = make_qx_quants_np(scales.reshape(n, 16), 32, sw.reshape(n, 16))
            packed = _pack_scales_np(Ls)
        bad = ~(np.abs(d) < F32(65520))
        if bad.any():
            blk = int(np.flatnonzero(bad)[0])
            r, b = divmod(blk, w.shape[1] // QK_K)
            raise Q3_K().range_error(w, r, b)
        hd, df = f16_round_np(d)
        dsub = df[:, None] * (_unpack_scales_np(packed) - 32).astype(np.float32)
        Ln = np.clip(nearest_int_np(x.reshape(n, 16, 16) / dsub[..., None]), -4, 3) + 4
        L = np.where(dsub[..., None] != 0, Ln, L.reshape(n, 16, 16)).reshape(n, 8, 32)
    out = np.empty((n, BLOCK_BYTES), np.uint8)
    out[:, 0:32] = ((L > 3).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
    low = (L & 3).astype(np.uint8).reshape(n, 2, 4, 32)
    out[:, 32:96] = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(n, 64)
    out[:, 96:108] = packed
    out[:, 108:110] = hd[:, None].view(np.uint8)
    return out.reshape(-1)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    blk = data.reshape(-1, BLOCK_BYTES)
    n = blk.shape[0]
    d = blk[:, 108:110].copy().view(np.float16).astype(np.float32)
    dl = d * (_unpack_scales_np(blk[:, 96:108]) - 32).astype(np.float32)  # (n, 16)
    low = (blk[:, 32:96].reshape(n, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    high = (blk[:, None, 0:32] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (low.reshape(n, 8, 32).astype(np.int8) - ((1 - high) * 4).astype(np.int8)).astype(np.float32)
    return (dl[..., None] * q.reshape(n, 16, 16)).reshape(rows, cols)


def int_parts(data: np.ndarray, rows: int, cols: int):
    """The weights as ggml's dot product sees them: (qi, sc, mi, dw, mw), see _kquants."""
    blk = data.reshape(-1, BLOCK_BYTES)
    n = blk.shape[0]
    low = (blk[:, 32:96].reshape(n, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    high = (blk[:, None, 0:32] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    qi = (low.reshape(n, 8, 32).astype(np.int8) - ((1 - high) * 4).astype(np.int8))
    sc = (_unpack_scales_np(blk[:, 96:108]) - 32).astype(np.int16)
    dw = blk[:, 108:110].copy().view(np.float16)[:, 0].astype(np.float32)
    nb = cols // QK_K
    return (qi.reshape(rows, nb, QK_K), sc.reshape(rows, nb, 16), np.zeros((rows, nb, 16), np.int16),
            dw.reshape(rows, nb), np.zeros((rows, nb), np.float32))


_QDIV = qdiv(16, False)  # the final pass of a sub-block, one vector division

# ---- numba kernels ---------------------------------------------------------------------------
# Scalar code that follows the C statement by statement; no fastmath (byte-identity).


@numba.njit(cache=True, inline="always")
def _scale(s, j):
    """Biased 6-bit scale j (0..63) from the 12 packed bytes s."""
    lo = (np.int64(s[j]) & 15) if j < 8 else (np.int64(s[j - 8]) >> 4)
    return lo | (((np.int64(s[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)


@numba.njit(cache=True, error_model="numpy")
def _quantize_block(x, qw, out, L, scales, weights, sw, Ls):
    """One super-block x (256,) into out (110,); True if d overflows fp16. qw: importance
    weights of this super-block, or None (a separate compilation: quantize compiles no weighted code)."""
    s = out[96:108]
    for i in range(12):
        s[i] = 0
    if qw is None:
        amax = np.float32(0.0)
        max_scale = np.float32(0.0)
        for j in range(16):  # L and scales: make_q3_lanes over the row (in _quantize_rows)
            v = scales[j]
            if abs(v) > amax:
                amax = abs(v)
                max_scale = v
        if max_scale != 0:
            iscale = np.float32(-32.0) / max_scale
            for j in range(16):
                v = nearest_int(iscale * scales[j]) & 255  # stored in an int8 first: wraps
                v = v - 256 if v > 127 else v
                Ls[j] = min(max(v, -32), 31) + 32
            d = np.float32(1.0) / iscale
        else:
            d = np.float32(0.0)
    else:
        sum_x2 = np.float32(0.0)
        for i in range(QK_K):
            sum_x2 += x[i] * x[i]
        sigma2 = np.float32(2.0) * sum_x2 / np.float32(QK_K)
        for j in range(16):
            sumw = np.float32(0.0)
            for i in range(16):
                xi = x[16 * j + i]
                weights[i] = qw[16 * j + i] * np.float32(np.sqrt(sigma2 + xi * xi))
                sumw += weights[i]
            sw[j] = sumw
            scales[j] = make_qx_quants(x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], 4, weights)
        d = make_qx_quants(scales, Ls, 32, sw)
        max_scale = np.float32(1.0)  # the scales are packed below in any case
    if not (abs(d) < np.float32(65520.0)):
        return True
    if max_scale != 0:
        for j in range(16):
            v = np.int64(Ls[j])
            if j < 8:
                s[j] = np.uint8(v & 15)
            else:
                s[j - 8] = np.uint8(np.int64(s[j - 8]) | ((v & 15) << 4))
            s[8 + j % 4] = np.uint8(np.int64(s[8 + j % 4]) | ((v >> 4) << (2 * (j // 4))))
    hd = f32_to_f16_bits(d)
    out[108] = np.uint8(hd & 0xFF)
    out[109] = np.uint8(hd >> 8)
    df = f16_bits_to_f32(np.int64(hd))
    for j in range(16):
        dj = df * np.float32(_scale(s, j) - 32)
        if dj == 0:
            continue
        _QDIV(x, 16 * j, np.float32(0.0), dj, -4, 3, 4, L, 16 * j)  # L = clamp(nearest_int(x/dj), -4, 3) + 4
    for i in range(32):
        h = 0
        for k in range(8):
            if L[32 * k + i] > 3:
                h |= 1 << k
        out[i] = np.uint8(h)
    for hh in range(2):
        e = 128 * hh
        for i in range(32):
            v = ((np.int64(L[e + i]) & 3) | ((np.int64(L[e + i + 32]) & 3) << 2)
                 | ((np.int64(L[e + i + 64]) & 3) << 4) | ((np.int64(L[e + i + 96]) & 3) << 6))
            out[32 + 32 * hh + i] = np.uint8(v)
    return False


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _quantize_rows(w, qw, out, bad, r0, r1):
    nb = w.shape[1] // QK_K
    L = np.empty(QK_K, np.int8)
    scales = np.empty(16, np.float32)
    weights = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    Ls = np.empty(16, np.int8)
    # without importance weights, the row's 16*nb sub-blocks are searched side by side (element-major),
    # 16 lanes at a time in vector code (make_q3_lanes)
    M = 16 * nb if qw is None else 0  # (qw None or not: decided at compile time)
    xt = np.empty((16, M), np.float32)
    Lt = np.empty((16, M), np.int8)
    sc_all = np.empty(M, np.float32)
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
        if M:
            for k in range(M):
                for i in range(16):
                    xt[i, k] = w[r, 16 * k + i]
            make_q3_lanes(xt, Lt, 4, sc_all)
        for b in range(nb):
            c = b * QK_K
            if M:
                for j in range(16):
                    scales[j] = sc_all[16 * b + j]
                    for i in range(16):
                        L[16 * j + i] = Lt[i, 16 * b + j]
            if qw is None:
                over = _quantize_block(w[r, c : c + QK_K], None, out[r, b], L, scales, weights, sw, Ls)
            else:
                over = _quantize_block(w[r, c : c + QK_K], qw[r, c : c + QK_K], out[r, b], L, scales, weights, sw, Ls)
            if over and bad[r] < 0:
                bad[r] = b


def _quantize_kernel_qw(w, qw, out, bad):
    # Python threads over ~64K-weight row ranges (a call costs ~7 us of dispatch and work space: 16K
    # ranges spent ~5% of the time there), not a parallel=True driver: as fast, and a cold
    # start compiles the deep _quantize_rows chain once instead of twice more (families.parallel_rows).
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, qw, out, bad, weights=65536)


def _quantize_kernel(w, out, bad):
    _quantize_kernel_qw(w, None, out, bad)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, lut, idx, out, k0, k1, half):
    # Loops of `half` (16) known only at run time, 3-D indexing, bit fields split in float (exact).
    nb = blocks.shape[1]
    dl = np.empty(16, np.float32)
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = lut[np.int64(blocks[r, b, 108]) | (np.int64(blocks[r, b, 109]) << 8)]
            for j in range(16):
                dl[j] = d * np.float32(_scale(blocks[r, b, 96:108], j) - 32)
            for hh in range(2):
                for kk in range(4):
                    lsc = np.float32(1.0 / (1 << (2 * kk)))
                    hsc = np.float32(1.0 / (1 << (4 * hh + kk)))
                    for g in range(2):
                        o = b * QK_K + 128 * hh + 32 * kk + 16 * g
                        dj = dl[8 * hh + 2 * kk + g]
                        for i in range(half):
                            v = np.floor(np.float32(blocks[r, b, 32 + 32 * hh + 16 * g + i]) * lsc)
                            lo = v - np.float32(4.0) * np.floor(v * np.float32(0.25))
                            t = np.floor(np.float32(blocks[r, b, 16 * g + i]) * hsc)
                            hb = t - np.float32(2.0) * np.floor(t * np.float32(0.5))
                            out[k, o + i] = dj * (lo - np.float32(4.0) + np.float32(4.0) * hb)


def _dequantize_kernel(blocks, lut, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, lut, idx, out, tail=(16,))


# ---- the format ------------------------------------------------------------------------------


class Q3_K(KQuant):
    tag = "Q3_K"
    ggml_type = "Q3_K"
    block_bytes = BLOCK_BYTES
    overflow_abs = OVERFLOW_ABS  # sums of squares of 16 weights overflow float32 from ~4.6e18: silent zeros
    safe_abs = 2.0e6  # measured worst fp16 scale ~0.012 * max|w|: 2.7x margin
    range_rule = RULE
    summary = "ggml Q3_K: per 256 weights an fp16 d, sixteen 6-bit sub-block scales and 3-bit q; ggml-identical bytes"
    quantize_kernel = staticmethod(_quantize_kernel)
    dequantize_kernel = staticmethod(_dequantize_kernel)
    int_parts = staticmethod(int_parts)
    weighted_kernel = staticmethod(_quantize_kernel_qw)

    def _quantize(self, w):
        return quantize_checked(self, w)  # overflow_abs tested in the row kernel (first_big_block)


@quantfmt.hookimpl
def register_formats(register):
    register(Q3_K())
