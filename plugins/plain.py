"""F32, F16, BF16: plain float formats, so every tensor of a model names its format the same way.

Layout: the values in row-major order, little-endian; block 1x1.
  F32   4 bytes  IEEE binary32
  F16   2 bytes  IEEE binary16, round-to-nearest-even from float32 (numpy's cast)
  BF16  2 bytes  the top 16 bits of binary32 after round-to-nearest-even (ggml's
        ggml_compute_fp32_to_bf16, as the gguf package does it)
A value that would round to infinity in F16/BF16 is a RangeError, never an inf in a file.
The kernels are numpy: a cast and BLAS is already what these formats can do fastest.
qmatmul converts tiles of rows to float32 and calls BLAS, so W is never materialized whole.
"""

from __future__ import annotations

import numpy as np

import quantfmt
from quantfmt.errors import RangeError
from quantfmt.format import Format

LE_F32 = np.dtype("<f4")
LE_F16 = np.dtype("<f2")
LE_U16 = np.dtype("<u2")
LE_U32 = np.dtype("<u4")


def _range_error(tag: str, w: np.ndarray, ok: np.ndarray, limit: str) -> RangeError:
    r, c = np.argwhere(~ok)[0]
    return RangeError(
        f"{tag}: weight {float(w[r, c])!r} at row {r}, column {c} (matrix shape {w.shape}) is outside the {tag} range ({limit})"
    )


def bf16_from_f32(w: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (uint16), nearest-even; inputs are finite."""
    u = w.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def f32_from_bf16(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << 16).view(np.float32)


class F32(Format):
    tag = "F32"
    block_bytes = 4
    summary = "IEEE float32, unquantized"

    def _quantize(self, w):
        return w.astype(LE_F32, copy=False).reshape(-1).view(np.uint8).copy()

    def _dequantize(self, data, rows, cols):
        return data.view(LE_F32).astype(np.float32).reshape(rows, cols)

    def _get_rows(self, data, rows, cols, idx):
        return data.view(LE_F32).reshape(rows, cols)[idx].astype(np.float32)

    def _qmatmul(self, data, rows, cols, x, mode):
        return x @ data.view(LE_F32).reshape(rows, cols).T


class F16(Format):
    tag = "F16"
    block_bytes = 2
    summary = "IEEE float16 (round-to-nearest-even)"

    def _quantize(self, w):
        h = w.astype(LE_F16)
        ok = np.isfinite(h)
        if not ok.all():
            raise _range_error(self.tag, w, ok, "|w| < 65520")
        return h.reshape(-1).view(np.uint8)

    def _dequantize(self, data, rows, cols):
        return data.view(LE_F16).astype(np.float32).reshape(rows, cols)

    def _get_rows(self, data, rows, cols, idx):
        return data.view(LE_F16).reshape(rows, cols)[idx].astype(np.float32)


class BF16(Format):
    tag = "BF16"
    block_bytes = 2
    summary = "bfloat16 (round-to-nearest-even, as ggml)"

    def _quantize(self, w):
        h = bf16_from_f32(w)
        ok = (h & 0x7F80) != 0x7F80
        if not ok.all():
            raise _range_error(self.tag, w, ok, "|w| < 3.3961e38")
        return h.astype(LE_U16, copy=False).reshape(-1).view(np.uint8)

    def _dequantize(self, data, rows, cols):
        return f32_from_bf16(data.view(LE_U16)).reshape(rows, cols)

    def _get_rows(self, data, rows, cols, idx):
        return f32_from_bf16(data.view(LE_U16).reshape(rows, cols)[idx])


@quantfmt.hookimpl
def register_formats(register):
    register(F32())
    register(F16())
    register(BF16())
