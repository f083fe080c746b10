"""Int8 prefill: qmatmul mode "q8_0" of Q4_0, Q4_1 and Q8_0 for batches, on int8 dot-product instructions.

Owns the batched integer kernels (vpdpbusd with AVX512-VNNI or AVX-VNNI, vpmaddubsw + vpmaddwd with
AVX2), the choice among them by `quantfmt.cpu`, and the activation layout they read. CPUs without
AVX2 (ARM, generic builds) take the portable path: dequantized tiles + sgemm (plugins/_qtiles.py).

What is computed is ggml's integer dot (ggml_vec_dot_{q4_0,q8_0}_q8_0, ggml_vec_dot_q4_1_q8_1) for
every (activation row, weight row): per block of 32 the exact integer sum sumi of weight quants times
activation quants, then sum over blocks of float(sumi) * (d_w * d_x) (+ m_w * s_x for Q4_1) in
float32, the activations quantized once per call as ggml-cpu does (plugins/_ggml.py). So it belongs
to mode "q8_0", and differs from the other "q8_0" kernels only in the float summation order. Mode
"f32" never comes here: int8 activations would lose its float accuracy.

Layout. The weights are NOT repacked: the kernel reads the ggml bytes as they are (prepare() keeps a
reference to them in Prepared.raw) and vectorizes across activation rows instead of weight rows:
    a vector holds L activation rows (L = 16 in a zmm, 8 in a ymm) x 4 consecutive quants of a block:
        xa[group, block, chunk c (0..7), lane, 4] int8 = quant 4c..4c+3 of `block` of row group*L+lane
    the weight side is 4 bytes of one weight row broadcast to every lane (vpbroadcastd), so
    vpdpbusd(acc, w4 broadcast, xa chunk) adds to each lane the dot of 4 quants of that row.
Q4_0/Q4_1: byte j of a block holds quant j (low nibble) and j+16 (high): one 4-byte load gives chunk c
(low nibbles, quants 4c..) and chunk 4+c (high), split by vpand / vpsrld. The nibbles (0..15) are the
unsigned operand of vpdpbusd and the activations the signed one; Q4_0's "q - 8" becomes -8*sum(q_x)
per block and lane, the initial value of the block's accumulator. Q8_0's weights are signed, so they
are flipped to q_w + 128 (xor 0x80 on the 4 loaded bytes) and the accumulator starts at -128*sum(q_x). vpmaddubsw (AVX2)
saturates its int16 pair sums, which 255*127*2 would overflow: there Q8_0 uses ggml's sign trick,
|w| times sign(w)*x (vpabsb, vpsignb), and products stay within 2*128*127 (a weight byte of -128 included).
Register tile: RW weight rows x V vectors of activation rows; per block 8*RW*V dot instructions,
then per (row, vector) one int->float convert and two float ops for the scales. The weight rows of a
work item are a few KB and the activations (cols bytes per row) stay in L2 across work items.
The 4-bit table formats (IQ4_NL, IQ4_XS, MXFP4) share this kernel as kind "lut" (see _KINDS): Q4_0's
nibbles, looked up in register (vpshufb) before the dot; plugins/_i4dot.py calls it (gemm_lut).
Not used (yet): AMX tiles (TDPBUSD), which Linux grants only after an arch_prctl request for the
tile state; on the AVX-512 Xeon the zmm kernel reaches about half the time of float32 sgemm.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from quantfmt import cpu
from quantfmt.families import parallel_rows, prefill_path

from ._ggml import QK, fp16_table, quantize_activations
from ._qtiles import BLAS_MIN_ROWS

#: The int8 paths, best first: (name, required CPU features, lanes per vector).
PATHS = (("avx512vnni", ("avx512vnni", "avx512bw", "avx512f"), 16), ("avxvnni", ("avxvnni", "avx2"), 8),
         ("avx2", ("avx2",), 8))
#: Which int8 path this process uses ("portable": none, dequantized tiles + sgemm). Tests set it to
#: each path the CPU can run.
PATH = next((name for name, feats, _ in PATHS if cpu.has(*feats)), "portable")
LANES = {name: lanes for name, _, lanes in PATHS}
#: Activation rows from which mode "q8_0" takes the int8 kernels (below: the per-row tile kernels,
#: which stream the weights once per row). Measured crossovers (11008 x 4096, one thread): Q4_0 at
#: n = 4 (tiles 18.5 ms, int8 19.6), Q8_0 at n = 2 (28.1 vs 20.9 ms; n = 1: tiles 14 ms). Where the
#: int8 decode kernels run (plugins/_i4dot.py for Q4_0/Q4_1, plugins/_i8dot.py for Q8_0) they take
#: the rows below their own MIN_ROWS (10-12 on zmm, 6-12 on ymm) first: they beat these kernels there.
MIN_ROWS = {"q4_0": 4, "q4_1": 4, "q8_0": 2}


def available() -> list[str]:
    """The int8 paths this CPU can run (what the tests exercise)."""
    return [name for name, feats, _ in PATHS if cpu.has(*feats)]


def takes(kind: str, n: int, mode: str) -> bool:
    """Whether qmatmul of n activation rows in `mode` on a `kind` ("q4_0", "q4_1", "q8_0") Prepared
    runs here."""
    return mode == "q8_0" and n >= MIN_ROWS[kind] and PATH != "portable"


def qmatmul_path(op: str, n: int, mode: str, kind: str) -> str:
    """Format.kernel_path of Q4_0, Q4_1 and Q8_0: the tiles and these kernels are theirs in
    common; Q4_0/Q4_1 decode in mode "f32" may take plugins/_q4simd.py."""
    if op != "qmatmul":
        return "numba"
    if kind == "q8_0":
        from . import _i8dot  # Q8_0's quantized-activation decode (q8_0.tiles_qmatmul)

        if _i8dot.takes(n, mode):
            return _i8dot.kernel_path()
    if kind != "q8_0" and mode == "q8_0" and PATH != "portable":
        from . import _i4dot  # Q4_0's and Q4_1's quantized-activation decode (q4_0.nibble_qmatmul)

        if _i4dot.PATH != "portable" and not _i4dot.takes_prefill(n, _i4dot.PATH):
            return _i4dot.kernel_path("qmatmul", n, mode)
    if takes(kind, n, mode):
        return f"int8-{PATH}"
    if n >= BLAS_MIN_ROWS:
        return prefill_path()
    if kind != "q8_0" and mode == "f32":
        from . import _q4simd

        return f"tiles-f32-{_q4simd.PATH}"
    return f"tiles-{mode}"


# ---- code generation ------------------------------------------------------------------------

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


# Small IR helpers, shared with the k-quant kernels (plugins/_kdot.py).
def c64(v: int) -> ir.Constant:
    """An i64 constant (numba's index type)."""
    return ir.Constant(_I64, v)


def splat(builder, val, vt):
    """val broadcast to every lane of vector type vt (vpbroadcast)."""
    undef = ir.Constant(vt, ir.Undefined)
    v = builder.insert_element(undef, val, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))


def vload(builder, p, off, vt, align):
    """A vector of type vt loaded from element `off` of pointer p."""
    return builder.load(builder.bitcast(builder.gep(p, [off]), vt.as_pointer()), align=align)


#: How far ahead of the block being read the one-row (decode) kernels prefetch the weights (bytes). Why: a
#: model's weights come from DRAM at every token (a 1B-class model is larger than the L3), and one row
#: after another is ONE sequential stream per core, which the hardware prefetchers alone kept at 7-8
#: GB/s a core (numpy's sum: 9; OpenBLAS's sgemv: 13 a core). Measured, Q4_K 5632x2048 one row on 80
#: distinct matrices in turn (scripts/decode_stream.py), one thread: none 7.8-8.2 GB/s, 1 KB
#: 9.6-11.0, 4 KB 11.6-12.8, 8 KB 12.6-13.3, 16 KB 12.6-12.7; a random-weight 0.68B Llama in llama.cpp's
#: Q4_K_M decoded at 20-21 tokens/s without, 29 with 8 KB (llama.cpp: 25-31). Matrices in cache: unchanged.
PREFETCH_BYTES = 8192


def prefetch(b, base, nbytes: int, ahead: int = PREFETCH_BYTES) -> None:
    """Prefetch (for reading, into all cache levels) the nbytes from base + ahead (base: any pointer), one
    per 64-byte line: the bytes a kernel reading one sequential stream reads `ahead` bytes from now. A
    prefetch past the array's end is harmless (it never faults)."""
    i8p = ir.PointerType(_I8)
    base = b.bitcast(base, i8p)
    pf = b.module.declare_intrinsic("llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]))
    for o in range(0, nbytes + 63, 64):
        b.call(pf, [b.gep(base, [c64(ahead + o)]), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


_splat, _vload = splat, vload
# (block bytes, offset of the quants, nibbles?, minimum m?) per format
_KINDS = {"q4_0": (18, 2, True, False), "q4_1": (20, 4, True, True), "q8_0": (34, 2, False, False),
          "q8_1": (34, 2, False, True), "lut": (0, 0, True, False)}
# "q8_1": Q8_0's bytes with Q4_1's offsets: signed int8 weights (Q5_1's q, 0..31, in Q8_0 blocks made by
# plugins/_i8tiles.py) and per block m_w * s_x added as Q4_1's (ggml_vec_dot_q5_1_q8_1).
# "lut": the 4-bit table formats (IQ4_NL, IQ4_XS, MXFP4; plugins/_i4dot.py): nibbles packed as Q4_0's
# (quant j low, j+16 high, 16 bytes per 32-block), each nibble an index into a 16-entry int8 table that
# vpshufb looks up in register. For this kind the kernel's `m` is that table (16 bytes: V + 128 for
# vpdpbusd's unsigned operand, the accumulators starting at -128*sum(q_x); V itself for vpmaddubsw,
# with the sign trick) and `sx` the byte layout (int64 sbb, qoff, sh): 32-block b of row r starts at
# r*(nb >> sh)*sbb + (b >> sh)*sbb + qoff + 16*(b & (2**sh - 1)) (IQ4_NL: 18, 2, 0; MXFP4: 17, 1, 0;
# IQ4_XS: 136, 8, 3), so the kernel reads every format's ggml bytes as they are.


def _make_kernel(kind: str, isa: str, rw: int, nv: int):
    """The intrinsic computing one register tile: weight rows r..r+rw-1 (clamped to rows-1) times
    activation groups g0..g0+nv-1 (clamped to G-1) over all nb blocks, stored into out (G*L, rows)."""
    bb, qoff, nibbles, has_m = _KINDS[kind]
    lut = kind == "lut"
    lanes = LANES[isa]
    vi32 = ir.VectorType(_I32, lanes)
    vf32 = ir.VectorType(_F32, lanes)
    vi8 = ir.VectorType(_I8, 4 * lanes)
    vi16 = ir.VectorType(ir.IntType(16), 2 * lanes)

    @intrinsic
    def kern(typingctx, w, d, m, xa, dx, cx, sx, out, r0, rows, g0, groups, nb, dstride):
        sig = types.void(w, d, m, xa, dx, cx, sx, out, r0, rows, g0, groups, nb, dstride)

        def codegen(context, builder, signature, args):
            wa, da, ma, xaa, dxa, cxa, sxa, outa, r0v, rowsv, g0v, groupsv, nbv, dstridev = args
            at = signature.args
            ptr = [context.make_array(at[i])(context, builder, args[i]).data for i in range(8)]
            wp, dp, mp, xp, dxp, cxp, sxp, outp = ptr
            mod = builder.module
            fma = mod.declare_intrinsic(f"llvm.fmuladd.v{lanes}f32", (), ir.FunctionType(vf32, [vf32] * 3))
            if isa == "avx2":
                maddubs = mod.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", (), ir.FunctionType(vi16, [vi8, vi8]))
                maddwd = mod.declare_intrinsic("llvm.x86.avx2.pmadd.wd", (), ir.FunctionType(vi32, [vi16, vi16]))
                psignb = mod.declare_intrinsic("llvm.x86.avx2.psign.b", (), ir.FunctionType(vi8, [vi8, vi8]))
                pabsb = mod.declare_intrinsic("llvm.abs.v32i8", (), ir.FunctionType(vi8, [vi8, ir.IntType(1)]))
                ones16 = ir.Constant(vi16, [1] * (2 * lanes))
            else:
                name = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"
                dpbusd = mod.declare_intrinsic(name, (), ir.FunctionType(vi32, [vi32] * 3))
            if lut:
                shuf = "llvm.x86.avx512.pshuf.b.512" if lanes == 16 else "llvm.x86.avx2.pshuf.b"
                pshufb = mod.declare_intrinsic(shuf, (), ir.FunctionType(vi8, [vi8, vi8]))
                # the 16-entry table in every 128-bit lane (vpshufb looks up within lanes)
                t16 = builder.load(builder.bitcast(mp, ir.VectorType(_I8, 16).as_pointer()), align=1)
                table = builder.shuffle_vector(t16, t16, ir.Constant(ir.VectorType(_I32, 4 * lanes),
                                                                     list(range(16)) * (lanes // 4)))

                def lookup(v):
                    return builder.bitcast(builder.call(pshufb, [table, builder.bitcast(v, vi8)]), vi32)

            def splat(val, vt):
                return _splat(builder, val, vt)

            def vload(p, off, vt, align):
                return _vload(builder, p, off, vt, align)

            def dot(acc, wu8, xs8, xabs=None):
                # acc += per lane, sum of 4 products of unsigned wu8 and signed xs8 bytes
                if isa != "avx2":
                    return builder.call(dpbusd, [acc, wu8, xs8])
                a = builder.bitcast(wu8, vi8)
                b = builder.bitcast(xs8, vi8)
                if xabs is not None:  # the table formats: |x| * (sign(x) * V), V within -127..127
                    a, b = xabs, builder.call(psignb, [a, b])
                p = builder.call(maddubs, [a, b])
                return builder.add(acc, builder.call(maddwd, [p, ones16]))

            # the clamped row and group indices of this tile
            last_r = builder.sub(rowsv, c64(1))
            last_g = builder.sub(groupsv, c64(1))
            rs, gs = [], []
            for i in range(rw):
                r = builder.add(r0v, c64(i))
                rs.append(builder.select(builder.icmp_signed("<", r, last_r), r, last_r))
            for v in range(nv):
                g = builder.add(g0v, c64(v))
                gs.append(builder.select(builder.icmp_signed("<", g, last_g), g, last_g))
            if lut:
                sbb, lqoff, lsh = (builder.load(builder.gep(sxp, [c64(k)])) for k in range(3))
                lmask = builder.sub(builder.shl(c64(1), lsh), c64(1))
                wrow = builder.mul(builder.ashr(nbv, lsh), sbb)
            else:
                wrow = builder.mul(nbv, c64(bb))
            # d and m are Q4/Q8 tiles (tiles, nbp, 32): row r, block b at (r//32)*nbp*32 + r%32 + 32*b
            doffs = [builder.add(builder.mul(builder.sdiv(r, c64(32)), dstridev), builder.srem(r, c64(32)))
                     for r in rs]
            zero_f = ir.Constant(vf32, [0.0] * lanes)
            faccs = [[cgutils.alloca_once_value(builder, zero_f) for _ in range(nv)] for _ in range(rw)]
            mask4 = ir.Constant(vi32, [0x0F0F0F0F] * lanes)
            four = ir.Constant(vi32, [4] * lanes)
            with cgutils.for_range(builder, nbv) as loop:
                b = loop.index
                gb = [builder.add(builder.mul(g, nbv), b) for g in gs]  # (group, block) index
                xbase = [builder.mul(k, c64(32 * lanes)) for k in gb]
                # the accumulators start at the per-lane correction cx (see the layout notes)
                cxs = [vload(cxp, builder.mul(gb[v], c64(lanes)), vi32, 4) for v in range(nv)]
                accs = [list(cxs) for _ in range(rw)]
                if lut:
                    boff = builder.add(builder.add(builder.mul(builder.ashr(b, lsh), sbb), lqoff),
                                       builder.mul(builder.and_(b, lmask), c64(16)))
                else:
                    boff = builder.add(builder.mul(b, c64(bb)), c64(qoff))
                wbase = [builder.add(builder.mul(r, wrow), boff) for r in rs]
                for c in range(4 if nibbles else 8):
                    xs = [vload(xp, builder.add(xbase[v], c64(4 * lanes * c)), vi32, 4) for v in range(nv)]
                    if nibbles:
                        xh = [vload(xp, builder.add(xbase[v], c64(4 * lanes * (c + 4))), vi32, 4) for v in range(nv)]
                    xabs = xhabs = None
                    if lut and isa == "avx2":
                        xabs = [builder.call(pabsb, [builder.bitcast(x, vi8), ir.Constant(ir.IntType(1), 0)])
                                for x in xs]
                    if lut and isa == "avx2":
                        xhabs = [builder.call(pabsb, [builder.bitcast(x, vi8), ir.Constant(ir.IntType(1), 0)])
                                 for x in xh]
                    for i in range(rw):
                        w4 = vload(wp, builder.add(wbase[i], c64(4 * c)), _I32, 1)
                        if not nibbles and isa != "avx2":
                            # on the scalar: a vector xor of the broadcast sent LLVM's zmm
                            # instruction selection into minutes of work
                            w4 = builder.xor(w4, ir.Constant(_I32, 0x80808080))
                        wv = splat(w4, vi32)
                        if nibbles:
                            lo = builder.and_(wv, mask4)
                            hi = builder.and_(builder.lshr(wv, four), mask4)
                            if lut:
                                lo, hi = lookup(lo), lookup(hi)
                            for v in range(nv):
                                accs[i][v] = dot(dot(accs[i][v], lo, xs[v], None if xabs is None else xabs[v]),
                                                 hi, xh[v], None if xhabs is None else xhabs[v])
                        elif isa == "avx2":
                            # Q8_0: |w| * (sign(w) * x), as ggml's AVX2 code: |w| read unsigned is 128 for
                            # a weight byte of -128 (a file may hold one) and x is never -128, so every
                            # product is exact; |x| * (sign(x) * w) would wrap -(-128) to -128
                            w8 = builder.bitcast(wv, vi8)
                            wabs = builder.call(pabsb, [w8, ir.Constant(ir.IntType(1), 0)])
                            for v in range(nv):
                                sx8 = builder.call(psignb, [builder.bitcast(xs[v], vi8), w8])
                                pr = builder.call(maddubs, [wabs, sx8])
                                accs[i][v] = builder.add(accs[i][v], builder.call(maddwd, [pr, ones16]))
                        else:
                            for v in range(nv):
                                accs[i][v] = dot(accs[i][v], wv, xs[v])
                # scales: acc_f += float(sumi) * (d_w * d_x)  (+ m_w * s_x)
                dxs = [vload(dxp, builder.mul(gb[v], c64(lanes)), vf32, 4) for v in range(nv)]
                sxs = [vload(sxp, builder.mul(gb[v], c64(lanes)), vf32, 4) for v in range(nv)] if has_m else None
                for i in range(rw):
                    di = builder.add(doffs[i], builder.mul(b, c64(32)))
                    dw = splat(builder.load(builder.gep(dp, [di])), vf32)
                    mw = splat(builder.load(builder.gep(mp, [di])), vf32) if has_m else None
                    for v in range(nv):
                        f = builder.load(faccs[i][v])
                        s = builder.fmul(dw, dxs[v])
                        f = builder.call(fma, [builder.sitofp(accs[i][v], vf32), s, f])
                        if has_m:
                            f = builder.call(fma, [mw, sxs[v], f])
                        builder.store(f, faccs[i][v])
            # out is (G*L, rows), the result's layout: lane l of vector v is activation row gs[v]*L + l.
            # Scalar stores (one per result, once per tile) cost far less than transposing a
            # (rows, n) result afterwards (numpy's strided copy: 53 ms for n = 512).
            for i in range(rw):
                for v in range(nv):
                    f = builder.load(faccs[i][v])
                    row0 = builder.mul(gs[v], c64(lanes))
                    for lane in range(lanes):
                        o = builder.add(builder.mul(builder.add(row0, c64(lane)), rowsv), rs[i])
                        builder.store(builder.extract_element(f, ir.Constant(_I32, lane)), builder.gep(outp, [o]))
            return context.get_dummy_value()

        return sig, codegen

    return kern


# Register tiles: 32 zmm registers hold 3x4 int32 accumulators, the operands, and most of the 3x4
# float32 ones (touched once per block); 3 rows ran ~10% faster than 2 (Q8_0 n=128, one thread:
# 0.44x vs 0.51x sgemm). 16 ymm registers (AVX2 / AVX-VNNI without AVX-512) take 1x4.
RW512 = 3  # weight rows per zmm register tile
RW = {"avx512vnni": RW512, "avxvnni": 1, "avx2": 1}
NV = 4
CHUNK_GROUPS = 8  # activation vectors per parallel loop (see the drivers)
#: Multiply-adds per parallel_rows range at the least (_run): ~40-80 us of int8 work per call. With ~64 ranges
#: whatever the size, SmolLM2-135M's 576-wide matrices (n = 512) gave ranges of ~10 us and prefilled slower on
#: two threads than on one (342 against 388 tokens/s).
MIN_RANGE_MACS = 1 << 22

_k_q4_0_avx512vnni = _make_kernel("q4_0", "avx512vnni", RW["avx512vnni"], NV)
_t_q4_0_avx512vnni = _make_kernel("q4_0", "avx512vnni", RW["avx512vnni"], 1)
_k_q4_0_avxvnni = _make_kernel("q4_0", "avxvnni", RW["avxvnni"], NV)
_t_q4_0_avxvnni = _make_kernel("q4_0", "avxvnni", RW["avxvnni"], 1)
_k_q4_0_avx2 = _make_kernel("q4_0", "avx2", RW["avx2"], NV)
_t_q4_0_avx2 = _make_kernel("q4_0", "avx2", RW["avx2"], 1)
_k_q4_1_avx512vnni = _make_kernel("q4_1", "avx512vnni", RW["avx512vnni"], NV)
_t_q4_1_avx512vnni = _make_kernel("q4_1", "avx512vnni", RW["avx512vnni"], 1)
_k_q4_1_avxvnni = _make_kernel("q4_1", "avxvnni", RW["avxvnni"], NV)
_t_q4_1_avxvnni = _make_kernel("q4_1", "avxvnni", RW["avxvnni"], 1)
_k_q4_1_avx2 = _make_kernel("q4_1", "avx2", RW["avx2"], NV)
_t_q4_1_avx2 = _make_kernel("q4_1", "avx2", RW["avx2"], 1)
_k_q8_0_avx512vnni = _make_kernel("q8_0", "avx512vnni", RW["avx512vnni"], NV)
_t_q8_0_avx512vnni = _make_kernel("q8_0", "avx512vnni", RW["avx512vnni"], 1)
_k_q8_0_avxvnni = _make_kernel("q8_0", "avxvnni", RW["avxvnni"], NV)
_t_q8_0_avxvnni = _make_kernel("q8_0", "avxvnni", RW["avxvnni"], 1)
_k_q8_0_avx2 = _make_kernel("q8_0", "avx2", RW["avx2"], NV)
_t_q8_0_avx2 = _make_kernel("q8_0", "avx2", RW["avx2"], 1)
_k_q8_1_avx512vnni = _make_kernel("q8_1", "avx512vnni", RW["avx512vnni"], NV)
_t_q8_1_avx512vnni = _make_kernel("q8_1", "avx512vnni", RW["avx512vnni"], 1)
_k_q8_1_avxvnni = _make_kernel("q8_1", "avxvnni", RW["avxvnni"], NV)
_t_q8_1_avxvnni = _make_kernel("q8_1", "avxvnni", RW["avxvnni"], 1)
_k_q8_1_avx2 = _make_kernel("q8_1", "avx2", RW["avx2"], NV)
_t_q8_1_avx2 = _make_kernel("q8_1", "avx2", RW["avx2"], 1)
_k_lut_avx512vnni = _make_kernel("lut", "avx512vnni", RW["avx512vnni"], NV)
_t_lut_avx512vnni = _make_kernel("lut", "avx512vnni", RW["avx512vnni"], 1)
_k_lut_avxvnni = _make_kernel("lut", "avxvnni", RW["avxvnni"], NV)
_t_lut_avxvnni = _make_kernel("lut", "avxvnni", RW["avxvnni"], 1)
_k_lut_avx2 = _make_kernel("lut", "avx2", RW["avx2"], NV)
_t_lut_avx2 = _make_kernel("lut", "avx2", RW["avx2"], 1)


# ---- drivers: one per (format, path), each calling its own intrinsics (a dispatcher passed as an
# argument, or a closure, would not be cached across processes) ------------------------------------
# Work item = one register tile: RW weight rows times NV vectors of activation rows, or times one
# vector for the groups left over (a clamped 4-vector tile would compute them up to 4 times). The
# activation groups go in chunks of CHUNK_GROUPS (128 rows of a zmm), one parallel pass each, so
# that the activations a thread walks stay in L2: 512 rows of 4096 int8 (2 MB) at once ran 1.3-1.9x
# float32 sgemm where 128 rows ran 0.4x. Within a chunk items run weight-row-major.
# Each driver runs work items j0..j1-1 of one chunk, a nogil kernel on Python threads
# (families.parallel_rows via _run), not a parallel=True prange driver: a cold start compiled the
# prange driver's body again inside numba's gufunc (Q4_0 avx512vnni: ~5 s on a loaded 2-core
# machine, more than the rest of Q4_0's kernels), for the same speed.
@numba.njit(cache=True, nogil=True)
def _drive_q4_0_avx512vnni(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng * RW512, job % ng
        if j < full:
            _k_q4_0_avx512vnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q4_0_avx512vnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q4_0_avxvnni(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng, job % ng
        if j < full:
            _k_q4_0_avxvnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q4_0_avxvnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q4_0_avx2(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng, job % ng
        if j < full:
            _k_q4_0_avx2(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q4_0_avx2(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q4_1_avx512vnni(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng * RW512, job % ng
        if j < full:
            _k_q4_1_avx512vnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q4_1_avx512vnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q4_1_avxvnni(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng, job % ng
        if j < full:
            _k_q4_1_avxvnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q4_1_avxvnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q4_1_avx2(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng, job % ng
        if j < full:
            _k_q4_1_avx2(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q4_1_avx2(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q8_0_avx512vnni(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng * RW512, job % ng
        if j < full:
            _k_q8_0_avx512vnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q8_0_avx512vnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q8_0_avxvnni(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng, job % ng
        if j < full:
            _k_q8_0_avxvnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q8_0_avxvnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q8_0_avx2(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng, job % ng
        if j < full:
            _k_q8_0_avx2(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q8_0_avx2(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q8_1_avx512vnni(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng * RW512, job % ng
        if j < full:
            _k_q8_1_avx512vnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q8_1_avx512vnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q8_1_avxvnni(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng, job % ng
        if j < full:
            _k_q8_1_avxvnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q8_1_avxvnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_q8_1_avx2(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng, job % ng
        if j < full:
            _k_q8_1_avx2(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_q8_1_avx2(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_lut_avx512vnni(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng * RW512, job % ng
        if j < full:
            _k_lut_avx512vnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_lut_avx512vnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_lut_avxvnni(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng, job % ng
        if j < full:
            _k_lut_avxvnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_lut_avxvnni(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


@numba.njit(cache=True, nogil=True)
def _drive_lut_avx2(w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride, c0, ng, full, j0, j1):
    for job in range(j0, j1):
        r, j = job // ng, job % ng
        if j < full:
            _k_lut_avx2(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j * NV, groups, nb, dstride)
        else:
            _t_lut_avx2(w, d, m, xa, dx, cx, sx, out, r, rows, c0 + j + full * (NV - 1), groups, nb, dstride)


_DRIVERS = {
    ("q4_0", "avx512vnni"): _drive_q4_0_avx512vnni, ("q4_0", "avxvnni"): _drive_q4_0_avxvnni,
    ("q4_0", "avx2"): _drive_q4_0_avx2, ("q4_1", "avx512vnni"): _drive_q4_1_avx512vnni,
    ("q4_1", "avxvnni"): _drive_q4_1_avxvnni, ("q4_1", "avx2"): _drive_q4_1_avx2,
    ("q8_0", "avx512vnni"): _drive_q8_0_avx512vnni, ("q8_0", "avxvnni"): _drive_q8_0_avxvnni,
    ("q8_0", "avx2"): _drive_q8_0_avx2,
    ("q8_1", "avx512vnni"): _drive_q8_1_avx512vnni, ("q8_1", "avxvnni"): _drive_q8_1_avxvnni,
    ("q8_1", "avx2"): _drive_q8_1_avx2,
    ("lut", "avx512vnni"): _drive_lut_avx512vnni, ("lut", "avxvnni"): _drive_lut_avxvnni,
    ("lut", "avx2"): _drive_lut_avx2,
}


def _run(kind: str, path: str, w, d, m, xa, dx, cx, sx, out, rows: int, groups: int, nb: int,
         dstride: int) -> None:
    """All work items of _DRIVERS[(kind, path)], chunk by chunk of activation groups, on the threads: one
    parallel_rows call over every chunk's items, so that the other thread is woken once per product (its
    wake-up, 30-80 us, is as long as a chunk of a 576-wide matrix: woken per chunk, it took few items)."""
    drive = _DRIVERS[(kind, path)]
    rw = RW[path]
    chunks = []  # (first global item, c0, ng, full, items)
    total = 0
    for c0 in range(0, groups, CHUNK_GROUPS):
        left = min(CHUNK_GROUPS, groups - c0)
        full = left // NV
        ng = full + left % NV
        jobs = -(-rows // rw) * ng
        chunks.append((total, c0, ng, full, jobs))
        total += jobs
    args = (w, d, m, xa, dx, cx, sx, out, rows, groups, nb, dstride)

    def work(j0: int, j1: int) -> None:
        for first, c0, ng, full, jobs in chunks:
            a, b = max(j0, first), min(j1, first + jobs)
            if a < b:
                drive(*args, c0, ng, full, a - first, b - first)

    # a work item's multiply-adds (rw weight rows x NV activation groups x the columns)
    item_macs = rw * NV * LANES[path] * nb * QK
    # ~64 ranges: small enough to balance threads that a shared machine deschedules; but each at least
    # MIN_RANGE_MACS, so that a range's work outweighs its call (numba's dispatch of these 17 arguments holds
    # the GIL, which the other thread then waits for)
    per = max(1, total // 64, -(-MIN_RANGE_MACS // item_macs))
    parallel_rows(work, total, 1, weights=per)


# ---- the activations, once per call -----------------------------------------------------------


def lanes_layout(a: np.ndarray, groups: int, lanes: int) -> np.ndarray:
    """(n, nb, *unit) -> (groups, nb, *unit, lanes) zero-padded rows, C-contiguous."""
    n = a.shape[0]
    z = np.zeros((groups * lanes,) + a.shape[1:], a.dtype)
    z[:n] = a
    z = z.reshape((groups, lanes) + a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(z, 1, -1))


def qmatmul_q8(kind: str, prep, x: np.ndarray, tag: str, path: str | None = None, raw=None,
               m=None) -> np.ndarray:
    """Mode "q8_0" x (n, cols) float32 @ W.T for a Q4_0 / Q4_1 / Q8_0 Prepared, on int8 path `path`
    (default PATH, which must not be "portable"). `raw` and `m` stand for prep.raw and prep.m where
    given (kinds "q8_0" and "q8_1" for Q5_0 and Q5_1, plugins/_i8tiles.py)."""
    path = path or PATH
    lanes = LANES[path]
    n, cols = x.shape
    nb = cols // QK
    has_m = _KINDS[kind][3]
    d16, s16, qx = quantize_activations(x, with_sum=has_m, tag=tag)
    lut = fp16_table()
    groups = -(-n // lanes)
    # xa (groups, nb, 8 chunks, lanes, 4): the 32 quants of a block as 8 chunks of 4
    xa = lanes_layout(qx.reshape(n, nb, 8, 4), groups, lanes)
    xa = np.ascontiguousarray(np.moveaxis(xa.reshape(groups, nb, 8, 4, lanes), 3, 4))
    dx = lanes_layout(lut[d16], groups, lanes)
    if kind == "q4_1":
        cx = np.zeros((groups, nb, lanes), np.int32)
    elif kind in ("q8_0", "q8_1") and path == "avx2":
        cx = np.zeros((groups, nb, lanes), np.int32)  # the sign trick needs no correction
    else:
        # the initial block sums: -8*sum(q_x) for Q4_0's q - 8; -128*sum(q_x) for Q8_0's q_w + 128
        cx = lanes_layout(qx.sum(-1, dtype=np.int32) * np.int32(-8 if kind == "q4_0" else -128), groups, lanes)
    sx = lanes_layout(lut[s16], groups, lanes) if has_m else dx
    m = (prep.m if m is None else m) if has_m else prep.d
    out = np.empty((groups * lanes, prep.rows), np.float32)
    raw = (prep.raw if raw is None else raw).reshape(-1)
    _run(kind, path, raw, prep.d.reshape(-1), m.reshape(-1), xa.reshape(-1), dx.reshape(-1),
                           cx.reshape(-1), sx.reshape(-1), out.reshape(-1), prep.rows, groups, nb, prep.nbp * 32)
    return out[:n]


def gemm_lut(raw: np.ndarray, layout: np.ndarray, table: np.ndarray, d: np.ndarray, dstride: int, rows: int,
             qx: np.ndarray, dxb: np.ndarray, path: str) -> np.ndarray:
    """x @ W.T for a 4-bit table format (kind "lut", see _KINDS) from quantized activations: qx int8
    (n, nb, 32) and their float32 scale per 32-block dxb (n, nb) (Q8_0's d, or Q8_K's d of the
    super-block). raw: the ggml bytes; layout int64 (sbb, qoff, sh); table: 16 bytes, V + 128 on the
    vpdpbusd paths, V on "avx2"; d: the weights' float32 block scales as Q4/Q8 tiles, row stride
    dstride. The integer dot of each 32-block is exact, as in ggml; only the float order differs."""
    lanes = LANES[path]
    n, nb = dxb.shape
    groups = -(-n // lanes)
    xa = lanes_layout(qx.reshape(n, nb, 8, 4), groups, lanes)
    xa = np.ascontiguousarray(np.moveaxis(xa.reshape(groups, nb, 8, 4, lanes), 3, 4))
    dx = lanes_layout(np.ascontiguousarray(dxb, np.float32), groups, lanes)
    if path == "avx2":
        cx = np.zeros((groups, nb, lanes), np.int32)  # the sign trick needs no correction
    else:
        cx = lanes_layout(qx.sum(-1, dtype=np.int32) * np.int32(-128), groups, lanes)  # undoes V + 128
    out = np.empty((groups * lanes, rows), np.float32)
    _run("lut", path, raw.reshape(-1), d.reshape(-1), table, xa.reshape(-1), dx.reshape(-1), cx.reshape(-1),
                            layout, out.reshape(-1), rows, groups, nb, dstride)
    return out[:n]
