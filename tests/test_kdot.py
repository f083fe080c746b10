"""The int8 k-quant kernels (plugins/_kdot.py) == ggml's ggml_vec_dot_<type>_q8_K (dot_q8k_ref).

Every int8 path this CPU can run (AVX512-VNNI with zmm decode, AVX-VNNI, AVX2) is forced in turn
through the module switch `_i8gemm.PATH`, and so is the portable path (the integer-form loop and
sgemm on dequantized tiles); both kernels (decode below _kdot.MIN_ROWS activation rows, prefill from
there) run on shapes that need padding (rows not a multiple of the 3-row register tile, activation
rows not a multiple of the 16- or 8-lane vector or of the 2-vector tile). Weights are quantized
data and also random bytes (every quant value, scale and minimum, the extremes included, with sane
fp16 super-block scales), activations include huge, tiny and all-zero super-blocks. The integer sums
are exact in both, so the results differ only by float32 summation order.
"""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

import quantfmt
from quantfmt.families import prefill_path
from quantfmt_formats import _i8gemm, _kdot, _kquants

TAGS = ["Q4_K", "Q6_K", "Q5_K", "Q2_K", "Q3_K"]
PATHS = [*_i8gemm.available(), "portable"]
# byte offsets of the fp16 d (and dmin) of each super-block
D_OFF = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_bytes(rng, tag, rows, cols):
    f = quantfmt.get_format(tag)
    blk = rng.integers(0, 256, (rows * cols // 256, f.block_bytes), dtype=np.uint8)
    for o in D_OFF[tag]:
        d = (rng.standard_normal(blk.shape[0]) * 0.01).astype(np.float16)
        d[::7] = 0  # scale 0
        blk[:, o : o + 2] = d.view(np.uint8).reshape(-1, 2)
    return blk.reshape(-1)


def activations(rng, n, cols):
    x = rng.standard_normal((n, cols)).astype(np.float32)
    x[0, :256] *= np.float32(1e-3)
    x[n // 2, -256:] *= np.float32(300)
    if cols > 256:
        x[-1, 256:512] = 0  # an all-zero super-block: d_x = 0
    return x


def check(f, m, data, rows, cols, x):
    prep = f.prepare(data, rows, cols)
    got = f.qmatmul(data, (rows, cols), x, "q8_k", prepared=prep)
    assert got.shape == (x.shape[0], rows) and got.dtype == np.float32
    want = _kquants.dot_q8k_ref(m.int_parts(data, rows, cols), x)
    # the summation-order tolerance: relative to the sum of |terms|
    wq = f.dequantize(data, (rows, cols))
    mag = float((np.abs(x) @ np.abs(wq).T).max()) + 1e-30
    np.testing.assert_allclose(got, want, rtol=0, atol=mag * 4e-6, err_msg=f"{rows}x{cols} n={x.shape[0]}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tag", TAGS)
def test_q8_k_kernels_match_ggml_dot(tag, path, monkeypatch):
    monkeypatch.setattr(_i8gemm, "PATH", path)
    f, m = quantfmt.get_format(tag), importlib.import_module(f"quantfmt_formats.{tag.lower()}")
    rng = np.random.default_rng(20261206)
    lo = _kdot.MIN_ROWS.get(path, 10)
    for rows, cols in [(1, 256), (7, 768), (38, 512)]:
        w = (rng.standard_normal((rows, cols)) + 0.2).astype(np.float32)
        w[:, :256] *= 40
        w[rows // 2, -256:] = 0  # an all-zero super-block
        for data in (f.quantize(w), random_bytes(rng, tag, rows, cols)):
            for n in (1, 2, lo - 1, lo, 17, 35):
                check(f, m, data, rows, cols, activations(rng, n, cols))
    for n in (1, lo, 40):
        kp = f.kernel_path("qmatmul", n, "q8_k")
        if path == "portable":
            assert kp == (prefill_path() if n >= _kquants.Q8K_BLAS_MIN_ROWS else "int-q8_k")
        else:
            assert kp == f"{'kdot' if n < lo else 'kgemm'}-{path}"


@pytest.mark.parametrize("tag", TAGS)
def test_extreme_quants_and_activations(tag, monkeypatch):
    """Every quant at its largest value against activations of +-127: the int16 intermediate sums
    (vpmaddubsw pairs, the int16 sub-block trick of the prefill kernel) must not saturate."""
    f, m = quantfmt.get_format(tag), importlib.import_module(f"quantfmt_formats.{tag.lower()}")
    rng = np.random.default_rng(5)
    rows, cols = 5, 512
    data = random_bytes(rng, tag, rows, cols).reshape(-1, f.block_bytes)
    d_off = D_OFF[tag][0]
    keep = np.zeros(f.block_bytes, bool)
    for o in D_OFF[tag]:
        keep[o : o + 2] = True
    data[:, ~keep] = 0xFF  # largest quants; scale bytes all ones (Q6_K: -1, others their maximum)
    data[:, d_off : d_off + 2] = np.float16(0.01).reshape(1).view(np.uint8)
    data = data.reshape(-1)
    x = np.where(rng.random((40, cols)) < 0.5, -1.0, 1.0).astype(np.float32)  # q_x = +-127
    for path in PATHS:
        monkeypatch.setattr(_i8gemm, "PATH", path)
        for n in (1, 3, 40):
            check(f, m, data, rows, cols, x[:n])


@pytest.mark.parametrize("tag", TAGS)
def test_matvec_fn_is_qmatmul_to_the_bit(tag, monkeypatch):
    """Format.matvec_fn (one activation row: its Q8_K and the decode kernel in one compiled call) gives
    qmatmul's bits on every int8 path, also where the rows are split over threads, declines where qmatmul
    must raise (NaN/inf activations), and is not offered on the portable path or in mode f32."""
    f = quantfmt.get_format(tag)
    rng = np.random.default_rng(11)
    for rows, cols in [(7, 768), (38, 512), (1, 256)]:
        for data in (f.quantize(rng.standard_normal((rows, cols)).astype(np.float32)),
                     random_bytes(rng, tag, rows, cols)):
            for path in _i8gemm.available():
                monkeypatch.setattr(_i8gemm, "PATH", path)
                prep = f.prepare(data, rows, cols)
                mv = f.matvec_fn(prep, rows, cols, "q8_k")
                for x in (activations(rng, 1, cols), np.zeros((1, cols), np.float32)):
                    want = f.qmatmul(data, (rows, cols), x, "q8_k", prepared=prep)
                    got = mv(x)
                    assert got.shape == (1, rows) and got.dtype == np.float32
                    np.testing.assert_array_equal(got, want, err_msg=f"{path} {rows}x{cols}")
                bad = activations(rng, 1, cols)
                bad[0, cols // 2] = np.nan
                assert mv(bad) is None
                assert f.matvec_fn(prep, rows, cols, "f32") is None
    # the QTensor binding: a NaN activation raises qmatmul's error
    t = quantfmt.QTensor.quantize(rng.standard_normal((8, 512)).astype(np.float32), tag)
    fn = t.matvec_fn("q8_k")
    with pytest.raises(quantfmt.errors.NonFiniteError, match=f"{tag}: qmatmul mode 'q8_k'"):
        fn(np.full((1, 512), np.nan, np.float32))
    # a matrix large enough for threads: the row made in one call, the driver on parallel_rows' threads
    monkeypatch.setattr(_kdot, "decode_threads", lambda rows, cols: 2)
    for path in _i8gemm.available():
        monkeypatch.setattr(_i8gemm, "PATH", path)
        data = f.quantize(rng.standard_normal((300, 512)).astype(np.float32))
        prep = f.prepare(data, 300, 512)
        mv = f.matvec_fn(prep, 300, 512, "q8_k")
        x = activations(rng, 1, 512)
        np.testing.assert_array_equal(mv(x), f.qmatmul(data, (300, 512), x, "q8_k", prepared=prep), err_msg=path)
        x[0, 3] = np.inf
        assert mv(x) is None
    monkeypatch.setattr(_i8gemm, "PATH", "portable")
    assert f.matvec_fn(f.prepare(data, rows, cols), rows, cols, "q8_k") is None


def test_paths_agree_with_each_other():
    # The int8 paths differ only in float order: against each other they agree to float32 rounding.
    rng = np.random.default_rng(9)
    avail = _i8gemm.available()
    for tag in TAGS:
        f = quantfmt.get_format(tag)
        data = random_bytes(rng, tag, 29, 512)
        prep = f.prepare(data, 29, 512)
        for n in (1, 20):
            x = activations(rng, n, 512)
            a = _kquants.quantize_q8_K(x)
            outs = [_kdot.qmatmul(prep.kind, prep, *a, path=p) for p in avail]
            for o in outs[1:]:
                np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-5 * float(np.abs(outs[0]).max()))


def test_f32_mode_stays_float():
    # Mode "f32" never takes the int8 kernels: its error stays at float32 level.
    rng = np.random.default_rng(3)
    for tag in TAGS:
        f = quantfmt.get_format(tag)
        w = rng.standard_normal((20, 512)).astype(np.float32)
        data = f.quantize(w)
        wq = f.dequantize(data, w.shape).astype(np.float64)
        for n in (1, 9):
            assert f.kernel_path("qmatmul", n, "f32") in ("int-f32", prefill_path())
            x = rng.standard_normal((n, 512)).astype(np.float32)
            mag = float((np.abs(x) @ np.abs(wq).T).max())
            np.testing.assert_allclose(f.qmatmul(data, w.shape, x, "f32"), x @ wq.T, rtol=0, atol=mag * 1e-6)


def test_generic_cpu_takes_the_portable_path():
    code = """
import numpy as np
import quantfmt
from quantfmt_formats import _kquants, q4_k
f = quantfmt.get_format("Q4_K")
print(f.kernel_path("qmatmul", 1, "q8_k"), f.kernel_path("qmatmul", 64, "q8_k"))
"""
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": "+sse4.2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() in (["int-q8_k", "blas-tiles"], ["int-q8_k", "tiles+blas-per-thread"],
                                   ["int-q8_k", "tiles+gemm512-per-thread"])
