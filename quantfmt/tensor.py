"""QTensor: one named tensor in some format (quantized or plain float), and Model, a set of them.

A QTensor holds its format's bytes (often a zero-copy view of a memory-mapped file)
and its logical shape; all computation is delegated to the format's kernels, with
errors naming the tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from . import errors
from .format import Format
from .plugins import get_format


class QTensor:
    """A tensor stored in a format: name, tag, logical shape, bytes."""

    __slots__ = ("name", "fmt", "shape", "data", "source", "_prepared")

    def __init__(self, name: str, fmt: Format | str, shape, data, *, source: str | None = None):
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.source = source  # the file it came from, for error messages
        self._prepared = None  # the format's kernel-ready form of data, made on first matmul
        with self._context():
            self.data = self.fmt._bytes_input(data, self.shape)

    @classmethod
    def quantize(cls, w, tag: str, name: str = "") -> QTensor:
        """Quantize a float array into a new QTensor of format `tag`."""
        fmt = get_format(tag)
        w = np.asarray(w)
        with errors.context(tensor=name or None):
            data = fmt.quantize(w)
        return cls(name, fmt, w.shape, data)

    def _context(self):
        return errors.context(file=self.source, tensor=self.name or None)

    @property
    def tag(self) -> str:
        return self.fmt.tag

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    def dequantize(self) -> np.ndarray:
        with self._context():
            return self.fmt.dequantize(self.data, self.shape)

    def row(self, i: int) -> np.ndarray:
        with self._context():
            return self.fmt.get_row(self.data, self.shape, i)

    def rows(self, indices) -> np.ndarray:
        with self._context():
            return self.fmt.get_rows(self.data, self.shape, indices)

    def matmul(self, x, mode: str | None = None) -> np.ndarray:
        """`x @ W.T` for x of shape (cols,) or (n, cols), straight on the quantized bytes."""
        with self._context():
            if self._prepared is None:
                rows, cols = self.fmt.matrix_shape(self.shape)
                self._prepared = self.fmt.prepare(self.data, rows, cols)
            return self.fmt.qmatmul(self.data, self.shape, x, mode, prepared=self._prepared)

    def __repr__(self) -> str:
        return f"QTensor({self.name!r}, {self.tag}, shape={self.shape}, {self.nbytes} bytes)"


class Model(Mapping):
    """A mapping from tensor name to QTensor, with the file's metadata.

    `metadata` holds string keys to JSON-able values (model hyperparameters, the recipe
    used, GGUF key-values). Closing releases memory maps; tensors must not be used after.
    """

    def __init__(self, tensors: dict[str, QTensor], metadata: dict | None = None, *, path=None, closers=()):
        self._tensors = dict(tensors)
        self.metadata = dict(metadata or {})
        self.path = path
        self._closers = list(closers)

    def __getitem__(self, name: str) -> QTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise errors.QuantfmtError(f"no tensor named {name!r}", file=self.path) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    def close(self) -> None:
        for c in self._closers:
            c()
        self._closers.clear()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.path!r}, {len(self)} tensors, {self.nbytes} bytes)"
