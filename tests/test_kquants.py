"""ggml's k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): bytes identical to ggml's C reference (the golden vectors
in the quick suite; the live library on random and adversarial data under the opt-in marker `oracle`), the
numba kernels equal to the numpy references, dequantize equal to gguf's bit for bit, importance weights
(ggml's imatrix), and the errors. The conformance kit runs on every built-in tag in test_conformance.py."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize

import quantfmt
from quantfmt.errors import NonFiniteError, RangeError, ShapeError

TAGS = ("Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K")
# offsets of the high bytes of each format's fp16 super-block scales (d, and dmin where it has one)
FP16_HIGH_BYTES = {"Q4_K": [1, 3], "Q5_K": [1, 3], "Q6_K": [209], "Q3_K": [109], "Q2_K": [81, 83]}
GOLDEN = Path(__file__).parent / "golden"


def module(tag):
    return importlib.import_module(f"quantfmt_formats.{tag.lower()}")


def golden(tag):
    with np.load(GOLDEN / f"{tag}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def corpus(seed: int = 0, subnormals: bool = True) -> np.ndarray:
    """Adversarial rows of 512 (two super-blocks): ties, zero (sub-)blocks, signed zeros, outliers,
    one-signed and constant blocks, tiny and huge magnitudes, float32 subnormals."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((16, 512), dtype=np.float32)
    i = np.arange(512)
    x = np.zeros((16, 512), np.float32)
    x[0] = g[0]
    x[1] = ((7 * i) % 33 - 16) / 2  # halves: ties for 4-/5-bit grids
    x[2] = (i % 16) - 8.0  # integers on a 16-level grid: exact ties everywhere
    x[3, 256:] = g[3, 256:]  # a zero super-block, then a normal one
    x[4] = g[4] * ((i // 16) % 2)  # every other sub-block of 16 zero
    x[5, :256] = -0.0
    x[5, 256:] = np.where(i[256:] % 2, 0.0, -0.0)
    x[6] = 10 + np.abs(g[6])  # one-signed: the minimum is not zero
    x[7] = -10 - np.abs(g[7])
    x[8, :256], x[8, 256:] = 0.7, -3.0  # constant super-blocks
    x[9, 17], x[9, 300] = 2.5, -1.0  # one non-zero value per super-block
    x[10] = 1e-20 * g[10]  # tiny but normal
    x[11] = 1e5 * g[11]  # large (well below the fp16 limits of the scales)
    x[12] = 1e-6 * g[12]  # super-block scales in fp16's subnormal range
    x[13] = (g[13] * 1e5).astype(np.int32).astype(np.float32) * np.float32(2.0**-149)  # float32 subnormals
    x[14] = g[14] * np.float32(10.0) ** ((i // 16) % 7 - 3)  # sub-block magnitudes 1e-3 .. 1e3
    x[15] = 0.01 * g[15]
    x[15, 5], x[15, 77], x[15, 400] = 1e3, -1e3, 1e4  # outliers
    return x if subnormals else np.delete(x, 13, axis=0)


def imatrix(cols: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random(cols, dtype=np.float32) * 4 + np.float32(0.05)).astype(np.float32)


def same_bits(a, b) -> bool:
    return a.shape == b.shape and np.array_equal(np.asarray(a, np.float32).view(np.uint32),
                                                 np.asarray(b, np.float32).view(np.uint32))


# ---- golden vectors (ggml's C reference, tests/golden) ------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_bytes_match_golden(tag):
    g = golden(tag)
    f = quantfmt.get_format(tag)
    np.testing.assert_array_equal(f.quantize(g["x"]).reshape(g["q"].shape), g["q"])
    np.testing.assert_array_equal(module(tag).quantize_ref(g["x"]).reshape(g["q"].shape), g["q"])


@pytest.mark.parametrize("tag", TAGS)
def test_weighted_bytes_match_golden(tag):
    g = golden(tag)
    f = quantfmt.get_format(tag)
    got = f.quantize_weighted(g["x"], g["imatrix"]).reshape(g["q"].shape)
    np.testing.assert_array_equal(got, g["q_imatrix"])
    ref = module(tag).quantize_ref(g["x"], g["imatrix"]).reshape(g["q"].shape)
    np.testing.assert_array_equal(ref, g["q_imatrix"])


# ---- numba kernels == numpy references -----------------------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_kernel_equals_numpy_reference(tag):
    f, m = quantfmt.get_format(tag), module(tag)
    x = np.concatenate([corpus(0), np.random.default_rng(7).standard_normal((5, 512), dtype=np.float32)])
    np.testing.assert_array_equal(f.quantize(x), m.quantize_ref(x))
    qw = imatrix(512)
    np.testing.assert_array_equal(f.quantize_weighted(x, qw), m.quantize_ref(x, qw))
    # per-row importance weights (the shape of w) are accepted too
    qw2 = np.abs(np.random.default_rng(3).standard_normal(x.shape, dtype=np.float32))
    np.testing.assert_array_equal(f.quantize_weighted(x, qw2), m.quantize_ref(x, qw2))


@pytest.mark.parametrize("tag", ["Q2_K", "Q4_K", "Q5_K"])
def test_sub_blocks_with_a_zero_stored_scale(tag):
    """Sub-blocks far smaller than the rest of their super-block store scale 0: the final pass then keeps
    the search's quants (read from the element-major work space), else it divides; both against numpy."""
    f, m = quantfmt.get_format(tag), module(tag)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 1024), dtype=np.float32)
    n = 16 if tag == "Q2_K" else 32
    for r in range(6):
        for b in range(4):
            for j in rng.choice(256 // n, size=1 + r % 3, replace=False):  # tiny sub-blocks, some shifted
                c = 256 * b + n * j
                x[r, c : c + n] = x[r, c : c + n] * np.float32(1e-4) + np.float32(r % 2) * np.float32(1e-3)
    x[5, 256:512] = 0  # a whole zero super-block (flat lanes: scale 0, L = 0)
    np.testing.assert_array_equal(f.quantize(x), m.quantize_ref(x))


@pytest.mark.parametrize("tag", TAGS)
def test_weights_change_the_bytes(tag):
    """quantize_weighted really uses the weights: a different imatrix gives different bytes."""
    f = quantfmt.get_format(tag)
    x = np.random.default_rng(5).standard_normal((4, 512), dtype=np.float32)
    a = f.quantize_weighted(x, imatrix(512, 1))
    assert not np.array_equal(a, f.quantize_weighted(x, imatrix(512, 2)))
    assert not np.array_equal(a, f.quantize(x))


# ---- dequantize == gguf, bit for bit -------------------------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_dequantize_matches_gguf(tag):
    f, m = quantfmt.get_format(tag), module(tag)
    x = corpus(1)
    samples = [f.quantize(x), f.quantize_weighted(x, imatrix(512)), golden(tag)["q"].reshape(-1)]
    shapes = [x.shape, x.shape, golden(tag)["x"].shape]
    # arbitrary bytes, with the fp16 scales made finite (NaN payloads are not the point here)
    rnd = np.random.default_rng(9).integers(0, 256, (8, 2 * f.block_bytes), dtype=np.uint8).reshape(-1, f.block_bytes)
    rnd[:, FP16_HIGH_BYTES[tag]] &= 0xFB  # clear an exponent bit: never fp16 inf/NaN
    samples.append(rnd.reshape(-1))
    shapes.append((8, 512))
    for data, shape in zip(samples, shapes, strict=True):
        want = gguf_dequantize(data.reshape(shape[0], -1), GT[tag])
        assert same_bits(f.dequantize(data, shape), want)
        assert same_bits(m.dequantize_ref(data, *shape), want)
        rows = np.array([shape[0] - 1, 0, 2], np.int64)
        assert same_bits(f.get_rows(data, shape, rows), want[rows])


# ---- qmatmul mode "q8_k" -----------------------------------------------------------------------------------------


def test_q8_K_activations_match_golden():
    """Our Q8_K activation quantizer (numba and numpy) makes ggml's quantize_row_q8_K_ref bytes."""
    from quantfmt_formats._kquants import quantize_q8_K, quantize_q8_K_ref

    g = golden("Q8_K")
    blk = g["q"].reshape(-1, 292)
    want = (blk[:, :4].copy().view(np.float32)[:, 0], blk[:, 4:260].copy().view(np.int8),
            blk[:, 260:].copy().view("<i2"))
    for fn in (quantize_q8_K, quantize_q8_K_ref):
        d, qs, bs = fn(g["x"])
        assert same_bits(d.reshape(-1), want[0])
        np.testing.assert_array_equal(qs.reshape(-1, 256), want[1])
        np.testing.assert_array_equal(bs.reshape(-1, 16), want[2])


@pytest.mark.parametrize("tag", TAGS)
def test_int_parts_decode_like_dequantize(tag):
    """The integer form used by mode q8_k (dw*sc*qi - mw*mi) is the same weights, bit for bit."""
    f, m = quantfmt.get_format(tag), module(tag)
    x = corpus(3)
    q = f.quantize(x)
    qi, sc, mi, dw, mw = m.int_parts(q, *x.shape)
    rows, nb = dw.shape
    y = ((dw[..., None] * sc.astype(np.float32))[..., None] * qi.reshape(rows, nb, 16, 16).astype(np.float32)
         - (mw[..., None] * mi.astype(np.float32))[..., None])
    assert same_bits(y.reshape(x.shape), f.dequantize(q, x.shape))


@pytest.mark.parametrize("tag", TAGS)
def test_q8_k_matmul_equals_reference(tag):
    from quantfmt_formats._kquants import dot_q8k_ref

    f, m = quantfmt.get_format(tag), module(tag)
    rng = np.random.default_rng(6)
    w = rng.standard_normal((12, 768), dtype=np.float32)
    q = f.quantize(w)
    for n in (1, 3, 9):  # 1, 3: decode; 9: prefill (int8 kernels) or sgemm on dequantized operands (portable)
        x = rng.standard_normal((n, 768), dtype=np.float32)
        want = dot_q8k_ref(m.int_parts(q, *w.shape), x)
        got = f.qmatmul(q, w.shape, x, "q8_k")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(np.abs(want).max()))
    with pytest.raises(NonFiniteError, match=f"{tag}: qmatmul mode 'q8_k'"):
        f.qmatmul(q, w.shape, np.full(768, np.inf, np.float32), "q8_k")


# ---- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_scale_overflow_is_a_range_error(tag):
    f, m = quantfmt.get_format(tag), module(tag)
    x = np.random.default_rng(2).standard_normal((3, 512), dtype=np.float32)
    x[1, 256:] *= np.float32(1e12)  # every super-block scale of this block overflows fp16
    for quantize in (f.quantize, m.quantize_ref, lambda w: f.quantize_weighted(w, imatrix(512))):
        with pytest.raises(RangeError, match=rf"{tag}: .* row 1, columns 256\.\.511"):
            quantize(x)
    # just below the declared limit everything quantizes to finite values
    y = np.random.default_rng(4).standard_normal((4, 512), dtype=np.float32)
    y *= np.float32(f.safe_abs * 0.999) / np.abs(y).max(axis=1, keepdims=True)
    assert np.isfinite(f.dequantize(f.quantize(y), y.shape)).all()


@pytest.mark.parametrize("tag", TAGS)
def test_weighted_input_errors(tag):
    f = quantfmt.get_format(tag)
    x = np.ones((2, 256), np.float32)
    with pytest.raises(ShapeError, match=tag):
        f.quantize_weighted(x, np.ones(128, np.float32))
    with pytest.raises(NonFiniteError, match=f"{tag}: importance weights"):
        f.quantize_weighted(x, np.full(256, np.nan, np.float32))
    with pytest.raises(NonFiniteError, match=f"{tag}: weights"):
        f.quantize_weighted(np.full((2, 256), np.inf, np.float32), np.ones(256, np.float32))
    with pytest.raises(ShapeError, match=tag):
        f.quantize_weighted(np.ones((2, 100), np.float32), np.ones(100, np.float32))
    assert f.quantize_weighted(np.zeros((0, 256), np.float32), np.ones(256, np.float32)).size == 0


@pytest.mark.parametrize("tag", TAGS)
def test_registered_as_ggml_types(tag):
    f = quantfmt.get_format(tag)
    assert f.ggml_type == tag and f.vec_dot_type == "Q8_K" and f.block_shape == (1, 256)
    from gguf import GGML_QUANT_SIZES

    assert GGML_QUANT_SIZES[GT[tag]] == (256, f.block_bytes)


# ---- the live C library (opt-in: `pytest -m oracle`) -------------------------------------------------------------


@pytest.fixture(scope="module")
def ggml():
    from quantfmt import oracle

    if not oracle.available():
        pytest.skip("no C compiler to build ggml's reference quantizers")
    try:
        return oracle.load()
    except oracle.OracleError as e:  # no network for the sdist, or the build failed
        pytest.skip(f"ggml oracle unavailable: {e}")


def _oracle_rows(ggml, tag, x, qw=None):
    """The rows of x that ggml's (assert-enabled) reference quantizes without aborting."""
    keep = [r for r in range(x.shape[0]) if not ggml.would_abort(tag, x[r : r + 1], qw)]
    assert len(keep) >= x.shape[0] - 3, f"ggml aborts on too many corpus rows: kept {keep}"
    return x[keep]


@pytest.mark.oracle
@pytest.mark.parametrize("tag", TAGS)
def test_bytes_match_ggml_random(tag, ggml):
    f = quantfmt.get_format(tag)
    rng = np.random.default_rng(11)
    for scale in (1.0, 1e-3, 300.0):
        x = (rng.standard_normal((64, 1024), dtype=np.float32) * np.float32(scale))
        np.testing.assert_array_equal(f.quantize(x), ggml.quantize(tag, x).reshape(-1))
        qw = imatrix(1024, int(scale) + 3)
        np.testing.assert_array_equal(f.quantize_weighted(x, qw), ggml.quantize(tag, x, qw).reshape(-1))
    # heavy tails: Student-t with 2 degrees of freedom
    x = rng.standard_t(2, (32, 1024)).astype(np.float32)
    np.testing.assert_array_equal(f.quantize(x), ggml.quantize(tag, x).reshape(-1))


@pytest.mark.oracle
@pytest.mark.parametrize("tag", TAGS)
def test_bytes_match_ggml_adversarial(tag, ggml):
    f = quantfmt.get_format(tag)
    x = _oracle_rows(ggml, tag, corpus(0))
    np.testing.assert_array_equal(f.quantize(x), ggml.quantize(tag, x).reshape(-1))
    qw = imatrix(512)
    xw = _oracle_rows(ggml, tag, corpus(0), qw)
    np.testing.assert_array_equal(f.quantize_weighted(xw, qw), ggml.quantize(tag, xw, qw).reshape(-1))


@pytest.mark.oracle
@pytest.mark.parametrize("tag", TAGS)
def test_q8_k_matmul_matches_ggml_vec_dot(tag, ggml):
    """Mode q8_k against ggml-cpu's generic ggml_vec_dot_<type>_q8_K on ggml's own Q8_K activations:
    the integer sums are exact, only the order of float32 additions differs."""
    f = quantfmt.get_format(tag)
    rng = np.random.default_rng(8)
    w = rng.standard_normal((6, 1024), dtype=np.float32)
    x = rng.standard_normal((2, 1024), dtype=np.float32) * np.float32(3)
    q = f.quantize(w).reshape(6, -1)
    act = ggml.quantize_ref("Q8_K", x)
    want = np.array([[ggml.vec_dot(tag, q[r], act[k], 1024) for r in range(6)] for k in range(2)], np.float32)
    got = f.qmatmul(q.reshape(-1), w.shape, x, "q8_k")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.oracle
@pytest.mark.parametrize("tag", TAGS)
def test_dequantize_matches_ggml(tag, ggml):
    f = quantfmt.get_format(tag)
    x = corpus(2, subnormals=False)
    q = f.quantize(x)
    assert same_bits(f.dequantize(q, x.shape), ggml.dequantize(tag, q, x.shape))


@pytest.mark.parametrize("tag", ["Q6_K", "Q3_K"])
def test_overflow_abs_in_the_row_kernel(tag):
    # the |w| >= overflow_abs refusal (done in the row kernel, _kquants.first_big_block) names the first
    # row holding such a weight and its first such block, before any row whose fp16 scale overflows
    f = quantfmt.get_format(tag)
    w = np.random.default_rng(0).standard_normal((8, 1024)).astype(np.float32)
    w[2, 100] = 1e12  # an fp16 overflow in an earlier row
    w[5, 700] = 2e18
    w[5, 300] = -np.float32(f.overflow_abs)  # exactly the limit (as float32) is refused
    w[6, 10] = 3e18
    with pytest.raises(RangeError, match="row 5, columns 256..511"):
        f.quantize(w)
    w[5, 300] = -np.nextafter(np.float32(f.overflow_abs), np.float32(0))  # just below: allowed
    with pytest.raises(RangeError, match="row 5, columns 512..767"):
        f.quantize(w)
    w[5], w[6] = 0.5, 0.5
    with pytest.raises(RangeError, match="row 2, columns 0..255"):
        f.quantize(w)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("tag", ["Q2_K", "Q4_K", "Q5_K"])
def test_flagged_rows_redone_by_the_reference(tag, weighted):
    # sub-blocks whose range is subnormal (iscale = inf in ggml's search) are where the vector search's
    # fast rounding is not ggml's: the kernel flags the row and _kquants.redo_rows quantizes it with the
    # numpy reference; the bytes are ggml's either way
    f = quantfmt.get_format(tag)
    mod = importlib.import_module(f"quantfmt_formats.{tag.lower()}")
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 512)).astype(np.float32)
    w[1, 0:32] = 0.0
    w[1, 5] = np.float32(1e-39)
    w[4, 288:320] = np.float32(-2e-39) * rng.uniform(0, 1, 32).astype(np.float32)
    qw = rng.uniform(0.1, 2.0, 512).astype(np.float32) if weighted else None
    got = f.quantize_weighted(w, qw) if weighted else f.quantize(w)
    with np.errstate(all="ignore"):
        assert np.array_equal(got, mod.quantize_ref(w, quant_weights=qw))


@pytest.mark.parametrize("tag", ["Q2_K", "Q4_K"])
def test_flagged_rows_keep_the_range_error(tag):
    # a row the kernel hands to the reference (a subnormal-range sub-block) that also overflows fp16:
    # the RangeError names that row and block, as without the hand-over; a later row's never matters
    f = quantfmt.get_format(tag)
    w = np.random.default_rng(6).standard_normal((5, 768)).astype(np.float32)
    w[1, 0:32] = 0.0
    w[1, 5] = np.float32(1e-39)
    w[3, 256:288] = 0.0
    w[3, 260] = np.float32(1e-39)
    w[3, 600] = np.float32(1e12)  # block 2 of row 3 overflows
    w[4, 10] = np.float32(1e12)
    with pytest.raises(RangeError, match="row 3, columns 512..767"):
        f.quantize(w)
    w[0, 300] = np.float32(1e12)  # an earlier ordinary row that overflows comes first
    with pytest.raises(RangeError, match="row 0, columns 256..511"):
        f.quantize(w)
    w[0, 300], w[3, 600], w[4, 10] = 0.5, 0.5, 0.5
    mod = importlib.import_module(f"quantfmt_formats.{tag.lower()}")
    with np.errstate(all="ignore"):
        assert np.array_equal(f.quantize(w), mod.quantize_ref(w))


@pytest.mark.slow  # ~90 s: a cold compile of seven formats for the generic CPU
def test_quantize_on_a_generic_cpu_equals_the_reference(tmp_path):
    # the vector searches (plugins/_klanes.py, _iq4.py) are generic LLVM IR: on a CPU without AVX LLVM
    # splits them into what it has; the bytes must stay ggml's (hostile rows included: the redo path)
    code = textwrap.dedent("""
        import importlib
        import numpy as np
        import quantfmt
        rng = np.random.default_rng(3)
        w = rng.standard_normal((8, 1024)).astype(np.float32)
        w[2, :256] *= np.float32(1e-30)
        w[3, 0:32] = 0
        w[3, 5] = np.float32(1e-39)
        w[4, 256:512] = 0.0
        qw = rng.uniform(0.1, 2, 1024).astype(np.float32)
        for tag in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4N", "IQ4X"):
            f = quantfmt.get_format(tag)
            mod = importlib.import_module(type(f).__module__)
            with np.errstate(all="ignore"):
                assert np.array_equal(f.quantize(w), mod.quantize_ref(w)), tag
                assert np.array_equal(f.quantize_weighted(w, qw), mod.quantize_ref(w, quant_weights=qw)), tag
        print("ok")
    """)
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("NUMBA_CPU_FEATURES", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok"]
