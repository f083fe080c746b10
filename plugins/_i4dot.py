"""Quantized-activation qmatmul of the 4-bit table formats IQ4_NL, IQ4_XS and MXFP4, on int8 dot products.

Owns their Prepared form (`LutPrepared`), the decode kernels (few activation rows), the choice among
decode, prefill (plugins/_i8gemm.py, kind "lut") and the portable path (plugins/_i8tiles.py: int8
tiles, numba / sgemm), and their kernel_path. Mode "f32" always takes the portable path's tiles.

The three formats are Q4_0 with a table: per 32-block, 16 bytes of nibbles (quant j low, j+16
high) index a 16-entry int8 table V (IQ4: kvalues_iq4nl, -127..113; MXFP4: the E2M1 values
doubled, -12..12), times one float32 scale d_w per block (IQ4_NL: fp16 d; IQ4_XS: d*(ls - 32);
MXFP4: the E8M0 scale halved). What is computed is ggml's ggml_vec_dot_{iq4_nl,mxfp4}_q8_0 (and
IQ4_XS with Q8_K activations, as ggml pairs it): per block the exact integer sum of V[L] times the
activation quants, then sum over blocks of float(sumi) * (d_w * d_x); only the float order differs
(d_x of a Q8_K activation is its 256-super-block's scale, the same for its eight 32-blocks).

Decode layout. The kernels vectorize across weight rows: prepare() repacks the nibble bytes as
_qtiles.tile_units does, qn[tile, block, c (0..3), t (0..31), 4] = bytes 4c..4c+3 of row
tile*32+t's block, so one zmm (ymm) load holds 4 bytes of 16 (8) rows, and per block and chunk c
    vpand / vpsrld+vpand   -> the nibbles of quants 4c.. (low) and 16+4c.. (high) of each row
    vpshufb                -> their table values, in register (the table in every 128-bit lane)
    vpdpbusd               with the 4 activation quants broadcast (vpbroadcastd): each lane (row)
                           adds the dot of 4 quants.
vpdpbusd multiplies unsigned by signed bytes: the table is stored as V + 128 (1..241) and each
block's accumulator starts at -128*sum(q_x) (exact). AVX2 without VNNI has vpmaddubsw, whose
int16 pair sums would overflow with 241*127*2: there the table is V itself and ggml's sign trick
applies, |x| (unsigned) times sign(x)*V, products within 2*127*128. Per block: one int->float
convert and an FMA by d_w*d_x per 16 rows; the 32 rows' d_w are Prepared.d's tiles. The weights
cost 0.5 byte + 4/32 bytes per weight, read once per activation row (rows stay in L1/L2 for the
next activation row of the same tile).

Q4_0 and Q4_1 decode here too (q4_0.nibble_qmatmul: tables -8..7 and 0..15). Q4_1's activations are
ggml's Q8_1 blocks, and the kernel adds its term sum_b m_b * s_b (m the minimums as Q tiles like d, s
the fp16 sums d_x * sum(q_x)) in a second float accumulator per lane, added at the end, as
ggml_vec_dot_q4_1_q8_1 does; an empty m skips it (one branch per block).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from quantfmt.families import (
    decode_threads,
    parallel_rows,
    per_thread_sgemm,
    prefill_path,
    prefill_threads,
    tiles_prefill,
)
from quantfmt.numba_threads import claim

from . import _i8gemm
from ._ggml import QK, act_q8_0_row, act_q8_1_row, act_row_work, fp16_table, quantize_activations
from ._i8tiles import prepare_int8, q8_k_blocks, qmatmul_int8
from ._qtiles import BLAS_MIN_ROWS, T, tile_units, to_tiles

#: "avx512vnni", "avxvnni", "avx2" (the int8 instructions used) or "portable" (_i8tiles). Tests
#: force each path the CPU can run.
PATH = _i8gemm.PATH
#: Activation rows from which the prefill kernel (16 or 8 activation rows per vector, so it wastes
#: lanes below that) beats the decode kernel (~0.55 ms per activation row after the first 3 ms).
#: Measured on IQ4_NL 11008 x 4096, 2 threads, AVX-512 Xeon: n = 8 decode 6.3 ms, prefill 9.9 ms
#: (flat up to 16 rows); the ymm paths' prefill is ~1.7x slower per row, so they switch earlier.
MIN_ROWS = {"avx512vnni": 12, "avxvnni": 6, "avx2": 6}


def takes_prefill(n: int, path: str) -> bool:
    return n >= MIN_ROWS[path]


class LutPrepared:
    """What prepare() of IQ4_NL, IQ4_XS and MXFP4 returns.

    raw: the ggml bytes (a reference); layout int64 (sbb, qoff, sh) of the nibbles in them (see
    _i8gemm._KINDS "lut"); table: V int8 (16,); d: float32 block scales as Q tiles (tiles, nbp, T);
    qn(): the decode tiles (tiles, nbp, 4, T, 4) uint8; int8(): the portable path's int8 tiles
    (plugins/_i8tiles.py), from `values`, a callable giving (V[L] int8 (rows, nb, 32), d (rows, nb)).
    Both are made on first use: a matrix only ever multiplied in one way pays for one.
    """

    __slots__ = ("rows", "cols", "raw", "layout", "table", "d", "_qn", "_values", "_int8", "_ktables")

    def __init__(self, rows, cols, raw, layout, table, d, values):
        self.rows, self.cols, self.raw, self.layout, self.table = rows, cols, raw, layout, table
        self.d, self._qn, self._values, self._int8, self._ktables = d, None, values, None, {}

    def kernel_table(self, path: str) -> np.ndarray:
        """The table as the decode kernels of `path` want it (uint8 (16,)): vpdpbusd multiplies unsigned
        bytes, so V + 128 (undone by the accumulators' start); the sign trick of the AVX2 path wants V
        itself. Made once: per call it was ~2 us of a ~10 us decode of a small matrix."""
        t = self._ktables.get(path)
        if t is None:
            t = self.table.view(np.uint8) if path == "avx2" else (self.table.astype(np.int16) + 128).astype(np.uint8)
            self._ktables[path] = t
        return t

    def qn(self):
        if self._qn is None:
            sbb, qoff, sh = (int(v) for v in self.layout)
            nb = self.cols // QK
            blk = self.raw.reshape(self.rows, nb >> sh, sbb)[:, :, qoff:qoff + (16 << sh)]
            self._qn = tile_units(np.ascontiguousarray(blk).reshape(self.rows, nb, 16), self.rows, 0, 4)
        return self._qn

    def int8(self):
        if self._int8 is None:
            v, d = self._values()
            self._int8 = prepare_int8(v, d)
        return self._int8

    @property
    def nbp(self) -> int:
        return self.d.shape[1]


def prepare_lut(data, rows: int, cols: int, *, block_bytes: int, qoff: int, blocks_per: int, table: np.ndarray,
                d: np.ndarray, values) -> LutPrepared:
    """The Prepared form of a 4-bit table format: blocks of `block_bytes` bytes each holding
    `blocks_per` 32-blocks' nibbles (16 bytes each) from byte `qoff`; d float32 (rows, nb) the
    32-blocks' scales; values: see LutPrepared."""
    raw = np.asarray(data).reshape(-1)
    sh = int(blocks_per).bit_length() - 1
    layout = np.array([block_bytes, qoff, sh], np.int64)
    dt = to_tiles(np.ascontiguousarray(d, np.float32), rows)
    return LutPrepared(rows, cols, raw, layout, np.ascontiguousarray(table, np.int8), dt, values)


def kernel_path(op: str, n: int, mode: str) -> str:
    """Format.kernel_path of IQ4_NL, IQ4_XS and MXFP4."""
    if op != "qmatmul":
        return "numba"
    if mode != "f32" and PATH != "portable":
        return f"int8-{PATH}" if takes_prefill(n, PATH) else f"lut-{PATH}"
    if n >= BLAS_MIN_ROWS:
        if mode == "f32" and PATH != "portable":
            return f"rows+{per_thread_sgemm()}-per-thread" if prefill_threads() else "blas-rows"
        return prefill_path()
    return f"tiles-{mode}"


def qmatmul(prep: LutPrepared, x: np.ndarray, mode: str, tag: str, path: str | None = None,
            m: np.ndarray | None = None) -> np.ndarray:
    """x (n, cols) float32 @ W.T in `mode` for a LutPrepared, on int8 path `path` (default PATH).

    m: Q4_1's block minimums as Q tiles like prep.d (mode "q8_0", int8 paths only): then the
    activations are ggml's Q8_1 blocks and the decode adds sum_b m_b * s_b (ggml_vec_dot_q4_1_q8_1)."""
    path = path or PATH
    n = x.shape[0]
    if mode == "f32" and n >= BLAS_MIN_ROWS and path != "portable":
        return blas_rows(prep, x)
    if mode == "f32" or path == "portable":
        return qmatmul_int8(prep.int8(), x, mode, tag)
    sxb = np.zeros((n, 0), np.float32)  # no Q8_1 sums: the kernel reads sx[i] only where m is given
    if mode == "q8_k":
        qx, dxb = q8_k_blocks(x, tag)
    else:
        d16, s16, qx = quantize_activations(x, with_sum=m is not None, tag=tag)
        dxb = fp16_table()[d16]
        if m is not None:
            sxb = fp16_table()[s16]  # ggml's Q8_1 s = d_x * sum(q_x), rounded to fp16
    table = prep.kernel_table(path)
    if takes_prefill(n, path) and m is None:
        return _i8gemm.gemm_lut(prep.raw, prep.layout, table, prep.d, prep.nbp * T, prep.rows, qx, dxb, path)
    nb = dxb.shape[1]
    cx = np.zeros((n, nb), np.int32) if path == "avx2" else qx.sum(-1, dtype=np.int32) * np.int32(-128)
    tiles = prep.d.shape[0]
    out = np.empty((n, tiles * T), np.float32)
    threads = decode_threads(prep.rows, prep.cols)
    mt = _NO_M if m is None else m.reshape(-1)  # empty: the kernel skips the m term
    xq = qx.reshape(n, -1)  # qx, dxb, sxb: fresh C-contiguous arrays from the quantizers
    if threads == 1:
        # the kernel on this thread: parallel_rows would too, after its own Python bookkeeping
        # (a decoded token of a small model makes ~200 of these calls)
        _DECODE[path](prep.qn(), prep.d, table, xq, dxb, cx, mt, sxb, out, nb, np.zeros(1, np.int64), 0, 1)
    else:
        parallel_rows(_DECODE[path], threads, 1, prep.qn(), prep.d, table, xq, dxb, cx, mt, sxb, out, nb,
                      np.zeros(1, np.int64), weights=1)
    return out[:, : prep.rows]


_NO_M = np.zeros(0, np.float32)


# ---- mode "f32", batches: dequantized rows + sgemm ---------------------------------------------
# The int8 tiles' dequantization (_i8tiles: W.T into chunks of (cols, 32-row tiles), for NN sgemm)
# writes with a stride and cost ~0.7x of the sgemm itself; here chunks of whole rows are dequantized
# straight from the ggml bytes and multiplied as the float32 baseline does, x @ Wc.T. Per 16 bytes
# of nibbles: vpshufb looks the 32 nibbles up in the int8 table, then sign-extend, int->float and one
# multiply by d_w, 16 floats at a time: the weights are exactly dequantize()'s (d_w * V[L], one
# rounding of an exact product), so mode "f32" keeps float32 accuracy. The 64-byte stores are
# non-temporal (vmovntps): a chunk is larger than the caches anyway, and a normal store first reads
# each line it writes. Dequantizing 11008 x 4096 (180 MB): 84 ms with normal stores, 28 ms so. CPUs without SSSE3's
# vpshufb (PATH "portable") take the int8 tiles instead (plugins/_i8tiles.py).
#
# Measured on IQ4_NL 11008 x 4096, n = 128, 2 threads, on a loaded machine (load average 6-7 on 2
# cores), ratios to x @ W.T in the same run, with normal stores: chunks of 8 / 16 / 32 / 64 MB of
# rows 5.9x / 4.6x / 2.6x / 1.5x, the whole matrix at once 1.39x (n = 512: 1.07x); the int8 tiles'
# path 2.0-2.1x. With the non-temporal stores, whole matrix: 1.07-1.11x (n = 512: 1.01-1.04x).
# Every sgemm call pays a thread barrier (OpenBLAS's threads spin against numba's between calls),
# so the chunks are as large as ROW_CHUNK_BYTES allows. And the float buffer is kept per thread
# and reused: a fresh 180 MB buffer per call, faulted in page by page, ran 4.4x.
ROW_CHUNK_BYTES = 256 << 20
_scratch = threading.local()


def _buffer(rows: int, cols: int) -> np.ndarray:
    """A float32 (rows, cols) scratch array, this thread's, grown as needed and then kept (at most
    ROW_CHUNK_BYTES: this path's float weights cost what one float32 chunk of them costs)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < rows * cols:
        buf = _scratch.buf = aligned_empty(rows, cols).reshape(-1)
    return buf[: rows * cols].reshape(rows, cols)


def aligned_empty(rows: int, cols: int) -> np.ndarray:
    """An uninitialized float32 (rows, cols) array whose data starts on a 64-byte boundary."""
    raw = np.empty(rows * cols + 16, np.float32)
    a = (-raw.ctypes.data // 4) % 16
    return raw[a : a + rows * cols].reshape(rows, cols)


def _make_dequant_row(nontemporal: bool):
    """The row intrinsic below, its stores non-temporal (a large scratch streamed to memory) or not (a
    per-thread prefill tile, read back from cache by the next sgemm)."""

    @intrinsic
    def dequant_row(typingctx, raw, layout, tab, d, out, r, r0, nbp):
        return _dequant_row_sig(raw, layout, tab, d, out, r, r0, nbp, nontemporal)

    return dequant_row


def _dequant_row_sig(raw, layout, tab, d, out, r, r0, nbp, nontemporal):
    """out[r - r0, :] = row r of the weights, from the ggml bytes raw (layout: see _i8gemm "lut")
    and the block scales d (Q tiles, nbp blocks per row)."""
    sig = types.void(raw, layout, tab, d, out, r, r0, nbp)

    def codegen(context, builder, signature, args):
        at = signature.args
        rp, lp, tp, dp, op = (context.make_array(at[i])(context, builder, args[i]).data for i in range(5))
        outa = context.make_array(at[4])(context, builder, args[4])
        cols = builder.extract_value(outa.shape, 1)
        rv, r0v, nbpv = args[5], args[6], args[7]
        v16b = ir.VectorType(_I8, 16)
        v16i = ir.VectorType(_I32, 16)
        v16f = ir.VectorType(_F32, 16)
        pshufb = builder.module.declare_intrinsic("llvm.x86.ssse3.pshuf.b.128", (), ir.FunctionType(v16b, [v16b] * 2))

        def c64(v):
            return ir.Constant(_I64, v)

        sbb, qoff, sh = (builder.load(builder.gep(lp, [c64(k)])) for k in range(3))
        mask = builder.sub(builder.shl(c64(1), sh), c64(1))
        nb = builder.sdiv(cols, c64(QK))
        base = builder.add(builder.mul(rv, builder.mul(builder.ashr(nb, sh), sbb)), qoff)
        table = builder.load(builder.bitcast(tp, v16b.as_pointer()), align=1)
        dbase = builder.add(builder.mul(builder.mul(builder.sdiv(rv, c64(T)), nbpv), c64(T)), builder.srem(rv, c64(T)))
        obase = builder.mul(builder.sub(rv, r0v), cols)
        low4 = ir.Constant(v16b, [15] * 16)
        four = ir.Constant(v16b, [4] * 16)
        undef = ir.Constant(v16f, ir.Undefined)
        nt = builder.module.add_metadata([ir.Constant(_I32, 1)])
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            off = builder.add(builder.add(base, builder.mul(builder.ashr(b, sh), sbb)),
                              builder.mul(builder.and_(b, mask), c64(16)))
            q = builder.load(builder.bitcast(builder.gep(rp, [off]), v16b.as_pointer()), align=1)
            db = builder.load(builder.gep(dp, [builder.add(dbase, builder.mul(b, c64(T)))]))
            dv = builder.shuffle_vector(builder.insert_element(undef, db, ir.Constant(_I32, 0)), undef,
                                        ir.Constant(v16i, [0] * 16))
            for h, idx in enumerate((builder.and_(q, low4), builder.and_(builder.lshr(q, four), low4))):
                v = builder.sitofp(builder.sext(builder.call(pshufb, [table, idx]), v16i), v16f)
                o = builder.add(obase, builder.add(builder.mul(b, c64(QK)), c64(16 * h)))
                st = builder.store(builder.fmul(v, dv), builder.bitcast(builder.gep(op, [o]), v16f.as_pointer()),
                                   align=64)
                if nontemporal:
                    st.set_metadata("nontemporal", nt)
        return context.get_dummy_value()

    return sig, codegen


_dequant_row = _make_dequant_row(True)
_dequant_row_cached = _make_dequant_row(False)


@numba.njit(cache=True, nogil=True)
def _dequant_rows_1(raw, layout, tab, d, r0, r1, out):
    # rows r0..r1-1 into out (r1 - r0, cols), 64-byte aligned, on the calling thread: a per-thread
    # prefill tile (families.tiles_prefill), kept in cache for the sgemm that follows
    nbp = d.shape[1]
    dd = d.reshape(-1)
    for r in range(r0, r1):
        _dequant_row_cached(raw, layout, tab, dd, out, r, r0, nbp)


@numba.njit(cache=True, parallel=True)
def _dequant_rows(raw, layout, tab, d, r0, r1, out, counter, threads):
    nbp = d.shape[1]
    dd = d.reshape(-1)
    chunks = (r1 - r0 + 63) // 64  # 64 rows per claim (see the decode drivers)
    for _t in numba.prange(threads):
        ch = claim(counter)
        while ch < chunks:
            for r in range(r0 + 64 * ch, min(r1, r0 + 64 * ch + 64)):
                _dequant_row(raw, layout, tab, dd, out, r, r0, nbp)
            ch = claim(counter)


def dequant_rows(prep: LutPrepared, r0: int, r1: int, out: np.ndarray) -> None:
    """out (r1 - r0, cols) float32 = rows r0..r1-1 of the weights, as dequantize() gives them. out
    must be C-contiguous and start on a 64-byte boundary (aligned_empty): the stores are aligned."""
    if out.shape != (r1 - r0, prep.cols) or not out.flags.c_contiguous or out.ctypes.data % 64:
        raise ValueError("dequant_rows: out must be a C-contiguous, 64-byte aligned (r1 - r0, cols) float32 array")
    _dequant_rows(prep.raw, prep.layout, prep.table, prep.d, r0, r1, out, np.zeros(1, np.int64),
                  numba.get_num_threads())


def blas_rows(prep: LutPrepared, x: np.ndarray) -> np.ndarray:
    """x (n, cols) float32 @ W.T through chunks of dequantized rows and sgemm."""
    n, cols = x.shape
    if prefill_threads():
        # each thread its own tiles of rows and its own sgemm (families.tiles_prefill)
        return tiles_prefill(_dequant_rows_1, prep.rows, cols, x, prep.raw, prep.layout, prep.table, prep.d)
    out = np.empty((n, prep.rows), np.float32)
    chunk = max(1, min(prep.rows, ROW_CHUNK_BYTES // (cols * 4)))
    buf = _buffer(chunk, cols)
    for r0 in range(0, prep.rows, chunk):
        r1 = min(prep.rows, r0 + chunk)
        wc = buf[: r1 - r0]
        dequant_rows(prep, r0, r1, wc)
        np.matmul(x, wc.T, out=out[:, r0:r1])
    return out


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
    def kern(typingctx, qn, d, tab, xq, dx, cx, m, sx, out, tl, nb, nbp):
        sig = types.void(qn, d, tab, xq, dx, cx, m, sx, out, tl, nb, nbp)

        def codegen(context, builder, signature, args):
            at = signature.args
            qp, dp, tp, xp, dxp, cxp, mp, sxp, outp = (context.make_array(at[i])(context, builder, args[i]).data
                                                       for i in range(9))
            tlv, nbv, nbpv = args[9], args[10], args[11]
            # Q4_1's m term, where m is not empty: a branch per block, the same way every block
            msize = builder.extract_value(context.make_array(at[6])(context, builder, args[6]).shape, 0)
            has_m = builder.icmp_signed(">", msize, ir.Constant(_I64, 0))
            mod = builder.module
            fma = mod.declare_intrinsic(f"llvm.fmuladd.v{lanes}f32", (), ir.FunctionType(vf32, [vf32] * 3))
            pshufb = mod.declare_intrinsic("llvm.x86.avx512.pshuf.b.512" if lanes == 16 else "llvm.x86.avx2.pshuf.b",
                                           (), ir.FunctionType(vi8, [vi8, vi8]))
            if isa == "avx2":
                maddubs = mod.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", (), ir.FunctionType(vi16, [vi8, vi8]))
                maddwd = mod.declare_intrinsic("llvm.x86.avx2.pmadd.wd", (), ir.FunctionType(vi32, [vi16, vi16]))
                psignb = mod.declare_intrinsic("llvm.x86.avx2.psign.b", (), ir.FunctionType(vi8, [vi8, vi8]))
                pabsb = mod.declare_intrinsic("llvm.abs.v32i8", (), ir.FunctionType(vi8, [vi8, ir.IntType(1)]))
                ones16 = ir.Constant(vi16, [1] * (2 * lanes))
            else:
                name = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"
                dpbusd = mod.declare_intrinsic(name, (), ir.FunctionType(vi32, [vi32] * 3))

            def c64(v):
                return ir.Constant(_I64, v)

            def splat(val, vt):
                undef = ir.Constant(vt, ir.Undefined)
                v = builder.insert_element(undef, val, ir.Constant(_I32, 0))
                return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))

            def vload(p, off, vt, align):
                return builder.load(builder.bitcast(builder.gep(p, [off]), vt.as_pointer()), align=align)

            t16 = builder.load(builder.bitcast(tp, ir.VectorType(_I8, 16).as_pointer()), align=1)
            table = builder.shuffle_vector(t16, t16, ir.Constant(ir.VectorType(_I32, 4 * lanes),
                                                                 list(range(16)) * (lanes // 4)))

            def lookup(v):
                return builder.call(pshufb, [table, builder.bitcast(v, vi8)])

            def dot(acc, w8, x32, xabs):
                # acc += per lane, sum of 4 products of the table values w8 and the activations x32
                if isa != "avx2":
                    return builder.call(dpbusd, [acc, builder.bitcast(w8, vi32), x32])
                p = builder.call(maddubs, [xabs, builder.call(psignb, [w8, builder.bitcast(x32, vi8)])])
                return builder.add(acc, builder.call(maddwd, [p, ones16]))

            zero_f = ir.Constant(vf32, [0.0] * lanes)
            faccs = [cgutils.alloca_once_value(builder, zero_f) for _ in range(parts)]
            # ggml sums the m * s terms apart from the d terms and adds the two at the end
            maccs = [cgutils.alloca_once_value(builder, zero_f) for _ in range(parts)]
            mask4 = ir.Constant(vi32, [0x0F0F0F0F] * lanes)
            four = ir.Constant(vi32, [4] * lanes)
            tbase = builder.mul(tlv, nbpv)
            with cgutils.for_range(builder, nbv) as loop:
                b = loop.index
                k = builder.add(tbase, b)  # (tile, block)
                # the tile's weights are two sequential streams, its nibbles (16T bytes a block) and its
                # scales (4T): both prefetched as far ahead in time (_i8gemm.PREFETCH_BYTES)
                _i8gemm.prefetch(builder, builder.gep(qp, [builder.mul(k, c64(16 * T))]), 16 * T)
                _i8gemm.prefetch(builder, builder.gep(dp, [builder.mul(k, c64(T))]), 4 * T, _i8gemm.PREFETCH_BYTES // 4)
                c0 = splat(builder.load(builder.gep(cxp, [b])), vi32)
                accs = [c0] * parts
                xo = builder.mul(b, c64(QK))
                for c in range(4):
                    xlo = splat(vload(xp, builder.add(xo, c64(4 * c)), _I32, 1), vi32)
                    xhi = splat(vload(xp, builder.add(xo, c64(16 + 4 * c)), _I32, 1), vi32)
                    alo = ahi = None
                    if isa == "avx2":
                        alo = builder.call(pabsb, [builder.bitcast(xlo, vi8), ir.Constant(ir.IntType(1), 0)])
                        ahi = builder.call(pabsb, [builder.bitcast(xhi, vi8), ir.Constant(ir.IntType(1), 0)])
                    qoff = builder.mul(builder.add(builder.mul(k, c64(4)), c64(c)), c64(4 * T))
                    for p in range(parts):
                        w = vload(qp, builder.add(qoff, c64(4 * lanes * p)), vi32, 4)
                        lo = lookup(builder.and_(w, mask4))
                        hi = lookup(builder.and_(builder.lshr(w, four), mask4))
                        accs[p] = dot(dot(accs[p], lo, xlo, alo), hi, xhi, ahi)
                s = splat(builder.load(builder.gep(dxp, [b])), vf32)
                doff = builder.mul(k, c64(T))
                for p in range(parts):
                    dv = vload(dp, builder.add(doff, c64(lanes * p)), vf32, 4)
                    f = builder.load(faccs[p])
                    builder.store(builder.call(fma, [builder.sitofp(accs[p], vf32), builder.fmul(dv, s), f]), faccs[p])
                with builder.if_then(has_m):
                    _i8gemm.prefetch(builder, builder.gep(mp, [doff]), 4 * T, _i8gemm.PREFETCH_BYTES // 4)
                    sm = splat(builder.load(builder.gep(sxp, [b])), vf32)
                    for p in range(parts):
                        mv = vload(mp, builder.add(doff, c64(lanes * p)), vf32, 4)
                        builder.store(builder.call(fma, [mv, sm, builder.load(maccs[p])]), maccs[p])
            obase = builder.mul(tlv, c64(T))
            for p in range(parts):
                ptr = builder.gep(outp, [builder.add(obase, c64(p * lanes))])
                res = builder.fadd(builder.load(faccs[p]), builder.load(maccs[p]))
                builder.store(res, builder.bitcast(ptr, vf32.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kern


_dk_avx512vnni = _make_decode("avx512vnni")
_dk_avxvnni = _make_decode("avxvnni")
_dk_avx2 = _make_decode("avx2")


# One driver per path, each calling its own intrinsic (a dispatcher passed as an argument would not
# be cached across processes). Work: chunks of TILE_CHUNK tiles of 32 weight rows, for every
# activation row, claimed from a counter (quantfmt.numba_threads: a descheduled thread's share is
# taken by the running one, on a machine shared with other work). The driver is a nogil claim loop
# run once on each thread (families.parallel_rows with one "row" per thread), not a parallel=True
# prange over the threads: that compiled ~2x slower cold, for the same loop.
TILE_CHUNK = 4


@numba.njit(cache=True, nogil=True)
def _decode_avx512vnni(qn, d, tab, xq, dx, cx, m, sx, out, nb, counter, _c0, _c1):
    tiles, nbp = qn.shape[0], qn.shape[1]
    q, dd, mm = qn.reshape(-1), d.reshape(-1), m.reshape(-1)
    chunks = (tiles + TILE_CHUNK - 1) // TILE_CHUNK
    ch = claim(counter)
    while ch < chunks:
        for tl in range(ch * TILE_CHUNK, min(tiles, ch * TILE_CHUNK + TILE_CHUNK)):
            for i in range(xq.shape[0]):
                _dk_avx512vnni(q, dd, tab, xq[i], dx[i], cx[i], mm, sx[i], out[i], tl, nb, nbp)
        ch = claim(counter)


@numba.njit(cache=True, nogil=True)
def _decode_avxvnni(qn, d, tab, xq, dx, cx, m, sx, out, nb, counter, _c0, _c1):
    tiles, nbp = qn.shape[0], qn.shape[1]
    q, dd, mm = qn.reshape(-1), d.reshape(-1), m.reshape(-1)
    chunks = (tiles + TILE_CHUNK - 1) // TILE_CHUNK
    ch = claim(counter)
    while ch < chunks:
        for tl in range(ch * TILE_CHUNK, min(tiles, ch * TILE_CHUNK + TILE_CHUNK)):
            for i in range(xq.shape[0]):
                _dk_avxvnni(q, dd, tab, xq[i], dx[i], cx[i], mm, sx[i], out[i], tl, nb, nbp)
        ch = claim(counter)


@numba.njit(cache=True, nogil=True)
def _decode_avx2(qn, d, tab, xq, dx, cx, m, sx, out, nb, counter, _c0, _c1):
    tiles, nbp = qn.shape[0], qn.shape[1]
    q, dd, mm = qn.reshape(-1), d.reshape(-1), m.reshape(-1)
    chunks = (tiles + TILE_CHUNK - 1) // TILE_CHUNK
    ch = claim(counter)
    while ch < chunks:
        for tl in range(ch * TILE_CHUNK, min(tiles, ch * TILE_CHUNK + TILE_CHUNK)):
            for i in range(xq.shape[0]):
                _dk_avx2(q, dd, tab, xq[i], dx[i], cx[i], mm, sx[i], out[i], tl, nb, nbp)
        ch = claim(counter)


_DECODE = {"avx512vnni": _decode_avx512vnni, "avxvnni": _decode_avxvnni, "avx2": _decode_avx2}


# One activation row, mode "q8_0", no Q4_1 term, one thread: the activations quantized and the decode
# run in one call (_ggml.act_q8_0_row, then the path's driver inline). A decoded SmolLM2-135M token is
# ~210 such products of 576 x 576 to 1536 x 576 weights, whose kernels take a few microseconds each;
# the Python around them (quantize_activations' checks and four allocations, the fp16 lookup, the
# accumulators' start, the driver's arguments) took 3-5x that. False where the activations need
# quantize_activations' error (NaN/inf, a scale past fp16). One function per path, as the drivers.
# Reached through Format.matvec_fn only (model code that binds one per matrix), not from qmatmul: each
# compiles its driver and the activation quantizer again inside it (~2 s of a cold start, measured),
# which a format's first qmatmul should not pay for a few microseconds per call.

@numba.njit(cache=True, nogil=True)
def _matvec_avx512vnni(qn, d, tab, x, lut, out, work):
    if not act_q8_0_row(x, lut, work, True):
        return False
    counter = work[8]
    counter[0] = 0
    _decode_avx512vnni(qn, d, tab, work[1], work[2], work[3], work[6], work[7], out, x.shape[1] // QK, counter, 0, 1)
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_avxvnni(qn, d, tab, x, lut, out, work):
    if not act_q8_0_row(x, lut, work, True):
        return False
    counter = work[8]
    counter[0] = 0
    _decode_avxvnni(qn, d, tab, work[1], work[2], work[3], work[6], work[7], out, x.shape[1] // QK, counter, 0, 1)
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_avx2(qn, d, tab, x, lut, out, work):
    if not act_q8_0_row(x, lut, work, False):
        return False
    counter = work[8]
    counter[0] = 0
    _decode_avx2(qn, d, tab, work[1], work[2], work[3], work[6], work[7], out, x.shape[1] // QK, counter, 0, 1)
    return True


_MATVEC = {"avx512vnni": _matvec_avx512vnni, "avxvnni": _matvec_avxvnni, "avx2": _matvec_avx2}


# The same with Q4_1's term: m (its minimums, tiled as d) times ggml's Q8_1 sums (act_q8_1_row). The
# shipped SmolLM2 GGUF is Q4_1: its decode took the qmatmul path per matrix before, 2x Q4_0's time per token.

@numba.njit(cache=True, nogil=True)
def _matvec_m_avx512vnni(qn, d, tab, m, x, lut, out, work):
    if not act_q8_1_row(x, lut, work, True):
        return False
    counter = work[8]
    counter[0] = 0
    _decode_avx512vnni(qn, d, tab, work[1], work[2], work[3], m, work[10], out, x.shape[1] // QK, counter, 0, 1)
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_m_avxvnni(qn, d, tab, m, x, lut, out, work):
    if not act_q8_1_row(x, lut, work, True):
        return False
    counter = work[8]
    counter[0] = 0
    _decode_avxvnni(qn, d, tab, work[1], work[2], work[3], m, work[10], out, x.shape[1] // QK, counter, 0, 1)
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_m_avx2(qn, d, tab, m, x, lut, out, work):
    if not act_q8_1_row(x, lut, work, False):
        return False
    counter = work[8]
    counter[0] = 0
    _decode_avx2(qn, d, tab, work[1], work[2], work[3], m, work[10], out, x.shape[1] // QK, counter, 0, 1)
    return True


_MATVEC_M = {"avx512vnni": _matvec_m_avx512vnni, "avxvnni": _matvec_m_avxvnni, "avx2": _matvec_m_avx2}


def matvec_fn(prep: LutPrepared, path: str | None = None, m: np.ndarray | None = None):
    """Format.matvec_fn in mode "q8_0" (with Q4_1's term where `m`, its minimums tiled as prep.d, is
    given): the one-row kernel with its arguments bound, or None where one row does not run it (the
    portable path). A matrix large enough for threads (decode_threads): the row quantized by one compiled
    call (_ggml.act_q8_0_row / act_q8_1_row), the path's driver on parallel_rows' threads, where qmatmul's
    Python (quantize_activations, its checks and allocations) cost ~0.05 ms a call."""
    path = path or PATH
    if path == "portable":
        return None
    qn, d, tab, lut = prep.qn(), prep.d, prep.kernel_table(path), fp16_table()
    rows, width = prep.rows, prep.d.shape[0] * T
    threads = decode_threads(prep.rows, prep.cols)
    if threads > 1:
        dec, act, unsigned, mt = _DECODE[path], act_q8_0_row if m is None else act_q8_1_row, path != "avx2", m
        if mt is not None:
            mt = mt.reshape(-1)

        def run_threads(x):
            work = act_row_work(x.shape[1])
            if not act(x, lut, work, unsigned):
                return None
            out = np.empty((1, width), np.float32)
            counter = work[8]
            counter[0] = 0
            parallel_rows(dec, threads, 1, qn, d, tab, work[1], work[2], work[3], work[6] if mt is None else mt,
                          work[7] if mt is None else work[10], out, x.shape[1] // QK, counter, weights=1)
            return out[:, :rows]

        return run_threads
    if m is not None:
        f, mt = _MATVEC_M[path], m.reshape(-1)

        def run_m(x):
            out = np.empty((1, width), np.float32)
            return out[:, :rows] if f(qn, d, tab, mt, x, lut, out, act_row_work(x.shape[1])) else None

        return run_m
    g = _MATVEC[path]

    def run(x):
        out = np.empty((1, width), np.float32)
        return out[:, :rows] if g(qn, d, tab, x, lut, out, act_row_work(x.shape[1])) else None

    return run
