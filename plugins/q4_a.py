"""Q4_A: quantfmt's own 4-bit codebook format, 256 weights along a row, 16 sorted-bin means.

From the llama2.c quantization brainstorm (karpathy/llama2.c issue 277). A block is 256
consecutive weights of one row (block_shape (1, 256)). Its values are sorted and cut into
16 bins of 16; the 16 bin means, ascending, are the block's codebook, and every weight
stores the 4-bit index of its nearest codebook entry.

Byte layout (little-endian), per block (blocks in row-major order, a row = cols/256 blocks):
    float32 c[16]      offset 0: the codebook, ascending
    uint8   p[128]     offset 64: p[i] = idx[i] | (idx[i + 128] << 4)
i.e. the low nibble of byte i is weight i, the high nibble weight i + 128 (contiguous halves,
so a SIMD kernel unpacks 128 bytes into weights 0..127 and 128..255 without shuffles).
192 bytes per block of 256 = 6 bits per weight. A row group is one row.

Arithmetic (formats.md is normative; this is the same text):
    v      = the block's 256 values sorted ascending (as float32 numbers; -0.0 == 0.0)
    c[k]   = float32(S_k / 16.0), S_k = sequential float64 sum of float64(v[16k]), ...,
             float64(v[16k + 15]) starting from +0.0
    idx[i] = the k minimizing d_k = |float64(w_i) - float64(c[k])| (float64 subtraction),
             the LOWEST such k on ties
    dequantize: w'_i = c[idx[i]]
The codebook depends only on the multiset of values, so the sort's stability does not matter.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

import quantfmt
from quantfmt import cpu
from quantfmt.families import KernelFormat, decode_threads, parallel_rows
from quantfmt.numba_threads import claim

from ._ggml import NONFINITE_ROW, has_nonfinite

QK = 256
NBINS = 16
BLOCK_BYTES = 4 * NBINS + QK // 2


# ---- numpy reference ------------------------------------------------------------------


def pack(c: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Bytes from codebooks float32 (nblocks, 16) and indices uint8 (nblocks, 256) in 0..15."""
    out = np.empty((c.shape[0], BLOCK_BYTES), np.uint8)
    out[:, : 4 * NBINS] = c.astype("<f4").view(np.uint8).reshape(-1, 4 * NBINS)
    out[:, 4 * NBINS :] = idx[:, : QK // 2] | (idx[:, QK // 2 :] << 4)
    return out.reshape(-1)


def unpack(data: np.ndarray):
    """codebooks float32 (nblocks, 16) (a view) and indices uint8 (nblocks, 256)."""
    b = data.reshape(-1, BLOCK_BYTES)
    p = b[:, 4 * NBINS :]
    return b[:, : 4 * NBINS].view("<f4"), np.concatenate([p & 15, p >> 4], axis=1)


def quantize_ref(w: np.ndarray) -> np.ndarray:
    """float32 (rows, cols), cols % 256 == 0 -> Q4_A bytes."""
    wb = w.reshape(-1, QK)
    v = np.sort(wb, axis=1).astype(np.float64).reshape(-1, NBINS, QK // NBINS)
    acc = np.zeros(v.shape[:2])
    for j in range(QK // NBINS):  # the sequential sum of each bin, in sorted order
        acc = acc + v[:, :, j]
    c = (acc / 16.0).astype(np.float32)
    idx = np.empty(wb.shape, np.uint8)
    for b0 in range(0, wb.shape[0], 1024):  # in chunks: the distance table is 256x16 float64 per block
        wc, cc = wb[b0 : b0 + 1024].astype(np.float64), c[b0 : b0 + 1024].astype(np.float64)
        d = np.abs(wc[:, :, None] - cc[:, None, :])
        idx[b0 : b0 + 1024] = np.argmin(d, axis=2)  # argmin returns the first (lowest) on ties
    return pack(c, idx)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    c, idx = unpack(data)
    return np.take_along_axis(c, idx.astype(np.intp), axis=1).reshape(rows, cols)


# ---- numba kernels --------------------------------------------------------------------
_F32 = ir.FloatType()
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V8F, _V32B, _V16B, _V16W = (
    ir.VectorType(_F32, 8),
    ir.VectorType(_I8, 32),
    ir.VectorType(_I8, 16),
    ir.VectorType(_I16, 16),
)
_UNPACK_LO_B = [v for lane in (0, 1) for i in range(8) for v in (16 * lane + i, 32 + 16 * lane + i)]
_UNPACK_HI_B = [v for lane in (0, 1) for i in range(8, 16) for v in (16 * lane + i, 32 + 16 * lane + i)]
_UNPACK_LO_W = [v for lane in (0, 1) for i in range(4) for v in (8 * lane + i, 16 + 8 * lane + i)]
_UNPACK_HI_W = [v for lane in (0, 1) for i in range(4, 8) for v in (8 * lane + i, 16 + 8 * lane + i)]


_V16F, _V16I = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)


def _shuffle_mask(idx):
    return ir.Constant(ir.VectorType(_I32, len(idx)), list(idx))


# ---- the sort: a bitonic network on 16 vectors of 16 int32 ----------------------------
_V16I32 = ir.VectorType(ir.IntType(32), 16)


def _bitonic_plan():
    """The compare-exchange stages of a bitonic sort of 256 keys held as 16 vectors of 16 lanes (key i in
    vector i // 16, lane i % 16), ascending: (k, j) for k = 2..256, j = k/2..1."""
    return [(k, j) for k in (2 ** e for e in range(1, 9)) for j in (k >> s for s in range(1, k.bit_length()))]


@intrinsic
def _sort256(typingctx, src, src_off, sums):
    """sums[0:16] (float64) <- the 16 bins' sums of the float32 values src[src_off:src_off+256] (uint32
    view) sorted ascending: bin k is sorted values 16k..16k+15, summed in order from +0.0.
    Sort keys: the bits with the magnitude flipped for negatives (x ^ ((x >> 31) & 0x7FFFFFFF), arithmetic
    shift), so signed int32 order is float order (-0.0 just below +0.0: only the multiset matters).
    A bitonic network: 36 stages of vector min/max; a stage with partners in other vectors (j >= 16) pairs
    whole vectors, one within a vector (j < 16) shuffles the partners in, takes min and max and blends.
    Generic LLVM vector IR: one vpminsd/vpmaxsd/vpermd/vpblendmd per vector and stage with AVX-512, split
    into halves or quarters on smaller vector units (any CPU gets a correct sort)."""
    sig = types.none(src, src_off, sums)

    def codegen(context, builder, signature, args):
        sp = builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data, [args[1]])
        mod = builder.module
        fty = ir.FunctionType(_V16I32, [_V16I32, _V16I32])
        smin = mod.declare_intrinsic("llvm.smin.v16i32", (), fty)
        smax = mod.declare_intrinsic("llvm.smax.v16i32", (), fty)

        def vptr(ptr, r):
            return builder.bitcast(builder.gep(ptr, [ir.Constant(_I64, 16 * r)]), _V16I32.as_pointer())

        flip = ir.Constant(_V16I32, [0x7FFFFFFF] * 16)
        sh = ir.Constant(_V16I32, [31] * 16)

        def key(x):  # an involution: the same map turns keys back into bits
            return builder.xor(x, builder.and_(builder.ashr(x, sh), flip))

        v = [key(builder.load(vptr(sp, r), align=4)) for r in range(16)]
        for k, j in _bitonic_plan():
            if j >= 16:
                rj = j // 16
                for r in range(16):
                    if r & rj:
                        continue
                    a, b = v[r], v[r | rj]
                    lo, hi = builder.call(smin, [a, b]), builder.call(smax, [a, b])
                    asc = (16 * r) & k == 0
                    v[r], v[r | rj] = (lo, hi) if asc else (hi, lo)
            else:
                for r in range(16):
                    p = builder.shuffle_vector(v[r], v[r], _shuffle_mask([lane ^ j for lane in range(16)]))
                    lo, hi = builder.call(smin, [v[r], p]), builder.call(smax, [v[r], p])
                    # lane takes the min where (it is the lower partner) == (its run ascends)
                    pick = []
                    for lane in range(16):
                        i = 16 * r + lane
                        take_min = (i < (i ^ j)) == ((i & k) == 0)
                        pick.append(lane if take_min else 16 + lane)
                    v[r] = builder.shuffle_vector(lo, hi, _shuffle_mask(pick))
        v = [key(x) for x in v]  # the sorted values' bits
        # The bins' sums: bin r is vector r, summed lane by lane in order (formats.md's sequential float64
        # sum, from +0.0). A 16x16 transpose (4 rounds of block swaps, two shuffles per pair of vectors)
        # puts lane j of every bin in vector j; then 16 float64 additions of 8 lanes add lane j of all
        # bins at once, each bin's chain in its own lane, in index order.
        for b in (8, 4, 2, 1):
            for r in range(16):
                if r & b:
                    continue
                lo = [lane if lane & b == 0 else 16 + lane - b for lane in range(16)]
                hi = [lane + b if lane & b == 0 else 16 + lane for lane in range(16)]
                v[r], v[r + b] = (builder.shuffle_vector(v[r], v[r + b], _shuffle_mask(lo)),
                                  builder.shuffle_vector(v[r], v[r + b], _shuffle_mask(hi)))
        v4 = ir.VectorType(ir.DoubleType(), 8)
        acc = [ir.Constant(v4, [0.0] * 8), ir.Constant(v4, [0.0] * 8)]
        for j in range(16):
            col = builder.bitcast(v[j], _V16F)
            for h in range(2):
                half = builder.shuffle_vector(col, col, _shuffle_mask(list(range(8 * h, 8 * h + 8))))
                acc[h] = builder.fadd(acc[h], builder.fpext(half, v4))
        sp_ = context.make_array(signature.args[2])(context, builder, args[2]).data
        for h in range(2):
            at = builder.gep(sp_, [ir.Constant(_I64, 8 * h)])
            builder.store(acc[h], builder.bitcast(at, v4.as_pointer()), align=8)
        return context.get_dummy_value()

    return sig, codegen


_V16F32, _V8F64 = ir.VectorType(_F32, 16), ir.VectorType(ir.DoubleType(), 8)


@intrinsic
def _nearest256(typingctx, x, x_off, c, c_off, p, p_off):
    """The packed indices p[p_off:p_off+128] of the 256 weights x[x_off:], nearest entries of the ascending
    codebook c[c_off:c_off+16], when every float64 difference w_i - c_k is exact; returns 0 without
    writing anything when that is not certain (the caller runs formats.md's search as written,
    _nearest_full).

    Why it is the same index: with exact differences the distances are exact, so w's nearest value is
    c[n], n = #{k : w > (c[k] + c[k+1]) / 2} (the midpoints ascend; a tie stays with the lower value), and
    the lowest index holding it is first[n] = sum over k < n of delta[k] = first[k+1] - first[k]. The
    midpoints are exact in float64 and w > mid_k is w >= thr[k], the least float32 above mid_k: per 16
    weights (generic LLVM vectors), 15 float32 compares and masked adds.
    Exact differences: w and c are float32 (24-bit significands), so w - c fits float64's 53 bits when
    their ulps are at most 2**28 apart: nonzero magnitudes (weights and codebook) spanning < 2**27 do it
    (and make c[k] + c[k+1] exact too)."""
    sig = types.int32(x, x_off, c, c_off, p, p_off)

    def codegen(context, builder, signature, args):
        def base(i, off):
            arr = context.make_array(signature.args[i])(context, builder, args[i])
            return builder.gep(arr.data, [off]) if off is not None else arr.data

        xp, cp, pp = base(0, args[1]), base(2, args[3]), base(4, args[5])
        mod = builder.module
        i32 = _I32

        def vload(ptr, off, vt, align=4):
            return builder.load(builder.bitcast(builder.gep(ptr, [ir.Constant(_I64, off)]), vt.as_pointer()),
                                align=align)

        def splat(val, vt):
            v = builder.insert_element(ir.Constant(vt, ir.Undefined), val, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), _shuffle_mask([0] * 16))

        xs = [vload(xp, 16 * r, _V16F32) for r in range(16)]
        cv = vload(cp, 0, _V16F32)
        # the span check, on magnitude bits (integer order = float order): zeros count as +inf for the min
        absm = ir.Constant(_V16I32, [0x7FFFFFFF] * 16)
        inf = ir.Constant(_V16I32, [0x7F800000] * 16)
        zero = ir.Constant(_V16I32, [0] * 16)
        fty = ir.FunctionType(_V16I32, [_V16I32, _V16I32])
        smin = mod.declare_intrinsic("llvm.smin.v16i32", (), fty)
        smax = mod.declare_intrinsic("llvm.smax.v16i32", (), fty)
        lo_m, hi_m = None, None
        for v in [*xs, cv]:
            m = builder.and_(builder.bitcast(v, _V16I32), absm)
            nz = builder.select(builder.icmp_signed("==", m, zero), inf, m)
            lo_m = nz if lo_m is None else builder.call(smin, [lo_m, nz])
            hi_m = m if hi_m is None else builder.call(smax, [hi_m, m])
        rty = ir.FunctionType(i32, [_V16I32])
        rmin = builder.call(mod.declare_intrinsic("llvm.vector.reduce.smin.v16i32", (), rty), [lo_m])
        rmax = builder.call(mod.declare_intrinsic("llvm.vector.reduce.smax.v16i32", (), rty), [hi_m])
        dbl = ir.DoubleType()
        amin = builder.fpext(builder.bitcast(rmin, _F32), dbl)
        amax = builder.fpext(builder.bitcast(rmax, _F32), dbl)
        ok = builder.fcmp_ordered("<", amax, builder.fmul(amin, ir.Constant(dbl, float(2**27))))
        with builder.if_then(ok):
            # per block, in vectors (scalar code with data-dependent branches cost as much as the search):
            # first[k] = the lowest index holding c[k]'s value, a prefix max of run starts; delta[k] =
            # first[k+1] - first[k]; thr[k] = the least float32 above mid_k = (c[k] + c[k+1]) / 2 (exact
            # in float64 here): RN32(mid_k), or the next float32 up (on the bits) if that is <= mid_k.
            lanes = ir.Constant(_V16I32, list(range(16)))
            cprev = builder.shuffle_vector(cv, cv, _shuffle_mask([0] + list(range(15))))
            start = builder.or_(builder.fcmp_unordered("!=", cv, cprev),
                                builder.icmp_signed("==", lanes, zero))
            first = builder.select(start, lanes, zero)
            for sh in (1, 2, 4, 8):  # prefix max: lane k gets max over lanes <= k
                prev = builder.shuffle_vector(first, zero, _shuffle_mask([16] * sh + list(range(16 - sh))))
                first = builder.call(smax, [first, prev])
            nxt = _shuffle_mask(list(range(1, 16)) + [15])
            dv = builder.sub(builder.shuffle_vector(first, first, nxt), first)
            cnext = builder.shuffle_vector(cv, cv, nxt)
            thr_h = []
            for h in range(2):
                sel = _shuffle_mask(list(range(8 * h, 8 * h + 8)))
                a = builder.fpext(builder.shuffle_vector(cv, cv, sel), _V8F64)
                b_ = builder.fpext(builder.shuffle_vector(cnext, cnext, sel), _V8F64)
                mid = builder.fmul(builder.fadd(a, b_), ir.Constant(_V8F64, [0.5] * 8))
                thr_h.append((mid, builder.fptrunc(mid, ir.VectorType(_F32, 8))))
            mid16 = [m for m, _ in thr_h]
            t = builder.shuffle_vector(thr_h[0][1], thr_h[1][1], _shuffle_mask(list(range(16))))
            tb = builder.bitcast(t, _V16I32)
            one = ir.Constant(_V16I32, [1] * 16)
            fz = ir.Constant(_V16F32, [0.0] * 16)
            up = builder.select(builder.fcmp_ordered(">", t, fz), builder.add(tb, one),
                                builder.select(builder.fcmp_ordered("<", t, fz), builder.sub(tb, one), one))
            le = [builder.fcmp_ordered("<=", builder.fpext(builder.shuffle_vector(
                t, t, _shuffle_mask(list(range(8 * h, 8 * h + 8)))), _V8F64), mid16[h]) for h in range(2)]
            le16 = builder.shuffle_vector(le[0], le[1], _shuffle_mask(list(range(16))))
            tv = builder.bitcast(builder.select(le16, up, tb), _V16F32)
            ts = [splat(builder.extract_element(tv, ir.Constant(i32, k)), _V16F32) for k in range(NBINS - 1)]
            ds = [splat(builder.extract_element(dv, ir.Constant(i32, k)), _V16I32) for k in range(NBINS - 1)]
            idx = []
            for r in range(16):
                n = zero
                for k in range(NBINS - 1):
                    n = builder.add(n, builder.select(builder.fcmp_ordered(">=", xs[r], ts[k]), ds[k], zero))
                idx.append(builder.trunc(n, _V16B))
            four = ir.Constant(_V16B, [4] * 16)
            for r in range(8):  # byte i: weight i in the low nibble, weight i + 128 in the high one
                byte = builder.or_(idx[r], builder.shl(idx[r + 8], four))
                builder.store(byte, builder.bitcast(builder.gep(pp, [ir.Constant(_I64, 16 * r)]), _V16B.as_pointer()),
                              align=1)
        return builder.zext(ok, i32)

    return sig, codegen


# Quantize: no fastmath (the means and distances must match the reference exactly).

@numba.njit(cache=True, inline="always")
def _nearest_full(x64, c64, bd, idx):
    """formats.md's search as written: every weight tries the 16 entries in order, float64 distances, the
    lowest index on ties (the candidate loop outside, the 256 weights inside: it vectorizes)."""
    for i in range(QK):
        bd[i] = abs(x64[i] - c64[0])
        idx[i] = 0
    for kk in range(1, NBINS):
        ck = c64[kk]
        for i in range(QK):
            d = abs(x64[i] - ck)
            better = d < bd[i]
            bd[i] = d if better else bd[i]
            idx[i] = np.uint8(kk) if better else idx[i]


@numba.njit(cache=True, nogil=True)
def _quantize_rows(w, u, cb, p, bad, r0, r1):
    # Rows r0..r1-1, on Python threads (families.parallel_rows: a parallel=True driver costs a cold start
    # seconds). cb: float32 (blocks, 48), the bytes seen as float32 (192 = 4 * 48), codebook at 0..15;
    # p: uint8 (blocks, 192), packed indices at 64..191. u: the weights' bits (w C-contiguous, seen as
    # flat uint32).
    nb = w.shape[1] // QK
    cols = w.shape[1]
    c64 = np.empty(NBINS)
    acc = np.empty(NBINS)
    x64 = np.empty(QK)
    bd = np.empty(QK)
    idx = np.empty(QK, np.uint8)
    for row in range(r0, r1):
        if has_nonfinite(w[row]):  # (checks_finite: quantize does not scan the tensor first)
            bad[row] = NONFINITE_ROW
            continue
        for b in range(nb):
            k = row * nb + b
            _sort256(u, row * cols + b * QK, acc)  # the 16 bins' sums of the sorted block
            for kk in range(NBINS):
                cb[k, kk] = np.float32(acc[kk] / 16.0)
            if not _nearest256(u, row * cols + b * QK, cb[k], 0, p[k], 4 * NBINS):
                for kk in range(NBINS):
                    c64[kk] = np.float64(cb[k, kk])
                for i in range(QK):
                    x64[i] = np.float64(w[row, b * QK + i])
                _nearest_full(x64, c64, bd, idx)
                for i in range(QK // 2):
                    p[k, 4 * NBINS + i] = idx[i] | (idx[i + QK // 2] << np.uint8(4))


def _quantize_kernel(w, out, bad):
    cb = out.view(np.float32).reshape(-1, BLOCK_BYTES // 4)
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, w.reshape(-1).view(np.uint32), cb,
                  out.reshape(-1, BLOCK_BYTES), bad)


@numba.njit(cache=True)
def _dequantize_row(data, nb, row, out):
    for b in range(nb):
        o = (row * nb + b) * BLOCK_BYTES
        c = data[o : o + 4 * NBINS].view(np.float32)
        p = data[o + 4 * NBINS : o + BLOCK_BYTES]
        for i in range(QK // 2):
            out[b * QK + i] = c[p[i] & 15]
            out[b * QK + QK // 2 + i] = c[p[i] >> 4]


@intrinsic
def _block_fill_avx512(typingctx, data, blk_off, out, out_off):
    """out[out_off:out_off+256] = the block at data[blk_off:] dequantized: per 16 weights one vpermps of
    the codebook (one 512-bit register) by 16 nibbles, as _block_fma_avx512 reads them."""
    sig = types.none(data, blk_off, out, out_off)

    def codegen(context, builder, signature, args):
        dp = builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data, [args[1]])
        op = builder.gep(context.make_array(signature.args[2])(context, builder, args[2]).data, [args[3]])
        perm = builder.module.declare_intrinsic("llvm.x86.avx512.permvar.sf.512", (),
                                                ir.FunctionType(_V16F, [_V16F, _V16I]))

        def vptr(ptr, off, vt):
            return builder.bitcast(builder.gep(ptr, [ir.Constant(_I64, off)]), vt.as_pointer())

        cb = builder.load(vptr(dp, 0, _V16F), align=1)  # the file's bytes: no alignment promised
        low4, four = ir.Constant(_V16I, [15] * 16), ir.Constant(_V16I, [4] * 16)
        for i in range(8):  # 16 index bytes: weights 16i.. (low nibbles) and 128+16i.. (high nibbles)
            z = builder.zext(builder.load(vptr(dp, 4 * NBINS + 16 * i, _V16B), align=1), _V16I)
            for h, idx in enumerate((builder.and_(z, low4), builder.lshr(z, four))):
                builder.store(builder.call(perm, [cb, idx]), vptr(op, h * (QK // 2) + 16 * i, _V16F), align=4)
        return context.get_dummy_value()

    return sig, codegen


# Every driver is Python (families.parallel_rows: ranges of rows on numba.get_num_threads() Python
# threads, each taking the next range when done) over a cached nogil kernel of a range: a parallel=True
# prange driver cost a cold start seconds per kernel (numba's parfor passes, the body compiled again
# inside the gufunc), and in decode its region waited for every numba thread to wake. One row kernel
# serves get_rows, dequantize and the prefill tiles.
ROW_CHUNK = 64  # rows per claim in decode


@numba.njit(cache=True, nogil=True)
def _get_rows_range(data, cols, idx, out, k0, k1):
    for k in range(k0, k1):
        _dequantize_row(data, cols // QK, idx[k], out[k])


@numba.njit(cache=True, nogil=True)
def _get_rows_avx512(data, cols, idx, out, k0, k1):
    # ~6x the scalar loop's speed (LLVM does not vectorize its table lookup): the prefill tiles' fill
    nb = cols // QK
    for k in range(k0, k1):
        o = out[k]
        for b in range(nb):
            _block_fill_avx512(data, (idx[k] * nb + b) * BLOCK_BYTES, o, b * QK)


def _get_rows_kernel(data, cols, idx, out):
    # on a prefill thread (families.tiles_prefill) parallel_rows runs inline
    parallel_rows(_get_rows_avx512 if PATH == "avx512" else _get_rows_range, idx.size, cols, data, cols, idx, out)


def _dequantize_kernel(data, rows, cols, out):
    _get_rows_kernel(data, cols, np.arange(rows, dtype=np.int64), out)


# Decode drivers: one claim loop per thread (families.parallel_rows with one "row" per thread), each
# taking the next chunk of rows from an atomic counter (quantfmt.numba_threads.claim) until none is left:
# a descheduled thread's chunks go to the one that runs, and no chunk costs a Python call (ranges
# handed out by parallel_rows cost a dispatch each: ~10% of an 11008x4096 decode, measured interleaved).
@numba.njit(cache=True, nogil=True, fastmath=True)
def _matvec_portable(blocks, cb, x, out, counter, rows, _t0, _t1):
    # Any CPU. blocks: uint8 (rows, nb, 192), the bytes as they are; cb: float32 (rows, nb, 16),
    # the codebooks unpacked by prepare(). LLVM does not vectorize the codebook lookup
    # (gathers are slow on the CPUs it tunes for), so this runs at scalar speed.
    nb = blocks.shape[1]
    n = x.shape[0]
    xb = x.reshape(n, nb, QK)
    accv = np.empty(QK, np.float32)
    ch = claim(counter)
    while ch * ROW_CHUNK < rows:
        for row in range(ch * ROW_CHUNK, min(rows, (ch + 1) * ROW_CHUNK)):
            for k in range(n):
                accv[:] = 0.0
                for b in range(nb):
                    for i in range(QK // 2):
                        p = blocks[row, b, 4 * NBINS + i]
                        accv[i] += cb[row, b, p & 15] * xb[k, b, i]
                        accv[i + QK // 2] += cb[row, b, p >> 4] * xb[k, b, i + QK // 2]
                tot = np.float32(0.0)
                for i in range(QK):
                    tot += accv[i]
                out[k, row] = tot
        ch = claim(counter)


# The AVX2 kernel. A codebook lookup is a 16-entry table lookup, which is exactly what the
# byte shuffle `vpshufb` does for 32 nibble indices at once, one byte of the result each.
# So prepare() splits each codebook into 4 byte planes (plane k = byte k of the 16 float32
# entries), 4 vpshufb give the 4 bytes of 32 looked-up floats, and 2 rounds of unpacks
# (vpunpck{l,h}bw, vpunpck{l,h}wd) reassemble them into 4 vectors of 8 float32. Unpacks work
# within 128-bit lanes, so those vectors hold weights [0..3,16..19], [4..7,20..23],
# [8..11,24..27], [12..15,28..31] of each 32: the activations are permuted the same way once
# per call (_permute_x), and the dot product does not care about the order.
@intrinsic
def _block_dot_avx2(typingctx, planes, pl_off, data, p_off, xp, x_off):
    """float32 dot product of one block with 256 permuted activations.

    planes[pl_off:pl_off+64]: the block's codebook as 4 byte planes of 16; data[p_off:p_off+128]:
    its packed indices; xp[x_off:x_off+256]: the activations, permuted by _permute_x.
    """
    sig = types.float32(planes, pl_off, data, p_off, xp, x_off)

    def codegen(context, builder, signature, args):
        ptrs = []
        for i in (0, 2, 4):
            arr = context.make_array(signature.args[i])(context, builder, args[i])
            ptrs.append(builder.gep(arr.data, [args[i + 1]]))
        plptr, pptr, xptr = ptrs
        mod = builder.module
        pshufb = mod.declare_intrinsic("llvm.x86.avx2.pshuf.b", (), ir.FunctionType(_V32B, [_V32B, _V32B]))
        fma = mod.declare_intrinsic("llvm.fmuladd.v8f32", (), ir.FunctionType(_V8F, [_V8F, _V8F, _V8F]))

        def vload(ptr, off, vt, align):
            at = builder.gep(ptr, [ir.Constant(_I64, off)])
            return builder.load(builder.bitcast(at, vt.as_pointer()), align=align)

        tables = []  # each plane's 16 bytes in both 128-bit lanes (vpshufb looks up per lane)
        for k in range(4):
            t16 = vload(plptr, 16 * k, _V16B, 1)
            tables.append(builder.shuffle_vector(t16, t16, _shuffle_mask(list(range(16)) * 2)))
        low4 = ir.Constant(_V32B, [15] * 32)
        four = ir.Constant(_V32B, [4] * 32)
        accs = [ir.Constant(_V8F, [0.0] * 8) for _ in range(4)]  # 4 independent FMA chains
        for t in range(4):
            pb = vload(pptr, 32 * t, _V32B, 1)  # 32 bytes: weights 32t.. (low) and 128+32t.. (high)
            lo = builder.and_(pb, low4)
            hi = builder.and_(builder.lshr(pb, four), low4)
            for idx, xoff in ((lo, 32 * t), (hi, QK // 2 + 32 * t)):
                b = [builder.call(pshufb, [tables[k], idx]) for k in range(4)]
                w01l = builder.bitcast(builder.shuffle_vector(b[0], b[1], _shuffle_mask(_UNPACK_LO_B)), _V16W)
                w01h = builder.bitcast(builder.shuffle_vector(b[0], b[1], _shuffle_mask(_UNPACK_HI_B)), _V16W)
                w23l = builder.bitcast(builder.shuffle_vector(b[2], b[3], _shuffle_mask(_UNPACK_LO_B)), _V16W)
                w23h = builder.bitcast(builder.shuffle_vector(b[2], b[3], _shuffle_mask(_UNPACK_HI_B)), _V16W)
                floats = [
                    builder.shuffle_vector(w01l, w23l, _shuffle_mask(_UNPACK_LO_W)),
                    builder.shuffle_vector(w01l, w23l, _shuffle_mask(_UNPACK_HI_W)),
                    builder.shuffle_vector(w01h, w23h, _shuffle_mask(_UNPACK_LO_W)),
                    builder.shuffle_vector(w01h, w23h, _shuffle_mask(_UNPACK_HI_W)),
                ]
                for q in range(4):
                    xv = vload(xptr, xoff + 8 * q, _V8F, 4)
                    accs[q] = builder.call(fma, [builder.bitcast(floats[q], _V8F), xv, accs[q]])
        s = builder.fadd(builder.fadd(accs[0], accs[1]), builder.fadd(accs[2], accs[3]))
        tot = builder.extract_element(s, ir.Constant(_I32, 0))
        for i in range(1, 8):
            tot = builder.fadd(tot, builder.extract_element(s, ir.Constant(_I32, i)))
        return tot

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _matvec_avx2(planes, data, xp, cols, out, counter, rows, _t0, _t1):
    # planes: uint8 (nblocks * 64,), from prepare(); data: the bytes; xp: (n, cols) from _permute_x.
    nb = cols // QK
    n = xp.shape[0]
    xf = xp.reshape(-1)
    ch = claim(counter)
    while ch * ROW_CHUNK < rows:
        for row in range(ch * ROW_CHUNK, min(rows, (ch + 1) * ROW_CHUNK)):
            for k in range(n):
                acc = np.float32(0.0)
                for b in range(nb):
                    blk = row * nb + b
                    acc += _block_dot_avx2(planes, blk * 64, data, blk * BLOCK_BYTES + 4 * NBINS, xf, k * cols + b * QK)
                out[k, row] = acc
        ch = claim(counter)


# The AVX-512 kernel. A block's codebook is 16 float32 = one 512-bit register, and `vpermps`
# (AVX512F) looks up 16 floats by 16 4-bit indices at once in it, in order: per 16 weights, one
# zero-extension of 16 index bytes, a mask or a shift for the nibble, one vpermps, one FMA. No
# byte planes, no permuted activations, and the sums stay in 4 vector accumulators across the
# row's blocks (one horizontal sum per row, in numba).


@intrinsic
def _block_fma_avx512(typingctx, acc, data, blk_off, x, x_off):
    """acc[0:64] (4 vectors of 16 float32) += the block at data[blk_off:] times x[x_off:x_off+256]."""
    sig = types.none(acc, data, blk_off, x, x_off)

    def codegen(context, builder, signature, args):
        def base(i, off):
            arr = context.make_array(signature.args[i])(context, builder, args[i])
            return builder.gep(arr.data, [off])

        accp, dp, xp = base(0, ir.Constant(_I64, 0)), base(1, args[2]), base(3, args[4])
        mod = builder.module
        perm = mod.declare_intrinsic("llvm.x86.avx512.permvar.sf.512", (), ir.FunctionType(_V16F, [_V16F, _V16I]))
        fma = mod.declare_intrinsic("llvm.fmuladd.v16f32", (), ir.FunctionType(_V16F, [_V16F, _V16F, _V16F]))

        def vptr(ptr, off, vt):
            return builder.bitcast(builder.gep(ptr, [ir.Constant(_I64, off)]), vt.as_pointer())

        cb = builder.load(vptr(dp, 0, _V16F), align=1)  # the file's bytes: no alignment promised
        accs = [builder.load(vptr(accp, 16 * k, _V16F), align=4) for k in range(4)]
        low4, four = ir.Constant(_V16I, [15] * 16), ir.Constant(_V16I, [4] * 16)
        for i in range(8):  # 16 index bytes: weights 16i.. (low nibbles) and 128+16i.. (high nibbles)
            z = builder.zext(builder.load(vptr(dp, 4 * NBINS + 16 * i, _V16B), align=1), _V16I)
            for h, idx in enumerate((builder.and_(z, low4), builder.lshr(z, four))):
                w = builder.call(perm, [cb, idx])
                xv = builder.load(vptr(xp, h * (QK // 2) + 16 * i, _V16F), align=4)
                a = (2 * i + h) % 4
                accs[a] = builder.call(fma, [w, xv, accs[a]])
        for k in range(4):
            builder.store(accs[k], vptr(accp, 16 * k, _V16F), align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _matvec_avx512(data, cols, x, out, counter, rows, _t0, _t1):
    nb = cols // QK
    n = x.shape[0]
    xf = x.reshape(-1)
    acc = np.empty(64, np.float32)
    ch = claim(counter)
    while ch * ROW_CHUNK < rows:
        for row in range(ch * ROW_CHUNK, min(rows, (ch + 1) * ROW_CHUNK)):
            for k in range(n):
                acc[:] = 0.0
                for b in range(nb):
                    _block_fma_avx512(acc, data, (row * nb + b) * BLOCK_BYTES, xf, k * cols + b * QK)
                tot = np.float32(0.0)
                for i in range(64):
                    tot += acc[i]
                out[k, row] = tot
        ch = claim(counter)


def _permute_x(x):
    """Activations (n, cols) in the order the AVX2 kernel produces weights: within each 32,
    new position 8q + 4h + r holds old position 16h + 4q + r."""
    n, cols = x.shape
    return np.ascontiguousarray(x.reshape(n, cols // 32, 2, 4, 4).transpose(0, 1, 3, 2, 4)).reshape(n, cols)


def _codebook_planes(data):
    """uint8 (nblocks * 64,): per block, byte k of the 16 codebook entries for k = 0..3."""
    cb = data.reshape(-1, BLOCK_BYTES)[:, : 4 * NBINS].reshape(-1, NBINS, 4)
    return np.ascontiguousarray(cb.transpose(0, 2, 1)).reshape(-1)


# The matvec kernel, by what numba compiles for (the host CPU unless NUMBA_CPU_NAME/NUMBA_CPU_FEATURES
# say otherwise, quantfmt.cpu): AVX-512's vpermps, else AVX2's vpshufb, else the portable loop.
PATH = "avx512" if cpu.has("avx512f") else "avx2" if cpu.has("avx2") else "portable"


# ---- the format -----------------------------------------------------------------------

class Q4_A(KernelFormat):
    tag = "Q4_A"
    rows_independent = True  # each block's codebook comes from its own 256 weights
    layout_version = 1
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    summary = "4-bit indices into 16 sorted-bin means per 256 weights along a row (llama2.c brainstorm)"
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # the row kernel flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)
    get_rows_kernel = staticmethod(_get_rows_kernel)

    def prepare(self, data, rows, cols):
        # (bytes, what the kernel wants, the kernel): the bytes stay as they are; only the codebooks
        # (1/3 of the bytes) are repacked: into byte planes for the AVX2 kernel, into an aligned
        # float32 array for the portable one. The AVX-512 kernel reads them straight from the bytes.
        if PATH == "avx512":
            return data, None, PATH
        if PATH == "avx2":
            return data, _codebook_planes(data), PATH
        blocks = data.reshape(rows, cols // QK, BLOCK_BYTES)
        return data, blocks[:, :, : 4 * NBINS].copy().view("<f4").astype(np.float32), PATH

    def kernel_path(self, op, n=1, mode="f32"):
        path = super().kernel_path(op, n, mode)
        return f"{path}-{PATH}" if path == "matvec" else path

    def matvec(self, prep, rows, cols, x, out):
        data, extra, path = prep
        # under families.MIN_THREADED_WEIGHTS the calling thread alone (decode_threads)
        threads, counter = decode_threads(rows, cols), np.zeros(1, np.int64)
        if path == "avx512":
            xc = np.ascontiguousarray(x)
            parallel_rows(_matvec_avx512, threads, 1, data, cols, xc, out, counter, rows, weights=1)
        elif path == "avx2":
            parallel_rows(_matvec_avx2, threads, 1, extra, data, _permute_x(x), cols, out, counter, rows, weights=1)
        else:
            parallel_rows(_matvec_portable, threads, 1, data.reshape(rows, cols // QK, BLOCK_BYTES), extra, x, out,
                          counter, rows, weights=1)


@quantfmt.hookimpl
def register_formats(register):
    register(Q4_A())
