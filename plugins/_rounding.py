"""round_half_away: the rounding quantfmt's own formats (Q8_A, Q8_B) specify, in numpy and numba.

formats.md defines it once: t = trunc(v); t + 1 if v - t >= 0.5, t - 1 if v - t <= -0.5, else t.
v - t is exact in float64, so this is an exact round-half-away-from-zero, unlike floor(v + 0.5),
whose addition can round. The numba twin is compiled without fastmath so both agree bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np


def round_half_away(v: np.ndarray) -> np.ndarray:
    """Round float64 to the nearest integer, halves away from zero (numpy reference)."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0.0)


@numba.njit(cache=True)
def round_half_away_scalar(v):
    """The same for one float64, inside numba kernels."""
    t = np.trunc(v)
    d = v - t
    if d >= 0.5:
        t += 1.0
    elif d <= -0.5:
        t -= 1.0
    return t
