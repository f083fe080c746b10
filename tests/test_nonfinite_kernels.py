"""NaN/inf found by the quantizers' own row kernels (Format.checks_finite): quantize skips its whole-tensor
scan for those formats and must raise exactly the NonFiniteError the scan raised (first non-finite value in
C order, its value, its index in the caller's shape), for float32, float16 and float64 input, plain and
importance-weighted, ahead of any RangeError; formats that do not declare it keep the scan."""

from __future__ import annotations

import numpy as np
import pytest

from quantfmt.errors import NonFiniteError, RangeError
from quantfmt.families import BlockFormat
from quantfmt.format import NONFINITE_ROW, NonFiniteRows
from quantfmt.plugins import formats, get_format

CHECKING = ["BF16", "F16", "IQ4N", "IQ4X", "MXF4", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_A", "Q4_K", "Q5_0", "Q5_1",
            "Q5_K", "Q6_K", "Q8_0", "Q8_A", "Q8_B"]
WEIGHTED = ["IQ4N", "IQ4X", "Q5_0", "Q5_1"]  # ImportanceWeighted: quant_weights go through quantize itself


def test_which_formats_check():
    assert sorted(t for t, f in formats().items() if f.checks_finite) == CHECKING


def expected(tag: str, w: np.ndarray) -> str:
    """The message of Format.quantize's scan, as it was written before the kernels checked."""
    src = w.reshape(-1, w.shape[-1])
    bad = np.argwhere(~np.isfinite(src))[0]
    idx = np.unravel_index(int(bad[0]) * src.shape[1] + int(bad[1]), w.shape)
    return (f"{tag}: weights of shape {w.shape} hold a non-finite value ({src[bad[0], bad[1]]}) at index "
            f"{tuple(int(i) for i in idx)}")


def shape_of(f) -> tuple[int, int]:
    br, bc = f.block_shape
    return max(8, 2 * br), 2 * max(bc, 256)


def refused(f, w, **kw) -> str:
    with pytest.raises(NonFiniteError) as e:
        f.quantize(w, **kw)
    return str(e.value)


@pytest.mark.parametrize("tag", CHECKING)
def test_same_error_as_the_scan(tag):
    f = get_format(tag)
    rows, cols = shape_of(f)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    good = f.quantize(w)
    positions = [(0, 0), (0, cols - 1), (rows // 2, cols // 2), (rows - 1, cols - 1), (rows - 1, 0), (3, 5)]
    for v in (np.nan, np.inf, -np.inf):
        for pos in positions:
            for other in (None, (rows - 1, cols - 1), (rows // 2, 3)):  # a second one, later or earlier
                x = w.copy()
                x[pos] = v
                if other is not None:
                    x[other] = -v
                for dt in (np.float32, np.float16, np.float64):
                    xx = x.astype(dt)
                    assert refused(f, xx) == expected(tag, xx), (v, pos, other, dt)
    # a 3-D tensor names its own index; a transposed (non-contiguous) view too
    x = w.reshape(2, rows // 2, cols).copy()
    x[1, 2, 5] = np.nan
    assert refused(f, x) == expected(tag, x)
    t = w.T.copy().T  # w's values in Fortran order
    t[rows - 1, 3] = np.inf
    t[rows - 2, cols - 1] = np.nan
    assert not t.flags.c_contiguous
    assert refused(f, t) == expected(tag, t)
    # the kernels' row skip leaves nothing behind: the same bytes after
    np.testing.assert_array_equal(f.quantize(w), good)


@pytest.mark.parametrize("tag", WEIGHTED)
def test_weighted_path(tag):
    f = get_format(tag)
    rows, cols = shape_of(f)
    w = np.random.default_rng(8).standard_normal((rows, cols), dtype=np.float32)
    qw = np.linspace(0.5, 2.0, cols, dtype=np.float32)
    for pos in ((0, 0), (rows - 1, cols - 1), (5, 100)):
        x = w.copy()
        x[pos] = np.nan
        assert refused(f, x, quant_weights=qw) == expected(tag, x)


# Q4_K/Q5_K at 3e19: finite, but its square overflows float32, so the row kernel's sums of squares
# flag the row (sms_prep) and the exact re-check must find it finite (a RangeError, not a NaN/inf)
@pytest.mark.parametrize(("tag", "big"), [("Q8_0", 1e10), ("Q4_0", 1e10), ("Q6_K", 1e19), ("Q3_K", 1e19),
                                          ("IQ4N", 1e10), ("F16", 1e6), ("BF16", 3.4e38), ("Q8_B", 3e38),
                                          ("Q4_K", 3e19), ("Q5_K", 3e19), ("Q4_K", 1e8), ("Q2_K", 1e8)])
def test_nonfinite_wins_over_a_range_error_in_an_earlier_row(tag, big):
    f = get_format(tag)
    rows, cols = shape_of(f)
    w = np.random.default_rng(9).standard_normal((rows, cols), dtype=np.float32)
    w[0, 3] = big
    if tag == "Q8_B":
        w[0, :128] = big  # a block spanning more than float32: max |w - mean| overflows
        w[0, 3] = -big
    with pytest.raises(RangeError):
        f.quantize(w)
    w[rows - 1, 7] = np.inf
    assert refused(f, w) == expected(tag, w)


def test_a_format_without_checks_finite_keeps_the_scan():
    class Blind(BlockFormat):  # its quantize_blocks would store NaN happily
        tag = "BLND"
        block_shape = (1, 4)
        block_bytes = 16

        def quantize_blocks(self, blocks):
            return blocks.astype(np.float32).view(np.uint8).reshape(-1, 16)

    f = Blind()
    assert not f.checks_finite
    w = np.ones((3, 8), np.float32)
    w[2, 1] = np.nan
    assert refused(f, w) == expected("BLND", w)


def test_nonfinite_rows_protocol():
    """A kernel's NONFINITE_ROW rows reach quantize as NonFiniteRows; rows the kernel flags wrongly (none
    there) fall back to the whole scan, and flags without any NaN/inf are a bug, not a user error."""
    from quantfmt import format as fmtmod

    class Flagger(BlockFormat):
        tag = "FLGR"
        block_shape = (1, 4)
        block_bytes = 16
        checks_finite = True
        flag: list = []

        def _quantize(self, w):
            bad = np.full(w.shape[0], -1, np.int64)
            bad[self.flag] = NONFINITE_ROW
            fmtmod.nonfinite_rows(bad)
            return np.zeros(self.nbytes(w.shape), np.uint8)

    f = Flagger()
    w = np.ones((4, 8), np.float32)
    w[2, 3] = -np.inf
    f.flag = [0, 2]  # row 0 wrongly flagged: the first flagged row holding one wins
    assert refused(f, w) == expected("FLGR", w)
    f.flag = [1]  # the wrong row only: the whole scan finds it
    assert refused(f, w) == expected("FLGR", w)
    f.flag = [1]
    with pytest.raises(AssertionError, match="reported in weights that hold none"):
        f.quantize(np.ones((4, 8), np.float32))
    with pytest.raises(NonFiniteRows):
        fmtmod.nonfinite_rows(np.array([-1, NONFINITE_ROW]))
