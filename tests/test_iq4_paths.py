"""The vector kernels of IQ4_NL/IQ4_XS's scale search (plugins/_iq4.py): both paths ("simd16" where the
CPU has AVX-512, "portable" everywhere) against the numpy reference, bit for bit, on this machine.
The formats' byte-identity with ggml is tested in test_golden.py / test_iq4_xs.py (on the path this CPU
selects); here each path is called directly, so the one the CPU does not select is covered too."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from quantfmt import cpu
from quantfmt_formats import _iq4

PATHS = ["portable"] + (["simd16"] if cpu.has("avx512f") else [])


def _kernels(path):
    fit16 = _iq4.fit16_simd16 if path == "simd16" else _iq4.fit16_portable
    pack32 = _iq4.pack32_simd16 if path == "simd16" else _iq4.pack32_portable

    @numba.njit
    def fits(x, wt, mx, sums):  # x (n, 32), wt (n, 32), mx (n,) -> sums (n, 32)
        xf = x.reshape(-1)
        for b in range(x.shape[0]):
            fit16(xf, b * 32, wt[b], mx[b], sums[b])

    @numba.njit
    def packs(x, idd, out):  # x (n, 32), idd (n,) -> out (n, 16)
        xf = x.reshape(-1)
        of = out.reshape(-1)
        for b in range(x.shape[0]):
            pack32(xf, b * 32, idd[b], of, b * 16)

    return fits, packs


def test_midpoint_count_is_best_index():
    # best(a) = #{k: a >= M[k]}: near every midpoint and bucket edge, ulp by ulp, and at random
    # (the kernels rely on it; checked exhaustively over all float32 when it was written)
    edges = np.concatenate([_iq4.MID, (8 * np.arange(33) - 128).astype(np.float32), _iq4.VF])
    steps = np.arange(-300, 301, dtype=np.int32)
    near = (edges.astype(np.float32).view(np.int32)[:, None] + steps[None, :]).view(np.float32).reshape(-1)
    # (crossing zero through int bits gives NaNs: skipped)
    rng = np.random.default_rng(0)
    a = np.concatenate([near, rng.uniform(-140, 140, 100000).astype(np.float32),
                        np.float32([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, np.inf, -np.inf])])
    a = a[~np.isnan(a)]
    count = (a[:, None] >= _iq4.MID[None, :]).sum(axis=1)
    assert (count == _iq4.best_index_ref(a)).all()


def _blocks(rng, n=3000):
    x = rng.standard_normal((n, 32)).astype(np.float32)
    x[::7] *= np.float32(1e-3)
    x[::11] *= np.float32(1e5)
    x[::13] = np.round(x[::13] * 4) / 4  # ties: exact midpoints after scaling
    x[5, 3:] = 0
    x[17] = np.float32(-2.5)  # equal maxima
    x[19, 0] = np.float32(1e-14)
    return x


@pytest.mark.parametrize("path", PATHS)
def test_fit16_sums_equal_reference(path, rng):
    fits, _ = _kernels(path)
    x = _blocks(rng)
    wt = (x * x) * rng.uniform(0.5, 2, x.shape).astype(np.float32)
    i = np.abs(x).argmax(axis=1)
    mx = x[np.arange(x.shape[0]), i]
    keep = np.abs(mx) >= _iq4.GROUP_MAX_EPS
    x, wt, mx = x[keep], wt[keep], mx[keep]
    sums = np.empty((x.shape[0], 64), np.float32)
    fits(x, wt, mx, sums)
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        ids = [np.float32(1) / (-mx / _iq4.VF[0])] + [np.float32(itry - 127) / mx for itry in range(-7, 8)]
        for t, idd in enumerate(ids):
            _, sqx, sq2 = _iq4.fit_ref(x, wt, idd.astype(np.float32))
            assert np.array_equal(sums[:, t].view(np.int32), sqx.view(np.int32)), t
            assert np.array_equal(sums[:, 16 + t].view(np.int32), sq2.view(np.int32)), t


@pytest.mark.parametrize("path", PATHS)
def test_pack32_equals_best_index(path, rng):
    _, packs = _kernels(path)
    x = _blocks(rng)
    x[0, :4] = [np.inf, -np.inf, 0.0, -0.0]
    with np.errstate(divide="ignore"):  # a block of zeros: idd = inf, NaN indices
        idd = (np.float32(120) / np.abs(x).max(axis=1)).astype(np.float32)
    idd[1] = np.inf  # inf * 0 = NaN: index 14
    x[1, 7] = 0.0
    idd[2] = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        L = _iq4.best_index_ref(x * idd[:, None])
    out = np.empty((x.shape[0], 16), np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):
        packs(x, idd, out)
    assert np.array_equal(out, L[:, :16] | (L[:, 16:] << 4))
    assert (L[1, 7] == 14) and (out[1, 7] & 15) == 14


@pytest.mark.skipif("simd16" not in PATHS, reason="AVX-512 only")
def test_fit_value_is_table_at_best_index():
    # fit16's cheaper lookup (simd16): V[best(a)] for |a| <= 134.01 from FMA-numbered buckets, ulp by
    # ulp near every midpoint and bucket edge, at random and at the range's ends (checked exhaustively
    # over every float32 in the range when it was written)
    fv = _iq4.fit_value16

    @numba.njit
    def values(a, out):
        for o in range(0, a.size, 16):
            fv(a, o, out)

    edges = np.concatenate([_iq4.MID, (np.arange(33) - 15.5) / _iq4.FS, _iq4.VF, [134.01, -134.01, 0.0]])
    steps = np.arange(-300, 301, dtype=np.int32)
    near = (edges.astype(np.float32).view(np.int32)[:, None] + steps[None, :]).view(np.float32).reshape(-1)
    rng = np.random.default_rng(1)
    a = np.concatenate([near, rng.uniform(-134.01, 134.01, 100000).astype(np.float32),
                        np.float32([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45])])
    a = a[np.abs(a) <= np.float32(134.01)]
    a = np.ascontiguousarray(a[: a.size // 16 * 16])
    out = np.empty_like(a)
    values(a, out)
    assert np.array_equal(out, _iq4.VF[_iq4.best_index_ref(a)])


def test_search_scales_equal_reference(rng):
    # the path this CPU selects (simd16: fit16_pick, the choice as a vector walk; portable: fit16 and
    # the scalar choice) against numpy, with blocks whose sums overflow (inf compares) or vanish
    x = _blocks(rng)
    x[::17] *= np.float32(1e9)
    x[::19] *= np.float32(1e-20)
    x[3] = 0.0  # a block of zeros beside one that is not, and the reverse
    x[6] = 0.0
    x[23, :] = np.float32(3.0)  # all fits alike
    # (negative weights, which ggml does not check for: sumq2 <= 0 in some fits, > 0 in others)
    for wt in ((x * x), (x * x) * rng.uniform(0, 2, x.shape), (x * x) * rng.uniform(-1, 1, x.shape)):
        wt = np.ascontiguousarray(wt, np.float32)
        wt[29] = 0.0  # sumq2 = 0 in every fit: d = 0
        for n in (x.shape[0], x.shape[0] - 1):  # (simd16 goes two blocks at a time: an odd count too)
            S = np.empty((n, 64), np.float32)
            d = np.empty(n, np.float32)
            with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
                _iq4.search_scales(np.ascontiguousarray(x[:n]).reshape(-1), 0, np.ascontiguousarray(wt[:n]), S, d)
                ref = _iq4.search_scales_ref(x[:n], wt[:n])
            assert np.array_equal(d.view(np.int32), ref.view(np.int32))
