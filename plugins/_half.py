"""Half-precision kernels for F16 and BF16 (plain.py's formats): their bits to float32, and the decode dot product.

Owns every numba kernel that reads F16/BF16 weights: the conversion of rows to float32 (in parallel over
(row, column range) items for large dequantize/get_rows, on the calling thread for small ones and for
prefill's tiles, which go to BLAS), and the matvec that decode uses (parallel over row chunks, converting
on the fly, reading each weight byte once). Each exists per path, chosen at run time from quantfmt.cpu
(`path_f16()`):
  "f16c"      F16 -> float32 by LLVM's `fpext half to float`, which LLVM lowers to vcvtph2ps (F16C) or
              vcvtph2psx (AVX512-FP16); only compiled where the CPU has F16C (elsewhere LLVM would emit a
              call to a compiler-rt helper numba's JIT may not link).
  "portable"  F16 -> float32 by integer arithmetic (below), any CPU; LLVM vectorizes it too.
  "shift"     BF16 -> float32 is the 16 bits moved to the top of a 32-bit word, on every CPU.
AVX512-BF16 (vdpbf16ps) and AMX-BF16 multiply bf16 by bf16: they would need the float32 activations
rounded to bf16, which breaks qmatmul's promise of float32 activations, so they are not used.

Exactness: dequantize and get_rows give numpy's `astype(float32)` bit for bit, NaN included. numpy keeps a
NaN's sign and payload exactly, the signalling bit too (0x7C01 -> 0x7F802000), while vcvtph2ps quiets a
signalling NaN (-> 0x7FC02000): the F16C kernels therefore rebuild every inf/NaN from its bits (all but
the prefill tiles', whose NaNs only feed BLAS, where any NaN gives the same NaN result). The
portable conversion never computes with a subnormal float (a subnormal fp16 is its 10-bit integer
mantissa, converted exactly, times 2**-24, a normal float32), so a process with denormals-are-zero set by
some other library still gets exact results. qmatmul sums in a different order than BLAS (reassociation
and FMA are allowed there, compared with a tolerance); infinities and NaNs propagate as IEEE says, as
no-NaN/no-inf fast-math flags are not used.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from quantfmt import cpu

#: Whether the F16 kernels use F16C. numba compiles for the host CPU unless NUMBA_CPU_NAME /
#: NUMBA_CPU_FEATURES say otherwise (quantfmt.cpu); tests set this False to run the portable path here.
USE_F16C = cpu.has("f16c")

# Columns per work item of the conversion kernel: 64 KiB of float32, so one row of a wide tensor
# still splits across threads, and there are many more items than threads.
COL_CHUNK = 16384
# Rows per work item of the matvec: with 4096 columns, 16 rows are 128 KiB of fp16.
ROW_CHUNK = 16
# Weights a thread takes at a time from a parallel loop (numba.parallel_chunksize): threads take the
# next items when done (dynamic scheduling), not a fixed half each, so a thread that shares its core
# (another process, BLAS threads still spinning after a call) or is descheduled delays the loop by
# one grab, not by half the work. An 11008x4096 matrix is 172 grabs; measured on a loaded 2-core
# machine: 2-thread decode 1.6x -> 1.16x the float32 time.
GRAB_WEIGHTS = 1 << 18
# Conversions of fewer weights than this run on the calling thread: 4 MiB of float32 out, ~1 ms of one
# core, where waking a thread pool and waiting for its slowest thread can cost more on a busy machine.
PARALLEL_MIN = 1 << 20
# reassociation and contraction (FMA) let LLVM vectorize the dot product's sum; nnan/ninf are left
# out on purpose: weights may be inf or NaN and must propagate.
FAST = {"reassoc", "contract"}


@intrinsic
def _fpext_half(typingctx, h):
    """float32 value of fp16 bits (uint16), by LLVM's fpext: vcvtph2ps with F16C."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _as_f32(typingctx, u):
    """The float32 whose bits are the uint32 `u` (a bit cast, no instruction)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def f16_portable(typingctx, h):
    """float32 value of fp16 bits `h` (uint16), exactly, by integer arithmetic in plain LLVM IR (any CPU;
    written in IR so the lanes stay 32-bit: numba would widen the integer arithmetic to 64 bits).
    Selects, no branches, so LLVM vectorizes it."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()

        def c(v):
            return ir.Constant(i32, v)

        x = builder.zext(args[0], i32)
        em = builder.and_(x, c(0x7FFF))
        shifted = builder.shl(em, c(13))
        # normal: exponent rebiased (127 - 15 = 112, i.e. + 0x38000000 once shifted), mantissa moved up 13
        normal = builder.add(shifted, c(0x38000000))
        # inf and NaN: all-ones exponent, payload kept (a signalling NaN stays signalling, as numpy)
        special = builder.or_(shifted, c(0x7F800000))
        # zero and subnormal: the 10-bit mantissa times 2**-24, exact (an integer below 1024 times a power
        # of two, a normal float32): no subnormal float is computed with, so denormals-are-zero is harmless
        small = builder.bitcast(builder.fmul(builder.sitofp(em, f32), ir.Constant(f32, 2.0**-24)), i32)
        bits = builder.select(builder.icmp_unsigned("<", em, c(0x0400)), small,
                              builder.select(builder.icmp_unsigned(">=", em, c(0x7C00)), special, normal))
        sign = builder.shl(builder.and_(x, c(0x8000)), c(16))
        return builder.bitcast(builder.or_(bits, sign), f32)

    return sig, codegen


@intrinsic
def f16_f16c(typingctx, h):
    """float32 value of fp16 bits `h` by vcvtph2ps, with infinities and NaNs rebuilt from the bits as
    numpy does (vcvtph2ps would set a signalling NaN's quiet bit). Only where the CPU has F16C."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        x = builder.zext(args[0], i32)
        f = builder.fpext(builder.bitcast(args[0], ir.HalfType()), f32)
        exp_ones = builder.icmp_unsigned("==", builder.and_(x, ir.Constant(i32, 0x7C00)), ir.Constant(i32, 0x7C00))
        # sign moved up 16, all-ones exponent, payload moved up 13 (the 0x7C00 bits land on 0x0F800000,
        # inside the exponent already all ones)
        special = builder.or_(builder.or_(builder.shl(builder.and_(x, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16)),
                                          ir.Constant(i32, 0x7F800000)),
                              builder.shl(builder.and_(x, ir.Constant(i32, 0x7FFF)), ir.Constant(i32, 13)))
        return builder.select(exp_ones, builder.bitcast(special, f32), f)

    return sig, codegen


@numba.njit(cache=True, inline="always")
def f16_dot_f16c(h):
    """fp16 bits to float32 by vcvtph2ps alone: for sums, where a NaN's payload does not matter."""
    return _fpext_half(h)


@numba.njit(cache=True, inline="always")
def bf16_shift(h):
    """float32 value of bf16 bits `h`: the same bits in the top half of a float32, exact for every value."""
    return _as_f32(np.uint32(h) << np.uint32(16))


# ---- conversion to float32 ------------------------------------------------------------------------
# One kernel per path (a kernel that took the converter as an argument would not be cached on disk).
# rows_*: rows `idx` of a (rows, cols) uint16 matrix, in parallel; the work items are (row, column
# range) pairs, so one row or a few rows still use every thread (dequantize, get_rows).
# gather_*: the same on the calling thread, for prefill's tiles and small requests. Between two BLAS
# calls, whose threads are still spinning, a parallel region would fight them for the cores, and on a
# busy machine every parallel region waits for its slowest (descheduled) thread (measured on a loaded
# 2-core machine: 64 rows by get_rows 100x slower in parallel, prefill tiles 2-10x); one thread
# converts a tile at the speed the next sgemm needs, and 64 rows in tens of microseconds.


@numba.njit(cache=True, parallel=True)
def rows_f16c(src, idx, out):
    cols = src.shape[1]
    ncc = (cols + COL_CHUNK - 1) // COL_CHUNK
    for item in numba.prange(idx.size * ncc):
        k, c0 = item // ncc, item % ncc * COL_CHUNK
        c1 = min(cols, c0 + COL_CHUNK)
        s, o = src[idx[k], c0:c1], out[k, c0:c1]
        for j in range(c1 - c0):  # from 0 over slices: LLVM vectorizes this (an offset range it did not)
            o[j] = f16_f16c(s[j])


@numba.njit(cache=True, parallel=True)
def rows_f16_portable(src, idx, out):
    cols = src.shape[1]
    ncc = (cols + COL_CHUNK - 1) // COL_CHUNK
    for item in numba.prange(idx.size * ncc):
        k, c0 = item // ncc, item % ncc * COL_CHUNK
        c1 = min(cols, c0 + COL_CHUNK)
        s, o = src[idx[k], c0:c1], out[k, c0:c1]
        for j in range(c1 - c0):  # from 0 over slices: LLVM vectorizes this (an offset range it did not)
            o[j] = f16_portable(s[j])


@numba.njit(cache=True, parallel=True)
def rows_bf16(src, idx, out):
    cols = src.shape[1]
    ncc = (cols + COL_CHUNK - 1) // COL_CHUNK
    for item in numba.prange(idx.size * ncc):
        k, c0 = item // ncc, item % ncc * COL_CHUNK
        c1 = min(cols, c0 + COL_CHUNK)
        s, o = src[idx[k], c0:c1], out[k, c0:c1]
        for j in range(c1 - c0):  # from 0 over slices: LLVM vectorizes this (an offset range it did not)
            o[j] = bf16_shift(s[j])


@numba.njit(cache=True, nogil=True)
def gather_f16c(src, idx, out):
    for k in range(idx.size):
        s, o = src[idx[k]], out[k]
        for j in range(src.shape[1]):
            o[j] = f16_f16c(s[j])


@numba.njit(cache=True, nogil=True)
def tile_f16c(src, idx, out):
    # vcvtph2ps alone (a NaN's payload may differ from numpy's, no matter for a tile BLAS multiplies:
    # the product is NaN either way); twice the speed of the exact conversion when `out` is in L2.
    for k in range(idx.size):
        s, o = src[idx[k]], out[k]
        for j in range(src.shape[1]):
            o[j] = f16_dot_f16c(s[j])


@numba.njit(cache=True, nogil=True)
def gather_f16_portable(src, idx, out):
    for k in range(idx.size):
        s, o = src[idx[k]], out[k]
        for j in range(src.shape[1]):
            o[j] = f16_portable(s[j])


@numba.njit(cache=True, nogil=True)
def gather_bf16(src, idx, out):
    for k in range(idx.size):
        s, o = src[idx[k]], out[k]
        for j in range(src.shape[1]):
            o[j] = bf16_shift(s[j])


# ---- decode: out[k, r] = sum_j w[r, j] * x[k, j], each weight read from memory once -------------
# Row chunks are the parallel items; within a chunk each row is dotted with every activation row
# while it is in L1.


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def matvec_f16c(w, x, out):
    rows, cols = w.shape
    n = x.shape[0]
    for ch in numba.prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        for r in range(ch * ROW_CHUNK, min(rows, (ch + 1) * ROW_CHUNK)):
            wr = w[r]
            for k in range(n):
                xk = x[k]
                acc = np.float32(0.0)
                for j in range(cols):
                    acc += f16_dot_f16c(wr[j]) * xk[j]
                out[k, r] = acc


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def matvec_f16_portable(w, x, out):
    rows, cols = w.shape
    n = x.shape[0]
    for ch in numba.prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        for r in range(ch * ROW_CHUNK, min(rows, (ch + 1) * ROW_CHUNK)):
            wr = w[r]
            for k in range(n):
                xk = x[k]
                acc = np.float32(0.0)
                for j in range(cols):
                    acc += f16_portable(wr[j]) * xk[j]
                out[k, r] = acc


@numba.njit(cache=True, parallel=True, fastmath=FAST)
def matvec_bf16(w, x, out):
    rows, cols = w.shape
    n = x.shape[0]
    for ch in numba.prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        for r in range(ch * ROW_CHUNK, min(rows, (ch + 1) * ROW_CHUNK)):
            wr = w[r]
            for k in range(n):
                xk = x[k]
                acc = np.float32(0.0)
                for j in range(cols):
                    acc += bf16_shift(wr[j]) * xk[j]
                out[k, r] = acc


def path_f16() -> str:
    """The F16 path the kernels take here: "f16c" or "portable"."""
    return "f16c" if USE_F16C else "portable"


def to_f32(kind: str, src: np.ndarray, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[k] = float32 of row idx[k] of `src` (uint16 (rows, cols)); kind "F16" or "BF16". In parallel
    only when the work is large enough to pay for waking the threads (PARALLEL_MIN weights)."""
    if idx.size * src.shape[1] >= PARALLEL_MIN:
        with numba.parallel_chunksize(max(1, GRAB_WEIGHTS // min(src.shape[1], COL_CHUNK))):
            if kind == "BF16":
                rows_bf16(src, idx, out)
            elif USE_F16C:
                rows_f16c(src, idx, out)
            else:
                rows_f16_portable(src, idx, out)
    elif kind == "BF16":
        gather_bf16(src, idx, out)
    elif USE_F16C:
        gather_f16c(src, idx, out)
    else:
        gather_f16_portable(src, idx, out)
    return out


def tile_to_f32(kind: str, src: np.ndarray, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
    """to_f32 on the calling thread, whatever the size, for prefill's tiles (between BLAS calls); with
    F16C a NaN comes out as some NaN, not necessarily numpy's bits."""
    if kind == "BF16":
        gather_bf16(src, idx, out)
    elif USE_F16C:
        tile_f16c(src, idx, out)
    else:
        gather_f16_portable(src, idx, out)
    return out


def matvec(kind: str, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (n, rows) = x (n, cols) @ w.T for w the uint16 bits (rows, cols); kind "F16" or "BF16"."""
    with numba.parallel_chunksize(max(1, GRAB_WEIGHTS // (ROW_CHUNK * w.shape[1]))):
        if kind == "BF16":
            matvec_bf16(w, x, out)
        elif USE_F16C:
            matvec_f16c(w, x, out)
        else:
            matvec_f16_portable(w, x, out)
    return out
