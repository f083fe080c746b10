"""QTensor: one named tensor in some format (quantized or plain float), and Model, a set of them.

A QTensor holds its format's bytes (often a zero-copy view of a memory-mapped file)
and its logical shape; all computation is delegated to the format's kernels, with
errors naming the tensor. A reader describes each tensor first as a TensorSource (name,
tag, shape, size, a way to load its bytes); a Model makes the QTensor only when asked
for it, so listing or copying a file's tensors never builds what it does not use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from . import errors
from .format import Format, kernel_section
from .plugins import get_format


class QTensor:
    """A tensor stored in a format: name, tag, logical shape, bytes."""

    __slots__ = ("name", "fmt", "shape", "data", "source", "_prepared", "_rc")

    def __init__(self, name: str, fmt: Format | str, shape, data, *, source: str | None = None):
        with errors.context(file=source, tensor=name or None):
            self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.source = source  # the file it came from, for error messages
        self._prepared = None  # the format's kernel-ready form of data, made on first matmul
        self._rc: tuple[int, int] | None = None  # (rows, cols), with _prepared
        with self._context():
            self.data = self.fmt._bytes_input(data, self.shape)

    @classmethod
    def quantize(cls, w, tag: str, name: str = "", *, quant_weights=None) -> QTensor:
        """Quantize a float array into a new QTensor of format `tag` (with importance weights, one
        per column, for the formats whose ggml quantizer takes them)."""
        fmt = get_format(tag)
        w = np.asarray(w)
        with errors.context(tensor=name or None):
            data = fmt.quantize(w, quant_weights=quant_weights)
        return cls(name, fmt, w.shape, data)

    @classmethod
    def from_numpy(cls, a, name: str = "") -> QTensor:
        """A tensor holding array `a` as it is, in the plain format of its dtype (F32, F16, F64,
        I8..I64, U8..U64, BOOL): for buffers such as position ids, which are not quantized."""
        from .plugins import find_format, formats, plugin_formats

        a = np.asarray(a)
        # The first format of the dtype in registration order is the built-in plain one when that
        # plugin has the dtype (no built-in before it stores plain arrays): look there before
        # loading every plugin.
        plain = find_format("F32")
        builtin = plugin_formats(plain.plugin) if plain is not None else []
        for candidates in (builtin, None):
            for fmt in candidates if candidates is not None else formats().values():
                if fmt.native_dtype is not None and np.dtype(fmt.native_dtype) == a.dtype.newbyteorder("<"):
                    data = np.ascontiguousarray(a, dtype=fmt.native_dtype).reshape(-1).view(np.uint8)
                    return cls(name, fmt, a.shape, data)
        raise errors.DTypeError(f"no plain format stores dtype {a.dtype}", tensor=name or None)

    def to_numpy(self) -> np.ndarray:
        """The values in their own dtype for plain formats (an int64 buffer stays int64); else
        dequantize() (float32)."""
        if self.fmt.native_dtype is not None:
            return self.data.view(self.fmt.native_dtype).reshape(self.shape)
        return self.dequantize()

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
        """`x @ W.T` for x of shape (..., cols): (cols,), (n, cols) or (batch, seq, cols) as model
        code has them, straight on the quantized bytes; the result has shape (..., rows)."""
        rc = self._rc
        if rc is None:
            with self._context():
                rows, cols = rc = self.fmt.matrix_shape(self.shape)
                with kernel_section():
                    self._prepared = self.fmt.prepare(self.data, rows, cols)
                self._rc = rc
        # Fast path, what model code calls per token: float32 (n, cols) C-contiguous activations of a
        # format that keeps Format.qmatmul. It skips what that re-checks on every call and cannot have
        # changed (the bytes were validated when this tensor was made, the shape is cached) and the
        # context manager: ~200 matmuls per decoded SmolLM2 token made that ~20 % of decode time.
        fmt = self.fmt
        if (type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == rc[1]
                and x.shape[0] and rc[0] and x.flags.c_contiguous and type(fmt).qmatmul is Format.qmatmul
                and (mode or "f32") in fmt.modes):
            try:
                with kernel_section():
                    return fmt._qmatmul(self._prepared, rc[0], rc[1], x, mode or "f32")
            except errors.QuantfmtError as e:
                if e.file is None and self.source is not None:
                    e.file = str(self.source)
                if e.tensor is None and self.name:
                    e.tensor = self.name
                raise
        with self._context():
            x = np.asarray(x)
            if x.ndim > 2:
                lead = x.shape[:-1]
                y = self.fmt.qmatmul(self.data, self.shape, x.reshape(-1, x.shape[-1]), mode, prepared=self._prepared)
                return y.reshape(*lead, y.shape[-1])
            return self.fmt.qmatmul(self.data, self.shape, x, mode, prepared=self._prepared)

    def matvec_fn(self, mode: str | None = None):
        """A callable `f(x)` = `self.matmul(x, mode)` for x float32 (1, cols) C-contiguous: the format's
        one-row path (Format.matvec_fn) where it has one, with matmul taking over where that declines
        (so errors are matmul's); matmul itself otherwise. Model code binds it once per weight and
        calls it per token."""
        mode = mode or "f32"
        matmul = self.matmul
        if self._rc is None and len(self.shape) == 2 and self.numel:
            matmul(np.zeros((1, self.shape[1]), np.float32), mode)  # prepares (and checks the mode)
        if self._rc is None or type(self.fmt).qmatmul is not Format.qmatmul or mode not in self.fmt.modes:
            return lambda x: matmul(x, mode)
        with self._context(), kernel_section():
            fast = self.fmt.matvec_fn(self._prepared, self._rc[0], self._rc[1], mode)
        if fast is None:
            return lambda x: matmul(x, mode)

        def f(x):
            y = fast(x)
            return matmul(x, mode) if y is None else y

        return f

    def __repr__(self) -> str:
        return f"QTensor({self.name!r}, {self.tag}, shape={self.shape}, {self.nbytes} bytes)"


@dataclass(frozen=True)
class TensorSource:
    """What a reader knows of a tensor before touching its data, and how to load its bytes."""

    name: str
    tag: str
    shape: tuple[int, ...]
    nbytes: int
    load: Callable[[], object]  # -> the tensor's bytes in its format (e.g. a view of a mapped file)
    file: str | None = None

    def qtensor(self) -> QTensor:
        return QTensor(self.name, self.tag, self.shape, self.load(), source=self.file)

    @classmethod
    def of(cls, t: QTensor, name: str | None = None) -> TensorSource:
        return cls(t.name if name is None else name, t.tag, t.shape, t.nbytes, (lambda: t.data), t.source)


class MissingTensorError(errors.QuantfmtError, KeyError):
    """A tensor name that the model does not hold."""

    __str__ = errors.QuantfmtError.__str__


class Model(Mapping):
    """A mapping from tensor name to QTensor, with the file's metadata.

    `metadata` holds string keys to JSON-able values (model hyperparameters, the recipe
    used, GGUF key-values). Closing releases memory maps; tensors must not be used after.
    """

    def __init__(self, tensors: Mapping[str, QTensor | TensorSource], metadata: dict | None = None, *, path=None,
                 closers=()):
        self._tensors: dict[str, QTensor | TensorSource] = dict(tensors)
        self.metadata = dict(metadata or {})
        self.path = path
        self._closers = list(closers)

    def __getitem__(self, name: str) -> QTensor:
        try:
            t = self._tensors[name]
        except (KeyError, TypeError):
            raise MissingTensorError(f"no tensor named {name!r}", file=self.path) from None
        if isinstance(t, TensorSource):
            t = self._tensors[name] = t.qtensor()
        return t

    def __contains__(self, name) -> bool:
        try:
            return name in self._tensors
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def source(self, name: str) -> TensorSource:
        """What is known of tensor `name` without building it (name, tag, shape, nbytes, load)."""
        t = self._tensors.get(name)
        if t is None:
            raise MissingTensorError(f"no tensor named {name!r}", file=self.path)
        return t if isinstance(t, TensorSource) else TensorSource.of(t, name)

    def sources(self) -> Iterator[TensorSource]:
        """Every tensor as a TensorSource, in order, none built."""
        for name in self._tensors:
            yield self.source(name)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sources())

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
