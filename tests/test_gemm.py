"""quantfmt.gemm's AVX-512 kernels against a float64 product, every micro-kernel and remainder path."""

import numpy as np
import pytest

from quantfmt import cpu, gemm
from quantfmt.families import padded_xt

pytestmark = pytest.mark.skipif(not cpu.has("avx512f"), reason="quantfmt.gemm runs where the CPU has AVX-512")


def _close(got, ref, k):
    # float32 sums of k products of N(0, 1) values, in blocks: the error of BLAS's order, with room
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * k + 1e-5)


@pytest.mark.parametrize("r", [1, 5, 6, 7, 13, 64])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 64, 80, 130])
@pytest.mark.parametrize("k", [1, 3, 257, 600])
def test_rows_times(r, n, k):
    rng = np.random.default_rng(r * 1000 + n * 10 + k)
    x = rng.standard_normal((n, k), dtype=np.float32)
    big = rng.standard_normal((r, k + 9), dtype=np.float32)
    w = big[:, 3 : 3 + k]  # rows contiguous, row stride past the row's end, unaligned start
    xt = padded_xt(x)
    ct = np.full((r, xt.shape[1]), np.nan, np.float32)
    gemm.rows_times(w, xt, ct)
    _close(ct[:, :n], w.astype(np.float64) @ x.T.astype(np.float64), k)
    assert np.all(ct[:, n:] == 0)  # the padded activation columns: zeros times anything finite


@pytest.mark.parametrize("r", [1, 15, 16, 31, 32, 33, 80])
@pytest.mark.parametrize("n", [1, 3, 4, 11, 12, 13, 16, 30, 128])
@pytest.mark.parametrize("k", [2, 256, 513])
def test_times_cols(r, n, k):
    rng = np.random.default_rng(r * 1000 + n * 10 + k)
    x = rng.standard_normal((n, k), dtype=np.float32)
    wt_big = rng.standard_normal((k, r + 5), dtype=np.float32)
    wt = wt_big[:, :r]  # a tile's W.T: rows padded past r
    out_big = np.full((n, r + 7), np.nan, np.float32)
    out = out_big[:, 2 : 2 + r]  # a column range of the whole output
    gemm.times_cols(padded_xt(x), wt, out)
    _close(out, x.astype(np.float64) @ wt.astype(np.float64), k)
    assert np.isnan(out_big[:, :2]).all() and np.isnan(out_big[:, 2 + r :]).all()  # nothing outside


def test_nonfinite_weights_propagate():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 300), dtype=np.float32)
    w = rng.standard_normal((7, 300), dtype=np.float32)
    w[2, 299], w[4, 0] = np.inf, np.nan
    ct = np.empty((7, 32), np.float32)
    gemm.rows_times(w, padded_xt(x), ct)
    assert np.isnan(ct[4, :20]).all() and not np.isfinite(ct[2, :20]).any()
    assert np.isfinite(np.delete(ct[:, :20], [2, 4], axis=0)).all()


def test_blocks_of_k_are_summed_from_zero(monkeypatch):
    # K in several KC blocks gives the same values (up to rounding) as one block: the add path
    rng = np.random.default_rng(1)
    x = rng.standard_normal((24, 1000), dtype=np.float32)
    w = rng.standard_normal((12, 1000), dtype=np.float32)
    got = {}
    for kc in (64, 1000):
        monkeypatch.setattr(gemm, "KC", kc)
        ct = np.empty((12, 32), np.float32)
        gemm.rows_times(w, padded_xt(x), ct)
        got[kc] = ct[:, :24]
    ref = w.astype(np.float64) @ x.T.astype(np.float64)
    _close(got[64], ref, 1000)
    _close(got[1000], ref, 1000)


def test_strided_or_foreign_weights_are_read_as_values():
    # a column-strided view or a big-endian array: copied, not read through the wrong strides or bytes
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 96), dtype=np.float32)
    big = rng.standard_normal((40, 192), dtype=np.float32)
    ref64 = x.astype(np.float64)
    for w in (big[:, ::2], big[:, :96].astype(">f4")):
        ct = np.empty((40, 32), np.float32)
        gemm.rows_times(w, padded_xt(x), ct)
        _close(ct[:, :20], w.astype(np.float64) @ ref64.T, 96)
    for wt in (big[:32, :96].T, big[:32, :96].T.astype(">f4", order="C")):  # (96, 32): transposed view, big-endian
        out = np.empty((20, 32), np.float32)
        gemm.times_cols(padded_xt(x), wt, out)
        _close(out, ref64 @ wt.astype(np.float64), 96)
