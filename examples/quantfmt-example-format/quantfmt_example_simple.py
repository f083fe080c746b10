"""I8_X: int8 weights with an fp16 scale per 32, as a plugin on quantfmt's simple route.

The whole plugin is two numpy functions on blocks; quantfmt.families.BlockFormat gives the
rest (checks, reshaping, get_rows, qmatmul through BLAS). Compare quantfmt_example_format.py,
the full route with numba kernels.

Layout: blocks of 1x32 weights along a row, 34 bytes each (8.5 bits per weight):
    offset 0, 2 bytes   d: the scale, IEEE fp16, little-endian
    offset 2, 32 bytes  q: int8, two's complement, weight j = d * q[j]
Quantize: d = fp16(max|w| / 127); q = round-half-to-even(w / d) clamped to [-127, 127]
(0 where d is 0). max|w| >= 65520 * 127 would make d infinite: a RangeError (max_abs).
"""

from __future__ import annotations

import numpy as np
import quantfmt
from quantfmt.errors import RangeError
from quantfmt.families import BlockFormat

F16 = np.dtype("<f2")


class I8_X(BlockFormat):
    tag = "I8_X"
    version = 1
    block_shape = (1, 32)
    block_bytes = 34
    max_abs = 65520.0 * 127
    summary = "int8, fp16 scale per 32 (example plugin, simple route)"

    def quantize_blocks(self, blocks):
        amax = np.abs(blocks).max(axis=1)
        if not (amax < self.max_abs).all():
            raise RangeError(f"{self.tag}: a block's max |w| {float(amax.max()):g} reaches {self.max_abs:g}: "
                             "its fp16 scale would be infinite")
        d = (amax / np.float32(127)).astype(F16)
        df = d.astype(np.float32)
        q = np.rint(np.divide(blocks, df[:, None], out=np.zeros_like(blocks), where=df[:, None] > 0))
        q = np.clip(q, -127, 127).astype(np.int8)
        return np.concatenate([d[:, None].view(np.uint8), q.view(np.uint8)], axis=1)

    def dequantize_blocks(self, blocks):
        d = blocks[:, :2].copy().view(F16).astype(np.float32)
        return blocks[:, 2:].view(np.int8) * d


@quantfmt.hookimpl
def register_formats(register):
    register(I8_X())
