"""Q5_0: ggml's 5-bit format with one fp16 scale per 32 weights (5.5 bits per weight).

Owns the Q5_0 layout, its numpy reference, its numba kernels and the Format class.

One block = 32 consecutive weights of a row, 22 bytes:

    bytes 0-1    d      fp16, little-endian: the scale
    bytes 2-5    qh     uint32, little-endian: bit j = bit 4 (the fifth bit) of q[j], j = 0..31
    bytes 6-21   qs[16] qs[j] = (q[j] & 15) | ((q[j+16] & 15) << 4): the low four bits of
                        element j in the low nibble of byte j, of element j+16 in the high one
    q = stored value in 0..31

    weight w[j] = d * (q[j] - 16)

Quantize (gguf-py's `quants.Q5_0`, byte for byte; ggml's quantize_row_q5_0_ref):
    i   = first index of the largest |x|;  max = x[i]  (signed: the scale is negative when
          the largest magnitude is positive, so that value maps to q = 0, i.e. -16*d)
    d   = max / -16                         float32
    id  = 1/d, or 0 if d == 0               float32
    q   = min(31, trunc(x*id + 16.5))       two float32 roundings, never an FMA; x*id >= -16
                                            up to rounding, so the sum is >= 0.49 and trunc
                                            is the floor; the value opposite the max can reach
                                            32.5 and is clipped to 31
    d is stored as fp16 (round to nearest even). |max| >= 1048320 (= 65520*16) makes d
    round to fp16 infinity: a RangeError. When |d| underflows fp16 the stored scale is 0
    (or subnormal) while q still comes from the float32 id, exactly as gguf and ggml do.
    If id is infinite (|max| < 2**-124), x*id is +-inf or NaN; ggml's (int8_t) cast and
    numpy's cast both give 0 there: q = 0.
    A zero block: d = 0, id = 0, q = trunc(16.5) = 16 everywhere (qh = 0xFFFFFFFF).

qmatmul: ggml pairs Q5_0 with Q8_0 activations (ggml_vec_dot_q5_0_q8_0: per block the
integer dot of (q - 16) with the activation quants, times d_w*d_x). See plugins/_i8tiles.py.
With importance weights qw (one per column; `quantize_weighted`), ggml's quantize_q5_0 runs
make_qx_quants instead (float32, one rounding per operation, sums over j = 0..31 in order):
    sigma2 = (sum of x*x over the whole row, in order) / cols
    wt[j]  = qw[j] * sqrt(sigma2 + x[j]*x[j])
    max    = the signed first largest |x|; if its |x| < 1e-15: d = 0, q = 0 everywhere
    fit(s) : l[j] = clamp(nearest_int(s*x[j]), -16, 15) (nearest_int: round half to even, by
             adding 1.5*2**23); sumlx += (wt*x)*l; suml2 += (wt*l)*l
    s = -16/max; fit(s); d = sumlx/suml2 (0 if suml2 == 0); best = d*sumlx
    for k = -9..9 except 0: s' = -(16 + 0.1f*k)/max; fit(s'); if suml2 > 0 and
             sumlx*sumlx > best*suml2: s = s', d = sumlx/suml2, best = d*sumlx
    q[j] = l[j] + 16 from the final s; d stored as fp16 (RangeError as above).
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.families import GGMLFormat, parallel_rows

from ._ggml import NONFINITE_ROW, QK, f32_to_f16_bits, fp16_table, has_nonfinite, vec_dot_ref
from ._i8tiles import matvec_fn, prepare_int8, qmatmul_int8, qmatmul_path
from ._weighted import ImportanceWeighted, current_weights, nearest_int, nearest_int_ref, row_sigma2, row_sigma2_ref

BLOCK_BYTES = 22
GROUP_MAX_EPS = np.float32(1e-15)
RULE = "a block's max |w| must stay below 1048320 (= 65520*16)"

# ---- numpy reference: the formulas above, one block per row of a (n_blocks, 32) array ----


def quantize_ref(w: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> bytes; quant_weights (cols,) or None; raises RangeError like the kernel."""
    if quant_weights is not None:
        return quantize_weighted_ref(w, quant_weights)
    x = np.ascontiguousarray(w, np.float32).reshape(-1, QK)
    imax = np.abs(x).argmax(axis=-1)  # the first of equal maxima, as ggml's strict `<`
    mx = x[np.arange(x.shape[0]), imax]
    d = mx / np.float32(-16)
    bad = ~(np.abs(d) < np.float32(65520))
    if bad.any():
        r, b = divmod(int(np.flatnonzero(bad)[0]), w.shape[1] // QK)
        raise Q5_0().range_error(w, r, b)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        idd = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        t = np.trunc(x * idd[:, None] + np.float32(16.5))
    t[~((t >= 0) & (t < 256))] = 0  # inf/NaN: both casts give 0
    q = np.minimum(t, 31).astype(np.uint8)
    return pack(d, q)


def _make_qx_ref(x: np.ndarray, wt: np.ndarray):
    """ggml's make_qx_quants(32, nmax=16, x, L, rmse_type=1, wt) on blocks x, wt (n, 32):
    (scale d (n,), q = L + 16 uint8 (n, 32))."""
    n = x.shape[0]
    mx = x[np.arange(n), np.abs(x).argmax(axis=1)]
    small = np.abs(mx) < GROUP_MAX_EPS
    mxs = np.where(small, np.float32(1), mx)  # keeps the arithmetic of skipped blocks finite

    def fit(iscale):
        ll = np.clip(nearest_int_ref(iscale[:, None] * x), -16, 15)
        lf = ll.astype(np.float32)
        # ggml's sums start from +0.0: a block whose every term is -0.0 sums to +0.0, not -0.0 (the
        # trailing + 0 does exactly that and changes no other sum)
        sumlx = np.add.accumulate((wt * x) * lf, axis=1, dtype=np.float32)[:, -1] + np.float32(0)
        suml2 = np.add.accumulate((wt * lf) * lf, axis=1, dtype=np.float32)[:, -1] + np.float32(0)
        return ll, sumlx, suml2

    L, sumlx, suml2 = fit(np.float32(-16) / mxs)
    scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0)).astype(np.float32)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        ll, sumlx, suml2 = fit(-(np.float32(16) + np.float32(0.1) * np.float32(step)) / mxs)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better[:, None], ll, L)
        scale = np.where(better, sumlx / suml2, scale).astype(np.float32)
        best = np.where(better, scale * sumlx, best).astype(np.float32)
    return np.where(small, np.float32(0), scale).astype(np.float32), np.where(small[:, None], 0, L + 16).astype(
        np.uint8
    )


def quantize_weighted_ref(w: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    """ggml's quantize_q5_0 with importance weights (one per column); raises RangeError."""
    rows, cols = w.shape
    x = np.ascontiguousarray(w, np.float32)
    with np.errstate(all="ignore"):
        sigma2 = row_sigma2_ref(x)
        qw = np.asarray(quant_weights, np.float32)[None, :]
        wt = (qw * np.sqrt(sigma2[:, None] + x * x)).astype(np.float32)
        d, q = _make_qx_ref(x.reshape(-1, QK), wt.reshape(-1, QK))
    bad = ~(np.abs(d) < np.float32(65520))
    if bad.any():
        r, b = divmod(int(np.flatnonzero(bad)[0]), cols // QK)
        raise Q5_0().range_error(w, r, b)
    return pack(d, q)


def pack(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float32 scales (n,) and values q uint8 (n, 32) in 0..31 -> Q5_0 bytes."""
    out = np.empty((q.shape[0], BLOCK_BYTES), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    out[:, 2:6] = np.packbits(q >> 4, axis=-1, bitorder="little")
    out[:, 6:] = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    return out.reshape(-1)


def unpack(data: np.ndarray, rows: int, cols: int):
    """Q5_0 bytes -> (q uint8 (rows, nb, 32) in 0..31, d float32 (rows, nb))."""
    blk = data.reshape(rows, cols // QK, BLOCK_BYTES)
    d = fp16_table()[blk[..., 0].astype(np.uint16) | (blk[..., 1].astype(np.uint16) << 8)]
    hi = np.unpackbits(blk[..., 2:6], axis=-1, bitorder="little")
    lo = np.concatenate([blk[..., 6:] & 15, blk[..., 6:] >> 4], axis=-1)
    return lo | (hi << 4), d


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    q, d = unpack(data, rows, cols)
    return (d[..., None] * (q.astype(np.float32) - np.float32(16))).reshape(rows, cols)


def qmatmul_q8_ref(data: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_q5_0_q8_0 for every (activation row, weight row): per block
    sumi = sum((q_w - 16) * q_x), then sum over blocks of sumi * (d_w * d_x)."""
    q, d = unpack(data, rows, cols)
    return vec_dot_ref(q.astype(np.int64) - 16, d, x)


# ---- numba kernels ------------------------------------------------------------------------
# As Q4_0's (plugins/q4_0.py): run-time trip counts so the loops vectorize, the first
# largest |x| by int32 reductions over the bits of |x|. No fastmath in quantize/dequantize:
# FMA would change last bits.


@numba.njit(cache=True, nogil=True)
def _quantize_rows(w, out, bad, r0, r1):
    nb = w.shape[1] // 32
    qk = w.shape[1] // nb  # 32, hidden from LLVM (see q4_0._quantize_rows)
    q = np.empty(32, np.uint8)
    for r in range(r0, r1):
        bad[r] = -1
        for b in range(nb):
            c0 = b * 32
            amax = np.int32(0)
            for j in range(qk):
                a = np.float32(abs(w[r, c0 + j])).view(np.int32)
                amax = a if a > amax else amax
            if amax >= np.int32(0x7F800000):  # |bits| of NaN/inf (checks_finite: no scan before)
                bad[r] = NONFINITE_ROW
                break
            first = np.int32(32)
            for j in range(qk):
                a = np.float32(abs(w[r, c0 + j])).view(np.int32)
                cand = np.int32(j) if a == amax else np.int32(32)
                first = cand if cand < first else first
            d = w[r, c0 + first] / np.float32(-16.0)
            if not (abs(d) < np.float32(65520.0)):
                if bad[r] < 0:
                    bad[r] = b
                continue
            idd = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            h = f32_to_f16_bits(d)
            out[r, b, 0] = np.uint8(h & 0xFF)
            out[r, b, 1] = np.uint8(h >> 8)
            for j in range(qk):
                t = np.floor(w[r, c0 + j] * idd + np.float32(16.5))
                # floor == trunc on the valid range (t >= 0); inf and NaN become 0 like the casts
                t = min(t, np.float32(31.0)) if (t >= 0 and t < 256) else np.float32(0.0)
                q[j] = np.uint8(t)
            qh = np.uint32(0)
            for j in range(32):
                qh |= np.uint32(q[j] >> 4) << np.uint32(j)
            out[r, b, 2] = np.uint8(qh & 0xFF)
            out[r, b, 3] = np.uint8((qh >> 8) & 0xFF)
            out[r, b, 4] = np.uint8((qh >> 16) & 0xFF)
            out[r, b, 5] = np.uint8(qh >> 24)
            for j in range(16):
                out[r, b, 6 + j] = np.uint8((q[j] & 15) | ((q[j + 16] & 15) << 4))


@numba.njit(cache=True)
def _fit_qx(xb, wt, iscale):
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for j in range(32):
        lf = np.float32(max(-16, min(15, nearest_int(iscale * xb[j]))))
        sumlx += (wt[j] * xb[j]) * lf
        suml2 += (wt[j] * lf) * lf
    return sumlx, suml2


@numba.njit(cache=True, nogil=True)
def _quantize_rows_weighted(w, qw, out, bad, r0, r1):
    # ggml's quantize_row_q5_0_impl with quant_weights (make_qx_quants), see quantize_weighted_ref
    nb = w.shape[1] // 32
    wt = np.empty(32, np.float32)
    q = np.empty(32, np.uint8)
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
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(32):
                if abs(xb[j]) > amax:
                    amax = abs(xb[j])
                    mx = xb[j]
            scale = np.float32(0.0)
            iscale = np.float32(0.0)
            if amax < GROUP_MAX_EPS:
                for j in range(32):
                    q[j] = 0
            else:
                iscale = np.float32(-16.0) / mx
                sumlx, suml2 = _fit_qx(xb, wt, iscale)
                scale = sumlx / suml2 if suml2 != 0 else np.float32(0.0)
                best = scale * sumlx
                for step in range(-9, 10):
                    if step == 0:
                        continue
                    isc = -(np.float32(16.0) + np.float32(0.1) * np.float32(step)) / mx
                    sumlx, suml2 = _fit_qx(xb, wt, isc)
                    if suml2 > 0 and sumlx * sumlx > best * suml2:
                        iscale = isc
                        scale = sumlx / suml2
                        best = scale * sumlx
                for j in range(32):  # the L of the winning iscale
                    q[j] = np.uint8(max(-16, min(15, nearest_int(iscale * xb[j]))) + 16)
            if not (abs(scale) < np.float32(65520.0)):
                if bad[r] < 0:
                    bad[r] = b
                continue
            h = f32_to_f16_bits(scale)
            out[r, b, 0] = np.uint8(h & 0xFF)
            out[r, b, 1] = np.uint8(h >> 8)
            qh = np.uint32(0)
            for j in range(32):
                qh |= np.uint32(q[j] >> 4) << np.uint32(j)
            out[r, b, 2] = np.uint8(qh & 0xFF)
            out[r, b, 3] = np.uint8((qh >> 8) & 0xFF)
            out[r, b, 4] = np.uint8((qh >> 16) & 0xFF)
            out[r, b, 5] = np.uint8(qh >> 24)
            for j in range(16):
                out[r, b, 6 + j] = np.uint8((q[j] & 15) | ((q[j + 16] & 15) << 4))


def _quantize_weighted_kernel(w, qw, out, bad):
    # Python threads over row ranges, not a parallel=True driver: as fast, and a cold start
    # compiles the row kernel once (see families.parallel_rows).
    parallel_rows(_quantize_rows_weighted, w.shape[0], w.shape[1], w, qw, out, bad, weights=32768)


def _quantize_plain_kernel(w, out, bad):
    # Python threads over row ranges, not a parallel=True driver: as fast, and a cold start
    # compiles the row kernel once (see families.parallel_rows).
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, out, bad)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, lut, idx, out, k0, k1, half):
    nb = blocks.shape[1]
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = lut[np.int32(blocks[r, b, 0]) | (np.int32(blocks[r, b, 1]) << 8)]
            qh = (
                np.int64(blocks[r, b, 2])
                | (np.int64(blocks[r, b, 3]) << 8)
                | (np.int64(blocks[r, b, 4]) << 16)
                | (np.int64(blocks[r, b, 5]) << 24)
            )
            for j in range(half):
                v = np.float32(blocks[r, b, 6 + j])
                hi = np.floor(v * np.float32(0.0625))
                lo = v - np.float32(16.0) * hi
                # the fifth bits as 16 (or 0); value - 16 is exact, then one product, as gguf
                b0 = np.float32(((qh >> j) & 1) * 16)
                b1 = np.float32(((qh >> (j + 16)) & 1) * 16)
                out[k, b * 32 + j] = d * (lo + b0 - np.float32(16.0))
                out[k, b * 32 + 16 + j] = d * (hi + b1 - np.float32(16.0))


def _dequantize_kernel(blocks, lut, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, lut, idx, out, tail=(16,))


# ---- the format ---------------------------------------------------------------------------


def _quantize_kernel(w, out, bad):
    qw = current_weights()
    if qw is None:
        _quantize_plain_kernel(w, out, bad)
    else:
        _quantize_weighted_kernel(w, qw, out, bad)


class Q5_0(ImportanceWeighted, GGMLFormat):
    tag = "Q5_0"
    rows_independent = True  # per-block scales; sigma2 (weighted) is per row
    version = 1
    ggml_type = "Q5_0"
    vec_dot_type = "Q8_0"
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    modes = ("f32", "q8_0")
    max_abs = 1048320.0
    range_rule = RULE
    summary = "ggml Q5_0: per 32 weights an fp16 scale d and 5-bit q, w = d*(q-16); gguf-identical bytes"
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # each row kernel flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)

    def prepare(self, data, rows, cols):
        q, d = unpack(data, rows, cols)
        return prepare_int8(q.view(np.int8) - np.int8(16), d)

    def _qmatmul(self, prep, rows, cols, x, mode):
        return qmatmul_int8(prep, x, mode, self.tag)

    def matvec_fn(self, prep, rows, cols, mode):
        return matvec_fn(prep, rows, cols, mode)

    def kernel_path(self, op, n=1, mode="f32"):
        return qmatmul_path(op, n, mode)


@quantfmt.hookimpl
def register_formats(register):
    register(Q5_0())
