"""Mode-"f32" batches on per-thread tiles (quantfmt.families.tiles_prefill) and on the fallback, every format.

Both paths are forced here: the per-thread one with tiny tiles (several per thread, a short last one, row
groups and T-row tiles cut where the rows end) and the fallback (families.PER_THREAD_PREFILL False, as
where numpy's BLAS threads cannot be set). Each is compared with x @ dequantize(W).T: float products of
the same values, only the summation order may differ.
"""

from __future__ import annotations

import numpy as np
import pytest

from quantfmt import blas, families, gemm, get_format
from quantfmt_formats import _i4dot

FORMATS = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_A", "Q8_B", "Q4_A",
           "IQ4N", "IQ4X", "MXF4", "TQ10", "TQ20"]


def _shape(fmt) -> tuple[int, int]:
    br, bc = fmt.block_shape
    rows = 3 * br if br > 1 else 200  # 200: not a multiple of the 32-row tiles
    return rows, max(bc, 32) * (2 if bc >= 256 else 8)


@pytest.mark.parametrize("sgemm", ["gemm512", "blas", None], ids=["gemm512-per-thread", "blas-per-thread",
                                                                  "fallback"])
@pytest.mark.parametrize("tag", FORMATS)
def test_f32_batches_match_dequantized_weights(tag, sgemm, monkeypatch):
    fmt = get_format(tag)
    per_thread = sgemm is not None
    if sgemm == "gemm512" and not gemm.use():
        pytest.skip("quantfmt.gemm's kernels need AVX-512")
    monkeypatch.setattr(gemm, "ENABLED", sgemm == "gemm512")
    monkeypatch.setattr(families, "PER_THREAD_PREFILL", per_thread)
    monkeypatch.setattr(families, "PREFILL_TILE", 1 << 11)  # a few dozen rows per tile: many tiles
    if per_thread and not families.prefill_threads():
        pytest.skip("numpy's BLAS threads cannot be set here, or one thread only")
    rng = np.random.default_rng(11)
    rows, cols = _shape(fmt)
    data = fmt.quantize(rng.standard_normal((rows, cols), dtype=np.float32))
    wq = fmt.dequantize(data, (rows, cols)).astype(np.float64)
    prep = fmt.prepare(fmt._bytes_input(data, (rows, cols)), rows, cols)
    for n in (16, 130):
        x = rng.standard_normal((n, cols), dtype=np.float32)
        mag = float((np.abs(x) @ np.abs(wq).T).max())
        got = fmt.qmatmul(data, (rows, cols), x, "f32", prepared=prep)
        np.testing.assert_allclose(got, x @ wq.T, rtol=0, atol=mag * 1e-6, err_msg=f"{tag} n={n}")
        kp = fmt.kernel_path("qmatmul", n, "f32")
        # dequantized rows (_i4dot): the table formats, and Q4_0 (IQ4_NL's layout with the table -8..7)
        rows_path = tag in ("IQ4N", "IQ4X", "MXF4") and _i4dot.PATH != "portable"
        if rows_path:
            assert kp == (f"rows+{sgemm}-per-thread" if per_thread else "blas-rows"), kp
        else:
            assert kp == (f"tiles+{sgemm}-per-thread" if per_thread else "blas-tiles"), kp


def test_tiles_prefill_layouts_and_nesting(monkeypatch):
    # Row-major and padded-transposed tiles, groups cut at `rows`, a fill that calls parallel_rows itself
    # (it must run inline on the prefill thread, not wait for the pool the prefill is using).
    if not blas.available():
        pytest.skip("numpy's BLAS threads cannot be set here")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((101, 48), dtype=np.float32)
    x = rng.standard_normal((7, 48), dtype=np.float32)
    seen = []

    def rows_kernel(out, r0, r1):
        seen.append((r0, r1))
        out[r0:r1] = 1

    def fill(r0, r1, buf):
        hits = np.zeros((r1 - r0, 1))
        families.parallel_rows(rows_kernel, r1 - r0, 1 << 20, hits)  # 16 ranges if it were not nested
        assert hits.all()
        buf[:] = w[r0:r1]

    got = families.tiles_prefill(fill, 101, 48, x, tile_rows=10)
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)
    assert len(seen) == 10 and all(r0 == 0 for r0, _ in seen)  # each fill's parallel_rows: one range

    def fill_t(r0, r1, buf):
        assert r0 % 32 == 0 and buf.shape == (64, -(-(r1 - r0) // 32) * 32)
        buf[:] = np.nan  # padding that must not be read
        buf[:48, : r1 - r0] = w[r0:r1].T

    got = families.tiles_prefill(fill_t, 101, 48, x, group=32, width=64, tile_rows=32)
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)
