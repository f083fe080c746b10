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
- qmatmul is the Format base's: dequantized tiles of rows into BLAS (mode f32 only).
- quantize: only TQ1_0 and TQ2_0, with gguf's numpy quantizer (byte-identical to ggml's
  `quantize_row_tq*_0_ref`). The others raise QuantizerUnavailableError saying why: ggml needs
  an importance matrix for IQ2_XXS, IQ2_XS and IQ1_S; for the rest gguf has no numpy quantizer.

Tags (four characters, see formats.md): an i-quant `IQ<b>_<size>` is `I<b>` + a size code,
XXS -> `XX`, XS -> `XS`, S -> `_S`, M -> `_M` (IQ2_XXS = I2XX, IQ1_M = I1_M); TQ<b>_0 drops the
underscore (TQ10, TQ20); NVFP4 is NVF4 (as MXFP4 is MXF4). Every format also answers to its
ggml name (its alias), so `--rule '*=IQ2_XXS'` and get_format("IQ2_XXS") work too.

gguf is imported on first use, not when the plugin registers (loading plugins stays cheap).
"""

from __future__ import annotations

import numpy as np

import quantfmt
from quantfmt.errors import QuantfmtError, RangeError
from quantfmt.families import BlockFormat

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


class QuantizerUnavailableError(QuantfmtError, NotImplementedError):
    """quantize on a ggml type that quantfmt can read and decode but not produce."""


class GGMLDequantFormat(BlockFormat):
    """A ggml type stored byte for byte and decoded by the gguf package (one instance per type)."""

    modes = ("f32",)
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
        amax = np.abs(w.reshape(w.shape[0], -1, k)).max(axis=-1)
        if not (amax < TQ_MAX_ABS).all():
            r, b = (int(i) for i in np.argwhere(~(amax < TQ_MAX_ABS))[0])
            raise RangeError(
                f"{self.tag}: weights of shape {w.shape}: the block at row {r}, columns {b * k}..{b * k + k - 1} "
                f"has max |w| = {float(amax[r, b]):g}; its fp16 scale d = max |w| must stay below {TQ_MAX_ABS:g}"
            )
        return super()._quantize(w)

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


@quantfmt.hookimpl
def register_formats(register):
    for t in TYPES:
        register(GGMLDequantFormat(*t))
