"""The numba part of quantfmt.gemm (imported on first use): the LLVM IR micro-kernel and its two drivers."""

from __future__ import annotations

import numba
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
_LANES = 16
_VF = ir.VectorType(_F32, _LANES)
_UNROLL = 4  # k steps per loop iteration: the loop's own instructions fall below 3% of the FMAs


def _micro(mr: int, nv: int):
    """micro(pa, sai, sak, pb, sbk, pc, sci, kc, add): for i < mr, j < nv*16 (pointers are byte addresses,
    strides in floats):
        C[i, j] (+)= sum_{k < kc} A[i, k] * B[k, j],  A[i, k] at pa + 4*(i*sai + k*sak),
        B[k, j] at pb + 4*(k*sbk + j), C[i, j] at pc + 4*(i*sci + j); C is added to where add != 0."""
    fp = _F32.as_pointer()

    @intrinsic
    def micro(typingctx, pa, sai, sak, pb, sbk, pc, sci, kc, add):
        sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp, types.intp,
                         types.intp, types.boolean)

        def codegen(context, builder, signature, args):
            pa_, sai_, sak_, pb_, sbk_, pc_, sci_, kc_, add_ = args

            def c64(v):
                return ir.Constant(_I64, v)

            a0, b0, c0 = (builder.inttoptr(p, fp) for p in (pa_, pb_, pc_))
            arow = [builder.gep(a0, [builder.mul(sai_, c64(i))]) for i in range(mr)]
            crow = [builder.gep(c0, [builder.mul(sci_, c64(i))]) for i in range(mr)]

            def vptr(p, off):
                return builder.bitcast(builder.gep(p, [off]), _VF.as_pointer())

            fma = builder.module.declare_intrinsic(f"llvm.fmuladd.v{_LANES}f32", (),
                                                   ir.FunctionType(_VF, [_VF] * 3))
            zero = ir.Constant(_VF, [0.0] * _LANES)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in range(mr)]
            undef = ir.Constant(_VF, ir.Undefined)
            splat = ir.Constant(ir.VectorType(_I32, _LANES), [0] * _LANES)

            def step(k):
                brow = builder.gep(b0, [builder.mul(k, sbk_)])
                bv = [builder.load(vptr(brow, c64(_LANES * j)), align=4) for j in range(nv)]
                ak = builder.mul(k, sak_)
                for i in range(mr):
                    s = builder.load(builder.gep(arow[i], [ak]), align=4)
                    av = builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(_I32, 0)), undef, splat)
                    for j in range(nv):
                        builder.store(builder.call(fma, [av, bv[j], builder.load(accs[i][j])]), accs[i][j])

            nmain = builder.sdiv(kc_, c64(_UNROLL))
            with cgutils.for_range(builder, nmain) as loop:
                k = builder.mul(loop.index, c64(_UNROLL))
                for u in range(_UNROLL):
                    step(builder.add(k, c64(u)))
            done = builder.mul(nmain, c64(_UNROLL))
            with cgutils.for_range(builder, builder.sub(kc_, done)) as loop:
                step(builder.add(done, loop.index))
            with builder.if_else(builder.icmp_unsigned("!=", add_, ir.Constant(add_.type, 0))) as (adding, first):
                with adding:
                    for i in range(mr):
                        for j in range(nv):
                            p = vptr(crow[i], c64(_LANES * j))
                            builder.store(builder.fadd(builder.load(p, align=4), builder.load(accs[i][j])), p,
                                          align=4)
                with first:
                    for i in range(mr):
                        for j in range(nv):
                            builder.store(builder.load(accs[i][j]), vptr(crow[i], c64(_LANES * j)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return micro


# W's rows broadcast (6 rows: their 6 row pointers and 24 accumulators fit the 32 registers; 8 rows of
# 2 vectors ran 2% slower, 12 rows spilled), 4 vectors of xt's row k (64 activation rows)
_rows6x4, _rows6x1, _rows1x4, _rows1x1 = _micro(6, 4), _micro(6, 1), _micro(1, 4), _micro(1, 1)
# xt's 12 consecutive values broadcast (no row pointers), 2 vectors of W.T's row k (32 weight rows)
# (the last n % 12 activation rows by 8, 4, then 1: 128 = 10 * 12 + 8)
_cols12x2, _cols12x1, _cols8x2, _cols8x1 = _micro(12, 2), _micro(12, 1), _micro(8, 2), _micro(8, 1)
_cols4x2, _cols4x1 = _micro(4, 2), _micro(4, 1)
_cols1x2, _cols1x1 = _micro(1, 2), _micro(1, 1)


@numba.njit(cache=True, nogil=True)
def rows_times(w, xb, n16, ct, kc_block):
    # xb: quantfmt.gemm.blocks, the block of activation columns m0..m0+b (b = 64, or 16) at m0*K, (K, b)
    r, kk = w.shape
    ldw, ldc = w.strides[0] // 4, ct.strides[0] // 4
    pw, pb0, pc = w.ctypes.data, xb.ctypes.data, ct.ctypes.data
    for k0 in range(0, kk, kc_block):
        kc = min(kc_block, kk - k0)
        add = k0 > 0
        m0 = 0
        while m0 < n16:
            b = 64 if m0 + 64 <= n16 else 16
            pb = pb0 + 4 * (m0 * kk + k0 * b)
            i = 0
            while i < r:
                pa = pw + 4 * (i * ldw + k0)
                if i + 6 <= r:
                    if b == 64:
                        _rows6x4(pa, ldw, 1, pb, b, pc + 4 * (i * ldc + m0), ldc, kc, add)
                    else:
                        _rows6x1(pa, ldw, 1, pb, b, pc + 4 * (i * ldc + m0), ldc, kc, add)
                    i += 6
                else:
                    if b == 64:
                        _rows1x4(pa, ldw, 1, pb, b, pc + 4 * (i * ldc + m0), ldc, kc, add)
                    else:
                        _rows1x1(pa, ldw, 1, pb, b, pc + 4 * (i * ldc + m0), ldc, kc, add)
                    i += 1
            m0 += b


@numba.njit(cache=True, nogil=True)
def pack_blocks(xt, xb):
    kk, n16 = xt.shape
    m0 = 0
    while m0 < n16:
        b = 64 if m0 + 64 <= n16 else 16
        base = m0 * kk
        for k in range(kk):
            for j in range(b):
                xb[base + k * b + j] = xt[k, m0 + j]
        m0 += b


@numba.njit(cache=True, nogil=True)
def times_cols(xp, wt, out, n, r16, kc_block):
    # xp: quantfmt.gemm.panels, the group of m activation rows starting at row i at i*K, (K, m) C-order
    kk = wt.shape[0]
    ldw, ldo = wt.strides[0] // 4, out.strides[0] // 4
    pp, pw, po = xp.ctypes.data, wt.ctypes.data, out.ctypes.data
    for k0 in range(0, kk, kc_block):
        kc = min(kc_block, kk - k0)
        add = k0 > 0
        for c0 in range(0, r16, 32):
            wide = c0 + 32 <= r16
            pb = pw + 4 * (k0 * ldw + c0)
            i = 0
            while i < n:
                m = group(n, i)
                pa = pp + 4 * (i * kk + k0 * m)
                pc = po + 4 * (i * ldo + c0)
                if m == 12:
                    if wide:
                        _cols12x2(pa, 1, 12, pb, ldw, pc, ldo, kc, add)
                    else:
                        _cols12x1(pa, 1, 12, pb, ldw, pc, ldo, kc, add)
                elif m == 8:
                    if wide:
                        _cols8x2(pa, 1, 8, pb, ldw, pc, ldo, kc, add)
                    else:
                        _cols8x1(pa, 1, 8, pb, ldw, pc, ldo, kc, add)
                elif m == 4:
                    if wide:
                        _cols4x2(pa, 1, 4, pb, ldw, pc, ldo, kc, add)
                    else:
                        _cols4x1(pa, 1, 4, pb, ldw, pc, ldo, kc, add)
                else:
                    if wide:
                        _cols1x2(pa, 1, 1, pb, ldw, pc, ldo, kc, add)
                    else:
                        _cols1x1(pa, 1, 1, pb, ldw, pc, ldo, kc, add)
                i += m


@numba.njit(cache=True, nogil=True)
def group(n, i):
    """Activation rows in the group starting at row i: 12 while 12 are left, then 8, 4, 1 (128 = 10 * 12 + 8)."""
    left = n - i
    return 12 if left >= 12 else 8 if left >= 8 else 4 if left >= 4 else 1


@numba.njit(cache=True, nogil=True)
def pack(xt, n, xp):
    kk = xt.shape[0]
    i = 0
    while i < n:
        m = group(n, i)
        base = i * kk
        for k in range(kk):
            for j in range(m):
                xp[base + k * m + j] = xt[k, i + j]
        i += m
