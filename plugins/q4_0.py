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
from quantfmt.format import Format

from ._ggml import (
    QK,
    f32_to_f16_bits,
    first_bad_block,
    fp16_table,
    n_chunks,
    quantize_activations,
    scale_range_error,
    vec_dot_ref,
)

BLOCK_BYTES = 18

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
        raise scale_range_error("Q4_0", w, r, b, "a block's max |w| must stay below 524160 (= 65520*8)")
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


@numba.njit(cache=True)
def _quantize_rows(w, out, bad, r0, r1):
    # Rows r0..r1-1 of w (float32) into out (rows, nb, 18).
    nb = w.shape[1] // 32
    # 32, computed so LLVM cannot see it: a constant 32-long loop is fully unrolled into
    # scalar code (numba runs no SLP vectorizer); a run-time trip count gets vectorized.
    qk = w.shape[1] // nb
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
            for j in range(16):
                t0 = np.floor(w[r, c0 + j] * idd + np.float32(8.5))
                t1 = np.floor(w[r, c0 + 16 + j] * idd + np.float32(8.5))
                # floor == trunc on the valid range (t >= 0); inf and NaN become 0 like numpy's cast
                t0 = min(t0, np.float32(15.0)) if (t0 >= 0 and t0 < 256) else np.float32(0.0)
                t1 = min(t1, np.float32(15.0)) if (t1 >= 0 and t1 < 256) else np.float32(0.0)
                out[r, b, 2 + j] = np.uint8(t0 + np.float32(16.0) * t1)


@numba.njit(cache=True, parallel=True)
def _quantize_kernel(w, out, bad, nchunk):
    rows = w.shape[0]
    for c in numba.prange(nchunk):
        _quantize_rows(w, out, bad, c * rows // nchunk, (c + 1) * rows // nchunk)


@numba.njit(cache=True)
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


@numba.njit(cache=True, parallel=True)
def _dequantize_kernel(blocks, lut, idx, out, nchunk):
    n = idx.size
    for c in numba.prange(nchunk):
        _dequantize_rows(blocks, lut, idx, out, c * n // nchunk, (c + 1) * n // nchunk, 16)


@numba.njit(cache=True, parallel=True, fastmath=True)
def _qmatmul_f32_kernel(blocks, lut, x, out):
    # Straightforward, not tuned: decode a row of weights to float32, dot it with each x.
    rows, nb = blocks.shape[0], blocks.shape[1]
    n = x.shape[0]
    half = x.shape[1] // nb // 2  # 16, opaque to LLVM so the loop vectorizes (see above)
    for r in numba.prange(rows):
        wrow = np.empty(nb * 32, np.float32)
        for b in range(nb):
            d = lut[np.int32(blocks[r, b, 0]) | (np.int32(blocks[r, b, 1]) << 8)]
            for j in range(half):
                v = np.float32(blocks[r, b, 2 + j])
                hi = np.floor(v * np.float32(0.0625))
                lo = v - np.float32(16.0) * hi
                wrow[b * 32 + j] = (lo - np.float32(8.0)) * d
                wrow[b * 32 + 16 + j] = (hi - np.float32(8.0)) * d
        for i in range(n):
            acc = np.float32(0.0)
            for k in range(nb * 32):
                acc += wrow[k] * x[i, k]
            out[i, r] = acc


@numba.njit(cache=True, parallel=True, fastmath=True)
def _qmatmul_q8_kernel(blocks, lut, dx, qx, out):
    # ggml_vec_dot_q4_0_q8_0: integer dot per block, scaled by d_w*d_x, summed in float32.
    # Straightforward, not tuned.
    rows, nb = blocks.shape[0], blocks.shape[1]
    n = qx.shape[0]
    half = qx.shape[2] // 2  # 16, opaque to LLVM so the loop vectorizes
    for r in numba.prange(rows):
        for i in range(n):
            acc = np.float32(0.0)
            for b in range(nb):
                sumi = np.int32(0)
                for j in range(half):
                    v = np.int32(blocks[r, b, 2 + j])
                    lo = (v & 15) - 8
                    hi = (v >> 4) - 8
                    sumi += np.int32(lo * np.int32(qx[i, b, j]) + hi * np.int32(qx[i, b, 16 + j]))
                dw = lut[np.int32(blocks[r, b, 0]) | (np.int32(blocks[r, b, 1]) << 8)]
                acc += np.float32(sumi) * (dw * dx[i, b])
            out[i, r] = acc


# ---- the format ---------------------------------------------------------------------------


class Q4_0(Format):
    tag = "Q4_0"
    version = 1
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    modes = ("f32", "q8_0")
    summary = "ggml Q4_0: per 32 weights an fp16 scale d and 4-bit q, w = d*(q-8); gguf-identical bytes"

    def _quantize(self, w):
        rows, cols = w.shape
        out = np.empty((rows, cols // QK, BLOCK_BYTES), np.uint8)
        bad = np.empty(rows, np.int64)
        _quantize_kernel(w, out, bad, n_chunks(rows, cols))
        hit = first_bad_block(bad)
        if hit is not None:
            raise scale_range_error(self.tag, w, *hit, "a block's max |w| must stay below 524160 (= 65520*8)")
        return out.reshape(-1)

    def _dequantize(self, data, rows, cols):
        return self._get_rows(data, rows, cols, np.arange(rows, dtype=np.int64))

    def _get_rows(self, data, rows, cols, idx):
        out = np.empty((idx.size, cols), np.float32)
        blocks = data.reshape(rows, cols // QK, BLOCK_BYTES)
        _dequantize_kernel(blocks, fp16_table(), idx, out, n_chunks(idx.size, cols))
        return out

    def _qmatmul(self, data, rows, cols, x, mode):
        blocks = data.reshape(rows, cols // QK, BLOCK_BYTES)
        out = np.empty((x.shape[0], rows), np.float32)
        if mode == "q8_0":
            d16, _, qx = quantize_activations(x, with_sum=False, tag=self.tag)
            _qmatmul_q8_kernel(blocks, fp16_table(), fp16_table()[d16], qx, out)
        else:
            _qmatmul_f32_kernel(blocks, fp16_table(), x, out)
        return out


@quantfmt.hookimpl
def register_formats(register):
    register(Q4_0())
