"""Q4_K: ggml's 4-bit k-quant, super-blocks of 256 weights (4.5 bits per weight).

Owns the Q4_K layout, its numpy reference, its numba kernels and the Format class.

One super-block = 256 consecutive weights of a row, 144 bytes, eight sub-blocks of 32:

    bytes 0-1     d           fp16: scale of the sub-block scales
    bytes 2-3     dmin        fp16: scale of the sub-block minimums
    bytes 4-15    scales[12]  eight 6-bit scales sc[j] and eight 6-bit minimums m[j]:
                              j < 4:  sc[j] = s[j] & 63,  m[j] = s[j+4] & 63
                              j >= 4: sc[j] = (s[j+4] & 15) | (s[j-4] >> 6) << 4
                                      m[j]  = (s[j+4] >> 4) | (s[j]   >> 6) << 4
    bytes 16-143  qs[128]     4-bit q: sub-blocks 2k and 2k+1 share qs[32k .. 32k+31],
                              element l of sub-block 2k in the low nibble, of 2k+1 in the high

    weight (sub-block j, element l) = (d*sc[j]) * q - (dmin*m[j])     (float32, in that order)

Quantize (ggml's quantize_row_q4_K_ref, byte for byte; float32, no FMA):
    per sub-block j (32 values x):
        av_x = sqrt(sum(x*x) / 32);  weight_i = av_x + |x_i|
        (scale_j, min_j) = make_qkx2_quants(nmax 15, rmin -1, rdelta 0.1, nstep 20, squared error)
            min = min(x, 0); start from iscale = 15/(max-min), L = clamp(nearest_int(iscale*(x-min)), 0, 15);
            then for is = 0..20, iscale = (-1 + 0.1*is + 15)/(max-min): the weighted least-squares
            (scale, min) of x ~ scale*L + min (min clamped to <= 0), kept when its weighted squared
            error is smaller; min_j = -min (>= 0). A flat sub-block (max == min) has scale 0, L = 0.
    max_scale = max_j scale_j, max_min = max_j min_j (both from 0 upwards, strict >)
    sc[j] = min(63, uint8(nearest_int(63/max_scale * scale_j)))   (0 if max_scale <= 0); m[j] likewise
    d = fp16(max_scale/63), dmin = fp16(max_min/63)
    then with the stored values: D = fp16value(d)*sc[j]; if D != 0:
        q = clamp(nearest_int((x + fp16value(dmin)*m[j]) / D), 0, 15); else q stays the search's L.
    nearest_int is ggml's round-half-to-even through the float32 bits of f + 12582912.
    A d or dmin of 65520 or more (fp16 infinity) is a RangeError.

With importance weights qw (ggml's quantize_row_q4_K_impl, `quantize_weighted`):
    sigma2 = 2*sum(x*x over the 256)/256; weight_i = qw_i * sqrt(sigma2 + x_i*x_i);
    sub-block search make_qkx3_quants(rmin -0.9, rdelta 0.05, nstep 36); the 6-bit sc and m come
    from make_qp_quants(nmax 63) over the eight scales (and the eight minimums), weighted by each
    sub-block's sum of weights; d, dmin = fp16 of what make_qp_quants returns; the same final pass.
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.families import parallel_rows

from ._ggml import NONFINITE_ROW, f32_to_f16_bits
from ._klanes import nibbles, qdiv
from ._kquants import (
    F32,
    QK_K,
    REDO,
    KQuant,
    f16_bits_to_f32,
    f16_round_np,
    kq_work,
    nearest_int_np,
    pack_scale_min_k4,
    pack_scale_min_k4_np,
    redo_rows,
    row_nonfinite,
    scale_min_k4,
    scale_min_search,
    scale_min_search_np,
    sms_prep,
    unpack_scale_min_k4_np,
)

BLOCK_BYTES = 144
NMAX = 15
# (rmin, rdelta, nstep) of the sub-block search: ggml's reference quantizer, its weighted one
REF = (-1.0, 0.1, 20)
IMPL = (-0.9, 0.05, 36)
RULE = "the super-block scales max(scale)/63 and max(min)/63 must stay below 65520"

# ---- numpy reference ---------------------------------------------------------------------


def quantize_ref(w: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> bytes, as ggml's quantize_q4_K (quant_weights: ggml's imatrix,
    shape (cols,) or that of w); raises RangeError like the kernel."""
    w = np.ascontiguousarray(w, np.float32)
    x = w.reshape(-1, QK_K)
    qw = None if quant_weights is None else np.broadcast_to(np.asarray(quant_weights, np.float32), w.shape)
    with np.errstate(all="ignore"):
        L, ls, lm, d, dmin = scale_min_search_np(x, None if qw is None else qw.reshape(-1, QK_K), NMAX, REF, IMPL)
        bad = ~((d < F32(65520)) & (dmin < F32(65520)))
        if bad.any():
            blk = int(np.flatnonzero(bad)[0])
            r, b = divmod(blk, w.shape[1] // QK_K)
            raise Q4_K().range_error(w, r, b)
        hd, df = f16_round_np(d)
        hm, dmf = f16_round_np(dmin)
        dsub = df[:, None] * ls.astype(np.float32)
        msub = dmf[:, None] * lm.astype(np.float32)
        xs = x.reshape(-1, 8, 32)
        Ln = np.clip(nearest_int_np((xs + msub[..., None]) / dsub[..., None]), 0, NMAX)
        L = np.where(dsub[..., None] != 0, Ln, L).astype(np.uint8)
    out = np.empty((x.shape[0], BLOCK_BYTES), np.uint8)
    out[:, 0:2] = hd[:, None].view(np.uint8)
    out[:, 2:4] = hm[:, None].view(np.uint8)
    out[:, 4:16] = pack_scale_min_k4_np(ls, lm)
    pairs = L.reshape(-1, 4, 2, 32)
    out[:, 16:] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return out.reshape(-1)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    blk = data.reshape(-1, BLOCK_BYTES)
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blk[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = unpack_scale_min_k4_np(blk[:, 4:16])
    qs = blk[:, 16:].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    ds = (d * sc.astype(np.float32))[..., None]
    ms = (dmin * m.astype(np.float32))[..., None]
    return (ds * q - ms).reshape(rows, cols)


def int_parts(data: np.ndarray, rows: int, cols: int):
    """The weights as ggml's dot product sees them: (qi, sc, mi, dw, mw), see _kquants."""
    blk = data.reshape(-1, BLOCK_BYTES)
    n = blk.shape[0]
    dw = blk[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
    mw = blk[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
    sc, m = unpack_scale_min_k4_np(blk[:, 4:16])
    qs = blk[:, 16:].reshape(n, 4, 1, 32)
    qi = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.int8)
    nb = cols // QK_K
    return (qi.reshape(rows, nb, QK_K), np.repeat(sc, 2, axis=1).astype(np.int16).reshape(rows, nb, 16),
            np.repeat(m, 2, axis=1).astype(np.int16).reshape(rows, nb, 16), dw.reshape(rows, nb), mw.reshape(rows, nb))


_QDIV = qdiv(32, True)  # the final pass of a sub-block, one vector division
_NIBBLES = nibbles("q4")  # its packing, four <32 x i8> vectors

# ---- numba kernels ---------------------------------------------------------------------------
# Scalar code that follows the C statement by statement; no fastmath (byte-identity).


@numba.njit(cache=True, error_model="numpy", inline="always")
def _quantize_block(x, out, L, Lt, k0, ls, lm, d, dmin):
    """One super-block x (256,) into out, given its scale search (scale_min_search: ls, lm, d, dmin,
    and its quants Lt[:, k0 + j] of sub-block j, read where the stored scale is 0); L (256,): work
    space. True if d or dmin overflows fp16."""
    if not (d < np.float32(65520.0) and dmin < np.float32(65520.0)):
        return True
    pack_scale_min_k4(ls, lm, out[4:16])
    hd = f32_to_f16_bits(d)
    hm = f32_to_f16_bits(dmin)
    out[0] = np.uint8(hd & 0xFF)
    out[1] = np.uint8(hd >> 8)
    out[2] = np.uint8(hm & 0xFF)
    out[3] = np.uint8(hm >> 8)
    df = f16_bits_to_f32(np.int64(hd))
    dmf = f16_bits_to_f32(np.int64(hm))
    for j in range(8):
        # ls[j], lm[j] (0..63) are what get_scale_min_k4 reads back from the 12 bytes just packed
        dj = df * np.float32(ls[j])
        if dj == 0:  # ggml keeps the search's L
            for i in range(32):
                L[32 * j + i] = Lt[i, k0 + j]
            continue
        mj = dmf * np.float32(lm[j])
        _QDIV(x, 32 * j, mj, dj, 0, NMAX, 0, L, 32 * j)  # L = clamp(nearest_int((x + mj)/dj), 0, NMAX)
    _NIBBLES(L, out, 16)  # out[16 + 32k + i] = L[64k + i] | L[64k + 32 + i] << 4
    return False


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _rows(w, qw, out, bad, r0, r1, xt, wt, Lt, scales, mins, sw, L, ls, lm, d, dmin, exact=None):
    nb = w.shape[1] // QK_K
    for r in range(r0, r1):
        bad[r] = -1
        # checks_finite: quantize does not scan the tensor first; sms_prep's sums of squares tell when to
        if sms_prep(w, qw, r, xt, wt, sw) and row_nonfinite(w[r]):
            bad[r] = NONFINITE_ROW
            continue
        if scale_min_search(qw, xt, wt, Lt, scales, mins, sw, ls, lm, d, dmin, NMAX,
                            np.float32(REF[0]), np.float32(REF[1]), REF[2],
                            np.float32(IMPL[0]), np.float32(IMPL[1]), IMPL[2], exact):
            bad[r] = REDO
            continue
        for b in range(nb):
            c = b * QK_K
            if _quantize_block(w[r, c : c + QK_K], out[r, b], L, Lt, 8 * b, ls[b], lm[b], d[b], dmin[b]):
                if bad[r] < 0:
                    bad[r] = b


def _quantize_rows(w, qw, out, bad, r0, r1, exact=None):
    """Rows r0..r1-1 (the kernel of parallel_rows and redo_rows), with this thread's work space."""
    if exact is None:  # (omitted, not None: `exact is None` is pruned when _rows is compiled)
        _rows(w, qw, out, bad, r0, r1, *kq_work(w.shape[1] // QK_K))
    else:
        _rows(w, qw, out, bad, r0, r1, *kq_work(w.shape[1] // QK_K), exact)


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
    # 3-D indexing with loop variables and a trip count `half` (32) known only at run time: the loop
    # vectorizes (a constant one would be unrolled into scalar code). The nibble split is done in
    # float (exact), where integer shifts would be widened to int64 by numba.
    nb = blocks.shape[1]
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = lut[np.int64(blocks[r, b, 0]) | (np.int64(blocks[r, b, 1]) << 8)]
            dmin = lut[np.int64(blocks[r, b, 2]) | (np.int64(blocks[r, b, 3]) << 8)]
            for p in range(4):
                sc, m = scale_min_k4(2 * p, blocks[r, b, 4:16])
                d1 = d * np.float32(sc)
                m1 = dmin * np.float32(m)
                sc, m = scale_min_k4(2 * p + 1, blocks[r, b, 4:16])
                d2 = d * np.float32(sc)
                m2 = dmin * np.float32(m)
                o = b * QK_K + 64 * p
                c = 16 + 32 * p
                for i in range(half):
                    v = np.float32(blocks[r, b, c + i])
                    hi = np.floor(v * np.float32(0.0625))
                    lo = v - np.float32(16.0) * hi
                    out[k, o + i] = d1 * lo - m1
                    out[k, o + 32 + i] = d2 * hi - m2


def _dequantize_kernel(blocks, lut, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, lut, idx, out, tail=(32,))


# ---- the format ------------------------------------------------------------------------------


class Q4_K(KQuant):
    tag = "Q4_K"
    ggml_type = "Q4_K"
    block_bytes = BLOCK_BYTES
    safe_abs = 1.0e6  # measured worst fp16 scale ~0.024 * max|w|: 2.7x margin
    range_rule = RULE
    summary = ("ggml Q4_K: per 256 weights fp16 d, dmin and eight 6-bit (scale, min) pairs, 4-bit q; "
               "ggml-identical bytes")
    quantize_kernel = staticmethod(_quantize_kernel)
    dequantize_kernel = staticmethod(_dequantize_kernel)
    int_parts = staticmethod(int_parts)
    weighted_kernel = staticmethod(_quantize_kernel_qw)


@quantfmt.hookimpl
def register_formats(register):
    register(Q4_K())
