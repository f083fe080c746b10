"""The ggml types quantfmt stores as they are but has no kernels of its own for (decode through gguf).

Owns one small format per ggml type that the `gguf` package (gguf-py) can dequantize and that no
other built-in format stores: the i-quants IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S,
the ternary TQ1_0 and TQ2_0, and NVFP4. Each one's bytes are ggml's bytes for that type, so a GGUF
tensor of that type opens as a zero-copy view of the file, converts to and from the quantfmt
container unchanged, and writes back to GGUF byte for byte.

Kernels:
- dequantize and get_rows call `gguf.quants.dequantize` on the wanted rows' blocks only. gguf
  decodes every block on its own (no sums across blocks), so decoding a subset of rows gives
  bit for bit the values decoding the whole tensor gives; gguf's results equal ggml's own
  `to_float` bit for bit (checked with ggml's C library, see tests/test_ggml_dequant.py).
  TQ1_0 and TQ2_0 (TernaryFormat) decode with numba kernels of their own instead, serial row
  kernels run over row ranges on quantfmt's threads (families.parallel_rows), whose float32
  values are gguf's bit for bit (same products d * (q - 1); tested on quantized data, random
  blocks and every byte value).
- qmatmul is the Format base's: dequantized tiles of rows into BLAS (mode f32 only). TQ1_0 and
  TQ2_0: one activation row, a dot kernel on the bytes ("dot1"); up to dot_max_n = 8 rows, each
  weight row decoded once into an L1 buffer and dotted with every activation row ("dot"); more,
  per-thread tiles + sgemm (families.tiles_prefill, "tiles+blas-per-thread"), or where that
  cannot run, the base's tiles then BLAS's threads ("blas-tiles").
- quantize: only TQ1_0 and TQ2_0, with a numba kernel that does gguf's numpy quantizer's float32
  operations (gguf's bytes equal ggml's `quantize_row_tq*_0_ref`; the tests compare the kernel
  with both, and `quantize_blocks` keeps gguf's code as the reference). The others raise
  QuantizerUnavailableError saying why: ggml needs an importance matrix for IQ2_XXS, IQ2_XS and
  IQ1_S; for the rest gguf has no numpy quantizer.

Tags (four characters, see formats.md): an i-quant `IQ<b>_<size>` is `I<b>` + a size code,
XXS -> `XX`, XS -> `XS`, S -> `_S`, M -> `_M` (IQ2_XXS = I2XX, IQ1_M = I1_M); TQ<b>_0 drops the
underscore (TQ10, TQ20); NVFP4 is NVF4 (as MXFP4 is MXF4). Every format also answers to its
ggml name (its alias), so `--rule '*=IQ2_XXS'` and get_format("IQ2_XXS") work too.

gguf is imported on first use, not when the plugin registers (loading plugins stays cheap).
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.errors import QuantfmtError, RangeError
from quantfmt.families import BlockFormat, fp16_table, parallel_rows, prefill_path, prefill_threads, tiles_prefill

from ._ggml import f32_to_f16_bits

# Why a format cannot quantize (its `quantizer`): gguf has a numpy quantizer, ggml needs an
# importance matrix, or no numpy quantizer exists.
GGUF, IMATRIX, NONE = "gguf", "imatrix", "none"

#: (ggml name, tag, weights per block, bytes per block, quantizer). Geometry from ggml's
#: type traits (gguf.constants.GGML_QUANT_SIZES, checked by the tests).
TYPES = (
    ("IQ1_S", "I1_S", 256, 50, IMATRIX),
    ("IQ1_M", "I1_M", 256, 56, NONE),
    ("IQ2_XXS", "I2XX", 256, 66, IMATRIX),
    ("IQ2_XS", "I2XS", 256, 74, IMATRIX),
    ("IQ2_S", "I2_S", 256, 82, NONE),
    ("IQ3_XXS", "I3XX", 256, 98, NONE),
    ("IQ3_S", "I3_S", 256, 110, NONE),
    ("TQ1_0", "TQ10", 256, 54, GGUF),
    ("TQ2_0", "TQ20", 256, 66, GGUF),
    ("NVFP4", "NVF4", 64, 36, NONE),
)

# ggml's reference quantizer for IQ1_M and IQ2_S runs without an importance matrix, but
# llama.cpp's llama-quantize refuses these types without one (the result is poor).
_WANTS_IMATRIX = ("IQ1_M", "IQ2_S")

# Where each type keeps its block scale (byte offset of an fp16, or a special layout), for
# example_bytes: everything else in a block is indices and signs, and any bit pattern of them
# decodes to finite values.
_SCALE_AT = {"IQ1_S": 0, "IQ2_XXS": 0, "IQ2_XS": 0, "IQ2_S": 0, "IQ3_XXS": 0, "IQ3_S": 0,
             "TQ1_0": 52, "TQ2_0": 64, "IQ1_M": "nibbles", "NVFP4": "ue4m3"}

#: A TQ block's max |w| must stay below this: its scale d = max |w| is stored as fp16, and 65520
#: rounds to fp16 infinity.
TQ_MAX_ABS = 65520.0


# ---- TQ1_0 / TQ2_0 quantize kernel -------------------------------------------------------------
# gguf's numpy quantizer, operation by operation in float32 (no fastmath): d = max |x| of the block,
# id = 1/d (0 for d == 0), q = roundf(x * id) + 1 in 0..2, roundf being gguf's np_roundf (halves away
# from zero: floor(a) + floor(2 * (a - floor(a))) with the sign of x), then the type's packing.
# TQ1_0 (54 bytes): bytes 0..31 hold q[j], q[32+j], .., q[128+j] as base-3 digits (81, 27, 9, 3, 1),
# bytes 32..47 the same for q[160 + 16m + j], bytes 48..51 q[240 + 4m + j] with (81, 27, 9, 3);
# each digit sum s is stored as (s * 256 + 242) // 243; fp16 d at 52. TQ2_0 (66 bytes): byte
# 32g + j = q[128g + 32m + j] << 2m summed over m = 0..3; fp16 d at 64.


@numba.njit(cache=True)
def _tq_rows(w, out, bad, r0, r1, ternary1):
    nb = w.shape[1] // 256
    q = np.empty(256, np.int32)
    for r in range(r0, r1):
        bad[r] = -1
        for b in range(nb):
            c0 = b * 256
            amax = np.float32(0.0)
            for j in range(256):
                amax = max(amax, abs(w[r, c0 + j]))
            if not amax < np.float32(TQ_MAX_ABS):  # fp16 d would be infinite
                if bad[r] < 0:
                    bad[r] = b
                continue
            idv = np.float32(1.0) / amax if amax != 0 else np.float32(0.0)
            for j in range(256):
                x = w[r, c0 + j] * idv
                a = abs(x)
                fl = np.floor(a)
                v = fl + np.floor(np.float32(2.0) * (a - fl))
                q[j] = np.int32(-v if x < 0 else v) + 1
            o = out[r, b]
            if ternary1:
                for j in range(32):
                    t = q[j] * 81 + q[32 + j] * 27 + q[64 + j] * 9 + q[96 + j] * 3 + q[128 + j]
                    o[j] = np.uint8((t * 256 + 242) // 243)
                for j in range(16):
                    t = q[160 + j] * 81 + q[176 + j] * 27 + q[192 + j] * 9 + q[208 + j] * 3 + q[224 + j]
                    o[32 + j] = np.uint8((t * 256 + 242) // 243)
                for j in range(4):
                    t = q[240 + j] * 81 + q[244 + j] * 27 + q[248 + j] * 9 + q[252 + j] * 3
                    o[48 + j] = np.uint8((t * 256 + 242) // 243)
                at = 52
            else:
                for g in range(2):
                    for j in range(32):
                        k = 128 * g + j
                        o[32 * g + j] = np.uint8(q[k] | (q[k + 32] << 2) | (q[k + 64] << 4) | (q[k + 96] << 6))
                at = 64
            h = f32_to_f16_bits(amax)
            o[at] = np.uint8(h & 0xFF)
            o[at + 1] = np.uint8(h >> 8)


@numba.njit(cache=True, parallel=True)
def _tq_kernel(w, out, bad, ternary1):
    rows = w.shape[0]
    nchunk = max(1, min(rows, rows * w.shape[1] // 16384))  # more work items than threads
    for c in numba.prange(nchunk):
        _tq_rows(w, out, bad, c * rows // nchunk, (c + 1) * rows // nchunk, ternary1)


# ---- TQ1_0 / TQ2_0 decode kernels ----------------------------------------------------------------
# gguf's numpy dequantize, value by value: d = fp16 -> float32 (fp16_table, the same numpy conversion),
# q - 1 as float32 (-1, 0, 1; TQ2_0 also 2), w = d * (q - 1): one float32 product, so the values are
# gguf's (and ggml's to_float) bit for bit, signed zeros and inf/NaN scales included.
# The digits are extracted in float32, where every step is exact (small integers, powers of two):
# numba widens integer arithmetic to int64, whose vectors hold 8 lanes and convert slowly (measured:
# the integer form of these loops compiled mostly to scalar code, 2 G weights/s in the dot kernel).
#   TQ2_0: byte f = sum of q_m 4**m; t_m = floor(f / 4**m), q_m = t_m - 4 t_(m+1).
#   TQ1_0: digit k of byte b is ((b * 3**k) mod 256) * 3 >> 8 (gguf's uint8 product wraps mod 256), that
#          is floor(3 y_k) for the fraction y_k = ((b * 3**k) mod 256) / 256; y_0 = b / 256 and
#          y_(k+1) = frac(3 y_k) = 3 y_k - digit_k (multiples of 1/256 below 3: exact).
# A block's decoder writes d * (q - 1) straight into its 256 outputs: a row of the dequantized matrix,
# or (dot kernel) a row buffer in L1.


@numba.njit(cache=True, nogil=True, inline="always")
def _tq1_decode(blk, lut, o):
    d = lut[np.int32(blk[52]) | (np.int32(blk[53]) << 8)]
    for j in range(32):  # qs[0..31]: weights 32k + j
        y = np.float32(blk[j]) * np.float32(1.0 / 256.0)
        for k in range(5):
            z = np.float32(3.0) * y
            q = np.floor(z)
            y = z - q
            o[32 * k + j] = d * (q - np.float32(1.0))
    for j in range(16):  # qs[32..47]: weights 160 + 16k + j
        y = np.float32(blk[32 + j]) * np.float32(1.0 / 256.0)
        for k in range(5):
            z = np.float32(3.0) * y
            q = np.floor(z)
            y = z - q
            o[160 + 16 * k + j] = d * (q - np.float32(1.0))
    for j in range(4):  # qh[0..3]: weights 240 + 4k + j, four digits
        y = np.float32(blk[48 + j]) * np.float32(1.0 / 256.0)
        for k in range(4):
            z = np.float32(3.0) * y
            q = np.floor(z)
            y = z - q
            o[240 + 4 * k + j] = d * (q - np.float32(1.0))


@numba.njit(cache=True, nogil=True, inline="always")
def _tq2_decode(blk, lut, o):
    d = lut[np.int32(blk[64]) | (np.int32(blk[65]) << 8)]
    for g in range(2):  # weight 128g + 32m + j: bits 2m..2m+1 of qs[32g + j]
        for j in range(32):
            f = np.float32(blk[32 * g + j])
            t1 = np.floor(f * np.float32(0.25))
            t2 = np.floor(f * np.float32(0.0625))
            t3 = np.floor(f * np.float32(0.015625))
            o[128 * g + j] = d * (f - np.float32(4.0) * t1 - np.float32(1.0))
            o[128 * g + 32 + j] = d * (t1 - np.float32(4.0) * t2 - np.float32(1.0))
            o[128 * g + 64 + j] = d * (t2 - np.float32(4.0) * t3 - np.float32(1.0))
            o[128 * g + 96 + j] = d * (t3 - np.float32(1.0))


@numba.njit(cache=True, nogil=True)
def _tq_dequant_rows(blocks, lut, idx, out, k0, k1, ternary1):
    # rows idx[k0..k1-1] of blocks (rows, nb, block bytes) into out[k0..k1-1]
    for k in range(k0, k1):
        r = idx[k]
        for b in range(blocks.shape[1]):
            if ternary1:
                _tq1_decode(blocks[r, b], lut, out[k, b * 256 : (b + 1) * 256])
            else:
                _tq2_decode(blocks[r, b], lut, out[k, b * 256 : (b + 1) * 256])


# ---- TQ1_0 / TQ2_0 dot kernel (small batches) ----------------------------------------------------
# For a few activation rows the weights are read once as bytes (1.7-2 bits a weight) instead of being
# decoded to float32 in memory and read again by BLAS: each row is decoded into a row buffer (16 KiB for
# 4096 columns, in L1) and dotted with each activation row. reassoc lets LLVM split the dot product
# into vector partial sums (the result is x @ dequantize(W).T within float32 rounding, as any BLAS).

_DOT_FAST = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True, fastmath=_DOT_FAST)
def _tq_dot_rows(blocks, lut, x, out, r0, r1, ternary1):
    n, cols = x.shape
    w = np.empty(cols, np.float32)
    for r in range(r0, r1):
        for b in range(blocks.shape[1]):
            if ternary1:
                _tq1_decode(blocks[r, b], lut, w[b * 256 : (b + 1) * 256])
            else:
                _tq2_decode(blocks[r, b], lut, w[b * 256 : (b + 1) * 256])
        for i in range(n):
            xi = x[i]
            s = np.float32(0.0)
            for j in range(cols):
                s += xi[j] * w[j]
            out[i, r] = s


# One activation row (a decoded token): the digits go straight into the dot product, no row buffer.
# sum_j x_j d (q_j - 1) = d (sum_j x_j q_j - sum_j x_j): per weight a multiply-add of x by the digit
# q in 0..3 (no "- 1" and no "* d", which are per block: the block's sums of x are computed once per
# call, xs). Measured on one thread, 11008x4096, against the row-buffer kernel: TQ1_0 9.3 -> 8.9 ms,
# TQ2_0 5.5 -> 4.9 ms (LLVM vectorizes both at 256 bits, its preference on these Xeons).


@numba.njit(cache=True, nogil=True, fastmath=_DOT_FAST)
def _tq_dot1_rows(blocks, lut, x, xs, out, r0, r1, ternary1):
    for r in range(r0, r1):
        acc = np.float32(0.0)
        for b in range(blocks.shape[1]):
            blk = blocks[r, b]
            xb = x[b * 256 : (b + 1) * 256]
            s = np.float32(0.0)
            if ternary1:
                d = lut[np.int32(blk[52]) | (np.int32(blk[53]) << 8)]
                for j in range(32):
                    y = np.float32(blk[j]) * np.float32(1.0 / 256.0)
                    for k in range(5):
                        z = np.float32(3.0) * y
                        q = np.floor(z)
                        y = z - q
                        s += xb[32 * k + j] * q
                for j in range(16):
                    y = np.float32(blk[32 + j]) * np.float32(1.0 / 256.0)
                    for k in range(5):
                        z = np.float32(3.0) * y
                        q = np.floor(z)
                        y = z - q
                        s += xb[160 + 16 * k + j] * q
                for j in range(4):
                    y = np.float32(blk[48 + j]) * np.float32(1.0 / 256.0)
                    for k in range(4):
                        z = np.float32(3.0) * y
                        q = np.floor(z)
                        y = z - q
                        s += xb[240 + 4 * k + j] * q
            else:
                d = lut[np.int32(blk[64]) | (np.int32(blk[65]) << 8)]
                for g in range(2):
                    for j in range(32):
                        f = np.float32(blk[32 * g + j])
                        t1 = np.floor(f * np.float32(0.25))
                        t2 = np.floor(f * np.float32(0.0625))
                        t3 = np.floor(f * np.float32(0.015625))
                        c = 128 * g + j
                        four = np.float32(4.0)
                        s += (xb[c] * (f - four * t1) + xb[c + 32] * (t1 - four * t2) + xb[c + 64] * (t2 - four * t3)
                              + xb[c + 96] * t3)
            acc += d * (s - xs[b])
        out[r] = acc


class QuantizerUnavailableError(QuantfmtError, NotImplementedError):
    """quantize on a ggml type that quantfmt can read and decode but not produce."""


class GGMLDequantFormat(BlockFormat):
    """A ggml type stored byte for byte and decoded by the gguf package (one instance per type)."""

    modes = ("f32",)
    rows_independent = True  # ggml/gguf blocks along a row, nothing tensor-wide
    #: Blocks per call into gguf: bounds gguf's temporaries (measured peak ~4x the decoded
    #: floats: ~9 MB for 2048 blocks of 256) and amortizes its per-call overhead.
    blocks_per_call: int = 2048

    def __init__(self, ggml_name: str, tag: str, qk: int, block_bytes: int, quantizer: str):
        self.ggml_type = ggml_name
        self.tag = tag
        self.aliases = (ggml_name,)
        self.block_shape = (1, qk)
        self.block_bytes = block_bytes
        self.quantizer = quantizer
        self.can_quantize = quantizer == GGUF
        self.max_abs = TQ_MAX_ABS if self.can_quantize else None
        # Ternary weights (one scale, levels -1/0/+1) lose ~80% of N(0,1)'s RMS: a promise above the
        # kit's generic 0.75, measured 0.80 (TQ1_0) and 0.82 (TQ2_0); exact on ternary weights.
        self.max_rel_rmse = 0.85 if self.can_quantize else None
        how = {GGUF: "quantize via gguf", IMATRIX: "no quantizer: needs an importance matrix",
               NONE: "no quantizer"}[quantizer]
        self.summary = f"ggml {ggml_name} (read, convert, dequantize; {how})"

    def _qtype(self):
        from gguf.constants import GGMLQuantizationType

        try:
            return GGMLQuantizationType[self.ggml_type]
        except KeyError:  # gguf releases before the type existed (NVFP4 is recent)
            from importlib.metadata import version

            raise QuantfmtError(f"{self.tag}: the installed gguf package ({version('gguf')}) does not know ggml type "
                                f"{self.ggml_type}; upgrade it (pip install -U gguf)") from None

    def _quantize(self, w):
        if not self.can_quantize:
            raise QuantizerUnavailableError(self.why_no_quantizer())
        # gguf stores d = max |w| of each block as fp16 without a check; infinity is refused here.
        k = self.block_shape[1]
        out = np.empty((w.shape[0], w.shape[1] // k, self.block_bytes), np.uint8)
        bad = np.empty(w.shape[0], np.int64)
        _tq_kernel(w, out, bad, self.ggml_type == "TQ1_0")
        hit = np.flatnonzero(bad >= 0)
        if hit.size:
            r = int(hit[0])
            b = int(bad[r])
            amax = float(np.abs(w[r, b * k : (b + 1) * k]).max())
            raise RangeError(
                f"{self.tag}: weights of shape {w.shape}: the block at row {r}, columns {b * k}..{b * k + k - 1} "
                f"has max |w| = {amax:g}; its fp16 scale d = max |w| must stay below {TQ_MAX_ABS:g}"
            )
        return out.reshape(-1)

    def why_no_quantizer(self) -> str:
        """What quantize says for a type quantfmt cannot quantize."""
        name = self.ggml_type
        if self.quantizer == IMATRIX:
            return (f"{self.tag} ({name}): ggml's {name} quantizer needs an importance matrix, which quantfmt "
                    f"cannot compute yet; quantize with llama.cpp's llama-quantize --imatrix. quantfmt reads, "
                    f"converts and dequantizes {name} tensors.")
        extra = " (it wants --imatrix for this type)" if name in _WANTS_IMATRIX else ""
        return (f"{self.tag} ({name}): no {name} quantizer is available in numpy (the gguf package has none); "
                f"quantize with llama.cpp's llama-quantize{extra}. quantfmt reads, converts and dequantizes "
                f"{name} tensors.")

    def quantize_blocks(self, blocks):
        from gguf.quants import quantize

        # One row per call: gguf loops in Python over groups of 16 rows, so one long row is one call.
        return quantize(np.ascontiguousarray(blocks).reshape(1, -1), self._qtype()).reshape(-1, self.block_bytes)

    def dequantize_blocks(self, blocks):
        from gguf.quants import dequantize

        qtype = self._qtype()
        n, k = blocks.shape[0], self.block_shape[1]
        out = np.empty((n, k), np.float32)
        step = max(1, self.blocks_per_call)
        for b0 in range(0, n, step):
            chunk = np.ascontiguousarray(blocks[b0 : b0 + step])
            out[b0 : b0 + chunk.shape[0]] = dequantize(chunk.reshape(1, -1), qtype).reshape(-1, k)
        return out

    def example_bytes(self, shape, rng: np.random.Generator) -> np.ndarray:
        """Valid bytes of a tensor of `shape` (for tests of a format that cannot quantize): random
        blocks whose scales are finite and modest (|d| in [1e-3, 0.1]), so they decode to finite values."""
        n = self.nbytes(shape) // self.block_bytes
        blk = rng.integers(0, 256, (n, self.block_bytes), dtype=np.uint8)
        d = (rng.uniform(1e-3, 0.1, n) * rng.choice([-1.0, 1.0], n)).astype(np.float16).view(np.uint16)
        at = _SCALE_AT[self.ggml_type]
        if isinstance(at, int):
            blk[:, at : at + 2] = d[:, None].view(np.uint8)
        elif at == "nibbles":
            # IQ1_M: the fp16 scale is the top nibbles of its four uint16 sub-scales (bytes 48-55), low nibble first.
            sc = blk[:, 48:56].copy().view("<u2")
            for i in range(4):
                sc[:, i] = (sc[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
            blk[:, 48:56] = sc.view(np.uint8)
        else:
            # NVFP4: four unsigned E4M3 scales (one per 16 weights); any byte decodes finite.
            blk[:, :4] = rng.integers(0x08, 0x50, (n, 4), dtype=np.uint8)
        return blk.reshape(-1)

    def info(self) -> dict:
        return {**super().info(), "can_quantize": self.can_quantize, "quantizer": self.quantizer}


class TernaryFormat(GGMLDequantFormat):
    """TQ1_0 and TQ2_0: gguf's decoding as numba kernels of their own (bit for bit gguf's values), a dot
    kernel for a few activation rows and per-thread tiles + sgemm for more."""

    #: Up to this many activation rows qmatmul runs the dot kernel; more go to dequantized tiles + sgemm.
    dot_max_n: int = 8

    def __init__(self, *t):
        super().__init__(*t)
        self.ternary1 = self.ggml_type == "TQ1_0"

    def _blocks(self, data, rows, cols):
        return data.reshape(rows, cols // self.block_shape[1], self.block_bytes)

    def _get_rows(self, data, rows, cols, idx):
        out = np.empty((idx.size, cols), np.float32)
        # row ranges on quantfmt's threads (in this thread for a few rows, or on a prefill thread)
        parallel_rows(_tq_dequant_rows, idx.size, cols, self._blocks(data, rows, cols), fp16_table(), idx, out,
                      tail=(self.ternary1,))
        return out

    def _dequantize(self, data, rows, cols):
        return self._get_rows(data, rows, cols, np.arange(rows, dtype=np.int64))

    def _qmatmul(self, data, rows, cols, x, mode):
        blocks, lut = self._blocks(data, rows, cols), fp16_table()
        if x.shape[0] == 1:
            out = np.empty((1, rows), np.float32)
            xs = x.reshape(-1, 256).sum(axis=1, dtype=np.float32)  # per block: sum_j x_j (the "- 1" of q - 1)
            parallel_rows(_tq_dot1_rows, rows, cols, blocks, lut, x[0], xs, out[0], tail=(self.ternary1,))
            return out
        if x.shape[0] <= self.dot_max_n:
            out = np.empty((x.shape[0], rows), np.float32)
            parallel_rows(_tq_dot_rows, rows, cols, blocks, lut, x, out, tail=(self.ternary1,))
            return out
        if prefill_threads():
            # each thread decodes its own tile of rows (the row kernel, on that thread) and runs its own sgemm
            idx, t1 = np.arange(rows, dtype=np.int64), self.ternary1

            def fill(r0: int, r1: int, buf: np.ndarray) -> None:
                _tq_dequant_rows(blocks, lut, idx[r0:r1], buf, 0, r1 - r0, t1)

            return tiles_prefill(fill, rows, cols, x)
        # tiles decoded on all threads (parallel_rows), then BLAS's own threads
        return self._blas_tiles(data, rows, cols, x)

    def kernel_path(self, op, n=1, mode="f32"):
        if op == "qmatmul":
            return "dot1" if n == 1 else "dot" if n <= self.dot_max_n else prefill_path()
        return "numba"


@quantfmt.hookimpl
def register_formats(register):
    for t in TYPES:
        register(TernaryFormat(*t) if t[0] in ("TQ1_0", "TQ2_0") else GGMLDequantFormat(*t))
