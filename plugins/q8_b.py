"""Q8_B: quantfmt's own 8-bit format, 128 weights ALONG A ROW with a mean and a scale.

From the llama2.c quantization brainstorm (karpathy/llama2.c issue 277). A block is 128
consecutive weights of one row (block_shape (1, 128)); it stores the block mean m and the
scale s = max |w - m|, and each weight as int8 q of (w - m) * 127 / s.

Byte layout (little-endian), per block (blocks in row-major order, a row = cols/128 blocks):
    float32 s          offset 0
    float32 m          offset 4
    int8    q[128]     offset 8: q[j] for weight j of the block
136 bytes per block of 128 = 8.5 bits per weight. A row group is one row.

Arithmetic (formats.md is normative; this is the same text):
    m   = float32(S / 128.0), S = sequential float64 sum of float64(w_0), ..., float64(w_127)
          starting from +0.0 (index order: this fixes every rounding)
    r_j = float64(w_j) - float64(m)
    s   = float32(max_j |r_j|)        (a RangeError if that overflows float32)
    s == 0:  q_j = 0
    else:    q_j = clamp(round_half_away((r_j * 127.0) / float64(s)), -127, 127)
    dequantize: w'_j = float32(float64(m) + (float64(q_j) * float64(s)) / 127.0)
Each operation is one IEEE float64 operation in the order written (no FMA).
round_half_away(v) = t + sign(v) if |v - t| >= 0.5 else t, with t = trunc(v).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

import quantfmt
from quantfmt.errors import RangeError
from quantfmt.families import KernelFormat, decode_threads, parallel_rows
from quantfmt.numba_threads import claim

from ._ggml import NONFINITE_ROW, has_nonfinite
from ._rounding import round_half_away

QK = 128
BLOCK_BYTES = 8 + QK


# ---- numpy reference ------------------------------------------------------------------


def pack(s: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Bytes from s, m float32 (nblocks,) and q int8 (nblocks, 128)."""
    out = np.empty((s.size, BLOCK_BYTES), np.uint8)
    out[:, 0:4] = s.astype("<f4").view(np.uint8).reshape(-1, 4)
    out[:, 4:8] = m.astype("<f4").view(np.uint8).reshape(-1, 4)
    out[:, 8:] = q.view(np.uint8)
    return out.reshape(-1)


def unpack(data: np.ndarray):
    """Views (no copy): s, m float32 (nblocks,), q int8 (nblocks, 128)."""
    b = data.reshape(-1, BLOCK_BYTES)
    return b[:, 0:4].view("<f4")[:, 0], b[:, 4:8].view("<f4")[:, 0], b[:, 8:].view(np.int8)


def quantize_ref(w: np.ndarray) -> np.ndarray:
    """float32 (rows, cols), cols % 128 == 0 -> Q8_B bytes."""
    wb = w.reshape(-1, QK).astype(np.float64)  # one block per row of wb
    acc = np.zeros(wb.shape[0])
    for j in range(QK):  # the sequential sum, in index order
        acc = acc + wb[:, j]
    m = (acc / 128.0).astype(np.float32)
    r = wb - m.astype(np.float64)[:, None]
    s = np.abs(r).max(axis=1).astype(np.float32)
    s64 = np.where(s > 0, s, 1).astype(np.float64)[:, None]
    q = np.clip(round_half_away(r * 127.0 / s64), -127, 127).astype(np.int8)
    return pack(s, m, q)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    s, m, q = unpack(data)
    w = m.astype(np.float64)[:, None] + q.astype(np.float64) * s.astype(np.float64)[:, None] / 127.0
    return w.astype(np.float32).reshape(rows, cols)


# ---- numba kernels --------------------------------------------------------------------
# Quantize and dequantize: no fastmath, bit-identical to the reference. qmatmul: fastmath.


_NEAR_HALF = 2.0**-40


@intrinsic
def _bits_to_f32(typingctx, x):
    """The float32 with the low 32 bits of integer x (a bitcast: no array to view)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@numba.njit(cache=True, inline="always")
def _key_to_float(key):
    """The float32 whose order-preserving key (bits with the magnitude flipped for negatives) is key."""
    return _bits_to_f32(key ^ ((key >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@numba.njit(cache=True, inline="always")
def _quantize_block(w, u, row, b, m, hdr, q, k):
    """Block b of `row` given its mean m: s, then q (the reference's float64 operations)."""
    m64 = np.float64(m)
    # s = max_j |fl64(w_j - m)|: fl64(w - m) is nondecreasing in w, so that is the larger of
    # |fl64(wmax - m)| and |fl64(wmin - m)|, exactly (abs, not a negation: +0.0 for a zero block).
    # wmin, wmax: integer min/max of order-preserving keys of the bits u (a float min/max reduction
    # does not vectorize without fastmath).
    kmin = np.int32(0x7FFFFFFF)
    kmax = np.int32(-0x80000000)
    for j in range(QK):
        x = u[row, b * QK + j]
        key = x ^ ((x >> np.int32(31)) & np.int32(0x7FFFFFFF))
        kmin = min(kmin, key)
        kmax = max(kmax, key)
    wmin = np.float64(_key_to_float(kmin))
    wmax = np.float64(_key_to_float(kmax))
    s = np.float32(max(abs(wmax - m64), abs(wmin - m64)))
    hdr[k, 0] = s
    hdr[k, 1] = m
    if s == 0:
        for j in range(QK):
            q[k, 8 + j] = 0
        return
    s64 = np.float64(s)
    # v = (r * 127) / s by a multiplication with inv = 1 / s (one division per block, not per weight: a
    # vdivpd is ~16 cycles per 8 lanes). inv is correctly rounded, so v' = (r * 127) * inv is within
    # 3 * 2**-53 * 127 < 2**-44 of formats.md's v. round_half_away is continuous except at half-integers,
    # so v' rounds as v does unless one of them is within 2**-44 of a half-integer: a weight whose v'
    # is within 2**-40 of one (structured data: small integers, constant blocks) sends the whole block
    # through the division as written.
    inv = 1.0 / s64
    near = 0
    for j in range(QK):  # branch-free round_half_away, so the loop vectorizes
        v = (np.float64(w[row, b * QK + j]) - m64) * 127.0 * inv
        t = np.trunc(v)
        d = v - t
        near += abs(abs(d) - 0.5) < _NEAR_HALF
        t = t + 1.0 if d >= 0.5 else t
        t = t - 1.0 if d <= -0.5 else t
        q[k, 8 + j] = np.int8(min(max(t, -127.0), 127.0))
    if near:
        for j in range(QK):
            v = (np.float64(w[row, b * QK + j]) - m64) * 127.0 / s64
            t = np.trunc(v)
            d = v - t
            t = t + 1.0 if d >= 0.5 else t
            t = t - 1.0 if d <= -0.5 else t
            q[k, 8 + j] = np.int8(min(max(t, -127.0), 127.0))


_V16F = ir.VectorType(ir.FloatType(), 16)
_V8D = ir.VectorType(ir.DoubleType(), 8)


def _mask(idx):
    return ir.Constant(ir.VectorType(ir.IntType(32), len(idx)), list(idx))


@intrinsic
def _sums16(typingctx, src, off, sums):
    """sums[0:16] (float64) <- the sums of 16 consecutive blocks of 128 float32 at src's flat offset off (src:
    the weights' bits, C-contiguous), each the sequential float64 sum in index order from +0.0 (formats.md).
    Per 16 weights of every block: 16 vector loads, a 16x16 transpose (4 rounds of block swaps, two
    shuffles per pair) so that vector j holds weight j of each block, then 16 ordered 8-lane float64
    additions: each block's chain in its own lane, in its own order. (Scalar chains: ~1 cycle a weight.)"""
    sig = types.none(src, off, sums)

    def codegen(context, builder, signature, args):
        sp = builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data, [args[1]])
        fp = builder.bitcast(sp, ir.FloatType().as_pointer())
        acc = [ir.Constant(_V8D, [0.0] * 8), ir.Constant(_V8D, [0.0] * 8)]
        for j0 in range(0, QK, 16):
            v = []
            for t in range(16):
                at = builder.gep(fp, [ir.Constant(ir.IntType(64), t * QK + j0)])
                v.append(builder.load(builder.bitcast(at, _V16F.as_pointer()), align=4))
            for b in (8, 4, 2, 1):
                for r in range(16):
                    if r & b:
                        continue
                    lo = [lane if lane & b == 0 else 16 + lane - b for lane in range(16)]
                    hi = [lane + b if lane & b == 0 else 16 + lane for lane in range(16)]
                    v[r], v[r + b] = (builder.shuffle_vector(v[r], v[r + b], _mask(lo)),
                                      builder.shuffle_vector(v[r], v[r + b], _mask(hi)))
            for j in range(16):
                for h in range(2):
                    half = builder.shuffle_vector(v[j], v[j], _mask(list(range(8 * h, 8 * h + 8))))
                    acc[h] = builder.fadd(acc[h], builder.fpext(half, _V8D))
        op = context.make_array(signature.args[2])(context, builder, args[2]).data
        for h in range(2):
            at = builder.gep(op, [ir.Constant(ir.IntType(64), 8 * h)])
            builder.store(acc[h], builder.bitcast(at, _V8D.as_pointer()), align=8)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _quantize_rows(w, u, hdr, q, bad, r0, r1):
    # hdr: float32 (rows * nb, 34), the bytes seen as float32 (136 = 4 * 34): (s, m) at 0, 1;
    # q: int8 (rows * nb, 136), the bytes seen as int8: q[j] at 8 + j. Both views are made once
    # by the caller: slicing views per block costs more than the block's arithmetic. u: w's bits as int32.
    nb = w.shape[1] // QK
    cols = w.shape[1]
    acc = np.empty(16)
    means = np.empty(nb, np.float32)
    for row in range(r0, r1):
        if has_nonfinite(w[row]):  # (checks_finite: quantize does not scan the tensor first)
            bad[row] = NONFINITE_ROW
            continue
        # Each block's sum is one sequential chain in index order (the spec fixes it): sixteen blocks'
        # chains side by side in vectors (_sums16), the rest one chain at a time.
        for b0 in range(0, nb - nb % 16, 16):
            _sums16(u, row * cols + b0 * QK, acc)
            for t in range(16):
                means[b0 + t] = np.float32(acc[t] / 128.0)
        for b in range(nb - nb % 16, nb):
            a = 0.0
            for j in range(QK):
                a += np.float64(w[row, b * QK + j])
            means[b] = np.float32(a / 128.0)
        for b in range(nb):  # one inlined copy of the block's body (cold start: each copy compiles)
            _quantize_block(w, u, row, b, means[b], hdr, q, row * nb + b)


# Every driver is Python (families.parallel_rows: ranges of rows on numba.get_num_threads() Python
# threads, each taking the next range when done; ~64K weights a range in quantize, so a descheduled
# thread holds up one small range) over a cached nogil kernel of a range: a parallel=True prange driver
# cost a cold start seconds per kernel (numba's parfor passes, the body compiled again inside the
# gufunc), and in decode its region waited for every numba thread to wake. One row kernel serves
# get_rows, dequantize and the prefill tiles.
ROW_CHUNK = 64  # rows per claim in decode (a multiple of 4)


def _quantize_kernel(w, out, bad):
    hdr = out.view(np.float32).reshape(-1, BLOCK_BYTES // 4)
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, w.view(np.int32), hdr,
                  out.view(np.int8).reshape(-1, BLOCK_BYTES), bad)


# Dequantize computes formats.md's float64 quotient (q * s) / 127 without a division (vdivpd: ~16 cycles
# per 8 lanes, the prefill tiles' bottleneck): d0 = p * fl64(1/127) is within an ulp of p / 127, the
# residual p - 127 * d0 is exact in one FMA, and d0 + residual * fl64(1/127) rounded once is the correctly
# rounded quotient (Markstein's theorem: the reciprocal correctly rounded, the first quotient within an
# ulp; p = q * s is exact and far from float64's underflow). Checked against the division on 2M random
# scales over every exponent and every q: no difference. Without an FMA unit llvm.fma is libm's fma.
_R127 = 1.0 / 127.0


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma.f64; vectorized with the loop around it)."""
    if not all(isinstance(t, types.Float) for t in (a, b, c)):
        return None
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        d = ir.DoubleType()
        args = [context.cast(builder, v, t, types.float64) for v, t in zip(args, signature.args, strict=True)]
        return builder.call(builder.module.declare_intrinsic("llvm.fma", [d], ir.FunctionType(d, [d, d, d])), args)

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _get_rows_range(data, cols, idx, out, k0, k1):
    # The bytes seen as float32 and int8 once per call (views sliced per block cost more than the
    # block's arithmetic): (s, m) at float32 index 34 * block, q at byte 136 * block + 8.
    nb = cols // QK
    hdr = data.view(np.float32)
    q = data.view(np.int8)
    for k in range(k0, k1):
        for b in range(nb):
            o = (idx[k] * nb + b) * BLOCK_BYTES
            s = np.float64(hdr[o // 4])
            m = np.float64(hdr[o // 4 + 1])
            qb = q[o + 8 : o + BLOCK_BYTES]  # a slice, so the loop's indices are plain (it vectorizes)
            ob = out[k, b * QK : (b + 1) * QK]
            for j in range(QK):
                p = np.float64(qb[j]) * s  # exact: 8 x 24 bits
                d0 = p * _R127
                d = _fma(_fma(-d0, 127.0, p), _R127, d0)  # == p / 127.0, correctly rounded (Markstein)
                ob[j] = np.float32(m + d)


def _get_rows_kernel(data, cols, idx, out):
    # on a prefill thread (families.tiles_prefill) parallel_rows runs inline
    parallel_rows(_get_rows_range, idx.size, cols, data, cols, idx, out)


def _dequantize_kernel(data, rows, cols, out):
    _get_rows_kernel(data, cols, np.arange(rows, dtype=np.int64), out)


_V16B = ir.VectorType(ir.IntType(8), 16)


@intrinsic
def _rows4_block(typingctx, acc, blocks, off, rstride, x, x_off, s0, s1, s2, s3):
    """acc[16i:16i+16] += s_i * (q x) lane-wise for rows i = 0..3 of one block: q the 128 int8 at byte
    blocks[off + i * rstride:] (flat), x[x_off:x_off+128]. The block's dot stays in 16 lanes, scaled by
    the row's s/127 in one FMA: no horizontal sum per block (one per row, at the end). Generic LLVM
    vectors: 16 int8 -> float32 and an FMA per 16 weights and row, four rows' chains side by side."""
    sig = types.none(acc, blocks, off, rstride, x, x_off, s0, s1, s2, s3)

    def codegen(context, builder, signature, args):
        ap = context.make_array(signature.args[0])(context, builder, args[0]).data
        bp = context.make_array(signature.args[1])(context, builder, args[1]).data
        xp = builder.gep(context.make_array(signature.args[4])(context, builder, args[4]).data, [args[5]])
        i64 = ir.IntType(64)
        fma = builder.module.declare_intrinsic("llvm.fmuladd.v16f32", (), ir.FunctionType(_V16F, [_V16F] * 3))

        def vptr(ptr, off, vt):
            return builder.bitcast(builder.gep(ptr, [off]), vt.as_pointer())

        rows = [builder.add(args[2], builder.mul(args[3], ir.Constant(i64, i))) for i in range(4)]
        dots = [ir.Constant(_V16F, [0.0] * 16) for _ in range(4)]
        for c in range(QK // 16):
            xv = builder.load(vptr(xp, ir.Constant(i64, 16 * c), _V16F), align=4)
            for i in range(4):
                qv = builder.load(vptr(bp, builder.add(rows[i], ir.Constant(i64, 16 * c)), _V16B), align=1)
                dots[i] = builder.call(fma, [builder.sitofp(qv, _V16F), xv, dots[i]])
        for i in range(4):
            sv = context.cast(builder, args[6 + i], signature.args[6 + i], types.float32)
            sv = builder.shuffle_vector(builder.insert_element(ir.Constant(_V16F, ir.Undefined), sv,
                                                               ir.Constant(ir.IntType(32), 0)),
                                        ir.Constant(_V16F, ir.Undefined), _mask([0] * 16))
            at = vptr(ap, ir.Constant(i64, 16 * i), _V16F)
            builder.store(builder.call(fma, [sv, dots[i], builder.load(at, align=4)]), at, align=4)
        return context.get_dummy_value()

    return sig, codegen


# Decode drivers: one claim loop per thread (families.parallel_rows with one "row" per thread), each
# taking the next chunk of rows from an atomic counter (quantfmt.numba_threads.claim) until none is left:
# a descheduled thread's chunks go to the one that runs, and no chunk costs a Python call (ranges
# handed out by parallel_rows cost a dispatch each: ~10% of an 11008x4096 decode, measured interleaved).
@numba.njit(cache=True, nogil=True, fastmath=True)
def _matvec_range(blocks, sm, x, out, counter, _t0, _t1):
    # blocks: int8 (rows, nb, 136), the bytes as they are; sm: float32 (rows, nb, 2) = (s/127, m),
    # unpacked once by prepare() (slicing a float32 view out of the bytes per block costs more
    # than the block's arithmetic). w = m + q * s/127, so a block contributes
    # m * sum(x_block) + s/127 * dot(q, x_block). The block sums of x: once per range (cols adds
    # against a range's 256 * cols multiply-adds).
    nb = blocks.shape[1]
    n = x.shape[0]
    cols = nb * QK
    xb = x.reshape(n, nb, QK)
    xf = x.reshape(-1)
    xsum = np.empty((n, nb), np.float32)
    for k in range(n):
        for b in range(nb):
            a = np.float32(0.0)
            for j in range(QK):
                a += xb[k, b, j]
            xsum[k, b] = a
    acc = np.empty(64, np.float32)
    rstride = nb * BLOCK_BYTES
    rows = blocks.shape[0]
    ch = claim(counter)
    while ch * ROW_CHUNK < rows:
        start, stop = ch * ROW_CHUNK, min(rows, (ch + 1) * ROW_CHUNK)
        # Four rows at a time (_rows4_block): four independent FMA chains sharing each activation load.
        r0 = start
        while r0 + 4 <= stop:
            for k in range(n):
                acc[:] = 0.0
                t0 = t1 = t2 = t3 = np.float32(0.0)
                for b in range(nb):
                    _rows4_block(acc, blocks, (r0 * nb + b) * BLOCK_BYTES + 8, rstride, xf, k * cols + b * QK,
                                 sm[r0, b, 0], sm[r0 + 1, b, 0], sm[r0 + 2, b, 0], sm[r0 + 3, b, 0])
                    xs = xsum[k, b]
                    t0 += sm[r0, b, 1] * xs
                    t1 += sm[r0 + 1, b, 1] * xs
                    t2 += sm[r0 + 2, b, 1] * xs
                    t3 += sm[r0 + 3, b, 1] * xs
                out[k, r0] = t0 + acc[0:16].sum()
                out[k, r0 + 1] = t1 + acc[16:32].sum()
                out[k, r0 + 2] = t2 + acc[32:48].sum()
                out[k, r0 + 3] = t3 + acc[48:64].sum()
            r0 += 4
        for row in range(r0, stop):
            for k in range(n):
                tot = np.float32(0.0)
                for b in range(nb):
                    dot = np.float32(0.0)
                    for j in range(QK):
                        dot += np.float32(blocks[row, b, 8 + j]) * xb[k, b, j]
                    tot += sm[row, b, 0] * dot + sm[row, b, 1] * xsum[k, b]
                out[k, row] = tot
        ch = claim(counter)


# ---- the format -----------------------------------------------------------------------

class Q8_B(KernelFormat):
    tag = "Q8_B"
    rows_independent = True  # each block's mean and scale come from its own 128 weights
    layout_version = 1
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    summary = "int8 of (w - mean), float32 scale and mean per 128 weights along a row (llama2.c brainstorm)"
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # the row kernel flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)
    get_rows_kernel = staticmethod(_get_rows_kernel)

    def check_quantized(self, w, out):
        s = out.reshape(-1, BLOCK_BYTES)[:, 0:4].view("<f4")[:, 0]
        if not np.isfinite(s).all():
            cols = w.shape[1]
            row, b = divmod(int(np.argmin(np.isfinite(s))), cols // QK)
            raise RangeError(
                f"{self.tag}: the block at row {row}, columns {b * QK}..{b * QK + QK - 1} (matrix shape "
                f"{w.shape}) spans more than float32 can hold: its scale max|w - mean| overflows"
            )

    def prepare(self, data, rows, cols):
        # The bytes stay as they are (a view); only (s/127, m) are unpacked, 1/17 of the size.
        blocks = data.view(np.int8).reshape(rows, cols // QK, BLOCK_BYTES)
        hdr = data.reshape(-1, BLOCK_BYTES)[:, :8].copy().view("<f4").astype(np.float32)
        hdr[:, 0] *= np.float32(1.0 / 127.0)
        return data, (blocks, hdr.reshape(rows, cols // QK, 2))

    def matvec(self, prep, rows, cols, x, out):
        blocks, sm = prep[1]
        # under families.MIN_THREADED_WEIGHTS the calling thread alone (decode_threads)
        parallel_rows(_matvec_range, decode_threads(rows, cols), 1, blocks, sm, x, out, np.zeros(1, np.int64),
                      weights=1)


@quantfmt.hookimpl
def register_formats(register):
    register(Q8_B())
