"""The conformance kit: does a format keep the kernel contract of `quantfmt.format.Format`?

For format authors (and for quantfmt's own tests and `quantfmt check`):

    from quantfmt.testing import assert_conforms, check_format, parametrize_with_checks

    @parametrize_with_checks(["MY3B"])   # one pytest item per check: test_conformance[MY3B-roundtrip], ...
    def test_conformance(fmt, check):
        check(fmt)                       # AssertionError with that check's own message

    def test_my_format():
        assert_conforms("MY3B")          # one AssertionError listing every failed check

    report = check_format("MY3B")      # a list of Check(name, ok, detail); report.ok

Every check runs on small matrices whose shape is built from the format's block_shape
(so it is fast), on N(0,1) weights drawn from `seed`; `size=(rows, cols)` adds the
round-trip RMSE on an N(0,1) matrix of that size (rounded up to whole blocks), the
figure `quantfmt check --all --size 4096x4096` reports. What is checked, in order (each
check is one function below, registered with @_check):

  geometry        bits_per_weight, nbytes(shape) and the quantized byte count agree
  roundtrip       RMSE finite, relative RMSE below GENERIC_MAX_REL_RMSE and below the
                  format's own `max_rel_rmse` if it declares one (roundtrip_size: at `size`)
  get_rows        get_row/get_rows bitwise equal to dequantize (negative, repeated,
                  unordered, empty and non-int64 index arrays)
  qmatmul[MODE]   every declared mode against dequantize() @ X.T (float64), X of shape
                  (cols,) and (n, cols); error bounded by tol * |x_i| * |w_j| (tol =
                  F32_TOL for "f32", Q8_TOL for "q8_0" and any other mode, whose
                  activations are quantized); with and without prepare(); float16 and
                  float64 activations equal to float32 ones of the same values
  kernels_medium  get_rows and every qmatmul mode again on a matrix of ~61 x ~1000, where
                  kernels may take other paths (threads, tiles); kernels_size: at `size`
  byte_inputs     bytes, memoryview, bytearray, read-only arrays, also at an odd address
                  (as in a memory-mapped file), decode the same
  determinism     same bytes twice, also after quantizing something else; input untouched
  input_layouts   Fortran-ordered, strided, read-only, float16 and float64 inputs give
                  the bytes of the same values as float32 (float64 -> float32 first)
  higher_rank     3-D tensors are their 2-D flattening (bytes, dequantize, rows, matmul)
  row_blocks      a format declaring rows_independent: runs of row groups quantize to their slices
                  of the whole tensor's bytes, and those bytes dequantize to their rows
  empty           tensors with a zero dimension
  zeros           zero tensors and zero blocks dequantize to exact zeros
  constant        constant tensors and blockwise-constant tensors
  magnitudes      weights scaled by 1e4 and 1e-6 dequantize finite (or RangeError)
  range           max |w| at each of RANGE_PROBES (fp16's overflow, near float32's largest,
                  subnormals) and, if the format declares `max_abs`, at it and at the float32
                  just below (N(0,1) weights scaled, one block at +max, one at -max): quantize
                  raises RangeError naming the tag, or the bytes dequantize finite within
                  GENERIC_MAX_REL_RMSE (tiny weights: no worse than zeros); with `max_abs`
                  declared, all below it must be accepted and all at or above it refused
  error:*         ShapeError, ByteSizeError, NonFiniteError, DTypeError, RowIndexError,
                  UnsupportedModeError on bad input, each naming the tag
Each check also fails if it emitted any Python warning (numpy's, numba's, ...).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import (
    ByteSizeError,
    DTypeError,
    NonFiniteError,
    RangeError,
    RowIndexError,
    ShapeError,
    UnsupportedModeError,
)
from .format import TAG_RE, Format

#: Any format must beat this relative round-trip RMSE on N(0,1) weights. Storing zeros
#: gives 1.0; one bit (sign times mean |w|) gives 0.60. So this only catches broken formats;
#: a format states a real promise with its `max_rel_rmse` attribute.
GENERIC_MAX_REL_RMSE = 0.75
#: qmatmul with float32 activations: |y - x.w| <= F32_TOL * |x| * |w| (w = dequantized row).
F32_TOL = 1e-4
#: qmatmul with activations quantized per 32 to Q8_0: each value moves by at most
#: 0.5 + 127 * 2**-11 of the block's scale (amax / 127, stored as fp16), so
#: |x - x_q| <= 0.025 |x| over any block; by Cauchy-Schwarz the product moves by at most
#: 0.025 |x| |w|. 0.04 leaves room for float32 accumulation.
Q8_TOL = 0.04
#: The max |w| of the tensors the `range` check quantizes, besides a declared `max_abs` and
#: the float32 just below it: fp16's largest finite value and the first that rounds to fp16
#: infinity (where an fp16 scale of max |w| overflows); past the overflow of fp16 scales of
#: max |w| / 8 (524160), / 15 (982800), / 127 (8321040); near float32's largest (3e38, not
#: 3.4028235e38 itself, where a plain amax / 127 * 127 already rounds to inf); tiny ones down
#: to float32 subnormals (where 1 / scale overflows).
RANGE_PROBES = (65504.0, 65520.0, 1e5, 1e6, 1e10, 1e30, 3e38, 1e-30, 1e-40)


@dataclass
class Check:
    """One named check: passed or not, and what was seen."""

    name: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


class Report(list):
    """The checks run on one format, in order (a list of Check), plus its measured figures."""

    def __init__(self, fmt: Format):
        super().__init__()
        self.tag = fmt.tag
        self.plugin = fmt.plugin
        self.bits_per_weight = fmt.bits_per_weight
        #: Round-trip figures: shape, rmse, rel_rmse (small matrix) and, with size=, size_shape,
        #: size_rmse, size_rel_rmse.
        self.metrics: dict = {}

    @property
    def ok(self) -> bool:
        return bool(self) and all(c.ok for c in self)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self if not c.ok]

    def get(self, name: str) -> Check | None:
        return next((c for c in self if c.name == name), None)

    def to_dict(self) -> dict:
        return {
            "tag": self.tag,
            "plugin": self.plugin,
            "bits_per_weight": self.bits_per_weight,
            "ok": self.ok,
            "metrics": dict(self.metrics),
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self],
        }

    def __str__(self) -> str:
        verdict = "conforms" if self.ok else f"{len(self.failures)} of {len(self)} checks FAILED"
        head = f"{self.tag} ({self.plugin}): {verdict}"
        return "\n".join([head, *(f"  {c}" for c in self)])


class _Fail(Exception):
    """A check's verdict: the format broke the contract (message = what was seen)."""


def _require(cond, message: str) -> None:
    if not cond:
        raise _Fail(message)


def resolve(fmt_or_tag) -> Format:
    """A Format from a tag, a Format instance, or a Format subclass (instantiated)."""
    if isinstance(fmt_or_tag, Format):
        return fmt_or_tag
    if isinstance(fmt_or_tag, type) and issubclass(fmt_or_tag, Format):
        return fmt_or_tag()
    if isinstance(fmt_or_tag, str):
        from .plugins import get_format

        return get_format(fmt_or_tag)
    raise TypeError(f"expected a format tag, a Format or a Format subclass, got {fmt_or_tag!r}")


def small_shape(fmt: Format) -> tuple[int, int]:
    """A small (rows, cols) that fits the blocks: an odd number (>= 3) of blocks each way, so
    kernels that work in tiles of 2, 4, 8 rows or blocks meet a remainder."""
    br, bc = fmt.block_shape
    rows = br * (max(3, -(-13 // br)) | 1)
    cols = bc * (max(3, -(-97 // bc)) | 1)
    return rows, cols


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _same_floats(a, b) -> bool:
    """Bitwise equality of two float32 arrays (so -0.0 != 0.0 and NaN == the same NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype == np.float32 and np.array_equal(_bits(a), _bits(b))


def _first_diff(a, b) -> str:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    bad = np.argwhere(_bits(a) != _bits(b))
    if not len(bad):
        return "equal"
    i = tuple(int(v) for v in bad[0])
    return f"{len(bad)} values differ, first at {i}: {a[i]!r} vs {b[i]!r}"


def _desc(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype}{a.shape}"
    return type(a).__name__


def _rmse(w: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """(RMSE, RMSE / RMS(w)) in float64, by row chunks so big matrices need no big copy."""
    w2, d2 = w.reshape(-1, w.shape[-1]), d.reshape(-1, d.shape[-1])
    err = ref = 0.0
    step = max(1, (1 << 20) // max(1, w2.shape[1]))
    for r0 in range(0, w2.shape[0], step):
        a = w2[r0 : r0 + step].astype(np.float64)
        err += float(np.square(d2[r0 : r0 + step].astype(np.float64) - a).sum())
        ref += float(np.square(a).sum())
    n = max(1, w2.size)
    rmse = math.sqrt(err / n)
    return rmse, (rmse / math.sqrt(ref / n) if ref > 0 else (0.0 if err == 0 else math.inf))


def _expect(exc: type[BaseException], fn: Callable, what: str, tag: str) -> None:
    """`fn()` must raise `exc` with a message naming the format's tag."""
    try:
        fn()
    except exc as e:
        _require(tag in str(e), f"{what}: {exc.__name__} does not name the tag {tag!r}: {e}")
        return
    except Exception as e:
        raise _Fail(f"{what}: raised {type(e).__name__} instead of {exc.__name__}: {e}") from None
    raise _Fail(f"{what}: accepted without error (expected {exc.__name__})")


class _Kit:
    """What the checks of one format share: the format, one small N(0,1) matrix and its bytes
    (quantized once, on first use), seeded random streams, the figures for the Report, and
    `size` (None unless check_format was given one; the checks registered sized=True need it)."""

    def __init__(self, fmt: Format, seed: int, metrics: dict, size: tuple[int, int] | None = None):
        self.fmt = fmt
        self.seed = seed
        self.metrics = metrics
        self.size = size
        self.rows, self.cols = small_shape(fmt)
        self.shape = (self.rows, self.cols)
        self.w = self.rng(0).standard_normal(self.shape, dtype=np.float32)
        self.w.flags.writeable = False  # shared by all checks: a format must not write into its input
        self._data: np.ndarray | None = None

    def rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            if getattr(self.fmt, "can_quantize", True):
                self._data = self.fmt.quantize(self.w)
            else:  # a decode-only format: valid bytes from the format itself
                self._data = np.ascontiguousarray(self.fmt.example_bytes(self.shape, self.rng(1)), np.uint8)
        return self._data

    def deq(self) -> np.ndarray:
        return self.fmt.dequantize(self.data, self.shape)

    def roundtrip_of(self, w, shape, bound):
        d = self.fmt.dequantize(self.fmt.quantize(w), shape)
        _require(
            isinstance(d, np.ndarray) and d.dtype == np.float32 and d.shape == shape,
            f"dequantize returned {_desc(d)}, expected float32{shape}",
        )
        _require(np.isfinite(d).all(), f"dequantize of N(0,1) {shape} holds non-finite values")
        rmse, rel = _rmse(w, d)
        _require(rel <= bound, f"relative RMSE {rel:.4g} on N(0,1) {shape} exceeds {bound:g}")
        return rmse, rel

    def rel_rmse_bound(self) -> float:
        """The format's own promise if it declares one (a ternary format may need more than the
        generic bound, and says so), else the generic bound."""
        own = getattr(self.fmt, "max_rel_rmse", None)
        return GENERIC_MAX_REL_RMSE if own is None else float(own)

    def loose_bound(self) -> float:
        """For weights far from N(0,1) (huge, tiny): the generic bound, or the format's if looser."""
        return max(GENERIC_MAX_REL_RMSE, self.rel_rmse_bound())

    def size_shape(self) -> tuple[int, int]:
        """`size`, rounded up to whole blocks."""
        assert self.size is not None, "size_shape() is for the checks registered sized=True"
        br, bc = self.fmt.block_shape
        return (-(-int(self.size[0]) // br) * br, -(-int(self.size[1]) // bc) * bc)

    def _qmatmul_vs_dequantize(self, data, shape, full, mode, ns, salt) -> float:
        """Worst |qmatmul - dequantize() @ x.T| / (|x| |w|) over x of shapes (n, cols) for n in ns
        ((cols,) for None), with and without prepare(); _Fail beyond the mode's tolerance."""
        f = self.fmt
        rows, cols = full.shape
        tol = F32_TOL if mode == "f32" else Q8_TOL
        w = full.astype(np.float64)
        wn = np.linalg.norm(w, axis=1)
        prepared = f.prepare(f._bytes_input(data, shape), rows, cols)
        worst = 0.0
        rng = self.rng(salt)
        for n in ns:
            x = rng.standard_normal((n or 1, cols), dtype=np.float32)
            x[-1] *= 100.0  # the bound scales with |x|: a kernel mixing up rows of x shows
            xin = x[0] if n is None else x
            want = x.astype(np.float64) @ w.T
            scale = np.linalg.norm(x.astype(np.float64), axis=1)[:, None] * wn[None, :]
            for how, kw in (("", {}), ("prepared ", {"prepared": prepared})):
                y = f.qmatmul(data, shape, xin, mode, **kw)
                eshape = (rows,) if n is None else (n, rows)
                _require(
                    isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == eshape,
                    f"{how}qmatmul(x{xin.shape}) returned {_desc(y)}, expected float32{eshape}",
                )
                _require(np.isfinite(y).all(), f"{how}qmatmul(x{xin.shape}) holds non-finite values")
                rel = np.abs(y.reshape(want.shape).astype(np.float64) - want) / np.maximum(scale, 1e-30)
                i, j = np.unravel_index(int(np.argmax(rel)), rel.shape)
                _require(
                    rel[i, j] <= tol,
                    f"{how}qmatmul(x{xin.shape}) on {shape}, row {i} of x, row {j} of W: got "
                    f"{y.reshape(want.shape)[i, j]!r}, dequantize() @ x.T = {want[i, j]!r}; "
                    f"error {rel[i, j]:.3g} |x||w| > {tol:g}",
                )
                worst = max(worst, float(rel[i, j]))
        return worst

    def kernels_at(self, shape, salt):
        """get_rows and every qmatmul mode against dequantize on a larger N(0,1) matrix, where
        kernels may take other paths (threads, tiles) than on the small one."""
        f = self.fmt
        w = self.rng(salt).standard_normal(shape, dtype=np.float32)
        data = f.quantize(w)
        full = f.dequantize(data, shape)
        rows = shape[0]
        idx = np.array([0, rows // 2, rows - 1, 1, -2])
        got = f.get_rows(data, shape, idx)
        _require(
            _same_floats(got, full[idx]),
            f"get_rows({idx.tolist()}) on {shape}: {_first_diff(got, full[idx])}",
        )
        worst = {m: self._qmatmul_vs_dequantize(data, shape, full, m, (None, 4), salt + 1) for m in f.modes}
        errs = ", ".join(f"{m} {e:.3g}" for m, e in worst.items())
        return f"get_rows bitwise, qmatmul max error |x||w|: {errs} on {shape}"

    def _bad_shapes(self):
        br, bc = self.fmt.block_shape
        rows, cols = self.shape
        bad = [] if (br, bc) == (1, 1) else [()]  # a plain format stores a scalar as one value
        if bc > 1:
            bad += [(rows, cols + 1), (rows, cols - 1), (rows, bc // 2 or 1)]
        if br > 1:
            bad += [(rows + 1, cols), (1, rows - 1, cols), (cols,)]
        bad.append((rows, -cols))
        return bad


# ---- the checks, in report order ----------------------------------------------------------
# Each check is a function of the shared _Kit returning a one-line detail, or raising _Fail
# (any other exception is a failure too). Registration order is report order. A name with
# "{mode}" is expanded once per mode the format declares; sized=True checks run only with size=.

_CHECKS: list[tuple[str, Callable[..., str], bool]] = []


#: Checks that need no quantizer: what runs on a format with can_quantize False, on the
#: bytes its example_bytes() makes (a ggml type that needs an importance matrix, say).
DECODE_ONLY = {"geometry", "get_rows", "qmatmul[{mode}]", "byte_inputs", "empty", "error:shape", "error:bytes",
               "error:nonfinite", "error:dtype", "error:row_index", "error:mode"}


def _check(name: str, *, sized: bool = False):
    def register(fn: Callable[..., str]) -> Callable[..., str]:
        if any(n == name for n, _, _ in _CHECKS):
            raise ValueError(f"conformance check {name!r} registered twice")
        _CHECKS.append((name, fn, sized))
        return fn

    return register


def _plan(fmt: Format, sized: bool) -> list[tuple[str, Callable[[_Kit], str]]]:
    """The checks to run on `fmt`, in order, as (name, function of the kit)."""
    plan: list[tuple[str, Callable[[_Kit], str]]] = []
    decode_only = not getattr(fmt, "can_quantize", True)
    for name, fn, needs_size in _CHECKS:
        if needs_size and not sized or decode_only and name not in DECODE_ONLY:
            continue
        if "{mode}" in name:
            plan += [(name.format(mode=m), functools.partial(fn, mode=m)) for m in fmt.modes]
        else:
            plan.append((name, fn))
    return plan


@_check("geometry")
def _geometry(k):
    f = k.fmt
    _require(isinstance(f.tag, str) and TAG_RE.match(f.tag), f"tag {f.tag!r} is not 1-4 of A-Z, 0-9, _")
    br, bc = f.block_shape
    _require(
        isinstance(f.layout_version, int) and f.layout_version >= 1,
        f"layout version {f.layout_version!r} is not an int >= 1",
    )
    _require("f32" in f.modes, f"modes {f.modes!r} lack 'f32'")
    _require(
        math.isclose(f.bits_per_weight, 8 * f.block_bytes / (br * bc)),
        f"bits_per_weight {f.bits_per_weight} != 8 * {f.block_bytes} / ({br}*{bc})",
    )
    for shape in [k.shape, (2 * k.rows, 3 * k.cols), (br, bc), (0, k.cols)]:
        n = f.nbytes(shape)
        want = shape[0] // br * (shape[1] // bc) * f.block_bytes
        _require(
            n == want,
            f"nbytes{shape} = {n}, but {shape[0] // br}x{shape[1] // bc} blocks "
            f"of {f.block_bytes} bytes = {want}",
        )
        _require(
            math.isclose(n, f.bits_per_weight * shape[0] * shape[1] / 8),
            f"nbytes{shape} = {n} != bpw * numel / 8",
        )
    d = k.data
    _require(
        isinstance(d, np.ndarray) and d.dtype == np.uint8 and d.ndim == 1,
        f"quantize returned {_desc(d)}, not 1-D uint8",
    )
    _require(
        d.size == f.nbytes(k.shape),
        f"quantize gave {d.size} bytes for {k.shape}, nbytes says {f.nbytes(k.shape)}",
    )
    info = f.info()
    _require(json.loads(json.dumps(info)) == info, f"info() is not plain JSON: {info!r}")
    return f"{f.bits_per_weight:g} bpw ({br}x{bc} blocks of {f.block_bytes} bytes): {d.size} bytes"


@_check("roundtrip")
def _roundtrip(k):
    bound = k.rel_rmse_bound()
    rmse, rel = k.roundtrip_of(k.w, k.shape, bound)
    k.metrics.update(shape=list(k.shape), rmse=rmse, rel_rmse=rel)
    return f"RMSE {rmse:.4g}, relative {rel:.4g} (bound {bound:g}) on N(0,1) {k.shape}"


@_check("roundtrip_size", sized=True)
def _roundtrip_size(k):
    shape = k.size_shape()
    w = k.rng(99).standard_normal(shape, dtype=np.float32)
    bound = k.rel_rmse_bound()
    rmse, rel = k.roundtrip_of(w, shape, bound)
    k.metrics.update(size_shape=list(shape), size_rmse=rmse, size_rel_rmse=rel)
    return f"RMSE {rmse:.5g}, relative {rel:.5g} (bound {bound:g}) on N(0,1) {shape}"


@_check("get_rows")
def _get_rows(k):
    f, data, rows = k.fmt, k.data, k.rows
    full = k.deq()
    cases = {
        "all rows": np.arange(rows),
        "reversed": np.arange(rows)[::-1].copy(),
        "negative": np.array([-1, -rows, -2, 0, rows - 1]),
        "repeated": np.array([1, 1, rows - 1, 1, -1, 0, 0]),
        "shuffled": k.rng(1).permutation(rows),
    }
    for what, idx in cases.items():
        got = f.get_rows(data, k.shape, idx)
        _require(
            _same_floats(got, full[idx]),
            f"get_rows({what} {idx.tolist()[:8]}...) vs dequantize: {_first_diff(got, full[idx])}",
        )
    for idx in ([2, 0], np.array([2, 0], np.int32), np.array([2, 0], np.uint16)):
        got = f.get_rows(data, k.shape, idx)
        _require(
            _same_floats(got, full[[2, 0]]),
            f"get_rows with indices {idx!r}: {_first_diff(got, full[[2, 0]])}",
        )
    for i in (0, 1, rows - 1, -1, -rows):
        got = f.get_row(data, k.shape, i)
        _require(_same_floats(got, full[i]), f"get_row({i}) vs dequantize: {_first_diff(got, full[i])}")
    got = f.get_rows(data, k.shape, np.array([], np.int64))
    _require(
        isinstance(got, np.ndarray) and got.shape == (0, k.cols) and got.dtype == np.float32,
        f"get_rows([]) gave {_desc(got)}, expected float32(0, {k.cols})",
    )
    return f"bitwise equal to dequantize for {len(cases) + 8} index sets on {k.shape}"


@_check("qmatmul[{mode}]")
def _qmatmul(k, mode):
    f, data, shape = k.fmt, k.data, k.shape
    tol = F32_TOL if mode == "f32" else Q8_TOL
    ns = (None, 1, 5, 33)
    worst = k._qmatmul_vs_dequantize(data, shape, k.deq(), mode, ns, 2)
    # float16 / float64 activations are the float32 ones of the same values
    x16 = k.rng(3).standard_normal((3, k.cols)).astype(np.float16)
    for x in (x16, x16.astype(np.float64)):
        a, b = f.qmatmul(data, shape, x, mode), f.qmatmul(data, shape, x16.astype(np.float32), mode)
        _require(
            np.allclose(a, b, rtol=0, atol=1e-6 * float(np.abs(b).max())),
            f"qmatmul of {x.dtype} activations differs from float32 ones of the same values",
        )
    return f"max error {worst:.3g} |x||w| (tol {tol:g}) for x (cols,), (n, cols) with n = 1, 5, 33"


@_check("kernels_medium")
def _kernels_medium(k):
    br, bc = k.fmt.block_shape
    return k.kernels_at((br * (max(3, -(-61 // br)) | 1), bc * (max(3, -(-1000 // bc)) | 1)), 20)


@_check("kernels_size", sized=True)
def _kernels_size(k):
    return k.kernels_at(k.size_shape(), 30)


@_check("byte_inputs")
def _byte_inputs(k):
    f, data, shape = k.fmt, k.data, k.shape
    full = k.deq()
    ro = data.copy()
    ro.flags.writeable = False
    # A tensor in a memory-mapped file starts wherever the header ends: odd addresses too.
    odd = np.empty(data.size + 3, np.uint8)[3:]
    odd[:] = data
    odd.flags.writeable = False
    x = k.rng(3).standard_normal((2, k.cols), dtype=np.float32)
    y = f.qmatmul(data, shape, x)
    for what, buf in (
        ("bytes", bytes(data)),
        ("memoryview", memoryview(bytes(data))),
        ("bytearray", bytearray(data)),
        ("read-only array", ro),
        ("read-only array at an odd address", odd),
    ):
        _require(
            _same_floats(f.dequantize(buf, shape), full),
            f"dequantize from {what}: {_first_diff(f.dequantize(buf, shape), full)}",
        )
        got = f.get_rows(buf, shape, [1, 0])
        _require(
            _same_floats(got, full[[1, 0]]), f"get_rows from {what}: {_first_diff(got, full[[1, 0]])}"
        )
        got = f.qmatmul(buf, shape, x)
        _require(
            np.allclose(got, y, rtol=1e-5, atol=1e-5 * float(np.abs(y).max())),
            f"qmatmul from {what} differs from an array",
        )
    return "bytes, memoryview, bytearray, read-only arrays (also at an odd address) decode the same"


@_check("determinism")
def _determinism(k):
    f, w = k.fmt, k.w.copy()
    keep = w.copy()
    a = f.quantize(w)
    _require(_same_floats(w, keep), f"quantize modified its input: {_first_diff(w, keep)}")
    b = f.quantize(w)
    _require(np.array_equal(a, b), f"quantize twice: {int((a != b).sum())} of {a.size} bytes differ")
    f.quantize(k.rng(4).standard_normal(k.shape, dtype=np.float32) * 7)
    c = f.quantize(w)
    _require(
        np.array_equal(a, c),
        f"quantize after quantizing another tensor: {int((a != c).sum())} bytes differ",
    )
    d1, d2 = f.dequantize(a, k.shape), f.dequantize(a, k.shape)
    _require(_same_floats(d1, d2), f"dequantize twice: {_first_diff(d1, d2)}")
    return f"same {a.size} bytes three times; input untouched"


@_check("input_layouts")
def _input_layouts(k):
    f, w, want = k.fmt, k.w, k.data
    strided = np.zeros((k.rows, 2 * k.cols), np.float32)
    strided[:, 1::2] = w
    ro = w.copy()
    ro.flags.writeable = False
    w16 = w.astype(np.float16)
    w64 = k.rng(5).standard_normal(k.shape)  # float64 values between float32 ones
    cases = [
        ("Fortran-ordered", np.asfortranarray(w), want),
        ("strided view", strided[:, 1::2], want),
        ("read-only", ro, want),
        ("float64 copy", w.astype(np.float64), want),
        ("float16", w16, f.quantize(w16.astype(np.float32))),
        ("float64 (not float32 values)", w64, f.quantize(w64.astype(np.float32))),
    ]
    for what, arr, expect in cases:
        got = f.quantize(arr)
        _require(
            np.array_equal(got, expect),
            f"{what} input: {int((np.asarray(got) != expect).sum())} bytes differ "
            "from those of the same values as float32, C-contiguous",
        )
    return "; ".join(c[0] for c in cases) + ": same bytes as float32"


@_check("higher_rank")
def _higher_rank(k):
    f, rows, cols = k.fmt, k.rows, k.cols
    s3, s2 = (3, rows, cols), (3 * rows, cols)
    w = k.rng(6).standard_normal(s3, dtype=np.float32)
    _require(f.nbytes(s3) == f.nbytes(s2), f"nbytes{s3} = {f.nbytes(s3)} != nbytes{s2}")
    data = f.quantize(w)
    _require(
        np.array_equal(data, f.quantize(w.reshape(s2))), f"quantize of {s3} and of its {s2} view differ"
    )
    full = f.dequantize(data, s2)
    got = f.dequantize(data, s3)
    _require(
        _same_floats(got, full.reshape(s3)), f"dequantize as {s3}: {_first_diff(got, full.reshape(s3))}"
    )
    idx = [-1, rows, 0, rows + 1]
    got = f.get_rows(data, s3, idx)
    _require(_same_floats(got, full[idx]), f"get_rows as {s3}: {_first_diff(got, full[idx])}")
    x = k.rng(7).standard_normal((3, cols), dtype=np.float32)
    y2, y3 = f.qmatmul(data, s2, x), f.qmatmul(data, s3, x)
    _require(
        y3.shape == y2.shape and np.allclose(y3, y2, rtol=1e-5, atol=1e-5 * float(np.abs(y2).max())),
        f"qmatmul with weights of shape {s3} differs from {s2}",
    )
    done = [str(s3)]
    if f.block_shape[0] == 1:
        one = f.quantize(w[0, 0])
        _require(
            np.array_equal(one, f.quantize(w[0, :1])),
            f"a 1-D tensor ({cols},) is not quantized as one row",
        )
        got = f.dequantize(one, (cols,))
        _require(got.shape == (cols,) and _same_floats(got, full[0]), "1-D dequantize differs from row 0")
        done.append(f"({cols},)")
    return " and ".join(done) + " equal to their 2-D flattening"


@_check("row_blocks")
def _row_blocks(k):
    """A format that declares rows_independent is converted a block of row groups at a time
    (quantfmt.ops.convert): each run of row groups must quantize to its slice of the whole
    tensor's bytes and its bytes dequantize to its rows."""
    f = k.fmt
    if not f.rows_independent:
        return "not declared rows_independent: conversion quantizes tensors whole"
    br, cols = f.block_shape[0], k.cols
    rows = 4 * br
    w = k.rng(11).standard_normal((rows, cols), dtype=np.float32)
    w[br : 2 * br] *= 50.0  # row groups of very different scale: anything tensor-wide shows
    w[3 * br :] *= 0.01
    whole = f.quantize(w)
    full = f.dequantize(whole, (rows, cols))
    gb = f.row_group_bytes(cols)
    for g0, g1 in ((0, 1), (1, 3), (3, 4), (0, 2)):
        part = f.quantize(w[g0 * br : g1 * br])
        want = whole[g0 * gb : g1 * gb]
        _require(
            np.array_equal(part, want),
            f"rows_independent, but quantizing rows {g0 * br}..{g1 * br - 1} alone gives "
            f"{int((part != want).sum()) if part.shape == want.shape else 'a different number of'} bytes "
            f"different from that slice of the whole ({rows}, {cols}) tensor's",
        )
        got = f.dequantize(want, ((g1 - g0) * br, cols))
        _require(
            _same_floats(got, full[g0 * br : g1 * br]),
            f"dequantizing the bytes of rows {g0 * br}..{g1 * br - 1} alone: "
            f"{_first_diff(got, full[g0 * br : g1 * br])}",
        )
    return f"runs of row groups of a ({rows}, {cols}) tensor quantize to their slices of its bytes"


@_check("empty")
def _empty(k):
    f, cols = k.fmt, k.cols
    br, bc = f.block_shape
    for shape in ((0, cols), (br, 0), (0, 2, cols)):
        z = np.zeros(shape, np.float32)
        d = f.quantize(z)
        _require(d.size == f.nbytes(shape) == 0, f"quantize of empty {shape} gave {d.size} bytes")
        got = f.dequantize(d, shape)
        _require(
            got.shape == shape and got.dtype == np.float32,
            f"dequantize empty {shape} gave {got.dtype}{got.shape}",
        )
    y = f.qmatmul(b"", (0, cols), np.ones((3, cols), np.float32))
    _require(y.shape == (3, 0), f"qmatmul with 0 weight rows gave shape {y.shape}, expected (3, 0)")
    for x in (np.ones((3, 0), np.float32), np.ones(0, np.float32)):  # no columns: every output is an empty sum
        y = f.qmatmul(b"", (br, 0), x)
        want = x.shape[:-1] + (br,)
        _require(y.shape == want and not y.any(), f"qmatmul, 0 weight columns, x {x.shape}: {y.shape}, want 0s {want}")
    return "(0, cols), (br, 0), (0, 2, cols)"


@_check("zeros")
def _zeros(k):
    f, shape, rows, cols = k.fmt, k.shape, k.rows, k.cols
    br, bc = f.block_shape
    x = k.rng(7).standard_normal((2, cols), dtype=np.float32)
    for what, z in (
        ("zeros", np.zeros(shape, np.float32)),
        ("negative zeros", np.full(shape, -0.0, np.float32)),
    ):
        d = f.quantize(z)
        got = f.dequantize(d, shape)
        _require(
            got.dtype == np.float32 and (got == 0).all(), f"{what} dequantize to {got[got != 0][:4]!r}..."
        )
        _require((f.get_rows(d, shape, [0, -1]) == 0).all(), f"get_rows of {what} are not zero")
        for mode in f.modes:
            y = f.qmatmul(d, shape, x, mode)
            _require((y == 0).all(), f"qmatmul[{mode}] of {what} weights gave {y[y != 0][:4]!r}...")
    # Zero blocks among N(0,1) ones: the first block, one in the middle, the last, and a whole row group.
    w = k.w.copy()
    holes = [(0, 0), (rows // br // 2, cols // bc // 2), (rows // br - 1, cols // bc - 1)]
    for g, b in holes:
        w[g * br : (g + 1) * br, b * bc : (b + 1) * bc] = 0
    w[br : 2 * br] = 0
    got = f.dequantize(f.quantize(w), shape)
    _require(np.isfinite(got).all(), "zero blocks among N(0,1) blocks give non-finite values")
    _require((got[w == 0] == 0).all(), "zero blocks among N(0,1) blocks do not dequantize to exact zeros")
    return "zero and -0.0 tensors, and zero blocks among N(0,1), give exact zeros"


@_check("constant")
def _constant(k):
    f, shape, rows, cols = k.fmt, k.shape, k.rows, k.cols
    br, bc = f.block_shape
    worst = 0.0
    for c in (1.0, -2.5, 0.3, 1000.0):
        got = f.dequantize(f.quantize(np.full(shape, c, np.float32)), shape)
        _require(np.isfinite(got).all(), f"constant {c} dequantizes to non-finite values")
        err = float(np.abs(got.astype(np.float64) - c).max()) / abs(c)
        _require(
            err <= 0.25,
            f"constant {c} dequantizes to values up to {err:.3g} * |c| away (e.g. {got.flat[0]!r})",
        )
        worst = max(worst, err)
    # Every block a different constant (a step function, as in embeddings of padding).
    blocks = k.rng(8).standard_normal((rows // br, cols // bc)).astype(np.float32)
    w = np.repeat(np.repeat(blocks, br, axis=0), bc, axis=1)
    got = f.dequantize(f.quantize(w), shape)
    _require(np.isfinite(got).all(), "blockwise-constant weights dequantize to non-finite values")
    rmse, rel = _rmse(w, got)
    _require(rel <= 0.25, f"blockwise-constant weights: relative RMSE {rel:.3g} > 0.25")
    return f"constant tensors within {worst:.3g} |c|; blockwise constants relative RMSE {rel:.3g}"


@_check("magnitudes")
def _magnitudes(k):
    f, shape = k.fmt, k.shape
    out = []
    for scale in (1e4, 1e-6):
        w = k.w * np.float32(scale)
        try:
            d = f.quantize(w)
        except RangeError as e:
            _require(f.tag in str(e), f"RangeError for N(0,1)*{scale:g} does not name the tag: {e}")
            out.append(f"x{scale:g}: refused (RangeError)")
            continue
        got = f.dequantize(d, shape)
        _require(np.isfinite(got).all(), f"N(0,1)*{scale:g} dequantizes to non-finite values")
        _, rel = _rmse(w, got)
        if scale > 1:
            bound = k.loose_bound()
            _require(rel <= bound, f"N(0,1)*{scale:g}: relative RMSE {rel:.3g} > {bound:g}")
        out.append(f"x{scale:g}: relative RMSE {rel:.3g}")
    return "; ".join(out)



def _declared_max_abs(fmt: Format) -> float | None:
    """The format's `max_abs` (read with getattr: formats written before it existed lack it)."""
    v = getattr(fmt, "max_abs", None)
    if v is None:
        return None
    _require(
        isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and v > 0,
        f"max_abs {v!r} is not None or a positive number",
    )
    return float(v)


def _range_probe(k: _Kit, v: np.float32) -> np.ndarray:
    """The small N(0,1) matrix scaled to max |w| = v, its first block constant at +v and its
    last at -v (so a limit on a block's minimum, as Q4_1's fp16 min, is met too)."""
    br, bc = k.fmt.block_shape
    w = k.w.astype(np.float64)
    w = np.clip(w * (float(v) / np.abs(w).max()), -float(v), float(v)).astype(np.float32)
    w[:br, :bc] = v
    w[-br:, -bc:] = -v
    return w


@_check("range")
def _range(k):
    f, tag = k.fmt, k.fmt.tag
    limit = _declared_max_abs(f)
    probes = {np.float32(v) for v in RANGE_PROBES}
    if limit is not None and limit <= np.finfo(np.float32).max:
        at = np.float32(limit)
        if at < limit:  # the smallest float32 >= the limit
            at = np.nextafter(at, np.float32(np.inf))
        probes |= {at, np.nextafter(at, np.float32(0))}
    accepted, refused = [], []
    for v in sorted(probes):
        w = _range_probe(k, v)
        what = f"max |w| = {float(v):.9g}"
        try:
            data = f.quantize(w)
        except RangeError as e:
            _require(tag in str(e), f"{what}: RangeError does not name the tag {tag!r}: {e}")
            if limit is not None and v < limit:
                raise _Fail(f"{what} refused below the declared max_abs {limit:.9g}: {e}") from None
            refused.append(v)
            continue
        if limit is not None and v >= limit:
            raise _Fail(f"{what} quantized without RangeError, but the declared max_abs is {limit:.9g}")
        got = f.dequantize(data, k.shape)
        bad = ~np.isfinite(got)
        if bad.any():
            i = tuple(int(j) for j in np.argwhere(bad)[0])
            raise _Fail(
                f"{what}: quantize accepted it but {int(bad.sum())} values dequantize to non-finite ones "
                f"(first {float(got[i])} at {i}; a scale that overflows its storage type?); raise RangeError instead"
            )
        _, rel = _rmse(w, got)
        # Tiny weights may flush to zero (relative RMSE 1), but never come back larger.
        bound = k.loose_bound() if v >= 1 else 1.0
        _require(rel <= bound, f"{what}: relative RMSE {rel:.3g} > {bound:g}")
        accepted.append(v)
    say = ", ".join
    out = f"accepted max |w| {say(str(v) for v in accepted) or 'none'}"
    out += f"; refused (RangeError) {say(str(v) for v in refused) or 'none'}"
    return out + (f"; declared max_abs {limit:.9g}" if limit is not None else "; no max_abs declared")


@_check("error:shape")
def _error_shape(k):
    f, tag, cols = k.fmt, k.fmt.tag, k.cols
    bad = k._bad_shapes()
    for s in bad:
        if all(d >= 0 for d in s):
            _expect(
                ShapeError, lambda s=s: f.quantize(np.zeros(s, np.float32)), f"quantize of shape {s}", tag
            )
        _expect(ShapeError, lambda s=s: f.nbytes(s), f"nbytes{s}", tag)
        _expect(ShapeError, lambda s=s: f.dequantize(b"", s), f"dequantize as {s}", tag)
        _expect(ShapeError, lambda s=s: f.get_rows(b"", s, [0]), f"get_rows as {s}", tag)
        _expect(
            ShapeError, lambda s=s: f.qmatmul(b"", s, np.ones(cols, np.float32)), f"qmatmul as {s}", tag
        )
    for xs in ((cols + 1,), (2, cols - 1), (2, 2, cols), ()):
        _expect(
            ShapeError,
            lambda xs=xs: f.qmatmul(k.data, k.shape, np.ones(xs, np.float32)),
            f"qmatmul with activations {xs}",
            tag,
        )
    return f"refused weight shapes {bad} and 4 activation shapes"


@_check("error:bytes")
def _error_bytes(k):
    f, data, tag, shape = k.fmt, k.data, k.fmt.tag, k.shape
    br, bc = f.block_shape
    x = np.ones(k.cols, np.float32)
    cases = {
        "one byte short": data[:-1],
        "one byte extra": np.append(data, np.uint8(0)),
        "one block short": data[: -f.block_bytes],
        "empty": b"",
    }
    for what, buf in cases.items():
        _expect(ByteSizeError, lambda b=buf: f.dequantize(b, shape), f"dequantize of {what}", tag)
        _expect(ByteSizeError, lambda b=buf: f.get_rows(b, shape, [0]), f"get_rows of {what}", tag)
        _expect(ByteSizeError, lambda b=buf: f.qmatmul(b, shape, x), f"qmatmul of {what}", tag)
    bigger = (k.rows + br, k.cols)
    _expect(
        ByteSizeError, lambda: f.dequantize(data, bigger), f"the bytes of {shape} read as {bigger}", tag
    )
    return f"{len(cases) + 1} wrong byte counts refused by dequantize, get_rows, qmatmul"


@_check("error:nonfinite")
def _error_nonfinite(k):
    f, tag = k.fmt, k.fmt.tag
    for what, pos, v in (("NaN", (1, 2), np.nan), ("+inf", (0, 0), np.inf), ("-inf", (-1, -1), -np.inf)):
        w = k.w.copy()
        w[pos] = v
        _expect(NonFiniteError, lambda w=w: f.quantize(w), f"quantize with {what} at {pos}", tag)
    w16 = k.w.astype(np.float16)
    w16[3, 1] = np.inf
    _expect(NonFiniteError, lambda: f.quantize(w16), "quantize of float16 with inf", tag)
    return "NaN, +inf, -inf (float32 and float16) refused"


@_check("error:dtype")
def _error_dtype(k):
    f, tag = k.fmt, k.fmt.tag
    kinds = (np.int32, np.int8, np.uint8, np.int64, np.bool_, np.complex64)
    for dt in kinds:
        _expect(
            DTypeError,
            lambda dt=dt: f.quantize(np.ones(k.shape, dt)),
            f"quantize of {np.dtype(dt)}",
            tag,
        )
    _expect(
        DTypeError,
        lambda: f.qmatmul(k.data, k.shape, np.ones(k.cols, np.int32)),
        "qmatmul of int32 x",
        tag,
    )
    return f"{', '.join(np.dtype(d).name for d in kinds)} refused"


@_check("error:row_index")
def _error_row_index(k):
    f, data, shape, rows, tag = k.fmt, k.data, k.shape, k.rows, k.fmt.tag
    for idx in ([rows], [-rows - 1], [0, rows + 5], np.array([1.0]), np.zeros((1, 1), np.int64)):
        _expect(RowIndexError, lambda i=idx: f.get_rows(data, shape, i), f"get_rows({idx!r})", tag)
    for i in (rows, -rows - 1):
        _expect(RowIndexError, lambda i=i: f.get_row(data, shape, i), f"get_row({i})", tag)
    return f"rows {rows}, {-rows - 1}, float and 2-D indices refused"


@_check("error:mode")
def _error_mode(k):
    f, tag = k.fmt, k.fmt.tag
    bad = [m for m in ("q8_0", "bogus", "F32", "Q8_0") if m not in f.modes]
    for m in bad:
        _expect(
            UnsupportedModeError,
            lambda m=m: f.qmatmul(k.data, k.shape, np.ones(k.cols, np.float32), m),
            f"qmatmul mode {m!r}",
            tag,
        )
    return f"undeclared modes {bad} refused"


# ---- running the checks --------------------------------------------------------------------


def check_format(fmt_or_tag, *, seed: int = 0, size: tuple[int, int] | None = None) -> Report:
    """Run every conformance check on a format (tag, Format, or Format subclass); never raises
    for a broken format: each failure is a Check with ok=False and what was seen."""
    fmt = resolve(fmt_or_tag)
    report = Report(fmt)
    kit = _Kit(fmt, seed, report.metrics, size)
    for name, fn in _plan(fmt, sized=size is not None):
        report.append(_run(name, functools.partial(fn, kit)))
    return report


def _run(name: str, fn: Callable[[], str]) -> Check:
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="warn", under="ignore"):
        warnings.simplefilter("always")
        try:
            detail = fn()
            ok = True
        except _Fail as e:
            ok, detail = False, str(e)
        except Exception as e:  # a crash in the format's code is a failed check, not a crash of the kit
            ok, detail = False, f"raised {type(e).__name__}: {e}"
            if "read-only" in str(e):
                detail += " (the format writes into its input weights or its bytes)"
    if caught:
        w = caught[0]
        ok = False
        first = f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        detail = f"emitted {len(caught)} warning(s), first {first}; {detail}"
    return Check(name, ok, detail)


def assert_conforms(fmt_or_tag, *, seed: int = 0, size: tuple[int, int] | None = None) -> Report:
    """check_format, raising AssertionError that lists every failed check (for pytest)."""
    report = check_format(fmt_or_tag, seed=seed, size=size)
    if not report.ok:
        lines = [f"format {report.tag} ({report.plugin}) fails {len(report.failures)} conformance check(s):"]
        lines += [f"  {c.name}: {c.detail}" for c in report.failures]
        raise AssertionError("\n".join(lines))
    return report


# ---- pytest: one item per check ---------------------------------------------------------------

# Kits of parametrize_with_checks, by (id of the format, seed); each holds its format, so the id
# stays that format's. The small matrix and its bytes are thus made once per format and seed,
# however many items (and decorated tests) use them.
_shared_kits: dict[tuple[int, int], _Kit] = {}


def _shared_kit(fmt: Format, seed: int) -> _Kit:
    key = (id(fmt), seed)
    if key not in _shared_kits:
        _shared_kits[key] = _Kit(fmt, seed, {})
    return _shared_kits[key]


class _BoundCheck:
    """One check of the kit, as parametrize_with_checks hands it to a test: `check(fmt)` runs
    it on the kit shared by every check of that format and seed, and raises AssertionError
    with the check's own detail if it fails."""

    def __init__(self, name: str, fn: Callable[[_Kit], str], fmt: Format, seed: int):
        self.name, self.fn, self.fmt, self.seed = name, fn, fmt, seed

    def __call__(self, fmt=None) -> Check:
        __tracebackhide__ = True  # pytest: show the test's line and this message, not the kit's frames
        fmt = self.fmt if fmt is None else resolve(fmt)
        result = _run(self.name, functools.partial(self.fn, _shared_kit(fmt, self.seed)))
        if not result.ok:
            raise AssertionError(f"{fmt.tag} ({fmt.plugin}) fails conformance check {self.name}: {result.detail}")
        return result

    def __repr__(self) -> str:
        return f"<conformance check {self.name} of {self.fmt.tag}>"


class _Unavailable:
    """Stands in for the checks of a format that could not be loaded: fails with the reason."""

    def __init__(self, what: str, error: Exception):
        self.what, self.error = what, error

    def __call__(self, fmt=None):
        __tracebackhide__ = True
        raise AssertionError(
            f"format {self.what} could not be loaded, so none of its conformance checks ran "
            f"(is the plugin that provides it installed?): {type(self.error).__name__}: {self.error}"
        )

    def __repr__(self) -> str:
        return f"<unavailable format {self.what}>"


def parametrize_with_checks(fmt_or_formats, seed: int = 0):
    """A pytest decorator that parametrizes a test over (fmt, check): one item per format and
    check, with ids like `Q4_0-roundtrip` and `Q4_0-qmatmul[q8_0]`, as scikit-learn's
    `parametrize_with_checks` does for estimators:

        @parametrize_with_checks(["MY3B", MyFormat])
        def test_conformance(fmt, check):
            check(fmt)

    `fmt_or_formats` is a tag, a Format or a Format subclass, or a list of them. Tags are looked
    up when the test module is collected (each format's modes name its qmatmul items); a tag
    that cannot be loaded (plugin missing or broken) gives one failing item `TAG-load` saying
    why, instead of an error that stops collection. `fmt` is the Format; `check(fmt)` returns
    the passing Check or raises AssertionError with what was seen.
    """
    import pytest

    single = isinstance(fmt_or_formats, (str, Format)) or isinstance(fmt_or_formats, type)
    params = []
    for item in [fmt_or_formats] if single else list(fmt_or_formats):
        if not isinstance(item, (str, Format)) and not (isinstance(item, type) and issubclass(item, Format)):
            raise TypeError(f"expected a format tag, a Format or a Format subclass, got {item!r}")
        try:
            fmt = resolve(item)
            plan = _plan(fmt, sized=False)
        except Exception as e:  # reported by the item, so the other tests of the module still run
            what = item if isinstance(item, str) else getattr(item, "__name__", repr(item))
            params.append(pytest.param(item, _Unavailable(repr(what), e), id=f"{what}-load"))
            continue
        params += [pytest.param(fmt, _BoundCheck(name, fn, fmt, seed), id=f"{fmt.tag}-{name}") for name, fn in plan]
    return pytest.mark.parametrize(("fmt", "check"), params)
