"""The k-quants' sub-block scale searches on 16 or 32 sub-blocks at once, as LLVM vector IR.

Owns three intrinsic factories, each one of plugins/_kquants.py's lane searches on lanes
lanes*g .. lanes*g + lanes-1 of its element-major work arrays (lanes = 16: one zmm per quantity with
AVX-512; 32: two, whose independent chains the CPU overlaps, ~10% on the Q4_K search):
    qkx2_16(n, use_mad, lanes)  make_qkx2_quants (Q2_K, Q4_K, Q5_K): make_qkx2_lanes
    qx_16(n, has_qw, lanes)     make_qx_quants, rmse_type 1 (Q6_K): make_qx_lanes
    q3_16(n, lanes)             make_q3_quants with its coordinate descent (Q3_K): make_q3_lanes
Those functions call them for every full group of lanes; their numba loops keep the rest (and are
what tests/test_klanes.py compares the vector code with, bit for bit).

Why. The numba lane loops keep every lane's sums in memory (the element loop is outside the lane
loop, so the accumulators are arrays: a load and a store per sum and element), and numba's int64
nearest_int widens every vector to 64-bit lanes. Here a group of 16 lanes is one <16 x float> per
quantity: the sums stay in registers through the 32 (or 16) unrolled elements of each trial,
nearest_int is 32-bit integer arithmetic on the float bits, exactly ggml's. Each lane does ggml's
operations in ggml's order, every product and sum rounded on its own (separate fmul and fadd: LLVM
does not contract them without fast-math flags), so the bytes are those of the scalar search.
The IR is generic (no x86 intrinsics): LLVM emits zmm with AVX-512, two ymm with AVX2, NEON on ARM.

This module is private (its name starts with "_"), so the registry does not load it.
"""

from __future__ import annotations

import functools

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_F32, _I32, _I64, _I8 = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.IntType(8)
class _Vec:
    """The vector types and constants of one lane count (16: a zmm with AVX-512; 32: two of them, whose
    independent dependency chains LLVM interleaves: the trials are a serial chain per lane group)."""

    def __init__(self, lanes: int):
        self.lanes = lanes
        self.F = ir.VectorType(_F32, lanes)
        self.I = ir.VectorType(_I32, lanes)
        self.B = ir.VectorType(_I8, lanes)
        self.M = ir.IntType(lanes)  # a lane mask as an integer

    def cf(self, v: float) -> ir.Constant:
        return ir.Constant(self.F, [float(v)] * self.lanes)

    def ci(self, v: int) -> ir.Constant:
        return ir.Constant(self.I, [int(v)] * self.lanes)

    def splat(self, builder, val, vt=None):
        vt = vt or self.F
        undef = ir.Constant(vt, ir.Undefined)
        v = builder.insert_element(undef, val, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, undef, ir.Constant(self.I, [0] * self.lanes))

    def nearest_clamp(self, builder, f, lo, hi):
        """min(max(nearest_int(f), lo), hi) as float: ggml's nearest_int is the low 23 bits of the float32
        f + 1.5*2**23 minus 2**22 (the same bit arithmetic for any f); lo, hi: integer vectors."""
        v = builder.bitcast(builder.fadd(f, self.cf(12582912.0)), self.I)
        li = builder.sub(builder.and_(v, self.ci(0x007FFFFF)), self.ci(0x00400000))
        li = builder.select(builder.icmp_signed("<", li, lo), lo, li)
        li = builder.select(builder.icmp_signed(">", li, hi), hi, li)
        return builder.sitofp(li, self.F)

    def round_clamp(self, builder, f, lo, hi):
        """min(max(nearest_int(f), lo), hi) as float for |f| < 2**21 (lo, hi: integer-valued float
        vectors), in 4 instructions where nearest_clamp takes 6 to 8: the clamp first (rounding is
        monotone and the bounds are integers, so clamping before or after rounding is the same), then
        round-half-to-even as (c + 1.5*2**23) - 1.5*2**23 (exact for |c| < 2**22; ties go to the even
        sum, whose parity is c's rounding's, as ggml's nearest_int). Beyond 2**22 (or inf) ggml's bit
        trick gives other values, and NaN gives lo here but 0 there: callers use it only where |f|
        is bounded (qx, q3: |iscale*x| <= ~33) or check the bound (qkx2: the lanes it flags).
        lo None: the caller knows that f >= -0.5, which rounds to +0.0 (the magic sum's tie is even),
        as the clamp would give."""
        c = f if lo is None else builder.select(builder.fcmp_ordered(">", f, lo), f, lo)
        if hi is not None:  # (None: the caller knows that f < hi + 0.5)
            c = builder.select(builder.fcmp_ordered("<", c, hi), c, hi)
        return builder.fsub(builder.fadd(c, self.cf(12582912.0)), self.cf(12582912.0))

    def ptr(self, builder, base, off, vt=None):
        return builder.bitcast(builder.gep(base, [off]), (vt or self.F).as_pointer())

    def fabs(self, builder):
        return builder.module.declare_intrinsic(f"llvm.fabs.v{self.lanes}f32", (), ir.FunctionType(self.F, [self.F]))


@functools.cache
def qkx2_16(n: int, use_mad: bool, lanes: int = 16, groups: int = 1):
    """The intrinsic qkx2(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g): _kquants'
    make_qkx2_lanes on lanes lanes*groups*g .. (g+1)*lanes*groups - 1 of x, w (n, M) float32 and L (n, M)
    uint8 (C order), scale/the_min (M,). The state of the search (min, scale, best error, L) stays per
    lane, as there.

    groups > 1: that many independent groups of `lanes` lanes go through each trial together, one
    after the other in each of its steps (every group's rounding and sums, then every group's solve,
    then every group's error, then every group's take). A trial is a serial chain per group (its
    iscale needs the previous trial's min, its error the solve, the solve the sums), and with one
    group the CPU sat idle at each of those joins (~1 zmm instruction a cycle of 2); the next group's
    loop is independent work to overlap them with. Each lane still does ggml's operations in ggml's
    order: the same bytes. Measured (whole Q4_K quantize, one thread): +2% over groups=1 for Q4_K/Q5_K,
    nothing for Q2_K, for +0.6-0.9 s of cold compile: the formats use groups=1 (tests/test_klanes.py
    keeps groups=2 equal to the loop).

    The trials that need no upper clamp (every lane's isc*(max - min) below nmax + 0.5: 15 of Q4_K's
    21, 10 of Q5_K's and Q2_K's 16) run a loop without it, and the refit of a lane whose min came out
    positive (one more division) runs only in the trials where some lane has one: ~1.05-1.08x. Those
    that need no lower clamp (every lane's isc*(lowest x - min) >= -0.5: ~90% of a group's trials)
    run one without that: Q4_K's quantize 4.55 -> 4.42 ms at 576x1536 on one thread.

    Returns a bit mask (int64) of the lanes whose results may differ from ggml's: the roundings use
    _Vec.round_clamp, exact while |iscale*(x - min)| < 2**21, which each pass checks per lane from
    |iscale| * max(max - min, min - lowest x) (a bound on every |x - min|: float subtraction and
    multiplication are monotone); the caller redoes the flagged lanes with the scalar search (never
    for ordinary data: a sub-block range must be ~1e-37 or beyond ~1e38 to trip it; flat lanes,
    max == min, are ggml's early return and never flagged)."""
    assert lanes * groups <= 64  # the returned mask

    @intrinsic
    def qkx2(typingctx, x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g):
        sig = types.int64(x, w, L, nmax, rmin, rdelta, nstep, scale, the_min, g)

        def codegen(context, builder, signature, args):
            t = _Vec(lanes)
            at = signature.args
            arrs = [context.make_array(at[i])(context, builder, args[i]) for i in (0, 1, 2, 7, 8)]
            xp, wp, lp, sp, mp = (a.data for a in arrs)
            nmaxv, rminv, rdeltav, nstepv, gv = args[3], args[4], args[5], args[6], args[9]
            M = builder.extract_value(arrs[0].shape, 1)
            col0 = builder.mul(gv, ir.Constant(_I64, lanes * groups))
            nmax32 = builder.trunc(nmaxv, _I32)
            nmaxf = builder.sitofp(nmax32, _F32)
            hi = t.splat(builder, nmaxf)
            zero_f = t.cf(0.0)
            fabs = t.fabs(builder)

            def err(d):  # ggml's use_mad: |d|, else d*d
                return builder.call(fabs, [d]) if use_mad else builder.fmul(d, d)

            class G:  # one group's constants and search state (allocas, which LLVM keeps in registers)
                pass

            gs = []
            for k in range(groups):
                s_ = G()
                s_.col = builder.add(col0, ir.Constant(_I64, lanes * k))
                gs.append(s_)

            def off(s_, i):  # i: a Python int or an i64 value
                return builder.add(builder.mul(i if isinstance(i, ir.Value) else ir.Constant(_I64, i), M), s_.col)

            def unsafe(s_, isc, mn):  # lanes where some |isc*(x - mn)| may reach 2**21 (or is NaN)
                span = builder.fsub(s_.mx, mn)
                below = builder.fsub(mn, s_.xlo)
                span = builder.select(builder.fcmp_ordered(">", below, span), below, span)
                bound = builder.fmul(builder.call(fabs, [isc]), span)
                return builder.fcmp_unordered(">=", bound, t.cf(2097152.0))

            for s_ in gs:
                xs = [builder.load(t.ptr(builder, xp, off(s_, i)), align=4) for i in range(n)]
                ws = [builder.load(t.ptr(builder, wp, off(s_, i)), align=4) for i in range(n)]
                mn, mx, sum_w = xs[0], xs[0], ws[0]
                sum_x = builder.fmul(ws[0], xs[0])
                for i in range(1, n):
                    mn = builder.select(builder.fcmp_ordered("<", xs[i], mn), xs[i], mn)
                    mx = builder.select(builder.fcmp_ordered(">", xs[i], mx), xs[i], mx)
                    sum_w = builder.fadd(sum_w, ws[i])
                    sum_x = builder.fadd(sum_x, builder.fmul(ws[i], xs[i]))
                s_.xlo, s_.mx, s_.sum_w, s_.sum_x = mn, mx, sum_w, sum_x
                mn = builder.select(builder.fcmp_ordered(">", mn, t.cf(0.0)), t.cf(0.0), mn)
                s_.flat = builder.fcmp_ordered("==", mx, mn)
                isc = builder.fdiv(t.splat(builder, nmaxf), builder.fsub(mx, mn))
                sc0 = builder.fdiv(t.cf(1.0), isc)
                best = t.cf(0.0)
                s_.st_bad = cgutils.alloca_once_value(builder, unsafe(s_, isc, mn))
                for i in range(n):
                    li = t.round_clamp(builder, builder.fmul(isc, builder.fsub(xs[i], mn)), zero_f, hi)
                    d = builder.fsub(builder.fadd(builder.fmul(sc0, li), mn), xs[i])
                    best = builder.fadd(best, builder.fmul(ws[i], err(d)))
                # the trials: a loop in IR. A lane's L are those of its last taken trial (or the first
                # pass): kept as that trial's (iscale, min), L recomputed from them at the end (the same
                # operations: the same L), not selected per trial.
                s_.st_mn = cgutils.alloca_once_value(builder, mn)
                s_.st_sc = cgutils.alloca_once_value(builder, sc0)
                s_.st_best = cgutils.alloca_once_value(builder, best)
                s_.st_lisc = cgutils.alloca_once_value(builder, isc)
                s_.st_lmn = cgutils.alloca_once_value(builder, mn)
                s_.st_sl, s_.st_sl2, s_.st_sxl, s_.st_cur = (cgutils.alloca_once(builder, t.F) for _ in range(4))
                s_.la_buf = cgutils.alloca_once(builder, t.F, size=n)
            with cgutils.for_range(builder, builder.add(nstepv, ir.Constant(nstepv.type, 1))) as loop:
                s = builder.sitofp(loop.index, _F32)
                num = t.splat(builder, builder.fadd(builder.fadd(rminv, builder.fmul(rdeltav, s)), nmaxf))
                for s_ in gs:
                    mn = builder.load(s_.st_mn)
                    isc = builder.fdiv(num, builder.fsub(s_.mx, mn))
                    s_.mn, s_.isc = mn, isc
                    builder.store(builder.or_(builder.load(s_.st_bad), unsafe(s_, isc, mn)), s_.st_bad)
                    # the element loops of a trial as loops in IR (x_i, w_i loaded again, L_i kept in a
                    # stack array): unrolled, they were ~1000 vector instructions per trial, the bulk of
                    # the Q4_K cold start's LLVM time; the same operations in the same order
                    for st_v in (s_.st_sl, s_.st_sl2, s_.st_sxl, s_.st_cur):
                        builder.store(t.cf(0.0), st_v)

                    def sums(clamp_lo, clamp_hi, s_=s_, isc=isc, mn=mn):
                        with cgutils.for_range(builder, ir.Constant(_I64, n)) as el:
                            i = el.index
                            xi = builder.load(t.ptr(builder, xp, off(s_, i)), align=4)
                            wi = builder.load(t.ptr(builder, wp, off(s_, i)), align=4)
                            y = builder.fmul(isc, builder.fsub(xi, mn))
                            li = t.round_clamp(builder, y, zero_f if clamp_lo else None, hi if clamp_hi else None)
                            builder.store(li, builder.gep(s_.la_buf, [i]))
                            wl = builder.fmul(wi, li)
                            builder.store(builder.fadd(builder.load(s_.st_sl), wl), s_.st_sl)
                            builder.store(builder.fadd(builder.load(s_.st_sl2), builder.fmul(wl, li)), s_.st_sl2)
                            builder.store(builder.fadd(builder.load(s_.st_sxl), builder.fmul(wl, xi)), s_.st_sxl)

                    # The upper clamp is a no-op in a trial where every lane's largest value isc*(max - min)
                    # (an upper bound of each isc*(x - min): x <= max, float - and * by isc > 0 are
                    # monotone) stays below nmax + 0.5, which then rounds to at most nmax: the trials of
                    # iscale <= (nmax + 0.5)/range, 15 of Q4_K's 21. The loop without it: 1 of 18 vector
                    # operations per element fewer.
                    # Likewise the lower clamp, where every lane's smallest value isc*(lowest x - min) is
                    # >= -0.5, which rounds to 0: the min starts at min(x, 0) but a taken trial's fitted
                    # min may lie above the lowest x, by more than half a step in ~1% of a lane's trials
                    # (~10% of a group's). Both checks: 1-2 of the sums' 11-12 vector operations.
                    pos = builder.fcmp_ordered(">", isc, zero_f)
                    top = builder.fmul(isc, builder.fsub(s_.mx, mn))
                    bottom = builder.fmul(isc, builder.fsub(s_.xlo, mn))
                    # a flat lane (all x == min: every isc*(x - min) is inf*0 = NaN, which the lower clamp
                    # makes 0, and no clamp NaN; its D is 0 or NaN: never taken, and its outputs are set
                    # at the end) does not hold the others back (zero pad lanes)
                    all_ok = []
                    for ok in (builder.fcmp_ordered(">=", bottom, t.cf(-0.5)),
                               builder.fcmp_ordered("<", top, builder.fadd(hi, t.cf(0.5)))):
                        ok = builder.or_(builder.and_(pos, ok), s_.flat)
                        all_ok.append(builder.icmp_unsigned("==", builder.bitcast(ok, t.M),
                                                            ir.Constant(t.M, (1 << lanes) - 1)))
                    for lo_case in (0, 1):
                        with builder.if_then(builder.icmp_unsigned("==", builder.zext(all_ok[0], _I32),
                                                                   ir.Constant(_I32, 1 - lo_case))):
                            with builder.if_else(all_ok[1]) as (no_clamp, clamp):
                                with no_clamp:
                                    sums(lo_case == 1, False)
                                with clamp:
                                    sums(lo_case == 1, True)
                for s_ in gs:
                    sum_w, sum_x = s_.sum_w, s_.sum_x
                    sl, sl2, sxl = builder.load(s_.st_sl), builder.load(s_.st_sl2), builder.load(s_.st_sxl)
                    D = builder.fsub(builder.fmul(sum_w, sl2), builder.fmul(sl, sl))
                    a = builder.fdiv(builder.fsub(builder.fmul(sum_w, sxl), builder.fmul(sum_x, sl)), D)
                    m = builder.fdiv(builder.fsub(builder.fmul(sl2, sum_x), builder.fmul(sl, sxl)), D)
                    pos = builder.fcmp_ordered(">", m, t.cf(0.0))
                    s_.m = builder.select(pos, t.cf(0.0), m)
                    # a lane whose min came out positive refits the scale alone: a division (~12 cycles
                    # a zmm, of the 8 a trial makes) only in the rare trials where some lane needs it
                    st_a = cgutils.alloca_once_value(builder, a)
                    anypos = builder.icmp_unsigned("!=", builder.bitcast(pos, t.M), ir.Constant(t.M, 0))
                    with builder.if_then(anypos, likely=False):
                        builder.store(builder.select(pos, builder.fdiv(sxl, sl2), a), st_a)
                    s_.a = builder.load(st_a)
                    s_.D = D
                for s_ in gs:
                    a, m = s_.a, s_.m
                    with cgutils.for_range(builder, ir.Constant(_I64, n)) as el:
                        i = el.index
                        xi = builder.load(t.ptr(builder, xp, off(s_, i)), align=4)
                        wi = builder.load(t.ptr(builder, wp, off(s_, i)), align=4)
                        li = builder.load(builder.gep(s_.la_buf, [i]))
                        d = builder.fsub(builder.fadd(builder.fmul(a, li), m), xi)
                        builder.store(builder.fadd(builder.load(s_.st_cur), builder.fmul(wi, err(d))), s_.st_cur)
                for s_ in gs:
                    cur = builder.load(s_.st_cur)
                    take = builder.and_(builder.fcmp_ordered(">", s_.D, t.cf(0.0)),
                                        builder.fcmp_ordered("<", cur, builder.load(s_.st_best)))
                    builder.store(builder.select(take, cur, builder.load(s_.st_best)), s_.st_best)
                    builder.store(builder.select(take, s_.a, builder.load(s_.st_sc)), s_.st_sc)
                    builder.store(builder.select(take, s_.m, s_.mn), s_.st_mn)
                    builder.store(builder.select(take, s_.isc, builder.load(s_.st_lisc)), s_.st_lisc)
                    builder.store(builder.select(take, s_.mn, builder.load(s_.st_lmn)), s_.st_lmn)
            mask = ir.Constant(_I64, 0)
            for k, s_ in enumerate(gs):
                # flat lanes (max == min): ggml returns early with L = 0, scale 0
                flat = s_.flat
                sc = builder.select(flat, t.cf(0.0), builder.load(s_.st_sc))
                builder.store(sc, t.ptr(builder, sp, s_.col), align=4)
                builder.store(builder.fneg(builder.load(s_.st_mn)), t.ptr(builder, mp, s_.col), align=4)
                lisc, lmn = builder.load(s_.st_lisc), builder.load(s_.st_lmn)
                for i in range(n):
                    xi = builder.load(t.ptr(builder, xp, off(s_, i)), align=4)
                    li = t.round_clamp(builder, builder.fmul(lisc, builder.fsub(xi, lmn)), zero_f, hi)
                    li = builder.select(flat, t.cf(0.0), li)
                    builder.store(builder.fptoui(li, t.B), t.ptr(builder, lp, off(s_, i), t.B), align=1)
                bad = builder.and_(builder.load(s_.st_bad), builder.not_(flat))
                bits = builder.zext(builder.bitcast(bad, t.M), _I64)
                mask = builder.or_(mask, builder.shl(bits, ir.Constant(_I64, lanes * k)) if k else bits)
            return mask

        return sig, codegen

    return qkx2


@functools.cache
def qx_16(n: int, has_qw: bool, lanes: int = 16):
    """The intrinsic qx(x, L, nmax, qw, scale, g): _kquants' make_qx_lanes (make_qx_quants, rmse_type 1)
    on lanes 16g..16g+15 of x (n, M) float32, L (n, M) int8 (C order), qw (n, M) importance weights
    (read only if has_qw; else w = x*x), scale (M,)."""

    @intrinsic
    def qx(typingctx, x, L, nmax, qw, scale, g):
        sig = types.void(x, L, nmax, qw, scale, g)

        def codegen(context, builder, signature, args):
            t = _Vec(lanes)
            at = signature.args
            arrs = [context.make_array(at[i])(context, builder, args[i]) for i in (0, 1, 3, 4)]
            xp, lp, qp, sp = (a.data for a in arrs)
            nmaxv, gv = args[2], args[5]
            M = builder.extract_value(arrs[0].shape, 1)
            col = builder.mul(gv, ir.Constant(_I64, lanes))

            def off(i):
                return builder.add(builder.mul(ir.Constant(_I64, i), M), col)

            xs = [builder.load(t.ptr(builder, xp, off(i)), align=4) for i in range(n)]
            if has_qw:
                ws = [builder.load(t.ptr(builder, qp, off(i)), align=4) for i in range(n)]
            else:
                ws = [builder.fmul(v, v) for v in xs]
            wx = [builder.fmul(ws[i], xs[i]) for i in range(n)]  # C: w*x*l = (w*x)*l
            nmax32 = builder.trunc(nmaxv, _I32)
            nmaxf = builder.sitofp(nmax32, _F32)
            lo = t.splat(builder, builder.sitofp(builder.neg(nmax32), _F32))
            hi = t.splat(builder, builder.sitofp(builder.sub(nmax32, ir.Constant(_I32, 1)), _F32))
            fabs = t.fabs(builder)
            amax = mx = t.cf(0.0)
            for i in range(n):
                ax = builder.call(fabs, [xs[i]])
                gt = builder.fcmp_ordered(">", ax, amax)
                amax = builder.select(gt, ax, amax)
                mx = builder.select(gt, xs[i], mx)

            # |iscale*x| <= (nmax + 0.9)/|max| * |x| ~ nmax + 0.9 on every lane that is not `small` (|max|
            # >= 1e-15 keeps iscale finite; small lanes are zeroed at the end): round_clamp is exact there
            def lvals(isc):
                return [t.round_clamp(builder, builder.fmul(isc, xs[i]), lo, hi) for i in range(n)]

            def fit(isc):
                sumlx = suml2 = t.cf(0.0)
                for lf, i in zip(lvals(isc), range(n), strict=True):
                    sumlx = builder.fadd(sumlx, builder.fmul(wx[i], lf))
                    suml2 = builder.fadd(suml2, builder.fmul(builder.fmul(ws[i], lf), lf))
                return sumlx, suml2

            isc = builder.fdiv(t.splat(builder, builder.fneg(nmaxf)), mx)
            sumlx, suml2 = fit(isc)
            nz = builder.fcmp_unordered("!=", suml2, t.cf(0.0))  # C's !=: true for NaN (overflowed sums)
            sc = builder.select(nz, builder.fdiv(sumlx, suml2), t.cf(0.0))
            best = builder.fmul(sc, sumlx)
            # the 18 trials is = -9..-1, 1..9: a loop in IR (its state in allocas, which LLVM keeps in
            # registers), not 18 unrolled copies of the fit (~4x the machine code to compile: the cold
            # start of Q6_K's quantize was mostly this kernel's LLVM time)
            st_sc = cgutils.alloca_once_value(builder, sc)
            st_best = cgutils.alloca_once_value(builder, best)
            st_isc = cgutils.alloca_once_value(builder, isc)  # a lane's L are those of its last taken fit:
            with cgutils.for_range(builder, ir.Constant(_I64, 18)) as loop:  # recomputed from its iscale
                k = builder.trunc(loop.index, _I32)
                s = builder.sub(k, ir.Constant(_I32, 9))
                s = builder.add(s, builder.zext(builder.icmp_signed(">=", k, ir.Constant(_I32, 9)), _I32))
                tenth = builder.fmul(ir.Constant(_F32, 0.1), builder.sitofp(s, _F32))  # 0.1f * is
                num = builder.fneg(builder.fadd(nmaxf, tenth))
                isc = builder.fdiv(t.splat(builder, num), mx)
                sumlx, suml2 = fit(isc)
                best = builder.load(st_best)
                take = builder.and_(builder.fcmp_ordered(">", suml2, t.cf(0.0)),
                                    builder.fcmp_ordered(">", builder.fmul(sumlx, sumlx), builder.fmul(best, suml2)))
                nsc = builder.fdiv(sumlx, suml2)
                builder.store(builder.select(take, nsc, builder.load(st_sc)), st_sc)
                builder.store(builder.select(take, builder.fmul(nsc, sumlx), best), st_best)
                builder.store(builder.select(take, isc, builder.load(st_isc)), st_isc)
            sc, best_isc = builder.load(st_sc), builder.load(st_isc)
            Ls = lvals(best_isc)
            small = builder.fcmp_ordered("<", amax, t.cf(1e-15))  # ggml returns early: L = 0, scale 0
            builder.store(builder.select(small, t.cf(0.0), sc), t.ptr(builder, sp, col), align=4)
            for i in range(n):
                li = builder.fadd(Ls[i], t.splat(builder, nmaxf))  # L = l + nmax
                li = builder.select(small, t.cf(0.0), li)
                builder.store(builder.fptosi(li, t.B), t.ptr(builder, lp, off(i), t.B), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return qx


@functools.cache
def q3_16(n: int, lanes: int = 16):
    """The intrinsic q3(x, L, nmax, scale, g): _kquants' make_q3_quants (do_rmse: the coordinate descent
    of up to 5 rounds) on lanes 16g..16g+15 of x (n, M) float32, L (n, M) int8 (C order), scale (M,).
    The rounds run until no lane changes: a lane whose round changed nothing has the same state in
    the next round, which then changes nothing either, so running it on is ggml's early break."""

    @intrinsic
    def q3(typingctx, x, L, nmax, scale, g):
        sig = types.void(x, L, nmax, scale, g)

        def codegen(context, builder, signature, args):
            t = _Vec(lanes)
            at = signature.args
            arrs = [context.make_array(at[i])(context, builder, args[i]) for i in (0, 1, 3)]
            xp, lp, sp = (a.data for a in arrs)
            nmaxv, gv = args[2], args[4]
            M = builder.extract_value(arrs[0].shape, 1)
            col = builder.mul(gv, ir.Constant(_I64, lanes))

            def off(i):
                return builder.add(builder.mul(ir.Constant(_I64, i), M), col)

            xs = [builder.load(t.ptr(builder, xp, off(i)), align=4) for i in range(n)]
            ws = [builder.fmul(v, v) for v in xs]
            wx = [builder.fmul(ws[i], xs[i]) for i in range(n)]  # C: w*x[i]*l = (w*x)*l
            nmax32 = builder.trunc(nmaxv, _I32)
            nmaxf = builder.sitofp(nmax32, _F32)
            lo = t.splat(builder, builder.neg(nmax32), t.I)
            hi = t.splat(builder, builder.sub(nmax32, ir.Constant(_I32, 1)), t.I)
            fabs = t.fabs(builder)
            amax = mx = t.cf(0.0)
            for i in range(n):
                ax = builder.call(fabs, [xs[i]])
                gt = builder.fcmp_ordered(">", ax, amax)
                amax = builder.select(gt, ax, amax)
                mx = builder.select(gt, xs[i], mx)
            isc = builder.fdiv(t.splat(builder, builder.fneg(nmaxf)), mx)
            sumlx = suml2 = t.cf(0.0)
            st_L = []
            lof, hif = builder.sitofp(lo, t.F), builder.sitofp(hi, t.F)
            for i in range(n):
                # |iscale*x| <= nmax on lanes that are not `small` (as in qx): round_clamp is exact
                lf = t.round_clamp(builder, builder.fmul(isc, xs[i]), lof, hif)
                st_L.append(cgutils.alloca_once_value(builder, lf))
                sumlx = builder.fadd(sumlx, builder.fmul(wx[i], lf))
                suml2 = builder.fadd(suml2, builder.fmul(builder.fmul(ws[i], lf), lf))
            st_x = cgutils.alloca_once_value(builder, sumlx)
            st_2 = cgutils.alloca_once_value(builder, suml2)
            i1 = ir.IntType(1)
            with cgutils.for_range(builder, ir.Constant(_I64, 5)) as loop:
                changed = ir.Constant(ir.VectorType(i1, lanes), [0] * lanes)
                sumlx, suml2 = builder.load(st_x), builder.load(st_2)
                for i in range(n):
                    lf = builder.load(st_L[i])
                    slx = builder.fsub(sumlx, builder.fmul(wx[i], lf))
                    c1 = builder.fcmp_ordered(">", slx, t.cf(0.0))
                    sl2 = builder.fsub(suml2, builder.fmul(builder.fmul(ws[i], lf), lf))
                    new = t.nearest_clamp(builder, builder.fdiv(builder.fmul(xs[i], sl2), slx), lo, hi)
                    c2 = builder.fcmp_unordered("!=", new, lf)
                    slx2 = builder.fadd(slx, builder.fmul(wx[i], new))
                    sl22 = builder.fadd(sl2, builder.fmul(builder.fmul(ws[i], new), new))
                    c3 = builder.and_(builder.fcmp_ordered(">", sl22, t.cf(0.0)),
                                      builder.fcmp_ordered(">", builder.fmul(builder.fmul(slx2, slx2), suml2),
                                                           builder.fmul(builder.fmul(sumlx, sumlx), sl22)))
                    acc = builder.and_(builder.and_(c1, c2), c3)
                    builder.store(builder.select(acc, new, lf), st_L[i])
                    sumlx = builder.select(acc, slx2, sumlx)
                    suml2 = builder.select(acc, sl22, suml2)
                    changed = builder.or_(changed, acc)
                builder.store(sumlx, st_x)
                builder.store(suml2, st_2)
                none = builder.icmp_unsigned("==", builder.bitcast(changed, t.M), ir.Constant(t.M, 0))
                with builder.if_then(none):  # no lane changed: every lane is done
                    loop.do_break()
            sumlx, suml2 = builder.load(st_x), builder.load(st_2)
            small = builder.fcmp_ordered("<", amax, t.cf(1e-15))  # ggml returns early: L = 0, scale 0
            sc = builder.select(builder.fcmp_ordered(">", suml2, t.cf(0.0)), builder.fdiv(sumlx, suml2), t.cf(0.0))
            builder.store(builder.select(small, t.cf(0.0), sc), t.ptr(builder, sp, col), align=4)
            for i in range(n):
                li = builder.select(small, t.cf(0.0), builder.fadd(builder.load(st_L[i]), t.splat(builder, nmaxf)))
                builder.store(builder.fptosi(li, t.B), t.ptr(builder, lp, off(i), t.B), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return q3


@functools.cache
def qdiv(n: int, has_add: bool):
    """The intrinsic qd(x, xoff, add, div, lo, hi, bias, L, loff): the k-quants' final pass over n
    consecutive weights, L[loff + i] = min(max(nearest_int((x[xoff + i] + add) / div), lo), hi) + bias
    ((x + add) only if has_add; else x / div), one vector division instead of n scalar ones."""

    @intrinsic
    def qd(typingctx, x, xoff, add, div, lo, hi, bias, L, loff):
        sig = types.void(x, xoff, add, div, lo, hi, bias, L, loff)

        def codegen(context, builder, signature, args):
            t = _Vec(n)
            at = signature.args
            xp = context.make_array(at[0])(context, builder, args[0]).data
            lp = context.make_array(at[7])(context, builder, args[7]).data
            xoff, addv, divv, lov, hiv, biasv, loff = args[1], args[2], args[3], args[4], args[5], args[6], args[8]
            v = builder.load(t.ptr(builder, xp, xoff), align=4)
            if has_add:
                v = builder.fadd(v, t.splat(builder, addv))
            lo32, hi32 = builder.trunc(lov, _I32), builder.trunc(hiv, _I32)
            bias = t.splat(builder, builder.sitofp(builder.trunc(biasv, _I32), _F32))
            dst = t.ptr(builder, lp, loff, t.B)
            li = t.nearest_clamp(builder, builder.fdiv(v, t.splat(builder, divv)),
                                 t.splat(builder, lo32, t.I), t.splat(builder, hi32, t.I))
            builder.store(builder.fptosi(builder.fadd(li, bias), t.B), dst, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return qd


@functools.cache
def nibbles(kind: str):
    """The intrinsic nb(L, out, off): the k-quants' final packing of one super-block's 256 quants L
    (uint8, 0..31) into out (uint8) from byte off, as <32 x i8> vectors (numba unrolls the constant
    4 x 32 loops of the same packing into 128 scalar byte operations, ~40 ns a super-block):
        "q4" (Q4_K, Q5_K's low bits): out[off + 32k + i] = (L[64k + i] & 15) | (L[64k + 32 + i] & 15) << 4
        "q5h" (Q5_K's high bits):     out[off + i] = OR_j ((L[32j + i] >> 4) & 1) << j, j < 8
        "q2" (Q2_K):                  out[off + 32h + i] = OR_j L[128h + 32j + i] << 2j, j < 4, h < 2"""
    high = kind == "q5h"

    @intrinsic
    def nb(typingctx, L, out, off):
        sig = types.void(L, out, off)

        def codegen(context, builder, signature, args):
            t = _Vec(32)
            at = signature.args
            lp = context.make_array(at[0])(context, builder, args[0]).data
            op = context.make_array(at[1])(context, builder, args[1]).data
            off = args[2]

            def load(i):
                return builder.load(t.ptr(builder, lp, ir.Constant(_I64, i), t.B), align=1)

            def c8(v):
                return ir.Constant(t.B, [v] * 32)

            if kind == "q2":
                for hh in range(2):
                    v = c8(0)
                    for j in range(4):
                        v = builder.or_(v, builder.shl(load(128 * hh + 32 * j), c8(2 * j)))
                    dst = builder.add(off, ir.Constant(_I64, 32 * hh))
                    builder.store(v, t.ptr(builder, op, dst, t.B), align=1)
            elif high:
                h = c8(0)
                for j in range(8):
                    bit = builder.and_(builder.lshr(load(32 * j), c8(4)), c8(1))
                    h = builder.or_(h, builder.shl(bit, c8(j)))
                builder.store(h, t.ptr(builder, op, off, t.B), align=1)
            else:
                for k in range(4):
                    lo = builder.and_(load(64 * k), c8(15))
                    hi = builder.shl(builder.and_(load(64 * k + 32), c8(15)), c8(4))
                    dst = builder.add(off, ir.Constant(_I64, 32 * k))
                    builder.store(builder.or_(lo, hi), t.ptr(builder, op, dst, t.B), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return nb


@functools.cache
def transpose16(n: int):
    """The intrinsic tr(w, r, xt, k0): the element-major copy of 16 sub-blocks of n (16 or 32) consecutive
    weights, xt[i, k0 + j] = w[r, n*(k0 + j) + i] (j < 16, i < n), the k-quant searches' input layout.
    As numba compiles it (a scalar load and store per weight, the stores strided) it was ~4% of Q4_K's
    quantize; here 16x16 tiles go through four rounds of two-vector shuffles (vpermt2ps with AVX-512),
    16 vector loads and stores a tile. A w or xt not in C order takes the scalar loop."""

    @intrinsic
    def tr(typingctx, w, r, xt, k0):
        sig = types.void(w, r, xt, k0)
        if w.layout != "C" or xt.layout != "C":

            def scalar(w, r, xt, k0):
                for j in range(16):
                    for i in range(n):
                        xt[i, k0 + j] = w[r, n * (k0 + j) + i]

            def codegen_scalar(context, builder, signature, args):
                return context.compile_internal(builder, scalar, signature, args)

            return sig, codegen_scalar

        def codegen(context, builder, signature, args):
            t = _Vec(16)
            at = signature.args
            wa = context.make_array(at[0])(context, builder, args[0])
            xa = context.make_array(at[2])(context, builder, args[2])
            r = context.cast(builder, args[1], at[1], types.intp)
            k0 = context.cast(builder, args[3], at[3], types.intp)
            cols = builder.extract_value(wa.shape, 1)
            M = builder.extract_value(xa.shape, 1)
            base = builder.add(builder.mul(r, cols), builder.mul(k0, ir.Constant(_I64, n)))
            for h in range(n // 16):
                rows = [builder.load(t.ptr(builder, wa.data, builder.add(base, ir.Constant(_I64, n * j + 16 * h))),
                                     align=4) for j in range(16)]
                for b in (8, 4, 2, 1):  # swap the off-diagonal b x b blocks of every 2b x 2b block
                    mp = ir.Constant(t.I, [c if (c // b) % 2 == 0 else 16 + c - b for c in range(16)])
                    mq = ir.Constant(t.I, [c + b if (c // b) % 2 == 0 else 16 + c for c in range(16)])
                    new = list(rows)
                    for p in range(16):
                        if (p // b) % 2 == 0:
                            new[p] = builder.shuffle_vector(rows[p], rows[p + b], mp)
                            new[p + b] = builder.shuffle_vector(rows[p], rows[p + b], mq)
                    rows = new
                for i in range(16):
                    dst = builder.add(builder.mul(ir.Constant(_I64, 16 * h + i), M), k0)
                    builder.store(rows[i], t.ptr(builder, xa.data, dst), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tr
