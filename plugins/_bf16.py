"""BF16's one numba kernel: float32 -> bfloat16 rounding in a single parallel pass.

Kept out of plain.py so that loading the plain formats (F32, F16, BF16, the integer buffers:
what every model file has) does not import numba; BF16's quantize imports this on first use.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from quantfmt.numba_threads import claim

# Weights a thread takes at a time, claimed from a counter (a descheduled thread delays one chunk,
# not its half), as F16's quantize does.
CHUNK = 1 << 16
_I32 = ir.IntType(32)


@intrinsic
def _round_bits(typingctx, x):
    """float32 bits x (uint32) -> (bf16 bits) | (overflow << 16), all in 32-bit arithmetic.

    numba computes uint32 arithmetic in 64 bits, which LLVM then vectorizes 8 lanes to a zmm with
    widening and narrowing around it: the same loop in numba ran at 1/3.5 of this one (38 against
    11 ms for 11008x4096 on 2 threads). With u = x & 0x7FFFFFFF and r = u + 0x7FFF + lsb,
    r >= 0x7F800000 exactly when the result is inf or the input was inf/NaN (r cannot wrap: r <=
    0x80007FFF); and x + 0x7FFF + lsb = sign + r mod 2**32, so the high half is ggml's rounding (a
    NaN's carry into the sign is flagged, never stored)."""
    sig = types.uint32(types.uint32)

    def codegen(context, builder, signature, args):
        (x,) = args

        def c(v):
            return ir.Constant(_I32, v)

        lsb = builder.and_(builder.lshr(x, c(16)), c(1))
        r = builder.add(builder.add(builder.and_(x, c(0x7FFFFFFF)), c(0x7FFF)), lsb)
        over = builder.zext(builder.icmp_unsigned(">=", r, c(0x7F800000)), _I32)
        h = builder.lshr(builder.add(builder.add(x, c(0x7FFF)), lsb), c(16))
        return builder.or_(h, builder.shl(over, c(16)))

    return sig, codegen


@numba.njit(cache=True, parallel=True)
def _bf16_round(u, out, threads):
    """Round float32 bits u (uint32, 1-D) to bfloat16 bits in out (uint16), nearest-even on the bit
    pattern; returns how many chunks hold a result that is infinite (overflow) or comes from a NaN/inf
    input (a NaN whose mantissa carries out of the rounding would otherwise pass as -0 or 0:
    BF16.checks_finite)."""
    nch = (u.size + CHUNK - 1) // CHUNK
    counter = np.empty(1, np.int64)
    counter[0] = 0
    overflow = 0
    for _t in numba.prange(threads):
        ch = claim(counter)
        while ch < nch:
            i0 = ch * CHUNK
            s, o = u[i0 : i0 + CHUNK], out[i0 : i0 + CHUNK]
            # a max, not an OR, of the flagged values: LLVM narrowed an OR reduction whose result only
            # bit 16 of was read into something that no longer vectorized (3x slower)
            top = np.uint32(0)
            for j in range(s.size):  # from 0 over slices: vectorized
                v = _round_bits(s[j])
                o[j] = np.uint16(v)
                top = max(top, v)
            overflow += top >> 16
            ch = claim(counter)
    return overflow


def bf16_round(u: np.ndarray, out: np.ndarray) -> int:
    """out = bfloat16 bits of the float32 bits u (both 1-D, C-contiguous); non-zero if any result is
    infinite or any input was inf/NaN."""
    return int(_bf16_round(u, out, numba.get_num_threads()))
