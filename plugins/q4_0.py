"""Q4_0: ggml's 4-bit format with one fp16 scale per 32 weights (4.5 bits per weight).

Owns the Q4_0 layout, its numpy reference, its numba kernels and the Format class.

One block = 32 consecutive weights of a row, 18 bytes:

    bytes 0-1    d      fp16, little-endian: the scale
    bytes 2-17   qs[16] qs[j] = (q[j] & 15) | (q[j+16] << 4): element j in the low nibble
                        of byte j, element j+16 in the high nibble; q = stored value in 0..15

    weight w[j] = d * (q[j] - 8)

Quantize (gguf-py's `quants.Q4_0`, byte for byte; ggml's quantize_row_q4_0_ref):
    i   = first index of the largest |x|;  max = x[i]  (signed: the scale is negative when
          the largest magnitude is positive, so that value maps to q = 0, i.e. -8*d)
    d   = max / -8                          float32
    id  = 1/d, or 0 if d == 0               float32
    q   = min(15, trunc(x*id + 8.5))        two float32 roundings, never an FMA
    d is stored as fp16 (round to nearest even). |max| >= 524160 makes d round to fp16
    infinity: a RangeError. When |d| underflows fp16 the stored scale is 0 (or subnormal)
    while the nibbles still come from the float32 id, exactly as gguf and ggml do.
    If id is infinite (|max| < 2**-125), x*id is +-inf or NaN, which numpy casts to 0: q = 0.
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.families import GGMLFormat, parallel_rows

from . import _i8gemm, _q4simd
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
    G,
    Prepared,
    T,
    blas_matmul,
    pad_blocks,
    pad_cols,
    tile_units,
    to_tiles,
)

BLOCK_BYTES = 18
RULE = "a block's max |w| must stay below 524160 (= 65520*8)"

# ---- numpy reference: the formulas above, one block per row of a (n_blocks, 32) array ----


def quantize_ref(w: np.ndarray) -> np.ndarray:
    """float32 (rows, cols) -> bytes; raises RangeError like the kernel."""
    x = np.ascontiguousarray(w, np.float32).reshape(-1, QK)
    imax = np.abs(x).argmax(axis=-1)  # argmax returns the first of equal maxima
    mx = x[np.arange(x.shape[0]), imax]
    d = mx / np.float32(-8)
    bad = ~(np.abs(d) < np.float32(65520))
    if bad.any():
        blk = int(np.flatnonzero(bad)[0])
        r, b = divmod(blk, w.shape[1] // QK)
        raise Q4_0().range_error(w, r, b)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        idd = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        t = np.trunc(x * idd[:, None] + np.float32(8.5))
    t[~((t >= 0) & (t < 256))] = 0  # numpy's cast of inf/NaN to uint8 gives 0
    q = np.minimum(t, 15).astype(np.uint8)
    out = np.empty((x.shape[0], BLOCK_BYTES), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(-1)


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    blk = data.reshape(-1, BLOCK_BYTES)
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    qs = blk[:, 2:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32) - np.float32(8)
    return (d * q).reshape(rows, cols)


def qmatmul_q8_ref(data: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_q4_0_q8_0 for every (activation row, weight row): per block the integer
    dot sumi = sum((q_w - 8) * q_x), then sum over blocks of sumi * (d_w * d_x)."""
    blk = data.reshape(rows, cols // QK, BLOCK_BYTES)
    dw = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qw = np.concatenate([blk[..., 2:] & 15, blk[..., 2:] >> 4], axis=-1).astype(np.int64) - 8
    return vec_dot_ref(qw, dw, x)


# ---- numba kernels ------------------------------------------------------------------------
# The block loops work on 2-D/3-D views indexed by loop variables, which compile to
# contiguous vector loads. No fastmath in quantize/dequantize: it would allow FMA and break
# byte-identity.


@numba.njit(cache=True, nogil=True)
def _quantize_rows(w, out, bad, r0, r1):
    # Rows r0..r1-1 of w (float32) into out (rows, nb, 18).
    nb = w.shape[1] // 32
    # 32, computed so LLVM cannot see it: a constant 32-long loop is fully unrolled into
    # scalar code (numba runs no SLP vectorizer); a run-time trip count gets vectorized.
    qk = w.shape[1] // nb
    half = qk // 2
    for r in range(r0, r1):
        bad[r] = -1
        for b in range(nb):
            c0 = b * 32
            # The first largest |x|: the bits of |x| (sign cleared) order like the floats,
            # and int32 max/min reductions vectorize where float ones (without fastmath)
            # do not. The smallest index wins a tie, as numpy's argmax; all zeros give x[0].
            amax = np.int32(0)
            for j in range(qk):
                a = np.float32(abs(w[r, c0 + j])).view(np.int32)
                amax = a if a > amax else amax
            if amax >= np.int32(0x7F800000):  # |bits| of NaN/inf (checks_finite: no scan before)
                bad[r] = NONFINITE_ROW
                break
            first = np.int32(32)
            for j in range(qk):
                a = np.float32(abs(w[r, c0 + j])).view(np.int32)
                cand = np.int32(j) if a == amax else np.int32(32)
                first = cand if cand < first else first
            d = w[r, c0 + first] / np.float32(-8.0)
            if not (abs(d) < np.float32(65520.0)):
                if bad[r] < 0:
                    bad[r] = b
                continue
            idd = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            h = f32_to_f16_bits(d)
            out[r, b, 0] = np.uint8(h & 0xFF)
            out[r, b, 1] = np.uint8(h >> 8)
            for j in range(half):  # 16, a run-time bound (see qk)
                t0 = np.floor(w[r, c0 + j] * idd + np.float32(8.5))
                t1 = np.floor(w[r, c0 + half + j] * idd + np.float32(8.5))
                # floor == trunc on the valid range (t >= 0); inf and NaN become 0 like numpy's cast
                t0 = min(t0, np.float32(15.0)) if (t0 >= 0 and t0 < 256) else np.float32(0.0)
                t1 = min(t1, np.float32(15.0)) if (t1 >= 0 and t1 < 256) else np.float32(0.0)
                out[r, b, 2 + j] = np.uint8(t0 + np.float32(16.0) * t1)


def _quantize_kernel(w, out, bad):
    # Python threads over ~64K-weight row ranges, not a parallel=True driver: as fast, and a cold
    # start compiles _quantize_rows once (see families.parallel_rows).
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, out, bad)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, lut, idx, out, k0, k1, half):
    # Rows idx[k0:k1] of blocks (rows, nb, 18) into out[k0:k1]. Direct 3-D indexing and a
    # trip count `half` known only at run time: numba runs no SLP vectorizer, and constant
    # 16-long loops get fully unrolled into scalar code; this way the loop vectorizer
    # makes packed converts and multiplies. The nibble split is done in float (exact).
    nb = blocks.shape[1]
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = lut[np.int32(blocks[r, b, 0]) | (np.int32(blocks[r, b, 1]) << 8)]
            for j in range(half):
                v = np.float32(blocks[r, b, 2 + j])
                hi = np.floor(v * np.float32(0.0625))
                lo = v - np.float32(16.0) * hi
                out[k, b * 32 + j] = (lo - np.float32(8.0)) * d
                out[k, b * 32 + 16 + j] = (hi - np.float32(8.0)) * d


def _dequantize_kernel(blocks, lut, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, lut, idx, out, tail=(16,))


# ---- fast qmatmul: row tiles (see _qtiles.py for why) ----------------------------------------
# prepare() repacks the nibbles into tiles of T rows. Unit k (0..7) of a block is the
# little-endian uint16 of ggml bytes qs[2k], qs[2k+1], so one word holds four weights:
#     bits 0-3: element 2k    bits 4-7: element 2k+16    bits 8-11: element 2k+1    bits 12-15: element 2k+17
#     q[tile, block, k, t]  uint16     d[tile, block, t]  float32     (and m for Q4_1, below)
# The same bytes, regrouped: 0.5 byte per weight plus 4 bytes of float32 scale per block
# (8 for Q4_1). Q4_1 uses these tiles and kernels too, with its minimums in m; Q4_0 passes
# an empty m and the kernels use m = -8*d.
#
# Mode "q8_0" (_tiles_dot_q8): the integer dot of ggml. Nibbles (0..15) times activation
# quants (|q| <= 127) summed over the 16 low or the 16 high nibbles of a block stay within
# int16 (16*15*127 = 30480), so the inner loop runs in int16 lanes: 16 rows per vector,
# vpsrlw/vpand to split nibbles, vpmullw/vpaddw; everything in the loop is 16 bits wide
# so LLVM picks 16 lanes (a single 32-bit value in the loop halves that). The exact block
# sums go through a small buffer to a scale pass in float32, G blocks at a time:
#     out[r] += d*(dx*sumi) + m*sx       (Q4_0: m*sx = -8*d*dx*sum(q_x), i.e. ggml's q-8)
# Mode "f32" (_tiles_dot_f32): the nibbles are split in float (f = word as float, hi =
# floor(f/4096), ...): that vectorizes in 8 float lanes, where integer ops on uint16 would
# be promoted to int64 by numba. Four partial sums per row hide the FMA latency.
# The scale pass loops over TT = T taken from an array shape: with a compile-time 32 LLVM
# unrolls it into 32 scalar lines instead of vectorizing it.
# From BLAS_MIN_ROWS activation rows on, both modes go to sgemm on tiles dequantized to
# float32 (_qtiles.blas_matmul); mode "q8_0" then multiplies the dequantized activation
# quants d_x*q_x, exact in float32 like the weights d*q, so only the summation order differs.


H = T // 2  # rows per int16 vector (16 lanes of a 256-bit register)


def tile_nibbles(data: np.ndarray, rows: int, cols: int, block_bytes: int):
    """ggml nibble blocks -> (q, d, m) tiles; m is None unless the block has one (Q4_1)."""
    blk = data.reshape(rows, cols // QK, block_bytes)
    lut = fp16_table()
    d = lut[blk[:, :, 0].astype(np.uint16) | (blk[:, :, 1].astype(np.uint16) << 8)]
    m = None
    if block_bytes == 20:
        m = lut[blk[:, :, 2].astype(np.uint16) | (blk[:, :, 3].astype(np.uint16) << 8)]
    q = tile_units(blk, rows, block_bytes - 16, 2).view("<u2").astype(np.uint16, copy=False)[..., 0]
    return q, to_tiles(d, rows), (None if m is None else to_tiles(m, rows))


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _tiles_dot_q8(q, d, m, qx, dx, sx, out, tl0, tl1):
    # q (tiles, nbp, 8, T) uint16; qx (nbp, 32) int16 activation quants; dx, sx (nbp,)
    # float32: activation scale and the per-block term multiplied by m (Q4_0: 8*dx*sum(q_x),
    # used as -d*sx). out (tiles*T,), the sums accumulated in place (np.zeros compiled ~0.5 s cold).
    # lo and hi stay np.empty here: as views of a scratch argument (LLVM then cannot rule out that they
    # alias q) the int16 loop ran 4.4x slower.
    tiles, nbp = q.shape[0], q.shape[1]
    has_m = m.shape[0] > 0
    qf = q.reshape(tiles * nbp, 8 * T)
    df = d.reshape(tiles * nbp, T)
    mf = m.reshape(m.shape[0] * m.shape[1], T)
    TT = out.shape[0] // tiles
    # Tiles tl0..tl1-1, on Python threads (families.parallel_rows, ~1M weights per range): a parallel=True
    # driver compiled ~2x slower cold for the same speed.
    for tl in range(tl0, tl1):
        acc = out[tl * TT : tl * TT + TT]
        acc[:] = 0
        lo = np.empty((G, TT), np.int16)
        hi = np.empty((G, TT), np.int16)
        for b0 in range(0, nbp, G):
            for g in range(G):
                b = b0 + g
                k = tl * nbp + b
                # Two 16-row halves side by side: one int16 vector each, sharing every
                # broadcast activation value (a loop over all 32 rows made LLVM hoist the
                # 32 broadcasts out of it and spill them).
                for t in range(H):
                    a0 = np.int16(0)
                    a1 = np.int16(0)
                    a2 = np.int16(0)
                    a3 = np.int16(0)
                    c0 = np.int16(0)
                    c1 = np.int16(0)
                    c2 = np.int16(0)
                    c3 = np.int16(0)
                    for u in range(8):
                        x0, x1, x2, x3 = qx[b, 2 * u], qx[b, 2 * u + 16], qx[b, 2 * u + 1], qx[b, 2 * u + 17]
                        v = qf[k, u * T + t]
                        a0 = np.int16(a0 + np.int16(v & 15) * x0)
                        a1 = np.int16(a1 + np.int16((v >> 4) & 15) * x1)
                        a2 = np.int16(a2 + np.int16((v >> 8) & 15) * x2)
                        a3 = np.int16(a3 + np.int16(v >> 12) * x3)
                        v = qf[k, u * T + H + t]
                        c0 = np.int16(c0 + np.int16(v & 15) * x0)
                        c1 = np.int16(c1 + np.int16((v >> 4) & 15) * x1)
                        c2 = np.int16(c2 + np.int16((v >> 8) & 15) * x2)
                        c3 = np.int16(c3 + np.int16(v >> 12) * x3)
                    lo[g, t] = np.int16(a0 + a2)
                    hi[g, t] = np.int16(a1 + a3)
                    lo[g, H + t] = np.int16(c0 + c2)
                    hi[g, H + t] = np.int16(c1 + c3)
            k = tl * nbp + b0
            c0, c1, c2, c3 = dx[b0], dx[b0 + 1], dx[b0 + 2], dx[b0 + 3]
            o0, o1, o2, o3 = sx[b0], sx[b0 + 1], sx[b0 + 2], sx[b0 + 3]
            if has_m:
                for t in range(TT):
                    i0 = np.float32(lo[0, t]) + np.float32(hi[0, t])
                    i1 = np.float32(lo[1, t]) + np.float32(hi[1, t])
                    i2 = np.float32(lo[2, t]) + np.float32(hi[2, t])
                    i3 = np.float32(lo[3, t]) + np.float32(hi[3, t])
                    f0 = df[k, t] * (c0 * i0) + mf[k, t] * o0
                    f1 = df[k + 1, t] * (c1 * i1) + mf[k + 1, t] * o1
                    f2 = df[k + 2, t] * (c2 * i2) + mf[k + 2, t] * o2
                    f3 = df[k + 3, t] * (c3 * i3) + mf[k + 3, t] * o3
                    acc[t] += (f0 + f1) + (f2 + f3)
            else:
                for t in range(TT):
                    i0 = np.float32(lo[0, t]) + np.float32(hi[0, t])
                    i1 = np.float32(lo[1, t]) + np.float32(hi[1, t])
                    i2 = np.float32(lo[2, t]) + np.float32(hi[2, t])
                    i3 = np.float32(lo[3, t]) + np.float32(hi[3, t])
                    f0 = df[k, t] * (c0 * i0 - o0)
                    f1 = df[k + 1, t] * (c1 * i1 - o1)
                    f2 = df[k + 2, t] * (c2 * i2 - o2)
                    f3 = df[k + 3, t] * (c3 * i3 - o3)
                    acc[t] += (f0 + f1) + (f2 + f3)


@numba.njit(cache=True, parallel=True, fastmath=FASTMATH)
def _tiles_dot_f32(q, d, m, x, xs, out):
    # x (nbp*32,) float32, zero-padded; xs (nbp,) its block sums (Q4_0: times -8 via m = -8d).
    tiles, nbp = q.shape[0], q.shape[1]
    has_m = m.shape[0] > 0
    qf = q.reshape(tiles * nbp, 8 * T)
    df = d.reshape(tiles * nbp, T)
    mf = m.reshape(m.shape[0] * m.shape[1], T)
    xb = x.reshape(nbp, QK)
    TT = out.shape[0] // tiles
    for tl in numba.prange(tiles):
        acc = np.zeros(TT, np.float32)
        s = np.empty((G, TT), np.float32)
        for b0 in range(0, nbp, G):
            for g in range(G):
                b = b0 + g
                k = tl * nbp + b
                for t in range(T):
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    s2 = np.float32(0.0)
                    s3 = np.float32(0.0)
                    for u in range(8):
                        f = np.float32(qf[k, u * T + t])
                        n3 = np.floor(f * np.float32(1 / 4096))
                        r = f - np.float32(4096) * n3
                        n2 = np.floor(r * np.float32(1 / 256))
                        r = r - np.float32(256) * n2
                        n1 = np.floor(r * np.float32(1 / 16))
                        n0 = r - np.float32(16) * n1
                        s0 += n0 * xb[b, 2 * u]
                        s1 += n1 * xb[b, 2 * u + 16]
                        s2 += n2 * xb[b, 2 * u + 1]
                        s3 += n3 * xb[b, 2 * u + 17]
                    s[g, t] = (s0 + s1) + (s2 + s3)
            k = tl * nbp + b0
            o0, o1, o2, o3 = xs[b0], xs[b0 + 1], xs[b0 + 2], xs[b0 + 3]
            if has_m:
                for t in range(TT):
                    f0 = df[k, t] * s[0, t] + mf[k, t] * o0
                    f1 = df[k + 1, t] * s[1, t] + mf[k + 1, t] * o1
                    f2 = df[k + 2, t] * s[2, t] + mf[k + 2, t] * o2
                    f3 = df[k + 3, t] * s[3, t] + mf[k + 3, t] * o3
                    acc[t] += (f0 + f1) + (f2 + f3)
            else:
                for t in range(TT):
                    f0 = df[k, t] * (s[0, t] - np.float32(8) * o0)
                    f1 = df[k + 1, t] * (s[1, t] - np.float32(8) * o1)
                    f2 = df[k + 2, t] * (s[2, t] - np.float32(8) * o2)
                    f3 = df[k + 3, t] * (s[3, t] - np.float32(8) * o3)
                    acc[t] += (f0 + f1) + (f2 + f3)
        for t in range(TT):
            out[tl * TT + t] = acc[t]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _dequant_tiles(q, d, m, mf, t0, t1, wt, b0, b1):
    # Blocks b0..b1-1 of tiles t0..t1-1 -> rows b*32..b*32+31 of wt (padded cols, (t1-t0)*T), W.T:
    # per weight column a contiguous run of T floats per tile. Blocks outer, tiles inner: a thread
    # fills whole rows of wt in order (tiles outer wrote 128 bytes to every row, i.e. every page, of
    # the buffer per tile: 8x slower once the buffer is larger than the caches).
    # w = n*d + mf*m: Q4_1 passes its m and mf = 1, Q4_0 its d as m and mf = -8 (q - 8); n*d and mf*m
    # are exact in float32 (4-bit times 11-bit mantissas), so fused or not the sum rounds once.
    # Indexing wt3[e, i, t] rather than wt[e, i*T + t] (one negative-index check per element turned
    # the stores scalar). Constant shifts on uint16, truncated back to uint16, stay 16 bits wide; one
    # store stream per loop ran 2x faster than four. TT and U come from array shapes, not constants:
    # constant 32- and 8-long loops got fully unrolled into scalar code (and compiled for seconds),
    # run-time bounds get vectorized.
    TT = d.shape[2]
    U = q.shape[2]
    wt3 = wt.reshape(wt.shape[0], t1 - t0, TT)
    for b in range(b0, b1):
        for i in range(t1 - t0):
            tl = t0 + i
            for u in range(U):
                e = b * QK + 2 * u
                for t in range(TT):
                    n = np.uint16(q[tl, b, u, t] & np.uint16(15))
                    wt3[e, i, t] = np.float32(n) * d[tl, b, t] + mf * m[tl, b, t]
                for t in range(TT):
                    n = np.uint16((q[tl, b, u, t] >> np.uint16(4)) & np.uint16(15))
                    wt3[e + 16, i, t] = np.float32(n) * d[tl, b, t] + mf * m[tl, b, t]
                for t in range(TT):
                    n = np.uint16((q[tl, b, u, t] >> np.uint16(8)) & np.uint16(15))
                    wt3[e + 1, i, t] = np.float32(n) * d[tl, b, t] + mf * m[tl, b, t]
                for t in range(TT):
                    n = np.uint16(q[tl, b, u, t] >> np.uint16(12))
                    wt3[e + 17, i, t] = np.float32(n) * d[tl, b, t] + mf * m[tl, b, t]


def dequant_tiles(prep: Prepared, t0: int, t1: int, wt: np.ndarray, serial: bool = False) -> None:
    """Tiles [t0, t1) of a Q4_0/Q4_1 Prepared as W.T into wt (the BLAS path); `serial`: on this thread,
    else ranges of blocks on the threads (families.parallel_rows: one cached nogil kernel for both, where
    a parallel=True driver cost a cold start ~3 s more)."""
    has_m = prep.m.shape[0] > 0
    args = (prep.q, prep.d, prep.m if has_m else prep.d, np.float32(1 if has_m else -8), t0, t1, wt)
    if serial:
        _dequant_tiles(*args, 0, prep.nbp)
    else:
        parallel_rows(_dequant_tiles, prep.nbp, QK * (t1 - t0) * T, *args, weights=1 << 18)


def lut_prepared(prep: Prepared):
    """Q4_0's (Q4_1's) Prepared as plugins/_i4dot.py's LutPrepared (IQ4_NL's layout with the table -8..7,
    Q4_1's with 0..15 and its 20-byte blocks), made on first use and kept in prep.lut."""
    if prep.lut is None:
        from . import _i4dot

        has_m = prep.m.shape[0] > 0
        layout = np.array([20, 4, 0] if has_m else [BLOCK_BYTES, 2, 0], np.int64)
        table = np.arange(0, 16) if has_m else np.arange(-8, 8)
        prep.lut = _i4dot.LutPrepared(prep.rows, prep.cols, np.asarray(prep.raw).reshape(-1), layout,
                                      table.astype(np.int8), prep.d, None)
    return prep.lut


def nibble_matvec_fn(prep: Prepared, mode: str):
    """Format.matvec_fn of Q4_0 and Q4_1: one row as nibble_qmatmul takes it in mode q8_0 with the int8
    paths (_i4dot's decode; Q4_1 with its term), or None."""
    if mode != "q8_0" or _i8gemm.PATH == "portable":
        return None
    from . import _i4dot

    if _i4dot.takes_prefill(1, _i4dot.PATH):
        return None
    return _i4dot.matvec_fn(lut_prepared(prep), m=prep.m if prep.m.shape[0] > 0 else None)


def nibble_qmatmul(prep: Prepared, x: np.ndarray, mode: str, tag: str) -> np.ndarray:
    """x (n, cols) float32 @ W.T for Q4_0 (prep.m empty) or Q4_1 tiles."""
    n = x.shape[0]
    nbp = prep.nbp
    has_m = prep.m.shape[0] > 0
    kind = "q4_1" if has_m else "q4_0"
    if mode == "q8_0" and _i8gemm.PATH != "portable":
        from . import _i4dot  # here, not at the top: it imports Q8_0's module (see test_lazy_loading)

        # Q4_0 is IQ4_NL's layout with the table -8..7: _i4dot's decode (vpshufb + int8 dot products
        # across 32 weight rows) measured ~1.7x faster than _tiles_dot_q8's int16 lanes. Q4_1 too, with
        # the table 0..15 (its bytes: 20 per block, nibbles from byte 4), plus ggml's Q8_1 term
        # sum_b m_b * s_b, in the kernel (one FMA per block and 16 rows on the m tiles); and a cold start
        # then compiles no _tiles_dot_q8 (2.4 s on a busy machine). That term as a numpy matmul over the
        # m tiles after the kernel, (n, nbp) @ (nbp, T) per tile, on one thread, with the activations
        # quantized a second time for their sums, cost ~0.6-0.8 ms at 11008 x 4096: ~40% of the decode.
        # The decode also beats _i8gemm's prefill kinds "q4_0"/"q4_1" (activation rows in lanes, the
        # weights broadcast from the ggml bytes) up to _i4dot.MIN_ROWS: 11008 x 4096, 2 threads, the
        # AVX-512 Xeon under load, decode / prefill time: zmm n = 4 0.36-0.37, n = 8 0.47-0.58, n = 12
        # 0.82-0.83; the AVX2 path forced on it n = 4 0.57-0.61, n = 8 0.93-1.03.
        if _i4dot.PATH != "portable" and not _i4dot.takes_prefill(n, _i4dot.PATH):
            return _i4dot.qmatmul(lut_prepared(prep), x, mode, tag, m=prep.m if has_m else None)
    if _i8gemm.takes(kind, n, mode):
        return _i8gemm.qmatmul_q8(kind, prep, x, tag)
    if mode == "q8_0":
        d16, s16, qx = quantize_activations(x, with_sum=has_m, tag=tag)
        lut = fp16_table()
        dx = pad_blocks(lut[d16], nbp)
        if n >= BLAS_MIN_ROWS:
            # sum_j (d q_j + m) * (dx qx_j) by sgemm on exact float products; then ggml's
            # Q8_1 term uses the fp16 s rather than dx*sum(qx): add m * (s - dx*sum(qx)).
            xt = (qx.astype(np.float32) * lut[d16][:, :, None]).reshape(n, prep.cols)
            out = blas_matmul(dequant_tiles, prep, xt)
            if has_m:
                nb = prep.cols // QK
                e = lut[s16] - lut[d16] * qx.astype(np.float32).sum(-1)
                mt = np.moveaxis(prep.m, 2, 1).reshape(-1, nbp)[: prep.rows, :nb]
                out += e @ mt.T
            return out
        qxp = pad_blocks(qx.astype(np.int16), nbp)
        if has_m:
            sx = pad_blocks(lut[s16], nbp)
        else:
            sx = dx * np.float32(8) * qxp.sum(-1, dtype=np.int32).astype(np.float32)
        out = np.empty((n, prep.tiles * T), np.float32)
        for i in range(n):
            parallel_rows(_tiles_dot_q8, prep.tiles, nbp * QK * T, prep.q, prep.d, prep.m, qxp[i], dx[i], sx[i], out[i],
                          weights=1 << 20)
        return out[:, : prep.rows]
    if n >= BLAS_MIN_ROWS:
        # W.T tiles, one sgemm NN per thread (see _qtiles.blas_matmul). Rows dequantized from the bytes
        # by vpshufb (_i4dot.blas_rows, as IQ4_NL) fill faster but feed an NT sgemm: n=128 on 11008x4096,
        # 16 interleaved rounds, 1.02x float32 against 0.97x here; a cold start compiles _dequant_tiles
        # (1.1-1.4 s) for it.
        return blas_matmul(dequant_tiles, prep, x)
    xp = pad_cols(x, nbp)
    xs = xp.reshape(n, nbp, QK).sum(-1)
    out = np.empty((n, prep.tiles * T), np.float32)
    for i in range(n):
        # the vector kernel of plugins/_q4simd.py where the CPU has AVX2/AVX-512, else numba's
        if not _q4simd.tiles_dot_f32(prep.q, prep.d, prep.m, xp[i], xs[i], out[i]):
            _tiles_dot_f32(prep.q, prep.d, prep.m, xp[i], xs[i], out[i])
    return out[:, : prep.rows]


# ---- the format ---------------------------------------------------------------------------


class Q4_0(GGMLFormat):
    tag = "Q4_0"
    rows_independent = True  # blocks along a row, nothing tensor-wide
    layout_version = 1
    ggml_type = "Q4_0"
    vec_dot_type = "Q8_0"
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    modes = ("f32", "q8_0")
    max_abs = 524160.0
    range_rule = RULE
    summary = "ggml Q4_0: per 32 weights an fp16 scale d and 4-bit q, w = d*(q-8); gguf-identical bytes"
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # the row kernel's amax flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)

    def prepare(self, data, rows, cols):
        # Tiles of T rows (see "fast qmatmul" above): 0.625 byte per weight, 1.11x the bytes, made on
        # first use by a kernel that reads them (mode f32 decode and batches, the portable paths): the
        # int8 kernels read the referenced bytes themselves (plugins/_i8gemm.py) or their own decode
        # tiles (_i4dot.py).
        blk = np.asarray(data).reshape(rows, cols // QK, BLOCK_BYTES)
        d = to_tiles(fp16_table()[blk[:, :, 0].astype(np.uint16) | (blk[:, :, 1].astype(np.uint16) << 8)], rows)
        return Prepared(rows, cols, lambda: tile_nibbles(data, rows, cols, BLOCK_BYTES)[0], d,
                        np.zeros((0, 0, T), np.float32), data)

    def _qmatmul(self, prep, rows, cols, x, mode):
        return nibble_qmatmul(prep, x, mode, self.tag)

    def matvec_fn(self, prep, rows, cols, mode):
        return nibble_matvec_fn(prep, mode)

    def kernel_path(self, op, n=1, mode="f32"):
        return _i8gemm.qmatmul_path(op, n, mode, "q4_0")


@quantfmt.hookimpl
def register_formats(register):
    register(Q4_0())
