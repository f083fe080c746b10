"""Conversion in row blocks (quantfmt.ops.convert, Format.rows_independent): a large tensor quantized a
block of rows at a time gives the whole tensor's bytes, for every format that declares it, from F32 and
from other sources, in one process and in workers, to safetensors and GGUF; errors still name the
tensor's own index and shape."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_parallel import RECIPE, float_file

import quantfmt
from quantfmt.errors import NonFiniteError, RangeError
from quantfmt.format import Format
from quantfmt.ops import convert as convmod
from quantfmt.plugins import formats, get_format

ROWS, COLS = 384, 256  # 3 row groups of Q8_A's 128 rows; whole super-blocks of 256 for the k-quants


def blocked():
    return sorted(tag for tag, f in formats().items() if f.rows_independent and f.can_quantize and f.value_kind == "f")


def source(tag: str, w: np.ndarray, name: str = "blk.0.weight") -> quantfmt.QTensor:
    return quantfmt.QTensor(name, tag, w.shape, get_format(tag).quantize(w))


def test_the_formats_that_declare_it():
    tags = set(blocked())
    # the ggml families, quantfmt's own row formats and the plain ones; the block list must not be empty
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
            "IQ4N", "IQ4X", "MXF4", "Q8_A", "Q8_B", "Q4_A"} <= tags
    assert Format.rows_independent is False  # a format that says nothing is converted whole


@pytest.mark.parametrize("tag", blocked())
@pytest.mark.parametrize("src_tag", ["F32", "BF16"])
def test_row_blocks_give_the_whole_tensors_bytes(tag, src_tag, monkeypatch):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((ROWS, COLS), np.float32) * np.float32(0.05)
    w[5] *= 40  # rows of very different scale: a tensor-wide statistic would show
    t = source(src_tag, w.reshape(2, ROWS // 2, COLS))  # rank 3: rows are the product of the leading dims
    whole = get_format(tag).quantize(t.dequantize())
    calls = []
    real = type(get_format(tag)).quantize

    def spy(self, a, *args, **kw):
        calls.append(np.shape(a)[0])
        return real(self, a, *args, **kw)

    monkeypatch.setattr(type(get_format(tag)), "quantize", spy)
    for rows_per_block in (128, 256):  # 256: the last block is shorter
        monkeypatch.setattr(convmod, "ROW_BLOCK_BYTES", 4 * COLS * rows_per_block)
        calls.clear()
        got = convmod._requantize(t, tag, "in.safetensors")
        assert calls == [rows_per_block, ROWS - rows_per_block] if rows_per_block == 256 else [128] * 3
        assert got.tobytes() == whole.tobytes(), (tag, src_tag, rows_per_block)


def test_blocks_are_whole_row_groups_of_both_formats(monkeypatch):
    monkeypatch.setattr(convmod, "ROW_BLOCK_BYTES", 4 * COLS * 8)  # 8 rows: less than Q8_A's group of 128
    t = source("F32", np.ones((ROWS, COLS), np.float32))
    assert convmod._row_blocks(t, get_format("Q8_A")) == (ROWS, COLS, 128)
    assert convmod._row_blocks(t, get_format("Q4_0")) == (ROWS, COLS, 8)
    monkeypatch.setattr(convmod, "ROW_BLOCK_BYTES", 4 * COLS * ROWS)  # the tensor fits one block: whole
    assert convmod._row_blocks(t, get_format("Q4_0")) is None


def test_a_format_that_does_not_declare_it_is_converted_whole(monkeypatch):
    monkeypatch.setattr(convmod, "ROW_BLOCK_BYTES", 4 * COLS)
    t = source("F32", np.ones((ROWS, COLS), np.float32))

    class Undeclared(type(get_format("Q4_0"))):  # type: ignore[misc]
        rows_independent = False

    assert convmod._row_blocks(t, Undeclared()) is None
    assert convmod._row_blocks(source("Q8_0", np.ones((ROWS, COLS), np.float32)), get_format("Q4_0")) is not None


@pytest.mark.parametrize("tag,value,match", [
    ("Q4_0", np.nan, r"non-finite value \(nan\) at index \(1, 108, 7\)"),
    ("F16", np.inf, r"non-finite value \(inf\) at index \(1, 108, 7\)"),
    ("Q8_0", 1e36, r"weights of shape \(384, 256\): the block at row 300, columns 0\.\.31"),
    ("F16", 1e6, r"at row 300, column 7 \(matrix shape \(384, 256\)\)"),
])
def test_errors_name_the_tensors_own_index(tag, value, match, monkeypatch):
    monkeypatch.setattr(convmod, "ROW_BLOCK_BYTES", 4 * COLS * 128)
    w = np.zeros((ROWS, COLS), np.float32)
    w[300, 7] = value  # in the third block
    t = source("F32", w.reshape(2, ROWS // 2, COLS)) if np.isfinite(value) else quantfmt.QTensor(
        "blk.0.weight", "F32", (2, ROWS // 2, COLS), w.view(np.uint8).reshape(-1))
    assert convmod._row_blocks(t, get_format(tag)) is not None
    with pytest.raises((NonFiniteError, RangeError), match=match) as e:
        convmod._requantize(t, tag, "in.safetensors")
    assert e.value.tensor == "blk.0.weight" and e.value.file == "in.safetensors"


def test_convert_in_row_blocks_is_byte_identical(tmp_path, monkeypatch):
    """One process and in-process workers, safetensors and GGUF: the same bytes with row blocks as without."""
    src = float_file(tmp_path / "in.safetensors", [(512, 256), (256, 512), (64, 256), (96, 256), (64, 128), (160, 256)])
    out = {}
    real, used = convmod._requantize_blocks, []
    monkeypatch.setattr(convmod, "_requantize_blocks", lambda t, *a, **k: used.append(t.name) or real(t, *a, **k))
    for name, block in (("whole", 1 << 40), ("blocks", 4 * 256 * 32)):
        monkeypatch.setattr(convmod, "ROW_BLOCK_BYTES", block)
        for ext in ("safetensors", "gguf"):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*not a runnable llama.cpp model")  # GGUF of a toy model
                quantfmt.convert(src, tmp_path / f"{name}.{ext}", RECIPE)
                with ThreadPoolExecutor(2) as ex:
                    quantfmt.convert(src, tmp_path / f"{name}-ex.{ext}", RECIPE, executor=ex)
            out[name, ext] = (tmp_path / f"{name}.{ext}").read_bytes()
            assert (tmp_path / f"{name}-ex.{ext}").read_bytes() == out[name, ext]
    for ext in ("safetensors", "gguf"):
        assert out["blocks", ext] == out["whole", ext]
    assert len(used) == 4 * 5  # blocks: 4 runs of the 5 tensors larger than a block (whole: none)


def test_gguf_export_in_row_blocks_is_byte_identical(tmp_path, monkeypatch):
    """An HF llama to GGUF (q/k rows permuted after quantizing): the same file with row blocks as without."""
    from test_hf_export import hf_config, hf_weights, make_folder

    d = make_folder(tmp_path / "hf", hf_weights(4, bias=True), hf_config(attention_bias=True), tokenizer=False)
    recipe = quantfmt.Recipe("Q8_0", rules=[("*.k_proj.weight", "Q4_0"), ("*.v_proj.weight", "Q4_K")])
    real, used = convmod._requantize_blocks, []
    monkeypatch.setattr(convmod, "_requantize_blocks", lambda t, *a, **k: used.append(t.name) or real(t, *a, **k))
    out = {}
    for name, block in (("whole", 1 << 40), ("blocks", 1 << 10)):
        monkeypatch.setattr(convmod, "ROW_BLOCK_BYTES", block)
        quantfmt.convert(d / "model.safetensors", tmp_path / f"{name}.gguf", recipe)
        with ThreadPoolExecutor(2) as ex:
            quantfmt.convert(d / "model.safetensors", tmp_path / f"{name}-ex.gguf", recipe, executor=ex)
        out[name] = (tmp_path / f"{name}.gguf").read_bytes()
        assert (tmp_path / f"{name}-ex.gguf").read_bytes() == out[name]
    assert out["blocks"] == out["whole"]
    assert any("k_proj" in n for n in used) and any("v_proj" in n for n in used)


def test_the_kit_refuses_a_false_declaration():
    """The conformance kit holds a format to its rows_independent: one scale for the whole tensor fails."""
    from quantfmt.testing import check_format

    class TensorScale(Format):
        tag = "TSC8"
        block_shape, block_bytes = (1, 1), 1
        rows_independent = True  # wrong: the scale is tensor-wide

        def _quantize(self, w):
            s = max(float(np.abs(w).max()), 1e-30)
            return np.round(w / s * 127).astype(np.int8).reshape(-1).view(np.uint8)

        def _dequantize(self, data, rows, cols):
            return data.view(np.int8).astype(np.float32).reshape(rows, cols) / 127

    rep = {c.name: c for c in check_format(TensorScale())}
    assert not rep["row_blocks"].ok and "rows 0..0 alone" in rep["row_blocks"].detail
    ok = {c.name: c for c in check_format("Q8_A")}["row_blocks"]
    assert ok.ok and "(512, " in ok.detail, ok.detail
    assert {c.name: c for c in check_format("Q4_0")}["row_blocks"].ok
