"""quantfmt: pluggable weight-quantization formats keyed by FourCC tags.

Importing this package is cheap (no numba, no plugins loaded); names below are
resolved on first use.

    import quantfmt
    t = quantfmt.QTensor.quantize(w, "Q4_0")
    y = t.matmul(x)
    m = quantfmt.load("model.safetensors", "Q4_0")     # quantize on load
    quantfmt.save(m, "model-q4.safetensors")
"""

from __future__ import annotations

from .hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "QTensor": ("quantfmt.tensor", "QTensor"),
    "Model": ("quantfmt.tensor", "Model"),
    "Format": ("quantfmt.format", "Format"),
    "get_format": ("quantfmt.plugins", "get_format"),
    "formats": ("quantfmt.plugins", "formats"),
    "QuantfmtError": ("quantfmt.errors", "QuantfmtError"),
    "load": ("quantfmt.ops.convert", "load"),
    "save": ("quantfmt.ops.convert", "save"),
    "convert": ("quantfmt.ops.convert", "convert"),
    "compare": ("quantfmt.ops.compare", "compare"),
    "describe": ("quantfmt.ops.inspect", "describe"),
    "verify": ("quantfmt.ops.verify", "verify"),
    "open_model": ("quantfmt.sources", "open_model"),
    "TensorSource": ("quantfmt.tensor", "TensorSource"),
    "Recipe": ("quantfmt.recipe", "Recipe"),
}

__all__ = ["hookimpl", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quantfmt' has no attribute {name!r}")
