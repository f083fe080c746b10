"""The int8 prefill kernels of Q4_0, Q4_1, Q8_0 (plugins/_i8gemm.py) == ggml's dot product.

Every int8 path this CPU can run (AVX512-VNNI, AVX-VNNI, AVX2) is forced in turn through the
module switch `_i8gemm.PATH`, and so is the portable path (dequantized tiles + sgemm); a
subprocess compiling for a generic CPU checks that the portable path is what such a CPU gets.
Mode "q8_0" is compared with each format's numpy re-implementation of ggml's integer dot
(qmatmul_q8_ref) at the summation-order tolerance of tests/test_qtiles.py, on shapes that need
padding (rows not a multiple of the 2-row register tile, activation rows not a multiple of the
16- or 8-lane vector or of the 4-vector tile) and batch sizes across the tiles/int8 thresholds.
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
from quantfmt_formats import _i4dot, _i8dot, _i8gemm, q4_0, q4_1, q5_0, q5_1, q8_0

MODULES = {"Q4_0": q4_0, "Q8_0": q8_0, "Q4_1": q4_1}
PATHS = [*_i8gemm.available(), "portable"]
SHAPES = [(1, 32), (3, 64), (70, 96), (33, 1024)]
NS = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 65, 127, 129]


def weights(rng, rows, cols, tag):
    w = (rng.standard_normal((rows, cols)) + 0.3).astype(np.float32)
    w[:, :32] *= 50  # blocks of very different scales
    w[rows // 2, 32:64] = 0  # an all-zero block (scale 0)
    return gguf_quantize(w, getattr(GT, tag)).reshape(-1)


@pytest.mark.parametrize("path", [p for p in _i8gemm.available() if p != "portable"])
@pytest.mark.parametrize("tag", list(MODULES))
def test_int8_prefill_ranges_across_chunks_on_two_threads(tag, path, monkeypatch):
    # _run hands out one product's work items, every chunk of activation groups, in one parallel_rows call:
    # with tiny ranges, two threads take ranges that start and end inside different chunks (the last partial)
    import numba

    monkeypatch.setattr(_i8gemm, "PATH", path)
    monkeypatch.setattr(_i8gemm, "MIN_RANGE_MACS", 1)
    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        rng = np.random.default_rng(7)
        rows, cols = 70, 96
        data = weights(rng, rows, cols, tag)
        fmt = get_format(tag)
        wq = fmt.dequantize(data, (rows, cols))
        x = rng.standard_normal((300, cols)).astype(np.float32)
        got = fmt.qmatmul(data, (rows, cols), x, "q8_0")
        mag = float((np.abs(x) @ np.abs(wq).T).max())
        np.testing.assert_allclose(got, MODULES[tag].qmatmul_q8_ref(data, rows, cols, x), rtol=0, atol=mag * 2e-6)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tag", list(MODULES))
def test_int8_prefill_matches_ggml_dot(tag, path, monkeypatch):
    monkeypatch.setattr(_i8gemm, "PATH", path)
    rng = np.random.default_rng(20261206)
    fmt, mod = get_format(tag), MODULES[tag]
    for rows, cols in SHAPES:
        data = weights(rng, rows, cols, tag)
        wq = fmt.dequantize(data, (rows, cols))
        prep = fmt.prepare(data, rows, cols)
        for n in NS:
            x = rng.standard_normal((n, cols)).astype(np.float32)
            x[0, :32] *= 1e-3
            x[n // 2, 32:64] *= 300
            if cols > 32:
                x[-1, 32:64] = 0  # an all-zero activation block (scale 0)
            mag = float((np.abs(x) @ np.abs(wq).T).max())
            got = fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)
            assert got.shape == (n, rows) and got.dtype == np.float32
            ref = mod.qmatmul_q8_ref(data, rows, cols, x)
            np.testing.assert_allclose(got, ref, rtol=0, atol=mag * 2e-6, err_msg=f"{rows}x{cols} n={n}")
            if tag == "Q8_0" and _i8dot.takes(n, "q8_0"):
                # Q8_0 decodes on plugins/_i8dot.py (its own PATH, tests/test_i8dot.py) below its MIN_ROWS
                assert fmt.kernel_path("qmatmul", n, "q8_0") == f"i8dot-{_i8dot.PATH}"
            elif (tag != "Q8_0" and path != "portable" and _i4dot.PATH != "portable"
                  and n < _i4dot.MIN_ROWS[_i4dot.PATH]):
                # Q4_0 and Q4_1 decode on plugins/_i4dot.py (its own PATH) below its MIN_ROWS
                assert fmt.kernel_path("qmatmul", n, "q8_0") == f"lut-{_i4dot.PATH}"
            elif n >= _i8gemm.MIN_ROWS[tag.lower()] and path != "portable":
                assert fmt.kernel_path("qmatmul", n, "q8_0") == f"int8-{path}"
            else:
                # Q4_0 and Q4_1 decode on plugins/_i4dot.py (its own PATH) where the CPU has int8 dot products
                lut = ()
                if tag in ("Q4_0", "Q4_1") and path != "portable" and _i4dot.PATH != "portable":
                    lut = (f"lut-{_i4dot.PATH}", f"int8-{_i4dot.PATH}")
                assert fmt.kernel_path("qmatmul", n, "q8_0") in (prefill_path(), "tiles-q8_0", *lut)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tag,mod", [("Q5_0", q5_0), ("Q5_1", q5_1)])
def test_q5_batches_take_the_int8_kernels(tag, mod, path, monkeypatch):
    # Q5_0 as Q8_0 blocks of q - 16 (kind "q8_0"), Q5_1 as Q8_0 blocks of q plus Q4_1's offsets
    # (kind "q8_1"), made from the int8 tiles on first use (plugins/_i8tiles.py int8_operands)
    monkeypatch.setattr(_i8gemm, "PATH", path)
    rng = np.random.default_rng(20261207)
    fmt = get_format(tag)
    for rows, cols in SHAPES:
        data = weights(rng, rows, cols, tag)
        wq = np.abs(fmt.dequantize(data, (rows, cols)))
        if tag == "Q5_1":  # d*q + m: the two terms' sums cancel, so the float error is relative to both
            q, d, m = mod.unpack(data, rows, cols)
            wq = (np.abs(d[..., None] * q) + np.abs(m[..., None])).reshape(rows, cols)
        prep = fmt.prepare(data, rows, cols)
        for n in NS:
            x = rng.standard_normal((n, cols)).astype(np.float32)
            x[n // 2, :32] *= 300
            if cols > 32:
                x[-1, 32:64] = 0  # an all-zero activation block (scale 0)
            mag = float((np.abs(x) @ np.abs(wq).T).max())
            got = fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)
            assert got.shape == (n, rows) and got.dtype == np.float32
            np.testing.assert_allclose(got, mod.qmatmul_q8_ref(data, rows, cols, x), rtol=0, atol=mag * 2e-6,
                                       err_msg=f"{rows}x{cols} n={n}")
            # below _i8dot's MIN_ROWS (and with its own PATH not portable) Q8_0's int8 decode takes them
            int8 = n >= _i8gemm.MIN_ROWS["q8_0"] and path != "portable" and not _i8dot.takes(n, "q8_0")
            assert (fmt.kernel_path("qmatmul", n, "q8_0") == f"int8-{path}") == int8
            # mode f32 never takes int8 activations
            assert not fmt.kernel_path("qmatmul", n, "f32").startswith("int8")
        assert (prep.i8 is not None) == (path != "portable" and any(n >= _i8gemm.MIN_ROWS["q8_0"]
                                                                     and not _i8dot.takes(n, "q8_0") for n in NS))


@pytest.mark.parametrize("path", _i8gemm.available())
def test_each_path_is_the_same_function(path):
    # The paths differ only in the float order of the block sums: against each other they agree
    # to float32 rounding (a wrong lane or block order would not).
    rng = np.random.default_rng(7)
    for tag in MODULES:
        fmt = get_format(tag)
        rows, cols = 37, 256
        data = weights(rng, rows, cols, tag)
        prep = fmt.prepare(data, rows, cols)
        x = rng.standard_normal((40, cols)).astype(np.float32)
        a = _i8gemm.qmatmul_q8(tag.lower(), prep, x, tag, path)
        b = _i8gemm.qmatmul_q8(tag.lower(), prep, x, tag, _i8gemm.available()[-1])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("path", _i8gemm.available())
def test_q8_0_weight_bytes_of_minus_128(path):
    # No quantizer writes a Q8_0 quant of -128, a file may hold one: every path stays exact there,
    # against negative activations too (the AVX2 sign trick takes |w|, never -(-128)).
    rng = np.random.default_rng(9)
    rows, cols = 40, 256
    data = weights(rng, rows, cols, "Q8_0")
    data.reshape(rows, cols // 32, 34)[:, :, 2:6] = 0x80
    prep = get_format("Q8_0").prepare(data, rows, cols)
    x = rng.standard_normal((16, cols)).astype(np.float32)
    x[::2] = -np.abs(x[::2])
    got = _i8gemm.qmatmul_q8("q8_0", prep, x, "Q8_0", path)
    ref = q8_0.qmatmul_q8_ref(data, rows, cols, x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * float(np.abs(ref).max()))


def test_f32_mode_stays_float():
    # Mode "f32" batches never take the int8 kernels: their error stays at float32 level.
    rng = np.random.default_rng(3)
    for tag in MODULES:
        fmt = get_format(tag)
        data = weights(rng, 40, 128, tag)
        wq = fmt.dequantize(data, (40, 128))
        x = rng.standard_normal((64, 128)).astype(np.float32)
        mag = float((np.abs(x) @ np.abs(wq).T).max())
        assert fmt.kernel_path("qmatmul", 64, "f32") == prefill_path()  # W.T tiles, sgemm NN
        got = fmt.qmatmul(data, (40, 128), x, "f32")
        np.testing.assert_allclose(got, x @ wq.T.astype(np.float64), rtol=0, atol=mag * 1e-6)


def test_generic_cpu_takes_the_portable_path():
    code = """
import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf.quants import quantize
from quantfmt import get_format
from quantfmt_formats import _i8gemm, q4_0
assert _i8gemm.PATH == "portable" and _i8gemm.available() == []
fmt = get_format("Q4_0")
rng = np.random.default_rng(0)
data = quantize(rng.standard_normal((40, 96)).astype(np.float32), GT.Q4_0).reshape(-1)
x = rng.standard_normal((9, 96)).astype(np.float32)
got = fmt.qmatmul(data, (40, 96), x, "q8_0")
ref = q4_0.qmatmul_q8_ref(data, 40, 96, x)
wq = fmt.dequantize(data, (40, 96))
assert np.abs(got - ref).max() <= 2e-6 * (np.abs(x) @ np.abs(wq).T).max()
print(fmt.kernel_path("qmatmul", 9, "q8_0"))
"""
    env = {**os.environ, "NUMBA_CPU_NAME": "generic"}
    env.pop("NUMBA_CPU_FEATURES", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() in ("blas-tiles", "tiles+blas-per-thread",  # per-thread: BLAS threads settable
                                  "tiles+gemm512-per-thread")


@pytest.mark.parametrize(
    ("features", "int8", "simd"),
    [("+avx2,+fma", "avx2", "simd8"), ("+avx2,+fma,+avxvnni", "avxvnni", "simd8"),
     ("+avx2,+fma,+avx512f,+avx512bw,+avx512vnni", "avx512vnni", "simd16"), ("+sse4.2", "portable", "portable")],
)
def test_paths_follow_the_features_numba_compiles_for(features, int8, simd):
    # What a Zen 3 (AVX2), an AVX-VNNI laptop part, an AVX-512 VNNI server and an old CPU get.
    code = "from quantfmt_formats import _i8gemm, _q4simd; print(_i8gemm.PATH, _q4simd.PATH)"
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": features}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [int8, simd]
