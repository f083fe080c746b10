"""BF16's one numba kernel: float32 -> bfloat16 rounding in a single parallel pass.

Kept out of plain.py so that loading the plain formats (F32, F16, BF16, the integer buffers:
what every model file has) does not import numba; BF16's quantize imports this on first use.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, parallel=True)
def bf16_round(u, out):
    """Round float32 bits u (uint32) to bfloat16 bits in out (uint16), nearest-even on the bit
    pattern; returns how many results are infinite (overflow) or come from a NaN/inf input (a NaN
    whose mantissa carries out of the rounding would otherwise pass as -0 or 0: BF16.checks_finite)."""
    overflow = 0
    for i in numba.prange(u.size):
        x = u[i]
        h = (x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        out[i] = np.uint16(h)
        inf = np.uint32(0x7F800000)
        overflow += ((h & np.uint32(0x7F80)) == np.uint32(0x7F80)) | ((x & inf) == inf)
    return overflow
