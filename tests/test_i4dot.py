"""The int8 kernels of the 4-bit table formats IQ4_NL, IQ4_XS, MXFP4 (plugins/_i4dot.py, and _i8gemm's
kind "lut") == ggml's dot product with quantized activations.

Every path this CPU can run (AVX512-VNNI, AVX-VNNI, AVX2) is forced in turn through the module switch
`_i4dot.PATH`, and so is the portable path (int8 tiles, plugins/_i8tiles.py); subprocesses compiling
for a generic CPU with only AVX2, and with nothing, check that such CPUs get (and pass on) the AVX2
and the portable paths. Modes "q8_0" (IQ4_NL, MXFP4) and "q8_k" (IQ4_XS) are compared with the numpy
re-implementations of ggml's integer dot at the summation-order tolerance of tests/test_i8gemm.py,
on shapes that need padding (weight rows not a multiple of the 32-row decode tile or the 3-row
register tile, activation rows not a multiple of the vector lanes) and batch sizes on both sides of
the decode/prefill switch.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from quantfmt import get_format
from quantfmt.families import per_thread_sgemm, prefill_path, prefill_threads
from quantfmt.tensor import QTensor
from quantfmt_formats import _i4dot, _i8gemm, iq4_nl, iq4_xs, mxfp4
from quantfmt_formats._kquants import dot_q8k_ref

PATHS = [*_i8gemm.available(), "portable"]
FORMATS = {"IQ4N": (iq4_nl, "q8_0"), "MXF4": (mxfp4, "q8_0"), "IQ4X": (iq4_xs, "q8_k")}
SHAPES = [(1, 256), (37, 512), (70, 1024)]
NS = [1, 2, 3, 5, 6, 7, 9, 11, 12, 13, 17, 40]


def weights(rng, rows, cols):
    w = (rng.standard_normal((rows, cols)) + 0.3).astype(np.float32)
    w[:, :32] *= 50  # blocks of very different scales
    w[rows // 2, 32:64] = 0  # an all-zero block
    w[0, 64:96] = np.linspace(-1, 1, 32)  # the table's ends (-127, 113 / -12, 12)
    return w


def reference(tag, data, rows, cols, x):
    mod, mode = FORMATS[tag]
    if mode == "q8_k":
        return dot_q8k_ref(iq4_xs.int_parts(data, rows, cols), x)
    return mod.qmatmul_q8_ref(data, rows, cols, x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tag", list(FORMATS))
def test_quantized_activations_match_ggml_dot(tag, path, monkeypatch):
    monkeypatch.setattr(_i4dot, "PATH", path)
    rng = np.random.default_rng(20261206)
    fmt = get_format(tag)
    mode = FORMATS[tag][1]
    for rows, cols in SHAPES:
        data = fmt.quantize(weights(rng, rows, cols)).reshape(-1)
        wq = fmt.dequantize(data, (rows, cols))
        prep = fmt.prepare(data, rows, cols)
        for n in NS:
            x = rng.standard_normal((n, cols)).astype(np.float32)
            x[0, :32] *= 1e-3
            x[n // 2, 32:64] *= 300
            x[-1, 64:96] = 0  # an all-zero activation block (scale 0)
            mag = float((np.abs(x) @ np.abs(wq).T).max())
            got = fmt.qmatmul(data, (rows, cols), x, mode, prepared=prep)
            assert got.shape == (n, rows) and got.dtype == np.float32
            ref = reference(tag, data, rows, cols, x)
            np.testing.assert_allclose(got, ref, rtol=0, atol=mag * 2e-6, err_msg=f"{rows}x{cols} n={n}")
            kp = fmt.kernel_path("qmatmul", n, mode)
            if path == "portable":
                assert kp == (prefill_path() if n >= 8 else f"tiles-{mode}")
            else:
                assert kp == (f"int8-{path}" if n >= _i4dot.MIN_ROWS[path] else f"lut-{path}")


@pytest.mark.parametrize("path", _i8gemm.available())
def test_decode_and_prefill_kernels_agree(path, monkeypatch):
    # The same product through the decode kernel (weight rows in lanes) and the prefill kernel
    # (activation rows in lanes): only the float order of the block sums differs.
    monkeypatch.setattr(_i4dot, "PATH", path)
    rng = np.random.default_rng(5)
    for tag, (_, mode) in FORMATS.items():
        fmt = get_format(tag)
        rows, cols = 45, 512
        data = fmt.quantize(weights(rng, rows, cols)).reshape(-1)
        prep = fmt.prepare(data, rows, cols)
        x = rng.standard_normal((5, cols)).astype(np.float32)
        monkeypatch.setitem(_i4dot.MIN_ROWS, path, 1)
        a = fmt.qmatmul(data, (rows, cols), x, mode, prepared=prep)
        monkeypatch.setitem(_i4dot.MIN_ROWS, path, 100)
        b = fmt.qmatmul(data, (rows, cols), x, mode, prepared=prep)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("path", PATHS)
def test_f32_mode_stays_float(path, monkeypatch):
    # Mode "f32" never quantizes the activations: batches run sgemm on dequantize()'s very weights
    # (rows dequantized with vpshufb; chunked when ROW_CHUNK_BYTES is small), one row the int8 tiles.
    monkeypatch.setattr(_i4dot, "PATH", path)
    rng = np.random.default_rng(3)
    for tag in FORMATS:
        fmt = get_format(tag)
        rows, cols = 70, 512
        data = fmt.quantize(weights(rng, rows, cols)).reshape(-1)
        wq = fmt.dequantize(data, (rows, cols))
        prep = fmt.prepare(data, rows, cols)
        if path != "portable":
            wd = _i4dot.aligned_empty(rows - 3, cols)
            _i4dot.dequant_rows(prep, 3, rows, wd)
            np.testing.assert_array_equal(wd, wq[3:])  # dequantize()'s floats, bit for bit
            with pytest.raises(ValueError, match="aligned"):
                _i4dot.dequant_rows(prep, 3, rows, np.empty((rows - 3, cols + 16), np.float32)[:, 16:])
        for n, chunk in ((1, None), (3, None), (64, None), (9, 8 * cols * 4)):
            if chunk:
                monkeypatch.setattr(_i4dot, "ROW_CHUNK_BYTES", chunk)
            x = rng.standard_normal((n, cols)).astype(np.float32)
            mag = float((np.abs(x) @ np.abs(wq).T).max())
            rows_path = f"rows+{per_thread_sgemm()}-per-thread" if prefill_threads() else "blas-rows"
            want = "tiles-f32" if n < 8 else prefill_path() if path == "portable" else rows_path
            assert fmt.kernel_path("qmatmul", n, "f32") == want
            got = fmt.qmatmul(data, (rows, cols), x, "f32", prepared=prep)
            np.testing.assert_allclose(got, x @ wq.T.astype(np.float64), rtol=0, atol=mag * 1e-6)


_SUBPROCESS = """
import numpy as np
from quantfmt import get_format
from quantfmt_formats import _i4dot, iq4_nl, mxfp4
rng = np.random.default_rng(0)
for tag, mod in (("IQ4N", iq4_nl), ("MXF4", mxfp4)):
    fmt = get_format(tag)
    data = fmt.quantize(rng.standard_normal((40, 256)).astype(np.float32)).reshape(-1)
    wq = fmt.dequantize(data, (40, 256))
    for n in (1, 20):
        x = rng.standard_normal((n, 256)).astype(np.float32)
        got = fmt.qmatmul(data, (40, 256), x, "q8_0")
        ref = mod.qmatmul_q8_ref(data, 40, 256, x)
        assert np.abs(got - ref).max() <= 2e-6 * (np.abs(x) @ np.abs(wq).T).max()
        print(fmt.kernel_path("qmatmul", n, "q8_0"))
"""


@pytest.mark.parametrize(("features", "paths"), [("+avx2,+fma", ["lut-avx2", "int8-avx2"]),
                                                 # no AVX-512 there: BLAS's sgemm, not quantfmt.gemm's
                                                 (None, ["tiles-q8_0", prefill_path().replace("gemm512", "blas")])])
def test_cpus_with_less(features, paths):
    # Compiled for a generic CPU with only AVX2 (no AVX-512 instruction may appear), and with
    # nothing (the portable path): each gets its path and the reference's results.
    env = {**os.environ, "NUMBA_CPU_NAME": "generic"}
    env.pop("NUMBA_CPU_FEATURES", None)
    if features:
        env["NUMBA_CPU_FEATURES"] = features
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == paths * 2


@pytest.mark.parametrize("path", _i8gemm.available())
@pytest.mark.parametrize("tag", ["Q4_0", "Q4_1"])
def test_q4_decode_on_each_path(tag, path, monkeypatch):
    # Q4_0 and Q4_1 decode here too (q4_0.nibble_qmatmul), Q4_1 with ggml's Q8_1 term sum_b m_b * s_b
    # added in the kernel: every path against ggml's dot (qmatmul_q8_ref), on padded shapes.
    from quantfmt_formats import q4_0, q4_1

    monkeypatch.setattr(_i4dot, "PATH", path)
    mod = {"Q4_0": q4_0, "Q4_1": q4_1}[tag]
    rng = np.random.default_rng(11)
    fmt = get_format(tag)
    for rows, cols in ((1, 32), (37, 96), (70, 1024)):
        w = weights(rng, rows, cols) if cols >= 96 else rng.standard_normal((rows, cols)).astype(np.float32)
        data = fmt.quantize(w).reshape(-1)
        wq = fmt.dequantize(data, (rows, cols))
        prep = fmt.prepare(data, rows, cols)
        for n in (1, 2, 3):
            x = rng.standard_normal((n, cols)).astype(np.float32)
            x[0, :32] *= 1e-3
            mag = float((np.abs(x) @ np.abs(wq).T).max())
            got = fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)
            np.testing.assert_allclose(got, mod.qmatmul_q8_ref(data, rows, cols, x), rtol=0, atol=mag * 2e-6,
                                       err_msg=f"{rows}x{cols} n={n}")
            assert fmt.kernel_path("qmatmul", n, "q8_0") == f"lut-{path}"


@pytest.mark.parametrize("path", _i8gemm.available())
@pytest.mark.parametrize("tag", ["Q4_0", "Q4_1", "IQ4N", "MXF4"])
def test_one_row_matvec_equals_the_batch_kernel_and_keeps_its_errors(path, tag, monkeypatch):
    # Format.matvec_fn (n = 1, mode q8_0, one thread) quantizes and multiplies in one call (_i4dot._MATVEC; Q4_1's
    # _MATVEC_M with its Q8_1 sums): the same activation blocks as quantize_activations and the same driver,
    # so equal to the first row of a 2-row batch (which goes through those) to the bit; NaN/inf and a
    # too-large scale keep their errors.
    from quantfmt.errors import NonFiniteError, RangeError

    monkeypatch.setattr(_i4dot, "PATH", path)
    rng = np.random.default_rng(6)
    fmt = get_format(tag)
    for rows, cols in ((70, 512), (576, 576), (33, 1024)):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        data = fmt.quantize(w)
        prep = fmt.prepare(data, rows, cols)
        x = rng.standard_normal((2, cols)).astype(np.float32)
        x[0, 32:64] = 0
        t = QTensor("w", fmt, (rows, cols), data)
        f = t.matvec_fn("q8_0")
        assert fmt.matvec_fn(t._prepared, rows, cols, "q8_0") is not None  # the one-row kernel, not matmul
        one = f(np.ascontiguousarray(x[:1]))
        np.testing.assert_array_equal(one, fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)[:1])
    for bad, err in ((np.nan, NonFiniteError), (-np.inf, NonFiniteError), (1e9, RangeError)):
        x1 = x[:1].copy()
        x1[0, 40] = bad
        with pytest.raises(err):
            f(x1)


@pytest.mark.parametrize("path", _i8gemm.available())
def test_iq4_xs_one_row_q8_k_equals_the_batch_kernel(path, monkeypatch):
    # IQ4_XS's matvec_fn in mode q8_k: the row's Q8_K super-blocks and _i4dot's decode in one compiled call,
    # equal to the first row of a 2-row batch (q8_k_blocks, then the same driver) to the bit; NaN/inf keep
    # qmatmul's error; not offered in mode f32.
    from quantfmt.errors import NonFiniteError

    monkeypatch.setattr(_i4dot, "PATH", path)
    rng = np.random.default_rng(7)
    fmt = get_format("IQ4_XS")
    for rows, cols in ((70, 512), (576, 1536), (33, 1024)):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        data = fmt.quantize(w)
        prep = fmt.prepare(data, rows, cols)
        x = rng.standard_normal((2, cols)).astype(np.float32)
        x[0, 256:512] = 0  # an all-zero super-block: d_x = 0
        x[0, :256] *= np.float32(1e-4)
        t = QTensor("w", fmt, (rows, cols), data)
        f = t.matvec_fn("q8_k")
        assert fmt.matvec_fn(t._prepared, rows, cols, "q8_k") is not None  # the one-row kernel, not matmul
        assert fmt.matvec_fn(t._prepared, rows, cols, "f32") is None
        one = f(np.ascontiguousarray(x[:1]))
        np.testing.assert_array_equal(one, fmt.qmatmul(data, (rows, cols), x, "q8_k", prepared=prep)[:1])
    for bad in (np.nan, -np.inf):
        x1 = x[:1].copy()
        x1[0, 40] = bad
        with pytest.raises(NonFiniteError, match="IQ4X: qmatmul mode 'q8_k'"):
            f(x1)
    # a matrix large enough for threads (forced): the row made in one call, the driver on parallel_rows
    monkeypatch.setattr(iq4_xs, "decode_threads", lambda rows, cols: 2)
    monkeypatch.setattr(_i4dot, "decode_threads", lambda rows, cols: 2)
    t = QTensor("w", fmt, (rows, cols), data)
    f = t.matvec_fn("q8_k")
    np.testing.assert_array_equal(f(np.ascontiguousarray(x[:1])), fmt.qmatmul(data, (rows, cols), x[:1], "q8_k"))
    with pytest.raises(NonFiniteError, match="IQ4X: qmatmul mode 'q8_k'"):
        f(x1)


@pytest.mark.parametrize("path", _i8gemm.available())
def test_one_row_matvec_on_threads_equals_qmatmul(path, monkeypatch):
    # A matrix large enough for threads (decode_threads > 1, forced here): matvec_fn quantizes the row in one
    # compiled call and runs the path's driver on parallel_rows' threads, as qmatmul does after its Python
    # quantization: the same bits; NaN/inf keep qmatmul's error.
    from quantfmt.errors import NonFiniteError

    monkeypatch.setattr(_i4dot, "PATH", path)
    monkeypatch.setattr(_i4dot, "decode_threads", lambda rows, cols: 2)
    rng = np.random.default_rng(8)
    for tag in ("Q4_0", "Q4_1", "IQ4N", "MXF4"):
        fmt = get_format(tag)
        rows, cols = 333, 1024
        data = fmt.quantize(rng.standard_normal((rows, cols)).astype(np.float32))
        t = QTensor("w", fmt, (rows, cols), data)
        f = t.matvec_fn("q8_0")
        assert fmt.matvec_fn(t._prepared, rows, cols, "q8_0") is not None
        x = rng.standard_normal((1, cols)).astype(np.float32)
        x[0, 64:96] = 0
        np.testing.assert_array_equal(f(x), fmt.qmatmul(data, (rows, cols), x, "q8_0"), err_msg=tag)
        x[0, 5] = np.nan
        with pytest.raises(NonFiniteError):
            f(x)
