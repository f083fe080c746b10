"""Q5_1: ggml's 5-bit format with an fp16 scale and an fp16 minimum per 32 weights (6 bits per weight).

Owns the Q5_1 layout, its numpy reference, its numba kernels and the Format class.

One block = 32 consecutive weights of a row, 24 bytes:

    bytes 0-1    d      fp16, little-endian: the scale
    bytes 2-3    m      fp16, little-endian: the block minimum
    bytes 4-7    qh     uint32, little-endian: bit j = bit 4 (the fifth bit) of q[j], j = 0..31
    bytes 8-23   qs[16] qs[j] = (q[j] & 15) | ((q[j+16] & 15) << 4), as Q5_0
    q = stored value in 0..31

    weight w[j] = d * q[j] + m          (a float32 product, then a float32 sum; no FMA)

Quantize (gguf-py's `quants.Q5_1`, byte for byte; ggml's quantize_row_q5_1_ref):
    min, max = the smallest and largest x
    d   = (max - min) / 31               float32
    id  = 1/d, or 0 if d == 0            float32
    q   = trunc((x - min)*id + 0.5)      three float32 roundings; (x - min)*id <= 31 up to
                                         rounding, so q <= 31 (gguf clips to 31, ggml does not
                                         need to)
    d and m = min are stored as fp16 (round to nearest even); either reaching 65520 in
    magnitude is a RangeError. If id is infinite, (x-min)*id is inf or NaN, which ggml's
    (uint8_t) cast and numpy's cast both turn into 0: q = 0.
    Signed zeros: when the minimum (or, in an all-zero block, the maximum) is a zero and
    the block holds both +0.0 and -0.0, we take the first of them in block order, as
    ggml's C loop does (`if (v < min) min = v`). gguf-py's numpy min/max picks one by its
    SIMD reduction order; only the sign bit of the stored m (or d) can differ.

qmatmul: ggml pairs Q5_1 with Q8_1 activations (ggml_vec_dot_q5_1_q8_1: per block
sumi * (d_w*d_x) + m_w * s_x, s_x = fp16(d_x * sum(q_x))). See plugins/_i8tiles.py.
With importance weights qw (one per column; `quantize_weighted`), ggml's quantize_q5_1 runs
make_qkx3_quants(nmax 31, rmin -0.9, rdelta 0.05, nstep 36, squared errors) instead (float32,
one rounding per operation, sums over j = 0..31 in order; nearest_int rounds half to even):
    sigma2 = (sum of x*x over the whole row, in order) / cols;  wt[j] = qw[j]*sqrt(sigma2 + x*x)
    min, max = first extremes; sum_w = sum wt; sum_x = sum wt*x; if min > 0: min = 0
    max <= min: d = 0, m = min, q = 0
    s = 31/(max - min); d = 1/s; L = clamp(nearest_int(s*(x - min)), 0, 31)
    best = sum wt*((d*L + min) - x)**2
    for k = 0..36: s = ((-0.9f + 0.05f*k) + 31)/(max - min)  [min as updated so far]
        La = clamp(nearest_int(s*(x - min)), 0, 31); sum_l = sum wt*La;
        sum_l2 = sum (wt*La)*La; sum_xl = sum (wt*La)*x; D = sum_w*sum_l2 - sum_l*sum_l
        if D > 0: d' = (sum_w*sum_xl - sum_x*sum_l)/D; m' = (sum_l2*sum_x - sum_l*sum_xl)/D
            if m' > 0: m' = 0, d' = sum_xl/sum_l2
            e = sum wt*((d'*La + m') - x)**2; if e < best: L = La, best = e, d = d', min = m'
    store fp16(d), m = fp16(min), q = L (RangeError as above).
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.families import GGMLFormat, parallel_rows

from ._ggml import NONFINITE_ROW, QK, f32_to_f16_bits, fp16_table, has_nonfinite, vec_dot_ref
from ._i8tiles import matvec_fn, prepare_int8, qmatmul_int8, qmatmul_path
from ._weighted import ImportanceWeighted, current_weights, nearest_int, nearest_int_ref, row_sigma2, row_sigma2_ref

BLOCK_BYTES = 24
RULE = "needs max - min below 2031120 (= 65520*31) and |min| below 65520"

# ---- numpy reference ----------------------------------------------------------------------


def _first_extreme(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The element equal to v (per block) that comes first: fixes the sign of a zero extreme."""
    i = (x == v[:, None]).argmax(axis=-1)
    return x[np.arange(x.shape[0]), i]


def quantize_ref(w: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> bytes; quant_weights (cols,) or None; raises RangeError like the kernel."""
    if quant_weights is not None:
        return quantize_weighted_ref(w, quant_weights)
    x = np.ascontiguousarray(w, np.float32).reshape(-1, QK)
    mn = _first_extreme(x, x.min(axis=-1))
    mx = _first_extreme(x, x.max(axis=-1))
    with np.errstate(over="ignore"):
        d = (mx - mn) / np.float32(31)
    bad = ~((d < np.float32(65520)) & (np.abs(mn) < np.float32(65520)))
    if bad.any():
        r, b = divmod(int(np.flatnonzero(bad)[0]), w.shape[1] // QK)
        raise Q5_1().range_error(w, r, b)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        idd = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        t = np.trunc((x - mn[:, None]) * idd[:, None] + np.float32(0.5))
    t[~((t >= 0) & (t < 256))] = 0  # inf/NaN: both casts give 0
    q = np.minimum(t, 31).astype(np.uint8)
    out = np.empty((x.shape[0], BLOCK_BYTES), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    out[:, 2:4] = mn.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    out[:, 4:8] = np.packbits(q >> 4, axis=-1, bitorder="little")
    out[:, 8:] = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    return out.reshape(-1)


def _acc(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in order (j = 0, 1, ...), in float32, from +0.0 as ggml's loops start (all
    -0.0 terms sum to +0.0; the trailing + 0 changes no other sum)."""
    return np.add.accumulate(a, axis=-1, dtype=np.float32)[..., -1] + np.float32(0)


def _make_qkx3_ref(x: np.ndarray, wt: np.ndarray):
    """ggml's make_qkx3_quants(32, nmax=31, x, wt, L, &min, Laux, -0.9f, 0.05f, 36, false) on
    blocks x, wt (n, 32): (d (n,), m (n,), q uint8 (n, 32))."""
    mn = _first_extreme(x, x.min(axis=-1))
    mx = _first_extreme(x, x.max(axis=-1))
    sum_w = _acc(wt)
    # ggml starts this sum at w[0]*x[0], not at 0: a block whose weighted values are all -0.0 sums to -0.0
    # (found by tests/test_ggml_new_formats.py's hypothesis test: then m's sign differed from the kernel's)
    sum_x = np.add.accumulate(wt * x, axis=-1, dtype=np.float32)[..., -1]
    mn = np.where(mn > 0, np.float32(0), mn).astype(np.float32)
    flat = ~(mx > mn)  # max <= min: L = 0, d = 0, m = min
    mx = np.where(flat, mn + np.float32(1), mx).astype(np.float32)  # keeps skipped blocks finite
    iscale = np.float32(31) / (mx - mn)
    scale = (np.float32(1) / iscale).astype(np.float32)
    L = np.clip(nearest_int_ref(iscale[:, None] * (x - mn[:, None])), 0, 31)
    lf = L.astype(np.float32)
    diff = (scale[:, None] * lf + mn[:, None]) - x
    best_mad = _acc(wt * (diff * diff))
    for step in range(37):
        iscale = ((np.float32(-0.9) + np.float32(0.05) * np.float32(step)) + np.float32(31)) / (mx - mn)
        la = np.clip(nearest_int_ref(iscale[:, None] * (x - mn[:, None])), 0, 31)
        lf = la.astype(np.float32)
        wl = wt * lf
        sum_l, sum_l2, sum_xl = _acc(wl), _acc(wl * lf), _acc(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, np.float32(0), this_min).astype(np.float32)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(np.float32)
        diff = (this_scale[:, None] * lf + this_min[:, None]) - x
        mad = _acc(wt * (diff * diff))
        upd = (D > 0) & (mad < best_mad)
        L = np.where(upd[:, None], la, L)
        best_mad = np.where(upd, mad, best_mad).astype(np.float32)
        scale = np.where(upd, this_scale, scale).astype(np.float32)
        mn = np.where(upd, this_min, mn).astype(np.float32)
    d = np.where(flat, np.float32(0), scale).astype(np.float32)
    return d, mn, np.where(flat[:, None], 0, L).astype(np.uint8)


def quantize_weighted_ref(w: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    """ggml's quantize_q5_1 with importance weights (one per column); raises RangeError."""
    rows, cols = w.shape
    x = np.ascontiguousarray(w, np.float32)
    with np.errstate(all="ignore"):
        sigma2 = row_sigma2_ref(x)
        qw = np.asarray(quant_weights, np.float32)[None, :]
        wt = (qw * np.sqrt(sigma2[:, None] + x * x)).astype(np.float32)
        d, mn, q = _make_qkx3_ref(x.reshape(-1, QK), wt.reshape(-1, QK))
    bad = ~((np.abs(d) < np.float32(65520)) & (np.abs(mn) < np.float32(65520)))
    if bad.any():
        r, b = divmod(int(np.flatnonzero(bad)[0]), cols // QK)
        raise Q5_1().range_error(w, r, b)
    out = np.empty((q.shape[0], BLOCK_BYTES), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    out[:, 2:4] = mn.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    out[:, 4:8] = np.packbits(q >> 4, axis=-1, bitorder="little")
    out[:, 8:] = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    return out.reshape(-1)


def unpack(data: np.ndarray, rows: int, cols: int):
    """Q5_1 bytes -> (q uint8 (rows, nb, 32) in 0..31, d, m float32 (rows, nb))."""
    blk = data.reshape(rows, cols // QK, BLOCK_BYTES)
    lut = fp16_table()
    d = lut[blk[..., 0].astype(np.uint16) | (blk[..., 1].astype(np.uint16) << 8)]
    m = lut[blk[..., 2].astype(np.uint16) | (blk[..., 3].astype(np.uint16) << 8)]
    hi = np.unpackbits(blk[..., 4:8], axis=-1, bitorder="little")
    lo = np.concatenate([blk[..., 8:] & 15, blk[..., 8:] >> 4], axis=-1)
    return lo | (hi << 4), d, m


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    q, d, m = unpack(data, rows, cols)
    return (d[..., None] * q.astype(np.float32) + m[..., None]).reshape(rows, cols)


def qmatmul_q8_ref(data: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_q5_1_q8_1: sum over blocks of sumi * (d_w*d_x) + m_w * s_x, with
    sumi = sum(q_w * q_x)."""
    q, d, m = unpack(data, rows, cols)
    return vec_dot_ref(q, d, x, m)


# ---- numba kernels ------------------------------------------------------------------------
# No fastmath in quantize/dequantize (FMA would change last bits).


@numba.njit(cache=True, nogil=True)
def _quantize_plain_rows(w, out, bad, r0, r1):
    # Rows r0..r1-1 of w (float32) into out (rows, nb, 24).
    nb = w.shape[1] // 32
    q = np.empty(32, np.uint8)
    for r in range(r0, r1):
        bad[r] = -1
        if has_nonfinite(w[r]):  # (checks_finite: quantize does not scan the tensor first)
            bad[r] = NONFINITE_ROW
            continue
        wr = w[r]  # the row's view, once (as Q4_1's _quantize_rows)
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
            d = (mx - mn) / np.float32(31.0)
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
            qh = np.uint32(0)
            for j in range(32):
                t = np.floor((xb[j] - mn) * idd + np.float32(0.5))
                t = min(t, np.float32(31.0)) if (t >= 0 and t < 256) else np.float32(0.0)
                q[j] = np.uint8(t)
                qh |= np.uint32(q[j] >> 4) << np.uint32(j)
            o[4] = np.uint8(qh & 0xFF)
            o[5] = np.uint8((qh >> 8) & 0xFF)
            o[6] = np.uint8((qh >> 16) & 0xFF)
            o[7] = np.uint8(qh >> 24)
            for j in range(16):
                o[8 + j] = np.uint8((q[j] & 15) | ((q[j + 16] & 15) << 4))


def _quantize_plain_kernel(w, out, bad):
    # Python threads over ~1M-weight row ranges, not a parallel=True driver: as fast, and a cold start
    # compiles the row kernel once instead of ~2x its cost (see q4_1._quantize_kernel, families.parallel_rows).
    parallel_rows(_quantize_plain_rows, w.shape[0], w.shape[1], w, out, bad, weights=1 << 20)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _quantize_rows_weighted(w, qw, out, bad, r0, r1):
    # ggml's quantize_row_q5_1_impl with quant_weights (make_qkx3_quants), see quantize_weighted_ref.
    # error_model="numpy": a division by zero gives inf/NaN as in C, not ZeroDivisionError (sum_xl /
    # sum_l2 with every weight of the levels' lanes 0: that candidate's error is NaN and loses)
    nb = w.shape[1] // 32
    wt = np.empty(32, np.float32)
    L = np.empty(32, np.int64)
    la = np.empty(32, np.int64)
    for r in range(r0, r1):
        bad[r] = -1
        if has_nonfinite(w[r]):  # (checks_finite: quantize does not scan the tensor first)
            bad[r] = NONFINITE_ROW
            continue
        sigma2 = row_sigma2(w, r)
        for b in range(nb):
            xb = w[r, b * 32 : b * 32 + 32]
            for j in range(32):
                wt[j] = qw[b * 32 + j] * np.sqrt(sigma2 + xb[j] * xb[j])
            mn = xb[0]
            mx = xb[0]
            sum_w = wt[0]
            sum_x = sum_w * xb[0]
            for j in range(1, 32):
                if xb[j] < mn:
                    mn = xb[j]
                if xb[j] > mx:
                    mx = xb[j]
                sum_w += wt[j]
                sum_x += wt[j] * xb[j]
            if mn > 0:
                mn = np.float32(0.0)
            scale = np.float32(0.0)
            if not (mx > mn):
                for j in range(32):
                    L[j] = 0
            else:
                iscale = np.float32(31.0) / (mx - mn)
                scale = np.float32(1.0) / iscale
                best_mad = np.float32(0.0)
                for j in range(32):
                    L[j] = max(0, min(31, nearest_int(iscale * (xb[j] - mn))))
                    diff = (scale * np.float32(L[j]) + mn) - xb[j]
                    best_mad += wt[j] * (diff * diff)
                for step in range(37):
                    iscale = ((np.float32(-0.9) + np.float32(0.05) * np.float32(step)) + np.float32(31.0)) / (mx - mn)
                    sum_l = np.float32(0.0)
                    sum_l2 = np.float32(0.0)
                    sum_xl = np.float32(0.0)
                    for j in range(32):
                        la[j] = max(0, min(31, nearest_int(iscale * (xb[j] - mn))))
                        wl = wt[j] * np.float32(la[j])
                        sum_l += wl
                        sum_l2 += wl * np.float32(la[j])
                        sum_xl += wl * xb[j]
                    D = sum_w * sum_l2 - sum_l * sum_l
                    if D > 0:
                        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
                        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
                        if this_min > 0:
                            this_min = np.float32(0.0)
                            this_scale = sum_xl / sum_l2
                        mad = np.float32(0.0)
                        for j in range(32):
                            diff = (this_scale * np.float32(la[j]) + this_min) - xb[j]
                            mad += wt[j] * (diff * diff)
                        if mad < best_mad:
                            for j in range(32):
                                L[j] = la[j]
                            best_mad = mad
                            scale = this_scale
                            mn = this_min
            if not (abs(scale) < np.float32(65520.0) and abs(mn) < np.float32(65520.0)):
                if bad[r] < 0:
                    bad[r] = b
                continue
            hd = f32_to_f16_bits(scale)
            hm = f32_to_f16_bits(mn)
            o = out[r, b]
            o[0] = np.uint8(hd & 0xFF)
            o[1] = np.uint8(hd >> 8)
            o[2] = np.uint8(hm & 0xFF)
            o[3] = np.uint8(hm >> 8)
            qh = np.uint32(0)
            for j in range(32):
                qh |= np.uint32(L[j] >> 4) << np.uint32(j)
            o[4] = np.uint8(qh & 0xFF)
            o[5] = np.uint8((qh >> 8) & 0xFF)
            o[6] = np.uint8((qh >> 16) & 0xFF)
            o[7] = np.uint8(qh >> 24)
            for j in range(16):
                o[8 + j] = np.uint8((L[j] & 15) | ((L[j + 16] & 15) << 4))


def _quantize_weighted_kernel(w, qw, out, bad):
    # Python threads over row ranges, not a parallel=True driver: as fast, and a cold start
    # compiles the row kernel once (see families.parallel_rows).
    parallel_rows(_quantize_rows_weighted, w.shape[0], w.shape[1], w, qw, out, bad, weights=32768)


def _quantize_kernel(w, out, bad):
    qw = current_weights()
    if qw is None:
        _quantize_plain_kernel(w, out, bad)
    else:
        _quantize_weighted_kernel(w, qw, out, bad)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, lut, idx, out, k0, k1, half):
    nb = blocks.shape[1]
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = lut[np.int32(blocks[r, b, 0]) | (np.int32(blocks[r, b, 1]) << 8)]
            m = lut[np.int32(blocks[r, b, 2]) | (np.int32(blocks[r, b, 3]) << 8)]
            qh = (
                np.int64(blocks[r, b, 4])
                | (np.int64(blocks[r, b, 5]) << 8)
                | (np.int64(blocks[r, b, 6]) << 16)
                | (np.int64(blocks[r, b, 7]) << 24)
            )
            for j in range(half):
                v = np.float32(blocks[r, b, 8 + j])
                hi = np.floor(v * np.float32(0.0625))
                lo = v - np.float32(16.0) * hi
                b0 = np.float32(((qh >> j) & 1) * 16)
                b1 = np.float32(((qh >> (j + 16)) & 1) * 16)
                out[k, b * 32 + j] = d * (lo + b0) + m
                out[k, b * 32 + 16 + j] = d * (hi + b1) + m


def _dequantize_kernel(blocks, lut, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, lut, idx, out, tail=(16,))


# ---- the format ---------------------------------------------------------------------------


class Q5_1(ImportanceWeighted, GGMLFormat):
    tag = "Q5_1"
    rows_independent = True  # per-block scales; sigma2 (weighted) is per row
    version = 1
    ggml_type = "Q5_1"
    vec_dot_type = "Q8_1"
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    modes = ("f32", "q8_0")
    max_abs = 65520.0  # a block whose minimum is -65520 or less; any block below it in magnitude fits
    range_rule = RULE
    summary = "ggml Q5_1: per 32 weights fp16 scale d and min m, 5-bit q, w = d*q + m; gguf-identical bytes"
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # each row kernel flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)

    def prepare(self, data, rows, cols):
        q, d, m = unpack(data, rows, cols)
        return prepare_int8(q.view(np.int8), d, m)

    def _qmatmul(self, prep, rows, cols, x, mode):
        return qmatmul_int8(prep, x, mode, self.tag)

    def matvec_fn(self, prep, rows, cols, mode):
        return matvec_fn(prep, rows, cols, mode)

    def kernel_path(self, op, n=1, mode="f32"):
        return qmatmul_path(op, n, mode)


@quantfmt.hookimpl
def register_formats(register):
    register(Q5_1())
