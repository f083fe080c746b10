"""Q5_0, Q5_1, IQ4_NL (tag IQ4N), MXFP4 (tag MXF4): numba kernels == numpy references == ggml, byte for byte.

Authorities: the golden vectors (tests/golden/*.npz, ggml's C reference without FMA), the gguf
package where it has a quantizer (Q5_0, Q5_1, MXFP4) and, under the opt-in marker `oracle`,
ggml's C library itself (quantfmt.oracle) on a random + adversarial corpus. Dequantize is
checked bit for bit against gguf.quants.dequantize; qmatmul against each format's numpy
transcription of ggml's dot product (qmatmul_q8_ref). The conformance kit runs on every
built-in format in test_conformance.py.
"""

import ctypes
import ctypes.util
import warnings
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantfmt import get_format
from quantfmt.errors import NonFiniteError, RangeError, ShapeError
from quantfmt_formats import iq4_nl, mxfp4, q5_0, q5_1

MODULES = {"Q5_0": q5_0, "Q5_1": q5_1, "IQ4N": iq4_nl, "MXF4": mxfp4}
GGML = {"Q5_0": "Q5_0", "Q5_1": "Q5_1", "IQ4N": "IQ4_NL", "MXF4": "MXFP4"}
GGUF_QUANTIZES = ("Q5_0", "Q5_1", "MXF4")
TAGS = list(MODULES)
GOLDEN = Path(__file__).parent / "golden"
ZERO_ROWS = (3, 4)  # the golden recipe's rows of +-0.0 blocks
WEIGHTED = ("Q5_0", "Q5_1", "IQ4N")  # formats whose ggml quantizer takes importance weights (MXFP4's ignores them)


def weighted_ref(tag, w, qw):
    return MODULES[tag].quantize_ref(w, qw)


def f32(a):
    return np.asarray(a, np.float32)


def block_rows(blocks):
    return f32(np.stack([f32(b) for b in blocks]))


def gguf_bytes(w, tag):
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gguf_quantize(w, GT[GGML[tag]]).reshape(-1)


def gguf_deq(data, rows, tag):
    with np.errstate(all="ignore"):
        return gguf_dequantize(data.reshape(rows, -1), GT[GGML[tag]])


def same_bits(a, b):
    """Equal float32 bit patterns, except that any NaN equals any NaN."""
    a, b = f32(a), f32(b)
    nan = np.isnan(a)
    return a.shape == b.shape and (nan == np.isnan(b)).all() and (a.view(np.uint32) == b.view(np.uint32))[~nan].all()


# ---- the adversarial corpus --------------------------------------------------------------


def _ties(tag, rng):
    """Blocks whose values sit exactly on the rounding boundaries of each format."""
    out = []
    for d in (1.0, 0.5, 3.0, 0.1, 7.0, 2.0**-20):
        for _ in range(4):
            h = rng.integers(-16, 16, 32) + 0.5
            if tag == "Q5_0":  # x*id + 16.5 exactly on an integer: the max pins d = max/-16
                x = h.clip(-15.5, 15.5) * d
                x[rng.integers(32)] = -16 * d * rng.choice([1, -1])
            elif tag == "Q5_1":  # (x - min)*id + 0.5 on an integer: min 0, max 31*d
                x = (h.clip(-15.5, 15.5) + 15.5) * d
                x[rng.integers(32)] = 0.0
                x[rng.integers(32)] = 31 * d
            elif tag == "IQ4N":  # midpoints between table values, scaled by the max
                v = iq4_nl.KVALUES.astype(np.float64)
                mids = (v[:-1] + v[1:]) / 2
                x = rng.choice(mids, 32) * d / 127
                x[rng.integers(32)] = d * rng.choice([1, -1])
            else:  # MXFP4: halfway between doubled E2M1 values times the scale h(e)
                v = np.array([0, 1, 2, 3, 4, 6, 8, 12], np.float64)
                mids = np.concatenate([(v[:-1] + v[1:]) / 2, v])
                x = rng.choice(mids, 32) * rng.choice([1, -1], 32) * d
            out.append(x)
    return out


def adversarial_corpus(tag):
    """(name, float32 matrix) pairs: the cases of formats.md, each a few times over."""
    rng = np.random.default_rng(20261130)
    out = []
    for scale in (1e-30, 1e-12, 1e-3, 1.0, 50.0, 3e3):
        out.append((f"normal*{scale:g}", f32(rng.standard_normal((6, 128)) * scale)))
    out.append(("normal-mixed-scales", f32(rng.standard_normal((16, 64)) * 10.0 ** rng.uniform(-6, 4, (16, 1)))))
    out.append(("uniform-ints", f32(rng.integers(-20, 21, (8, 96)))))
    out.append(("positive", f32(np.abs(rng.standard_normal((8, 64))) + 0.5)))
    out.append(("ties", block_rows(_ties(tag, rng))))
    z = np.zeros(32)
    z[rng.integers(32, size=5)] = -0.0
    out.append(("zero-blocks", block_rows([np.zeros(32), z])))
    ones = []
    for v in (1.0, -1.0, 3e-5, -7e3, 1e-40, -1e-44, 65504.0, 1e-15, 9.9e-16):
        for pos in (0, 13, 31):
            x = np.zeros(32)
            x[pos] = v
            ones.append(x)
    out.append(("one-nonzero", block_rows(ones)))
    pm = []
    for m in (1.0, 2.5, 1e-3, 6e4):
        for i, j in ((0, 31), (31, 0), (5, 6), (17, 3)):
            x = rng.uniform(-m, m, 32) * 0.9
            x[i], x[j] = m, -m
            pm.append(x)
    out.append(("plus-minus-max", block_rows(pm)))
    out.append(("fp16-valued", rng.standard_normal((8, 64)).astype(np.float16).astype(np.float32)))
    bits = rng.standard_normal((8, 64)).astype(np.float32).view(np.uint32)
    out.append(("bf16-valued", (bits & np.uint32(0xFFFF0000)).view(np.float32)))
    tiny = 2.0**-149
    den = [rng.integers(-50, 50, 32) * tiny, rng.integers(-(2**22), 2**22, 32) * tiny]
    den += [rng.uniform(-1, 1, 32) * 2.0**e for e in (-127, -125, -124, -122, -118, -100, -60)]
    out.append(("denormals-and-tiny", block_rows(den)))
    small = []
    for e in range(-30, -12):  # scales around fp16's subnormals and its underflow to zero
        x = rng.standard_normal(32)
        small.append(x / np.abs(x).max() * 2.0**e * 16)
    out.append(("fp16-underflow", block_rows(small)))
    lim = getattr(get_format(tag), "safe_abs", None) or get_format(tag).max_abs or 3e38
    p2 = []  # block maxima at and just below powers of two (MXFP4's exponent; any scale rounding)
    for k in [k for k in range(-140, 128, 7) if 2.0**k < lim]:
        for s in (0, 1, 2, 5):
            amax = np.uint32(np.float32(2.0**k).view(np.uint32) - s).view(np.float32)
            x = rng.uniform(-1, 1, 32) * float(amax)
            x[rng.integers(32)] = float(amax) * rng.choice([1, -1])
            p2.append(x)
    out.append(("powers-of-two", block_rows(p2)))
    big = []
    for v in (np.nextafter(np.float32(lim), np.float32(0)), np.float32(lim * 0.75)):
        x = rng.uniform(-1, 1, 32) * 100
        if tag == "Q5_1":
            x = rng.uniform(0, 1, 32) * 1e5 - float(v)
            x[3] = -float(v)
        else:
            x[7] = v
        big.append(x)
    if tag == "MXF4":
        big += [rng.uniform(-1, 1, 32) * 3e38, np.full(32, 3.4e38)]
    out.append(("near-the-limit", block_rows(big)))
    return out


def signed_zero_blocks(tag, w):
    """Blocks (flat indices) where gguf may store the sign of a zero scale or minimum otherwise
    than ggml's C loop: all-zero blocks (Q5_0's d), and a zero minimum (or, in an all-zero
    block, maximum) present as both +0.0 and -0.0 (Q5_1's m, d)."""
    x = w.reshape(-1, 32)
    zero = x == 0
    if tag == "Q5_0":
        return np.flatnonzero(zero.all(1))
    mixed = (zero & np.signbit(x)).any(1) & (zero & ~np.signbit(x)).any(1)
    return np.flatnonzero(mixed & (x.min(axis=1) == 0))


def assert_same_bytes_except_zero_signs(tag, w, ours, ref):
    """ours == ref, except the sign bit of a zero fp16 d (Q5_0, Q5_1) or m (Q5_1) in the
    blocks of signed_zero_blocks (formats.md: only a zero's sign can differ there)."""
    bb = get_format(tag).block_bytes
    a, b = ours.reshape(-1, bb).copy(), ref.reshape(-1, bb).copy()
    ties = signed_zero_blocks(tag, w) if tag in ("Q5_0", "Q5_1") else np.zeros(0, int)
    for col in (1, 3) if tag == "Q5_1" else (1,):
        a[ties, col] &= 0x7F
        b[ties, col] &= 0x7F
    np.testing.assert_array_equal(a, b)


# ---- quantize: numba == numpy reference == gguf == golden ----------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_quantize_kernel_equals_reference_and_gguf(tag):
    fmt, mod = get_format(tag), MODULES[tag]
    n_blocks = 0
    for name, w in adversarial_corpus(tag):
        ours = fmt.quantize(w)
        np.testing.assert_array_equal(ours, mod.quantize_ref(w), err_msg=f"{tag} {name}: numba != numpy reference")
        if tag in GGUF_QUANTIZES:
            assert_same_bytes_except_zero_signs(tag, w, ours, gguf_bytes(w, tag))
        n_blocks += w.size // 32
    assert n_blocks > 400


EDGE = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0**-149, -(2.0**-149), 2.0**-126, 1e-15, 65504.0, -65504.0]


def block_arrays(limit):
    limit = float(np.float32(limit))
    finite = st.floats(-limit, limit, width=32, allow_nan=False, allow_infinity=False)
    elements = st.one_of(finite, st.sampled_from(EDGE))
    shapes = st.tuples(st.integers(1, 3), st.integers(1, 3).map(lambda b: 32 * b))
    return shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=elements))


def test_weighted_sums_start_from_positive_zero():
    """Found by hypothesis: a block whose weighted terms are all -0.0 (zero importance weights on
    negative values) sums to +0.0 in ggml's `float sumqx = 0; sumqx += ...`, so its scale is +0.0;
    numpy's accumulate, which starts from the first term, gave -0.0 in the reference."""
    from quantfmt_formats import _iq4

    x = np.full((1, 32), -1.0, np.float32)
    _, sumqx, _ = _iq4.fit_ref(x, np.zeros((1, 32), np.float32), np.ones(1, np.float32))
    assert sumqx[0] == 0 and not np.signbit(sumqx[0])
    w = np.full((2, 32), -0.5, np.float32)
    qw = np.zeros(32, np.float32)
    f = get_format("IQ4N")
    assert np.array_equal(f.quantize_weighted(w, qw), iq4_nl.quantize_ref(w, quant_weights=qw))


@pytest.mark.parametrize("tag", sorted(WEIGHTED))
def test_weighted_quantize_where_every_level_has_zero_weight(tag):
    # found by test_quantize_hypothesis: Q5_1's search divided sum_xl by a zero sum_l2 (the only
    # nonzero weight on a zero value), which numba's default error model raised as ZeroDivisionError;
    # C (and the reference) get inf/NaN there, and that candidate loses
    w = np.zeros((1, 32), np.float32)
    w[0, 0] = -162.51758
    qw = np.zeros(32, np.float32)
    qw[1] = 1.75
    np.testing.assert_array_equal(get_format(tag).quantize_weighted(w, qw), weighted_ref(tag, w, qw))


@pytest.mark.parametrize("tag", TAGS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_quantize_hypothesis(tag, data):
    limit = {"Q5_0": 1048000.0, "Q5_1": 32000.0, "IQ4N": 6.8e6, "MXF4": 3e38}[tag]
    w = data.draw(block_arrays(limit))
    scale = data.draw(st.sampled_from([1.0, 1e-3, 1e-20, 2.0**-140]))
    w = (w * np.float32(scale)).astype(np.float32)
    fmt, mod = get_format(tag), MODULES[tag]
    ours = fmt.quantize(w)
    np.testing.assert_array_equal(ours, mod.quantize_ref(w))
    if tag in GGUF_QUANTIZES:
        assert_same_bytes_except_zero_signs(tag, w, ours, gguf_bytes(w, tag))
    assert same_bits(fmt.dequantize(ours, w.shape), mod.dequantize_ref(ours, *w.shape))
    if tag in WEIGHTED:
        qw = data.draw(hnp.arrays(np.float32, w.shape[1], elements=st.floats(0, 100, width=32)))
        try:
            ours = fmt.quantize_weighted(w, qw)
        except RangeError:
            with pytest.raises(RangeError):
                weighted_ref(tag, w, qw)
            return
        np.testing.assert_array_equal(ours, weighted_ref(tag, w, qw))


def golden(tag):
    with np.load(GOLDEN / f"{GGML[tag]}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("tag", TAGS)
def test_quantize_matches_golden_vectors(tag):
    g = golden(tag)
    assert str(g["type"]) == GGML[tag]
    got = get_format(tag).quantize(g["x"]).reshape(g["q"].shape)
    np.testing.assert_array_equal(np.delete(got, ZERO_ROWS, 0), np.delete(g["q"], ZERO_ROWS, 0))
    # the rows of +-0.0 blocks: identical, except Q5_0's sign of a zero d, where we follow gguf
    assert_same_bytes_except_zero_signs(tag, g["x"][list(ZERO_ROWS)], got[list(ZERO_ROWS)], g["q"][list(ZERO_ROWS)])
    if tag == "Q5_0":
        diff = np.argwhere(got != g["q"])
        assert diff.size and (diff[:, 1] % 22 == 1).all()  # there is such a block, and only d's sign differs


@pytest.mark.parametrize("tag", WEIGHTED)
def test_importance_weights_match_golden_vectors(tag):
    g = golden(tag)
    fmt = get_format(tag)
    got = fmt.quantize_weighted(g["x"], g["imatrix"]).reshape(g["q"].shape)
    np.testing.assert_array_equal(got, g["q_imatrix"])
    np.testing.assert_array_equal(got.reshape(-1), weighted_ref(tag, g["x"], g["imatrix"]))
    assert not np.array_equal(got, g["q"])


@pytest.mark.parametrize("tag", WEIGHTED)
def test_importance_weights_kernel_equals_reference(tag, rng):
    fmt = get_format(tag)
    for name, w in adversarial_corpus(tag):
        qw = f32(rng.random(w.shape[1]) * 3)
        qw[rng.integers(w.shape[1])] = 0
        try:
            ours = fmt.quantize_weighted(w, qw)
        except RangeError:
            with pytest.raises(RangeError):
                weighted_ref(tag, w, qw)
            continue
        np.testing.assert_array_equal(ours, weighted_ref(tag, w, qw), err_msg=f"{tag} {name}")


@pytest.mark.parametrize("tag", WEIGHTED)
def test_quantize_weighted_validates_and_leaves_no_state(tag, rng):
    fmt, mod = get_format(tag), MODULES[tag]
    w = f32(rng.standard_normal((4, 64)))
    qw = f32(rng.random(64) + 0.1)
    with pytest.raises(ShapeError, match="quant_weights"):
        fmt.quantize_weighted(w, qw[:32])
    bad = qw.copy()
    bad[5] = np.nan
    with pytest.raises(NonFiniteError, match="column 5"):
        fmt.quantize_weighted(w, bad)
    weighted = fmt.quantize_weighted(w, qw)
    np.testing.assert_array_equal(weighted, weighted_ref(tag, w, qw))
    np.testing.assert_array_equal(fmt.quantize(w), mod.quantize_ref(w))  # weights do not leak into quantize
    assert not np.array_equal(weighted, fmt.quantize(w))


# ---- pieces of the arithmetic, against literal transcriptions ------------------------------


def _ggml_best_index(a):
    """ggml's best_index_int8 (binary search), transcribed literally, in float32."""
    v = [np.float32(k) for k in iq4_nl.KVALUES]
    a = np.float32(a)
    if a <= v[0]:
        return 0
    if a >= v[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if a < v[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if (a - v[mu - 1]) < (v[mu] - a) else mu


def test_iq4_nl_best_index_matches_ggml_search(rng):
    v = iq4_nl.KVALUES.astype(np.float32)
    mids = (v[:-1] + v[1:]) / 2
    pts = np.concatenate(
        [
            v,
            mids,
            np.nextafter(mids, np.float32(-200)),
            np.nextafter(mids, np.float32(200)),
            f32(rng.uniform(-140, 140, 400)),
            f32([-0.0, 0.0, 1e-30, -1e-30, 200, -200, np.nan]),
        ]
    ).astype(np.float32)
    want = np.array([_ggml_best_index(a) if not np.isnan(a) else 14 for a in pts])
    assert (iq4_nl.best_index_ref(pts) == want).all()
    got_nb = np.array([iq4_nl._best(a, iq4_nl._VF, iq4_nl.BRACKET) for a in pts])
    assert (got_nb == want).all()
    assert _ggml_best_index(np.float32(-4.5)) == 8  # a tie goes up


def _libm_log2f():
    name = ctypes.util.find_library("m")
    if not name:
        pytest.skip("no C math library to compare log2f with")
    f = ctypes.CDLL(name).log2f
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return f


def test_mxfp4_exponent_is_floor_of_log2f_near_powers_of_two():
    """ggml's floor(log2f(amax)): log2f rounds up to k just below 2**k, so the exponent is not
    the float's own; ours reproduces the C library's on every float near a power of two."""
    log2f = _libm_log2f()
    xs = []
    for k in range(-148, 128, 3):
        p = int(np.float32(2.0**k).view(np.uint32))
        xs.append(np.arange(max(1, p - 300), p + 8, dtype=np.uint32).view(np.float32))
    xs = np.concatenate(xs)
    xs = xs[np.isfinite(xs)]
    want = np.array([(int(np.floor(log2f(float(a)))) + 125) & 0xFF for a in xs], np.uint8)
    np.testing.assert_array_equal(mxfp4.exponent_ref(xs), want)
    # and the kernel: one block per value, the value as its max
    w = np.zeros((xs.size, 32), np.float32)
    w[:, 7] = xs
    got = get_format("MXF4").quantize(w).reshape(-1, 17)[:, 0]
    np.testing.assert_array_equal(got, want)
    assert (want != ((np.frexp(xs)[1] - 1 + 125) & 0xFF)).sum() > 100  # the rounding-up case is there


def test_mxfp4_e8m0_decoding():
    e = np.arange(256)
    h = mxfp4.e8m0_half(e)
    assert h[0] == np.float32(2.0**-128) and h[1] == np.float32(2.0**-127) and h[254] == np.float32(2.0**126)
    np.testing.assert_array_equal(h[2:], f32(2.0 ** (e[2:] - 128.0)))


# ---- dequantize: == gguf, bit for bit -------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_dequantize_matches_gguf_and_reference(tag):
    fmt, mod = get_format(tag), MODULES[tag]
    for name, w in adversarial_corpus(tag):
        data = fmt.quantize(w)
        ours = fmt.dequantize(data, w.shape)
        assert same_bits(ours, mod.dequantize_ref(data, *w.shape)), name
        assert same_bits(ours, gguf_deq(data, w.shape[0], tag)), name


@pytest.mark.parametrize("tag", TAGS)
def test_dequantize_arbitrary_bytes_matches_gguf(tag):
    """Every byte pattern decodes like gguf: fp16 inf/NaN/subnormal scales, every E8M0 byte."""
    fmt = get_format(tag)
    rng = np.random.default_rng(11)
    rows, cols = 64, 256
    data = rng.integers(0, 256, fmt.nbytes((rows, cols)), dtype=np.uint8)
    if tag == "MXF4":
        data.reshape(-1, 17)[:256, 0] = np.arange(256)
    ours = fmt.dequantize(data, (rows, cols))
    assert same_bits(ours, gguf_deq(data, rows, tag))
    with np.errstate(all="ignore"):  # inf/NaN scales
        assert same_bits(ours, MODULES[tag].dequantize_ref(data, rows, cols))
    if tag != "MXF4":
        assert np.isnan(ours).any()  # the random scales did include NaN patterns


# ---- range errors ------------------------------------------------------------------------------


def test_scale_overflow_boundaries():
    def one(tag, v, pos=5):
        x = np.zeros((1, 32), np.float32)
        x[0, pos] = v
        return get_format(tag).quantize(x)

    below = np.nextafter(np.float32(1048320), np.float32(0))
    assert one("Q5_0", below).size == 22 and one("Q5_0", -below).size == 22
    with pytest.raises(RangeError, match=r"Q5_0: .* columns 0\.\.31"):
        one("Q5_0", 1048320.0)
    # Q5_1: |min| reaches 65520, or max - min reaches 65520*31
    assert one("Q5_1", np.nextafter(np.float32(-65520), np.float32(0))).size == 24
    with pytest.raises(RangeError, match="Q5_1"):
        one("Q5_1", -65520.0)
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1] = -60000.0, 1971120.0  # max - min = 2031120: d = 65520
    with pytest.raises(RangeError, match="Q5_1"):
        get_format("Q5_1").quantize(x)
    # IQ4_NL: a constant block c gets d = c/113 (or -c/127); anything below max_abs fits
    f = get_format("IQ4N")
    assert f.quantize(np.full((1, 32), f.safe_abs, np.float32)).size == 18
    assert f.quantize(np.full((1, 32), -f.safe_abs, np.float32)).size == 18
    with pytest.raises(RangeError, match="IQ4N"):
        f.quantize(np.full((1, 32), 7.5e6, np.float32))
    # MXFP4: never
    assert get_format("MXF4").quantize(np.full((1, 32), 3.4e38, np.float32)).size == 17


def test_iq4_nl_scale_bound_holds_on_adversarial_blocks(rng):
    """|d| <= max|x|/106.09 (formats.md), probed with blocks built to push d up: one max,
    the rest in the bins where x/V is largest."""
    v = iq4_nl.KVALUES.astype(np.float64)
    worst = 0.0
    for _ in range(300):
        s = rng.uniform(120, 134)
        u = rng.choice(np.concatenate([v * rng.uniform(1.0, 1.5), [7, 6.9, 19, 18.9, 101, 100.5, -16, -28.4]]), 32)
        x = u / s
        x[rng.integers(32)] = rng.choice([1.0, -1.0])
        x = f32(x.clip(-1, 1))
        d = iq4_nl.block_scales_ref(x[None, :])[0]
        worst = max(worst, abs(float(d)) / float(np.abs(x).max()))
    assert 1 / 130 < worst <= 1 / 106.09


# ---- get_rows and qmatmul ----------------------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_get_rows(tag, rng):
    fmt = get_format(tag)
    w = f32(rng.standard_normal((20, 96)))
    data = fmt.quantize(w)
    full = fmt.dequantize(data, w.shape)
    idx = np.array([3, 0, 19, 3, -1])
    np.testing.assert_array_equal(fmt.get_rows(data, w.shape, idx), full[idx])


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("n", [1, 3, 9])
def test_qmatmul_q8_matches_ggml_dot(tag, n, rng):
    fmt, mod = get_format(tag), MODULES[tag]
    rows, cols = 40, 320
    w = f32(rng.standard_normal((rows, cols)) + 0.3)
    data = fmt.quantize(w)
    x = f32(rng.standard_normal((n, cols)))
    x[0, :32] *= 1e-3
    ours = fmt.qmatmul(data, w.shape, x, "q8_0")
    ref = mod.qmatmul_q8_ref(data, rows, cols, x)
    wq = fmt.dequantize(data, w.shape)
    mag = np.abs(x) @ np.abs(wq).T
    np.testing.assert_allclose(ours, ref, rtol=0, atol=float(mag.max()) * 4e-6)  # summation order only
    np.testing.assert_allclose(ours, x @ wq.T, rtol=0, atol=float(mag.max()) * 2e-2)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("n", [1, 9])
def test_qmatmul_f32_matches_dequantize(tag, n, rng):
    fmt = get_format(tag)
    w = f32(rng.standard_normal((40, 128)) + 0.5)
    data = fmt.quantize(w)
    wq = fmt.dequantize(data, w.shape)
    x = f32(rng.standard_normal((n, 128)))
    mag = np.abs(x) @ np.abs(wq).T
    np.testing.assert_allclose(fmt.qmatmul(data, w.shape, x), x @ wq.T, rtol=0, atol=float(mag.max()) * 1e-5)


# ---- the format classes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag, ggml_type, vec_dot, aliases",
    [
        ("Q5_0", "Q5_0", "Q8_0", ()),
        ("Q5_1", "Q5_1", "Q8_1", ()),
        ("IQ4N", "IQ4_NL", "Q8_0", ("IQ4_NL",)),
        ("MXF4", "MXFP4", "Q8_0", ("MXFP4",)),
    ],
)
def test_format_attributes(tag, ggml_type, vec_dot, aliases):
    fmt = get_format(tag)
    assert (fmt.ggml_type, fmt.vec_dot_type, tuple(fmt.aliases)) == (ggml_type, vec_dot, aliases)
    assert fmt.modes == ("f32", "q8_0") and fmt.block_shape == (1, 32)
    from gguf import GGML_QUANT_SIZES

    assert GGML_QUANT_SIZES[GT[ggml_type]] == (32, fmt.block_bytes)


@pytest.mark.parametrize("tag", TAGS)
def test_quantize_and_dequantize_kernels_are_compiled_without_fastmath(tag):
    mod = MODULES[tag]
    prefixes = ("_quantize", "_dequantize", "_best", "_fit", "_half")
    kernels = [getattr(mod, n) for n in dir(mod) if n.startswith(prefixes)]
    jitted = [k for k in kernels if hasattr(k, "targetoptions")]
    assert len(jitted) >= 2
    for k in jitted:
        assert not k.targetoptions.get("fastmath"), k


# ---- ggml's C library (opt-in: builds quantfmt.oracle) ----------------------------------------


@pytest.fixture(scope="module")
def ggml_oracle():
    oracle = pytest.importorskip("quantfmt.oracle")
    try:
        return oracle.load()
    except oracle.OracleError as e:
        pytest.skip(f"ggml oracle not available: {e}")


@pytest.mark.oracle
@pytest.mark.parametrize("tag", TAGS)
def test_quantize_matches_ggml_c_library(tag, ggml_oracle):
    fmt = get_format(tag)
    rng = np.random.default_rng(99)
    cases = adversarial_corpus(tag)
    w = rng.standard_normal((256, 1024)) * 10.0 ** rng.uniform(-6, 4, (256, 1))
    w[rng.random(w.shape) < 0.02] = 0.0
    cases.append(("random", f32(w)))
    aborted = 0
    for name, w in cases:
        ours = fmt.quantize(w)
        theirs = ggml_oracle.quantize(GGML[tag], w).reshape(-1)
        if tag == "Q5_0":
            assert_same_bytes_except_zero_signs(tag, w, ours, theirs)  # ggml: -0.0 for every all-zero block
        else:
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{tag} {name}")
        if tag in WEIGHTED:
            qw = f32(rng.random(w.shape[1]) * 4 + 0.01)
            rows = [w]
            if ggml_oracle.would_abort(GGML[tag], w, qw):
                # ggml asserts (nearest_int of NaN) where max - min is so small that 31/(max - min)
                # overflows (Q5_1's denormal blocks): no answer there; compare the other rows
                rows = [r[None] for r in w if not ggml_oracle.would_abort(GGML[tag], r[None], qw)]
                aborted += len(w) - len(rows)
            for x in rows:
                theirs = ggml_oracle.quantize(GGML[tag], x, qw).reshape(-1)
                try:
                    ours = fmt.quantize_weighted(x, qw)
                except RangeError:  # ggml stored an fp16 infinity (the fit can move m or d past the limits)
                    assert not np.isfinite(gguf_deq(theirs, x.shape[0], tag)).all(), name
                    continue
                np.testing.assert_array_equal(ours, theirs, err_msg=f"{tag} {name} weighted")
    assert aborted < 40 and (tag == "Q5_1" or not aborted)


@pytest.mark.oracle
def test_weighted_positive_zero_scale_matches_ggml():
    """ggml's C reference stores +0.0 for the degenerate weighted block above, as we do."""
    from quantfmt import oracle

    if not oracle.available():
        pytest.skip("ggml's C reference cannot be built here")
    w = np.full((2, 32), -0.5, np.float32)
    qw = np.zeros(32, np.float32)
    ref = np.asarray(oracle.load().quantize("IQ4_NL", w, imatrix=qw)).reshape(-1)
    assert np.array_equal(get_format("IQ4N").quantize_weighted(w, qw), ref)


def test_weighted_q5_references_sum_from_positive_zero():
    """Found by hypothesis: tiny weights and importances whose products underflow to -0.0 made the numpy
    reference's scale -0.0 where ggml's C (and the kernel) give +0.0 (checked against the oracle)."""
    w = np.full((1, 32), np.float32(100000) * np.float32(1e-20), np.float32)
    qw = np.full(32, 3.7837415e-25, np.float32)
    for tag in ("Q5_0", "Q5_1"):
        ours = get_format(tag).quantize_weighted(w, qw)
        np.testing.assert_array_equal(ours, weighted_ref(tag, w, qw))


def test_q5_1_weighted_sum_starts_at_the_first_product():
    # found by test_quantize_hypothesis: every weighted value -0.0 (weight only on a -0.0 column). ggml's
    # make_qkx3_quants starts sum_x at w[0]*x[0] = -0.0, so the block's m is -0.0 (0x8000); a reference that
    # summed from +0.0 wrote +0.0. (ggml's C aborts on this block, in nearest_int: no oracle bytes.)
    w = np.full((1, 32), -0.0, np.float32)
    w[0, 1] = np.float32(-65.504)
    qw = np.zeros(32, np.float32)
    qw[0] = 1
    ours = get_format("Q5_1").quantize_weighted(w, qw)
    np.testing.assert_array_equal(ours, weighted_ref("Q5_1", w, qw))
    assert ours[2:4].view("<u2")[0] == 0x8000
