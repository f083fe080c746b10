"""The scale search that ggml's two 4-bit non-linear formats share (IQ4_NL, IQ4_XS).

Owns the table V = kvalues_iq4nl, ggml's best_index_int8 on it, and the per-32-block search
of quantize_row_iq4_nl_impl (ntry = 7) that both formats run on each block of 32 weights,
twice: numpy, vectorized over many blocks (the references), and numba on one block (the kernels).
What differs between the formats (where the importance weights' sigma2 comes from, how the
block scale is stored) stays in plugins/iq4_nl.py and plugins/iq4_xs.py; the exact arithmetic
is in their docstrings.

This module is private (its name starts with "_"), so the registry does not load it.
"""

from __future__ import annotations

import numba
import numpy as np

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
NTRY = 7
GROUP_MAX_EPS = np.float32(1e-15)

VF = KVALUES.astype(np.float32)
# For a in (-127, 113): BRACKET[floor(a) + 127] = l with V[l] <= a < V[l+1] (V are integers).
BRACKET = (np.searchsorted(KVALUES, np.arange(-127, 113), side="right") - 1).astype(np.int8)

# ---- numpy reference: blocks of 32 in the rows of 2-D arrays -------------------------------


def best_index_ref(a: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, a), elementwise on float32 a."""
    a = np.asarray(a, np.float32)
    with np.errstate(invalid="ignore"):
        mu = np.clip(np.searchsorted(VF, a, side="right"), 1, 15)
        lo, hi = VF[mu - 1], VF[mu]
        out = np.where((a - lo) < (hi - a), mu - 1, mu)
        out = np.where(a <= VF[0], 0, np.where(a >= VF[15], 15, out))
    return np.where(np.isnan(a), 14, out).astype(np.uint8)


def fit_ref(x, wt, idd):
    """(L, sumqx, sumq2) for scales idd (n,), sums in ggml's order (sequential over j)."""
    L = best_index_ref(x * idd[:, None])
    q = VF[L]
    wq = wt * q
    # ggml's sums start from +0.0 (`float sumqx = 0`): a leading zero column makes accumulate do the
    # same, which only matters when every term is -0.0 (the sum is then +0.0, not -0.0)
    z = np.zeros((x.shape[0], 1), np.float32)
    sumqx = np.add.accumulate(np.concatenate([z, wq * x], axis=1), axis=1, dtype=np.float32)[:, -1]
    sumq2 = np.add.accumulate(np.concatenate([z, wq * q], axis=1), axis=1, dtype=np.float32)[:, -1]
    return L, sumqx, sumq2


def search_scales_ref(x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """The fitted float32 scale d of each block of x (n, 32) with weights wt (n, 32); 0 for a
    block whose max |x| is below GROUP_MAX_EPS."""
    n = x.shape[0]
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        i = np.abs(x).argmax(axis=1)  # the first of equal maxima, as ggml's strict `>`
        mx = x[np.arange(n), i]
        small = np.abs(mx) < GROUP_MAX_EPS
        mxs = np.where(small, np.float32(1), mx)  # keeps the arithmetic of skipped blocks finite
        d = -mxs / VF[0]
        _, sumqx, sumq2 = fit_ref(x, wt, np.float32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, np.float32(0)).astype(np.float32)
        best = d * sumqx
        for itry in range(-NTRY, NTRY + 1):
            idd = np.float32(itry + int(KVALUES[0])) / mxs
            _, sumqx, sumq2 = fit_ref(x, wt, idd)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d).astype(np.float32)
            best = np.where(better, d * sumqx, best).astype(np.float32)
    return np.where(small, np.float32(0), d).astype(np.float32)


# ---- numba: one block of 32 -----------------------------------------------------------------
# best_index is the final pass's (NaN included); search_scale runs the 16 fits interleaved.
# No fastmath: FMA would change last bits, and `ninf`/`nnan` would break the IEEE
# comparisons of overflowing sums that the search relies on.


@numba.njit(cache=True, inline="always")
def best_index(a, vf, bracket):
    # best_index_int8 without the binary search: V are integers, so floor(a) finds the
    # bracket; the final comparison is ggml's, in float32.
    if a <= vf[0]:
        return 0
    if a >= vf[15]:
        return 15
    if a != a:
        return 14
    lo = np.int64(bracket[np.int64(np.floor(a)) + 127])
    return lo if (a - vf[lo]) < (vf[lo + 1] - a) else lo + 1


@numba.njit(cache=True, error_model="numpy")
def search_scale(xb, wt, vf, bracket, scratch):
    """The fitted scale of the block xb (32,) with weights wt (32,), as search_scales_ref;
    scratch: float32 (3, 16), work space.

    The 16 fits (the first guess and itry = -7..7) run side by side, one lane each, element by
    element: each lane's sums still accumulate in element order (the same roundings as one fit
    after the other), and the 16 independent chains keep the CPU busy where one fit's sums
    would wait on each other (2x on these machines). In a fit |id*x| <= 134 (|x| <= max,
    max >= 1e-15), never NaN, so the table index needs no NaN case: the clamped floor finds
    the bracket, and the two ends are selected after."""
    amax = np.float32(0.0)
    mx = np.float32(0.0)
    for j in range(32):
        a = abs(xb[j])
        if a > amax:
            amax = a
            mx = xb[j]
    if amax < GROUP_MAX_EPS:
        return np.float32(0.0)
    ids = scratch[0]
    sqx = scratch[1]
    sq2 = scratch[2]
    ids[0] = np.float32(1.0) / (-mx / vf[0])
    for t in range(2 * NTRY + 1):
        ids[t + 1] = np.float32(t - NTRY - 127) / mx  # (itry + V[0]) / max, itry = t - 7
    n = ids.shape[0]
    for t in range(n):
        sqx[t] = 0
        sq2[t] = 0
    v0 = vf[0]
    v15 = vf[15]
    for j in range(32):
        xj = xb[j]
        wj = wt[j]
        for t in range(n):
            a = ids[t] * xj
            lo = np.int64(bracket[np.int64(np.floor(min(max(a, np.float32(-127.0)), np.float32(112.0)))) + 127])
            vl = vf[lo]
            vh = vf[lo + 1]
            q = vl if (a - vl) < (vh - a) else vh
            q = v0 if a <= v0 else q
            q = v15 if a >= v15 else q
            wq = wj * q
            sqx[t] += wq * xj
            sq2[t] += wq * q
    d = sqx[0] / sq2[0] if sq2[0] > 0 else np.float32(0.0)
    best = d * sqx[0]
    for t in range(1, n):
        if sq2[t] > 0 and sqx[t] * sqx[t] > best * sq2[t]:
            d = sqx[t] / sq2[t]
            best = d * sqx[t]
    return d
