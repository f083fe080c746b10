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
from quantfmt.families import KernelFormat
from quantfmt.numba_threads import claim

QK = 256
NBINS = 16
BLOCK_BYTES = 4 * NBINS + QK // 2
ROW_CHUNK = 64  # rows per chunk of work a thread claims in qmatmul


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
# Quantize: no fastmath (the means and distances must match the reference exactly).


@numba.njit(cache=True, inline="always")
def _sort_block(u, row, c0, keys, tmp, cnt, vu):
    """vu (256,) uint32 <- the bits of the block's values sorted ascending: an LSD radix sort (4 passes of 8 bits)
    of order-preserving integer keys, ~6x faster than np.sort on 256 values. Only the sorted values
    matter (the codebook is a function of the multiset), so stability and the place of -0.0 next
    to +0.0 do not change a byte."""
    for i in range(4 * 256):
        cnt[i] = 0
    for i in range(QK):
        k = u[row, c0 + i]
        # negatives: all bits flipped (larger magnitude sorts first); positives: the sign bit set
        k = k ^ np.uint32(0xFFFFFFFF) if k >> np.uint32(31) else k | np.uint32(0x80000000)
        keys[i] = k
        for d in range(4):  # the four digits' histograms in one pass
            cnt[d * 256 + ((k >> np.uint32(8 * d)) & np.uint32(255))] += 1
    src, dst = keys, tmp
    for d in range(4):
        if cnt[d * 256 + ((src[0] >> np.uint32(8 * d)) & np.uint32(255))] == QK:
            continue  # every key has this digit: the pass would not move anything
        pos = 0
        for j in range(256):
            n = cnt[d * 256 + j]
            cnt[d * 256 + j] = pos
            pos += n
        for i in range(QK):
            k = src[i]
            j = d * 256 + ((k >> np.uint32(8 * d)) & np.uint32(255))
            dst[cnt[j]] = k
            cnt[j] += 1
        src, dst = dst, src
    for i in range(QK):
        k = src[i]
        k = k ^ np.uint32(0x80000000) if k >> np.uint32(31) else k ^ np.uint32(0xFFFFFFFF)
        vu[i] = k


@numba.njit(cache=True)
def _quantize_rows(w, u, cb, p, r0, r1):
    # cb: float32 (blocks, 48), the bytes seen as float32 (192 = 4 * 48), codebook at 0..15;
    # p: uint8 (blocks, 192), packed indices at 64..191. u: the weights' bits (uint32 view of w).
    nb = w.shape[1] // QK
    keys = np.empty(QK, np.uint32)
    tmp = np.empty(QK, np.uint32)
    cnt = np.empty(4 * 256, np.int32)
    vu = np.empty(QK, np.uint32)
    v = vu.view(np.float32)
    c64 = np.empty(NBINS)
    x64 = np.empty(QK)
    bd = np.empty(QK)
    idx = np.empty(QK, np.uint8)
    for row in range(r0, r1):
        for b in range(nb):
            k = row * nb + b
            _sort_block(u, row, b * QK, keys, tmp, cnt, vu)
            for kk in range(NBINS):
                acc = 0.0
                for j in range(QK // NBINS):
                    acc += np.float64(v[kk * (QK // NBINS) + j])
                cf = np.float32(acc / 16.0)
                cb[k, kk] = cf
                c64[kk] = np.float64(cf)
            # nearest codebook entry: the candidate loop outside, the 256 weights inside (it
            # vectorizes); each weight still tries 0..15 in order and keeps the lowest on ties
            for i in range(QK):
                x64[i] = np.float64(w[row, b * QK + i])
                bd[i] = abs(x64[i] - c64[0])
                idx[i] = 0
            for kk in range(1, NBINS):
                ck = c64[kk]
                for i in range(QK):
                    d = abs(x64[i] - ck)
                    better = d < bd[i]
                    bd[i] = d if better else bd[i]
                    idx[i] = np.uint8(kk) if better else idx[i]
            for i in range(QK // 2):
                p[k, 4 * NBINS + i] = idx[i] | (idx[i + QK // 2] << np.uint8(4))


@numba.njit(cache=True, parallel=True)
def _quantize_driver(w, u, cb, p):
    # more work items than threads (~64 KB of weights each): a descheduled thread holds up one
    # small chunk, not half the matrix
    rows = w.shape[0]
    nchunk = max(1, min(rows, rows * w.shape[1] // 16384))
    for c in numba.prange(nchunk):
        _quantize_rows(w, u, cb, p, c * rows // nchunk, (c + 1) * rows // nchunk)


def _quantize_kernel(w, out):
    _quantize_driver(w, w.view(np.uint32), out.view(np.float32).reshape(-1, BLOCK_BYTES // 4),
                     out.reshape(-1, BLOCK_BYTES))


@numba.njit(cache=True)
def _dequantize_row(data, nb, row, out):
    for b in range(nb):
        o = (row * nb + b) * BLOCK_BYTES
        c = data[o : o + 4 * NBINS].view(np.float32)
        p = data[o + 4 * NBINS : o + BLOCK_BYTES]
        for i in range(QK // 2):
            out[b * QK + i] = c[p[i] & 15]
            out[b * QK + QK // 2 + i] = c[p[i] >> 4]


@numba.njit(cache=True, parallel=True)
def _dequantize_kernel(data, rows, cols, out):
    for row in numba.prange(rows):
        _dequantize_row(data, cols // QK, row, out[row])


@numba.njit(cache=True, nogil=True)  # nogil: prefill tiles on several threads (families.tiles_prefill)
def _get_rows_kernel(data, cols, idx, out):
    for k in range(idx.size):
        _dequantize_row(data, cols // QK, idx[k], out[k])


@numba.njit(cache=True, parallel=True, fastmath=True)
def _matvec_portable(blocks, cb, x, out, threads):
    # Any CPU. blocks: uint8 (rows, nb, 192), the bytes as they are; cb: float32 (rows, nb, 16),
    # the codebooks unpacked by prepare(). LLVM does not vectorize the codebook lookup
    # (gathers are slow on the CPUs it tunes for), so this runs at scalar speed.
    rows, nb = blocks.shape[0], blocks.shape[1]
    n = x.shape[0]
    xb = x.reshape(n, nb, QK)
    nchunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    counter = np.empty(1, np.int64)  # not np.zeros: in a parallel function that is a region of its own
    counter[0] = 0
    for _t in numba.prange(threads):  # one claimer per thread
        accv = np.empty(QK, np.float32)
        ch = claim(counter)
        while ch < nchunks:
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


def _shuffle_mask(idx):
    return ir.Constant(ir.VectorType(_I32, len(idx)), list(idx))


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


@numba.njit(cache=True, parallel=True)
def _matvec_avx2(planes, data, xp, rows, cols, out, threads):
    # planes: uint8 (nblocks * 64,), from prepare(); data: the bytes; xp: (n, cols) from _permute_x.
    nb = cols // QK
    n = xp.shape[0]
    xf = xp.reshape(-1)
    nchunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    counter = np.empty(1, np.int64)
    counter[0] = 0
    for _t in numba.prange(threads):  # one claimer per thread
        ch = claim(counter)
        while ch < nchunks:
            for row in range(ch * ROW_CHUNK, min(rows, (ch + 1) * ROW_CHUNK)):
                for k in range(n):
                    acc = np.float32(0.0)
                    for b in range(nb):
                        blk = row * nb + b
                        acc += _block_dot_avx2(
                            planes, blk * 64, data, blk * BLOCK_BYTES + 4 * NBINS, xf, k * cols + b * QK
                        )
                    out[k, row] = acc
            ch = claim(counter)


# The AVX-512 kernel. A block's codebook is 16 float32 = one 512-bit register, and `vpermps`
# (AVX512F) looks up 16 floats by 16 4-bit indices at once in it, in order: per 16 weights, one
# zero-extension of 16 index bytes, a mask or a shift for the nibble, one vpermps, one FMA. No
# byte planes, no permuted activations, and the sums stay in 4 vector accumulators across the
# row's blocks (one horizontal sum per row, in numba).
_V16F, _V16I = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)


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


@numba.njit(cache=True, parallel=True)
def _matvec_avx512(data, rows, cols, x, out, threads):
    nb = cols // QK
    n = x.shape[0]
    xf = x.reshape(-1)
    nchunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    counter = np.empty(1, np.int64)
    counter[0] = 0
    for _t in numba.prange(threads):  # one claimer per thread
        acc = np.empty(64, np.float32)
        ch = claim(counter)
        while ch < nchunks:
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
        threads = numba.get_num_threads()  # an argument: read inside a kernel, it defeats numba's cache
        if path == "avx512":
            _matvec_avx512(data, rows, cols, np.ascontiguousarray(x), out, threads)
        elif path == "avx2":
            _matvec_avx2(extra, data, _permute_x(x), rows, cols, out, threads)
        else:
            _matvec_portable(data.reshape(rows, cols // QK, BLOCK_BYTES), extra, x, out, threads)


@quantfmt.hookimpl
def register_formats(register):
    register(Q4_A())
