"""Every error quantfmt raises on purpose.

One base class, QuantfmtError, so callers (and the CLI) can tell a problem with the
input from a bug. An error can carry the file and tensor it concerns; code that knows
them wraps lower layers in `context(file=..., tensor=...)` so the message names them.
"""

from __future__ import annotations

import contextlib


class QuantfmtError(Exception):
    """Base class: a problem with the input, a plugin or a file, reported to the user."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.tensor = tensor

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file))
        if self.tensor is not None:
            where.append(f"tensor {self.tensor!r}")
        return (": ".join(where) + ": " if where else "") + self.message


class UnknownFormatError(QuantfmtError, KeyError):
    """A tag that no loaded plugin provides."""

    __str__ = QuantfmtError.__str__


class ShapeError(QuantfmtError, ValueError):
    """A shape the format cannot take (e.g. columns not a multiple of the block)."""


class DTypeError(QuantfmtError, TypeError):
    """An array of a dtype the operation does not accept."""


class NonFiniteError(QuantfmtError, ValueError):
    """NaN or infinity in weights to be quantized."""


class ByteSizeError(QuantfmtError, ValueError):
    """A byte buffer whose size differs from what tag and shape require."""


class RangeError(QuantfmtError, ValueError):
    """A value (a scale, a weight) that does not fit the format's storage type."""


class RowIndexError(QuantfmtError, IndexError):
    """A row index outside the tensor."""


class UnsupportedModeError(QuantfmtError, ValueError):
    """A qmatmul mode the format does not declare."""


class PluginError(QuantfmtError):
    """A plugin that failed to load or registered something invalid (e.g. a duplicate tag)."""


class FileFormatError(QuantfmtError):
    """A file that is not a valid quantfmt/safetensors/GGUF file, or that cannot be written."""


class OutputExistsError(QuantfmtError):
    """An output path that exists (without --overwrite) or that is the input itself."""


class RecipeError(QuantfmtError):
    """A recipe (name-pattern -> tag rules) that cannot be parsed or applied."""


class WorkerError(QuantfmtError):
    """A worker of a parallel or distributed conversion that died or was lost (killed, out of memory)."""


class OutOfMemoryError(QuantfmtError, MemoryError):
    """A tensor too large to convert in this machine's memory."""


def memory_error(what: str, nbytes: int, **where) -> OutOfMemoryError:
    return OutOfMemoryError(f"not enough memory to {what}: it needs about {nbytes / 2**30:.1f} GiB at once",
                            **where)


@contextlib.contextmanager
def context(*, file: str | None = None, tensor: str | None = None):
    """Fill in the file/tensor of any QuantfmtError raised inside, unless already set."""
    try:
        yield
    except QuantfmtError as e:
        if e.file is None and file is not None:
            e.file = str(file)
        if e.tensor is None and tensor is not None:
            e.tensor = tensor
        raise
