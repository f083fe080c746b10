"""Mode "f32" decode of Q4_0 / Q4_1 in explicit vector code (plugins/_q4simd.py) == x @ dequantize(W).T.

Each path (zmm "simd16", ymm "simd8", and the portable numba kernel) is forced through the module
switch `_q4simd.PATH`; LLVM legalizes the vector IR for whatever CPU numba targets, so both vector
widths run here. Shapes need row and block padding; n covers 1..7 (batches go to BLAS).
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import quantize as gguf_quantize

from quantfmt import get_format
from quantfmt_formats import _q4simd, _qtiles

SHAPES = [(1, 32), (33, 96), (70, 160), (31, 1024)]
NS = [1, 3, 5, _qtiles.BLAS_MIN_ROWS - 1]


@pytest.mark.parametrize("path", ["simd16", "simd8", "portable"])
@pytest.mark.parametrize("tag", ["Q4_0", "Q4_1"])
def test_f32_decode_matches_dequantize(tag, path, monkeypatch):
    monkeypatch.setattr(_q4simd, "PATH", path)
    rng = np.random.default_rng(11)
    fmt = get_format(tag)
    for rows, cols in SHAPES:
        w = (rng.standard_normal((rows, cols)) + 0.3).astype(np.float32)
        w[:, :32] *= 50
        w[rows // 2, -32:] = 0
        data = gguf_quantize(w, getattr(GT, tag)).reshape(-1)
        wq = fmt.dequantize(data, (rows, cols)).astype(np.float64)
        prep = fmt.prepare(data, rows, cols)
        for n in NS:
            x = rng.standard_normal((n, cols)).astype(np.float32)
            x[0, :32] *= 1e-3
            mag = float((np.abs(x) @ np.abs(wq).T).max())
            got = fmt.qmatmul(data, (rows, cols), x, "f32", prepared=prep)
            assert got.shape == (n, rows) and got.dtype == np.float32
            np.testing.assert_allclose(got, x @ wq.T, rtol=0, atol=mag * 1e-6, err_msg=f"{rows}x{cols} n={n}")
            assert fmt.kernel_path("qmatmul", n, "f32") == f"tiles-f32-{path}"
