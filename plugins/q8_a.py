"""Q8_A: quantfmt's own 8-bit format with one scale per 128 weights DOWN A COLUMN.

From the llama2.c quantization brainstorm (karpathy/llama2.c issue 277). A block is
128 consecutive rows of one column (block_shape (128, 1)); its only parameter is the
float32 scale s = max |w| over the block, and each weight is an int8 q in [-127, 127].

Byte layout (little-endian), per row group of 128 rows (g = 0, 1, ...):
    float32 scales[cols]          scales[c] = s of block (rows 128g .. 128g+127, column c)
    int8    q[128][cols]          row-major: q[r][c] for row 128g + r
so a row group is 132 * cols bytes (132 bytes per block of 128 = 8.25 bits per weight),
and row i reads only its group's scales and its own cols bytes of q.

Arithmetic (formats.md is normative; this is the same text):
    s = max_i |w_i|                               exact in float32
    s == 0:  q_i = 0
    else:    v_i = (float64(w_i) * 127.0) / float64(s)   (the product is exact; one rounding)
             q_i = clamp(round_half_away(v_i), -127, 127)
    dequantize: w'_i = float32((float64(q_i) * float64(s)) / 127.0)
round_half_away(v) = t + sign(v) if |v - t| >= 0.5 else t, with t = trunc(v) (v - t is
exact, so there is no `floor(v + 0.5)` double-rounding trap). Float64 keeps both huge
(3e38 * 127) and tiny (subnormal s, 127 / s) magnitudes in range.

The historical bug this format is known for: scales computed from m[i:i+QK] (rows i..)
instead of m[i*QK:(i+1)*QK] (the block's own rows). tests/test_own_formats.py checks
every block's scale against the block's own rows.
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.families import KernelFormat, decode_threads, parallel_rows
from quantfmt.numba_threads import claim

from ._ggml import NONFINITE_ROW, has_nonfinite
from ._rounding import round_half_away, round_half_away_scalar

QK = 128  # rows per block (= rows per row group)
GROUP_BYTES_PER_COL = 4 + QK  # one float32 scale + 128 int8 per column


# ---- numpy reference ------------------------------------------------------------------


def pack(scales: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Bytes from scales float32 (G, cols) and q int8 (G, 128, cols)."""
    g, cols = scales.shape
    out = np.empty((g, GROUP_BYTES_PER_COL * cols), np.uint8)
    out[:, : 4 * cols] = scales.astype("<f4").view(np.uint8).reshape(g, 4 * cols)
    out[:, 4 * cols :] = q.view(np.uint8).reshape(g, QK * cols)
    return out.reshape(-1)


def unpack(data: np.ndarray, rows: int, cols: int):
    """Views (no copy): scales float32 (G, cols), q int8 (G, 128, cols)."""
    g = rows // QK
    b = data.reshape(g, GROUP_BYTES_PER_COL * cols)
    scales = b[:, : 4 * cols].view("<f4")
    q = b[:, 4 * cols :].view(np.int8).reshape(g, QK, cols)
    return scales, q


def quantize_ref(w: np.ndarray) -> np.ndarray:
    """float32 (rows, cols), rows % 128 == 0 -> Q8_A bytes."""
    rows, cols = w.shape
    wb = w.reshape(rows // QK, QK, cols)  # wb[g, r, c] = w[128g + r, c]: block (g, c) is wb[g, :, c]
    s = np.abs(wb).max(axis=1)
    s64 = np.where(s > 0, s, 1).astype(np.float64)[:, None, :]
    v = wb.astype(np.float64) * 127.0 / s64
    q = np.clip(round_half_away(v), -127, 127).astype(np.int8)
    return pack(s.astype(np.float32), q)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    scales, q = unpack(data, rows, cols)
    w = (q.astype(np.float64) * scales.astype(np.float64)[:, None, :] / 127.0).astype(np.float32)
    return w.reshape(rows, cols)


# ---- numba kernels --------------------------------------------------------------------
# Quantize and dequantize are compiled WITHOUT fastmath: they must match the reference
# bit for bit. qmatmul uses fastmath (reassociation for vector reductions, FMA).


# Every driver is Python (families.parallel_rows: ranges of row groups on numba.get_num_threads()
# Python threads, each taking the next range when done) over a cached nogil kernel of a range: a
# parallel=True prange driver cost a cold start seconds per kernel (numba's parfor passes, the body
# compiled again inside the gufunc), and in decode its region waited for every numba thread to wake.
# One kernel serves get_rows, dequantize and the prefill tiles.
_NEAR_HALF = 2.0**-40


@numba.njit(cache=True, nogil=True)
def _quantize_groups(w, out, bad, g0, g1):
    rows, cols = w.shape
    inv = np.empty(cols)  # 1 / s per column of the group
    gb = GROUP_BYTES_PER_COL * cols
    for g in range(g0, g1):
        base = g * gb
        sc = out[base : base + 4 * cols].view(np.float32)
        q = out[base + 4 * cols : base + gb].view(np.int8).reshape(QK, cols)
        wg = w[g * QK : (g + 1) * QK]  # the block's own rows
        for c in range(cols):
            sc[c] = np.float32(0.0)
        flagged = False
        for r in range(QK):
            # each row tested as it enters L1 for the max (checks_finite: quantize does not scan first);
            # a group with NaN/inf is left unquantized (quantize raises)
            if has_nonfinite(wg[r]):
                bad[g * QK + r] = NONFINITE_ROW
                flagged = True
                break
            for c in range(cols):
                a = abs(wg[r, c])
                if a > sc[c]:
                    sc[c] = a
        if flagged:
            continue
        # v = (w * 127) / s by a multiplication with inv = 1 / s (a division per column and group, not per
        # weight: a vdivpd is ~16 cycles per 8 lanes); inv = 0 where s = 0 gives those blocks' q = 0.
        # inv is correctly rounded, so v' = (w * 127) * inv is within 3 * 2**-53 * 127 < 2**-44 of
        # formats.md's v; round_half_away is continuous except at half-integers, so v' rounds as v does
        # unless v' is within 2**-40 of one: then that row takes the division as written.
        for c in range(cols):
            inv[c] = 1.0 / np.float64(sc[c]) if sc[c] > 0 else 0.0
        for r in range(QK):
            near = 0
            for c in range(cols):  # branch-free round_half_away, so the loop vectorizes
                v = np.float64(wg[r, c]) * 127.0 * inv[c]
                t = np.trunc(v)
                d = v - t
                near += abs(abs(d) - 0.5) < _NEAR_HALF
                t = t + 1.0 if d >= 0.5 else t
                t = t - 1.0 if d <= -0.5 else t
                q[r, c] = np.int8(min(max(t, -127.0), 127.0))
            if near:
                for c in range(cols):
                    s = sc[c]
                    if s == 0:
                        q[r, c] = 0
                    else:
                        v = round_half_away_scalar(np.float64(wg[r, c]) * 127.0 / np.float64(s))
                        v = min(max(v, -127.0), 127.0)
                        q[r, c] = np.int8(v)


def _quantize_kernel(w, out, bad):
    parallel_rows(_quantize_groups, w.shape[0] // QK, QK * w.shape[1], w, out, bad, weights=QK * 128)


# Dequantize multiplies by 1/127 where formats.md divides, and gets the same float32 bits: P = q * s is
# exact in float64 (8 x 24 bits), both P / 127 and P * fl64(1/127) are within 2**-52 (relative) of the
# exact quotient v, and rounding either to float32 gives RN32(v): v is either a float32 (127 divides q*S,
# S the 24-bit significand of s: then q*S/127 < 2**24) or not dyadic, and then at least 2**-32 (relative)
# away from every float32 rounding midpoint (v - M has numerator a multiple of M's half ulp, over 127).
# Checked on 2M random scales over every exponent (subnormals included) and every q, and on 2M scales
# whose significand 127 divides: no difference. A vdivpd costs ~16 cycles per 8 lanes, a vmulpd 0.5.
_R127 = 1.0 / 127.0


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(data, cols, idx, out, k0, k1):
    # out[k] = row idx[k] for k in k0..k1-1; touches only that row's group scales and the row's own bytes.
    gb = GROUP_BYTES_PER_COL * cols
    for k in range(k0, k1):
        g = idx[k] // QK
        r = idx[k] - g * QK
        base = g * gb
        sc = data[base : base + 4 * cols].view(np.float32)
        q = data[base + 4 * cols + r * cols : base + 4 * cols + (r + 1) * cols].view(np.int8)
        for c in range(cols):
            out[k, c] = np.float32(np.float64(q[c]) * np.float64(sc[c]) * _R127)


def _get_rows_kernel(data, cols, idx, out):
    # on a prefill thread (families.tiles_prefill) parallel_rows runs inline
    parallel_rows(_dequantize_rows, idx.size, cols, data, cols, idx, out)


def _dequantize_kernel(data, rows, cols, out):
    _get_rows_kernel(data, cols, np.arange(rows, dtype=np.int64), out)


# Decode drivers: one claim loop per thread (families.parallel_rows with one "row" per thread), each
# taking the next chunk of rows from an atomic counter (quantfmt.numba_threads.claim) until none is left:
# a descheduled thread's chunks go to the one that runs, and no chunk costs a Python call (ranges
# handed out by parallel_rows cost a dispatch each: ~10% of an 11008x4096 decode, measured interleaved).
@numba.njit(cache=True, nogil=True, fastmath=True)
def _matvec_groups(data, cols, x, out, counter, groups, _t0, _t1):
    # out[k, i] = sum_c s[g, c] * q[i, c] / 127 * x[k, c]: fold the column scales into x once
    # per group (xs = s * x / 127), then each row is a plain int8 x float32 dot product.
    gb = GROUP_BYTES_PER_COL * cols
    n = x.shape[0]
    xs = np.empty(cols, np.float32)
    g = claim(counter)
    while g < groups:
        base = g * gb
        sc = data[base : base + 4 * cols].view(np.float32)
        q = data[base + 4 * cols : base + gb].view(np.int8).reshape(QK, cols)
        for k in range(n):
            for c in range(cols):
                xs[c] = sc[c] * x[k, c] * np.float32(1.0 / 127.0)
            for r in range(0, QK, 4):  # four rows per pass: four FMA chains share each xs load
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for c in range(cols):
                    xv = xs[c]
                    a0 += np.float32(q[r, c]) * xv
                    a1 += np.float32(q[r + 1, c]) * xv
                    a2 += np.float32(q[r + 2, c]) * xv
                    a3 += np.float32(q[r + 3, c]) * xv
                i = g * QK + r
                out[k, i], out[k, i + 1], out[k, i + 2], out[k, i + 3] = a0, a1, a2, a3
        g = claim(counter)


# ---- the format -----------------------------------------------------------------------


class Q8_A(KernelFormat):
    tag = "Q8_A"
    rows_independent = True  # each group of 128 rows has its own column scales
    layout_version = 1
    block_shape = (QK, 1)
    block_bytes = 4 + QK
    summary = "int8, one float32 absmax scale per 128 weights down a column (llama2.c brainstorm)"
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # the row kernel flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)
    get_rows_kernel = staticmethod(_get_rows_kernel)

    def matvec(self, prep, rows, cols, x, out):
        # under families.MIN_THREADED_WEIGHTS the calling thread alone (decode_threads)
        parallel_rows(_matvec_groups, decode_threads(rows, cols), 1, prep[0], cols, x, out, np.zeros(1, np.int64),
                      rows // QK, weights=1)


@quantfmt.hookimpl
def register_formats(register):
    register(Q8_A())
