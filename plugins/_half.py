"""Half-precision kernels for F16 and BF16 (plain.py's formats): their bits to float32, and the decode dot product.

Owns every numba kernel that reads F16/BF16 weights: the conversion of rows to float32 (in parallel over
(row, column range) items for large dequantize/get_rows, on the calling thread for small ones and for
prefill's tiles), the matvec that decode uses (ranges of rows taken by Python threads one after another,
four rows per pass, converting on the fly, reading each weight byte once), prefill (each thread converts
its own tiles and multiplies them by a single-threaded sgemm, `prefill()`, where quantfmt.blas can set
numpy's OpenBLAS threads), and F16's quantize (vcvtps2ph, with F16C). Each exists per path, chosen at
run time from quantfmt.cpu (`path_f16()`):
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
from numba.core import cgutils, types
from numba.extending import intrinsic

from quantfmt import cpu, gemm
from quantfmt.families import gemm_tile_weights, parallel_rows, tiles_prefill
from quantfmt.families import prefill_threads as prefill_threads_shared
from quantfmt.numba_threads import claim

#: Whether the F16 kernels use F16C. numba compiles for the host CPU unless NUMBA_CPU_NAME /
#: NUMBA_CPU_FEATURES say otherwise (quantfmt.cpu); tests set this False to run the portable path here.
USE_F16C = cpu.has("f16c")

# Columns per work item of the conversion kernel: 64 KiB of float32, so one row of a wide tensor
# still splits across threads, and there are many more items than threads.
COL_CHUNK = 16384
# Weights a thread takes at a time in the conversion (numba.parallel_chunksize): threads take the next
# grab when done, not a fixed half each, so a thread that shares its core (another process, BLAS
# threads still spinning after a call) or is descheduled delays the loop by one grab, not by half the
# work. An 11008x4096 matrix is 172 grabs.
GRAB_WEIGHTS = 1 << 18
# Conversions of fewer weights than this run on the calling thread: 4 MiB of float32 out, ~1 ms of one
# core, where waking a thread pool and waiting for its slowest thread can cost more on a busy machine.
PARALLEL_MIN = 1 << 20
#: Weights per prefill tile when every thread runs its own sgemm (prefill()): 256 rows of 4096, 4 MiB
#: of float32, about one core's L2, so the sgemm reads the tile its own thread just wrote from cache.
PREFILL_TILE = 1 << 20
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


@intrinsic
def _fptrunc_half(typingctx, f):
    """fp16 bits (uint16) of float32 `f` rounded by LLVM's fptrunc: vcvtps2ph with F16C, in the MXCSR
    rounding mode (nearest-even unless someone changed it: numpy's cast assumes the same). The result is
    normal, subnormal, zero or infinity as IEEE says; FTZ does not apply to vcvtps2ph, and DAZ would only
    make a float32 subnormal input (far below fp16's smallest subnormal) the zero it rounds to anyway."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

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


# ---- quantize: float32 -> fp16 bits -------------------------------------------------------------
# numpy's astype(float16) then a separate finiteness pass ran at 0.5-1 GB/s; one parallel pass with
# vcvtps2ph, counting the results that overflowed to infinity, runs at memory speed. Only with F16C:
# elsewhere LLVM would call a compiler-rt helper numba's JIT may not link, and F16.quantize keeps numpy's
# cast. Chunks claimed from a counter (a descheduled thread delays one chunk, not its half).
QUANT_CHUNK = 1 << 16


@numba.njit(cache=True, parallel=True)
def f16_round_f16c(w, out, threads):
    """out[i] = fp16 bits of float32 w[i] (both 1-D), round-to-nearest-even; returns how many are
    infinite (inputs are finite: every one is an overflow)."""
    nch = (w.size + QUANT_CHUNK - 1) // QUANT_CHUNK
    counter = np.empty(1, np.int64)
    counter[0] = 0
    overflow = 0
    for _t in numba.prange(threads):
        ch = claim(counter)
        while ch < nch:
            i0 = ch * QUANT_CHUNK
            s, o = w[i0 : i0 + QUANT_CHUNK], out[i0 : i0 + QUANT_CHUNK]
            over = 0
            for j in range(s.size):  # from 0 over slices: vectorized
                h = _fptrunc_half(s[j])
                o[j] = h
                over += (h & np.uint16(0x7C00)) == np.uint16(0x7C00)
            overflow += over
            ch = claim(counter)
    return overflow


def f16_round(w: np.ndarray, out: np.ndarray) -> int | None:
    """out = fp16 bits of w (float32, 1-D, C-contiguous), nearest-even, where the F16C path runs (returns
    the number of overflows), else None (the caller casts with numpy)."""
    if not USE_F16C:
        return None
    return int(f16_round_f16c(w, out, numba.get_num_threads()))


# ---- decode: out[k, r] = sum_j w[r, j] * x[k, j], each weight read from memory once -------------
# Rows r0..r1-1 per call, on the calling thread (nogil): matvec() runs them over ranges of
# MATVEC_GRAB weights on numba.get_num_threads() Python threads, each taking the next range when done
# (quantfmt.families.parallel_rows). Measured at 11008x4096 BF16 on the loaded 2-core Xeon (load ~4,
# ratio to float32 `W @ x`, medians of 21 interleaved): a parallel=True kernel with prange's fixed
# halves 0.97x, the same with chunks claimed from an atomic counter 1.14-1.26x in that process (its
# region still waits for every numba thread to wake and join), these Python threads 0.56-0.63x.
# Four rows per pass share each load of x (four independent FMA chains, four weight streams in
# flight); each row is dotted with every activation row while it is in L1. One kernel per
# conversion (a converter passed in would not be cached).
MATVEC_GRAB = 1 << 20  # 256 rows of 4096: 43 ranges for 11008 rows, a few microseconds of Python each


# The F16C and BF16 dot products are written as 16-lane vectors in LLVM IR (_make_dot4): numba's
# own loop was vectorized by LLVM at 256 bits only (its preference on these Xeons, made for mixed
# code), and ran no faster than the memory; explicit <16 x float> is zmm where AVX-512 is, two ymm
# on AVX2 (LLVM splits it), NEON quads on ARM. What made the difference is the software prefetch
# PREFETCH bytes ahead in each of the four rows (measured at 11008x4096, one thread, ratio to float32
# `W @ x` in the same run: F16 0.53-0.59 -> 0.43, BF16 0.55-0.60 -> 0.46-0.52; on two threads under
# load BF16 0.52-0.64 -> 0.33-0.56, F16 0.86-1.18 -> 0.51-0.94): four row streams per thread are
# fewer than the hardware prefetcher needs to cover memory latency at this bandwidth.
_LANES = 16
_STEP = 2 * _LANES  # two accumulators per row: eight FMA chains in flight cover the FMA latency
PREFETCH = 1024
_I16, _I32, _I64, _F32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _make_dot4(kind: str):
    """The intrinsic dot4(w, x, r, k, nstep) -> four float32: rows r..r+3 of w (uint16 bits, or float32
    for kind "F32") dotted with activation row k of x over columns 0 .. nstep*_STEP-1 (the caller adds
    the rest)."""
    vi16, vi32, vf32 = (ir.VectorType(t, _LANES) for t in (_I16, _I32, _F32))
    elem, velem = (_F32, vf32) if kind == "F32" else (_I16, vi16)
    i8p = ir.IntType(8).as_pointer()

    @intrinsic
    def dot4(typingctx, w, x, r, k, nstep):
        sig = types.UniTuple(types.float32, 4)(w, x, r, k, nstep)

        def codegen(context, builder, signature, args):
            wa = context.make_array(signature.args[0])(context, builder, args[0])
            xa = context.make_array(signature.args[1])(context, builder, args[1])
            rv, kv, nv = args[2], args[3], args[4]

            def c64(v):
                return ir.Constant(_I64, v)

            # row pointers from the strides, so any row-contiguous view works (a memory-mapped file's)
            ws0, xs0 = builder.extract_value(wa.strides, 0), builder.extract_value(xa.strides, 0)
            wbase = builder.bitcast(wa.data, i8p)
            xrow = builder.bitcast(builder.gep(builder.bitcast(xa.data, i8p), [builder.mul(kv, xs0)]),
                                   _F32.as_pointer())
            wrows = [builder.bitcast(builder.gep(wbase, [builder.mul(builder.add(rv, c64(i)), ws0)]),
                                     elem.as_pointer()) for i in range(4)]
            mod = builder.module
            fma = mod.declare_intrinsic(f"llvm.fmuladd.v{_LANES}f32", (), ir.FunctionType(vf32, [vf32] * 3))
            prefetch = mod.declare_intrinsic("llvm.prefetch", (i8p,), ir.FunctionType(ir.VoidType(),
                                                                                     [i8p, _I32, _I32, _I32]))
            zero = ir.Constant(vf32, [0.0] * _LANES)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(4)]
            shift = ir.Constant(vi32, [16] * _LANES)

            def to_f32(h):
                if kind == "F32":
                    return h
                if kind == "BF16":  # the bits moved to the top half
                    return builder.bitcast(builder.shl(builder.zext(h, vi32), shift), vf32)
                return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), _LANES)), vf32)

            with cgutils.for_range(builder, nv) as loop:
                j = builder.mul(loop.index, c64(_STEP))
                xs = [builder.load(builder.bitcast(builder.gep(xrow, [builder.add(j, c64(u * _LANES))]),
                                                   vf32.as_pointer()), align=4) for u in range(2)]
                for i in range(4):
                    ahead = builder.gep(wrows[i], [builder.add(j, c64(PREFETCH // (4 if kind == "F32" else 2)))])
                    # read, keep in all cache levels, data
                    builder.call(prefetch, [builder.bitcast(ahead, i8p), ir.Constant(_I32, 0),
                                            ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
                    for u in range(2):
                        p = builder.gep(wrows[i], [builder.add(j, c64(u * _LANES))])
                        h = builder.load(builder.bitcast(p, velem.as_pointer()), align=2)
                        builder.store(builder.call(fma, [to_f32(h), xs[u], builder.load(accs[i][u])]), accs[i][u])
            sums = []
            for i in range(4):
                v = builder.fadd(builder.load(accs[i][0]), builder.load(accs[i][1]))
                n = _LANES
                while n > 1:  # halving tree: log2(16) adds
                    n //= 2
                    lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
                    hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
                    v = builder.fadd(lo, hi)
                sums.append(builder.extract_element(v, ir.Constant(_I32, 0)))
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return dot4


_dot4_f16c = _make_dot4("F16")
_dot4_bf16 = _make_dot4("BF16")
_dot4_f32 = _make_dot4("F32")


@numba.njit(cache=True, nogil=True, fastmath=FAST)
def matvec_f16c(w, x, out, r0, r1):
    cols = w.shape[1]
    n = x.shape[0]
    nstep = cols // _STEP
    r = r0
    while r + 4 <= r1:
        for k in range(n):
            a0, a1, a2, a3 = _dot4_f16c(w, x, r, k, nstep)
            xk = x[k]
            for j in range(nstep * _STEP, cols):
                xv = xk[j]
                a0 += f16_dot_f16c(w[r, j]) * xv
                a1 += f16_dot_f16c(w[r + 1, j]) * xv
                a2 += f16_dot_f16c(w[r + 2, j]) * xv
                a3 += f16_dot_f16c(w[r + 3, j]) * xv
            out[k, r], out[k, r + 1], out[k, r + 2], out[k, r + 3] = a0, a1, a2, a3
        r += 4
    while r < r1:
        wr = w[r]
        for k in range(n):
            xk = x[k]
            acc = np.float32(0.0)
            for j in range(cols):
                acc += f16_dot_f16c(wr[j]) * xk[j]
            out[k, r] = acc
        r += 1


@numba.njit(cache=True, nogil=True, fastmath=FAST)
def matvec_f16_portable(w, x, out, r0, r1):
    cols = w.shape[1]
    n = x.shape[0]
    r = r0
    while r + 4 <= r1:
        w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
        for k in range(n):
            xk = x[k]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for j in range(cols):
                xv = xk[j]
                a0 += f16_portable(w0[j]) * xv
                a1 += f16_portable(w1[j]) * xv
                a2 += f16_portable(w2[j]) * xv
                a3 += f16_portable(w3[j]) * xv
            out[k, r], out[k, r + 1], out[k, r + 2], out[k, r + 3] = a0, a1, a2, a3
        r += 4
    while r < r1:
        wr = w[r]
        for k in range(n):
            xk = x[k]
            acc = np.float32(0.0)
            for j in range(cols):
                acc += f16_portable(wr[j]) * xk[j]
            out[k, r] = acc
        r += 1


@numba.njit(cache=True, nogil=True, fastmath=FAST)
def matvec_bf16(w, x, out, r0, r1):
    cols = w.shape[1]
    n = x.shape[0]
    nstep = cols // _STEP
    r = r0
    while r + 4 <= r1:
        for k in range(n):
            a0, a1, a2, a3 = _dot4_bf16(w, x, r, k, nstep)
            xk = x[k]
            for j in range(nstep * _STEP, cols):
                xv = xk[j]
                a0 += bf16_shift(w[r, j]) * xv
                a1 += bf16_shift(w[r + 1, j]) * xv
                a2 += bf16_shift(w[r + 2, j]) * xv
                a3 += bf16_shift(w[r + 3, j]) * xv
            out[k, r], out[k, r + 1], out[k, r + 2], out[k, r + 3] = a0, a1, a2, a3
        r += 4
    while r < r1:
        wr = w[r]
        for k in range(n):
            xk = x[k]
            acc = np.float32(0.0)
            for j in range(cols):
                acc += bf16_shift(wr[j]) * xk[j]
            out[k, r] = acc
        r += 1


@numba.njit(cache=True, nogil=True, fastmath=FAST)
def matvec_f32(w, x, out, r0, r1):
    cols = w.shape[1]
    n = x.shape[0]
    nstep = cols // _STEP
    r = r0
    while r + 4 <= r1:
        for k in range(n):
            a0, a1, a2, a3 = _dot4_f32(w, x, r, k, nstep)
            xk = x[k]
            for j in range(nstep * _STEP, cols):
                xv = xk[j]
                a0 += w[r, j] * xv
                a1 += w[r + 1, j] * xv
                a2 += w[r + 2, j] * xv
                a3 += w[r + 3, j] * xv
            out[k, r], out[k, r + 1], out[k, r + 2], out[k, r + 3] = a0, a1, a2, a3
        r += 4
    while r < r1:
        wr = w[r]
        for k in range(n):
            xk = x[k]
            acc = np.float32(0.0)
            for j in range(cols):
                acc += wr[j] * xk[j]
            out[k, r] = acc
        r += 1


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
    """out (n, rows) = x (n, cols) @ w.T for w the uint16 bits (rows, cols), kind "F16" or "BF16", or
    w float32 (rows, cols), kind "F32"."""
    rows, cols = w.shape
    if kind == "F32":
        kernel = matvec_f32
    else:
        kernel = matvec_bf16 if kind == "BF16" else matvec_f16c if USE_F16C else matvec_f16_portable
    parallel_rows(kernel, rows, cols, w, x, out, weights=MATVEC_GRAB)
    return out


# ---- prefill: float32 tiles of W, one sgemm per thread ---------------------------------------------
# Each thread takes the next range of rows (quantfmt.families.parallel_rows), converts it into its own
# tile (on that thread, into cache) and multiplies it by a single-threaded sgemm (quantfmt.blas): no
# thread waits for another at every tile, as with one converting thread and BLAS's own threads (which
# split each call into fixed shares, so every call waits for a descheduled one, while a core idles
# during each conversion). The result is written in place: out[:, r0:r1] is a BLAS-able strided
# matrix (ldc = rows), so no transposing copy either.

def prefill_threads() -> int:
    """Threads prefill() runs its sgemms on, or 0 where it cannot run (BLAS threads not settable:
    prefill then goes tile by tile to BLAS's own threads) or would use one thread only."""
    return prefill_threads_shared()


def prefill_tile(n: int, cols: int) -> int:
    """Weights per prefill() tile for n activation rows: 2n rows of W, within [PREFILL_TILE, 4 PREFILL_TILE].
    Every sgemm packs all of x again, so the more activation rows, the taller the tile that pays for it
    (measured at 11008x4096, loaded 2-core Xeon, ratio to float32: n=512, 128-row tiles 1.21x, 256 1.07x,
    1024 0.98x; n=128, 128 to 512 rows alike, 0.93-0.98x). quantfmt.gemm packs x once per call: there
    families.gemm_tile_weights."""
    if gemm.use():
        return max(cols, gemm_tile_weights(n, PREFILL_TILE))
    return min(max(PREFILL_TILE, 2 * n * cols), 4 * PREFILL_TILE)


def prefill(kind: str, w: np.ndarray, x: np.ndarray, tile_weights: int = 0) -> np.ndarray:
    """x (n, cols) @ w.T for w the uint16 bits (rows, cols), as float32 tiles each multiplied by one
    thread's sgemm; kind "F16" or "BF16". Only where prefill_threads() is not 0."""
    rows, cols = w.shape
    tile_weights = tile_weights or prefill_tile(x.shape[0], cols)
    idx = np.arange(rows, dtype=np.int64)

    def fill(r0: int, r1: int, buf: np.ndarray) -> None:
        tile_to_f32(kind, w, idx[r0:r1], buf)

    # the driver every format's f32 batches share (families.tiles_prefill)
    return tiles_prefill(fill, rows, cols, x, tile_rows=max(1, tile_weights // cols))
