"""Shared pieces of the ggml-compatible formats (Q4_0, Q8_0, Q4_1).

Owns: f32 -> fp16 rounding usable inside numba (numba cannot hold float16, so fp16
values travel as uint16 bit patterns), the NaN/inf test of a row that the quantizers'
row kernels share (has_nonfinite), and the activation quantizers of qmatmul mode
"q8_0" (Q8_0 and Q8_1 blocks exactly as ggml's CPU backend makes them). Quantize,
dequantize, get_rows and the scale RangeError of these formats are in
quantfmt.families.GGMLFormat.

Activation quantization follows ggml-cpu's x86 AVX/AVX2 `quantize_row_q8_0` /
`quantize_row_q8_1` (what llama.cpp runs on this kind of machine), which differ from the
`_ref` functions used for model files in two details:
    id = 127 / amax                  (one rounding; the reference's 1 / (amax / 127) has two)
    q  = round-half-to-even(x * id)  (the reference rounds half away from zero)
The Q8_1 block also carries s = fp16(d * sum(q)) with d = amax / 127 in float32
(the unrounded scale), which ggml pairs with Q4_1 weights.
This module is private (its name starts with "_"), so the registry does not load it
as a plugin.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from quantfmt.errors import NonFiniteError, RangeError
from quantfmt.families import fp16_table, n_chunks, parallel_rows  # noqa: F401  (re-exported for the format modules)
from quantfmt.format import NONFINITE_ROW  # noqa: F401  (re-exported: the row kernels' bad[r] code)

QK = 32  # weights per block, along a row, in every ggml format here
FP16_MAX_EXCL = 65520.0  # the smallest float32 magnitude that rounds to fp16 infinity


# ---- fp16 <-> f32 ----------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def f32_to_f16_bits(f):
    """fp16 bits of float32 `f`, rounded to nearest even (as numpy's astype(float16), ggml's
    GGML_FP32_TO_FP16 and the F16C instruction do). The caller guarantees |f| < 65520."""
    u = np.float32(f).view(np.uint32)
    sign = np.int64((u >> 16) & 0x8000)
    a = np.int64(u & 0x7FFFFFFF)
    if a >= 0x38800000:
        # >= 2**-14, a normal half: round the 23-bit mantissa to 10 bits (ties to even;
        # a carry correctly bumps the exponent), then rebias the exponent 127 -> 15.
        h = ((a + 0xFFF + ((a >> 13) & 1)) >> 13) - (112 << 10)
    else:
        # A subnormal half is an integer count of 2**-24. Scaling by 2**24 is exact, and
        # adding then subtracting 2**23 rounds to an integer, ties to even, in float32.
        af = np.uint32(a).view(np.float32)
        big = np.float32(8388608.0)
        h = np.int64((af * np.float32(16777216.0) + big) - big)
    return np.uint16(sign | h)


# ---- NaN/inf in a row, inside the quantizers' row kernels ------------------------------------
# Formats with Format.checks_finite skip quantize's whole-tensor scan (one thread, memory-bound: 10-15%
# of a fast quantizer's time); each row kernel calls this on the row it is about to quantize (read
# into L1 here, so the quantizer's own reads hit the cache) and writes bad[r] = NONFINITE_ROW instead.


@numba.njit(cache=True, inline="always")
def has_nonfinite(wr):
    """True when float32 wr (1-D, contiguous) holds a NaN or an infinity: the largest |bits| reaches the
    all-ones exponent 0x7F800000. An integer max over the bits, which LLVM vectorizes (a float test or a
    float max reduction does not vectorize without fast-math)."""
    bits = wr.view(np.int32)
    m = np.int32(0)
    for c in range(bits.size):
        v = np.int32(bits[c] & np.int32(0x7FFFFFFF))
        m = v if v > m else m  # (not max(): numba's builtin is one more cold compile per process)
    return m >= np.int32(0x7F800000)


# ---- activation quantizers of qmatmul mode "q8_0" --------------------------------------


def quantize_activations_ref(x: np.ndarray, with_sum: bool):
    """numpy reference of ggml's quantize_row_q8_0 (with_sum False) / quantize_row_q8_1.

    x: float32 (n, cols). Returns (d16 uint16 (n, nb), s16 uint16 (n, nb) or None,
    qs int8 (n, nb, 32)). Raises like `quantize_activations`.
    """
    _check_activations(x)
    n, cols = x.shape
    xb = x.reshape(n, cols // QK, QK).astype(np.float32)
    amax = np.abs(xb).max(axis=-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore", over="ignore"):
        idd = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    # ggml computes 127/amax; for amax below ~3.7e-37 that is inf (x*inf is inf or NaN and
    # the int conversion is undefined). Such a block's fp16 scale and sum are 0, so its
    # quants never reach a result: we make them 0.
    idd[~np.isfinite(idd)] = 0
    qs = np.rint(xb * idd[..., None]).astype(np.int8)
    _check_act_scale(x.shape, d, None)
    d16 = d.astype(np.float16).view(np.uint16)
    if not with_sum:
        return d16, None, qs
    s = d * qs.astype(np.int32).sum(axis=-1).astype(np.float32)
    _check_act_scale(x.shape, d, s)
    return d16, s.astype(np.float16).view(np.uint16), qs


@numba.njit(cache=True, nogil=True)
def _act_blocks(x, with_sum, d16, s16, qs, bad, i0, i1):
    # blocks i0..i1-1 (row-major over (n, cols/32)), on Python threads (families.parallel_rows): a
    # parallel=True driver compiled ~2x slower cold (every q8_0-mode format pays it), for the same speed
    nb = x.shape[1] // 32
    # 32, as a run-time value: constant 32-long loops are fully unrolled into scalar code, which
    # compiled ~2x slower (and runs no faster: numba has no SLP vectorizer)
    qk = x.shape[1] // nb
    for i in range(i0, i1):
        r = i // nb
        b = i - r * nb
        xb = x[r, b * qk : b * qk + qk]
        amax = np.float32(0.0)
        for j in range(qk):
            amax = max(amax, abs(xb[j]))
        d = amax / np.float32(127.0)
        idd = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        if not np.isfinite(idd):
            idd = np.float32(0.0)
        sq = 0
        for j in range(qk):
            q = np.rint(xb[j] * idd)
            qs[r, b, j] = np.int8(q)
            sq += np.int32(q)
        if not (d < np.float32(65520.0)):
            bad[i] = 1
            continue
        d16[r, b] = f32_to_f16_bits(d)
        if with_sum:
            s = d * np.float32(sq)
            if not (abs(s) < np.float32(65520.0)):
                bad[i] = 2
                continue
            s16[r, b] = f32_to_f16_bits(s)


def quantize_activations(x: np.ndarray, with_sum: bool, tag: str = "ggml"):
    """ggml's Q8_0 (with_sum False) or Q8_1 blocks of activations x (float32 (n, cols)).

    Returns (d16, s16 or None, qs) like the reference. NonFiniteError for NaN/inf in x;
    RangeError where ggml would store an infinite fp16 scale or sum.
    """
    _check_activations(x, tag)
    n, cols = x.shape
    nb = cols // QK
    d16 = np.empty((n, nb), np.uint16)
    s16 = np.zeros((n, nb), np.uint16)
    qs = np.empty((n, nb, QK), np.int8)
    bad = np.zeros(n * nb, np.uint8)
    x = np.ascontiguousarray(x, np.float32)  # one compiled signature for every caller
    parallel_rows(_act_blocks, n * nb, QK, x, with_sum, d16, s16, qs, bad)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        r, b = divmod(i, nb)
        xb = x[r, b * QK : (b + 1) * QK]
        what = "scale amax/127" if bad[i] == 1 else "block sum s = d*sum(q) (Q8_1)"
        _act_range_error(tag, x.shape, r, b, float(np.abs(xb).max()), what)
    return d16, (s16 if with_sum else None), qs


@numba.njit(cache=True, nogil=True)
def act_q8_0_row(x, lut, work, unsigned):
    """One activation row x (1, cols) float32 as ggml's Q8_0 blocks for the int8 decode kernels, in one
    call (the decode of one token: quantize_activations' checks, allocations and thread bookkeeping
    cost more than this kernel for a row of a few hundred values). Writes work's (act_row_work) qs
    (1, nb, 32) int8, dx (1, nb) float32 (the fp16 scale decoded by lut = fp16_table()) and cx (1, nb)
    int32, the kernels' accumulator start: -128 * sum(q) where the kernel's weights are stored unsigned
    (+128), else 0. Returns False, writing nothing meaningful, where quantize_activations would raise
    (a NaN/inf or a scale past fp16): the caller then takes that path for its error. No array is made
    here: numba compiles its allocators anew into every kernel that calls them (~1 s of a cold start)."""
    return _act_row(x, lut, work, unsigned, False)


@numba.njit(cache=True, nogil=True)
def act_q8_1_row(x, lut, work, unsigned):
    """act_q8_0_row with ggml's Q8_1 sums as well (Q4_1's and Q5_1's term): work's sx (1, nb) float32
    gets each block's fp16 s = d * sum(q), decoded. False where quantize_activations(with_sum=True)
    would raise."""
    return _act_row(x, lut, work, unsigned, True)


@numba.njit(cache=True, nogil=True)
def _act_row(x, lut, work, unsigned, with_sum):
    qs, _qs2, dx, cx, d16, bad, s16, sx = work[0], work[1], work[2], work[3], work[4], work[5], work[9], work[10]
    cols = x.shape[1]
    for j in range(cols):
        if not np.isfinite(x[0, j]):
            return False
    nb = cols // 32
    for b in range(nb):
        bad[b] = 0
    _act_blocks(x, with_sum, d16, s16, qs, bad, 0, nb)
    for b in range(nb):
        if bad[b]:
            return False
        dx[0, b] = lut[d16[0, b]]
        if with_sum:
            sx[0, b] = lut[s16[0, b]]
        sq = 0
        if unsigned:
            for j in range(32):
                sq += np.int32(qs[0, b, j])
        cx[0, b] = np.int32(-128) * sq
    return True


_ROW_WORK = threading.local()


def act_row_work(cols: int) -> tuple:
    """This thread's work space for act_q8_0_row / act_q8_1_row and a one-row decode driver, rows of
    `cols`: (qs (1, nb, 32) int8, qs as (1, cols), dx (1, nb) float32, cx (1, nb) int32, d16 (1, nb)
    uint16, bad (nb,) uint8, an empty m (0,) and sx (1, 0) float32, the drivers' work counter (1,)
    int64, then s16 (1, nb) uint16 and sx (1, nb) float32 for the Q8_1 sums). Made in Python once per
    thread and width (the kernels fill every part they read; the counter is reset by the caller), so
    that no kernel allocates."""
    # one per width, kept: a model's layers alternate widths (SmolLM2: 576 columns, then 1536 for
    # down), and making the eleven arrays again at each switch cost ~4.5 us, ~3% of a decoded token
    ws = getattr(_ROW_WORK, "by_cols", None)
    if ws is None:
        ws = _ROW_WORK.by_cols = {}
    w = ws.get(cols)
    if w is None:
        nb = cols // QK
        qs = np.empty((1, nb, QK), np.int8)
        w = ws[cols] = (qs, qs.reshape(1, nb * QK), np.empty((1, nb), np.float32), np.empty((1, nb), np.int32),
                        np.empty((1, nb), np.uint16), np.empty(nb, np.uint8), np.zeros(0, np.float32),
                        np.zeros((1, 0), np.float32), np.zeros(1, np.int64), np.empty((1, nb), np.uint16),
                        np.empty((1, nb), np.float32))
    return w


def _check_activations(x, tag="ggml"):
    if x.size and not np.isfinite(x).all():
        r, c = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
        raise NonFiniteError(
            f"{tag}: qmatmul mode 'q8_0': activations of shape {x.shape}: row {r}, column {c} is {x[r, c]}; "
            "a non-finite activation cannot be quantized"
        )


def _check_act_scale(shape, d, s):
    bad = ~(d < np.float32(FP16_MAX_EXCL))
    what = "scale amax/127"
    if s is not None:
        bad = ~(np.abs(s) < np.float32(FP16_MAX_EXCL))
        what = "block sum s = d*sum(q) (Q8_1)"
    if bad.any():
        r, b = (int(v) for v in np.argwhere(bad)[0])
        _act_range_error("ggml", shape, r, b, float(d[r, b]) * 127.0, what)


def _act_range_error(tag, shape, r, b, amax, what):
    raise RangeError(
        f"{tag}: qmatmul mode 'q8_0': activations of shape {tuple(shape)}: row {r}, "
        f"columns {b * QK}..{b * QK + QK - 1} (max |x| = {amax:g}): its {what} does not fit fp16 "
        "(must stay below 65520); "
        "use mode 'f32' for activations this large"
    )


def vec_dot_ref(qw, dw, x, mw=None):
    """numpy reference of ggml's block dot products, for every (activation row, weight row).

    qw: integer weight quants (rows, nb, 32) as the dot uses them (Q4_0: q - 8), dw: float32
    decoded fp16 scales (rows, nb); x: float32 activations (n, cols). Without mw this is
    ggml_vec_dot_{q4_0,q8_0}_q8_0: Q8_0 activations and, per block, sumi * (d_w * d_x) with
    sumi the exact integer dot and the scale product in float32. With mw (Q4_1's decoded
    minima) it is ggml_vec_dot_q4_1_q8_1: Q8_1 activations and an extra m_w * s_x per block.
    Blocks are summed in float64 here; ggml sums in float32 (the order differs anyway).
    """
    d16, s16, qx = quantize_activations_ref(x, with_sum=mw is not None)
    dx = d16.view(np.float16).astype(np.float32)
    sumi = np.einsum("rbj,nbj->nrb", qw.astype(np.int64), qx.astype(np.int64))
    terms = sumi * (dw[None, :, :] * dx[:, None, :]).astype(np.float32).astype(np.float64)
    if mw is not None:
        sx = s16.view(np.float16).astype(np.float32)
        terms += (mw[None, :, :] * sx[:, None, :]).astype(np.float32)
    return terms.sum(axis=-1).astype(np.float32)
