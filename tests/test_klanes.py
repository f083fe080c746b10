"""The k-quants' 16-lane vector searches (plugins/_klanes.py) against the numba lane loops of
plugins/_kquants.py, bit for bit, for every configuration the formats use (LLVM legalizes the generic
vector IR for whatever CPU numba targets: this runs the one of this machine). The formats' bytes
against ggml are tested in test_kquants.py / test_golden.py."""

from __future__ import annotations

import numpy as np
import pytest

from quantfmt_formats import _kquants as K

# (n, nmax, rmin, rdelta, nstep, use_mad): Q4_K, Q5_K (reference and weighted), Q2_K (both)
QKX2 = [(32, 15, -1.0, 0.1, 20, False), (32, 31, -0.5, 0.1, 15, False), (32, 15, -0.9, 0.05, 36, False),
        (16, 3, -0.5, 0.1, 15, True), (16, 3, -0.9, 0.05, 36, False)]


def _lanes(rng, n, M):
    x = rng.standard_normal((n, M)).astype(np.float32)
    x[:, 1] = 0.0  # flat
    x[:, 2] = 3.5  # flat, positive
    x[:, 3] = np.abs(x[:, 3])  # min > 0: clamped to 0
    x[:, 4] *= np.float32(1e-30)
    x[:, 5] *= np.float32(1e30)
    x[:, 6] = np.round(x[:, 6] * 2) / 2  # ties
    x[0, 7], x[1:, 7] = np.float32(1.0), np.nextafter(np.float32(1.0), np.float32(2))  # range of one ulp
    x[:, 8] = -np.abs(x[:, 8])
    # ranges where the vector searches' fast rounding is not ggml's (qkx2 flags these lanes and redoes
    # them in the scalar search): subnormal (iscale overflows to inf), and one past float32 (max - min = inf)
    x[:, 10] *= np.float32(1e-39)
    x[:, 11] = np.where(x[:, 11] > 0, np.float32(3e38), np.float32(-3e38))
    x[:, 12] = np.float32(2e-38) * np.sign(x[:, 12])
    return x


SEEDS = [1, 2, 3, 4]  # seed 4 once caught a NaN comparison (C's != on overflowed sums)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cfg", QKX2)
def test_qkx2_vector_equals_loop(cfg, seed):
    rng = np.random.default_rng(seed)
    n, nmax, rmin, rdelta, nstep, use_mad = cfg
    M = 56  # a group of 32 and one of 16 in the vector code, 8 lanes in the loop
    x = _lanes(rng, n, M)
    w = (np.abs(x) + rng.uniform(0, 1, x.shape)).astype(np.float32)
    w[:, 9] = 0.0
    out = []
    for f in (K.make_qkx2_lanes, K.qkx2_lanes_loop):
        L = np.full((n, M), 77, np.uint8)
        sc = np.empty(M, np.float32)
        mi = np.empty(M, np.float32)
        with np.errstate(all="ignore"):
            f(x, w, L, nmax, np.float32(rmin), np.float32(rdelta), nstep, use_mad, sc, mi)
        out.append((L, sc.view(np.int32), mi.view(np.int32)))
    for a, b in zip(*out, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cfg", QKX2)
@pytest.mark.parametrize("M,used", [(96, 96), (128, 128), (96, 80), (128, 112), (160, 144), (96, 72)])
def test_qkx2_lanes_rows_equal_loop(cfg, seed, M, used):
    """qkx2_lanes32/16, the formats' row searches (pairs of 32-lane groups through each trial together,
    then a last group of 32; the trials that need no upper clamp), against the numba loop, bit for bit;
    exact=True: the lanes they flag searched again by the scalar search. used < M: Q4_K/Q5_K's last
    group of at most 16 used lanes on the 16-lane kernel (only the used lanes are compared)."""
    rng = np.random.default_rng(seed)
    n, nmax, rmin, rdelta, nstep, use_mad = cfg
    x = _lanes(rng, n, M)
    x[:, 40:] = _lanes(rng, n, M - 40)[:, :M - 40]  # special lanes in both groups of the first pair
    x[:, 70] = 0.0  # a flat lane in the second group
    x[:, 72:80] = 0.0  # more zero (pad-like) lanes
    w = (np.abs(x) + rng.uniform(0, 1, x.shape)).astype(np.float32)
    w[:, 9] = 0.0
    out = []
    for f in ("rows", K.qkx2_lanes_loop):
        L = np.full((n, M), 77, np.uint8)
        sc = np.empty(M, np.float32)
        mi = np.empty(M, np.float32)
        with np.errstate(all="ignore"):
            if f == "rows" and n == 32:
                assert K.qkx2_lanes32(x, w, L, nmax, np.float32(rmin), np.float32(rdelta), nstep, sc, mi, used,
                                      True) == 0
            elif f == "rows":
                assert K.qkx2_lanes16(x, w, L, nmax, np.float32(rmin), np.float32(rdelta), nstep, use_mad, sc, mi,
                                      True) == 0
            else:
                f(x, w, L, nmax, np.float32(rmin), np.float32(rdelta), nstep, use_mad, sc, mi)
        out.append((L[:, :used], sc[:used].view(np.int32), mi[:used].view(np.int32)))
    for a, b in zip(*out, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("cfg", [QKX2[0], QKX2[3]])
def test_qkx2_two_groups_equal_loop(cfg):
    """qkx2_16(..., groups=2) (two 32-lane groups through each trial together; not used by the formats,
    see its docstring) against the numba loop."""
    from numba import njit

    from quantfmt_formats._klanes import qkx2_16

    rng = np.random.default_rng(5)
    n, nmax, rmin, rdelta, nstep, use_mad = cfg
    kern = qkx2_16(n, use_mad, 32, 2)

    @njit
    def run(x, w, L, sc, mi):
        m = 0
        for g in range(x.shape[1] // 64):
            m |= kern(x, w, L, nmax, np.float32(rmin), np.float32(rdelta), nstep, sc, mi, g)
        return m

    M = 128
    x = _lanes(rng, n, M)
    x[:, 10:13] = rng.standard_normal((n, 3)).astype(np.float32)  # (no flagged lanes: no scalar redo here)
    x[:, 70] = 0.0
    w = (np.abs(x) + rng.uniform(0, 1, x.shape)).astype(np.float32)
    out = []
    for f in (run, K.qkx2_lanes_loop):
        L = np.full((n, M), 77, np.uint8)
        sc = np.empty(M, np.float32)
        mi = np.empty(M, np.float32)
        with np.errstate(all="ignore"):
            if f is run:
                assert run(x, w, L, sc, mi) == 0
            else:
                f(x, w, L, nmax, np.float32(rmin), np.float32(rdelta), nstep, use_mad, sc, mi)
        out.append((L, sc.view(np.int32), mi.view(np.int32)))
    for a, b in zip(*out, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_qx_vector_equals_loop(weighted, seed):
    rng = np.random.default_rng(seed)
    n, M = 16, 56
    x = _lanes(rng, n, M)
    x[:, 10] = np.float32(1e-16)  # below ggml's 1e-15: L = 0, scale 0
    qw = rng.uniform(0, 2, x.shape).astype(np.float32) if weighted else np.empty((0, 0), np.float32)
    out = []
    for f in (K.make_qx_lanes, K.qx_lanes_loop):
        L = np.full((n, M), 77, np.int8)
        sc = np.empty(M, np.float32)
        with np.errstate(all="ignore"):
            f(x, L, 32, qw, sc)
        out.append((L, sc.view(np.int32)))
    for a, b in zip(*out, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("seed", SEEDS)
def test_q3_vector_equals_scalar(seed):
    rng = np.random.default_rng(seed)
    n, M = 16, 56
    x = _lanes(rng, n, M)
    x[:, 10] = np.float32(1e-16)  # below ggml's 1e-15: L = 0, scale 0
    L = np.full((n, M), 77, np.int8)
    sc = np.empty(M, np.float32)
    with np.errstate(all="ignore"):
        K.make_q3_lanes(x, L, 4, sc)
        for j in range(M):
            Lj = np.empty(n, np.int8)
            s = K.make_q3_quants(np.ascontiguousarray(x[:, j]), Lj, 4)
            assert np.array_equal(L[:, j], Lj), j
            assert sc[j].view(np.int32) == np.float32(s).view(np.int32), j


@pytest.mark.parametrize("n,has_add,lo,hi,bias", [(16, False, -32, 31, 32), (16, False, -4, 3, 4), (16, True, 0, 3, 0),
                                                  (32, True, 0, 15, 0), (32, True, 0, 31, 0)])
def test_qdiv_equals_scalar(n, has_add, lo, hi, bias):
    import numba

    from quantfmt_formats._klanes import qdiv

    qd = qdiv(n, has_add)

    @numba.njit
    def run(x, add, div, L):
        for b in range(x.size // n):
            qd(x, b * n, add, div[b], lo, hi, bias, L, b * n)

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(64 * n) * 10).astype(np.float32)
    x[:n] = np.round(x[:n]) + np.float32(0.5)  # ties (div 1)
    div = rng.uniform(0.5, 4, 64).astype(np.float32)
    div[0], div[1], div[2] = 1.0, np.float32(1e-40), -2.0  # 1e-40: x/div overflows to +-inf
    add = np.float32(0.75) if has_add else np.float32(0.0)
    L = np.empty(x.size, np.int8)
    with np.errstate(all="ignore"):
        run(x, add, div, L)
        v = ((x + add) if has_add else x) / np.repeat(div, n)
    want = np.clip(K.nearest_int_np(v.astype(np.float32)), lo, hi) + bias
    assert np.array_equal(L.astype(np.int64), want)


@pytest.mark.parametrize("n,has_add,lo,hi,bias", [(16, False, -32, 31, 32), (32, True, 0, 15, 0)])
def test_qdiv_near_rounding_boundaries(n, has_add, lo, hi, bias):
    """qdiv where its rounding decides: quotients from a few ulp to a few 2**-12 off k + 1/2, beyond
    the clamps, and past 2**22, where nearest_int's bit trick wraps. (A multiply by the reciprocal
    with the division only near boundaries was tried: no faster, and this test caught its margins.)"""
    import numba

    from quantfmt_formats._klanes import qdiv

    qd = qdiv(n, has_add)

    @numba.njit
    def run(x, add, div, L):
        for b in range(x.size // n):
            qd(x, b * n, add, div[b], lo, hi, bias, L, b * n)

    rng = np.random.default_rng(1)
    blocks = 4000
    k = rng.integers(lo - 2, hi + 2, (blocks, n)).astype(np.float64)
    delta = rng.choice([1e-7, 1e-6, 1e-5, 1.2e-4, 2.4e-4, 2.5e-4, 4e-4, 1e-3, 0.3], (blocks, n))
    q = k + 0.5 + delta * rng.choice([-1.0, 1.0], (blocks, n))
    q[::7] = np.round(q[::7])  # whole blocks far from every boundary
    q[5::97, 3] = rng.uniform(300, 900, q[5::97, 3].shape) * rng.choice([-1.0, 1.0], q[5::97, 3].shape)
    q[9::97, 5] = rng.uniform(2**22, 2**25, q[9::97, 5].shape)  # where nearest_int's bit trick wraps
    div = rng.uniform(0.01, 4, blocks).astype(np.float32)
    add = np.float32(0.375) if has_add else np.float32(0.0)
    x = (q * div[:, None] - add).astype(np.float32).reshape(-1)
    L = np.empty(x.size, np.int8)
    run(x, add, div, L)
    v = ((x + add) if has_add else x) / np.repeat(div, n)
    want = np.clip(K.nearest_int_np(v.astype(np.float32)), lo, hi) + bias
    assert np.array_equal(L.astype(np.int64), want)
