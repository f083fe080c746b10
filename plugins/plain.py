"""Plain formats, so every tensor of a model names its format the same way: F32, F16, BF16, and the
buffers models also carry (F64, I8..I64, U8..U64, BOOL: position ids, masks, counters).

Layout: the values in row-major order, little-endian; block 1x1.
  F32   4 bytes  IEEE binary32
  F16   2 bytes  IEEE binary16, round-to-nearest-even from float32 (numpy's cast)
  BF16  2 bytes  the top 16 bits of binary32 after round-to-nearest-even (ggml's
        ggml_compute_fp32_to_bf16, as the gguf package does it)
  F64, I8, I16, I32, I64, U8, U16, U32, U64, BOOL: numpy's <f8, <i1..<i8, <u1..<u8 and 1-byte
        bool (0 or 1). Recipes never convert the integer and bool ones (they pass through byte for
        byte); dequantize gives their values as float32, QTensor.to_numpy() as they are.
A value that would round to infinity in F16/BF16 is a RangeError, never an inf in a file.
F32 and the buffers run on numpy. F16 and BF16 read their bits with _half.py's numba kernels, which
use F16C where the CPU has it (a portable exact path elsewhere): dequantize and get_rows convert in
parallel, bit for bit numpy's astype(float32); qmatmul converts on the fly for a few activation rows
(decode: half the bytes of float32 read once), and converts tiles of rows to float32 for BLAS for more
(prefill: each thread converts its own tiles and multiplies them with a single-threaded sgemm where
numpy's OpenBLAS lets its threads be set, else one tile at a time on BLAS's threads), so W is never
materialized whole. BF16 quantize (the rounding) is one parallel numba pass
(numpy's version needs five passes over temporaries), in _bf16.py.
numba is imported only when a kernel runs (_half.py and _bf16.py are imported on first use): loading
these formats, which every model file has, must not cost a command numba's start-up.
"""

from __future__ import annotations

import sys

import numpy as np

import quantfmt
from quantfmt.errors import RangeError
from quantfmt.families import per_thread_sgemm, prefill_threads, rows_prefill
from quantfmt.format import Format


def _kernels():
    """_half.py, imported on first use (it imports numba)."""
    from . import _half

    return _half

LE_F32 = np.dtype("<f4")
LE_F16 = np.dtype("<f2")
LE_U16 = np.dtype("<u2")
LE_U32 = np.dtype("<u4")


def _range_error(tag: str, w: np.ndarray, ok: np.ndarray, limit: str) -> RangeError:
    r, c = np.argwhere(~ok)[0]
    return RangeError(
        f"{tag}: weight {float(w[r, c])!r} at row {r}, column {c} (matrix shape {w.shape}) "
        f"is outside the {tag} range ({limit})"
    )


def bf16_from_f32_ref(w: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (uint16), nearest-even on the bit pattern (numpy reference).

    uint32 arithmetic cannot wrap: inputs are finite, so u <= 0xFF7FFFFF and u + 0x8000 < 2**32.
    """
    u = w.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def f32_from_bf16(h: np.ndarray) -> np.ndarray:
    """float32 of bf16 bits (numpy reference of the kernels' shift)."""
    return (h.astype(np.uint32) << 16).view(np.float32)


class F32(Format):
    tag = "F32"
    rows_independent = True  # element by element
    block_bytes = 4
    native_dtype = "<f4"
    ggml_type = "F32"
    summary = "IEEE float32, unquantized"

    def _quantize(self, w):
        return w.astype(LE_F32, copy=False).reshape(-1).view(np.uint8).copy()

    def _dequantize(self, data, rows, cols):
        return data.view(LE_F32).astype(np.float32).reshape(rows, cols)

    def _get_rows(self, data, rows, cols, idx):
        return data.view(LE_F32).reshape(rows, cols)[idx].astype(np.float32)

    #: Batches of at most this many activation rows take _half.matvec (four rows per pass, ranges of rows
    #: taken by threads one after another), more go to numpy's sgemm. Measured at 11008x4096, ratio to
    #: numpy `x @ W.T` in the same run, one thread: n=1 0.93-1.08, n=2 0.36-0.43, n=4 0.54-0.59, n=8
    #: 0.65-0.91, n=16 1.01-1.16; two threads on the loaded machine: n=4 0.31-0.34, n=8 0.43-0.50. A
    #: SmolLM2 F32 model decoded at 2-24 tokens/s with numpy's two BLAS threads on a machine shared
    #: with other work (its fixed halves wait for a descheduled thread at every call), 15 with one.
    matvec_max_n: int = 8

    def _qmatmul(self, data, rows, cols, x, mode):
        if sys.byteorder == "little":
            return f32_matmul(data.view(LE_F32).reshape(rows, cols), x, self.matvec_max_n)
        return x @ data.view(LE_F32).reshape(rows, cols).T

    def kernel_path(self, op, n=1, mode="f32"):
        return f32_path(n, self.matvec_max_n) if op == "qmatmul" else "numpy"


def f32_matmul(w: np.ndarray, x: np.ndarray, matvec_max_n: int) -> np.ndarray:
    """x (n, cols) @ w.T for w float32 (rows, cols) in native byte order: F32's kernels (and F64's, on
    its float32 copy)."""
    if x.shape[0] <= matvec_max_n:
        return _kernels().matvec("F32", w, x, np.empty((x.shape[0], w.shape[0]), np.float32))
    if prefill_threads():
        # ranges of rows, one single-threaded sgemm each on the thread that took it, as every
        # format's f32 prefill: numpy's one sgemm on OpenBLAS's threads splits the work in fixed
        # shares, and waits for a descheduled thread at every call on a shared machine
        return rows_prefill(w, x)
    return x @ w.T


def f32_path(n: int, matvec_max_n: int) -> str:
    """kernel_path of f32_matmul for n activation rows."""
    if n <= matvec_max_n:
        return "matvec"
    return f"{per_thread_sgemm()}-per-thread" if prefill_threads() else "blas"


class _HalfFormat(Format):
    """F16 and BF16: 2-byte values whose bits _half.py's kernels convert to float32."""

    #: Batches of at most this many activation rows take the matvec (weights read once, converted on the
    #: fly); more go to tiles converted to float32 for BLAS. Measured at 11008x4096 on the loaded 2-core
    #: Xeon, ratio to float32 BLAS, matvec vs tiles: n=4 0.28 vs 1.12, n=8 0.43 vs 1.29, n=16 0.58 vs
    #: 1.27, n=32 1.08 vs 1.25 (the matvec converts each row once per activation row: it loses from ~32).
    matvec_max_n: int = 16
    #: Weights per prefill tile where tiles go one by one to BLAS's threads (_half.prefill_threads() is 0;
    #: else _half.prefill's per-thread tiles, sized there): 16 MB of float32. Each tile is one sgemm;
    #: fewer, larger calls lose less to BLAS's per-call thread start and to a descheduled BLAS thread on
    #: a busy machine (measured: 256-row tiles of 4096 cols ran 2x slower than 1024-row ones on a loaded
    #: 2-core machine), and a tile this size still sits in the L2/L3 that sgemm streams it from.
    prefill_tile_elements = 1 << 22

    def _bits(self, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
        """The values' bits as native uint16 (rows, cols): a view on little-endian hosts."""
        if sys.byteorder != "little":  # pragma: no cover - numba takes native byte order only
            return data.view(LE_U16).astype(np.uint16).reshape(rows, cols)
        return data.view(np.uint16).reshape(rows, cols)

    def _conversion(self) -> str:
        return "shift" if self.tag == "BF16" else _kernels().path_f16()

    def kernel_path(self, op, n=1, mode="f32"):
        conv = self._conversion()
        if op == "qmatmul":
            if n <= self.matvec_max_n:
                return f"matvec-{conv}"
            if _kernels().prefill_threads():
                return f"tiles-{conv}+{per_thread_sgemm()}-per-thread"
            return f"tiles-{conv}+blas"
        if op in ("dequantize", "get_rows"):
            return conv
        return super().kernel_path(op, n, mode)

    def _dequantize(self, data, rows, cols):
        out = np.empty((rows, cols), np.float32)
        return _kernels().to_f32(self.tag, self._bits(data, rows, cols), np.arange(rows, dtype=np.int64), out)

    def _get_rows(self, data, rows, cols, idx):
        out = np.empty((idx.size, cols), np.float32)
        return _kernels().to_f32(self.tag, self._bits(data, rows, cols), idx, out)

    def _qmatmul(self, data, rows, cols, x, mode):
        w = self._bits(data, rows, cols)
        n = x.shape[0]
        if n <= self.matvec_max_n:
            return _kernels().matvec(self.tag, w, x, np.empty((n, rows), np.float32))
        if _kernels().prefill_threads():
            return _kernels().prefill(self.tag, w, x)
        # Where numpy's BLAS threads cannot be set (not OpenBLAS, not Linux) or on one thread: tiles
        # converted on this thread, each multiplied by BLAS's own threads.
        # out.T's rows are contiguous, so each tile's sgemm writes its result in place (out[:, r0:r1]
        # would be a strided copy); one transposing copy at the end gives the (n, rows) result.
        step = max(1, min(rows, self.prefill_tile_elements // cols))
        tile = np.empty((step, cols), np.float32)
        out_t = np.empty((rows, n), np.float32)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            t = _kernels().tile_to_f32(self.tag, w, np.arange(r0, r1, dtype=np.int64), tile[: r1 - r0])
            np.matmul(t, x.T, out=out_t[r0:r1])
        return np.ascontiguousarray(out_t.T)


class F16(_HalfFormat):
    tag = "F16"
    rows_independent = True  # element by element
    block_bytes = 2
    native_dtype = "<f2"
    ggml_type = "F16"
    max_abs = 65520.0
    summary = "IEEE float16 (round-to-nearest-even)"
    # NaN/inf in float32 give NaN/inf halves, which _quantize counts as overflows: its RangeError makes
    # quantize scan for NaN/inf then (the same NonFiniteError as its scan before), instead of on every call
    checks_finite = True

    def kernel_path(self, op, n=1, mode="f32"):
        if op == "quantize":  # vcvtps2ph in one parallel numba pass, else numpy's cast
            return "f16c" if _kernels().USE_F16C else "numpy"
        return super().kernel_path(op, n, mode)

    def _quantize(self, w):
        h = np.empty(w.size, np.uint16)
        over = _kernels().f16_round(w.reshape(-1), h) if sys.byteorder == "little" else None
        if over is None:
            h = w.astype(LE_F16).reshape(-1).view(np.uint16)
            over = not np.isfinite(h.view(LE_F16)).all()
        if over:
            raise _range_error(self.tag, w, np.isfinite(w.astype(np.float16)), "|w| < 65520")
        return h.view(np.uint8)


class BF16(_HalfFormat):
    tag = "BF16"
    rows_independent = True  # element by element
    block_bytes = 2
    ggml_type = "BF16"
    # float32 0x7F7F8000 (3.3961775e38) and up round to bf16 infinity
    max_abs = float(np.array(0x7F7F8000, np.uint32).view(np.float32))
    summary = "bfloat16 (round-to-nearest-even, as ggml)"
    checks_finite = True  # bf16_round counts NaN/inf inputs as overflows (see F16.checks_finite)

    def _quantize(self, w):
        from ._bf16 import bf16_round

        h = np.empty(w.size, np.uint16)
        if bf16_round(w.reshape(-1).view(np.uint32), h):
            # judged on the input: a NaN whose mantissa carries into the sign rounds to a finite +-0
            ok = (w.view(np.uint32) & 0x7FFFFFFF) < 0x7F7F8000
            raise _range_error(self.tag, w, ok, "|w| < 3.3961e38")
        return h.astype(LE_U16, copy=False).view(np.uint8)


class Raw(Format):
    """A plain array of another numpy dtype. quantize takes float weights whose values the dtype
    holds exactly (an integer buffer read as floats), else RangeError; QTensor.from_numpy stores
    any array of the dtype as it is."""

    can_quantize = False  # from N(0,1) weights nothing round-trips; the kit checks decoding only
    rows_independent = True  # element by element

    def __init__(self, tag: str, dtype: str, ggml_type: str | None, summary: str):
        self.tag, self.native_dtype, self.ggml_type, self.summary = tag, dtype, ggml_type, summary
        dt = np.dtype(dtype)
        self.block_bytes = dt.itemsize
        self.value_kind = dt.kind
        self.can_quantize = dt.kind == "f"

    def _quantize(self, w):
        dt = np.dtype(self.native_dtype)
        out = w.astype(dt)
        if dt.kind != "f" and not np.array_equal(out.astype(np.float64), w.astype(np.float64)):
            r, c = np.argwhere(out.astype(np.float64) != w.astype(np.float64))[0]
            raise RangeError(f"{self.tag}: weight {float(w[r, c])!r} at row {r}, column {c} is not a value "
                             f"{dt.name} holds exactly")
        return out.reshape(-1).view(np.uint8)

    def _dequantize(self, data, rows, cols):
        return data.view(self.native_dtype).astype(np.float32).reshape(rows, cols)

    def _get_rows(self, data, rows, cols, idx):
        return data.view(self.native_dtype).reshape(rows, cols)[idx].astype(np.float32)

    def prepare(self, data, rows, cols):
        # qmatmul computes in float32: the values converted once (F64: half the bytes a product then
        # reads), so that F32's kernels run on them. Per call, tiles converted for sgemm ran F64's
        # n=128 at 1.78x float32 sgemm on 11008x4096, the conversion reading 8 bytes per weight.
        return self._dequantize(data, rows, cols)  # native float32 (rows, cols)

    def _qmatmul(self, prep, rows, cols, x, mode):
        return f32_matmul(prep, x, F32.matvec_max_n)

    def kernel_path(self, op, n=1, mode="f32"):
        return "float32-copy+" + f32_path(n, F32.matvec_max_n) if op == "qmatmul" else "numpy"

    def example_bytes(self, shape, rng):
        dt = np.dtype(self.native_dtype)
        if dt.kind == "b":
            return rng.integers(0, 2, shape).astype(dt).reshape(-1).view(np.uint8)
        hi = 100 if dt.kind in "iu" else 1
        return rng.integers(0 if dt.kind in "ub" else -hi, hi, shape).astype(dt).reshape(-1).view(np.uint8)


RAW = [
    ("F64", "<f8", "F64", "IEEE float64"),
    ("I8", "<i1", "I8", "int8 buffer"), ("I16", "<i2", "I16", "int16 buffer"),
    ("I32", "<i4", "I32", "int32 buffer"), ("I64", "<i8", "I64", "int64 buffer (e.g. position ids)"),
    ("U8", "<u1", None, "uint8 buffer"), ("U16", "<u2", None, "uint16 buffer"),
    ("U32", "<u4", None, "uint32 buffer"), ("U64", "<u8", None, "uint64 buffer"),
    ("BOOL", "|b1", None, "bool buffer (one byte, 0 or 1; e.g. masks)"),
]


@quantfmt.hookimpl
def register_formats(register):
    register(F32())
    register(F16())
    register(BF16())
    for tag, dtype, ggml, summary in RAW:
        register(Raw(tag, dtype, ggml, summary))
