"""QTensor.matmul's fast path (float32 (n, cols) activations, as the runner passes them per token):
the same result as Format.qmatmul to the bit, errors still naming the tensor, and no per-call
re-validation of the weight bytes."""

from __future__ import annotations

import numpy as np
import pytest

from quantfmt.errors import NonFiniteError
from quantfmt.format import Format
from quantfmt.plugins import formats
from quantfmt.tensor import QTensor

TAGS = [t for t, f in formats().items() if f.can_quantize and f.value_kind == "f"]


@pytest.mark.parametrize("tag", TAGS)
def test_fast_path_equals_format_qmatmul(tag, rng):
    fmt = formats()[tag]
    br, bc = fmt.block_shape
    shape = (br * 4 if br > 1 else 48, bc * 2 if bc > 1 else 64)
    w = rng.standard_normal(shape).astype(np.float32)
    t = QTensor.quantize(w, tag, name="w")
    for mode in fmt.modes:
        for n in (1, 3, 40):
            x = rng.standard_normal((n, shape[1])).astype(np.float32)
            want = fmt.qmatmul(t.data, t.shape, x, mode)
            got = t.matmul(x, mode)
            assert got.dtype == np.float32 and got.shape == (n, shape[0])
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(t.matmul(x[0], mode), fmt.qmatmul(t.data, t.shape, x[0], mode))  # 1-D


def test_fast_path_does_not_revalidate_bytes(rng, monkeypatch):
    t = QTensor.quantize(rng.standard_normal((64, 64)).astype(np.float32), "Q4_0", name="w")
    x = rng.standard_normal((1, 64)).astype(np.float32)
    t.matmul(x, "q8_0")
    calls = []
    real = Format._bytes_input
    monkeypatch.setattr(Format, "_bytes_input", lambda self, d, s: calls.append(s) or real(self, d, s))
    for _ in range(3):
        t.matmul(x, "q8_0")
    assert calls == []


def test_fast_path_errors_name_the_tensor(rng):
    t = QTensor("blk.0.attn_q.weight", "Q8_0", (32, 64),
                QTensor.quantize(rng.standard_normal((32, 64)).astype(np.float32), "Q8_0").data, source="m.gguf")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    x[1, 5] = np.inf
    with pytest.raises(NonFiniteError) as e:
        t.matmul(x, "q8_0")
    assert e.value.tensor == "blk.0.attn_q.weight" and e.value.file == "m.gguf"


@pytest.mark.parametrize("tag", TAGS)
def test_matvec_fn_equals_matmul_and_keeps_its_errors(tag, rng):
    # QTensor.matvec_fn: the format's one-row path (Format.matvec_fn: Q4_0, Q8_0) or matmul itself,
    # bound once; equal to matmul to the bit, and matmul's errors where the one-row path declines
    fmt = formats()[tag]
    br, bc = fmt.block_shape
    shape = (br * 4 if br > 1 else 48, bc * 2 if bc > 1 else 64)
    t = QTensor.quantize(rng.standard_normal(shape).astype(np.float32), tag, name="w")
    for mode in fmt.modes:
        f = t.matvec_fn(mode)
        for _ in range(2):
            x = rng.standard_normal((1, shape[1])).astype(np.float32)
            np.testing.assert_array_equal(f(x), t.matmul(x, mode))
        if mode != "f32":
            x[0, 3] = np.nan
            with pytest.raises(NonFiniteError) as e:
                f(x)
            assert e.value.tensor == "w"
