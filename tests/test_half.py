"""F16 and BF16 kernels (plugins/_half.py), every path this CPU can run, against numpy's reference:
astype(float32) then matmul. The portable path runs here by the module switch and, compiled for a
generic CPU, in a subprocess."""

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from quantfmt import blas, cpu, families, gemm, get_format
from quantfmt.errors import RangeError
from quantfmt_formats import _half
from quantfmt_formats.plain import f32_from_bf16

F16_PATHS = ["portable"] + (["f16c"] if cpu.has("f16c") else [])


@pytest.fixture(params=F16_PATHS)
def f16_path(request, monkeypatch):
    monkeypatch.setattr(_half, "USE_F16C", request.param == "f16c")
    assert get_format("F16").kernel_path("dequantize") == request.param
    return request.param


def every_pattern() -> np.ndarray:
    """All 65536 16-bit patterns, (16, 4096): zeros of both signs, subnormals, normals, infinities,
    signalling and quiet NaNs with every payload."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(16, 4096)


def reference(tag: str, bits: np.ndarray) -> np.ndarray:
    if tag == "F16":
        return bits.view(np.float16).astype(np.float32)
    return f32_from_bf16(bits)


def test_reference_nan_policy():
    # numpy keeps a NaN's payload and its signalling bit (what the kernels promise to match), and the
    # BF16 reference is the plain shift: derived by hand, so a change in numpy shows here.
    bits = np.array([0x7C01, 0x7E00, 0xFDFF, 0x0001, 0x8400, 0x7C00], np.uint16)
    assert [hex(v) for v in reference("F16", bits).view(np.uint32)] == [
        "0x7f802000", "0x7fc00000", "0xffbfe000", "0x33800000", "0xb8800000", "0x7f800000"]
    assert [hex(v) for v in reference("BF16", bits).view(np.uint32)] == [
        "0x7c010000", "0x7e000000", "0xfdff0000", "0x10000", "0x84000000", "0x7c000000"]


def _check_exact(tag):
    bits = every_pattern()
    ref = reference(tag, bits).view(np.uint32)
    f = get_format(tag)
    data = bits.reshape(-1).view(np.uint8)
    assert np.array_equal(f.dequantize(data, bits.shape).view(np.uint32), ref)
    idx = np.array([15, 0, -1, 7, 7, 3])
    assert np.array_equal(f.get_rows(data, bits.shape, idx).view(np.uint32), ref[idx])
    # one wide row (a single row still splits into column ranges) and a 1-D tensor
    assert np.array_equal(f.dequantize(data, (1, 65536)).view(np.uint32), ref.reshape(1, -1))
    assert np.array_equal(f.get_rows(data, (1, 65536), [0]).view(np.uint32), ref.reshape(1, -1))
    assert np.array_equal(f.dequantize(data, (65536,)).view(np.uint32), ref.reshape(-1))
    # the prefill tiles' converter: the same values, any NaN for a NaN (its payload is lost in BLAS)
    tile = np.full((4, 4096), 7.0, np.float32)
    _half.tile_to_f32(tag, bits, np.arange(5, 9), tile)
    nan = np.isnan(ref[5:9].view(np.float32))
    assert np.array_equal(np.isnan(tile), nan)
    assert np.array_equal(tile.view(np.uint32)[~nan], ref[5:9][~nan])


@pytest.fixture(params=["serial", "parallel"])
def threads(request, monkeypatch):
    # conversions switch to the parallel kernels from PARALLEL_MIN weights: run both on these sizes
    monkeypatch.setattr(_half, "PARALLEL_MIN", 1 if request.param == "parallel" else 1 << 62)
    return request.param


def test_f16_every_bit_pattern_exact(f16_path, threads):
    _check_exact("F16")


def test_bf16_every_bit_pattern_exact(threads):
    assert get_format("BF16").kernel_path("dequantize") == "shift"
    _check_exact("BF16")


@pytest.mark.parametrize("tag", ["F16", "BF16"])
def test_read_only_and_unaligned_bytes(tag, rng, threads):
    bits = rng.integers(0, 1 << 16, (5, 33), dtype=np.uint16)
    bits[(bits & 0x7F80) == 0x7F80] = 0  # finite (bf16 and f16 alike), so qmatmul compares plainly
    bits[(bits & 0x7C00) == 0x7C00] = 0
    ref = reference(tag, bits)
    f = get_format(tag)
    buf = np.empty(bits.nbytes + 1, np.uint8)[1:]  # odd address: the uint16 view is unaligned
    buf[:] = bits.reshape(-1).view(np.uint8)
    x = rng.standard_normal((2, 33)).astype(np.float32)
    for data in (bytes(bits.reshape(-1).view(np.uint8)), buf):
        assert np.array_equal(f.dequantize(data, bits.shape), ref)
        assert np.array_equal(f.get_rows(data, bits.shape, [4, 0]), ref[[4, 0]])
        np.testing.assert_allclose(f.qmatmul(data, bits.shape, x), x @ ref.T, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def weights_with_specials(tag, rows, cols, rng, nonfinite=True):
    """Random normal weights as bits, with ±0 and subnormals spread in, and (optionally) rows holding
    +inf, -inf, both, NaN."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if tag == "F16":
        bits = w.astype(np.float16).view(np.uint16)
        sub, inf, nan = [0x0001, 0x83FF, 0x0200, 0x8000, 0x0000], 0x7C00, 0x7C01
    else:
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)
        sub, inf, nan = [0x0001, 0x807F, 0x0040, 0x8000, 0x0000], 0x7F80, 0x7F81
    mask = rng.random((rows, cols)) < 0.05
    bits[mask] = rng.choice(np.array(sub, np.uint16), mask.sum())
    if nonfinite and rows >= 4:
        bits[0, cols // 2] = inf
        bits[1, 0] = inf | 0x8000
        bits[2, -1], bits[2, 0] = inf, inf | 0x8000
        bits[3, cols // 3] = nan | 0x8000
    return bits


def assert_matmul_close(got, x, wf):
    with np.errstate(invalid="ignore"):
        ref = x.astype(np.float64) @ wf.astype(np.float64).T
        # where the reference is not finite, the same inf or NaN (IEEE: inf + finite = inf in any order)
        ref32 = x @ wf.T
        assert np.array_equal(np.isnan(got), np.isnan(ref32))
        fin = np.isfinite(ref32)
        assert np.array_equal(got[~fin & ~np.isnan(ref32)], ref32[~fin & ~np.isnan(ref32)])
        bound = 2e-6 * (np.abs(x).astype(np.float64) @ np.abs(np.where(np.isfinite(wf), wf, 0)).astype(np.float64).T)
        err = np.abs(got.astype(np.float64) - ref)
        assert (err[fin] <= bound[fin] + 1e-30).all(), float((err[fin] - bound[fin]).max())


SHAPES = [(1, 1), (1, 33), (3, 17), (5, 8), (40, 130), (19, 4099)]


def _check_qmatmul(tag, rng, monkeypatch):
    f = get_format(tag)
    for rows, cols in SHAPES:
        bits = weights_with_specials(tag, rows, cols, rng)
        wf = reference(tag, bits)
        data = bits.reshape(-1).view(np.uint8)
        for n in (1, 2, f.matvec_max_n, f.matvec_max_n + 1, 37):
            x = rng.standard_normal((n, cols)).astype(np.float32)
            x[:, -1] = 0.0  # inf * 0 = NaN: the rows holding inf at the last column
            assert_matmul_close(f.qmatmul(data, (rows, cols), x), x, wf)
        assert_matmul_close(f.qmatmul(data, (rows, cols), x[0])[None], x[:1], wf)
    # decode in several row ranges on several threads, the last one partial and not a multiple of 4
    monkeypatch.setattr(_half, "MATVEC_GRAB", 6 * 130)
    bits = weights_with_specials(tag, 39, 130, rng)
    for n in (1, 3):
        x = rng.standard_normal((n, 130)).astype(np.float32)
        assert_matmul_close(f.qmatmul(bits.reshape(-1).view(np.uint8), (39, 130), x), x, reference(tag, bits))
    # prefill in several tiles, the last one partial (both prefill paths size their tiles)
    monkeypatch.setattr(f, "prefill_tile_elements", 7 * 130)
    monkeypatch.setattr(_half, "prefill_tile", lambda n, cols: 7 * 130)
    bits = weights_with_specials(tag, 40, 130, rng)
    x = rng.standard_normal((12, 130)).astype(np.float32)
    assert_matmul_close(f.qmatmul(bits.reshape(-1).view(np.uint8), (40, 130), x), x, reference(tag, bits))


_PER_THREAD = blas.available() and numba.config.NUMBA_NUM_THREADS > 1
PREFILL_PATHS = (["blas"] + (["blas-per-thread"] if _PER_THREAD else [])
                 + (["gemm512-per-thread"] if _PER_THREAD and gemm.use() else []))


@pytest.fixture(params=PREFILL_PATHS)
def prefill_path(request, monkeypatch):
    # per-thread sgemms (quantfmt.gemm's, or numpy's OpenBLAS on one thread) where numpy's OpenBLAS threads
    # can be set; else (forced here) BLAS's own threads
    monkeypatch.setattr(blas, "ENABLED", request.param != "blas")
    monkeypatch.setattr(gemm, "ENABLED", request.param == "gemm512-per-thread")
    # the per-thread path needs two numba threads, whatever an earlier test left numba at
    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    numba.set_num_threads(before)


def test_f16_qmatmul(f16_path, prefill_path, rng, monkeypatch):
    f = get_format("F16")
    assert f.kernel_path("qmatmul", 1) == f"matvec-{f16_path}"
    assert f.kernel_path("qmatmul", 128) == f"tiles-{f16_path}+{prefill_path}"
    _check_qmatmul("F16", rng, monkeypatch)


def test_bf16_qmatmul(prefill_path, rng, monkeypatch):
    f = get_format("BF16")
    assert f.kernel_path("qmatmul", 1) == "matvec-shift"
    assert f.kernel_path("qmatmul", 128) == f"tiles-shift+{prefill_path}"
    _check_qmatmul("BF16", rng, monkeypatch)


def test_prefill_per_thread_restores_blas_threads(rng):
    # the per-thread path sets OpenBLAS to one thread for its sgemms only
    if not blas.available():
        pytest.skip("numpy's OpenBLAS thread count cannot be set here")
    get, _ = blas._controls()
    before = get()
    bits = weights_with_specials("BF16", 300, 64, rng, nonfinite=False)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    assert_matmul_close(_half.prefill("BF16", bits, x, 64 * 7), x, reference("BF16", bits))
    assert get() == before


def test_assert_matmul_close_can_fail(rng):
    # the checker above would catch a kernel off by one ulp of a weight, a lost NaN, or a wrong inf
    bits = weights_with_specials("F16", 8, 64, rng)
    wf = reference("F16", bits)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        good = x @ wf.T
    assert_matmul_close(good, x, wf)
    for bad in (good * (1 + 1e-4), np.where(np.isnan(good), 0, good), -good):
        with pytest.raises(AssertionError):
            assert_matmul_close(bad, x, wf)


@pytest.mark.parametrize("features,path", [("", "portable"), ("+sse4.2,+avx,+avx2,+fma,+f16c", "f16c")])
def test_paths_compiled_for_other_cpus(tmp_path, features, path):
    # What a CPU without F16C runs (numba compiling for a generic x86-64, or the host's own generic: the
    # kernels must pick the portable path by themselves), and what an AVX2 CPU without AVX-512 runs (the
    # 16-lane decode dot products of F16, BF16 and F32 split into ymm halves), each against numpy.
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from quantfmt import blas, cpu, families, gemm, get_format
        path = sys.argv[1]
        assert cpu.has("f16c") == (path == "f16c")
        bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(16, 4096)
        ref = bits.view(np.float16).astype(np.float32)
        f = get_format("F16")
        data = bits.reshape(-1).view(np.uint8)
        assert np.array_equal(f.dequantize(data, bits.shape).view(np.uint32), ref.view(np.uint32))
        from quantfmt_formats import _half
        _half.PARALLEL_MIN = 1  # the parallel conversion kernel too
        assert np.array_equal(f.dequantize(data, bits.shape).view(np.uint32), ref.view(np.uint32))
        fin = np.where(np.isfinite(ref), ref, 0).astype(np.float32)
        rng = np.random.default_rng(0)
        for tag, w in (("F16", fin.astype(np.float16).view(np.uint16)),
                       ("BF16", (fin.view(np.uint32) >> 16).astype(np.uint16)), ("F32", fin)):
            if tag == "BF16":
                wf = (w.astype(np.uint32) << 16).view(np.float32)
            else:
                wf = w.view(np.float16).astype(np.float32) if tag == "F16" else w
            for shape in ((16, 4096), (7, 4096 - 5)):  # four-row groups and a partial one, a column tail
                ws = wf[: shape[0], : shape[1]]
                d2 = np.ascontiguousarray(w[: shape[0], : shape[1]]).reshape(-1).view(np.uint8)
                for n in (1, 3, 20):
                    x = rng.standard_normal((n, shape[1])).astype(np.float32)
                    np.testing.assert_allclose(get_format(tag).qmatmul(d2, shape, x), x @ ws.T, rtol=1e-4, atol=1e-3)
        prefill = "gemm512-per-thread" if _half.prefill_threads() and gemm.use() else (
            "blas-per-thread" if _half.prefill_threads() else "blas")
        assert f.kernel_path("qmatmul", 20) == f"tiles-{path}+" + prefill
        print(f.kernel_path("dequantize"), f.kernel_path("qmatmul", 1), f.kernel_path("qmatmul", 20).split("+")[0])
    """)
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("NUMBA_CPU_FEATURES", None)
    if features:
        env["NUMBA_CPU_FEATURES"] = features
    out = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [path, f"matvec-{path}", f"tiles-{path}"]


def rounding_corpus(rng) -> np.ndarray:
    """float32 values where float32 -> fp16 rounding can go wrong: every exponent from below fp16's
    smallest subnormal to above its overflow, with the 13 dropped mantissa bits at and around the
    tie (and all-zero / all-one), both signs, plus random finite bit patterns."""
    exps = np.arange(100, 145, dtype=np.uint32)  # 2**-27 .. 2**17
    low = np.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF], np.uint32)
    high = rng.integers(0, 1 << 10, 64, dtype=np.uint32)
    high[:4] = [0, 1, 0x3FE, 0x3FF]
    m = (high[:, None] << 13 | low[None, :]).reshape(-1)
    bits = (exps[:, None] << 23 | m[None, :]).reshape(-1)
    bits = np.concatenate([bits, bits | 0x80000000, rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint32)])
    w = bits.view(np.float32)
    return w[np.isfinite(w) & (np.abs(w) < 65520)]


def test_f16_quantize_identical_to_numpy(f16_path, rng):
    f = get_format("F16")
    assert f.kernel_path("quantize") == ("f16c" if f16_path == "f16c" else "numpy")
    w = rounding_corpus(rng)
    for shape in ((w.size,), (1, w.size), (w.size // 64, 64)):
        v = w[: np.prod(shape)].reshape(shape)
        assert np.array_equal(f.quantize(v), v.astype("<f2").view(np.uint8).reshape(-1))
    # several chunks claimed by several threads, overflow found in the last one only
    big = rng.standard_normal(3 * _half.QUANT_CHUNK + 5).astype(np.float32)
    assert np.array_equal(f.quantize(big), big.astype("<f2").view(np.uint8))
    big[-1] = 65520.0  # the tie that rounds to infinity
    with pytest.raises(RangeError, match=r"F16: weight 65520\.0 at row 0, column 196612"):
        f.quantize(big)
    big[-1] = np.nextafter(np.float32(65520), np.float32(0))  # rounds down to 65504
    assert f.quantize(big).view("<u2")[-1] == 0x7BFF


def test_f32_qmatmul_matvec_and_blas(prefill_path, rng, monkeypatch):
    # F32 batches of up to matvec_max_n rows go to _half's matvec (its F32 variant of the 16-lane dot),
    # more to sgemms (per thread where BLAS's threads can be set); all against float64, with infinities
    # and NaN in the weights, odd shapes, an unaligned buffer, and several row ranges on several threads.
    f = get_format("F32")
    assert f.kernel_path("qmatmul", f.matvec_max_n) == "matvec"
    assert f.kernel_path("qmatmul", f.matvec_max_n + 1) == prefill_path
    for rows, cols in SHAPES:
        wf = rng.standard_normal((rows, cols)).astype(np.float32)
        if rows >= 4:
            wf[0, cols // 2], wf[1, 0], wf[3, cols // 3] = np.inf, -np.inf, np.nan
        buf = np.empty(wf.nbytes + 1, np.uint8)[1:]
        buf[:] = wf.reshape(-1).view(np.uint8)
        for data in (wf.reshape(-1).view(np.uint8), buf, bytes(buf)):  # writable, unaligned, read-only
            for n in (1, 3, f.matvec_max_n, f.matvec_max_n + 1):
                x = rng.standard_normal((n, cols)).astype(np.float32)
                x[:, -1] = 0.0
                assert_matmul_close(f.qmatmul(data, (rows, cols), x), x, wf)
    monkeypatch.setattr(_half, "MATVEC_GRAB", 6 * 130)
    monkeypatch.setattr(families, "PREFILL_TILE", 2 * 130)  # 8-row ranges at n=30: four
    wf = rng.standard_normal((39, 130)).astype(np.float32)
    for n in (2, 30):
        x = rng.standard_normal((n, 130)).astype(np.float32)
        assert_matmul_close(f.qmatmul(wf.reshape(-1).view(np.uint8), (39, 130), x), x, wf)
