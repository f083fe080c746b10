"""IQ4_XS (tag IQ4X): bytes identical to ggml's C reference (golden vectors in the quick suite; the live
library on random and adversarial data under the opt-in marker `oracle`), the numba kernel equal to the
numpy reference, dequantize equal to gguf's bit for bit, importance weights, qmatmul mode q8_k, and the
range errors. The conformance kit runs on every built-in tag in test_conformance.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quantfmt
from quantfmt.errors import NonFiniteError, RangeError, ShapeError
from quantfmt_formats import iq4_xs
from quantfmt_formats._iq4 import KVALUES

GOLDEN = Path(__file__).parent / "golden"
TAG = "IQ4X"


def fmt():
    return quantfmt.get_format(TAG)


def golden():
    with np.load(GOLDEN / "IQ4_XS.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def f32(a):
    return np.asarray(a, np.float32)


def same_bits(a, b) -> bool:
    """Equal float32 bit patterns, except that any NaN equals any NaN."""
    a, b = f32(a), f32(b)
    nan = np.isnan(a)
    return a.shape == b.shape and (nan == np.isnan(b)).all() and (a.view(np.uint32) == b.view(np.uint32))[~nan].all()


def gguf_deq(data, rows):
    with np.errstate(all="ignore"):
        return gguf_dequantize(np.asarray(data, np.uint8).reshape(rows, -1), GT.IQ4_XS)


def imatrix(cols: int, seed: int = 1) -> np.ndarray:
    return f32(np.random.default_rng(seed).random(cols) * 4 + 0.05)


def corpus(seed: int = 0) -> np.ndarray:
    """Adversarial rows of 512 (two super-blocks): ties of the table, zero and signed-zero (sub-)blocks,
    sub-block magnitudes far apart (6-bit scales clamped at -32, rounded to 0), sub-block scales of both
    signs, one non-zero value, constants, tiny, fp16-subnormal super-scales, float32 subnormals, outliers."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((20, 512)).astype(np.float32)
    i = np.arange(512)
    x = np.zeros((20, 512), np.float32)
    x[0] = g[0]
    v = KVALUES.astype(np.float64)
    mids = (v[:-1] + v[1:]) / 2
    x[1] = rng.choice(mids, 512) / 127
    x[1, ::32] = 1.0  # each sub-block's max pins the first guess on a table value: midpoints are ties
    x[2] = (i % 16) - 8.0
    x[3, 256:] = g[3, 256:]  # a zero super-block, then a normal one
    x[4] = g[4] * ((i // 32) % 2)  # every other sub-block zero
    x[5, :256] = -0.0
    x[5, 256:] = np.where(i[256:] % 2, 0.0, -0.0)
    x[6] = g[6] * np.float32(10.0) ** ((i // 32) % 8 - 4)  # sub-block magnitudes 1e-4 .. 1e3
    x[7] = np.where((i // 32) % 2, 1, -1) * np.abs(g[7])  # sub-blocks of one sign each: scales of both signs
    x[8, :256], x[8, 256:] = 0.7, -3.0  # constant super-blocks
    x[9, 17], x[9, 300] = 2.5, -1.0  # one non-zero value per super-block
    x[10] = 1e-20 * g[10]  # tiny: d underflows fp16
    x[11] = 1e-4 * g[11]  # d in fp16's subnormal range
    x[12] = (g[12] * 1e5).astype(np.int32).astype(np.float32) * np.float32(2.0**-149)  # float32 subnormals
    x[13] = 0.01 * g[13]
    x[13, 5], x[13, 77], x[13, 400] = 1e3, -1e3, 1e4  # outliers
    x[14] = 1e7 * g[14]  # large, within the safe range
    x[15] = g[15].astype(np.float16).astype(np.float32)
    x[16] = np.abs(g[16]) + 10  # one-signed
    x[17] = 2.0 ** rng.integers(-20, 20, 512) * np.sign(g[17])  # powers of two
    x[18, :32] = 1e-15  # a sub-block exactly at GROUP_MAX_EPS beside one just below it
    x[18, 32:64] = np.nextafter(np.float32(1e-15), np.float32(0))
    x[18, 256:] = g[18, 256:] * 1e-14
    x[19] = rng.integers(-3, 4, 512) * np.float32(1 / 3)
    return x


# ---- golden vectors (ggml's C reference, tests/golden) ---------------------------------------


def test_bytes_match_golden():
    g = golden()
    assert str(g["type"]) == "IQ4_XS"
    np.testing.assert_array_equal(fmt().quantize(g["x"]).reshape(g["q"].shape), g["q"])
    np.testing.assert_array_equal(iq4_xs.quantize_ref(g["x"]).reshape(g["q"].shape), g["q"])
    # the rows of +-0.0 blocks store d = -0.0 (0x8000), as ggml's -max_scale/32 with max_scale = +0
    blk = g["q"].reshape(-1, 136)
    zero = (g["x"].reshape(-1, 256) == 0).all(axis=1)
    assert zero.any() and (blk[zero, 1] == 0x80).all()


def test_weighted_bytes_match_golden():
    g = golden()
    got = fmt().quantize_weighted(g["x"], g["imatrix"]).reshape(g["q"].shape)
    np.testing.assert_array_equal(got, g["q_imatrix"])
    np.testing.assert_array_equal(iq4_xs.quantize_ref(g["x"], g["imatrix"]).reshape(g["q"].shape), g["q_imatrix"])
    assert not np.array_equal(got, g["q"])


# ---- numba kernel == numpy reference -----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_equals_numpy_reference(seed):
    f = fmt()
    rng = np.random.default_rng(seed + 10)
    x = np.concatenate([corpus(seed), f32(rng.standard_normal((6, 512)) * 10.0 ** rng.uniform(-8, 6, (6, 1)))])
    np.testing.assert_array_equal(f.quantize(x), iq4_xs.quantize_ref(x))
    qw = imatrix(512, seed)
    qw[rng.integers(512, size=40)] = 0  # zero weights: sub-blocks whose sumq2 can be 0
    qw[:32] = 0
    np.testing.assert_array_equal(f.quantize_weighted(x, qw), iq4_xs.quantize_ref(x, qw))


EDGE = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0**-149, -(2.0**-149), 2.0**-126, 1e-15, 65504.0, -65504.0, 1.5e8]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_kernel_equals_reference_hypothesis(data):
    finite = st.floats(-2e8, 2e8, width=32, allow_nan=False, allow_infinity=False)
    shape = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 2).map(lambda b: 256 * b)))
    w = data.draw(hnp.arrays(np.float32, shape, elements=st.one_of(finite, st.sampled_from(EDGE))))
    w = (w * np.float32(data.draw(st.sampled_from([1.0, 1e-3, 1e-20, 2.0**-140])))).astype(np.float32)
    f = fmt()
    ours = f.quantize(w)
    np.testing.assert_array_equal(ours, iq4_xs.quantize_ref(w))
    assert same_bits(f.dequantize(ours, w.shape), gguf_deq(ours, w.shape[0]))
    qw = data.draw(hnp.arrays(np.float32, w.shape[1], elements=st.floats(0, 100, width=32)))
    try:
        ours = f.quantize_weighted(w, qw)
    except RangeError:
        with pytest.raises(RangeError):
            iq4_xs.quantize_ref(w, qw)
        return
    np.testing.assert_array_equal(ours, iq4_xs.quantize_ref(w, qw))


def test_weights_change_the_bytes_and_do_not_leak():
    f = fmt()
    x = np.random.default_rng(5).standard_normal((4, 512)).astype(np.float32)
    a = f.quantize_weighted(x, imatrix(512, 1))
    assert not np.array_equal(a, f.quantize_weighted(x, imatrix(512, 2)))
    assert not np.array_equal(a, f.quantize(x))
    np.testing.assert_array_equal(f.quantize(x), iq4_xs.quantize_ref(x))  # no weights left behind


def test_sub_block_scales_are_the_iq4_nl_search():
    """With one sub-block per super-block of interest, s[k] is IQ4_NL's fitted block scale (shared code,
    but the sigma2 of the weighted variant is over 256 values here, over 32 there)."""
    from quantfmt_formats import iq4_nl

    x = corpus(2).reshape(-1, 256)
    s = iq4_xs.sub_block_scales_ref(x)
    np.testing.assert_array_equal(s.reshape(-1), iq4_nl.block_scales_ref(x.reshape(-1, 32)))


# ---- dequantize == gguf, bit for bit -----------------------------------------------------------


def test_dequantize_matches_gguf_and_reference():
    f = fmt()
    x = corpus(3)
    g = golden()
    samples = [(f.quantize(x), x.shape), (f.quantize_weighted(x, imatrix(512)), x.shape),
               (g["q"].reshape(-1), g["x"].shape), (g["q_imatrix"].reshape(-1), g["x"].shape)]
    for data, shape in samples:
        want = gguf_deq(data, shape[0])
        assert same_bits(f.dequantize(data, shape), want)
        assert same_bits(iq4_xs.dequantize_ref(data, *shape), want)
        rows = np.array([shape[0] - 1, 0, 2, 0], np.int64)
        assert same_bits(f.get_rows(data, shape, rows), want[rows])


def test_dequantize_arbitrary_bytes_matches_gguf():
    """Every byte pattern decodes like gguf: fp16 inf/NaN/subnormal scales, every 6-bit scale."""
    f = fmt()
    rows, cols = 64, 512
    data = np.random.default_rng(11).integers(0, 256, f.nbytes((rows, cols)), dtype=np.uint8)
    ours = f.dequantize(data, (rows, cols))
    assert same_bits(ours, gguf_deq(data, rows))
    with np.errstate(all="ignore"):
        assert same_bits(ours, iq4_xs.dequantize_ref(data, rows, cols))
    assert np.isnan(ours).any()  # the random scales did include NaN patterns


# ---- qmatmul ---------------------------------------------------------------------------------------


def test_int_parts_decode_like_dequantize():
    f = fmt()
    x = corpus(4)
    q = f.quantize(x)
    qi, sc, mi, dw, mw = iq4_xs.int_parts(q, *x.shape)
    rows, nb = dw.shape
    assert not mi.any() and not mw.any()
    y = (dw[..., None] * sc.astype(np.float32))[..., None] * qi.reshape(rows, nb, 16, 16).astype(np.float32)
    assert same_bits(y.reshape(x.shape), f.dequantize(q, x.shape))


def test_q8_k_matmul_equals_reference():
    from quantfmt_formats._kquants import dot_q8k_ref

    f = fmt()
    rng = np.random.default_rng(6)
    w = rng.standard_normal((12, 768)).astype(np.float32)
    q = f.quantize(w)
    wq = f.dequantize(q, w.shape)
    for n in (1, 3, 9):  # 9: the sgemm path on dequantized operands
        x = rng.standard_normal((n, 768)).astype(np.float32)
        want = dot_q8k_ref(iq4_xs.int_parts(q, *w.shape), x)
        got = f.qmatmul(q, w.shape, x, "q8_k")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(np.abs(want).max()))
        mag = np.abs(x) @ np.abs(wq).T
        np.testing.assert_allclose(f.qmatmul(q, w.shape, x), x @ wq.T, rtol=0, atol=float(mag.max()) * 1e-5)
    with pytest.raises(NonFiniteError, match=f"{TAG}: qmatmul mode 'q8_k'"):
        f.qmatmul(q, w.shape, np.full(768, np.inf, np.float32), "q8_k")


# ---- errors ----------------------------------------------------------------------------------------


def test_scale_overflow_is_a_range_error():
    f = fmt()
    x = np.random.default_rng(2).standard_normal((3, 512)).astype(np.float32)
    x[1, 256:] *= np.float32(1e10)
    for quantize in (f.quantize, iq4_xs.quantize_ref, lambda w: f.quantize_weighted(w, imatrix(512))):
        with pytest.raises(RangeError, match=r"IQ4X: .* row 1, columns 256\.\.511"):
            quantize(x)
    # sums that overflow float32 (x*x = inf) make a NaN sub-block scale: refused, not stored as zeros
    y = np.ones((1, 256), np.float32)
    y[0, 40] = 1e30
    for quantize in (f.quantize, iq4_xs.quantize_ref):
        with pytest.raises(RangeError, match=r"IQ4X: .* row 0, columns 0\.\.255"):
            quantize(y)
    # constant super-blocks up to the safe bound quantize to finite values; far above it they do not
    for c in (f.safe_abs, -f.safe_abs):
        z = f.quantize(np.full((1, 256), c, np.float32))
        assert np.isfinite(f.dequantize(z, (1, 256))).all()
    with pytest.raises(RangeError, match="IQ4X"):
        f.quantize(np.full((1, 256), 3e8, np.float32))
    # random blocks scaled to just below the bound
    r = np.random.default_rng(4).standard_normal((8, 512)).astype(np.float32)
    r *= np.float32(f.safe_abs * 0.999) / np.abs(r).max(axis=1, keepdims=True)
    assert np.isfinite(f.dequantize(f.quantize(r), r.shape)).all()


def test_scale_bound_holds_on_adversarial_super_blocks():
    """|d| <= max|x| / (32*106.09) (formats.md): the bound behind safe_abs."""
    rng = np.random.default_rng(3)
    v = KVALUES.astype(np.float64)
    x = []
    for _ in range(60):
        s = rng.uniform(120, 134)
        u = rng.choice(np.concatenate([v * rng.uniform(1.0, 1.5), [7, 6.9, 19, 18.9, 101, 100.5, -16, -28.4]]), 256)
        b = u / s
        b[rng.integers(256)] = rng.choice([1.0, -1.0])
        x.append(b.clip(-1, 1))
    x = f32(x)
    d = iq4_xs.super_scale_ref(iq4_xs.sub_block_scales_ref(x))
    worst = float((np.abs(d) / np.abs(x).max(axis=1)).max())
    assert 1 / (32 * 130) < worst <= 1 / (32 * 106.09)


def test_quantize_weighted_validates():
    f = fmt()
    w = np.ones((2, 256), np.float32)
    with pytest.raises(ShapeError, match="quant_weights"):
        f.quantize_weighted(w, np.ones(128, np.float32))
    bad = np.ones(256, np.float32)
    bad[5] = np.nan
    with pytest.raises(NonFiniteError, match="column 5"):
        f.quantize_weighted(w, bad)
    with pytest.raises(NonFiniteError):
        f.quantize_weighted(np.full((2, 256), np.inf, np.float32), np.ones(256, np.float32))
    with pytest.raises(ShapeError, match=TAG):
        f.quantize_weighted(np.ones((2, 100), np.float32), np.ones(100, np.float32))


# ---- the format class ------------------------------------------------------------------------------


def test_format_attributes():
    f = fmt()
    assert quantfmt.get_format("IQ4_XS") is f
    assert (f.tag, f.ggml_type, f.vec_dot_type, tuple(f.aliases)) == ("IQ4X", "IQ4_XS", "Q8_K", ("IQ4_XS",))
    assert f.block_shape == (1, 256) and f.modes == ("f32", "q8_k") and f.bits_per_weight == 4.25
    assert GGML_QUANT_SIZES[GT.IQ4_XS] == (256, f.block_bytes)


def test_quantize_and_dequantize_kernels_are_compiled_without_fastmath():
    from quantfmt_formats import _iq4

    jitted = [getattr(iq4_xs, n) for n in dir(iq4_xs) if n.startswith(("_quantize", "_dequantize"))]
    jitted += [_iq4.best_index, _iq4.search_scale, _iq4.search_scales]
    jitted = [k for k in jitted if hasattr(k, "targetoptions")]
    assert len(jitted) >= 4  # the row kernels and the scale search (the drivers are Python: parallel_rows)
    for k in jitted:
        assert not k.targetoptions.get("fastmath"), k


# ---- the live C library (opt-in: `pytest -m oracle`) -----------------------------------------------


@pytest.fixture(scope="module")
def ggml():
    from quantfmt import oracle

    if not oracle.available():
        pytest.skip("no C compiler to build ggml's reference quantizers")
    try:
        return oracle.load()
    except oracle.OracleError as e:  # no network for the sdist, or the build failed
        pytest.skip(f"ggml oracle unavailable: {e}")


def _compare(ggml, x, qw=None):
    """Our bytes == ggml's on every row ggml (assert-enabled) quantizes without aborting; returns
    how many rows were compared. A RangeError of ours must be a row whose ggml bytes do not decode finite."""
    f = fmt()
    keep = [r for r in range(x.shape[0]) if not ggml.would_abort("IQ4_XS", x[r : r + 1], qw)]
    x = x[keep]
    theirs = ggml.quantize("IQ4_XS", x, qw).reshape(x.shape[0], -1)
    for r in range(x.shape[0]):
        row = x[r : r + 1]
        try:
            ours = f.quantize(row) if qw is None else f.quantize_weighted(row, qw)
        except RangeError:
            assert not np.isfinite(gguf_deq(theirs[r], 1)).all()
            continue
        np.testing.assert_array_equal(ours, theirs[r], err_msg=f"row {r}")
    return len(keep)


@pytest.mark.oracle
def test_bytes_match_ggml_random(ggml):
    rng = np.random.default_rng(11)
    for scale in (1.0, 1e-3, 300.0, 1e-12):
        x = f32(rng.standard_normal((64, 1024)) * scale)
        np.testing.assert_array_equal(fmt().quantize(x), ggml.quantize("IQ4_XS", x).reshape(-1))
        qw = imatrix(1024, int(scale) + 3)
        np.testing.assert_array_equal(fmt().quantize_weighted(x, qw), ggml.quantize("IQ4_XS", x, qw).reshape(-1))
    x = f32(rng.standard_t(2, (32, 1024)))  # heavy tails
    np.testing.assert_array_equal(fmt().quantize(x), ggml.quantize("IQ4_XS", x).reshape(-1))
    w = rng.standard_normal((128, 1024)) * 10.0 ** rng.uniform(-30, 8, (128, 1))
    w[rng.random(w.shape) < 0.05] = 0.0
    assert _compare(ggml, f32(w)) >= 120 and _compare(ggml, f32(w), imatrix(1024, 9)) >= 120


@pytest.mark.oracle
def test_bytes_match_ggml_adversarial(ggml):
    x = np.concatenate([corpus(0), corpus(1)])
    assert _compare(ggml, x) >= x.shape[0] - 2
    qw = imatrix(512)
    qw[:32] = 0
    assert _compare(ggml, x, qw) >= x.shape[0] - 2


@pytest.mark.oracle
def test_q8_k_matmul_matches_ggml_vec_dot(ggml):
    """Mode q8_k against ggml-cpu's generic ggml_vec_dot_iq4_xs_q8_K on ggml's own Q8_K activations."""
    f = fmt()
    rng = np.random.default_rng(8)
    w = rng.standard_normal((6, 1024)).astype(np.float32)
    x = f32(rng.standard_normal((2, 1024)) * 3)
    q = f.quantize(w).reshape(6, -1)
    act = ggml.quantize_ref("Q8_K", x)
    want = np.array([[ggml.vec_dot("IQ4_XS", q[r], act[k], 1024) for r in range(6)] for k in range(2)], np.float32)
    got = f.qmatmul(q.reshape(-1), w.shape, x, "q8_k")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.oracle
def test_dequantize_matches_ggml(ggml):
    f = fmt()
    x = np.delete(corpus(2), 12, axis=0)
    q = f.quantize(x)
    assert same_bits(f.dequantize(q, x.shape), ggml.dequantize("IQ4_XS", q, x.shape))


# ---- GGUF interop ----------------------------------------------------------------------------------


def test_gguf_tensor_reads_as_iq4x_and_writes_back_byte_for_byte(tmp_path):
    from ggufkit import write_sample

    from quantfmt.io.gguf import read_gguf, write_gguf

    w = corpus(5)[:6]
    q = fmt().quantize(w).reshape(6, -1)
    src, out = tmp_path / "src.gguf", tmp_path / "out.gguf"
    write_sample(src, tensors={"norm": (np.ones(32, np.float32), GT.F32), "blk.0.ffn_down.weight": (q, GT.IQ4_XS)})
    with read_gguf(src) as m:
        t = m["blk.0.ffn_down.weight"]
        assert t.tag == TAG and t.shape == w.shape
        assert same_bits(fmt().dequantize(t.data, t.shape), gguf_deq(q, 6))
        write_gguf(out, m)
    assert out.read_bytes() == src.read_bytes()
