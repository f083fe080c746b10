"""Q8_0: ggml's 8-bit format with one fp16 scale per 32 weights (8.5 bits per weight).

Owns the Q8_0 layout, its numpy reference, its numba kernels and the Format class.

One block = 32 consecutive weights of a row, 34 bytes:

    bytes 0-1    d      fp16, little-endian: the scale
    bytes 2-33   qs[32] int8, two's complement: qs[j] is element j

    weight w[j] = d * qs[j]

Quantize (gguf-py's `quants.Q8_0`, byte for byte; ggml's quantize_row_q8_0_ref):
    amax = max |x|
    d    = amax / 127                float32
    id   = 1/d, or 0 if d == 0       float32
    q    = round(x*id)               half away from zero (C roundf), in -127..127
    d is stored as fp16 (round to nearest even). amax >= 8321040 (= 65520*127) makes d
    round to fp16 infinity: a RangeError. A d that underflows fp16 is stored as 0 (or a
    subnormal) while q still comes from the float32 id, exactly as gguf and ggml do. If id
    is infinite (amax below ~3.7e-37), x*id is +-inf or NaN, which numpy casts to 0: q = 0.
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.families import GGMLFormat, parallel_rows

from . import _i8dot, _i8gemm
from ._ggml import (
    NONFINITE_ROW,
    QK,
    f32_to_f16_bits,
    fp16_table,
    quantize_activations,
    vec_dot_ref,
)
from ._qtiles import (
    BLAS_MIN_ROWS,
    FASTMATH,
    Prepared,
    T,
    blas_matmul,
    pad_blocks,
    pad_cols,
    tile_units,
    to_tiles,
)

BLOCK_BYTES = 34
RULE = "a block's max |w| must stay below 8321040 (= 65520*127)"

# ---- numpy reference ----------------------------------------------------------------------


def quantize_ref(w: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(w, np.float32).reshape(-1, QK)
    d = np.abs(x).max(axis=-1) / np.float32(127)
    bad = ~(d < np.float32(65520))
    if bad.any():
        r, b = divmod(int(np.flatnonzero(bad)[0]), w.shape[1] // QK)
        raise Q8_0().range_error(w, r, b)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        idd = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        t = x * idd[:, None]
        a = np.abs(t)
        # round half away from zero: a - floor(a) is exact, so this is C's roundf
        r = np.floor(a) + (a - np.floor(a) >= np.float32(0.5))
    r[~(a < 256)] = 0  # inf or NaN: numpy's cast to int8 gives 0
    q = np.where(t < 0, -r, r).astype(np.int8)
    out = np.empty((x.shape[0], BLOCK_BYTES), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(-1)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    blk = data.reshape(-1, BLOCK_BYTES)
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = blk[:, 2:].view(np.int8).astype(np.float32)
    return (q * d).reshape(rows, cols)


def qmatmul_q8_ref(data: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_q8_0_q8_0: per block sumi = sum(q_w * q_x), then sum over blocks of
    sumi * (d_w * d_x)."""
    blk = data.reshape(rows, cols // QK, BLOCK_BYTES)
    dw = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    return vec_dot_ref(blk[..., 2:].view(np.int8), dw, x)


# ---- numba kernels ------------------------------------------------------------------------
# No fastmath in quantize/dequantize (FMA would change last bits).


@numba.njit(cache=True, nogil=True)
def _quantize_rows(w, out, outq, bad, r0, r1):
    # Rows r0..r1-1 of w into out (rows, nb, 34) uint8; outq: the same memory as int8.
    nb = w.shape[1] // 32
    # 32, computed so LLVM cannot see it: a constant 32-long loop is fully unrolled into
    # scalar code (numba runs no SLP vectorizer); a run-time trip count gets vectorized.
    qk = w.shape[1] // nb
    for r in range(r0, r1):
        bad[r] = -1
        for b in range(nb):
            c0 = b * 32
            # max |x| as an int32 max of the bits of |x|, which order like the floats and
            # vectorize where a float max reduction (without fastmath) does not
            amaxi = np.int32(0)
            for j in range(qk):
                a = np.float32(abs(w[r, c0 + j])).view(np.int32)
                amaxi = a if a > amaxi else amaxi
            if amaxi >= np.int32(0x7F800000):  # |bits| of NaN/inf (checks_finite: no scan before)
                bad[r] = NONFINITE_ROW
                break
            d = np.int32(amaxi).view(np.float32) / np.float32(127.0)
            if not (d < np.float32(65520.0)):
                if bad[r] < 0:
                    bad[r] = b
                continue
            idd = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            h = f32_to_f16_bits(d)
            out[r, b, 0] = np.uint8(h & 0xFF)
            out[r, b, 1] = np.uint8(h >> 8)
            for j in range(qk):
                t = w[r, c0 + j] * idd
                a = abs(t)
                f = np.floor(a)
                # round half away from zero (a - floor(a) is exact); inf/NaN give 0 like numpy's cast
                q = f + np.float32(1.0) if a - f >= np.float32(0.5) else f
                q = q if a < np.float32(256.0) else np.float32(0.0)
                outq[r, b, 2 + j] = np.int8(-q if t < 0 else q)


def _quantize_kernel(w, out, bad):
    # Python threads over ~64K-weight row ranges, not a parallel=True driver: as fast, and a cold
    # start compiles _quantize_rows once (see families.parallel_rows).
    outq = out.view(np.int8)  # the quants are int8: one array, two views
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, out, outq, bad)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, blocksq, lut, idx, out, k0, k1, qk):
    # Direct 3-D indexing and a run-time trip count `qk` let the loop vectorizer emit
    # packed int8 -> float converts and multiplies (a constant 32-long loop is unrolled
    # into scalar code: numba runs no SLP vectorizer).
    nb = blocks.shape[1]
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = lut[np.int32(blocks[r, b, 0]) | (np.int32(blocks[r, b, 1]) << 8)]
            for j in range(qk):
                out[k, b * 32 + j] = np.float32(blocksq[r, b, 2 + j]) * d


def _dequantize_kernel(blocks, lut, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    blocksq = blocks.view(np.int8)
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, blocksq, lut, idx, out, tail=(32,))


# ---- fast qmatmul: row tiles (see _qtiles.py for why) ----------------------------------------
# prepare() repacks into tiles of T rows: q[tile, block, j, t] int8 = element j of the block
# of row tile*T + t, d[tile, block, t] float32. 1 byte per weight plus 4 bytes of scale per
# block: 1.06x the bytes.
# Mode "q8_0" with one activation row takes int8 dot products instead where the CPU has them
# (plugins/_i8dot.py, its own tiles), batches plugins/_i8gemm.py. Elsewhere
# one kernel serves both modes: int8 weights times the activation values, summed in float32
# per block, 4 partial sums per row to hide the FMA latency, vectorized across the T rows
# (vpmovsxbd + vcvtdq2ps + vfmadd per 8 weights). In mode "q8_0" the activations are ggml's
# int8 quants as floats: every product and every block sum (<= 32*127*127 < 2**24) is an
# exact integer in float32, so the block sum IS ggml's integer dot, then scaled by d_w*d_x.
# (int16 lanes, as Q4_0 uses, would overflow here: two products already reach 32258.)


def tile_q8(data: np.ndarray, rows: int, cols: int) -> Prepared:
    blk = data.reshape(rows, cols // QK, BLOCK_BYTES)
    d = fp16_table()[blk[:, :, 0].astype(np.uint16) | (blk[:, :, 1].astype(np.uint16) << 8)]
    # The float tiles q are made on first use, as the int8 decode tiles (decode_tiles below): a matrix
    # multiplied only in mode "q8_0" never reads q (batches read the bytes themselves, plugins/_i8gemm.py,
    # which stay referenced), one only in mode "f32" never the decode tiles. Either costs 1 byte per
    # weight (1.06x the file's bytes with d); a matrix used in both modes holds both (2.06x).
    return Prepared(rows, cols, lambda: tile_units(blk, rows, 2, 1).view(np.int8)[..., 0], to_tiles(d, rows),
                    np.zeros((0, 0, T), np.float32), data)


def decode_tiles(prep: Prepared) -> np.ndarray:
    """Q8_0's int8 decode tiles (plugins/_i8dot.py), made on first use and kept in prep.dec."""
    if prep.dec is None:
        prep.dec = _i8dot.decode_tiles(np.asarray(prep.raw).reshape(prep.rows, prep.cols // QK, BLOCK_BYTES),
                                       prep.rows)
    return prep.dec


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _tiles_dot(q, d, x, cx, out, tl0, tl1):
    # q (tiles, nbp, 32, T) int8; x (nbp*32,) float32 zero-padded; cx (nbp,) activation block
    # scale (ones in mode "f32"); out (tiles*T,).
    tiles, nbp = q.shape[0], q.shape[1]
    qf = q.reshape(tiles * nbp, QK * T)
    df = d.reshape(tiles * nbp, T)
    xb = x.reshape(nbp, QK)
    # Tiles tl0..tl1-1, on Python threads (families.parallel_rows, ~1M weights per range): a parallel=True
    # driver compiled ~2x slower cold for the same speed.
    # The sums go straight into out (no np.zeros per tile: its allocator compiled ~0.5 s cold).
    for tl in range(tl0, tl1):
        acc = out[tl * T : tl * T + T]
        acc[:] = 0
        for b in range(nbp):
            k = tl * nbp + b
            c = cx[b]
            for t in range(T):
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for j in range(0, QK, 4):
                    s0 += np.float32(qf[k, j * T + t]) * xb[b, j]
                    s1 += np.float32(qf[k, (j + 1) * T + t]) * xb[b, j + 1]
                    s2 += np.float32(qf[k, (j + 2) * T + t]) * xb[b, j + 2]
                    s3 += np.float32(qf[k, (j + 3) * T + t]) * xb[b, j + 3]
                acc[t] += df[k, t] * (c * ((s0 + s1) + (s2 + s3)))


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _dequant_tiles(q, d, t0, t1, wt, b0, b1):
    # Blocks b0..b1-1 of tiles t0..t1-1 -> rows b*32..b*32+31 of wt (padded cols, (t1-t0)*T), W.T;
    # blocks outer so that a thread fills whole rows of wt in order (see q4_0._dequant_tiles for the
    # indexing and the run-time bounds TT, U).
    TT = d.shape[2]
    U = q.shape[2]
    wt3 = wt.reshape(wt.shape[0], t1 - t0, TT)
    for b in range(b0, b1):
        for i in range(t1 - t0):
            tl = t0 + i
            for j in range(U):
                for t in range(TT):
                    wt3[b * QK + j, i, t] = np.float32(q[tl, b, j, t]) * d[tl, b, t]


def tiles_dot(prep: Prepared, x: np.ndarray, cx: np.ndarray, out: np.ndarray) -> None:
    """One activation row x (nbp*32,) with block scales cx (nbp,) against the tiles into out (tiles*T,)."""
    parallel_rows(_tiles_dot, prep.tiles, prep.nbp * QK * T, prep.q, prep.d, x, cx, out, weights=1 << 20)


def dequant_tiles(prep: Prepared, t0: int, t1: int, wt: np.ndarray, serial: bool = False) -> None:
    """Tiles [t0, t1) of int8 tiles (Q8_0, Q5_0, Q5_1) as W.T into wt; `serial`: on this thread, else
    ranges of blocks on the threads (families.parallel_rows: one cached nogil kernel for both, where a
    parallel=True driver cost a cold start more)."""
    if serial:
        _dequant_tiles(prep.q, prep.d, t0, t1, wt, 0, prep.nbp)
    else:
        parallel_rows(_dequant_tiles, prep.nbp, QK * (t1 - t0) * T, prep.q, prep.d, t0, t1, wt, weights=1 << 18)


def tiles_qmatmul(prep: Prepared, x: np.ndarray, mode: str, tag: str) -> np.ndarray:
    n = x.shape[0]
    nbp = prep.nbp
    if _i8dot.takes(n, mode):
        # a few activation rows: int8 dot products across 32 weight rows (plugins/_i8dot.py)
        return _i8dot.qmatmul(decode_tiles(prep), prep.d, prep.rows, prep.cols, x, tag)
    if _i8gemm.takes("q8_0", n, mode):
        return _i8gemm.qmatmul_q8("q8_0", prep, x, tag)
    if mode == "q8_0":
        d16, _, qx = quantize_activations(x, with_sum=False, tag=tag)
        dx = fp16_table()[d16]
        if n >= BLAS_MIN_ROWS:
            # sgemm on exact float products d_w*q_w and d_x*q_x
            return blas_matmul(dequant_tiles, prep, (qx.astype(np.float32) * dx[:, :, None]).reshape(n, -1))
        xs = pad_blocks(qx.astype(np.float32), nbp).reshape(n, -1)
        cx = pad_blocks(dx, nbp)
    else:
        if n >= BLAS_MIN_ROWS:
            return blas_matmul(dequant_tiles, prep, x)
        xs = pad_cols(x, nbp)
        cx = np.ones((n, nbp), np.float32)
    out = np.empty((n, prep.tiles * T), np.float32)
    for i in range(n):
        tiles_dot(prep, xs[i], cx[i], out[i])
    return out[:, : prep.rows]


# ---- the format ---------------------------------------------------------------------------


class Q8_0(GGMLFormat):
    tag = "Q8_0"
    rows_independent = True  # blocks along a row, nothing tensor-wide
    layout_version = 1
    ggml_type = "Q8_0"
    vec_dot_type = "Q8_0"
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    modes = ("f32", "q8_0")
    max_abs = 8321040.0
    range_rule = RULE
    summary = "ggml Q8_0: per 32 weights an fp16 scale d and int8 q, w = d*q; gguf-identical bytes"
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # the row kernel's amax flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)

    def prepare(self, data, rows, cols):
        # Tiles of T rows (see "fast qmatmul" above and tile_q8): 1.125 bytes per weight, 1.06x the bytes.
        return tile_q8(data, rows, cols)

    def _qmatmul(self, prep, rows, cols, x, mode):
        # f32 batches: W.T tiles per thread (tiles_qmatmul -> _qtiles.blas_matmul), the sgemm NN
        return tiles_qmatmul(prep, x, mode, self.tag)

    def matvec_fn(self, prep, rows, cols, mode):
        # one row as tiles_qmatmul takes it where _i8dot decodes
        return _i8dot.matvec_fn(decode_tiles(prep), prep.d, rows, cols) if _i8dot.takes(1, mode) else None

    def kernel_path(self, op, n=1, mode="f32"):
        return _i8gemm.qmatmul_path(op, n, mode, "q8_0")


@quantfmt.hookimpl
def register_formats(register):
    register(Q8_0())
