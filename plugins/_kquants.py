"""Shared pieces of ggml's k-quants (Q2_K..Q6_K): super-blocks of 256 weights.

Owns the scale searches of ggml's reference quantizers (ggml-quants.c), twice: as numpy
functions vectorized over many sub-blocks at once (the reference implementations of the
format modules) and as scalar numba functions on one sub-block (the kernels). Both follow
ggml's C code operation by operation in float32: sums run in element order, every product
and sum is rounded on its own (no FMA), products are grouped left to right as C groups
`a*b*c`. The numpy versions walk the elements of a sub-block in order and vectorize across
sub-blocks, so their sums have ggml's order too.

    nearest_int(f)     ggml's rounding: bits of f + 12582912.0f (= 1.5 * 2**23) minus that
                       constant's bits; for |f| < 2**22 this is round-half-to-even, and for
                       anything else it is the same bit arithmetic as ggml's (release build)
    make_qkx2_quants   asymmetric (scale, min) search (make_qkx2_lanes: many sub-blocks in lock step,
                       each lane in ggml's order; the kernels use it): 4-/5-bit sub-blocks of Q4_K/Q5_K and
                       the 2-bit ones of Q2_K (ggml's quantize_row_q{2,4,5}_K_ref)
    make_qkx3_quants   the same with importance weights (quantize_row_q{2,4,5}_K_impl)
    make_qx_quants     symmetric scale search of Q6_K (and of Q3_K with importance weights);
                       make_qx_lanes: Q6_K's sixteen sub-blocks in lock step
    make_q3_quants     symmetric scale search of Q3_K with the coordinate-descent refinement
    make_qp_quants     the super-block scales of the importance-weighted Q2_K/Q4_K/Q5_K
    the 6-bit packing of Q4_K/Q5_K's eight (scale, min) pairs into 12 bytes

This module is private (its name starts with "_"), so the registry does not load it.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from quantfmt.families import GGMLFormat, parallel_rows, prefill_path
from quantfmt.format import nonfinite_rows

from ._klanes import q3_16, qkx2_16, qx_16, transpose16

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)  # ggml: a sub-block below this max |x| counts as all zeros
MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the mantissa
F32 = np.float32


# ---- numpy: vectorized over sub-blocks (rows of a 2-D array), elements in order ------------


def nearest_int_np(f: np.ndarray) -> np.ndarray:
    v = (np.asarray(f, np.float32) + MAGIC).astype(np.float32)
    return (v.view(np.int32) & np.int32(0x007FFFFF)).astype(np.int64) - 0x00400000


def f16_round_np(v: np.ndarray) -> np.ndarray:
    """float32 -> (fp16 bits, the float32 value of that fp16)."""
    h = np.asarray(v, np.float32).astype(np.float16)
    return h.view(np.uint16), h.astype(np.float32)


def make_qkx2_quants_np(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    """x, weights float32 (m, n) -> (scale (m,), the_min (m,), L uint8 (m, n)).

    the_min is ggml's *the_min = -min (a non-negative offset)."""
    m, n = x.shape
    mn = x[:, 0].copy()
    mx = x[:, 0].copy()
    sum_w = weights[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        xi = x[:, i]
        mn = np.where(xi < mn, xi, mn)
        mx = np.where(xi > mx, xi, mx)
        sum_w = sum_w + weights[:, i]
        sum_x = sum_x + weights[:, i] * xi
    mn = np.where(mn > 0, F32(0), mn)
    flat = mx == mn
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    L = np.clip(nearest_int_np(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    Lf = L.astype(np.float32)
    best = np.zeros(m, np.float32)
    for i in range(n):
        diff = scale * Lf[:, i] + mn - x[:, i]
        diff = np.abs(diff) if use_mad else diff * diff
        best = best + weights[:, i] * diff
    for s in range(nstep + 1):
        # ggml divides by max - min with the min of the best fit so far (not the data's min)
        iscale = (F32(rmin) + F32(rdelta) * F32(s) + F32(nmax)) / (mx - mn)
        La = np.clip(nearest_int_np(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        Laf = La.astype(np.float32)
        sum_l = np.zeros(m, np.float32)
        sum_l2 = np.zeros(m, np.float32)
        sum_xl = np.zeros(m, np.float32)
        for i in range(n):
            wl = weights[:, i] * Laf[:, i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * Laf[:, i]
            sum_xl = sum_xl + wl * x[:, i]
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, F32(0), this_min)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = np.zeros(m, np.float32)
        for i in range(n):
            diff = this_scale * Laf[:, i] + this_min - x[:, i]
            diff = np.abs(diff) if use_mad else diff * diff
            cur = cur + weights[:, i] * diff
        take = ok & (cur < best)
        L = np.where(take[:, None], La, L)
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    L = np.where(flat[:, None], 0, L).astype(np.uint8)
    scale = np.where(flat, F32(0), scale).astype(np.float32)
    return scale, (-mn).astype(np.float32), L


def make_qkx3_quants_np(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    """ggml's make_qkx3_quants: make_qkx2_quants but `max <= min` is the flat test (same
    thing once min is clamped to <= 0) and weights are always given here."""
    return make_qkx2_quants_np(x, weights, nmax, rmin, rdelta, nstep, use_mad)


def _amax_signed_np(x):
    amax = np.zeros(x.shape[0], np.float32)
    mx = np.zeros(x.shape[0], np.float32)
    for i in range(x.shape[1]):
        ax = np.abs(x[:, i])
        up = ax > amax
        amax = np.where(up, ax, amax)
        mx = np.where(up, x[:, i], mx)
    return amax, mx


def make_qx_quants_np(x, nmax, qw=None):
    """ggml's make_qx_quants with rmse_type 1: weights x*x, or the importance weights qw.

    x float32 (m, n) -> (scale (m,), L int64 (m, n) in 0..2*nmax-1)."""
    m, n = x.shape
    w = x * x if qw is None else qw
    amax, mx = _amax_signed_np(x)
    zero = amax < GROUP_MAX_EPS

    def fit(iscale):
        L = np.clip(nearest_int_np(iscale[:, None] * x), -nmax, nmax - 1)
        Lf = L.astype(np.float32)
        sumlx = np.zeros(m, np.float32)
        suml2 = np.zeros(m, np.float32)
        for i in range(n):
            sumlx = sumlx + w[:, i] * x[:, i] * Lf[:, i]
            suml2 = suml2 + w[:, i] * Lf[:, i] * Lf[:, i]
        return L, sumlx, suml2

    L, sumlx, suml2 = fit(F32(-nmax) / mx)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(np.float32)
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        Ls, sumlx, suml2 = fit(-(F32(nmax) + F32(0.1) * F32(s)) / mx)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(take[:, None], Ls, L)
        scale = np.where(take, sumlx / suml2, scale)
        best = np.where(take, scale * sumlx, best)
    L = np.where(zero[:, None], 0, L + nmax)
    scale = np.where(zero, F32(0), scale).astype(np.float32)
    return scale, L


def make_q3_quants_np(x, nmax):
    """ggml's make_q3_quants(do_rmse = true): x float32 (m, n) -> (scale (m,), L in 0..2*nmax-1).

    The refinement passes run for every sub-block: a pass that changes nothing leaves the
    state as it was, so ggml's early exit only saves time."""
    m, n = x.shape
    amax, mx = _amax_signed_np(x)
    zero = amax < GROUP_MAX_EPS
    iscale = F32(-nmax) / mx
    L = np.clip(nearest_int_np(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx = np.zeros(m, np.float32)
    suml2 = np.zeros(m, np.float32)
    for i in range(n):
        li = L[:, i].astype(np.float32)
        sumlx = sumlx + w[:, i] * x[:, i] * li
        suml2 = suml2 + w[:, i] * li * li
    for _ in range(5):
        for i in range(n):
            wi, xi = w[:, i], x[:, i]
            li = L[:, i].astype(np.float32)
            slx = sumlx - wi * xi * li
            a = slx > 0
            sl2 = suml2 - wi * li * li
            new = np.clip(nearest_int_np(xi * sl2 / slx), -nmax, nmax - 1)
            nf = new.astype(np.float32)
            ch = a & (new != L[:, i])
            slx = slx + wi * xi * nf
            sl2 = sl2 + wi * nf * nf
            take = ch & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i] = np.where(take, new, L[:, i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(np.float32)
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, F32(0), scale).astype(np.float32), L


def make_qp_quants_np(x, nmax, qw):
    """ggml's make_qp_quants: non-negative x (m, n) with weights qw -> (scale (m,), L (m, n))."""
    m, n = x.shape
    mx = np.zeros(m, np.float32)
    for i in range(n):
        mx = np.maximum(mx, x[:, i])  # ggml's MAX(max, x): x only when x > max
    zero = mx < GROUP_MAX_EPS
    iscale = F32(nmax) / mx
    L = nearest_int_np(iscale[:, None] * x)
    scale = F32(1) / iscale
    best = np.zeros(m, np.float32)
    for i in range(n):
        diff = x[:, i] - scale * L[:, i].astype(np.float32)
        best = best + qw[:, i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        isc = (F32(0.1) * F32(s) + F32(nmax)) / mx
        sc = F32(1) / isc
        mse = np.zeros(m, np.float32)
        for i in range(n):
            li = np.minimum(nearest_int_np(isc * x[:, i]), nmax).astype(np.float32)
            diff = x[:, i] - sc * li
            mse = mse + qw[:, i] * diff * diff
        take = mse < best
        best = np.where(take, mse, best)
        iscale = np.where(take, isc, iscale)
    L = np.minimum(nearest_int_np(iscale[:, None] * x), nmax)
    sumlx = np.zeros(m, np.float32)
    suml2 = np.zeros(m, np.float32)
    for i in range(n):
        li = L[:, i].astype(np.float32)
        sumlx = sumlx + qw[:, i] * x[:, i] * li
        suml2 = suml2 + qw[:, i] * li * li
    for _ in range(5):
        for i in range(n):
            wi, xi = qw[:, i], x[:, i]
            li = L[:, i].astype(np.float32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            a = (slx > 0) & (sl2 > 0)
            new = np.minimum(nearest_int_np(xi * sl2 / slx), nmax)
            nf = new.astype(np.float32)
            ch = a & (new != L[:, i])
            slx = slx + wi * xi * nf
            sl2 = sl2 + wi * nf * nf
            take = ch & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i] = np.where(take, new, L[:, i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(np.float32)
    return np.where(zero, F32(0), scale).astype(np.float32), np.where(zero[:, None], 0, L)


def pack_scale_min_k4_np(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block (n, 8) -> the 12 bytes of Q4_K/Q5_K."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 15) | ((lm[:, 4:8] & 15) << 4)
    return out


def unpack_scale_min_k4_np(s: np.ndarray):
    """12 bytes (n, 12) -> (scales (n, 8), mins (n, 8)) uint8, ggml's get_scale_min_k4."""
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, 0:4] = s[:, 0:4] & 63
    mn[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


# ---- numba: one sub-block, scalar, the same operations ---------------------------------------
# error_model="numpy": a float division by zero is IEEE (inf/NaN) as in C, not a Python exception.

jit = numba.njit(cache=True, error_model="numpy")


@numba.njit(cache=True, error_model="numpy", inline="always")
def nearest_int(f):
    v = np.float32(np.float32(f) + np.float32(12582912.0))
    return np.int64(v.view(np.int32) & np.int32(0x007FFFFF)) - 0x00400000


@numba.njit(cache=True, inline="always")
def f16_bits_to_f32(h):
    """float32 value of fp16 bits h (an exact conversion, as ggml's GGML_FP16_TO_FP32)."""
    e = (h >> 10) & 0x1F
    if e == 0:
        v = np.float32(h & 0x3FF) * np.float32(5.9604644775390625e-08)  # 2**-24: exact
    elif e == 31:
        v = np.float32(np.inf) if (h & 0x3FF) == 0 else np.float32(np.nan)
    else:
        # a normal half: the float32 with exponent e - 15 + 127 and the mantissa's 10 bits on top (exact;
        # not ldexp, a libm call per use, nor float ** int, numba's int_power helper: ~0.2 s of a cold start)
        v = np.uint32(((e + 112) << 23) | ((h & 0x3FF) << 13)).view(np.float32)
    return -v if (h & 0x8000) else v


@jit
def make_qkx2_quants(x, weights, L, Laux, nmax, rmin, rdelta, nstep, use_mad):
    """One sub-block: fills L (uint8), returns (scale, the_min) as float32."""
    n = x.shape[0]
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    if mn > 0:
        mn = np.float32(0.0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0), -mn
    iscale = np.float32(nmax) / (mx - mn)
    scale = np.float32(1.0) / iscale
    best = np.float32(0.0)
    for i in range(n):
        li = min(max(nearest_int(iscale * (x[i] - mn)), 0), nmax)
        L[i] = li
        diff = scale * np.float32(li) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best += weights[i] * diff
    for s in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(s) + np.float32(nmax)) / (mx - mn)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            li = min(max(nearest_int(iscale * (x[i] - mn)), 0), nmax)
            Laux[i] = li
            wl = weights[i] * np.float32(li)
            sum_l += wl
            sum_l2 += wl * np.float32(li)
            sum_xl += wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            cur = np.float32(0.0)
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur += weights[i] * diff
            if cur < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


# (the 32-lane forms: two zmm per quantity, two independent chains for the CPU to overlap)
_TR32 = transpose16(32)  # sms_prep: a row's 32-weight sub-blocks element-major
_TR16 = transpose16(16)  # Q2_K's 16-weight ones
_QKX2_32 = qkx2_16(32, False)  # Q4_K, Q5_K
_QKX2_32W = qkx2_16(32, False, 32)
_QKX2_16 = qkx2_16(16, False)  # Q2_K with importance weights
_QKX2_16W = qkx2_16(16, False, 32)
_QKX2_16_MAD = qkx2_16(16, True)  # Q2_K
_QKX2_16_MADW = qkx2_16(16, True, 32)


@jit
def qkx2_redo(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, c0, mask):
    """The lanes c0 + k (bit k of mask) that a vector search flagged (see plugins/_klanes.py's qkx2_16:
    its fast rounding is not ggml's there), searched again one at a time by make_qkx2_quants."""
    n = x.shape[0]
    xc = np.empty(n, np.float32)
    wc = np.empty(n, np.float32)
    Lc = np.empty(n, np.uint8)
    La = np.empty(n, np.uint8)
    for k in range(64):
        if (mask >> k) & 1:
            j = c0 + k
            for i in range(n):
                xc[i] = x[i, j]
                wc[i] = w[i, j]
            scale[j], the_min[j] = make_qkx2_quants(xc, wc, Lc, La, nmax, rmin, rdelta, nstep, use_mad)
            for i in range(n):
                L[i, j] = Lc[i]


@jit
def make_qkx2_lanes(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min):
    """make_qkx2_quants on M sub-blocks at once, in lock step: x, w (n, M) float32 element-major (column
    j is sub-block j; C order), L (n, M) uint8 out, scale/the_min (M,) out. Groups of 32 lanes, then
    one of 16, run in plugins/_klanes.py's vector code (~2x the loop below), the rest in the loop;
    both give every lane the bytes of the scalar search."""
    n, M = x.shape
    ok = (n == 32 and not use_mad) or n == 16
    G2 = M // 32 if ok else 0
    for g in range(G2):
        if n == 32:
            bad = _QKX2_32W(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g)
            if bad:
                qkx2_redo(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, 32 * g, bad)
        elif use_mad:
            bad = _QKX2_16_MADW(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g)
            if bad:
                qkx2_redo(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, 32 * g, bad)
        else:
            bad = _QKX2_16W(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g)
            if bad:
                qkx2_redo(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, 32 * g, bad)
    c = 32 * G2
    if ok and M - c >= 16:
        g = c // 16
        if n == 32:
            bad = _QKX2_32(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g)
            if bad:
                qkx2_redo(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, 16 * g, bad)
        elif use_mad:
            bad = _QKX2_16_MAD(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g)
            if bad:
                qkx2_redo(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, 16 * g, bad)
        else:
            bad = _QKX2_16(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g)
            if bad:
                qkx2_redo(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, 16 * g, bad)
        c += 16
    if c < M:
        qkx2_lanes_loop(x[:, c:], w[:, c:], L[:, c:], nmax, rmin, rdelta, nstep, use_mad, scale[c:], the_min[c:])


@numba.njit(cache=True, error_model="numpy", inline="always")
def qkx2_lanes32(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, used, exact=None):
    """make_qkx2_lanes for Q4_K/Q5_K (n = 32, no mad) on the first `used` lanes, when M is a multiple of
    32 (scale_min_search's callers pad their work space; the pad lanes are searched and ignored): one
    vector kernel of 32 lanes, where make_qkx2_lanes compiles six and its loop for the run-time n /
    use_mad / tail (cold start ~3x), and its 16-lane twin for a last group of at most 16 used lanes
    (rows of nb % 4 in (1, 2) super-blocks: 1536 columns, 48 lanes, had searched 64; Q4_K quantize at
    4608x1536 ran 1.17 GB/s where 1024, 2048 and 4096 columns ran 1.46).
    exact None: returns nonzero if some lane needs the scalar search (qkx2_16's flags; never for
    ordinary data), and the caller marks the row for redo_rows. exact True (a separate compilation,
    made only when redo_rows first needs it: `exact is None` is pruned at compile time): those lanes
    are searched again by make_qkx2_quants (qkx2_redo) here, returns 0. The scalar fallback thus
    costs an ordinary cold start nothing (~1.5 s if compiled in)."""
    flagged = 0
    for g in range(x.shape[1] // 32):
        if 32 * g + 16 >= used:  # the 16 lanes from 32 * g (its group 2 * g) hold the rest
            m = _QKX2_32(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, 2 * g)
        else:
            m = _QKX2_32W(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g)
        if exact is None:
            flagged |= m
        elif m:
            qkx2_redo(x, w, L, nmax, rmin, rdelta, nstep, False, scale, the_min, 32 * g, m)
    return flagged


@numba.njit(cache=True, error_model="numpy", inline="always")
def qkx2_lanes16(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, exact=None):
    """make_qkx2_lanes for Q2_K (n = 16) when M is a multiple of 32 (the caller pads its work space):
    the two 32-lane vector kernels only, where make_qkx2_lanes compiles six and its loop (cold start).
    exact: as qkx2_lanes32."""
    flagged = 0
    for g in range(x.shape[1] // 32):
        if use_mad:
            m = _QKX2_16_MADW(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g)
        else:
            m = _QKX2_16W(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g)
        if exact is None:
            flagged |= m
        elif m:
            qkx2_redo(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, 32 * g, m)
    return flagged


@jit
def qkx2_lanes_loop(x, w, L, nmax, rmin, rdelta, nstep, use_mad, scale, the_min):
    """make_qkx2_lanes in numba loops: each lane runs ggml's operations in ggml's order (the element
    loop is outside, the lane loop inside), so every lane's bytes are those of the scalar search;
    the lane loop (a run-time trip count M) is what vectorizes."""
    n, M = x.shape
    mn = np.empty(M, np.float32)
    mx = np.empty(M, np.float32)
    sum_w = np.empty(M, np.float32)
    sum_x = np.empty(M, np.float32)
    best = np.zeros(M, np.float32)
    isc = np.empty(M, np.float32)
    sl = np.empty(M, np.float32)
    sl2 = np.empty(M, np.float32)
    sxl = np.empty(M, np.float32)
    ts = np.empty(M, np.float32)
    tm = np.empty(M, np.float32)
    cur = np.empty(M, np.float32)
    take = np.empty(M, np.bool_)
    La = np.empty((n, M), np.uint8)
    for j in range(M):
        mn[j] = x[0, j]
        mx[j] = x[0, j]
        sum_w[j] = w[0, j]
        sum_x[j] = w[0, j] * x[0, j]
    for i in range(1, n):
        for j in range(M):
            xi = x[i, j]
            mn[j] = xi if xi < mn[j] else mn[j]
            mx[j] = xi if xi > mx[j] else mx[j]
            sum_w[j] += w[i, j]
            sum_x[j] += w[i, j] * xi
    flat = np.empty(M, np.bool_)
    for j in range(M):
        if mn[j] > 0:
            mn[j] = np.float32(0.0)
        flat[j] = mx[j] == mn[j]
        isc[j] = np.float32(nmax) / (mx[j] - mn[j])
        scale[j] = np.float32(1.0) / isc[j]
    for i in range(n):
        for j in range(M):
            li = min(max(nearest_int(isc[j] * (x[i, j] - mn[j])), 0), nmax)
            L[i, j] = li
            diff = scale[j] * np.float32(li) + mn[j] - x[i, j]
            diff = abs(diff) if use_mad else diff * diff
            best[j] += w[i, j] * diff
    for s in range(nstep + 1):
        for j in range(M):
            isc[j] = (rmin + rdelta * np.float32(s) + np.float32(nmax)) / (mx[j] - mn[j])
            sl[j] = 0
            sl2[j] = 0
            sxl[j] = 0
            cur[j] = 0
        for i in range(n):
            for j in range(M):
                li = min(max(nearest_int(isc[j] * (x[i, j] - mn[j])), 0), nmax)
                La[i, j] = li
                wl = w[i, j] * np.float32(li)
                sl[j] += wl
                sl2[j] += wl * np.float32(li)
                sxl[j] += wl * x[i, j]
        for j in range(M):
            D = sum_w[j] * sl2[j] - sl[j] * sl[j]
            take[j] = D > 0
            a = (sum_w[j] * sxl[j] - sum_x[j] * sl[j]) / D
            m = (sl2[j] * sum_x[j] - sl[j] * sxl[j]) / D
            if m > 0:
                m = np.float32(0.0)
                a = sxl[j] / sl2[j]
            ts[j] = a
            tm[j] = m
        for i in range(n):
            for j in range(M):
                diff = ts[j] * np.float32(La[i, j]) + tm[j] - x[i, j]
                diff = abs(diff) if use_mad else diff * diff
                cur[j] += w[i, j] * diff
        anyt = False
        for j in range(M):
            if take[j] and cur[j] < best[j]:
                best[j] = cur[j]
                scale[j] = ts[j]
                mn[j] = tm[j]
                anyt = True
            else:
                take[j] = False
        if anyt:
            for i in range(n):
                for j in range(M):
                    if take[j]:
                        L[i, j] = La[i, j]
    for j in range(M):
        if flat[j]:  # ggml returns early: L = 0, scale 0
            scale[j] = np.float32(0.0)
            for i in range(n):
                L[i, j] = 0
        the_min[j] = -mn[j]


@jit
def make_qx_quants(x, L, nmax, qw):
    """One sub-block, rmse_type 1 (weights x*x, or qw when qw is not empty): fills L with
    0..2*nmax-1 (int8 storage), returns the float32 scale."""
    n = x.shape[0]
    has_qw = qw.shape[0] > 0
    amax = np.float32(0.0)
    mx = np.float32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < np.float32(1e-15):
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = np.float32(-nmax) / mx
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        li = min(max(nearest_int(iscale * x[i]), -nmax), nmax - 1)
        L[i] = li + nmax
        w = qw[i] if has_qw else x[i] * x[i]
        lf = np.float32(li)
        sumlx += w * x[i] * lf
        suml2 += w * lf * lf
    scale = sumlx / suml2 if suml2 != 0 else np.float32(0.0)
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(s)) / mx
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            li = min(max(nearest_int(iscale * x[i]), -nmax), nmax - 1)
            w = qw[i] if has_qw else x[i] * x[i]
            lf = np.float32(li)
            sumlx += w * x[i] * lf
            suml2 += w * lf * lf
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = min(max(nearest_int(iscale * x[i]), -nmax), nmax - 1) + nmax
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


_QX_16 = qx_16(16, False)  # Q6_K
_QX_16_W = qx_16(16, True)  # Q6_K with importance weights
_QX_32 = qx_16(16, False, 32)
_QX_32_W = qx_16(16, True, 32)


@jit
def make_qx_lanes(x, L, nmax, qw, scale):
    """make_qx_quants (rmse_type 1) on M sub-blocks at once, in lock step: x (n, M) float32 element-major
    (C order), qw (n, M) importance weights or (0, 0) for w = x*x, L (n, M) int8 out (0..2*nmax-1),
    scale (M,) out. Groups of 32 lanes (then one of 16) of 16 elements run in plugins/_klanes.py's
    vector code, the rest in the loop; both give every lane the bytes of the scalar search."""
    n, M = x.shape
    G2 = M // 32 if n == 16 else 0
    for g in range(G2):
        if qw.shape[0] > 0:
            _QX_32_W(x, L, nmax, qw, scale, g)
        else:
            _QX_32(x, L, nmax, qw, scale, g)
    c = 32 * G2
    if n == 16 and M - c >= 16:
        if qw.shape[0] > 0:
            _QX_16_W(x, L, nmax, qw, scale, c // 16)
        else:
            _QX_16(x, L, nmax, qw, scale, c // 16)
        c += 16
    if c < M:
        qx_lanes_loop(x[:, c:], L[:, c:], nmax, qw if qw.shape[0] == 0 else qw[:, c:], scale[c:])


@numba.njit(cache=True, error_model="numpy", inline="always")
def qx_lanes32(x, L, nmax, qw, scale):
    """make_qx_lanes for Q6_K (n = 16) when M is a multiple of 32 (the caller pads its work space): the
    two 32-lane vector kernels only, where make_qx_lanes compiles four and its loop (cold start).
    qw None (w = x*x) or the importance weights (n, M): decided at compile time (one kernel each)."""
    for g in range(x.shape[1] // 32):
        if qw is None:
            _QX_32(x, L, nmax, x, scale, g)  # (its qw operand is not read)
        else:
            _QX_32_W(x, L, nmax, qw, scale, g)


@jit
def qx_lanes_loop(x, L, nmax, qw, scale):
    """make_qx_lanes in numba loops: per lane ggml's operations in ggml's order; the lane loop vectorizes."""
    n, M = x.shape
    has_qw = qw.shape[0] > 0
    amax = np.zeros(M, np.float32)
    mx = np.zeros(M, np.float32)
    isc = np.empty(M, np.float32)
    sumlx = np.zeros(M, np.float32)
    suml2 = np.zeros(M, np.float32)
    best = np.empty(M, np.float32)
    La = np.empty((n, M), np.int8)
    take = np.empty(M, np.bool_)
    for i in range(n):
        for j in range(M):
            ax = abs(x[i, j])
            if ax > amax[j]:
                amax[j] = ax
                mx[j] = x[i, j]
    for j in range(M):
        isc[j] = np.float32(-nmax) / mx[j]
    for i in range(n):
        for j in range(M):
            li = min(max(nearest_int(isc[j] * x[i, j]), -nmax), nmax - 1)
            L[i, j] = li + nmax
            w = qw[i, j] if has_qw else x[i, j] * x[i, j]
            lf = np.float32(li)
            sumlx[j] += w * x[i, j] * lf
            suml2[j] += w * lf * lf
    for j in range(M):
        scale[j] = sumlx[j] / suml2[j] if suml2[j] != 0 else np.float32(0.0)
        best[j] = scale[j] * sumlx[j]
    for s in range(-9, 10):
        if s == 0:
            continue
        for j in range(M):
            isc[j] = -(np.float32(nmax) + np.float32(0.1) * np.float32(s)) / mx[j]
            sumlx[j] = 0
            suml2[j] = 0
        for i in range(n):
            for j in range(M):
                li = min(max(nearest_int(isc[j] * x[i, j]), -nmax), nmax - 1)
                La[i, j] = li + nmax
                w = qw[i, j] if has_qw else x[i, j] * x[i, j]
                lf = np.float32(li)
                sumlx[j] += w * x[i, j] * lf
                suml2[j] += w * lf * lf
        anyt = False
        for j in range(M):
            take[j] = suml2[j] > 0 and sumlx[j] * sumlx[j] > best[j] * suml2[j]
            if take[j]:
                scale[j] = sumlx[j] / suml2[j]
                best[j] = scale[j] * sumlx[j]
                anyt = True
        if anyt:
            for i in range(n):
                for j in range(M):
                    if take[j]:
                        L[i, j] = La[i, j]
    for j in range(M):
        if amax[j] < np.float32(1e-15):  # ggml returns early: L = 0, scale 0
            scale[j] = np.float32(0.0)
            for i in range(n):
                L[i, j] = 0


_Q3_16 = q3_16(16)  # Q3_K
_Q3_32 = q3_16(16, 32)


@jit
def make_q3_lanes(x, L, nmax, scale):
    """make_q3_quants on M sub-blocks of 16 at once: x (n, M) float32 element-major (C order), L (n, M)
    int8 out (0..2*nmax-1), scale (M,) out. Groups of 32 lanes (then one of 16) run in
    plugins/_klanes.py's vector code (n = 16), the rest one lane at a time in make_q3_quants; the
    same bytes."""
    n, M = x.shape
    G2 = M // 32 if n == 16 else 0
    for g in range(G2):
        _Q3_32(x, L, nmax, scale, g)
    c = 32 * G2
    if n == 16 and M - c >= 16:
        _Q3_16(x, L, nmax, scale, c // 16)
        c += 16
    for j in range(c, M):
        scale[j] = make_q3_quants(x[:, j], L[:, j], nmax)


@jit
def make_q3_quants(x, L, nmax):
    """One sub-block, ggml's make_q3_quants(do_rmse = true): fills L (0..2*nmax-1)."""
    n = x.shape[0]
    amax = np.float32(0.0)
    mx = np.float32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < np.float32(1e-15):
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = np.float32(-nmax) / mx
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        li = min(max(nearest_int(iscale * x[i]), -nmax), nmax - 1)
        L[i] = li
        w = x[i] * x[i]
        lf = np.float32(li)
        sumlx += w * x[i] * lf
        suml2 += w * lf * lf
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            lf = np.float32(L[i])
            slx = sumlx - w * x[i] * lf
            if slx > 0:
                sl2 = suml2 - w * lf * lf
                new = min(max(nearest_int(x[i] * sl2 / slx), -nmax), nmax - 1)
                if new != L[i]:
                    nf = np.float32(new)
                    slx += w * x[i] * nf
                    sl2 += w * nf * nf
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else np.float32(0.0)


@jit
def make_qp_quants(x, L, nmax, qw):
    """ggml's make_qp_quants on non-negative x with weights qw: fills L (0..nmax)."""
    n = x.shape[0]
    mx = np.float32(0.0)
    for i in range(n):
        if x[i] > mx:
            mx = x[i]
    if mx < np.float32(1e-15):
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = np.float32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i])
    scale = np.float32(1.0) / iscale
    best = np.float32(0.0)
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best += qw[i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        isc = (np.float32(0.1) * np.float32(s) + np.float32(nmax)) / mx
        sc = np.float32(1.0) / isc
        mse = np.float32(0.0)
        for i in range(n):
            li = min(nearest_int(isc * x[i]), nmax)
            diff = x[i] - sc * np.float32(li)
            mse += qw[i] * diff * diff
        if mse < best:
            best = mse
            iscale = isc
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        li = min(nearest_int(iscale * x[i]), nmax)
        L[i] = li
        lf = np.float32(li)
        sumlx += qw[i] * x[i] * lf
        suml2 += qw[i] * lf * lf
    for _ in range(5):
        changed = 0
        for i in range(n):
            lf = np.float32(L[i])
            slx = sumlx - qw[i] * x[i] * lf
            sl2 = suml2 - qw[i] * lf * lf
            if slx > 0 and sl2 > 0:
                new = min(nearest_int(x[i] * sl2 / slx), nmax)
                if new != L[i]:
                    nf = np.float32(new)
                    slx += qw[i] * x[i] * nf
                    sl2 += qw[i] * nf * nf
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else np.float32(0.0)


@numba.njit(cache=True, inline="always")
def scale_min_k4(j, s):
    """(scale, min) of sub-block j from the 12 packed bytes s (ggml's get_scale_min_k4)."""
    if j < 4:
        return np.int64(s[j] & 63), np.int64(s[j + 4] & 63)
    return (np.int64(s[j + 4] & 15) | (np.int64(s[j - 4] >> 6) << 4),
            np.int64(s[j + 4] >> 4) | (np.int64(s[j] >> 6) << 4))


@numba.njit(cache=True, inline="always")
def pack_scale_min_k4(ls, lm, s):
    """Eight 6-bit scales ls and mins lm into the 12 bytes s (Q4_K/Q5_K)."""
    for j in range(4):
        s[j] = np.uint8(ls[j] | ((ls[j + 4] >> 4) << 6))
        s[j + 4] = np.uint8(lm[j] | ((lm[j + 4] >> 4) << 6))
        s[j + 8] = np.uint8((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4))


# ---- Q4_K/Q5_K: the (scale, min) search of a super-block, numpy and numba -------------------


def scale_min_search_np(x, quant_weights, nmax, ref, impl):
    """Q4_K/Q5_K: super-blocks x (N, 256) -> (L (N, 8, 32), ls (N, 8), lm (N, 8), d (N,), dmin (N,)),
    d and dmin in float32 before their fp16 rounding. ref, impl: (rmin, rdelta, nstep) of the
    sub-block search of ggml's reference quantizer and of its importance-weighted one."""
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    if quant_weights is None:
        sum_x2 = np.zeros(n * 8, np.float32)
        for i in range(32):
            sum_x2 = sum_x2 + xs[:, i] * xs[:, i]
        av_x = np.sqrt(sum_x2 / F32(32))
        weights = av_x[:, None] + np.abs(xs)
        scales, mins, L = make_qkx2_quants_np(xs, weights, nmax, *ref, False)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
        max_scale = np.zeros(n, np.float32)
        max_min = np.zeros(n, np.float32)
        for j in range(8):
            max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
            max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(nearest_int_np(inv_scale[:, None] * scales) & 255, 63)
        lm = np.minimum(nearest_int_np(inv_min[:, None] * mins) & 255, 63)
        d = max_scale / F32(63)
        dmin = max_min / F32(63)
    else:
        qw = quant_weights.reshape(n * 8, 32)
        sum_x2 = np.zeros(n, np.float32)
        for i in range(QK_K):
            sum_x2 = sum_x2 + x[:, i] * x[:, i]
        sigma2 = F32(2) * sum_x2 / F32(QK_K)
        s2 = np.repeat(sigma2, 8)[:, None]
        weights = qw * np.sqrt(s2 + xs * xs)
        sw = np.zeros(n * 8, np.float32)
        for i in range(32):
            sw = sw + weights[:, i]
        scales, mins, L = make_qkx3_quants_np(xs, weights, nmax, *impl, False)
        sw = sw.reshape(n, 8)
        d, ls = make_qp_quants_np(scales.reshape(n, 8), 63, sw)
        dmin, lm = make_qp_quants_np(mins.reshape(n, 8), 63, sw)
        ls, lm = ls & 255, lm & 255
    return L.reshape(n, 8, 32), ls, lm, d.astype(np.float32), dmin.astype(np.float32)


# A Q4_K/Q5_K row: sms_prep (the row kernel calls it first: its sums of squares also tell whether the
# row may hold a NaN/inf), then scale_min_search, a thin inlined function around the vector search
# (qkx2_lanes32, whose LLVM code is the bulk of the work and is thus generated once, in the format's row
# kernel) and _sms_finish. The scalar work before and after the search is in separately compiled
# functions: numba copies an inlined callee's IR (twice, and its whole variable scope once per block)
# into every call site, which cost ~0.6 s of the Q4_K cold start when all of it was inlined. `qw is
# None` (quantize) or not (quantize_weighted) is decided when they are compiled (their argument types):
# quantize compiles no weighted code. The work space comes from kq_work (Python, per thread).
#
# Where Q4_K's quantize time goes (one thread, 11008x4096, same process): the search ~73%, the final
# pass (fp16 scales, one vector division per sub-block, packing) ~10%, sms_prep (the row's only read
# from memory, the element-major transposes, av_x and weights) ~8-12%, _sms_finish ~3%. The search is
# at its arithmetic bound: per element and trial 18 float operations a <16 x float> vector (12 to
# round, clamp and sum, 6 for the error), all in ggml's order, ~36 zmm instructions for 32 lanes, and
# 8 vdivps a trial; 64 lanes (four chains, more latency hidden) measured no faster than 32.


@jit
def sms_prep(w, qw, r, xt, wt, sw):
    """The search's inputs for row r: xt = the row's 8*nb sub-blocks element-major, wt their weights
    (ggml's quantize_row_q4_K_ref: av_x + |x|; with qw, quantize_row_q4_K_impl: qw*sqrt(sigma2 + x*x),
    and sw their sums per sub-block). sw is work space (overwritten by the search) when qw is None.

    Returns True when the row may hold a NaN or an infinity: the caller then runs has_nonfinite on it.
    Without qw, a sub-block's sum of squares is NaN or inf if one of its values is (or, rarely, when
    finite squares overflow): the row is read once here, not first by a separate scan (~5% of Q4_K's
    quantize). With qw, always True (quantize_weighted has checked its input already)."""
    nb = w.shape[1] // QK_K
    K = 8 * nb
    K16 = K // 16 * 16
    for k0 in range(0, K16, 16):
        _TR32(w, r, xt, k0)  # 16 sub-blocks at a time, vector shuffles (plugins/_klanes.py)
    for k in range(K16, K):
        for i in range(32):
            xt[i, k] = w[r, 32 * k + i]
    if qw is None:
        # each sub-block's sum of squares in its element order, all sub-blocks side by side (the loop
        # over k vectorizes; one per k with the sum in a register is a 32-add latency chain each)
        for k in range(K):
            sw[k] = np.float32(0.0)
        for i in range(32):
            for k in range(K):
                sw[k] += xt[i, k] * xt[i, k]
        maybe = False
        for k in range(K):
            maybe |= not (sw[k] < np.inf)
            sw[k] = np.float32(np.sqrt(sw[k] / np.float32(32.0)))  # av_x
        for i in range(32):
            for k in range(K):
                wt[i, k] = sw[k] + abs(xt[i, k])
        return maybe
    else:
        for b in range(nb):
            sum_x2 = np.float32(0.0)
            for i in range(QK_K):
                xv = w[r, QK_K * b + i]
                sum_x2 += xv * xv
            sigma2 = np.float32(2.0) * sum_x2 / np.float32(QK_K)
            for j in range(8):
                k = 8 * b + j
                sumw = np.float32(0.0)
                for i in range(32):
                    wt[i, k] = qw[r, QK_K * b + 32 * j + i] * np.float32(np.sqrt(sigma2 + xt[i, k] * xt[i, k]))
                    sumw += wt[i, k]
                sw[k] = sumw
        return True


@jit
def _sms_finish(qw, scales, mins, sw, ls, lm, d, dmin):
    """From the search's (scales, mins): the 6-bit ls, lm, float32 d, dmin (ggml's reference: max/63 and
    nearest_int(63/max * v); with qw: make_qp_quants weighted by sw). The search's L stay in Lt: the
    final pass reads them only for a sub-block whose stored scale is 0 (its own division makes the rest)."""
    nb = d.shape[0]
    if qw is None:
        for b in range(nb):
            max_scale = np.float32(0.0)
            max_min = np.float32(0.0)
            for j in range(8):
                if scales[8 * b + j] > max_scale:
                    max_scale = scales[8 * b + j]
                if mins[8 * b + j] > max_min:
                    max_min = mins[8 * b + j]
            inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else np.float32(0.0)
            inv_min = np.float32(63.0) / max_min if max_min > 0 else np.float32(0.0)
            for j in range(8):
                v = nearest_int(inv_scale * scales[8 * b + j]) & 255  # min(63, ...) as an if: numba's
                ls[b, j] = v if v < 63 else 63                        # min() is one more cold compile
                v = nearest_int(inv_min * mins[8 * b + j]) & 255
                lm[b, j] = v if v < 63 else 63
            d[b] = max_scale / np.float32(63.0)
            dmin[b] = max_min / np.float32(63.0)
    else:
        lq = np.empty(8, np.uint8)
        for b in range(nb):
            d[b] = make_qp_quants(scales[8 * b : 8 * b + 8], lq, 63, sw[8 * b : 8 * b + 8])
            for j in range(8):
                ls[b, j] = lq[j]
            dmin[b] = make_qp_quants(mins[8 * b : 8 * b + 8], lq, 63, sw[8 * b : 8 * b + 8])
            for j in range(8):
                lm[b, j] = lq[j]


@numba.njit(cache=True, error_model="numpy", inline="always")
def scale_min_search(qw, xt, wt, Lt, scales, mins, sw, ls, lm, d, dmin, nmax,
                     rmin, rdelta, nstep, rmin_w, rdelta_w, nstep_w, exact=None):
    """Q4_K/Q5_K, the nb super-blocks of one row, after sms_prep put them into xt, wt, sw: fills Lt (the
    search's quants, element-major), ls, lm (nb, 8) (the 6-bit scales and mins) and d, dmin (nb,) in
    float32 before their fp16 rounding. qw: the importance weights (rows, 256 * nb), or None (ggml's
    reference quantizer; decided when the caller is compiled: quantize compiles no weighted code).
    Work space (kq_work): xt, wt (32, M) float32 (zeros past 8 * nb), Lt (32, M) uint8, scales, mins
    (M,), sw (8 * nb,) float32, with M = 8 * nb rounded up to a multiple of 32 (qkx2_lanes32: one
    vector kernel).

    Returns True (and fills nothing) when the row needs the exact search (redo_rows; exact: see
    qkx2_lanes32).

    All 8 * nb sub-blocks of the row are searched in lock step, one lane each (element-major): ~5x
    faster than the eight of one super-block, as the lane loop then runs long vectors."""
    if qw is not None:
        rmin, rdelta, nstep = rmin_w, rdelta_w, nstep_w
    if qkx2_lanes32(xt, wt, Lt, nmax, rmin, rdelta, nstep, scales, mins, sw.shape[0], exact):
        return True  # the caller marks the row for redo_rows
    _sms_finish(qw, scales, mins, sw, ls, lm, d, dmin)
    return False


@numba.njit(cache=True, inline="always")
def row_nonfinite(wr):
    """has_nonfinite for the rows sms_prep flags (rare): a plain loop, where has_nonfinite's int32 view
    of the row (fast, vectorized) compiles numba's array view, ~0.15 s of a cold start."""
    for c in range(wr.size):
        if not (abs(wr[c]) < np.inf):
            return True
    return False


_WORK = threading.local()


def kq_work(nb: int):
    """This thread's work space of the Q4_K/Q5_K row kernels for rows of nb super-blocks: (xt, wt, Lt,
    scales, mins, sw, L, ls, lm, d, dmin), see scale_min_search; L (256,) uint8 is one super-block's
    final quants. Made once per thread and row length, not in the kernel: numba's np.zeros/np.empty
    are compiled anew in every process (~0.6 s of a cold start), and a row range is ~16 rows. xt and wt
    keep their zero pad lanes (sms_prep writes only the first 8 * nb columns)."""
    w = getattr(_WORK, "kq", None)
    if w is None or w[-1].shape[0] != nb:
        m = (8 * nb + 31) // 32 * 32
        f = np.float32
        w = (np.zeros((32, m), f), np.zeros((32, m), f), np.zeros((32, m), np.uint8), np.zeros(m, f),
             np.zeros(m, f), np.zeros(8 * nb, f), np.zeros(QK_K, np.uint8), np.zeros((nb, 8), np.int64),
             np.zeros((nb, 8), np.int64), np.zeros(nb, f), np.zeros(nb, f))
        _WORK.kq = w
    return w


# ---- Q3_K/Q6_K: the overflow_abs test in the row kernels --------------------------------------
# Their float32 sums of squares overflow from ~4.6e18 (silent zero scales in ggml), so weights of
# |w| >= OVERFLOW_ABS are refused (GGMLFormat.overflow_abs). GGMLFormat tests that with a numpy pass
# over |w| before the kernel (~20% of Q6_K's quantize); here the row kernel does it on the row it
# is about to read anyway (an integer max of the float bits, which vectorizes where a float max
# reduction does not without fast-math) and quantize_checked raises the same RangeError.

OVERFLOW_ABS = 1e18
_BIG_BITS = int(np.array(OVERFLOW_ABS, np.float32).view(np.int32))  # |w| >= float32(1e18), as bits


@numba.njit(cache=True, inline="always")
def first_big_block(wr):
    """The first super-block of the float32 row wr holding a |w| >= OVERFLOW_ABS (wr finite), or -1."""
    bits = wr.view(np.int32)
    m = np.int32(0)
    for c in range(bits.size):
        v = np.int32(bits[c] & np.int32(0x7FFFFFFF))
        m = v if v > m else m  # (not max(): numba's builtin is one more cold compile per process)
    if m < np.int32(_BIG_BITS):
        return -1
    for c in range(bits.size):
        if (bits[c] & np.int32(0x7FFFFFFF)) >= np.int32(_BIG_BITS):
            return c // QK_K
    return -1


def quantize_checked(fmt, w: np.ndarray) -> np.ndarray:
    """GGMLFormat._quantize for a kernel that reports a row's first |w| >= OVERFLOW_ABS block b as
    bad[r] = -2 - b (and a fp16 overflow at block b as bad[r] = b): the same RangeErrors, in the same
    order (the first row with a too large weight, else the first row that overflows)."""
    rows, cols = w.shape
    out = np.empty((rows, cols // fmt.qk, fmt.block_bytes), np.uint8)
    bad = np.empty(rows, np.int64)
    fmt.quantize_kernel(w, out, bad)
    nonfinite_rows(bad)  # NONFINITE_ROW (<= -2 too): before the codes below
    for hit in (np.flatnonzero(bad <= -2), np.flatnonzero(bad >= 0)):
        if hit.size:
            r = int(hit[0])
            b = int(bad[r])
            raise fmt.range_error(w, r, b if b >= 0 else -2 - b)
    return out.reshape(-1)


# ---- rows the vector searches flag -----------------------------------------------------------

REDO = -2  # bad[r] of a row that the kernel could not do exactly (qkx2_lanes32/16 flagged a lane)


def redo_rows(rows_kernel, w, qw, out, bad) -> None:
    """The rows r with bad[r] == REDO (a sub-block range near 1e-38, or past float32: qkx2_16's fast
    rounding is not ggml's there) quantized again by rows_kernel(w, qw, out, bad, r, r + 1, True),
    the format's row kernel with the flagged lanes searched by the scalar make_qkx2_quants (compiled
    on first use: never for ordinary data). It sets bad[r] as for any row."""
    for r in np.flatnonzero(bad == REDO):
        rows_kernel(w, qw, out, bad, r, r + 1, True)


# ---- importance-weighted quantize (the format method `quantize_weighted`) -------------------


def weighted_input(fmt, w, quant_weights, kernel) -> np.ndarray:
    """Validate w like Format.quantize and quant_weights (shape (cols,) or that of w, finite),
    then run kernel(w (rows, cols), qw (rows, cols), out, bad) and raise its RangeError."""
    from quantfmt.errors import NonFiniteError, ShapeError

    w = fmt._float_input(w, "weights")
    qw = fmt._float_input(quant_weights, "importance weights")
    rows, cols = fmt.matrix_shape(w.shape)
    if qw.shape != (cols,) and qw.shape != w.shape:
        raise ShapeError(
            f"{fmt.tag}: importance weights of shape {qw.shape} do not fit weights of shape {w.shape}: "
            f"expected ({cols},) or {w.shape}"
        )
    w2 = np.ascontiguousarray(w.reshape(rows, cols), dtype=np.float32)
    q2 = np.ascontiguousarray(np.broadcast_to(qw.astype(np.float32).reshape(-1, cols), (rows, cols)))
    for what, a in (("weights", w2), ("importance weights", q2)):
        if a.size and not np.isfinite(a).all():
            r, c = (int(v) for v in np.argwhere(~np.isfinite(a))[0])
            raise NonFiniteError(f"{fmt.tag}: {what} of shape {w.shape} hold a non-finite value at row {r}, column {c}")
    if w2.size == 0:
        return np.zeros(0, np.uint8)
    out = np.empty((rows, cols // fmt.qk, fmt.block_bytes), np.uint8)
    bad = np.empty(rows, np.int64)
    kernel(w2, q2, out, bad)
    hit = np.flatnonzero(bad >= 0)
    if hit.size:
        r = int(hit[0])
        raise fmt.range_error(w2, r, int(bad[r]))
    return out.reshape(-1)


# ---- qmatmul: the k-quants as integers, and mode "q8_k" ---------------------------------------
# Every k-quant super-block is, for ggml's dot products, integers and two float32 scales:
#     weight = dw * sc[s] * qi  -  mw * mi[s]        (s = the sub-block of 16 holding the weight)
# qi int8 (Q4_K/Q5_K/Q2_K: q; Q6_K: q - 32; Q3_K: q - 4), sc/mi the small integer sub-block scales
# and minimums (Q4_K/Q5_K repeat each 32-sub-block's pair twice), dw = h(d), mw = h(dmin) (0 for
# the symmetric Q3_K/Q6_K). Mode "q8_k" quantizes each activation row per 256 as ggml's
# quantize_row_q8_K_ref (float32 scale dx, int8 qx, int16 sums of 16 bsum) and computes, per
# super-block, ggml's ggml_vec_dot_<type>_q8_K:
#     (dw*dx) * sum_s sc[s] * sum_{i in s} qi*qx  -  (mw*dx) * sum_s mi[s] * bsum[s]
# with exact integer sums; super-blocks are summed in float32 (ggml spreads the first sum over
# eight float32 lanes: only the order of float additions differs).


def quantize_q8_K_ref(x: np.ndarray):
    """ggml's quantize_row_q8_K_ref on rows x (n, cols): (d float32 (n, nb), qs int8 (n, nb, 256),
    bsums int16 (n, nb, 16)). max = first_absmax; iscale = -127/max; q = min(127, nearest_int(iscale*x))
    stored in an int8; d = 1/iscale; an all-zero block has d = 0, q = 0."""
    n, cols = x.shape
    xb = np.ascontiguousarray(x, np.float32).reshape(-1, QK_K)
    with np.errstate(all="ignore"):
        amax, mx = _amax_signed_np(xb)
        iscale = F32(-127) / mx
        v = np.minimum(nearest_int_np(iscale[:, None] * xb), 127)
        qs = (v & 255).astype(np.uint8).view(np.int8)
        zero = amax == 0
        qs[zero] = 0
        d = np.where(zero, F32(0), F32(1) / iscale).astype(np.float32)
    bs = qs.reshape(-1, 16, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
    nb = cols // QK_K
    return d.reshape(n, nb), qs.reshape(n, nb, QK_K), bs.reshape(n, nb, 16)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _q8k_blocks(x, d, qs, bs, t0, t1):
    nb = x.shape[1] // QK_K
    for t in range(t0, t1):
        r = t // nb
        b = t - r * nb
        c = b * QK_K
        amax = np.float32(0.0)
        mx = np.float32(0.0)
        for i in range(QK_K):
            a = abs(x[r, c + i])
            if a > amax:
                amax = a
                mx = x[r, c + i]
        if amax == 0:
            d[r, b] = 0
            for i in range(QK_K):
                qs[r, b, i] = 0
            for s in range(16):
                bs[r, b, s] = 0
            continue
        iscale = np.float32(-127.0) / mx
        for i in range(QK_K):
            v = min(127, nearest_int(iscale * x[r, c + i])) & 255
            qs[r, b, i] = v - 256 if v > 127 else v
        for s in range(16):
            acc = 0
            for i in range(16):
                acc += np.int64(qs[r, b, 16 * s + i])
            bs[r, b, s] = acc
        d[r, b] = np.float32(1.0) / iscale


def quantize_q8_K(x: np.ndarray):
    """The numba twin of quantize_q8_K_ref (same outputs)."""
    n, cols = x.shape
    nb = cols // QK_K
    d = np.empty((n, nb), np.float32)
    qs = np.empty((n, nb, QK_K), np.int8)
    bs = np.empty((n, nb, 16), np.int16)
    x = np.ascontiguousarray(x, np.float32)
    # Python threads over ranges of 64+ blocks (a few blocks are not worth waking threads for), not a
    # parallel=True driver: the same speed, and a cold start compiles only _q8k_blocks (families.parallel_rows).
    parallel_rows(_q8k_blocks, n * nb, QK_K, x, d, qs, bs, weights=64 * QK_K)
    return d, qs, bs


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _dot_rows(wi, mi, dw, mw, xa, xsub, dx, out, r0, r1):
    """out[k, r] = sum over super-blocks b of (dw*dx) * (wi . xa) - (mw*dx) * (mi . xsub).

    wi (rows, nb, 256) int16 = sc*qi (each weight's integer times its sub-block scale), mi (rows, nb, 16)
    int16, dw/mw (rows, nb) float32; xa (n, nb, 256) float32: the activations (mode f32) or their Q8_K
    quants as floats (mode q8_k); xsub (n, nb, 16): their sums over each sub-block of 16 (bsum for q8_k);
    dx (n, nb): 1 (f32) or the Q8_K scale. In mode q8_k each product is an exact integer in float32;
    the 256-long sums round only beyond 2**24 (ggml sums them exactly in int32: the results differ by
    float32 rounding). The loops run to trip counts known at run time (array shapes) so that LLVM
    vectorizes them instead of unrolling them into scalar code. Weight rows r0..r1-1, on Python threads
    (families.parallel_rows: a parallel=True driver compiled ~2x slower cold, for the same speed).
    """
    nb = dw.shape[1]
    n = dx.shape[0]
    L = xa.shape[2]
    S = xsub.shape[2]
    for r in range(r0, r1):
        for k in range(n):
            acc = np.float32(0.0)
            for b in range(nb):
                t = np.float32(0.0)
                for i in range(L):
                    t += np.float32(wi[r, b, i]) * xa[k, b, i]
                m = np.float32(0.0)
                for s in range(S):
                    m += np.float32(mi[r, b, s]) * xsub[k, b, s]
                acc += (dw[r, b] * dx[k, b]) * t - (mw[r, b] * dx[k, b]) * m
            out[k, r] = acc


def dot_q8k_ref(parts, x: np.ndarray) -> np.ndarray:
    """numpy reference of mode "q8_k": parts = (qi, sc, mi, dw, mw) of the weights (rows, nb, ...)."""
    qi, sc, mi, dw, mw = parts
    dx, qx, bs = quantize_q8_K_ref(x)
    rows, nb = dw.shape
    sub = np.einsum("rbsi,kbsi->krbs", qi.reshape(rows, nb, 16, 16).astype(np.int64),
                    qx.reshape(-1, nb, 16, 16).astype(np.int64))
    isum = (sub * sc[None].astype(np.int64)).sum(-1)
    msum = np.einsum("rbs,kbs->krb", mi.astype(np.int64), bs.astype(np.int64))
    terms = (dw[None] * dx[:, None]) * isum.astype(np.float32) - (mw[None] * dx[:, None]) * msum.astype(np.float32)
    return terms.astype(np.float64).sum(-1).astype(np.float32)


class KPrepared:
    """What prepare() returns for a k-quant: the bytes (which the int8 kernels of plugins/_kdot.py
    read as they are), their fp16 super-block scales as float32 (made on first use by those kernels:
    8 bytes per super-block), and the integer form of the portable and float-activation paths (made
    on first use by them only: int16 per weight, 3.5-7.6x the bytes). All pure functions of the bytes,
    so caching them is safe."""

    def __init__(self, data, rows, cols, int_parts, kind):
        self.data, self.rows, self.cols = data, rows, cols
        self.kind = kind  # "q4_k", ...: which _kdot kernel reads these bytes
        self._int_parts = int_parts
        self._parts = None
        self._scales = None

    @property
    def parts(self):
        """(wi, mi, dw, mw): wi = sc*qi per weight as int16 (|sc*qi| <= 127*32), for _dot_rows."""
        if self._parts is None:
            qi, sc, mi, dw, mw = self._int_parts(self.data, self.rows, self.cols)
            rows, nb = dw.shape
            wi = (qi.reshape(rows, nb, 16, 16).astype(np.int16) * sc[..., None]).reshape(rows, nb, QK_K)
            self._parts = (wi, mi, dw, mw)
        return self._parts

    @property
    def scales(self):
        """(dw, mw) float32 (rows, nb): the super-block d and dmin (0 where the format has none)."""
        if self._scales is None:
            from ._ggml import fp16_table

            nb = self.cols // QK_K
            blk = self.data.reshape(self.rows, nb, -1)
            lut = fp16_table()
            off_d, off_m = _D_OFFSETS[self.kind]

            def h(o):
                return lut[blk[:, :, o].astype(np.uint16) | (blk[:, :, o + 1].astype(np.uint16) << 8)]

            dw = h(off_d)
            mw = h(off_m) if off_m is not None else np.zeros_like(dw)
            self._scales = (np.ascontiguousarray(dw, np.float32), np.ascontiguousarray(mw, np.float32))
        return self._scales


#: byte offsets of d and dmin in each k-quant's super-block
_D_OFFSETS = {"q2_k": (80, 82), "q3_k": (108, None), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208, None)}


def q8k_path(kind: str, n: int, mode: str) -> str:
    """Format.kernel_path("qmatmul", n, mode) of the k-quants: "kdot-<isa>" (decode) or "kgemm-<isa>"
    (prefill) for mode q8_k on an int8 path (plugins/_kdot.py); else "int-<mode>" (_dot_rows) or
    prefill_path() ("tiles+blas-per-thread" or "blas-tiles")."""
    from . import _i8gemm, _kdot

    if mode == "q8_k" and _i8gemm.PATH != "portable":
        return f"{'kdot' if n < _kdot.MIN_ROWS[_i8gemm.PATH] else 'kgemm'}-{_i8gemm.PATH}"
    return prefill_path() if n >= Q8K_BLAS_MIN_ROWS else f"int-{mode}"


#: Activation rows from which mode "q8_k" goes to sgemm on dequantized operands.
Q8K_BLAS_MIN_ROWS = 8


def kquant_qmatmul(fmt, prep: KPrepared, x: np.ndarray, mode: str) -> np.ndarray:
    """x (n, cols) @ W.T for a k-quant in mode "f32" or "q8_k".

    Mode "q8_k" on a CPU with AVX2 (or VNNI): the int8 kernels of plugins/_kdot.py on the ggml bytes.
    Mode "f32", and "q8_k" on the portable path: up to Q8K_BLAS_MIN_ROWS - 1 rows a float kernel on
    the integer form (KPrepared.parts); from there sgemm on dequantized tiles (q8_k: on the
    dequantized activation quants d_x*q_x, exact products, so only the summation order differs)."""
    rows, cols = prep.rows, prep.cols
    n = x.shape[0]
    if mode == "q8_k":
        if not np.isfinite(x).all():
            from quantfmt.errors import NonFiniteError

            r, c = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
            raise NonFiniteError(
                f"{fmt.tag}: qmatmul mode 'q8_k': activations of shape {x.shape}: row {r}, column {c} is "
                f"{x[r, c]}; a non-finite activation cannot be quantized"
            )
        from . import _i8gemm, _kdot  # imported on first use: start-up stays light

        dx, qx, bs = quantize_q8_K(x)
        if _i8gemm.PATH != "portable":
            return _kdot.qmatmul(prep.kind, prep, dx, qx, bs)
        if n >= Q8K_BLAS_MIN_ROWS:
            return fmt._blas_tiles(prep.data, rows, cols, (qx.astype(np.float32) * dx[..., None]).reshape(x.shape))
        xa = qx.astype(np.float32)
        xsub = bs.astype(np.float32)
    else:
        if n >= Q8K_BLAS_MIN_ROWS:
            return fmt._blas_tiles(prep.data, rows, cols, x)
        dx = np.ones((n, cols // QK_K), np.float32)
        xa = x
        xsub = x.reshape(n, -1, 16).sum(axis=2, dtype=np.float32)
    wi, mi, dw, mw = prep.parts
    nb = cols // QK_K
    out = np.empty((n, rows), np.float32)
    parallel_rows(_dot_rows, rows, cols * n, wi, mi, dw, mw, np.ascontiguousarray(xa, np.float32).reshape(n, nb, QK_K),
                  np.ascontiguousarray(xsub, np.float32).reshape(n, nb, 16), dx, out)
    return out


class KQuant(GGMLFormat):
    """The class body the five k-quants share: super-blocks of 256 weights along a row, Q8_K
    activations in qmatmul mode "q8_k" over the prepared integer parts, importance weights. A
    subclass sets its tag, bytes, kernels, `int_parts`, `weighted_kernel` and `safe_abs`."""

    layout_version = 1
    vec_dot_type = "Q8_K"
    block_shape = (1, QK_K)
    rows_independent = True  # super-blocks of 256 along a row; importance weights are per column
    checks_finite = True  # each row kernel flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    modes = ("f32", "q8_k")
    # No exact refusal threshold (it depends on the block): every block below safe_abs fits.
    max_abs = None
    safe_abs: float = 0.0

    def kernel_path(self, op: str, n: int = 1, mode: str = "f32") -> str:
        # quantize: the sub-block searches run 16/32 lanes at a time in plugins/_klanes.py's vector IR
        # (generic LLVM vectors, on any CPU; a row of fewer than 16 sub-blocks takes the numba loop)
        if op == "quantize":
            return "vector-lanes"
        return q8k_path(self.tag.lower(), n, mode) if op == "qmatmul" else "numba"

    @staticmethod
    def int_parts(*args):  # pragma: no cover - supplied by the format
        raise NotImplementedError

    @staticmethod
    def weighted_kernel(*args):  # pragma: no cover - supplied by the format
        raise NotImplementedError

    def prepare(self, data, rows, cols):
        return KPrepared(data, rows, cols, self.int_parts, self.tag.lower())

    def _qmatmul(self, prep, rows, cols, x, mode):
        return kquant_qmatmul(self, prep, x, mode)

    def matvec_fn(self, prep, rows, cols, mode):
        # one row in mode q8_k on an int8 path: the activations' Q8_K and the decode in one call
        # (plugins/_kdot.py), where qmatmul spends ~0.03 ms per call around the kernel
        from . import _i8gemm, _kdot

        if mode != "q8_k" or _i8gemm.PATH == "portable":
            return None
        return _kdot.matvec_fn(prep.kind, prep)

    def quantize_weighted(self, w, quant_weights) -> np.ndarray:
        """Quantize with importance weights (ggml's imatrix; shape (cols,) or that of w), as
        ggml_quantize_chunk does when given one."""
        return weighted_input(self, w, quant_weights, self.weighted_kernel)
