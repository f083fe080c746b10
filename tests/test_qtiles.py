"""The fast qmatmul of Q4_0, Q4_1, Q8_0 (row tiles, plugins/_qtiles.py) == the references.

Every path is exercised: the per-row tile kernels (n below BLAS_MIN_ROWS), the dequantized
tiles + sgemm path (n from BLAS_MIN_ROWS on), in both modes, on shapes that need padding
(rows not a multiple of the 32-row tile, blocks per row not a multiple of G = 4). Mode
"q8_0" is checked against each format's numpy re-implementation of ggml's dot product
(qmatmul_q8_ref) with the summation-order tolerance the ggml tests use; mode "f32" against
x @ dequantize(W).T. Weights come from the gguf package's reference quantizer.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import quantize as gguf_quantize

from quantfmt import QTensor, get_format
from quantfmt_formats import _qtiles, q4_0, q4_1, q8_0

MODULES = {"Q4_0": q4_0, "Q8_0": q8_0, "Q4_1": q4_1}
TAGS = list(MODULES)
SHAPES = [(1, 32), (33, 32), (70, 96), (64, 160), (31, 1024)]
NS = [1, 2, 3, _qtiles.BLAS_MIN_ROWS - 1, _qtiles.BLAS_MIN_ROWS, 128, 129]


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


def weights(rng, rows, cols, tag):
    w = (rng.standard_normal((rows, cols)) + 0.3).astype(np.float32)
    w[:, :32] *= 50  # blocks of very different scales
    return gguf_quantize(w, getattr(GT, tag)).reshape(-1)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_tiled_qmatmul_matches_references(tag, shape, rng):
    fmt, mod = get_format(tag), MODULES[tag]
    rows, cols = shape
    data = weights(rng, rows, cols, tag)
    wq = fmt.dequantize(data, shape)
    prep = fmt.prepare(data, rows, cols)
    assert isinstance(prep, _qtiles.Prepared)
    assert prep.tiles * _qtiles.T >= rows and prep.nbp % _qtiles.G == 0
    for n in NS:
        x = rng.standard_normal((n, cols)).astype(np.float32)
        x[0, :32] *= 1e-3
        mag = float((np.abs(x) @ np.abs(wq).T).max())
        got = fmt.qmatmul(data, shape, x, "f32", prepared=prep)
        assert got.shape == (n, rows) and got.dtype == np.float32
        np.testing.assert_allclose(got, x @ wq.T, rtol=0, atol=mag * 1e-5, err_msg=f"f32 n={n}")
        got = fmt.qmatmul(data, shape, x, "q8_0", prepared=prep)
        ref = mod.qmatmul_q8_ref(data, rows, cols, x)
        np.testing.assert_allclose(got, ref, rtol=0, atol=mag * 2e-6, err_msg=f"q8_0 n={n}")


@pytest.mark.parametrize("tag", TAGS)
def test_dequantized_tiles_are_the_weights(tag, rng):
    # The BLAS path's W.T buffer, tile by tile, equals dequantize (Q4_1 up to the FMA in d*q+m).
    fmt = get_format(tag)
    rows, cols = 70, 96
    data = weights(rng, rows, cols, tag)
    prep = fmt.prepare(data, rows, cols)
    wt = np.full((prep.nbp * 32, prep.tiles * _qtiles.T), np.nan, np.float32)
    (q8_0 if tag == "Q8_0" else q4_0).dequant_tiles(prep, 0, prep.tiles, wt)
    wq = fmt.dequantize(data, (rows, cols))
    np.testing.assert_allclose(wt[:cols, :rows], wq.T, rtol=1e-6, atol=0)
    assert not wt[cols:].any() and not wt[:, rows:].any()  # padding decodes to zeros


@pytest.mark.parametrize("tag", TAGS)
def test_qtensor_caches_the_prepared_tiles(tag, rng):
    fmt = get_format(tag)
    w = rng.standard_normal((40, 64)).astype(np.float32)
    t = QTensor("w", fmt, w.shape, fmt.quantize(w))
    x = rng.standard_normal(64).astype(np.float32)
    first = t.matmul(x)
    prep = t._prepared
    assert isinstance(prep, _qtiles.Prepared)
    np.testing.assert_array_equal(t.matmul(x), first)
    assert t._prepared is prep
    np.testing.assert_array_equal(first, fmt.qmatmul(t.data, w.shape, x))  # unprepared call, same result


def test_prepared_memory_cost(rng):
    # The repacked copy: 0.5 byte/weight of nibbles (Q8_0: 1 byte) + 4 bytes per block of
    # float32 scale (+4 for Q4_1's minimum), when rows and blocks need no padding.
    rows, cols = 64, 256
    for tag, per_block in (("Q4_0", 16 + 4), ("Q4_1", 16 + 8), ("Q8_0", 32 + 4)):
        fmt, data = get_format(tag), weights(rng, rows, cols, tag)
        prep = fmt.prepare(data, rows, cols)
        # All three make their tiles on first use: with quantized activations they read the bytes
        # (prefill) or their decode tiles (_i4dot's: 0.5 byte/weight, which share prep.d; Q8_0's
        # _i8dot: 1 byte/weight), never both
        quants = 32 if tag == "Q8_0" else 16
        scales = per_block - quants
        assert prep.nbytes == rows * cols // 32 * scales
        fmt.qmatmul(data, (rows, cols), rng.standard_normal((1, cols)).astype(np.float32), "q8_0",
                    prepared=prep)
        if prep.lut is not None or prep.dec is not None:
            assert prep._q is None and prep.nbytes == rows * cols // 32 * (scales + quants)
        fmt.qmatmul(data, (rows, cols), rng.standard_normal((1, cols)).astype(np.float32), "f32",
                    prepared=prep)
        prep.lut = prep.dec = None
        assert prep.nbytes == rows * cols // 32 * per_block


@pytest.mark.parametrize("tag", TAGS)
def test_blas_path_in_several_chunks(tag, rng, monkeypatch):
    # 70 rows = 3 tiles; a chunk of 2 tiles leaves a shorter last chunk.
    fmt, mod = get_format(tag), MODULES[tag]
    rows, cols = 70, 96
    data = weights(rng, rows, cols, tag)
    prep = fmt.prepare(data, rows, cols)
    monkeypatch.setattr(_qtiles, "CHUNK_BYTES", 2 * prep.nbp * 32 * _qtiles.T * 4)
    wq = fmt.dequantize(data, (rows, cols))
    x = rng.standard_normal((_qtiles.BLAS_MIN_ROWS + 1, cols)).astype(np.float32)
    mag = float((np.abs(x) @ np.abs(wq).T).max())
    got = fmt.qmatmul(data, (rows, cols), x, prepared=prep)
    np.testing.assert_allclose(got, x @ wq.T, rtol=0, atol=mag * 1e-5)
    got = fmt.qmatmul(data, (rows, cols), x, "q8_0", prepared=prep)
    np.testing.assert_allclose(got, mod.qmatmul_q8_ref(data, rows, cols, x), rtol=0, atol=mag * 2e-6)
