"""F32, F16, BF16 against independent references: numpy's casts and the gguf package's quantizer."""

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quantfmt import QTensor, get_format
from quantfmt.errors import NonFiniteError, RangeError
from quantfmt_formats.plain import bf16_from_f32_ref


def corpus(rng):
    w = rng.standard_normal((64, 256)).astype(np.float32)
    # bf16 ties (low half exactly 0x8000) with even and odd kept bits, zeros of both signs,
    # subnormals, fp16 limits and ties, large bf16-representable values.
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x00008000, 0x7F7F0000, 0x007F8000], np.uint32)
    ties = ties.view(np.float32)
    special = np.array([0.0, -0.0, 1e-45, -1e-40, 65504.0, 65519.99, -65519.0, 6.1e-5, 3.38e38, -3.38e38], np.float32)
    w[0, : ties.size] = ties
    w[1, : special.size] = special
    return w


def test_bf16_identical_to_gguf(rng):
    w = corpus(rng)
    ours = get_format("BF16").quantize(w)
    ref = gq.quantize(w, T.BF16).view(np.uint8).reshape(-1)
    assert np.array_equal(ours, ref)
    assert np.array_equal(ours.view(np.uint16), bf16_from_f32_ref(w).reshape(-1))


def test_f16_identical_to_numpy_cast(rng):
    w = corpus(rng)
    w[:2] = np.clip(w[:2], -65504, 65504)  # the bf16 extremes do not fit F16; tested below
    assert np.array_equal(get_format("F16").quantize(w), w.astype("<f2").view(np.uint8).reshape(-1))


def test_f16_rounding_against_hand_derived_bits():
    # Ties between two fp16 neighbours go to the even one; derived by hand from IEEE 754, not numpy.
    cases = {
        1.0 + 2.0**-11: 0x3C00,      # tie between 1.0 (0x3C00) and 1+2^-10 (0x3C01): even is 0x3C00
        1.0 + 3 * 2.0**-11: 0x3C02,  # tie between 0x3C01 and 0x3C02: even is 0x3C02
        65504.0: 0x7BFF,             # the largest finite fp16
        65519.0: 0x7BFF,             # below the 65520 tie, which would round to infinity
        2.0**-24: 0x0001,            # the smallest subnormal
        2.0**-25: 0x0000,            # tie between 0 and 2^-24: even is 0
        3 * 2.0**-25: 0x0002,        # tie between 2^-24 and 2^-23: even is 0x0002
        -0.0: 0x8000,
        -2.0: 0xC000,
    }
    w = np.array([list(cases)], np.float32)
    got = get_format("F16").quantize(w).view("<u2")
    assert [hex(b) for b in got] == [hex(b) for b in cases.values()]


def test_bf16_every_finite_bit_pattern_class_rounds_as_the_reference(rng):
    # Random finite bit patterns over the whole float32 range (every exponent, both signs, ties and
    # subnormals), more than one kernel chunk with a ragged tail: the kernel's 32-bit vector arithmetic
    # against numpy's rounding, element by element.
    from quantfmt_formats._bf16 import CHUNK

    u = rng.integers(0, 2**32, 2 * CHUNK + 4099, dtype=np.uint64).astype(np.uint32)
    u = u[(u & 0x7F800000) != 0x7F800000]  # finite
    u = u[(u & 0x7FFFFFFF) < 0x7F7F8000]  # and below the value that rounds to bf16 infinity
    u[:6] = [0x3F808000, 0x3F818000, 0x7F7F7FFF, 0xFF7F7FFF, 0x00008000, 0x80018000]  # ties, the largest
    w = u.view(np.float32)
    got = get_format("BF16").quantize(w[None])
    assert np.array_equal(got.view("<u2"), bf16_from_f32_ref(w))


@pytest.mark.parametrize("bits", [0x7F7F8000, 0xFF7FFFFF, 0x7F800000, 0x7FFFFFFF, 0xFFFFFFFF])
def test_bf16_flags_an_overflow_or_nonfinite_in_any_chunk(bits):
    # one bad value at the very end of the last chunk (a NaN whose mantissa carries into the sign
    # would round to +-0 if only the result were checked)
    from quantfmt_formats._bf16 import CHUNK

    u = np.full((3, CHUNK + 7), 0x3F800000, np.uint32)
    u[2, -1] = bits
    with pytest.raises((RangeError, NonFiniteError), match=r"row 2, column 65542|index \(2, 65542\)"):
        get_format("BF16").quantize(u.view(np.float32))


@pytest.mark.parametrize("tag,value", [("F16", 65520.0), ("F16", -1e6), ("BF16", 3.3962e38), ("BF16", -3.4e38)])
def test_overflow_is_range_error_naming_position(tag, value):
    w = np.zeros((4, 8), np.float32)
    w[2, 5] = value
    with pytest.raises(RangeError, match=rf"{tag}: weight .* at row 2, column 5"):
        get_format(tag).quantize(w)


@pytest.mark.parametrize("tag", ["F32", "F16", "BF16"])
def test_kernels_agree_with_dequantize(tag, rng):
    w = rng.standard_normal((3, 40, 96)).astype(np.float32)
    t = QTensor.quantize(w, tag, "w")
    d = t.dequantize()
    assert d.shape == w.shape and d.dtype == np.float32
    flat = d.reshape(-1, 96)
    assert np.array_equal(t.rows([0, 119, -1, 7, 7]), flat[[0, 119, -1, 7, 7]])
    x = rng.standard_normal((5, 96)).astype(np.float32)
    np.testing.assert_allclose(t.matmul(x), x @ flat.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(t.matmul(x[0]), flat @ x[0], rtol=1e-5, atol=1e-4)
    if tag == "F32":
        assert np.array_equal(d, w)


@pytest.mark.parametrize("tag", ["F32", "BF16"])
def test_any_byte_order_gives_the_same_bytes(tag, rng):
    w = rng.standard_normal((8, 64)).astype(np.float32)
    f = get_format(tag)
    assert np.array_equal(f.quantize(w.astype(">f4")), f.quantize(w))
    x = rng.standard_normal(64)
    assert np.array_equal(f.qmatmul(f.quantize(w), w.shape, x.astype(">f8")), f.qmatmul(f.quantize(w), w.shape, x))


def test_f64_widening_is_numpys_exact_cast(rng):
    w = rng.standard_normal((301, 999)).astype(np.float32)
    w[0, :4] = [-0.0, 1e-45, -3.4e38, 65504.0]
    got = get_format("F64").quantize(w)
    assert np.array_equal(got, w.astype("<f8").reshape(-1).view(np.uint8))


@pytest.mark.parametrize("n", [1, 3, 8, 9, 40])
def test_f64_qmatmul_runs_f32_kernels_on_a_float32_copy(n):
    # prepare converts once; the product is F32's on those values (matvec, or per-thread sgemm)
    from quantfmt.families import per_thread_sgemm, prefill_threads

    rng = np.random.default_rng(n)
    rows, cols = 301, 130
    w = rng.standard_normal((rows, cols))
    fmt = get_format("F64")
    data = fmt.quantize(w)
    prep = fmt.prepare(data, rows, cols)
    assert prep.dtype == np.float32 and prep.shape == (rows, cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    got = fmt.qmatmul(data, (rows, cols), x, prepared=prep)
    ref = x.astype(np.float64) @ w.astype(np.float32).astype(np.float64).T
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got, get_format("F32").qmatmul(get_format("F32").quantize(w), (rows, cols), x))
    path = fmt.kernel_path("qmatmul", n)
    per_thread = f"{per_thread_sgemm()}-per-thread" if prefill_threads() else "blas"
    assert path == "float32-copy+" + ("matvec" if n <= 8 else per_thread)
