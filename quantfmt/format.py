"""The kernel contract every format implements, and the checks they all share.

A format is a subclass of `Format` that declares its block geometry and implements
four private kernels on a validated 2-D problem:

    _quantize(w)                     w: float32 (rows, cols), C-contiguous -> uint8 (nbytes,)
    _dequantize(data, rows, cols)    data: uint8 (nbytes,) -> float32 (rows, cols)
    _get_rows(data, rows, cols, idx) idx: int64, in range -> float32 (len(idx), cols)
    _qmatmul(prep, rows, cols, x, mode)  x: float32 (n, cols), C-contiguous -> float32 (n, rows);
                                     prep = prepare(data, rows, cols), the bytes unless overridden

The public methods (quantize, dequantize, get_row(s), qmatmul) do everything else once,
here: dtype and shape checks, non-finite input, byte counts, index bounds, modes,
flattening higher-rank tensors to (prod(leading dims), last dim), and keeping numpy
warnings in. Defaults for _get_rows and _qmatmul work from _dequantize on row groups,
so a new format needs only _quantize and _dequantize to be correct; it overrides the
others to be fast.

Byte layout rule shared by all formats: a tensor's bytes are its row groups in order,
a row group being `block_shape[0]` consecutive rows stored in `row_group_bytes(cols)`
bytes. So rows [r0, r1) of a tensor are one contiguous byte range, whatever the format.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading

import numpy as np

from .errors import (
    ByteSizeError,
    DTypeError,
    NonFiniteError,
    QuantfmtError,
    RangeError,
    RowIndexError,
    ShapeError,
    UnsupportedModeError,
)

# One parallel numba kernel at a time per process. quantfmt runs numba on its workqueue threading
# layer (quantfmt.numba_threads: measured fastest on a busy 2-core machine), which aborts the whole
# process when two Python threads launch parallel kernels at once. Every kernel already uses every
# core, so callers on several threads lose little by taking turns. Reentrant: qmatmul may prepare.
_KERNEL_LOCK = threading.RLock()


@contextlib.contextmanager
def kernel_section():
    """Where this format's numba kernels run: one Python thread at a time, float warnings off (the
    kernels report bad values through quantfmt's errors, not numpy's warnings)."""
    with _KERNEL_LOCK, np.errstate(all="ignore"):
        yield


TAG_RE = re.compile(r"^[A-Z0-9_]{1,4}$")
# A bound on element counts, far above any real tensor, so a hostile header cannot
# make us allocate or loop over absurd sizes.
MAX_ELEMENTS = 1 << 40
# Accepted input dtypes for quantize and qmatmul activations; all computed in float32.
FLOAT_KINDS = (np.float16, np.float32, np.float64)


# Elements per slice of the non-finite scan: its bool temporary stays in the L2 cache, where one
# whole-tensor np.isfinite(w).all() writes (page-faults) a tensor-sized temporary: 2x slower.
FINITE_SCAN_ELEMENTS = 1 << 17


def all_finite(a: np.ndarray) -> bool:
    """True when every value of float array `a` is finite, scanned slice by slice (no full-size temporary)."""
    flat = a.reshape(-1) if a.flags.c_contiguous else np.ravel(a)
    if flat.size <= FINITE_SCAN_ELEMENTS:
        return bool(np.isfinite(flat).all())
    buf = np.empty(FINITE_SCAN_ELEMENTS, np.bool_)
    for a0 in range(0, flat.size, FINITE_SCAN_ELEMENTS):
        part = flat[a0 : a0 + FINITE_SCAN_ELEMENTS]
        if not np.isfinite(part, out=buf[: part.size]).all():
            return False
    return True


#: bad[r] of a row that a checks_finite format's row kernel did not quantize: it holds a NaN or an infinity.
#: Far below every other code the kernels write in `bad` (-1 fine, a block number, -2 - block, REDO = -2).
NONFINITE_ROW = -(1 << 62)


class NonFiniteRows(Exception):
    """Raised by the _quantize of a format with `checks_finite`: its kernels found NaN/inf in `rows` (row
    indices of the 2-D problem, ascending; None: anywhere). Format.quantize turns it into the NonFiniteError
    its own scan would have raised; it never reaches the caller."""

    def __init__(self, rows=None):
        super().__init__("non-finite weights")
        self.rows = rows


def nonfinite_rows(bad: np.ndarray) -> None:
    """Raise NonFiniteRows for the rows r with bad[r] == NONFINITE_ROW, if any."""
    hit = np.flatnonzero(bad == NONFINITE_ROW)
    if hit.size:
        raise NonFiniteRows(hit)


class Format:
    """Base class of every quantization format. Subclass, set the attributes, implement kernels."""

    tag: str = ""
    #: Layout version: bump when the byte layout changes, so old files are not misread.
    layout_version: int = 1
    #: (rows, cols) of one block: (1, 32) = 32 weights along a row; (128, 1) = 128 down a column.
    block_shape: tuple[int, int] = (1, 1)
    #: Bytes one block occupies.
    block_bytes: int = 4
    #: qmatmul modes: "f32" (float activations) always; "q8_0" = activations quantized per
    #: 32 to ggml's Q8_0 and integer dot products.
    modes: tuple[str, ...] = ("f32",)
    #: One line for `quantfmt formats`.
    summary: str = ""
    #: Optional promise checked by the conformance kit (`quantfmt check`): the round-trip
    #: RMSE relative to the RMS of N(0,1) weights stays below this. None = only the kit's
    #: generic bound applies.
    max_rel_rmse: float | None = None
    #: The smallest max |w| that quantize may refuse with a RangeError (a scale that would
    #: overflow its storage type); every tensor with max |w| below it quantizes. None: only
    #: float32's range limits it. The conformance kit probes both sides of it.
    max_abs: float | None = None
    #: The ggml type whose bytes are this format's bytes (its GGUF type), or None: no GGUF form.
    ggml_type: str | None = None
    #: Other names the CLI, recipes and the API accept for this tag (e.g. a ggml name longer
    #: than four characters).
    aliases: tuple[str, ...] = ()
    #: False for a format quantfmt can read, convert and run but not quantize to (a ggml type
    #: whose quantizer needs an importance matrix); it then supplies example_bytes() so the
    #: conformance kit can check everything but quantize.
    can_quantize: bool = True
    #: True when the bytes of any run of whole row groups (block_shape[0] rows each) are the same
    #: whether quantized alone or as part of the tensor, and dequantizing that run's bytes gives its
    #: rows: blocks lie within row groups and nothing tensor-wide (a scale, a codebook, statistics
    #: over rows) enters. Conversion then streams a large tensor a block of rows at a time
    #: (quantfmt.ops.convert), holding one block of float32 instead of the tensor. False by default:
    #: a format that does not declare it is converted whole.
    rows_independent: bool = False
    #: numpy dtype of the values when the bytes ARE a plain array (F32, F16, I64, BOOL, ...), which
    #: QTensor.to_numpy() returns as they are; None for block formats.
    native_dtype: str | None = None
    #: "f" for formats of real-valued weights; "i"/"u"/"b" for integer and bool buffers
    #: (position ids, masks), which recipes never convert: they pass through as they are.
    value_kind: str = "f"
    #: Filled in by the registry: the plugin that registered this format.
    plugin: str = "?"
    #: Weights dequantized per tile by `_blas_tiles` (the default qmatmul): 4 MB of float32.
    #: Larger tiles mean fewer BLAS calls, each with a fixed threading cost; smaller, less memory.
    prefill_tile_elements: int = 1 << 20
    #: True when the format's _quantize finds NaN/inf in float32 weights itself (its row kernels test each
    #: row while it is in L1, and flag it: NONFINITE_ROW / NonFiniteRows) and never reads past them in a
    #: harmful way. quantize then skips its own whole-tensor scan for float32 and float16 input: a
    #: memory-bound single-threaded pass, 10-15% of a fast quantizer's time at 11008x4096 on 2 threads.
    #: The NonFiniteError is the same (first bad value in C order). Any other QuantfmtError that _quantize
    #: raises is first checked against a full scan, so a non-finite value still wins as before.
    #: False by default: a format that does not declare it gets the scan.
    checks_finite: bool = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # `version` was this attribute's name before 0.2: a plugin that still sets it means layout_version.
        if "version" in cls.__dict__ and "layout_version" not in cls.__dict__:
            cls.layout_version = cls.__dict__["version"]

    @property
    def version(self) -> int:
        """The former name of layout_version."""
        return self.layout_version

    # ---- geometry ---------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.block_shape[0] * self.block_shape[1]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size

    def row_group_bytes(self, cols: int) -> int:
        """Bytes of one row group (block_shape[0] rows of `cols` columns)."""
        return cols // self.block_shape[1] * self.block_bytes

    def matrix_shape(self, shape) -> tuple[int, int]:
        """The (rows, cols) a tensor of `shape` is quantized as; ShapeError if it cannot be."""
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise ShapeError(f"{self.tag}: shape {shape!r} is not a tuple of integers") from None
        if not dims:
            if self.block_shape == (1, 1):
                return 1, 1  # a scalar is one value: plain formats store it
            raise ShapeError(f"{self.tag}: a scalar (shape ()) cannot be stored in blocks of "
                             f"{self.block_shape[0]}x{self.block_shape[1]}")
        if any(d < 0 for d in dims):
            raise ShapeError(f"{self.tag}: shape {dims} has a negative dimension")
        if math.prod(dims) > MAX_ELEMENTS:
            raise ShapeError(f"{self.tag}: shape {dims} has more than 2**40 elements")
        cols = dims[-1]
        rows = math.prod(dims[:-1])
        br, bc = self.block_shape
        if cols % bc or rows % br:
            need = []
            if cols % bc:
                need.append(f"the last dimension ({cols}) to be a multiple of {bc}")
            if rows % br:
                need.append(f"the product of the leading dimensions ({rows}) to be a multiple of {br}")
            raise ShapeError(f"{self.tag}: shape {dims} does not fit blocks of {br}x{bc}: needs " + " and ".join(need))
        return rows, cols

    def nbytes(self, shape) -> int:
        rows, cols = self.matrix_shape(shape)
        return rows // self.block_shape[0] * self.row_group_bytes(cols)

    def accepts(self, shape) -> bool:
        try:
            self.matrix_shape(shape)
        except ShapeError:
            return False
        return True

    # ---- public kernels ---------------------------------------------------------------

    def quantize(self, w, quant_weights=None) -> np.ndarray:
        """Quantize a float array to this format's bytes (uint8, 1-D).

        `quant_weights`: importance weights (one per column, as ggml's imatrix) for formats whose
        quantizer takes them (they implement `quantize_weighted`); UnsupportedModeError otherwise."""
        if quant_weights is not None:
            weighted = getattr(self, "quantize_weighted", None)
            if weighted is None:
                raise UnsupportedModeError(f"{self.tag}: this format's quantizer takes no importance weights "
                                           "(quant_weights)")
            with _KERNEL_LOCK:
                return weighted(w, quant_weights)
        w = self._float_input(w, "weights")
        rows, cols = self.matrix_shape(w.shape)
        src = w.reshape(rows, cols)
        # float64 keeps the scan: its range check below must not see NaN/inf first
        in_kernel = self.checks_finite and src.dtype.itemsize <= 4
        if src.size and not in_kernel and not all_finite(src):
            raise self._nonfinite_error(w.shape, src)
        if src.dtype.itemsize > 4 and src.size:  # float64: values past float32's range cannot be stored
            big = np.abs(src) > np.finfo(np.float32).max
            if big.any():
                bad = np.argwhere(big)[0]
                idx = np.unravel_index(int(bad[0]) * cols + int(bad[1]), w.shape)
                raise RangeError(
                    f"{self.tag}: weights of shape {w.shape}: {float(src[bad[0], bad[1]])!r} at index "
                    f"{tuple(int(i) for i in idx)} is beyond float32's range (|w| <= 3.4028235e38), which "
                    "quantfmt computes in"
                )
        w2 = np.ascontiguousarray(src, dtype=np.float32)
        if w2.size == 0:
            return np.zeros(0, np.uint8)
        try:
            with kernel_section():
                out = self._quantize(w2)
        except NonFiniteRows as e:
            raise self._nonfinite_error(w.shape, src, e.rows) from None
        except QuantfmtError:
            if in_kernel and not all_finite(src):  # NaN/inf first, as when the scan ran before the kernel
                raise self._nonfinite_error(w.shape, src) from None
            raise
        expect = self.nbytes(w.shape)
        if out.dtype != np.uint8 or out.ndim != 1 or out.size != expect:
            raise AssertionError(f"{self.tag}._quantize returned {out.dtype}{out.shape}, expected uint8 ({expect},)")
        return out

    def dequantize(self, data, shape) -> np.ndarray:
        """The float32 tensor of `shape` that `data` encodes."""
        shape = tuple(int(d) for d in shape)
        rows, cols = self.matrix_shape(shape)
        data = self._bytes_input(data, shape)
        if rows * cols == 0:
            return np.zeros(shape, np.float32)
        with kernel_section():
            out = self._dequantize(data, rows, cols)
        return out.reshape(shape)

    def get_rows(self, data, shape, indices) -> np.ndarray:
        """Rows `indices` of the (rows, cols) matrix, float32 (len(indices), cols); touches only those rows."""
        rows, cols = self.matrix_shape(shape)
        data = self._bytes_input(data, shape)
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
            raise RowIndexError(f"{self.tag}: row indices must be a 1-D integer array, got {idx.dtype}{idx.shape}")
        idx = idx.astype(np.int64)  # a copy: kernels get a writeable array of their own (one compiled type)
        lo = int(idx.min()) if idx.size else 0
        if idx.size and (lo < -rows or int(idx.max()) >= rows):
            bad = idx[(idx < -rows) | (idx >= rows)][0]
            raise RowIndexError(f"{self.tag}: row {bad} is out of range for a tensor of {rows} rows (shape {shape})")
        if lo < 0:  # negative indices count from the end (a few rows are fetched per token: skip when none)
            idx = np.where(idx < 0, idx + rows, idx)
        if idx.size == 0 or cols == 0:
            return np.zeros((idx.size, cols), np.float32)
        with kernel_section():
            return self._get_rows(data, rows, cols, idx)

    def get_row(self, data, shape, i: int) -> np.ndarray:
        return self.get_rows(data, shape, np.array([i], np.int64))[0]

    def qmatmul(self, data, shape, x, mode: str | None = None, *, prepared=None) -> np.ndarray:
        """`x @ W.T` on the quantized bytes, for x of shape (cols,) or (n, cols).

        `prepared` is what `prepare(data, rows, cols)` returned for these bytes (QTensor
        caches it); without it, the bytes are prepared for this one call.
        """
        rows, cols = self.matrix_shape(shape)
        data = self._bytes_input(data, shape)
        mode = mode or "f32"
        if mode not in self.modes:
            raise UnsupportedModeError(
                f"{self.tag}: qmatmul mode {mode!r} is not supported; this format supports {', '.join(self.modes)}"
            )
        x = self._float_input(x, "activations")
        if x.ndim not in (1, 2) or x.shape[-1] != cols:
            raise ShapeError(
                f"{self.tag}: activations of shape {x.shape} do not fit weights of shape {shape}: "
                f"expected (cols,) or (n, cols) with cols = {cols}"
            )
        # (n, cols), also for cols == 0, where reshape(-1, 0) cannot tell n
        x2 = np.ascontiguousarray(x.reshape(x.shape[0] if x.ndim == 2 else 1, cols), dtype=np.float32)
        if x2.shape[0] == 0 or rows == 0 or cols == 0:
            out = np.zeros((x2.shape[0], rows), np.float32)
        else:
            with kernel_section():
                if prepared is None:
                    prepared = self.prepare(data, rows, cols)
                out = self._qmatmul(prepared, rows, cols, x2, mode)
        return out[0] if x.ndim == 1 else out

    # ---- kernels to implement ---------------------------------------------------------

    def prepare(self, data: np.ndarray, rows: int, cols: int):
        """A kernel-ready form of validated bytes, for repeated qmatmul (e.g. a repacked layout).

        The default is the bytes themselves. A format that repacks returns its own object;
        `_qmatmul` then receives that object in place of the bytes. It must be a pure
        function of the bytes.
        """
        return data

    def _quantize(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _dequantize(self, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
        raise NotImplementedError

    def _get_rows(self, data: np.ndarray, rows: int, cols: int, idx: np.ndarray) -> np.ndarray:
        # Default: dequantize each wanted row's group only.
        br = self.block_shape[0]
        gb = self.row_group_bytes(cols)
        out = np.empty((idx.size, cols), np.float32)
        for k, r in enumerate(idx):
            g = int(r) // br
            out[k] = self._dequantize(data[g * gb : (g + 1) * gb], br, cols)[int(r) - g * br]
        return out

    def _qmatmul(self, data, rows: int, cols: int, x: np.ndarray, mode: str) -> np.ndarray:
        # `data` is what prepare() returned (the bytes, by default).
        return self._blas_tiles(data, rows, cols, x)

    def _blas_tiles(self, data: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
        """x @ W.T by dequantizing tiles of row groups (`prefill_tile_elements` weights) for BLAS.

        The default qmatmul, and what fast formats fall back to for batches, where BLAS on a
        float tile beats a hand-written kernel. `data` is the bytes.
        """
        br = self.block_shape[0]
        gb = self.row_group_bytes(cols)
        step = max(br, self.prefill_tile_elements // max(cols, 1) // br * br)
        out = np.empty((x.shape[0], rows), np.float32)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            w = self._dequantize(data[r0 // br * gb : r1 // br * gb], r1 - r0, cols)
            out[:, r0:r1] = x @ w.T
        return out

    # ---- helpers ----------------------------------------------------------------------

    def _nonfinite_error(self, shape, src: np.ndarray, rows=None) -> NonFiniteError:
        """The NonFiniteError of weights `src` (rows, cols) of `shape`: the first NaN/inf in C order,
        looked for in `rows` (ascending row indices known to hold one) first, else in all of src."""
        cols = src.shape[1]
        at = None
        for r in rows if rows is not None else ():
            c = np.flatnonzero(~np.isfinite(src[int(r)]))
            if c.size:
                at = (int(r), int(c[0]))
                break
        if at is None:
            hit = np.argwhere(~np.isfinite(src))
            if not hit.size:
                raise AssertionError(f"{self.tag}: NaN/inf reported in weights that hold none")
            at = (int(hit[0][0]), int(hit[0][1]))
        idx = np.unravel_index(at[0] * cols + at[1], shape)
        return NonFiniteError(
            f"{self.tag}: weights of shape {shape} hold a non-finite value "
            f"({src[at[0], at[1]]}) at index {tuple(int(i) for i in idx)}"
        )

    def _float_input(self, a, what: str) -> np.ndarray:
        a = np.asarray(a)
        # Any byte order is fine (a big-endian file's floats): computation converts to native float32.
        if a.dtype.newbyteorder("=") not in FLOAT_KINDS:
            raise DTypeError(
                f"{self.tag}: {what} of dtype {a.dtype} (shape {a.shape}) are not accepted: "
                "expected float32, float16 or float64"
            )
        return a

    def _bytes_input(self, data, shape) -> np.ndarray:
        if isinstance(data, np.ndarray):
            if not data.flags.c_contiguous:
                raise ByteSizeError(f"{self.tag}: quantized data for shape {tuple(shape)} must be a contiguous buffer")
            buf = data.reshape(-1).view(np.uint8)
        else:
            try:
                buf = np.frombuffer(data, np.uint8)
            except TypeError:
                raise ByteSizeError(
                    f"{self.tag}: quantized data must be bytes-like or a numpy array, got {type(data).__name__}"
                ) from None
        expect = self.nbytes(shape)
        if buf.size != expect:
            raise ByteSizeError(
                f"{self.tag}: {buf.size} bytes given for shape {tuple(shape)}, which needs {expect} bytes "
                f"({self.bits_per_weight:g} bits per weight, blocks of {self.block_shape[0]}x{self.block_shape[1]})"
            )
        return buf

    def example_bytes(self, shape, rng) -> np.ndarray:
        """Valid bytes of a tensor of `shape` (what the kit checks a format without a quantizer on)."""
        return self.quantize(rng.standard_normal(shape, dtype=np.float32))

    def matvec_fn(self, prepared, rows: int, cols: int, mode: str):
        """Optional: a callable for ONE activation row, `f(x)` with x float32 (1, cols) C-contiguous,
        returning `_qmatmul(prepared, rows, cols, x, mode)` (float32 (1, rows)), or None where the caller
        must take qmatmul instead (which raises the right error, e.g. for non-finite activations).

        For model code that multiplies one token at a time (QTensor.matvec_fn): everything that does
        not depend on x is bound once, and the call runs no checks, so a small matrix costs its kernel
        only. None (the default): no such path, callers use qmatmul."""
        return None

    def kernel_path(self, op: str, n: int = 1, mode: str = "f32") -> str:
        """Which implementation `op` ("qmatmul", "quantize", "dequantize", "get_rows") takes here, for
        `n` activation rows in `mode`: a short name the benchmark prints (e.g. "avx512vnni", "portable",
        "blas-tiles"). Formats with several paths chosen by CPU feature or size override this."""
        if op == "qmatmul" and type(self)._qmatmul is Format._qmatmul:
            return "blas-tiles"
        return "numba"

    def info(self) -> dict:
        """What `quantfmt formats --json` prints for this format."""
        return {
            "tag": self.tag,
            "layout_version": self.layout_version,
            "block_shape": list(self.block_shape),
            "block_bytes": self.block_bytes,
            "bits_per_weight": self.bits_per_weight,
            "modes": list(self.modes),
            "plugin": self.plugin,
            "summary": self.summary,
            "ggml_type": self.ggml_type,
            "aliases": list(self.aliases),
            "max_abs": self.max_abs,
        }

    def __repr__(self) -> str:
        return f"<Format {self.tag} v{self.layout_version} {self.bits_per_weight:g} bpw from {self.plugin}>"
