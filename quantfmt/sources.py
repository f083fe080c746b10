"""Opening any model file, and choosing a writer, by what the path is.

`open_model(path)` sniffs: a folder or *.index.json is a sharded safetensors checkpoint, a
file starting with b"GGUF" is GGUF, anything else a safetensors/quantfmt file. The Model it
returns holds lazy tensor sources over read-only maps. `writer_for(path)` picks the writer
of an output path (GGUF for *.gguf, else the safetensors container); every writer takes the
same streamed tensor plans.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .errors import FileFormatError, context
from .io import safetensors, sharded
from .io.files import TensorPlan, input_files, require_regular

__all__ = ["open_model", "is_gguf", "writer_for", "input_files", "TensorPlan", "RECIPE_KEY"]

RECIPE_KEY = safetensors.RECIPE_KEY


def is_gguf(path) -> bool:
    if Path(path).is_dir():
        return False
    require_regular(path)  # opening a FIFO to sniff it would block
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except IsADirectoryError:
        return False
    except OSError as e:
        raise FileFormatError(f"cannot read: {e.strerror or e}", file=str(path)) from None


def open_model(path, *, gguf_unsupported: str | None = None):
    """Open a model lazily, whatever its kind: safetensors/quantfmt file, sharded checkpoint, or GGUF.

    `gguf_unsupported`: what to do with GGUF tensors of a ggml type no format stores ("error",
    "dequantize"; see quantfmt.io.gguf.read_gguf)."""
    p = Path(path)
    if p.is_dir():
        return sharded.open_directory(p)
    require_regular(p)  # before sniffing: reading a FIFO would block
    if p.name.endswith(".json"):
        return sharded.open_sharded(p)
    if is_gguf(p):
        from .io import gguf

        with context(file=str(p)):
            return gguf.read_gguf(str(p), unsupported=gguf_unsupported)
    return safetensors.open_safetensors(p)


Writer = Callable[..., None]


def writer_for(path) -> Writer:
    """The writer for an output path: `write(path, plans, *, metadata, recipe, overwrite, inputs, progress)`."""
    if str(path).endswith(".gguf"):
        return _write_gguf
    return safetensors.write_safetensors


def _write_gguf(path, plans, *, metadata=None, recipe=None, overwrite=False, inputs=(), progress=None):
    from .io import gguf

    meta = dict(metadata or {})
    if recipe is not None:
        meta[RECIPE_KEY] = recipe
    with context(file=str(path)):
        gguf.write_gguf_plans(str(path), plans, metadata=meta, overwrite=overwrite, inputs=inputs, progress=progress)
