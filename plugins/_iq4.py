"""The scale search that ggml's two 4-bit non-linear formats share (IQ4_NL, IQ4_XS).

Owns the table V = kvalues_iq4nl, ggml's best_index_int8 on it, and the per-32-block search
of quantize_row_iq4_nl_impl (ntry = 7) that both formats run on each block of 32 weights,
twice: numpy, vectorized over many blocks (the references), and numba on one block (the kernels:
the 16 fits of a block side by side in 16-lane vector IR, `fit16`, and the final index pass `pack32`;
paths "simd16" (AVX-512) and "portable", see below). What differs between the formats (where the
importance weights' sigma2 comes from, how the block scale is stored) stays in plugins/iq4_nl.py
and plugins/iq4_xs.py; the exact arithmetic is in their docstrings.

This module is private (its name starts with "_"), so the registry does not load it.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from quantfmt import cpu

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
NTRY = 7
GROUP_MAX_EPS = np.float32(1e-15)

VF = KVALUES.astype(np.float32)
# For a in (-127, 113): BRACKET[floor(a) + 127] = l with V[l] <= a < V[l+1] (V are integers).
BRACKET = (np.searchsorted(KVALUES, np.arange(-127, 113), side="right") - 1).astype(np.int8)

# ---- numpy reference: blocks of 32 in the rows of 2-D arrays -------------------------------


def best_index_ref(a: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, a), elementwise on float32 a."""
    a = np.asarray(a, np.float32)
    with np.errstate(invalid="ignore"):
        mu = np.clip(np.searchsorted(VF, a, side="right"), 1, 15)
        lo, hi = VF[mu - 1], VF[mu]
        out = np.where((a - lo) < (hi - a), mu - 1, mu)
        out = np.where(a <= VF[0], 0, np.where(a >= VF[15], 15, out))
    return np.where(np.isnan(a), 14, out).astype(np.uint8)


def fit_ref(x, wt, idd):
    """(L, sumqx, sumq2) for scales idd (n,), sums in ggml's order (sequential over j)."""
    L = best_index_ref(x * idd[:, None])
    q = VF[L]
    wq = wt * q
    # ggml's sums start from +0.0 (`float sumqx = 0`): a leading zero column makes accumulate do the
    # same, which only matters when every term is -0.0 (the sum is then +0.0, not -0.0)
    z = np.zeros((x.shape[0], 1), np.float32)
    sumqx = np.add.accumulate(np.concatenate([z, wq * x], axis=1), axis=1, dtype=np.float32)[:, -1]
    sumq2 = np.add.accumulate(np.concatenate([z, wq * q], axis=1), axis=1, dtype=np.float32)[:, -1]
    return L, sumqx, sumq2


def search_scales_ref(x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """The fitted float32 scale d of each block of x (n, 32) with weights wt (n, 32); 0 for a
    block whose max |x| is below GROUP_MAX_EPS."""
    n = x.shape[0]
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        i = np.abs(x).argmax(axis=1)  # the first of equal maxima, as ggml's strict `>`
        mx = x[np.arange(n), i]
        small = np.abs(mx) < GROUP_MAX_EPS
        mxs = np.where(small, np.float32(1), mx)  # keeps the arithmetic of skipped blocks finite
        d = -mxs / VF[0]
        _, sumqx, sumq2 = fit_ref(x, wt, np.float32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, np.float32(0)).astype(np.float32)
        best = d * sumqx
        for itry in range(-NTRY, NTRY + 1):
            idd = np.float32(itry + int(KVALUES[0])) / mxs
            _, sumqx, sumq2 = fit_ref(x, wt, idd)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d).astype(np.float32)
            best = np.where(better, d * sumqx, best).astype(np.float32)
    return np.where(small, np.float32(0), d).astype(np.float32)


# ---- numba: one block of 32 -----------------------------------------------------------------
# No fastmath: FMA would change last bits, and `ninf`/`nnan` would break the IEEE
# comparisons of overflowing sums that the search relies on.
#
# The index without a search. best(a) counts the midpoints M[k] = (V[k] + V[k+1]) / 2 (exact
# half-integers) at or below a: best(a) = #{k : a >= M[k]} for every float32 a but NaN (checked
# exhaustively over all 2**32 bit patterns against best_index below: ggml's float32 comparison
# (a - V[l]) < (V[l+1] - a) flips exactly at M[l]). Two ways to count, as LLVM vector IR on 16
# lanes (plugins/_q4simd.py does the same for Q4_0):
#   "simd16" (AVX-512): buckets of 8 over [-128, 128) hold at most one midpoint (the closest two
#            are 11.5 apart), so with b = trunc(clamp(a, -128, 127) + 128) >> 3 (0..31) the value is
#            a >= BMID[b] ? BHI[b] : BLO[b], three 32-entry table lookups by vpermi2ps. (A rounding
#            of clamp(a) + 128 up into the next bucket does not matter: only -16 sits on a bucket
#            start, and it is that bucket's own midpoint; the exhaustive check covers this too.)
#   "portable": 15 compares and selects per lane (any CPU: LLVM splits the 16 lanes as it must).
# Per lane that is ~20 vector instructions for 16 of the 512 (element, scale) pairs of a block
# instead of ~15 scalar ones per pair: ~10x on this Xeon for the search.

MID = ((VF[:-1] + VF[1:]) / 2).astype(np.float32)
_bucket = np.searchsorted(MID, (8 * np.arange(32) - 128).astype(np.float32), side="left")  # midpoints < start
BMID = np.full(32, np.inf, np.float32)  # the bucket's midpoint, +inf where it has none
BMID[((MID + 128) // 8).astype(np.int64)] = MID
BLO_I = _bucket.astype(np.float32)  # the index below the bucket's midpoint (float: one table kind)
BHI_I = np.minimum(_bucket + 1, 15).astype(np.float32)
BLO = VF[_bucket]
BHI = VF[np.minimum(_bucket + 1, 15)]

#: "simd16" (AVX-512 vpermi2ps) or "portable"; chosen for the CPU numba compiles for (quantfmt.cpu,
#: which NUMBA_CPU_NAME / NUMBA_CPU_FEATURES override), so a cached kernel matches its CPU.
PATH = "simd16" if cpu.has("avx512f") else "portable"

_F32, _I32, _I64, _I8 = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.IntType(8)
_V16F, _V16I, _V16B = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16), ir.VectorType(_I8, 16)


def _vf(vals) -> ir.Constant:
    return ir.Constant(_V16F, [float(v) for v in vals])


def _splat(builder, val, vt=_V16F):
    undef = ir.Constant(vt, ir.Undefined)
    v = builder.insert_element(undef, val, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(_V16I, [0] * 16))


def _lookup(builder, kind, a, lo_tab, hi_tab):
    """Per lane of a (<16 x float>, no NaN): hi_tab's entry if a is at or above the midpoint of its
    bracket else lo_tab's, i.e. table[best(a)] for a table (V, or the indices) given per bucket."""
    if kind == "simd16":
        perm = builder.module.declare_intrinsic("llvm.x86.avx512.vpermi2var.ps.512", (),
                                                ir.FunctionType(_V16F, [_V16F, _V16I, _V16F]))
        c = builder.select(builder.fcmp_ordered("<", a, _vf([-128.0] * 16)), _vf([-128.0] * 16), a)
        c = builder.select(builder.fcmp_ordered(">", c, _vf([127.0] * 16)), _vf([127.0] * 16), c)
        b = builder.lshr(builder.fptosi(builder.fadd(c, _vf([128.0] * 16)), _V16I), ir.Constant(_V16I, [3] * 16))
        m = builder.call(perm, [_vf(BMID[:16]), b, _vf(BMID[16:])])
        lo = builder.call(perm, [_vf(lo_tab[:16]), b, _vf(lo_tab[16:])])
        hi = builder.call(perm, [_vf(hi_tab[:16]), b, _vf(hi_tab[16:])])
        return builder.select(builder.fcmp_ordered(">=", a, m), hi, lo)
    # portable: the value climbs one step per midpoint at or below a (steps of V or of the index)
    q = _vf([lo_tab[0]] * 16)
    steps = np.diff(VF) if lo_tab is BLO else np.ones(15, np.float32)
    for k in range(15):
        q = builder.select(builder.fcmp_ordered(">=", a, _vf([MID[k]] * 16)), builder.fadd(q, _vf([steps[k]] * 16)), q)
    return q


# The fits' index, cheaper ("simd16" fit16 only: there a = id*x is known to lie in [-134.01, 134.01],
# as |x| <= |max| and |id| <= 134/|max|). Buckets of width 10.25 in a, numbered by one FMA:
# r = a*FS + FC with FC = 1.5 * 2**23 + 16 rounds a*FS + 16 to an integer n whose low 5 bits are the
# low 5 bits of r's bit pattern, the index vpermi2ps reads (no clamp, convert or shift). n is
# monotone in a; each bucket holds at most one midpoint and every midpoint lies >= 0.62 from a bucket
# edge (FS and the offset chosen to maximize that margin), a in the range gives n in 3..29 (no wrap).
# Then q = V[best(a)] = FLO[n + (a >= FMID[n])]: FLO[n] is V[#midpoints in buckets below n], and for a
# bucket with midpoint M_i, FLO[n + 1] = V[i + 1]. Two table lookups, a compare and a masked add
# instead of clamp, add, convert, shift, three lookups and a blend (18 -> 11 vector ops per element).
# The FMA only numbers the bucket: a and the compare are exact, so the index is ggml's whatever the
# bucket rounding (tests/test_iq4_paths.py checks every midpoint's neighbours and the range's ends).
FS = np.float32(1 / 10.25)
FC = np.float32(1.5 * 2**23 + 16)
_fb = np.rint(MID.astype(np.float64) * np.float64(FS) + 16).astype(np.int64)  # each midpoint's bucket
FMID = np.full(32, np.inf, np.float32)
FMID[_fb] = MID
FLO = VF[np.searchsorted(_fb, np.arange(32), side="left")]  # V[#midpoints in buckets below n]
assert len(set(_fb.tolist())) == 15 and 3 <= _fb.min() and _fb.max() + 1 <= 31
assert np.rint(-134.01 * np.float64(FS) + 16) >= 0 and np.rint(134.01 * np.float64(FS) + 16) <= 31


def _fit_value(builder, a):
    """V[best(a)] per lane of a (<16 x float>, |a| <= 134.01), by the buckets above (AVX-512)."""
    perm = builder.module.declare_intrinsic("llvm.x86.avx512.vpermi2var.ps.512", (),
                                            ir.FunctionType(_V16F, [_V16F, _V16I, _V16F]))
    fma = builder.module.declare_intrinsic("llvm.fma.v16f32", (), ir.FunctionType(_V16F, [_V16F] * 3))
    r = builder.call(fma, [a, _vf([FS] * 16), _vf([FC] * 16)])
    m = builder.call(perm, [_vf(FMID[:16]), builder.bitcast(r, _V16I), _vf(FMID[16:])])
    # n + 1 as r + 1.0 (exact, r is an integer below 2**24): a masked vaddps; the integer form
    # select(k, n + 1, n) becomes n - sext(k), two instructions (vpmovm2d, vpsubd)
    r = builder.select(builder.fcmp_ordered(">=", a, m), builder.fadd(r, _vf([1.0] * 16)), r)
    return builder.call(perm, [_vf(FLO[:16]), builder.bitcast(r, _V16I), _vf(FLO[16:])])


@intrinsic
def fit_value16(typingctx, a, aoff, out):
    """out[aoff + i] = V[best(a[aoff + i])] for i < 16 by _fit_value (for tests: |a| <= 134.01)."""
    sig = types.void(a, aoff, out)

    def codegen(context, builder, signature, args):
        ap = context.make_array(signature.args[0])(context, builder, args[0]).data
        op = context.make_array(signature.args[2])(context, builder, args[2]).data
        v = builder.load(builder.bitcast(builder.gep(ap, [args[1]]), _V16F.as_pointer()), align=4)
        builder.store(_fit_value(builder, v), builder.bitcast(builder.gep(op, [args[1]]), _V16F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _fit_sums(builder, kind, xp, blocks):
    """[(sumqx, sumq2)] of the 16 fits of each block (xoff, weights pointer, max) of blocks, lane t =
    fit t, as <16 x float> (see fit16). Several blocks go element by element side by side: each block's
    sums are two chains of 32 dependent additions (4 cycles each), which one block alone leaves the
    vector ports waiting on (the next block's code does not fit in the out-of-order window)."""
    ids, sums = [], []
    for _, _, mxv in blocks:
        # ids: lane 0 is 1/(-max/V[0]) (two roundings, as C), lanes 1..15 (itry - 127)/max
        idv = builder.fdiv(_vf([0.0] + list(range(-134, -119))), _splat(builder, mxv))
        id0 = builder.fdiv(ir.Constant(_F32, 1.0), builder.fdiv(builder.fneg(mxv), ir.Constant(_F32, -127.0)))
        ids.append(builder.insert_element(idv, id0, ir.Constant(_I32, 0)))
        sums.append((_vf([0.0] * 16), _vf([0.0] * 16)))
    for j in range(32):
        for i, (xoffv, wp, _) in enumerate(blocks):
            xj = builder.load(builder.gep(xp, [builder.add(xoffv, ir.Constant(xoffv.type, j))]))
            wj = builder.load(builder.gep(wp, [ir.Constant(_I64, j)]))
            xv, wv = _splat(builder, xj), _splat(builder, wj)
            a = builder.fmul(ids[i], xv)
            q = _fit_value(builder, a) if kind == "simd16" else _lookup(builder, kind, a, BLO, BHI)
            wq = builder.fmul(wv, q)
            sqx, sq2 = sums[i]
            sums[i] = (builder.fadd(sqx, builder.fmul(wq, xv)),  # separate mul and add: no FMA
                       builder.fadd(sq2, builder.fmul(wq, q)))
    return sums


def _make_fit16(kind: str):
    @intrinsic
    def fit16(typingctx, x, xoff, wt, mx, sums):
        """The 16 fits of a block: sums[t] = sumqx, sums[16 + t] = sumq2, sums[32 + t] = sumqx/sumq2,
        sums[48 + t] = that times sumqx of fit t (t = 0: the first
        guess id = 1/(max/127); t = 1..15: id = (t - 8 - 127)/max), accumulated over x[xoff:xoff+32]
        in element order (as the C loop: each lane one fit, its sums in order: the same roundings);
        wt (32,) the weights, mx the block's signed max (|mx| >= 1e-15)."""
        sig = types.void(x, xoff, wt, mx, sums)

        def codegen(context, builder, signature, args):
            at = signature.args
            xp = context.make_array(at[0])(context, builder, args[0]).data
            wp = context.make_array(at[2])(context, builder, args[2]).data
            sp = context.make_array(at[4])(context, builder, args[4]).data
            ((sqx, sq2),) = _fit_sums(builder, kind, xp, [(args[1], wp, args[3])])
            # each fit's candidate d = sumqx/sumq2 and its best = d*sumqx, as the C computes them (the
            # divisions of fits that lose, or have sumq2 <= 0, are never read)
            dv = builder.fdiv(sqx, sq2)
            for i, v in enumerate((sqx, sq2, dv, builder.fmul(dv, sqx))):
                vp = builder.bitcast(builder.gep(sp, [ir.Constant(_I64, 16 * i)]), _V16F.as_pointer())
                builder.store(v, vp, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return fit16


# ggml's choice among the 16 fits, without a chain of 15 dependent scalar steps ("simd16"): the choice is
# a walk over states s (the fit last taken; 0 = the first guess, whose best is d0*sumqx[0] with d0 = 0
# when sumq2[0] <= 0): from s the next fit taken is the first t > s with sumq2[t] > 0 and
# sumqx[t]^2 > best[s]*sumq2[t] (the same float products and compares as the C), or none. With lanes s,
# next(s) is built by 15 vector compares (t = 15 down to 1, each overwriting the lanes it takes: the
# smallest t wins), then next applied 16 times by 4 squarings next = next[next] (vpermd): lane 0 is the
# fit chosen, d its sumqx/sumq2. The scalar steps (~5 cycles each, 15 a block) cost ~20% of the search.


def _pick(builder, sqx, sq2, sp):
    """ggml's choice among the fits (sqx, sq2) as above: the chosen d (float); sp: float* work space (32)."""
    zero, i0 = ir.Constant(_F32, 0.0), ir.Constant(_I32, 0)
    dv = builder.fdiv(sqx, sq2)
    bv = builder.fmul(dv, sqx)
    d0 = builder.select(builder.fcmp_ordered(">", builder.extract_element(sq2, i0), zero),
                        builder.extract_element(dv, i0), zero)
    dv = builder.insert_element(dv, d0, i0)
    bv = builder.insert_element(bv, builder.fmul(d0, builder.extract_element(sqx, i0)), i0)
    # sumq2 and sumqx^2 through memory: read back as one-use scalar loads, each a broadcast operand of
    # the multiply or compare below (no shuffle); the pointer goes through an empty asm, so LLVM does
    # not forward the stored vectors (it would splat lanes by vpermps, on the port the fits need)
    for i, v in enumerate((sq2, builder.fmul(sqx, sqx))):
        builder.store(v, builder.bitcast(builder.gep(sp, [ir.Constant(_I64, 16 * i)]), _V16F.as_pointer()), align=4)
    sp2 = builder.asm(ir.FunctionType(sp.type, [sp.type]), "", "=r,0", [sp], True)
    pos = builder.zext(builder.bitcast(builder.fcmp_ordered(">", sq2, _vf([0.0] * 16)), ir.IntType(16)), _I32)
    nxt = ir.Constant(_V16I, list(range(16)))
    for t in range(15, 0, -1):
        q2t = _splat(builder, builder.load(builder.gep(sp2, [ir.Constant(_I64, t)])))
        s2t = _splat(builder, builder.load(builder.gep(sp2, [ir.Constant(_I64, 16 + t)])))
        take = builder.fcmp_ordered("<", builder.fmul(bv, q2t), s2t)
        # lanes s < t, and only if sumq2[t] > 0: (pos >> t & 1) * (2**t - 1) as a lane mask
        m = builder.mul(builder.and_(builder.lshr(pos, ir.Constant(_I32, t)), ir.Constant(_I32, 1)),
                        ir.Constant(_I32, (1 << t) - 1))
        m = builder.bitcast(builder.trunc(m, ir.IntType(16)), ir.VectorType(ir.IntType(1), 16))
        nxt = builder.select(builder.and_(take, m), ir.Constant(_V16I, [t] * 16), nxt)
    perm = builder.module.declare_intrinsic("llvm.x86.avx512.permvar.si.512", (),
                                            ir.FunctionType(_V16I, [_V16I, _V16I]))
    for _ in range(4):
        nxt = builder.call(perm, [nxt, nxt])  # nxt[s] = nxt[nxt[s]]
    return builder.extract_element(dv, builder.extract_element(nxt, i0))


@intrinsic
def fit16_pick(typingctx, x, xoff, wt, mx, sums):
    """ggml's fitted scale d of the block x[xoff:xoff+32] (weights wt, signed max mx, |mx| >= 1e-15):
    fit16 ("simd16") then the choice above. sums: float32 (>= 32,) work space."""
    sig = types.float32(x, xoff, wt, mx, sums)

    def codegen(context, builder, signature, args):
        at = signature.args
        xp = context.make_array(at[0])(context, builder, args[0]).data
        wp = context.make_array(at[2])(context, builder, args[2]).data
        sp = context.make_array(at[4])(context, builder, args[4]).data
        ((sqx, sq2),) = _fit_sums(builder, "simd16", xp, [(args[1], wp, args[3])])
        return _pick(builder, sqx, sq2, sp)

    return sig, codegen


@intrinsic
def fit16_pick2(typingctx, x, xoff, wts, k, mx1, mx2, dout, sums):
    """fit16_pick on the two blocks x[xoff:xoff+32] (weights wts[k], max mx1) and x[xoff+32:xoff+64]
    (wts[k+1], mx2), side by side (see _fit_sums): dout[k], dout[k+1] = their d. sums: float32 (>= 64,)."""
    if wts.layout != "C" or wts.ndim != 2:  # rows found by k*32 (wts (n, 32))
        return None
    sig = types.void(x, xoff, wts, k, mx1, mx2, dout, sums)

    def codegen(context, builder, signature, args):
        at = signature.args
        xp = context.make_array(at[0])(context, builder, args[0]).data
        wp = context.make_array(at[2])(context, builder, args[2]).data  # (n, 32) C-contiguous
        op = context.make_array(at[6])(context, builder, args[6]).data
        sp = context.make_array(at[7])(context, builder, args[7]).data
        xoffv, kv = args[1], builder.sext(args[3], _I64) if args[3].type.width < 64 else args[3]
        k1 = builder.add(kv, ir.Constant(_I64, 1))
        blocks = [(xoffv, builder.gep(wp, [builder.mul(kv, ir.Constant(_I64, 32))]), args[4]),
                  (builder.add(xoffv, ir.Constant(xoffv.type, 32)),
                   builder.gep(wp, [builder.mul(k1, ir.Constant(_I64, 32))]), args[5])]
        for i, (sqx, sq2) in enumerate(_fit_sums(builder, "simd16", xp, blocks)):
            d = _pick(builder, sqx, sq2, builder.gep(sp, [ir.Constant(_I64, 32 * i)]))
            builder.store(d, builder.gep(op, [builder.add(kv, ir.Constant(_I64, i))]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _block_max(typingctx, x, xoff):
    """max in ggml's search: the first x[xoff + j] (j < 32) of largest |x| (0 if all are 0), found
    with vector compares (the scalar loop's branch mispredicts on random data)."""
    sig = types.float32(x, xoff)

    def codegen(context, builder, signature, args):
        xp = context.make_array(signature.args[0])(context, builder, args[0]).data
        xoffv = args[1]
        fabs = builder.module.declare_intrinsic("llvm.fabs.v16f32", (), ir.FunctionType(_V16F, [_V16F]))
        cttz = builder.module.declare_intrinsic("llvm.cttz.i32", (), ir.FunctionType(_I32, [_I32, ir.IntType(1)]))
        halves = []
        for h in range(2):
            xh = builder.gep(xp, [builder.add(xoffv, ir.Constant(xoffv.type, 16 * h))])
            halves.append(builder.call(fabs, [builder.load(builder.bitcast(xh, _V16F.as_pointer()), align=4)]))
        m = builder.select(builder.fcmp_ordered(">", halves[0], halves[1]), halves[0], halves[1])
        for width in (8, 4, 2, 1):  # the largest |x| (inputs are finite; exact in any order)
            sh = builder.shuffle_vector(m, m, ir.Constant(_V16I, [(i + width) % 16 for i in range(16)]))
            m = builder.select(builder.fcmp_ordered(">", m, sh), m, sh)
        mall = _splat(builder, builder.extract_element(m, ir.Constant(_I32, 0)))
        bits = [builder.zext(builder.bitcast(builder.fcmp_ordered("==", v, mall), ir.IntType(16)), ir.IntType(32))
                for v in halves]
        mask = builder.or_(bits[0], builder.shl(bits[1], ir.Constant(ir.IntType(32), 16)))
        j = builder.call(cttz, [mask, ir.Constant(ir.IntType(1), 1)])  # the first of equal maxima
        # all zeros: every lane equals max 0, j = 0 and x[0] is +-0: |max| < eps either way
        return builder.load(builder.gep(xp, [builder.add(xoffv, builder.zext(j, xoffv.type))]))

    return sig, codegen


def _make_pack32(kind: str):
    @intrinsic
    def pack32(typingctx, x, xoff, idd, out, ooff):
        """out[ooff + j] = best(idd*x[xoff+j]) | best(idd*x[xoff+16+j]) << 4 for j < 16; NaN gives 14."""
        sig = types.void(x, xoff, idd, out, ooff)

        def codegen(context, builder, signature, args):
            at = signature.args
            xp = context.make_array(at[0])(context, builder, args[0]).data
            op = context.make_array(at[3])(context, builder, args[3]).data
            xoffv, iddv, ooffv = args[1], args[2], args[4]
            dv = _splat(builder, iddv)
            idx = []
            for h in range(2):
                xh = builder.gep(xp, [builder.add(xoffv, ir.Constant(xoffv.type, 16 * h))])
                xv = builder.load(builder.bitcast(xh, _V16F.as_pointer()), align=4)
                a = builder.fmul(dv, xv)
                nan = builder.fcmp_unordered("uno", a, a)
                a0 = builder.select(nan, _vf([0.0] * 16), a)  # keeps NaN out of the conversion
                li = builder.select(nan, _vf([14.0] * 16), _lookup(builder, kind, a0, BLO_I, BHI_I))
                idx.append(builder.fptoui(li, _V16B))
            b = builder.or_(idx[0], builder.shl(idx[1], ir.Constant(_V16B, [4] * 16)))
            builder.store(b, builder.bitcast(builder.gep(op, [ooffv]), _V16B.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return pack32


fit16_simd16, fit16_portable = _make_fit16("simd16"), _make_fit16("portable")
pack32_simd16, pack32_portable = _make_pack32("simd16"), _make_pack32("portable")
_fit16 = fit16_simd16 if PATH == "simd16" else fit16_portable
#: The kernels' final pass: pack32(x, xoff, idd, out, ooff) writes a block's 16 bytes of indices.
pack32 = pack32_simd16 if PATH == "simd16" else pack32_portable


@numba.njit(cache=True, inline="always")
def best_index(a, vf, bracket):
    # best_index_int8 without the binary search: V are integers, so floor(a) finds the
    # bracket; the final comparison is ggml's, in float32. (Scalar; the kernels use pack32.)
    if a <= vf[0]:
        return 0
    if a >= vf[15]:
        return 15
    if a != a:
        return 14
    lo = np.int64(bracket[np.int64(np.floor(a)) + 127])
    return lo if (a - vf[lo]) < (vf[lo + 1] - a) else lo + 1


@numba.njit(cache=True, error_model="numpy")
def search_scale(x, xoff, wt, sums):
    """The fitted scale of the block x[xoff:xoff+32] (x contiguous) with weights wt (32,), as
    search_scales_ref; sums: float32 (64,), work space. The 16 fits run in _fit16, one lane each
    (its portable and simd16 forms give the same bits: tests/test_iq4_paths.py); the choice among
    them is ggml's, in order, without branches (which fit wins is data: a branch per fit
    mispredicts often, and cost as much as the fits' vector code)."""
    mx = _block_max(x, xoff)
    if abs(mx) < GROUP_MAX_EPS:
        return np.float32(0.0)
    _fit16(x, xoff, wt, mx, sums)
    d = sums[32] if sums[16] > 0 else np.float32(0.0)
    best = d * sums[0]
    for t in range(1, 16):
        sqx = sums[t]
        sq2 = sums[16 + t]
        take = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = sums[32 + t] if take else d
        best = sums[48 + t] if take else best
    return d



@numba.njit(cache=True, error_model="numpy")
def search_scales(x, xoff, wts, S, dout):
    """search_scale on the n = dout.size consecutive blocks x[xoff + 32k : xoff + 32k + 32] (weights
    wts[k], (n, 32)), the fitted scales into dout; S (n, 64) float32 work space. The same bits as
    search_scale block by block: the 16 fits of each block in _fit16, then ggml's choice among them
    with the loop over blocks inside the loop over fits. Why: the choice is a chain (each `best` feeds
    the next compare, ~9 cycles a fit, ~25% of the search when run block by block); across blocks
    the chains are independent, so the CPU overlaps them. On "simd16" fit16_pick makes the choice in
    vector registers instead (the scalar loop was still ~20% of the search)."""
    n = dout.size
    if PATH == "simd16":
        # two blocks at a time (fit16_pick2: their sums' chains overlap), one where the other is all but 0
        for k in range(0, n - 1, 2):
            o = xoff + 32 * k
            mx1 = _block_max(x, o)
            mx2 = _block_max(x, o + 32)
            if abs(mx1) >= GROUP_MAX_EPS and abs(mx2) >= GROUP_MAX_EPS:
                fit16_pick2(x, o, wts, k, mx1, mx2, dout, S[k])
            else:  # ggml returns 0 for a block whose max is below eps
                dout[k] = np.float32(0.0) if abs(mx1) < GROUP_MAX_EPS else fit16_pick(x, o, wts[k], mx1, S[k])
                dout[k + 1] = np.float32(0.0) if abs(mx2) < GROUP_MAX_EPS else fit16_pick(x, o + 32, wts[k + 1],
                                                                                           mx2, S[k])
        if n % 2:
            k = n - 1
            mx = _block_max(x, xoff + 32 * k)
            dout[k] = np.float32(0.0) if abs(mx) < GROUP_MAX_EPS else fit16_pick(x, xoff + 32 * k, wts[k], mx, S[k])
        return
    for k in range(n):
        o = xoff + 32 * k
        mx = _block_max(x, o)
        if abs(mx) < GROUP_MAX_EPS:
            # ggml returns 0: sumq2 <= 0 everywhere makes the choice below keep d = 0
            for t in range(32):
                S[k, t] = np.float32(0.0)
        else:
            _fit16(x, o, wts[k], mx, S[k])
    for k in range(n):
        d = S[k, 32] if S[k, 16] > 0 else np.float32(0.0)
        dout[k] = d
        S[k, 48] = d * S[k, 0]  # best (S[k, 48], the first fit's d*sumqx, is read by nothing else)
    for t in range(1, 16):
        for k in range(n):
            sqx = S[k, t]
            sq2 = S[k, 16 + t]
            take = (sq2 > 0) & (sqx * sqx > S[k, 48] * sq2)
            dout[k] = S[k, 32 + t] if take else dout[k]
            S[k, 48] = S[k, 48 + t] if take else S[k, 48]
