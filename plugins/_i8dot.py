"""Quantized-activation decode of Q8_0 (qmatmul mode "q8_0", few activation rows) on int8 dot products.

Owns Q8_0's decode tiles, the decode kernels (AVX512-VNNI, AVX-VNNI, AVX2; the same structure as
plugins/_i4dot.py's, without a table) and the choice of path. Batches (from MIN_ROWS) go to
plugins/_i8gemm.py (kind "q8_0"), CPUs without AVX2 to Q8_0's float tiles (q8_0.tiles_qmatmul).

What is computed is ggml's ggml_vec_dot_q8_0_q8_0: per 32-block the exact integer sum of weight
quants times activation quants, then sum over blocks of float(sumi) * (d_w * d_x) in float32; only
the float order differs (per row one float32 accumulator per block sequence, as ggml's scalar code).

Layout. The kernels vectorize across 32 weight rows (a tile) like _i4dot's: decode_tiles() repacks the
quants as _qtiles.tile_units does (on a 64-byte boundary) with units of 4 bytes,
qn[tile, block, c (0..7), t (0..31), 4] = quants 4c..4c+3 of row tile*32+t's block, so one zmm (ymm)
load holds 4 quants of 16 (8) rows and
    vpdpbusd(acc, w chunk, x quants 4c..4c+3 broadcast)
adds to each lane (row) the dot of those 4 quants. vpdpbusd multiplies unsigned by signed bytes, and
both quants are signed. Two exact ways out:
  - offset: the tiles hold q_w + 128 (0..255: q_w ^ 0x80, made once at prepare) and each block's
    accumulator starts at -128*sum(q_x) (one int32 per block and call). Exact for every byte a
    file can hold (-128 included), and it costs the kernel nothing: one load + one vpdpbusd per
    64 (32) weights. This is what the VNNI paths do.
  - ggml's sign trick: |q_w| (unsigned) times sign(q_w)*q_x (vpabsb, vpsignb). vpdpbusd would need
    two more instructions per vector for it, so only AVX2 uses it, where vpmaddubsw's saturating
    int16 pair sums forbid the offset (2*255*127 > 32767): |q_w| <= 128 and |q_x| <= 127 (ggml's
    activation quants never reach -128) keep a pair within 2*128*127 = 32512, exact even for a
    weight byte of -128 (whose |.| is 128 read unsigned). The AVX2 kernel xors the stored offset
    away first (one more instruction per vector).
Per block and 16 (8) rows: one int->float convert and one FMA by d_w*d_x; the accumulators of the
8 chunks are split over ACC_CHAINS independent chains (vpdpbusd's latency ~5 cycles, its throughput 1
per cycle), summed exactly as int32 at the block's end. The tiles cost 1 byte per weight plus the
float32 d tiles (4 bytes per block, shared with the float kernels): 1.06x the file's bytes.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from quantfmt.families import decode_threads, parallel_rows
from quantfmt.numba_threads import claim

from . import _i8gemm
from ._ggml import QK, act_q8_0_row, act_row_work, fp16_table, quantize_activations
from ._qtiles import G, T, _tile_units

#: "avx512vnni", "avxvnni", "avx2" (the int8 instructions used) or "portable" (Q8_0's float tiles).
#: Tests force each path the CPU can run.
PATH = _i8gemm.PATH
#: Independent accumulator chains per 16 (8) rows within a block (of its 8 chunks of 4 quants). 1, 2,
#: 4 and 8 measured the same (2.0-2.1 ms single-threaded on 11008 x 4096): the kernel waits on the
#: weights' bytes (~22 GB/s from L3 per core), not on vpdpbusd's latency.
ACC_CHAINS = 2
#: Activation rows from which plugins/_i8gemm.py's prefill kernel (activation rows in lanes, so it
#: wastes lanes below 16 (8)) beats this decode (which reads each tile once for all rows). Measured on
#: 11008 x 4096, 2 threads, the AVX-512 Xeon under load, decode / prefill time: zmm n = 8 0.81,
#: n = 10 1.1, n = 12 0.86, n = 16 1.16; the ymm paths forced on the same CPU (not measured on a
#: CPU without AVX-512): n = 8 0.67-0.9, n = 12 0.6-0.8, n = 16 0.7-1.0.
MIN_ROWS = {"avx512vnni": 10, "avxvnni": 12, "avx2": 12}


def takes(n: int, mode: str) -> bool:
    """Whether mode-"q8_0" qmatmul of n activation rows on a Q8_0 Prepared runs here (with
    _i8gemm.PATH not "portable": the tests force the two switches apart)."""
    return mode == "q8_0" and PATH != "portable" and _i8gemm.PATH != "portable" and n < MIN_ROWS[PATH]


def decode_tiles(blocks: np.ndarray, rows: int, start: int = 2) -> np.ndarray:
    """Q8_0 blocks (rows, nb, 34) uint8 -> the decode tiles (tiles, nbp, 8, T, 4) uint8, q_w + 128."""
    nb = blocks.shape[1]
    shape = (-(-rows // T), -(-nb // G) * G, 8, T, 4)
    # on a 64-byte boundary, so that no zmm load of the kernel straddles two cache lines (numpy's
    # large arrays start 16 bytes into a page)
    size = int(np.prod(shape))
    raw = np.zeros(size + 64, np.uint8)
    a = -raw.ctypes.data % 64
    qn = raw[a : a + size].reshape(shape)
    parallel_rows(_tile_units, shape[0], nb * 8 * T * 4, blocks, start, qn, weights=1 << 20)
    # the offset for vpdpbusd's unsigned operand (see the module docstring); padded rows and blocks
    # become 128 too, i.e. weight 0 under a zero scale
    np.bitwise_xor(qn, np.uint8(0x80), out=qn)
    return qn


def kernel_path() -> str:
    """Format.kernel_path of the decode (where `takes`)."""
    return f"i8dot-{PATH}"


def qmatmul(qn: np.ndarray, d: np.ndarray, rows: int, cols: int, x: np.ndarray, tag: str,
            path: str | None = None, act: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Mode "q8_0" x (n, cols) float32 @ W.T from the decode tiles qn and the float32 d tiles
    (tiles, nbp, T), on int8 path `path` (default PATH, not "portable"); `act`: x already quantized
    (quantize_activations' d16 and qx: a caller that needs the Q8_1 sums too)."""
    path = path or PATH
    n = x.shape[0]
    d16, qx = act if act is not None else quantize_activations(x, with_sum=False, tag=tag)[::2]
    dxb = fp16_table()[d16]
    nb = dxb.shape[1]
    # the accumulators' start: -128*sum(q_x) undoes the tiles' q_w + 128; the sign trick needs none
    cx = np.zeros((n, nb), np.int32) if path == "avx2" else qx.sum(-1, dtype=np.int32) * np.int32(-128)
    tiles = d.shape[0]
    out = np.empty((n, tiles * T), np.float32)
    threads = decode_threads(rows, cols)
    if threads == 1:  # on this thread, without parallel_rows' Python bookkeeping (see _i4dot.qmatmul)
        _DECODE[path](qn, d, qx.reshape(n, -1), dxb, cx, out, nb, np.zeros(1, np.int64), 0, 1)
    else:
        parallel_rows(_DECODE[path], threads, 1, qn, d, qx.reshape(n, -1), dxb, cx, out, nb,
                      np.zeros(1, np.int64), weights=1)
    return out[:, :rows]


# ---- decode kernels ------------------------------------------------------------------------------

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _make_decode(isa: str):
    """The intrinsic: out[tl*T + t] = row tl*T+t of the weights (one tile) dotted with one
    activation row (xq its quants, dx the blocks' scales, cx the accumulators' start)."""
    lanes = _i8gemm.LANES[isa]
    parts = T // lanes
    vi32 = ir.VectorType(_I32, lanes)
    vf32 = ir.VectorType(_F32, lanes)
    vi8 = ir.VectorType(_I8, 4 * lanes)
    vi16 = ir.VectorType(ir.IntType(16), 2 * lanes)

    @intrinsic
    def kern(typingctx, qn, d, xq, dx, cx, out, tl, nb, nbp):
        sig = types.void(qn, d, xq, dx, cx, out, tl, nb, nbp)

        def codegen(context, builder, signature, args):
            at = signature.args
            qp, dp, xp, dxp, cxp, outp = (context.make_array(at[i])(context, builder, args[i]).data for i in range(6))
            tlv, nbv, nbpv = args[6], args[7], args[8]
            mod = builder.module
            fma = mod.declare_intrinsic(f"llvm.fmuladd.v{lanes}f32", (), ir.FunctionType(vf32, [vf32] * 3))
            if isa == "avx2":
                maddubs = mod.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", (), ir.FunctionType(vi16, [vi8, vi8]))
                maddwd = mod.declare_intrinsic("llvm.x86.avx2.pmadd.wd", (), ir.FunctionType(vi32, [vi16, vi16]))
                psignb = mod.declare_intrinsic("llvm.x86.avx2.psign.b", (), ir.FunctionType(vi8, [vi8, vi8]))
                pabsb = mod.declare_intrinsic("llvm.abs.v32i8", (), ir.FunctionType(vi8, [vi8, ir.IntType(1)]))
                ones16 = ir.Constant(vi16, [1] * (2 * lanes))
                flip = ir.Constant(vi8, [-128] * (4 * lanes))
            else:
                name = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"
                dpbusd = mod.declare_intrinsic(name, (), ir.FunctionType(vi32, [vi32] * 3))

            def c64(v):
                return ir.Constant(_I64, v)

            def dot(acc, w, x32):
                # acc += per lane, the dot of 4 weight quants (stored + 128) and 4 activation quants
                if isa != "avx2":
                    return builder.call(dpbusd, [acc, w, x32])
                ws = builder.xor(builder.bitcast(w, vi8), flip)  # q_w itself
                p = builder.call(maddubs, [builder.call(pabsb, [ws, ir.Constant(ir.IntType(1), 0)]),
                                           builder.call(psignb, [builder.bitcast(x32, vi8), ws])])
                return builder.add(acc, builder.call(maddwd, [p, ones16]))

            zero_i = ir.Constant(vi32, [0] * lanes)
            zero_f = ir.Constant(vf32, [0.0] * lanes)
            faccs = [cgutils.alloca_once_value(builder, zero_f) for _ in range(parts)]
            tbase = builder.mul(tlv, nbpv)
            with cgutils.for_range(builder, nbv) as loop:
                b = loop.index
                k = builder.add(tbase, b)  # (tile, block)
                # two sequential streams, the tile's quants (32T bytes a block) and its scales (4T), both
                # prefetched as far ahead in time (_i8gemm.PREFETCH_BYTES: weights from DRAM)
                _i8gemm.prefetch(builder, builder.gep(qp, [builder.mul(k, c64(32 * T))]), 32 * T)
                _i8gemm.prefetch(builder, builder.gep(dp, [builder.mul(k, c64(T))]), 4 * T, _i8gemm.PREFETCH_BYTES // 8)
                c0 = _i8gemm.splat(builder, builder.load(builder.gep(cxp, [b])), vi32)
                accs = [[c0] + [zero_i] * (ACC_CHAINS - 1) for _ in range(parts)]
                xo = builder.mul(b, c64(QK))
                for c in range(8):
                    x4 = _i8gemm.splat(builder, _i8gemm.vload(builder, xp, builder.add(xo, c64(4 * c)), _I32, 1), vi32)
                    qoff = builder.mul(builder.add(builder.mul(k, c64(8)), c64(c)), c64(4 * T))
                    for p in range(parts):
                        w = _i8gemm.vload(builder, qp, builder.add(qoff, c64(4 * lanes * p)), vi32, 4)
                        accs[p][c % ACC_CHAINS] = dot(accs[p][c % ACC_CHAINS], w, x4)
                s = _i8gemm.splat(builder, builder.load(builder.gep(dxp, [b])), vf32)
                doff = builder.mul(k, c64(T))
                for p in range(parts):
                    acc = accs[p][0]
                    for a in accs[p][1:]:
                        acc = builder.add(acc, a)  # exact: int32, |sum| <= 32*255*127
                    dv = _i8gemm.vload(builder, dp, builder.add(doff, c64(lanes * p)), vf32, 4)
                    f = builder.load(faccs[p])
                    builder.store(builder.call(fma, [builder.sitofp(acc, vf32), builder.fmul(dv, s), f]), faccs[p])
            obase = builder.mul(tlv, c64(T))
            for p in range(parts):
                ptr = builder.gep(outp, [builder.add(obase, c64(p * lanes))])
                builder.store(builder.load(faccs[p]), builder.bitcast(ptr, vf32.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kern


_dk_avx512vnni = _make_decode("avx512vnni")
_dk_avxvnni = _make_decode("avxvnni")
_dk_avx2 = _make_decode("avx2")


# One driver per path, each calling its own intrinsic (a dispatcher passed as an argument would not be
# cached across processes); as _i4dot's: chunks of TILE_CHUNK tiles claimed from a counter, a nogil
# claim loop run once on each thread (families.parallel_rows with one "row" per thread).
TILE_CHUNK = 4


@numba.njit(cache=True, nogil=True)
def _decode_avx512vnni(qn, d, xq, dx, cx, out, nb, counter, _c0, _c1):
    tiles, nbp = qn.shape[0], qn.shape[1]
    q, dd = qn.reshape(-1), d.reshape(-1)
    chunks = (tiles + TILE_CHUNK - 1) // TILE_CHUNK
    ch = claim(counter)
    while ch < chunks:
        for tl in range(ch * TILE_CHUNK, min(tiles, ch * TILE_CHUNK + TILE_CHUNK)):
            for i in range(xq.shape[0]):
                _dk_avx512vnni(q, dd, xq[i], dx[i], cx[i], out[i], tl, nb, nbp)
        ch = claim(counter)


@numba.njit(cache=True, nogil=True)
def _decode_avxvnni(qn, d, xq, dx, cx, out, nb, counter, _c0, _c1):
    tiles, nbp = qn.shape[0], qn.shape[1]
    q, dd = qn.reshape(-1), d.reshape(-1)
    chunks = (tiles + TILE_CHUNK - 1) // TILE_CHUNK
    ch = claim(counter)
    while ch < chunks:
        for tl in range(ch * TILE_CHUNK, min(tiles, ch * TILE_CHUNK + TILE_CHUNK)):
            for i in range(xq.shape[0]):
                _dk_avxvnni(q, dd, xq[i], dx[i], cx[i], out[i], tl, nb, nbp)
        ch = claim(counter)


@numba.njit(cache=True, nogil=True)
def _decode_avx2(qn, d, xq, dx, cx, out, nb, counter, _c0, _c1):
    tiles, nbp = qn.shape[0], qn.shape[1]
    q, dd = qn.reshape(-1), d.reshape(-1)
    chunks = (tiles + TILE_CHUNK - 1) // TILE_CHUNK
    ch = claim(counter)
    while ch < chunks:
        for tl in range(ch * TILE_CHUNK, min(tiles, ch * TILE_CHUNK + TILE_CHUNK)):
            for i in range(xq.shape[0]):
                _dk_avx2(q, dd, xq[i], dx[i], cx[i], out[i], tl, nb, nbp)
        ch = claim(counter)


_DECODE = {"avx512vnni": _decode_avx512vnni, "avxvnni": _decode_avxvnni, "avx2": _decode_avx2}


# One activation row on one thread: quantized and multiplied in one call (see _i4dot._MATVEC, why;
# reached through Format.matvec_fn only, as there). False where the activations need
# quantize_activations' error. One function per path, as the drivers.

@numba.njit(cache=True, nogil=True)
def _matvec_avx512vnni(qn, d, x, lut, out, work):
    if not act_q8_0_row(x, lut, work, True):
        return False
    counter = work[8]
    counter[0] = 0
    _decode_avx512vnni(qn, d, work[1], work[2], work[3], out, x.shape[1] // QK, counter, 0, 1)
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_avxvnni(qn, d, x, lut, out, work):
    if not act_q8_0_row(x, lut, work, True):
        return False
    counter = work[8]
    counter[0] = 0
    _decode_avxvnni(qn, d, work[1], work[2], work[3], out, x.shape[1] // QK, counter, 0, 1)
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_avx2(qn, d, x, lut, out, work):
    if not act_q8_0_row(x, lut, work, False):
        return False
    counter = work[8]
    counter[0] = 0
    _decode_avx2(qn, d, work[1], work[2], work[3], out, x.shape[1] // QK, counter, 0, 1)
    return True


_MATVEC = {"avx512vnni": _matvec_avx512vnni, "avxvnni": _matvec_avxvnni, "avx2": _matvec_avx2}


def matvec_fn(qn: np.ndarray, d: np.ndarray, rows: int, cols: int, path: str | None = None):
    """Format.matvec_fn of Q8_0 in mode "q8_0": the one-row kernel with its arguments bound (a matrix
    large enough for threads: the row quantized in one call, the driver on parallel_rows' threads)."""
    path = path or PATH
    threads = decode_threads(rows, cols)
    f, lut, width = _MATVEC[path], fp16_table(), d.shape[0] * T
    if threads > 1:
        # the row quantized by one compiled call, the driver on parallel_rows' threads (qmatmul's
        # Python around the same driver cost ~0.05 ms a call)
        dec, unsigned = _DECODE[path], path != "avx2"

        def run_threads(x):
            work = act_row_work(x.shape[1])
            if not act_q8_0_row(x, lut, work, unsigned):
                return None
            out = np.empty((1, width), np.float32)
            counter = work[8]
            counter[0] = 0
            parallel_rows(dec, threads, 1, qn, d, work[1], work[2], work[3], out, x.shape[1] // QK, counter,
                          weights=1)
            return out[:, :rows]

        return run_threads

    def run(x):
        out = np.empty((1, width), np.float32)
        return out[:, :rows] if f(qn, d, x, lut, out, act_row_work(x.shape[1])) else None

    return run
