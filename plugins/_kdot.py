"""Integer qmatmul of the k-quants (Q2_K..Q6_K) in mode "q8_k", on int8 dot-product instructions.

Owns the k-quant kernels that read the ggml super-block bytes as they are (no repacking, no int16
expansion): a decode kernel (a few activation rows, vectorized along the 256 weights of a
super-block, parallel over weight rows) and a prefill kernel (vectorized across activation rows
with the weight bytes broadcast, as plugins/_i8gemm.py does for Q4_0/Q4_1/Q8_0, whose path choice,
lane counts and activation layout it shares). CPUs without AVX2 keep the portable path of
plugins/_kquants.py (a numba loop on the integer parts; sgemm on dequantized tiles for batches).

What is computed is ggml's ggml_vec_dot_<type>_q8_K for every (activation row, weight row), the
activations quantized once per call by quantize_row_q8_K_ref (plugins/_kquants.py): per super-block
    isum = sum over sub-blocks s of 16:  sc[s] * sum_{i in s} q_i * qx_i     (exact, int32)
    msum = sum_s mi[s] * bsum[s]                                            (exact, int32)
    Q2_K/Q4_K/Q5_K (a minimum):  (dw*dx) * isum - (mw*dx) * msum
    Q3_K/Q6_K (symmetric, q - off): (dw*dx) * (isum - msum) with mi = off * sc (off 4 / 32)
with q the UNSIGNED stored quant (0..63: the operand vpmaddubsw / vpdpbusd want unsigned) and the
offset of the symmetric formats folded into msum in integer, as ggml does. Super-blocks are summed
in float32 in another order than ggml's: only float rounding differs.

Every format is described by two small functions on the bytes of one super-block:
    group(ops, g)   the 32 quants of elements 32g..32g+31 (g = 0..7) as 32 bytes, from loads of 32
                    bytes (decode: <8 x i32>) or of the 4 bytes of unit u (prefill: i32, elements
                    32g+4u..32g+4u+3) and shifts/masks on 32-bit lanes (bits shifted in from a
                    neighbouring byte are masked away). Every format stores 32 consecutive elements
                    in 32 consecutive bytes (nibble, bit-pair or bit fields), so this is the same
                    code for both kernels and the activations stay in natural order.
    scales(...)     sc[16], mi[16] as <16 x i16> (Q4_K/Q5_K: each 32-sub-block's pair twice).
The fp16 d and dmin are converted once per prepared tensor (KPrepared.scales, 8 bytes per super-block).

Decode (one activation row, one weight row per call): per group vpmaddubsw(q, qx) -> int16 pair
sums (|.| <= 2*63*127), then vpdpwssd (VNNI) or vpmaddwd+vpaddd (AVX2) with the group's two
sub-block scales -> int32 lanes; msum by one vpmaddwd of mi and bsum; then one int->float convert
and FMA per super-block. AVX512-VNNI: zmm, two groups per vector (PAIRS: groups whose bytes form
one 64-byte run, the activations permuted to match once per call), 1.7x faster than ymm here;
AVX-VNNI / AVX2: ymm, one group per vector. Parallel over weight rows, DEC_ROWS per work item.
Prefill: per weight row and group, the 32 quants are unpacked once with vector ops; each unit (4
quants) is broadcast from its lane and vpdpbusd'ed against L activation rows into a sub-block
accumulator (AVX2: vpmaddubsw + vpmaddwd with the scale in place of ones), which is then scaled into
the super-block accumulator: vpdpwssd with (sc, 0) pairs when a sub-block dot fits int16 (Q2_K,
Q3_K, Q4_K: |dot| <= 16*15*127), else vpmulld + vpaddd (Q5_K, Q6_K). msum: vpdpwssd of broadcast mi
pairs against per-lane bsum pairs. Register tiles, chunks of activation rows and the output stores
as in _i8gemm. Not used: AMX (see _i8gemm).
One row (Format.matvec_fn, the runner's decode of a token): the activations' Q8_K, the zmm group
order and the decode kernel in one compiled call on the calling thread, the bits of qmatmul's.
Measured (11008x4096, 2 threads on a shared 2-core AVX-512 Xeon, vs float32 x @ w.T in the same
process): decode Q4_K 0.28x, Q6_K 0.30x (before: 0.80x, 0.92x on the integer form); prefill n=128
Q4_K 0.61x, Q6_K 0.60x, n=512 0.81x, 0.84x (before: sgemm on dequantized tiles).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from quantfmt.families import decode_threads, parallel_rows
from quantfmt.numba_threads import claim

from . import _i8gemm
from ._i8gemm import LANES, c64, lanes_layout, prefetch, splat, vload
from ._kquants import _q8k_blocks

QK_K = 256
_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()

# ---- the formats: bytes of one super-block -> quants and scales ---------------------------------


def _grp_q4_k(o, g):
    v = o.load(16 + 32 * (g // 2))
    return o.and_(o.shr(v, 4) if g % 2 else v, 0x0F0F0F0F)


def _grp_q5_k(o, g):
    v = o.load(48 + 32 * (g // 2))
    lo = o.and_(o.shr(v, 4) if g % 2 else v, 0x0F0F0F0F)
    hb = o.and_(o.shr(o.load(16), g), 0x01010101)
    return o.or_(lo, o.shl(hb, 4))


def _grp_q6_k(o, g):
    h, t = divmod(g, 4)
    ql = o.load(64 * h + 32 * (t % 2))
    lo = o.and_(o.shr(ql, 4) if t >= 2 else ql, 0x0F0F0F0F)
    hb = o.and_(o.shr(o.load(128 + 32 * h), 2 * t), 0x03030303)
    return o.or_(lo, o.shl(hb, 4))


def _grp_q2_k(o, g):
    h, k = divmod(g, 4)
    return o.and_(o.shr(o.load(16 + 32 * h), 2 * k), 0x03030303)


def _grp_q3_k(o, g):
    h, k = divmod(g, 4)
    lo = o.and_(o.shr(o.load(32 + 32 * h), 2 * k), 0x03030303)
    hb = o.and_(o.shr(o.load(0), g), 0x01010101)
    return o.or_(lo, o.shl(hb, 2))


def _u32s(s, off, n):
    """n little-endian uint32 of the super-block at byte off (scalar loads)."""
    return [s.load_u32(off + 4 * i) for i in range(n)]


def _bytes16(s, words):
    """4 i32 -> <16 x i8> (little-endian bytes)."""
    v = ir.Constant(ir.VectorType(_I32, 4), ir.Undefined)
    for i, w in enumerate(words):
        v = s.b.insert_element(v, w, ir.Constant(_I32, i))
    return s.b.bitcast(v, ir.VectorType(_I8, 16))


def _sc_k4(s):
    """Q4_K/Q5_K's 12 bytes at 4 -> sc, mi (ggml's utmp/kmask unpacking: bytes 0-7 the scales, 8-15 the mins)."""
    b = s.b
    u0, u1, u2 = _u32s(s, 4, 3)
    k1, k2, k3 = (ir.Constant(_I32, m) for m in (0x3F3F3F3F, 0x0F0F0F0F, 0x03030303))

    def sh(v, n):
        return b.lshr(v, ir.Constant(_I32, n))

    t3 = b.or_(b.and_(sh(u2, 4), k2), b.shl(b.and_(sh(u1, 6), k3), ir.Constant(_I32, 4)))
    t2 = b.and_(u1, k1)
    t1 = b.or_(b.and_(u2, k2), b.shl(b.and_(sh(u0, 6), k3), ir.Constant(_I32, 4)))
    t0 = b.and_(u0, k1)
    v = b.zext(_bytes16(s, [t0, t1, t2, t3]), ir.VectorType(_I16, 16))
    undef = ir.Constant(v.type, ir.Undefined)
    sc = b.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_I32, 16), [i // 2 for i in range(16)]))
    mi = b.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_I32, 16), [8 + i // 2 for i in range(16)]))
    return sc, mi


def _sc_q6_k(s):
    b = s.b
    sc = b.sext(_bytes16(s, _u32s(s, 192, 4)), ir.VectorType(_I16, 16))
    return sc, b.shl(sc, ir.Constant(sc.type, [5] * 16))  # mi = 32 * sc: q - 32


def _sc_q2_k(s):
    b = s.b
    v = b.zext(_bytes16(s, _u32s(s, 0, 4)), ir.VectorType(_I16, 16))
    return b.and_(v, ir.Constant(v.type, [15] * 16)), b.lshr(v, ir.Constant(v.type, [4] * 16))


def _sc_q3_k(s):
    """The 12 bytes at 96 -> sixteen 6-bit scales - 32 (ggml's aux/kmask unpacking); mi = 4 * sc: q - 4."""
    b = s.b
    a0, a1, tmp = _u32s(s, 96, 3)
    k1, k2 = ir.Constant(_I32, 0x03030303), ir.Constant(_I32, 0x0F0F0F0F)

    def sh(v, n):
        return b.lshr(v, ir.Constant(_I32, n)) if n else v

    four = ir.Constant(_I32, 4)
    w2 = b.or_(b.and_(sh(a0, 4), k2), b.shl(b.and_(sh(tmp, 4), k1), four))
    w3 = b.or_(b.and_(sh(a1, 4), k2), b.shl(b.and_(sh(tmp, 6), k1), four))
    w0 = b.or_(b.and_(a0, k2), b.shl(b.and_(tmp, k1), four))
    w1 = b.or_(b.and_(a1, k2), b.shl(b.and_(sh(tmp, 2), k1), four))
    v = b.zext(_bytes16(s, [w0, w1, w2, w3]), ir.VectorType(_I16, 16))
    sc = b.sub(v, ir.Constant(v.type, [32] * 16))
    return sc, b.shl(sc, ir.Constant(sc.type, [2] * 16))


#: kind -> (super-block bytes, group, scales, symmetric?, largest unsigned quant)
KINDS = {
    "q2_k": (84, _grp_q2_k, _sc_q2_k, False, 3),
    "q3_k": (110, _grp_q3_k, _sc_q3_k, True, 7),
    "q4_k": (144, _grp_q4_k, _sc_k4, False, 15),
    "q5_k": (176, _grp_q5_k, _sc_k4, False, 31),
    "q6_k": (210, _grp_q6_k, _sc_q6_k, True, 63),
}
_KIND_IDS = list(KINDS)
_PATH_IDS = ["avx512vnni", "avxvnni", "avx2"]


def variant(kind: str, path: str) -> tuple:
    """The type-level token that selects a kernel: a tuple of length 1 + 3*kind + path. Its TYPE
    (UniTuple of that count) is what the intrinsics specialize on, so one cached driver serves every
    (format, path), each compiled on its first call only (a path the CPU lacks is never compiled);
    dispatchers passed as arguments or closures would not be cached across processes."""
    return (0,) * (1 + 3 * _KIND_IDS.index(kind) + _PATH_IDS.index(path))


def _decode_variant(tok):
    k, p = divmod(tok.count - 1, 3)
    return _KIND_IDS[k], _PATH_IDS[p]


class _Ops:
    """The shift/mask vocabulary of the group functions, on i32 scalars or <8 x i32> vectors."""

    def __init__(self, b, ty, load):
        self.b, self.ty, self.load = b, ty, load

    def k(self, c):
        if isinstance(self.ty, ir.VectorType):
            return ir.Constant(self.ty, [c] * self.ty.count)
        return ir.Constant(self.ty, c)

    def and_(self, v, c):
        return self.b.and_(v, self.k(c))

    def or_(self, a, c):
        return self.b.or_(a, c)

    def shr(self, v, n):
        return self.b.lshr(v, self.k(n)) if n else v

    def shl(self, v, n):
        return self.b.shl(v, self.k(n)) if n else v


class _Scalars:
    """Byte-offset loads from one super-block for the scale functions."""

    def __init__(self, b, base):
        self.b, self.base = b, base

    def load_u32(self, off):
        p = self.b.bitcast(self.b.gep(self.base, [c64(off)]), _I32.as_pointer())
        return self.b.load(p, align=1)


def _declare(mod, name, ret, args):
    return mod.declare_intrinsic(name, (), ir.FunctionType(ret, args))


# ---- decode: one weight row x one activation row per call ------------------------------------------


#: Decode on zmm (AVX512-VNNI path): two groups per vector, paired so that their bytes are one
#: 64-byte run (Q4_K/Q5_K: the low nibbles of 64 bytes are groups g and g+2); the activations of
#: a super-block are permuted once per call into that group order (PAIR_ORDER).
PAIRS = {"q2_k": ((0, 4), (1, 5), (2, 6), (3, 7)), "q3_k": ((0, 4), (1, 5), (2, 6), (3, 7)),
         "q4_k": ((0, 2), (1, 3), (4, 6), (5, 7)), "q5_k": ((0, 2), (1, 3), (4, 6), (5, 7)),
         "q6_k": ((0, 1), (2, 3), (4, 5), (6, 7))}
PAIR_ORDER = {k: np.array([g for p in v for g in p]) for k, v in PAIRS.items()}


def dec_width(path: str) -> int:
    """int32 lanes of the decode kernel's vectors on `path`."""
    return 16 if path == "avx512vnni" else 8


@intrinsic
def _kdec(typingctx, tok, w, dw, mw, xq, xbs, dx, out, r, k, rows, nb):
    """out[k*rows + r] = the q8_k dot of weight row r and activation row k (all nb super-blocks)."""
    sig = types.void(tok, w, dw, mw, xq, xbs, dx, out, r, k, rows, nb)
    kind, path = _decode_variant(tok)
    bb, group, scales, sym, _ = KINDS[kind]
    W = dec_width(path)
    units = PAIRS[kind] if W == 16 else tuple((g,) for g in range(8))

    def codegen(context, builder, signature, args):
        b = builder
        at = signature.args
        wp, dwp, mwp, xqp, xbsp, dxp, outp = (context.make_array(at[i])(context, b, args[i]).data
                                              for i in range(1, 8))
        rv, kv, rowsv, nbv = args[8:12]
        mod = b.module
        v8i32, v16i16 = ir.VectorType(_I32, 8), ir.VectorType(_I16, 16)
        vi32, vi8, vi16, vf32 = (ir.VectorType(_I32, W), ir.VectorType(_I8, 4 * W), ir.VectorType(_I16, 2 * W),
                                 ir.VectorType(_F32, W))
        v8f32 = ir.VectorType(_F32, 8)
        if W == 16:
            maddubs = _declare(mod, "llvm.x86.avx512.pmaddubs.w.512", vi16, [vi8, vi8])
        else:
            maddubs = _declare(mod, "llvm.x86.avx2.pmadd.ub.sw", vi16, [vi8, vi8])
        maddwd = _declare(mod, "llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
        fma = _declare(mod, f"llvm.fmuladd.v{W}f32", vf32, [vf32] * 3)
        fma8 = _declare(mod, "llvm.fmuladd.v8f32", v8f32, [v8f32] * 3)
        sfx = "512" if W == 16 else "256"
        dpwssd = None if path == "avx2" else _declare(mod, f"llvm.x86.avx512.vpdpwssd.{sfx}", vi32, [vi32] * 3)
        facc = cgutils.alloca_once_value(b, ir.Constant(vf32, [0.0] * W))
        macc = cgutils.alloca_once_value(b, ir.Constant(v8f32, [0.0] * 8))
        with cgutils.for_range(b, nbv) as loop:
            blk = loop.index
            wb = b.add(b.mul(rv, nbv), blk)  # (row, super-block)
            xb = b.add(b.mul(kv, nbv), blk)  # (activation row, super-block)
            base = b.gep(wp, [b.mul(wb, c64(bb))])
            prefetch(b, base, bb)
            sc, mi = scales(_Scalars(b, base))
            xbase = b.mul(xb, c64(QK_K))

            def vld(off, base=base):
                return b.load(b.bitcast(b.gep(base, [c64(off)]), v8i32.as_pointer()), align=1)

            ops = _Ops(b, v8i32, vld)
            # two accumulators: the vpdpwssd chain of one super-block is then 4 deep, not 8
            isums = [ir.Constant(vi32, [0] * W)] * 2
            undef = ir.Constant(v16i16, ir.Undefined)
            for j, gs in enumerate(units):
                qs = [group(ops, g) for g in gs]
                q = qs[0] if W == 8 else b.shuffle_vector(qs[0], qs[1], ir.Constant(ir.VectorType(_I32, 16),
                                                                                   list(range(16))))
                xv = vload(b, xqp, b.add(xbase, c64(4 * W * j)), vi8, 1)
                p = b.call(maddubs, [b.bitcast(q, vi8), xv])
                scv = b.shuffle_vector(sc, undef, ir.Constant(ir.VectorType(_I32, 2 * W),
                                                              [i for g in gs for i in [2 * g] * 8 + [2 * g + 1] * 8]))
                a = isums[j % 2]
                if dpwssd is not None:
                    a = b.call(dpwssd, [a, b.bitcast(p, vi32), b.bitcast(scv, vi32)])
                else:
                    a = b.add(a, b.call(maddwd, [p, scv]))
                isums[j % 2] = a
            isum = b.add(isums[0], isums[1])
            bs = vload(b, xbsp, b.mul(xb, c64(16)), v16i16, 2)
            ms = b.call(maddwd, [mi, bs])
            dxs = b.load(b.gep(dxp, [xb]))
            if sym:
                msw = ms if W == 8 else b.shuffle_vector(ms, ir.Constant(v8i32, [0] * 8),
                                                         ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
                isum = b.sub(isum, msw)
            f = b.call(fma, [b.sitofp(isum, vf32), splat(b, b.fmul(b.load(b.gep(dwp, [wb])), dxs), vf32),
                             b.load(facc)])
            b.store(f, facc)
            if not sym:
                m = b.call(fma8, [b.sitofp(ms, v8f32), splat(b, b.fmul(b.load(b.gep(mwp, [wb])), dxs), v8f32),
                                  b.load(macc)])
                b.store(m, macc)
        # the row's sum as a tree (halves added, log2(W) steps): a chain of W + 8 scalar adds was ~100
        # cycles of latency per row, much of a small matrix's time (576x1536 Q4_K: 6 super-blocks a
        # row; 0.041 -> 0.031 ms a call). (Two weight rows per call, sharing the activation loads, were
        # tried after that: no faster.)
        f = b.load(facc)
        if not sym:
            m = b.load(macc)
            if W == 16:
                m = b.shuffle_vector(m, ir.Constant(v8f32, [0.0] * 8),
                                     ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
            f = b.fsub(f, m)
        h = W
        while h > 1:
            h //= 2
            und = ir.Constant(f.type, ir.Undefined)
            lo = b.shuffle_vector(f, und, ir.Constant(ir.VectorType(_I32, h), list(range(h))))
            hi = b.shuffle_vector(f, und, ir.Constant(ir.VectorType(_I32, h), list(range(h, 2 * h))))
            f = b.fadd(lo, hi)
        s = b.extract_element(f, ir.Constant(_I32, 0))
        b.store(s, b.gep(outp, [b.add(b.mul(kv, rowsv), rv)]))
        return context.get_dummy_value()

    return sig, codegen


#: Weight rows per parallel work item of the decode driver (more items than threads: a descheduled
#: thread on a shared machine then delays a small item, not half the work).
DEC_ROWS = 64


# The drivers are nogil claim loops, run once on each thread (families.parallel_rows with one "row"
# per thread; items claimed from a counter, quantfmt.numba_threads), not parallel=True pranges: those
# compiled ~2x slower cold (the kernel optimized again inside the gufunc), for the same loop.
@numba.njit(cache=True, nogil=True)
def _drive_decode(tok, w, dw, mw, xq, xbs, dx, out, rows, n, nb, counter, _c0, _c1):
    items = (rows + DEC_ROWS - 1) // DEC_ROWS
    it = claim(counter)
    while it < items:
        for r in range(it * DEC_ROWS, min(rows, (it + 1) * DEC_ROWS)):
            for k in range(n):
                _kdec(tok, w, dw, mw, xq, xbs, dx, out, r, k, rows, nb)
        it = claim(counter)


# ---- one activation row, one call: Format.matvec_fn ------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _act_row(order, x, d, qs, bs, qflat, qp):
    """ONE activation row x (1, cols) as qmatmul gives it to the decode kernel: quantize_row_q8_K_ref
    (_kquants._q8k_blocks, the kernel quantize_q8_K runs) into d, qs, bs, then the zmm path's group
    order (order: the permutation PAIR_ORDER, into qp; empty: none, the kernel reads qs). False
    (nothing computed) if x holds a NaN or an infinity: the caller then takes qmatmul, which raises."""
    for c in range(x.shape[1]):
        if not (abs(x[0, c]) < np.inf):
            return False
    nb = d.shape[1]
    _q8k_blocks(x, d, qs, bs, 0, nb)
    if order.shape[0] > 0:
        for b in range(nb):
            for j in range(8):
                g = order[j]
                for i in range(32):
                    qp[b * QK_K + 32 * j + i] = qflat[b * QK_K + 32 * g + i]
    return True


@numba.njit(cache=True, nogil=True)
def _matvec(tok, order, w, dw, mw, x, d, qs, bs, qflat, qp, bsflat, dflat, counter, out, rows):
    """qmatmul's decode of ONE activation row in one compiled call on this thread: _act_row, then the
    decode driver. The same operations as qmatmul's, so the same bits; False as _act_row."""
    if not _act_row(order, x, d, qs, bs, qflat, qp):
        return False
    counter[0] = 0
    _drive_decode(tok, w, dw, mw, qp if order.shape[0] > 0 else qflat, bsflat, dflat, out, rows, 1, d.shape[1],
                  counter, 0, 1)
    return True


_ROW_WORK = threading.local()


def _row_work(cols: int) -> tuple:
    """This thread's work space of _matvec for rows of `cols` (one set per width, kept: a model's
    layers alternate widths)."""
    ws = getattr(_ROW_WORK, "by_cols", None)
    if ws is None:
        ws = _ROW_WORK.by_cols = {}
    if cols not in ws:
        nb = cols // QK_K
        d = np.empty((1, nb), np.float32)
        qs = np.empty((1, nb, QK_K), np.int8)
        bs = np.empty((1, nb, 16), np.int16)
        ws[cols] = (d, qs, bs, qs.reshape(-1), np.empty(nb * QK_K, np.int8), bs.reshape(-1), d.reshape(-1),
                    np.zeros(1, np.int64))
    return ws[cols]


def matvec_fn(kind: str, prep, path: str | None = None):
    """Format.matvec_fn of the k-quants in mode "q8_k": the one-row kernel with its arguments bound. A
    matrix large enough for threads (decode_threads) has its activation row made by one compiled call
    (_act_row) and the driver run by parallel_rows, where qmatmul spent ~0.15 ms of Python around the
    kernel (its checks, quantize_q8_K's own thread hand-off, the group order as a numpy copy): 5632x2048
    Q4_K 0.46 -> 0.31 ms a call from DRAM."""
    path = path or _i8gemm.PATH
    rows, cols = prep.rows, prep.cols
    threads = decode_threads(rows, cols)
    w = prep.data.reshape(-1)
    dw, mw = (a.reshape(-1) for a in prep.scales)
    tok = variant(kind, path)
    order = PAIR_ORDER[kind].astype(np.int64) if dec_width(path) == 16 else np.zeros(0, np.int64)
    nb = cols // QK_K

    def run(x):
        out = np.empty((1, rows), np.float32)
        return out if _matvec(tok, order, w, dw, mw, x, *_row_work(cols), out.reshape(-1), rows) else None

    def run_threads(x):
        d, qs, bs, qflat, qp, bsflat, dflat, counter = _row_work(cols)
        if not _act_row(order, x, d, qs, bs, qflat, qp):
            return None
        out = np.empty((1, rows), np.float32)
        counter[0] = 0
        parallel_rows(_drive_decode, threads, 1, tok, w, dw, mw, qp if order.shape[0] else qflat, bsflat, dflat,
                      out.reshape(-1), rows, 1, nb, counter, weights=1)
        return out

    return run if threads == 1 else run_threads


# ---- prefill: a register tile of RW weight rows x NV vectors of activation rows -------------------


def _make_prefill(rw: int, nv: int):
    @intrinsic
    def kpre(typingctx, tok, w, dw, mw, xa, xbs, dx, out, r0, rows, g0, groups, nb):
        sig = types.void(tok, w, dw, mw, xa, xbs, dx, out, r0, rows, g0, groups, nb)
        kind, path = _decode_variant(tok)
        bb, group, scales, sym, qmax = KINDS[kind]
        small = 16 * qmax * 127 < 2**15  # a sub-block's dot fits int16
        lanes = LANES[path]

        def codegen(context, builder, signature, args):
            b = builder
            at = signature.args
            wp, dwp, mwp, xap, xbsp, dxp, outp = (context.make_array(at[i])(context, b, args[i]).data
                                                  for i in range(1, 8))
            r0v, rowsv, g0v, groupsv, nbv = args[8:13]
            mod = b.module
            vi32, vf32 = ir.VectorType(_I32, lanes), ir.VectorType(_F32, lanes)
            v8i32 = ir.VectorType(_I32, 8)
            vi8, vi16 = ir.VectorType(_I8, 4 * lanes), ir.VectorType(_I16, 2 * lanes)
            fma = _declare(mod, f"llvm.fmuladd.v{lanes}f32", vf32, [vf32] * 3)
            if path == "avx2":
                maddubs = _declare(mod, "llvm.x86.avx2.pmadd.ub.sw", vi16, [vi8, vi8])
                maddwd = _declare(mod, "llvm.x86.avx2.pmadd.wd", vi32, [vi16, vi16])
            else:
                suffix = "512" if lanes == 16 else "256"
                dpbusd = _declare(mod, f"llvm.x86.avx512.vpdpbusd.{suffix}", vi32, [vi32] * 3)
                dpwssd = _declare(mod, f"llvm.x86.avx512.vpdpwssd.{suffix}", vi32, [vi32] * 3)

            def wdot(acc, a, bv):  # acc += per lane, pairs of int16 products (msum)
                if path == "avx2":
                    return b.add(acc, b.call(maddwd, [b.bitcast(a, vi16), b.bitcast(bv, vi16)]))
                return b.call(dpwssd, [acc, a, bv])

            last_r, last_g = b.sub(rowsv, c64(1)), b.sub(groupsv, c64(1))
            rs = [b.select(b.icmp_signed("<", b.add(r0v, c64(i)), last_r), b.add(r0v, c64(i)), last_r)
                  for i in range(rw)]
            gs = [b.select(b.icmp_signed("<", b.add(g0v, c64(v)), last_g), b.add(g0v, c64(v)), last_g)
                  for v in range(nv)]
            zf = ir.Constant(vf32, [0.0] * lanes)
            zi = ir.Constant(vi32, [0] * lanes)
            faccs = [[cgutils.alloca_once_value(b, zf) for _ in range(nv)] for _ in range(rw)]
            with cgutils.for_range(b, nbv) as loop:
                blk = loop.index
                wbs = [b.add(b.mul(r, nbv), blk) for r in rs]
                bases = [b.gep(wp, [b.mul(k, c64(bb))]) for k in wbs]
                scs = [scales(_Scalars(b, base)) for base in bases]
                gb = [b.add(b.mul(g, nbv), blk) for g in gs]
                xbase = [b.mul(k, c64(QK_K * lanes)) for k in gb]
                accs = [[zi] * nv for _ in range(rw)]
                for g in range(8):
                    # the group's 32 quants of each weight row, unpacked once with vector ops; each unit
                    # of 4 is then broadcast from its lane (no scalar unpacking per unit)
                    qg = []
                    for i in range(rw):
                        def vld(off, base=bases[i]):
                            return b.load(b.bitcast(b.gep(base, [c64(off)]), v8i32.as_pointer()), align=1)

                        qg.append(group(_Ops(b, v8i32, vld), g))
                    for h in (0, 16):  # the two sub-blocks of 16 of the group
                        s = (32 * g + h) // 16
                        scal = [b.extract_element(sc, ir.Constant(_I32, s)) for sc, _ in scs]
                        tmp = [[zi] * nv for _ in range(rw)]
                        for u in range(h // 4, h // 4 + 4):
                            xs = [vload(b, xap, b.add(xbase[v], c64(4 * lanes * (8 * g + u))), vi32, 4)
                                  for v in range(nv)]
                            for i in range(rw):
                                wv = splat(b, b.extract_element(qg[i], ir.Constant(_I32, u)), vi32)
                                for v in range(nv):
                                    if path == "avx2":  # the scale rides in vpmaddwd (no vpmulld)
                                        p = b.call(maddubs, [b.bitcast(wv, vi8), b.bitcast(xs[v], vi8)])
                                        s16 = splat(b, scal[i], vi16)
                                        accs[i][v] = b.add(accs[i][v], b.call(maddwd, [p, s16]))
                                    else:
                                        tmp[i][v] = b.call(dpbusd, [tmp[i][v], wv, xs[v]])
                        if path == "avx2":
                            continue
                        for i in range(rw):
                            if small:
                                # |sub-block dot| < 2**15: its int32 lane is a sign-extended int16, so
                                # vpdpwssd with (sc, 0) pairs adds sc*dot in one instruction (no vpmulld)
                                s32 = splat(b, b.and_(b.sext(scal[i], _I32), ir.Constant(_I32, 0xFFFF)), vi32)
                                for v in range(nv):
                                    accs[i][v] = b.call(dpwssd, [accs[i][v], tmp[i][v], s32])
                            else:
                                s32 = splat(b, b.sext(scal[i], _I32), vi32)
                                for v in range(nv):
                                    accs[i][v] = b.add(accs[i][v], b.mul(tmp[i][v], s32))
                # msum: mi pairs broadcast against per-lane bsum pairs
                mss = [[zi] * nv for _ in range(rw)]
                for p in range(8):
                    bsv = [vload(b, xbsp, b.add(b.mul(k, c64(16 * lanes)), c64(2 * lanes * p)), vi32, 4) for k in gb]
                    for i in range(rw):
                        mi = scs[i][1]
                        pair = b.shuffle_vector(mi, ir.Constant(mi.type, ir.Undefined),
                                                ir.Constant(ir.VectorType(_I32, 2), [2 * p, 2 * p + 1]))
                        mv = splat(b, b.bitcast(pair, _I32), vi32)
                        for v in range(nv):
                            mss[i][v] = wdot(mss[i][v], mv, bsv[v])
                dxs = [vload(b, dxp, b.mul(k, c64(lanes)), vf32, 4) for k in gb]
                for i in range(rw):
                    dwv = splat(b, b.load(b.gep(dwp, [wbs[i]])), vf32)
                    mwv = None if sym else splat(b, b.fneg(b.load(b.gep(mwp, [wbs[i]]))), vf32)
                    for v in range(nv):
                        f = b.load(faccs[i][v])
                        a = b.sub(accs[i][v], mss[i][v]) if sym else accs[i][v]
                        f = b.call(fma, [b.sitofp(a, vf32), b.fmul(dwv, dxs[v]), f])
                        if not sym:
                            f = b.call(fma, [b.sitofp(mss[i][v], vf32), b.fmul(mwv, dxs[v]), f])
                        b.store(f, faccs[i][v])
            for i in range(rw):
                for v in range(nv):
                    f = b.load(faccs[i][v])
                    row0 = b.mul(gs[v], c64(lanes))
                    for lane in range(lanes):
                        o = b.add(b.mul(b.add(row0, c64(lane)), rowsv), rs[i])
                        b.store(b.extract_element(f, ir.Constant(_I32, lane)), b.gep(outp, [o]))
            return context.get_dummy_value()

        return sig, codegen

    return kpre


# Register tile: per (row, vector) an int32 sub-block accumulator and a super-block one, so tiles are
# smaller than _i8gemm's 3x4. Measured (4096x4096, n = 128, one thread, vs float32 sgemm): 2x4 0.82x,
# 1x4 0.93-1.13x, 2x2 0.74x, 3x2 0.65-0.71x, 4x2 0.67-0.72x, 3x3 0.76-0.78x (the 8 groups of a
# super-block are unrolled; larger tiles spill).
RW = 3  # weight rows per register tile
NV = 2  # activation vectors per register tile
_kpre = _make_prefill(RW, NV)
CHUNK_GROUPS = _i8gemm.CHUNK_GROUPS


@numba.njit(cache=True, nogil=True)
def _drive_prefill(tok, w, dw, mw, xa, xbs, dx, out, rows, groups, nb, c0, counter, _c0, _c1):
    # as plugins/_i8gemm.py's drivers: activation chunks of CHUNK_GROUPS vectors (they stay in L2; the
    # caller runs one chunk c0 at a time), weight-row-major register tiles within a chunk. An odd group
    # count leaves a last tile whose second vector is clamped onto the first (computed twice, stored
    # twice, the same values): no separate 1-vector kernel, which would double the cold compile time.
    ng = (min(CHUNK_GROUPS, groups - c0) + NV - 1) // NV
    jobs = (rows + RW - 1) // RW * ng
    job = claim(counter)
    while job < jobs:
        r, j = job // ng * RW, job % ng
        _kpre(tok, w, dw, mw, xa, xbs, dx, out, r, rows, c0 + j * NV, groups, nb)
        job = claim(counter)


# ---- entry ------------------------------------------------------------------------------------------

#: Activation rows from which the prefill kernel runs, per int8 path (below: the decode kernel, each
#: weight row once for all n rows). The prefill kernel's time is that of a whole group of LANES[path]
#: rows whatever n is; the decode's grows with n. Measured (2 threads, ms, decode vs prefill), 11008x4096
#: in the L3, avx512vnni: Q4_K n=8 5.2 vs 6.5, n=12 6.5 vs 6.3; Q6_K n=8 5.8 vs 8.1, n=12 8.7 vs 8.5; Q2_K
#: n=12 6.1 vs 6.4; Q3_K n=8 7.2 vs 8.4, n=12 9.7 vs 6.5; Q5_K n=8 7.0 vs 7.4. Forced avxvnni: Q4_K n=6 6.1
#: vs 5.8, Q6_K n=6 4.6 vs 5.9, n=8 6.5 vs 7.6; forced avx2: Q4_K n=8 7.0 vs 9.5, n=12 10.3 vs 9.9, Q6_K
#: n=8 6.7 vs 9.7, n=12 15.5 vs 12.7. From DRAM (5632x2048, 40 matrices in turn) decode wins further, to n=16
#: for Q4_K. It was 4 (6 for Q6_K), measured before the decode kernel's prefetch and tree sum: a 0.68B
#: Q4_K_M model took 144 ms for 4 prompt tokens and 46 ms for 3.
MIN_ROWS = {"avx512vnni": 10, "avxvnni": 6, "avx2": 10}


def qmatmul(kind: str, prep, dx, qx, bs, path: str | None = None) -> np.ndarray:
    """Mode "q8_k" for a KPrepared of format `kind`, given the Q8_K activations (dx (n, nb), qx
    (n, nb, 256) int8, bs (n, nb, 16) int16), on int8 path `path` (default _i8gemm.PATH)."""
    path = path or _i8gemm.PATH
    n, nb = dx.shape
    rows = prep.rows
    w = prep.data.reshape(-1)
    dw, mw = prep.scales
    tok = variant(kind, path)
    if n < MIN_ROWS[path]:
        if dec_width(path) == 16:
            qx = np.ascontiguousarray(qx.reshape(n, nb, 8, 32)[:, :, PAIR_ORDER[kind]])
        out = np.empty((n, rows), np.float32)
        parallel_rows(_drive_decode, decode_threads(rows, nb * 256), 1, tok, w, dw.reshape(-1), mw.reshape(-1),
                      qx.reshape(-1), bs.reshape(-1), dx.reshape(-1), out.reshape(-1), rows, n, nb,
                      np.zeros(1, np.int64), weights=1)
        return out
    lanes = LANES[path]
    groups = -(-n // lanes)
    # xa (groups, nb, 64 units, lanes, 4): the 256 quants of a super-block as 64 units of 4
    xa = lanes_layout(qx.reshape(n, nb, 64, 4), groups, lanes)
    xa = np.ascontiguousarray(np.moveaxis(xa.reshape(groups, nb, 64, 4, lanes), 3, 4))
    xbs = lanes_layout(bs.reshape(n, nb, 8, 2), groups, lanes)
    xbs = np.ascontiguousarray(np.moveaxis(xbs.reshape(groups, nb, 8, 2, lanes), 3, 4))
    dxl = lanes_layout(dx, groups, lanes)
    out = np.empty((groups * lanes, rows), np.float32)
    args = (tok, w, dw.reshape(-1), mw.reshape(-1), xa.reshape(-1), xbs.reshape(-1), dxl.reshape(-1), out.reshape(-1),
            rows, groups, nb)
    for c0 in range(0, groups, CHUNK_GROUPS):
        parallel_rows(_drive_prefill, numba.get_num_threads(), 1, *args, c0, np.zeros(1, np.int64), weights=1)
    return out[:n]
