"""The scale search that ggml's two 4-bit non-linear formats share (IQ4_NL, IQ4_XS).

Owns the table V = kvalues_iq4nl, ggml's best_index_int8 on it, and the per-32-block search
of quantize_row_iq4_nl_impl (ntry = 7) that both formats run on each block of 32 weights,
twice: numpy, vectorized over many blocks (the references), and scalar numba (the kernels).
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
    sumqx = np.add.accumulate(wq * x, axis=1, dtype=np.float32)[:, -1]
    sumq2 = np.add.accumulate(wq * q, axis=1, dtype=np.float32)[:, -1]
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


@numba.njit(cache=True, inline="always")
def fit(xb, wt, idd, vf, bracket):
    sumqx = np.float32(0.0)
    sumq2 = np.float32(0.0)
    for j in range(32):
        q = vf[best_index(idd * xb[j], vf, bracket)]
        wq = wt[j] * q
        sumqx += wq * xb[j]
        sumq2 += wq * q
    return sumqx, sumq2


@numba.njit(cache=True)
def search_scale(xb, wt, vf, bracket):
    """The fitted scale of the block xb (32,) with weights wt (32,), as search_scales_ref."""
    amax = np.float32(0.0)
    mx = np.float32(0.0)
    for j in range(32):
        a = abs(xb[j])
        if a > amax:
            amax = a
            mx = xb[j]
    if amax < GROUP_MAX_EPS:
        return np.float32(0.0)
    d = -mx / vf[0]
    sumqx, sumq2 = fit(xb, wt, np.float32(1.0) / d, vf, bracket)
    d = sumqx / sumq2 if sumq2 > 0 else np.float32(0.0)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = fit(xb, wt, np.float32(itry - 127) / mx, vf, bracket)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d
