"""Q8_0's int8 decode (plugins/_i8dot.py) == ggml's ggml_vec_dot_q8_0_q8_0.

Every path this CPU can run (AVX512-VNNI, AVX-VNNI, AVX2) is forced in turn through the module switch
`_i8dot.PATH`, and so is the portable path (Q8_0's float tiles); subprocesses compiling for a generic
CPU with only AVX2, and with nothing, check that such CPUs get (and pass on) the AVX2 and the portable
paths. Results are compared with the numpy re-implementation of ggml's integer dot (qmatmul_q8_ref) at
the summation-order tolerance of tests/test_i8gemm.py, on shapes that need padding (weight rows not a
multiple of the 32-row tile, blocks not a multiple of 4), batch sizes on both sides of the
decode/prefill switch, and weight bytes of -128 (no quantizer writes one, a file may hold one: the
offset and the sign trick must both stay exact there).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import quantize as gguf_quantize

from quantfmt import get_format
from quantfmt.families import prefill_path
from quantfmt.tensor import QTensor
from quantfmt_formats import _i8dot, _i8gemm, _i8tiles, q5_0, q5_1, q8_0

PATHS = [*_i8gemm.available(), "portable"]
SHAPES = [(1, 32), (37, 96), (70, 512), (33, 1024)]
NS = [1, 2, 3, 5, 9, 11, 12, 13, 17]


def weights(rng, rows, cols, extremes=True):
    w = (rng.standard_normal((rows, cols)) + 0.3).astype(np.float32)
    w[:, :32] *= 50  # blocks of very different scales
    w[rows // 2, 32 % cols : 32 % cols + 32] = 0  # an all-zero block (scale 0)
    data = gguf_quantize(w, GT.Q8_0).reshape(-1)
    if extremes:
        blk = data.reshape(rows, cols // 32, 34)
        blk[0, 0, 2:6] = 0x80  # -128: the byte no quantizer writes
        blk[-1, -1, 2:] = np.arange(32, dtype=np.uint8) * 8  # -128 .. 127 across a block
    return data


def expected_path(n, path):
    if path == "portable":
        if _i8gemm.PATH != "portable" and n >= _i8gemm.MIN_ROWS["q8_0"]:
            return f"int8-{_i8gemm.PATH}"
        return prefill_path() if n >= 8 else "tiles-q8_0"
    return f"i8dot-{path}" if n < _i8dot.MIN_ROWS[path] else f"int8-{_i8gemm.PATH}"


@pytest.mark.parametrize("path", PATHS)
def test_decode_matches_ggml_dot(path, monkeypatch):
    monkeypatch.setattr(_i8dot, "PATH", path)
    rng = np.random.default_rng(20261207)
    fmt = get_format("Q8_0")
    for rows, cols in SHAPES:
        data = weights(rng, rows, cols)
        wq = fmt.dequantize(data, (rows, cols))
        prep = fmt.prepare(data, rows, cols)
        for n in NS:
            x = rng.standard_normal((n, cols)).astype(np.float32)
            x[0, :32] *= 1e-3
            x[n // 2, -32:] *= 300
            if cols > 32:
                x[-1, 32:64] = 0  # an all-zero activation block (scale 0)
            x[0, -32:-16] = -np.abs(x[0, -32:-16])  # negative activations against the -128 weights
            mag = float((np.abs(x) @ np.abs(wq).T).max())
            got = fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)
            assert got.shape == (n, rows) and got.dtype == np.float32
            ref = q8_0.qmatmul_q8_ref(data, rows, cols, x)
            np.testing.assert_allclose(got, ref, rtol=0, atol=mag * 2e-6, err_msg=f"{rows}x{cols} n={n}")
            assert fmt.kernel_path("qmatmul", n, "q8_0") == expected_path(n, path)


@pytest.mark.parametrize("path", _i8gemm.available())
def test_one_row_matvec_on_threads_equals_qmatmul(path, monkeypatch):
    # Q8_0, Q5_0 and Q5_1 on a matrix large enough for threads (forced): the row quantized in one compiled
    # call, _i8dot's driver (Q5_1: then its offsets) on parallel_rows' threads, the bits of qmatmul's path;
    # NaN/inf keep its error.
    from quantfmt.errors import NonFiniteError

    monkeypatch.setattr(_i8gemm, "PATH", path)
    monkeypatch.setattr(_i8dot, "PATH", path)
    monkeypatch.setattr(_i8dot, "decode_threads", lambda rows, cols: 2)
    monkeypatch.setattr(_i8tiles, "decode_threads", lambda rows, cols: 2)
    rng = np.random.default_rng(12)
    for tag in ("Q8_0", "Q5_0", "Q5_1"):
        fmt = get_format(tag)
        rows, cols = 333, 1024
        data = fmt.quantize(rng.standard_normal((rows, cols)).astype(np.float32))
        t = QTensor("w", fmt, (rows, cols), data)
        f = t.matvec_fn("q8_0")
        assert fmt.matvec_fn(t._prepared, rows, cols, "q8_0") is not None
        x = rng.standard_normal((1, cols)).astype(np.float32)
        np.testing.assert_array_equal(f(x), fmt.qmatmul(data, (rows, cols), x, "q8_0"), err_msg=tag)
        x[0, 5] = np.inf
        with pytest.raises(NonFiniteError):
            f(x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tag,mod", [("Q5_0", q5_0), ("Q5_1", q5_1)])
def test_q5_decode_takes_the_int8_kernels(tag, mod, path, monkeypatch):
    # Q5_0's values q - 16 and Q5_1's q as Q8_0's decode tiles (plugins/_i8tiles.py decode_tiles), made
    # from the int8 tiles on first use; Q5_1 then adds its offsets times ggml's fp16 Q8_1 sums. Against
    # the numpy ggml dots (ggml_vec_dot_q5_0_q8_0, ggml_vec_dot_q5_1_q8_1); the one-row matvec_fn equals the
    # batch path's result to the bit.
    monkeypatch.setattr(_i8dot, "PATH", path)
    rng = np.random.default_rng(20261208)
    fmt = get_format(tag)
    for rows, cols in SHAPES:
        w = (rng.standard_normal((rows, cols)) + 0.3).astype(np.float32)
        w[:, :32] *= 50
        w[rows // 2, 32 % cols : 32 % cols + 32] = 0  # an all-zero block (scale 0)
        data = gguf_quantize(w, getattr(GT, tag)).reshape(-1)
        if tag == "Q5_1":  # d*q + m: the two terms' sums cancel, so the float error is relative to both
            q, d, m = mod.unpack(data, rows, cols)
            wq = (np.abs(d[..., None] * q) + np.abs(m[..., None])).reshape(rows, cols)
        else:
            wq = np.abs(fmt.dequantize(data, (rows, cols)))
        prep = fmt.prepare(data, rows, cols)
        for n in NS:
            x = rng.standard_normal((n, cols)).astype(np.float32)
            x[n // 2, -32:] *= 300
            if cols > 32:
                x[-1, 32:64] = 0  # an all-zero activation block (scale 0)
            mag = float((np.abs(x) @ wq.T).max())
            got = fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)
            ref = mod.qmatmul_q8_ref(data, rows, cols, x)
            np.testing.assert_allclose(got, ref, rtol=0, atol=mag * 2e-6, err_msg=f"{tag} {rows}x{cols} n={n}")
            decode = path != "portable" and n < _i8dot.MIN_ROWS[path]
            assert (fmt.kernel_path("qmatmul", n, "q8_0") == f"i8dot-{path}") == decode
            if n == 1:
                mv = fmt.matvec_fn(prep, rows, cols, "q8_0")
                assert (mv is not None) == decode
                if mv is not None:  # the same kernels as the batch path, activation quantizer included
                    np.testing.assert_array_equal(mv(x), got)
        assert (prep.dec is not None) == (path != "portable")


@pytest.mark.parametrize("path", _i8gemm.available())
def test_integer_dots_are_exact(path):
    # Small integer scales: every float product and sum is exact, so the decode must equal the
    # integer dot to the bit, -128 weights against -127 activations included.
    rng = np.random.default_rng(1)
    rows, nb = 40, 8
    q = rng.integers(-128, 128, (rows, nb, 32)).astype(np.int8)
    q[:, :, :4] = -128
    blk = np.zeros((rows, nb, 34), np.uint8)
    blk[:, :, 0:2] = np.array([1], np.float16).view(np.uint8)  # d = 1
    blk[:, :, 2:] = q.view(np.uint8)
    xq = rng.integers(-127, 128, (1, nb, 32)).astype(np.float32)
    xq[..., :4] = -127
    xq[..., 4] = 127  # d_x = 127/127 = 1: x quantizes to itself
    qn = _i8dot.decode_tiles(blk, rows)
    assert qn.ctypes.data % 64 == 0
    d = np.ones((qn.shape[0], qn.shape[1], 32), np.float32)
    got = _i8dot.qmatmul(qn, d, rows, nb * 32, xq.reshape(1, -1), "test", path)
    want = (q.astype(np.int64).reshape(rows, -1) @ xq.reshape(-1).astype(np.int64)).astype(np.float32)
    np.testing.assert_array_equal(got[0], want)


@pytest.mark.parametrize("path", _i8gemm.available())
def test_decode_and_prefill_agree(path, monkeypatch):
    # The same product through the decode kernel (weight rows in lanes) and the prefill kernel
    # (activation rows in lanes): only the float order of the block sums differs.
    monkeypatch.setattr(_i8dot, "PATH", path)
    rng = np.random.default_rng(5)
    fmt = get_format("Q8_0")
    rows, cols = 45, 512
    data = weights(rng, rows, cols)
    prep = fmt.prepare(data, rows, cols)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    a = fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)
    monkeypatch.setitem(_i8dot.MIN_ROWS, path, 1)
    assert fmt.kernel_path("qmatmul", 5, "q8_0") == f"int8-{_i8gemm.PATH}"
    b = fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_tiles_are_made_on_first_use():
    # prepare() keeps the scales only; mode "q8_0" decode adds its int8 tiles, mode "f32" the float
    # tiles: 1 byte per weight each (a matrix used in both modes holds both).
    rng = np.random.default_rng(2)
    fmt = get_format("Q8_0")
    rows, cols = 64, 256
    data = weights(rng, rows, cols, extremes=False)
    prep = fmt.prepare(data, rows, cols)
    per_block = rows * cols // 32
    assert prep.nbytes == per_block * 4
    fmt.qmatmul(data, (rows, cols), rng.standard_normal((1, cols)).astype(np.float32), "q8_0", prepared=prep)
    if _i8dot.takes(1, "q8_0"):
        assert prep._q is None and prep.nbytes == per_block * (4 + 32)
    fmt.qmatmul(data, (rows, cols), rng.standard_normal((1, cols)).astype(np.float32), "f32", prepared=prep)
    assert prep.nbytes == per_block * (4 + 32 + (32 if prep.dec is not None else 0))


_SUBPROCESS = """
import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf.quants import quantize
from quantfmt import get_format
from quantfmt_formats import q8_0
rng = np.random.default_rng(0)
fmt = get_format("Q8_0")
data = quantize(rng.standard_normal((40, 256)).astype(np.float32), GT.Q8_0).reshape(-1)
wq = fmt.dequantize(data, (40, 256))
for n in (1, 20):
    x = rng.standard_normal((n, 256)).astype(np.float32)
    got = fmt.qmatmul(data, (40, 256), x, "q8_0")
    ref = q8_0.qmatmul_q8_ref(data, 40, 256, x)
    assert np.abs(got - ref).max() <= 2e-6 * (np.abs(x) @ np.abs(wq).T).max()
    print(fmt.kernel_path("qmatmul", n, "q8_0"))
"""


@pytest.mark.parametrize(("features", "paths"), [("+avx2,+fma", ["i8dot-avx2", "int8-avx2"]),
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
    assert out.stdout.split() == paths


@pytest.mark.parametrize("path", _i8gemm.available())
def test_one_row_matvec_equals_the_batch_kernel_and_keeps_its_errors(path, monkeypatch):
    # Format.matvec_fn, n = 1 on one thread, quantizes and multiplies in one call (_i8dot._MATVEC): bit for bit the
    # activations quantize_activations makes and the same driver, so the row of a 2-row batch (which
    # goes through those) is equal; NaN/inf and an fp16-overflowing scale still raise its errors.
    from quantfmt.errors import NonFiniteError, RangeError

    monkeypatch.setattr(_i8dot, "PATH", path)
    rng = np.random.default_rng(5)
    fmt = get_format("Q8_0")
    for rows, cols in ((70, 512), (576, 576), (33, 1024)):
        data = weights(rng, rows, cols)
        prep = fmt.prepare(data, rows, cols)
        x = rng.standard_normal((2, cols)).astype(np.float32)
        x[0, 32:64] = 0  # a zero block
        t = QTensor("w", fmt, (rows, cols), data)
        f = t.matvec_fn("q8_0")
        assert fmt.matvec_fn(t._prepared, rows, cols, "q8_0") is not None  # the one-row kernel, not matmul
        one = f(np.ascontiguousarray(x[:1]))
        np.testing.assert_array_equal(one, fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)[:1])
    for bad, err in ((np.nan, NonFiniteError), (np.inf, NonFiniteError), (1e9, RangeError)):
        x1 = x[:1].copy()
        x1[0, 40] = bad
        with pytest.raises(err):
            f(x1)
