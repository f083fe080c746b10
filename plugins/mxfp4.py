"""MXFP4 (tag MXF4): OCP microscaling FP4 as ggml stores it, 32 E2M1 values and one E8M0 scale (4.25 bits per weight).

Owns the MXFP4 layout, its numpy reference, its numba kernels and the Format class.

One block = 32 consecutive weights of a row, 17 bytes:

    byte  0      e      E8M0 exponent (uint8)
    bytes 1-16   qs[16] qs[j] = L[j] | (L[j+16] << 4): 4-bit E2M1 codes

    V = kvalues_mxfp4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12), the E2M1
        values doubled (code bit 3 is the sign)
    h(e) = 2**(e - 128), the float32 with bits (e - 1) << 23 for e >= 2, and the subnormals
        2**-128 (bits 0x00200000) for e = 0 and 2**-127 (0x00400000) for e = 1
        (ggml's GGML_E8M0_TO_FP32_HALF: half the E8M0 scale 2**(e-127), matching the doubled V)
    weight w[j] = h(e) * V[L[j]]        (one float32 product, exact)

Quantize (gguf-py's `quants.MXFP4`, byte for byte; ggml's quantize_row_mxfp4_ref):
    amax = max |x|
    e    = 0 if amax == 0, else floor(log2f(amax)) - 2 + 127 converted to uint8 as ggml's
           x86 build does: truncated to int32, low 8 bits kept. For amax < 2**-125 this
           wraps (2**-126 <= amax < 2**-125 gives 255, amax = 2**-149 gives 232); the codes
           then all come out 0 (the block decodes to zeros), as in ggml and gguf.
           floor(log2f(amax)) is computed as floor of log2(amax) in float64 rounded to float32:
           near a power of two float32's log2 rounds up to the integer (amax = 2**k - ulp has
           floor k, not k-1), and this reproduces glibc's log2f and numpy's float32 log2 there
           (checked on every float within 4096 ulps below and 64 above each power of two).
    d    = h(e)
    L[j] = the first i in 0..15 with the smallest |V[i]*d - x[j]| (float32: V[i]*d is exact,
           the difference rounds once; ties go to the lower index, so a zero is code 0, not 8)
    No scale can overflow: every finite block quantizes (no RangeError).

qmatmul: ggml pairs MXFP4 with Q8_0 activations (ggml_vec_dot_mxfp4_q8_0: per block the
integer dot of V[L] with the activation quants, times d_x * h(e)). See plugins/_i4dot.py.
ggml's quantize_mxfp4 ignores importance weights, and so do we.
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.families import GGMLFormat, parallel_rows

from . import _i4dot
from ._ggml import NONFINITE_ROW, QK, has_nonfinite, vec_dot_ref
from ._i4dot import kernel_path, prepare_lut, qmatmul

BLOCK_BYTES = 17
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
_VF = KVALUES.astype(np.float32)

# ---- numpy reference ----------------------------------------------------------------------


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """h(e) = 2**(e-128) as float32, from the E8M0 byte e."""
    e = np.asarray(e, np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


def exponent_ref(amax: np.ndarray) -> np.ndarray:
    """The E8M0 byte e of blocks with max |x| = amax (float32)."""
    with np.errstate(divide="ignore"):
        fl = np.floor(np.log2(amax.astype(np.float64)).astype(np.float32))
    fl = np.where(amax > 0, fl, np.float32(0))
    return np.where(amax > 0, (fl.astype(np.int64) + 125) & 0xFF, 0).astype(np.uint8)


def quantize_ref(w: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(w, np.float32).reshape(-1, QK)
    e = exponent_ref(np.abs(x).max(axis=-1))
    d = e8m0_half(e)
    with np.errstate(over="ignore"):
        errs = np.abs(d[:, None, None] * _VF[None, None, :] - x[:, :, None])
    L = errs.argmin(axis=-1).astype(np.uint8)  # the first of equal errors
    out = np.empty((x.shape[0], BLOCK_BYTES), np.uint8)
    out[:, 0] = e
    out[:, 1:] = L[:, :16] | (L[:, 16:] << 4)
    return out.reshape(-1)


def unpack(data: np.ndarray, rows: int, cols: int):
    """MXFP4 bytes -> (doubled E2M1 values int8 (rows, nb, 32), h(e) float32 (rows, nb))."""
    blk = data.reshape(rows, cols // QK, BLOCK_BYTES)
    L = np.concatenate([blk[..., 1:] & 15, blk[..., 1:] >> 4], axis=-1)
    return KVALUES[L], e8m0_half(blk[..., 0])


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    v, d = unpack(data, rows, cols)
    return (d[..., None] * v.astype(np.float32)).reshape(rows, cols)


def qmatmul_q8_ref(data: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_mxfp4_q8_0: per block sumi = sum(V[L_w] * q_x), then sum over blocks of
    sumi * (d_x * h(e))."""
    v, d = unpack(data, rows, cols)
    return vec_dot_ref(v, d, x)


# ---- numba kernels ------------------------------------------------------------------------
# No fastmath in quantize/dequantize: the error comparisons must round as ggml's do.


@numba.njit(cache=True, inline="always")
def _half(e):
    if e < 2:
        return np.uint32(np.uint32(0x00200000) << np.uint32(e)).view(np.float32)
    return np.uint32(np.uint32(e - 1) << np.uint32(23)).view(np.float32)


@numba.njit(cache=True)
def _quantize_rows(w, out, bad, r0, r1, vf):
    nb = w.shape[1] // 32
    for r in range(r0, r1):
        bad[r] = -1  # an E8M0 scale holds every float32 magnitude
        if has_nonfinite(w[r]):  # (checks_finite: quantize does not scan the tensor first)
            bad[r] = NONFINITE_ROW
            continue
        for b in range(nb):
            c0 = b * 32
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(w[r, c0 + j]))
            e = 0
            if amax > 0:
                fl = np.floor(np.float32(np.log2(np.float64(amax))))
                e = (np.int64(fl) + 125) & 0xFF
            d = _half(e)
            out[r, b, 0] = np.uint8(e)
            for j in range(16):
                lo = 0
                hi = 0
                x0 = w[r, c0 + j]
                x1 = w[r, c0 + 16 + j]
                e0 = abs(vf[0] * d - x0)
                e1 = abs(vf[0] * d - x1)
                for i in range(1, 16):
                    v = vf[i] * d
                    a0 = abs(v - x0)
                    a1 = abs(v - x1)
                    if a0 < e0:
                        e0 = a0
                        lo = i
                    if a1 < e1:
                        e1 = a1
                        hi = i
                out[r, b, 1 + j] = np.uint8(lo | (hi << 4))


@numba.njit(cache=True, parallel=True)
def _quantize_kernel_v(w, out, bad, vf):
    rows = w.shape[0]
    nchunk = max(1, min(rows, rows * w.shape[1] // 65536))
    for c in numba.prange(nchunk):
        _quantize_rows(w, out, bad, c * rows // nchunk, (c + 1) * rows // nchunk, vf)


def _quantize_kernel(w, out, bad):
    _quantize_kernel_v(w, out, bad, _VF)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, vf, idx, out, k0, k1):
    nb = blocks.shape[1]
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = _half(blocks[r, b, 0])
            for j in range(16):
                v = blocks[r, b, 1 + j]
                out[k, b * 32 + j] = d * vf[v & 15]
                out[k, b * 32 + 16 + j] = d * vf[v >> 4]


def _dequantize_kernel_v(blocks, vf, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, vf, idx, out)


def _dequantize_kernel(blocks, lut, idx, out):
    _dequantize_kernel_v(blocks, _VF, idx, out)  # no fp16 here: the scale is E8M0


# ---- the format ---------------------------------------------------------------------------


class MXF4(GGMLFormat):
    tag = "MXF4"
    rows_independent = True  # blocks along a row, nothing tensor-wide
    aliases = ("MXFP4",)
    version = 1
    ggml_type = "MXFP4"
    vec_dot_type = "Q8_0"
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    modes = ("f32", "q8_0")
    max_abs = None  # the E8M0 scale covers all of float32
    range_rule = "none (an E8M0 scale holds every float32 magnitude)"
    summary = "MXFP4 (OCP microscaling): per 32 weights an E8M0 scale and 4-bit E2M1 values; gguf-identical bytes"
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # each row kernel flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)

    def prepare(self, data, rows, cols):
        # the ggml bytes read in place by the int8 kernels (plugins/_i4dot.py), h(e) as float32
        d = e8m0_half(np.asarray(data).reshape(rows, cols // QK, BLOCK_BYTES)[..., 0])
        return prepare_lut(data, rows, cols, block_bytes=BLOCK_BYTES, qoff=1, blocks_per=1, table=KVALUES, d=d,
                           values=lambda: unpack(data, rows, cols))

    def _qmatmul(self, prep, rows, cols, x, mode):
        return qmatmul(prep, x, mode, self.tag)

    def matvec_fn(self, prep, rows, cols, mode):
        # one row as qmatmul takes it in mode q8_0 on the int8 paths: _i4dot's one-row kernel (IQ4_NL's:
        # the same Q8_0 activations, the scale h(e) in prep.d): 576x1536 0.026-0.034 -> 0.014 ms a call
        if mode != "q8_0" or _i4dot.PATH == "portable" or _i4dot.takes_prefill(1, _i4dot.PATH):
            return None
        return _i4dot.matvec_fn(prep)

    def kernel_path(self, op, n=1, mode="f32"):
        return kernel_path(op, n, mode)


@quantfmt.hookimpl
def register_formats(register):
    register(MXF4())
