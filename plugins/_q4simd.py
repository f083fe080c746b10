"""Mode "f32" decode of Q4_0 and Q4_1 (1..7 activation rows) on their row tiles, in explicit vector code.

Owns the vector kernel that replaces q4_0._tiles_dot_f32 where the CPU has AVX2 or AVX-512, and
the switch between them (`PATH`; the numba kernel stays as the portable path, e.g. ARM or a
generic build, and tests force each).

Why. numba's loop vectorizer turns the nibble split of a uint16 word into int64 arithmetic, so
q4_0._tiles_dot_f32 splits nibbles in float (floor of products): about 15 instructions per 8 rows
and 4 weights, compute-bound well above the time to read the bytes. Here the code is written as
LLVM vector IR directly (an @intrinsic, as plugins/q4_a.py does): per unit of the tile layout (see
q4_0.py, "fast qmatmul": the uint16 of 32 rows holding weights 2u, 2u+16, 2u+1, 2u+17),
    vpmovzxwd  the 16 (zmm) or 8 (ymm) words -> int32 lanes
    per nibble k: vpsrld 4k, vpand 15, vcvtdq2ps -> exact float nibble n, vfmadd with x[e] broadcast
    (with AVX-512: vpsrld 4k, then vpermps from a register of the floats 0..15, which indexes by the
    low 4 bits: one instruction for the mask and the convert)
one FMA chain per nibble field and vector, so 4 chains per vector hide the FMA latency. The block
result, per row, is d * sum(n*x) + m * sum(x) with m = Q4_1's minimum, or -8*d for Q4_0 (q - 8):
the same float32 sums as the numba kernel in another order (a float tolerance, like it).
The IR is generic but for that vpermps (llvm.x86.avx512.permvar.sf.512, emitted only where numba
compiles for AVX-512): LLVM picks the instructions for the CPU numba targets.
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from quantfmt import cpu
from quantfmt.families import decode_threads, parallel_rows

from ._qtiles import FASTMATH, T

#: "simd16" (AVX-512: zmm), "simd8" (AVX2: ymm) or "portable" (q4_0._tiles_dot_f32).
PATH = "simd16" if cpu.has("avx512f", "avx512bw") else "simd8" if cpu.has("avx2", "fma") else "portable"
QK = 32

_I16, _I32, _I64, _F32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _make_tile_dot(lanes: int):
    """The intrinsic: out[tl*32 + t] = sum over blocks of row tl*32+t (one tile) for activations x."""
    parts = T // lanes
    vi16 = ir.VectorType(_I16, lanes)
    vi32 = ir.VectorType(_I32, lanes)
    vf32 = ir.VectorType(_F32, lanes)

    @intrinsic
    def tile_dot(typingctx, q, d, m, x, xs, out, tl, nbp, has_m):
        sig = types.void(q, d, m, x, xs, out, tl, nbp, has_m)

        def codegen(context, builder, signature, args):
            at = signature.args
            qp, dp, mp, xp, xsp, outp = (context.make_array(at[i])(context, builder, args[i]).data for i in range(6))
            tlv, nbpv, hasm = args[6], args[7], args[8]
            fma = builder.module.declare_intrinsic(f"llvm.fmuladd.v{lanes}f32", (), ir.FunctionType(vf32, [vf32] * 3))

            def c64(v):
                return ir.Constant(_I64, v)

            def splat(val, vt):
                undef = ir.Constant(vt, ir.Undefined)
                v = builder.insert_element(undef, val, ir.Constant(_I32, 0))
                return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))

            def vload(p, off, vt):
                return builder.load(builder.bitcast(builder.gep(p, [off]), vt.as_pointer()), align=2)

            perm16 = lanes == 16 and cpu.has("avx512f")  # simd16 forced on an AVX2 CPU keeps the generic IR
            if perm16:
                # AVX-512: vpermps on a table of the 16 nibble values as floats takes its index from the
                # low 4 bits of each lane, so one instruction does the mask and the convert (one thread,
                # 11008x4096: 2.12-2.25 -> 1.89 ms; shift, and, convert, FMA per nibble before)
                perm = builder.module.declare_intrinsic("llvm.x86.avx512.permvar.sf.512", (),
                                                        ir.FunctionType(vf32, [vf32, vi32]))
                table = ir.Constant(vf32, [float(i) for i in range(16)])
            hasm_b = builder.icmp_signed("!=", hasm, ir.Constant(hasm.type, 0))
            zero = ir.Constant(vf32, [0.0] * lanes)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(parts)]
            mask = ir.Constant(vi32, [15] * lanes)
            tbase = builder.mul(tlv, nbpv)  # (tile, block) index of block 0
            with cgutils.for_range(builder, nbpv) as loop:
                b = loop.index
                k = builder.add(tbase, b)
                qoff = builder.mul(k, c64(8 * T))  # q[tile, block, u, t] uint16
                xoff = builder.mul(b, c64(QK))
                chains = [[zero] * 4 for _ in range(parts)]
                for u in range(8):
                    xe = [splat(builder.load(builder.gep(xp, [builder.add(xoff, c64(e))])), vf32)
                          for e in (2 * u, 2 * u + 16, 2 * u + 1, 2 * u + 17)]
                    for p in range(parts):
                        w = builder.zext(vload(qp, builder.add(qoff, c64(u * T + p * lanes)), vi16), vi32)
                        for f in range(4):
                            v = builder.lshr(w, ir.Constant(vi32, [4 * f] * lanes)) if f else w
                            if perm16:
                                nf = builder.call(perm, [table, v])
                            else:
                                nf = builder.sitofp(builder.and_(v, mask) if f < 3 else v, vf32)
                            chains[p][f] = builder.call(fma, [nf, xe[f], chains[p][f]])
                # scale pass: acc += d * s + m * xs[b]  (Q4_0: m = -8 d)
                doff = builder.mul(k, c64(T))
                xsb = splat(builder.load(builder.gep(xsp, [b])), vf32)
                for p in range(parts):
                    c = chains[p]
                    s = builder.fadd(builder.fadd(c[0], c[1]), builder.fadd(c[2], c[3]))
                    o = builder.add(doff, c64(p * lanes))
                    dv = builder.load(builder.bitcast(builder.gep(dp, [o]), vf32.as_pointer()), align=4)
                    mv_m = builder.load(builder.bitcast(builder.gep(mp, [o]), vf32.as_pointer()), align=4)
                    mv = builder.select(hasm_b, mv_m, builder.fmul(dv, ir.Constant(vf32, [-8.0] * lanes)))
                    a = builder.load(accs[p])
                    a = builder.call(fma, [dv, s, a])
                    builder.store(builder.call(fma, [mv, xsb, a]), accs[p])
            obase = builder.mul(tlv, c64(T))
            for p in range(parts):
                ptr = builder.gep(outp, [builder.add(obase, c64(p * lanes))])
                builder.store(builder.load(accs[p]), builder.bitcast(ptr, vf32.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile_dot


_tile_dot16 = _make_tile_dot(16)
_tile_dot8 = _make_tile_dot(8)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _dot16(q, d, m, x, xs, out, tl0, tl1):
    # q (tiles, nbp, 8, T) uint16, d (tiles, nbp, T), m like d for Q4_1 (else a dummy: has_m 0);
    # x (nbp*32,) float32 zero-padded, xs (nbp,) its block sums; out (tiles*T,). Tiles tl0..tl1-1, on
    # Python threads (families.parallel_rows): a parallel=True driver compiled ~2x slower cold.
    nbp = q.shape[1]
    has_m = m.shape[0] > 0
    mm = m.reshape(-1) if has_m else d.reshape(-1)
    for tl in range(tl0, tl1):
        _tile_dot16(q.reshape(-1), d.reshape(-1), mm, x, xs, out, tl, nbp, has_m)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _dot8(q, d, m, x, xs, out, tl0, tl1):
    nbp = q.shape[1]
    has_m = m.shape[0] > 0
    mm = m.reshape(-1) if has_m else d.reshape(-1)
    for tl in range(tl0, tl1):
        _tile_dot8(q.reshape(-1), d.reshape(-1), mm, x, xs, out, tl, nbp, has_m)


def tiles_dot_f32(q, d, m, x, xs, out, path: str | None = None) -> bool:
    """One activation row through the vector kernel of `path` (default PATH); False if the path is
    "portable" (the caller runs the numba kernel)."""
    path = path or PATH
    if path == "portable":
        return False
    kernel = _dot16 if path == "simd16" else _dot8
    if decode_threads(q.shape[0] * T, q.shape[1] * 32) == 1:
        kernel(q, d, m, x, xs, out, 0, q.shape[0])  # on this thread (families.MIN_THREADED_WEIGHTS)
    else:
        parallel_rows(kernel, q.shape[0], q.shape[1] * 32 * T, q, d, m, x, xs, out, weights=1 << 20)
    return True
