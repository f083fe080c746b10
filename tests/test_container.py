"""The safetensors container: round trips, compatibility with the safetensors library,
header validation, lazy opening, sharded checkpoints, atomic streaming output."""

from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import quantfmt
from quantfmt import plugins
from quantfmt.cli import cli
from quantfmt.errors import FileFormatError, OutputExistsError, QuantfmtError
from quantfmt.io import files, sharded
from quantfmt.io import safetensors as container
from quantfmt.tensor import Model, QTensor

# A quantized format that is not a built-in, loaded from a plugin folder like a third-party
# one: the container must handle any registered tag without knowing it. Layout version 3 so a
# mismatch is testable. TSLO is F32 that sleeps QUANTFMT_TEST_SLOW seconds per quantize
# (to interrupt a conversion halfway, deterministically).
TOY_PLUGIN = '''
"""Test-only formats. TQ8: blocks of 1x8 = f32 scale + 8 int8. TSLO: a slow F32."""
import os
import time

import numpy as np

import quantfmt
from quantfmt.format import Format


class TQ8(Format):
    tag = "TQ8"
    version = 3
    block_shape = (1, 8)
    block_bytes = 12
    summary = "test format"

    def _quantize(self, w):
        b = w.reshape(-1, 8)
        s = (np.abs(b).max(axis=1) / 127).astype(np.float32)
        q = np.round(b / np.where(s > 0, s, 1)[:, None]).astype(np.int8)
        out = np.empty((b.shape[0], 12), np.uint8)
        out[:, :4] = s.astype("<f4").view(np.uint8).reshape(-1, 4)
        out[:, 4:] = q.view(np.uint8)
        return out.reshape(-1)

    def _dequantize(self, data, rows, cols):
        d = data.reshape(-1, 12)
        s = d[:, :4].copy().view("<f4").astype(np.float32)
        return (d[:, 4:].view(np.int8) * s).astype(np.float32).reshape(rows, cols)


class TSLO(Format):
    tag = "TSLO"
    block_bytes = 4
    summary = "slow test format"

    def _quantize(self, w):
        time.sleep(float(os.environ.get("QUANTFMT_TEST_SLOW", "0")))
        return w.astype("<f4").reshape(-1).view(np.uint8).copy()

    def _dequantize(self, data, rows, cols):
        return data.view("<f4").astype(np.float32).reshape(rows, cols)


@quantfmt.hookimpl
def register_formats(register):
    register(TQ8())
    register(TSLO())
'''


def write_toy_plugin(folder) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "toyfmt.py"), "w") as f:
        f.write(TOY_PLUGIN)
    return str(folder)


@pytest.fixture
def toy(tmp_path_factory):
    """The registry with the built-ins plus the test formats TQ8 and TSLO."""
    d = write_toy_plugin(tmp_path_factory.mktemp("plugins"))
    plugins.configure(plugins_dirs=[d])
    yield d
    plugins.configure()


def mixed_model(rng, extra_tags=()) -> Model:
    """One tensor per float tag, TQ8, every other registered format that takes (64, 64), and odd cases."""
    t = {
        "f32": QTensor.quantize(rng.standard_normal((8, 16)).astype(np.float32), "F32", "f32"),
        "f16": QTensor.quantize(rng.standard_normal((4, 3, 16)), "F16", "f16"),
        "bf16": QTensor.quantize(rng.standard_normal(40), "BF16", "bf16"),
        "empty": QTensor.quantize(np.zeros((0, 16), np.float32), "F32", "empty"),
        "tq8": QTensor.quantize(rng.standard_normal((16, 64)), "TQ8", "tq8"),
    }
    for tag in extra_tags:
        t[f"x.{tag}"] = QTensor.quantize(rng.standard_normal((128, 256)).astype(np.float32), tag, f"x.{tag}")
    return Model(t, {"arch": "test", "layers": 2, "nested": {"a": [1, 2.5, "x"]}})


def all_quantized_tags():
    # can_quantize False (ggml types quantfmt reads but cannot produce): no tensor can be made here.
    return [tag for tag, f in plugins.formats().items() if tag not in container.NATIVE_TAGS
            and f.accepts((128, 256)) and getattr(f, "can_quantize", True)]


def test_mixed_round_trip_is_bit_identical(toy, tmp_path, rng):
    m = mixed_model(rng, all_quantized_tags())
    path = tmp_path / "m.safetensors"
    quantfmt.save(m, path, recipe={"default": "TQ8"})
    with container.open_safetensors(path) as back:
        assert list(back) == list(m)
        for name, t in m.items():
            b = back[name]
            assert (b.tag, b.shape) == (t.tag, t.shape)
            assert b.data.tobytes() == t.data.tobytes(), name
            np.testing.assert_array_equal(b.dequantize(), t.dequantize())
        assert back.metadata["arch"] == "test" and back.metadata["nested"] == {"a": [1, 2.5, "x"]}
        assert back.metadata[container.RECIPE_KEY] == {"default": "TQ8"}


def test_plain_safetensors_reads_every_tensor(toy, tmp_path, rng):
    from safetensors import safe_open

    m = mixed_model(rng, all_quantized_tags())
    path = tmp_path / "m.safetensors"
    quantfmt.save(m, path)
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(m)
        doc = json.loads(f.metadata()[container.META_KEY])
        assert doc["container_version"] == 1
        for name, t in m.items():
            sl = f.get_slice(name)
            if t.tag in container.NATIVE_TAGS:
                assert sl.get_dtype() == t.tag and list(sl.get_shape()) == list(t.shape)
                if t.tag != "BF16":  # safetensors' numpy backend has no bfloat16 type
                    arr = f.get_tensor(name)
                    assert arr.tobytes() == t.data.tobytes()
                assert name not in doc["tensors"]
            else:
                assert sl.get_dtype() == "U8" and sl.get_shape() == [t.nbytes]
                assert f.get_tensor(name).tobytes() == t.data.tobytes()
                assert doc["tensors"][name] == {"tag": t.tag, "layout_version": t.fmt.layout_version,
                                                "shape": list(t.shape)}


def test_reads_files_written_by_safetensors(tmp_path, rng):
    from safetensors.numpy import save_file

    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.standard_normal((7,)).astype(np.float16)
    save_file({"b": b, "a": a}, str(tmp_path / "s.safetensors"), metadata={"format": "pt"})
    with container.open_safetensors(tmp_path / "s.safetensors") as m:
        assert {n: t.tag for n, t in m.items()} == {"a": "F32", "b": "F16"}
        np.testing.assert_array_equal(m["a"].dequantize(), a)
        np.testing.assert_array_equal(m["b"].dequantize(), b.astype(np.float32))
        assert m.metadata == {"format": "pt"}


def test_open_is_lazy_and_zero_copy(toy, tmp_path, rng):
    path = tmp_path / "m.safetensors"
    quantfmt.save(mixed_model(rng), path)
    with container.open_safetensors(path) as m:
        for t in m.values():
            base = t.data
            while not isinstance(base, mmap.mmap):  # a view of the file's read-only map
                base = base.obj if isinstance(base, memoryview) else base.base
            assert not t.data.flags.writeable and not t.data.flags.owndata
        row = m["tq8"].row(3)
        files.release_pages(m["tq8"].data)  # dropping the pages must not change the data
        np.testing.assert_array_equal(m["tq8"].row(3), row)


# ---- validation ----------------------------------------------------------------------


def raw_file(path, header: dict | str | bytes, data: bytes = b"", length: int | None = None) -> str:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if length is None else length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + header + data)
    return str(path)


def doc(tensors, version=1):
    return {container.META_KEY: json.dumps({"container_version": version, "tensors": tensors})}


def bad(tmp_path, header, data=b"", length=None, match=None):
    p = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(FileFormatError, match=match) as e:
        container.open_safetensors(p)
    assert str(p) in str(e.value)
    return e.value


F = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "header, data, length, match",
    [
        ({"a": F}, b"\0" * 8, 1 << 40, "exceeds the limit"),
        ({"a": F}, b"\0" * 8, 10_000, "past the end of the file"),
        (b"\xff\xfe{}", b"", None, "not valid UTF-8"),
        ('{"a": ', b"", None, "not valid JSON"),
        ("[1, 2]", b"", None, "not an object"),
        ("[" * 100000 + "]" * 100000, b"", None, "nested too deeply|not valid JSON"),
        ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], '
         '"data_offsets": [8, 16]}}', b"\0" * 16, None, "twice"),
        ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 8]}}, b"\0" * 8, None, "2\\*\\*40"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "need 12"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, None, "covers 8 bytes|cover 8"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "gap"),
        ({"a": F, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "before they begin"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, b"\0" * 8, None, "past the data region"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "missing data_offsets"),
        ({"a": {**F, "x": 1}}, b"\0" * 8, None, "unknown keys"),
        ({"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype F8_E4M3 is not"),
        ({"__metadata__": {"k": 1}, "a": F}, b"\0" * 8, None, "object of strings"),
        ({"__metadata__": doc({}, version=2), "a": F}, b"\0" * 8, None, "version 2 is not supported"),
        ({"__metadata__": {container.META_KEY: "{"}, "a": F}, b"\0" * 8, None, "not valid JSON"),
        ({"__metadata__": doc({"zz": {"tag": "F32", "layout_version": 1, "shape": [2]}}), "a": F}, b"\0" * 8,
         None, "not in the header"),
    ],
)
def test_invalid_headers_are_refused(tmp_path, header, data, length, match):
    bad(tmp_path, header, data, length, match)


def q_entry(tag="TQ8", version=3, shape=(2, 8)):
    return {"tag": tag, "layout_version": version, "shape": list(shape)}


U = {"dtype": "U8", "shape": [24], "data_offsets": [0, 24]}


@pytest.mark.parametrize(
    "tensor, qinfo, match",
    [
        (U, q_entry(version=1), "layout version 1 differs from the registered TQ8 format's version 3"),
        (U, q_entry(shape=(3, 8)), "needs 36 bytes, but the file holds 24"),
        (U, q_entry(shape=(2, 7)), "does not fit blocks"),
        (U, {"tag": "TQ8", "layout_version": 3}, "exactly the keys"),
        ({"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}, q_entry(), "stored as dtype U8"),
        (U, q_entry(tag="F32", version=1, shape=(6,)), "native F32"),
    ],
)
def test_invalid_quantized_entries_are_refused(toy, tmp_path, tensor, qinfo, match):
    bad(tmp_path, {"__metadata__": doc({"q": qinfo}), "q": tensor}, b"\0" * 24, None, match)


def test_unknown_tag_is_listed_and_using_it_names_tensor_and_tag(tmp_path):
    """A tag no installed plugin provides: the header alone lists name, tag, shape and size (inspect
    works and says the plugin is missing); using the tensor is a clear error naming tensor and tag."""
    p = tmp_path / "u.safetensors"
    raw_file(p, {"__metadata__": doc({"w": q_entry(tag="Q9ZZ")}), "w": U}, b"\0" * 24)
    with container.open_safetensors(p) as m:
        src = m.source("w")
        assert (src.tag, src.shape, src.nbytes) == ("Q9ZZ", (2, 8), 24)
        with pytest.raises(QuantfmtError, match="'Q9ZZ'.*install or enable") as e:
            m["w"].dequantize()
        assert e.value.tensor == "w" and str(p) in str(e.value)
    r = CliRunner().invoke(cli, ["inspect", str(p)])
    assert r.exit_code == 0 and "Q9ZZ (not installed)" in r.output and "no installed plugin provides Q9ZZ" in r.output
    d = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(p)]).stdout)
    assert d["tensors"][0]["installed"] is False


def test_short_file(tmp_path):
    (tmp_path / "s.safetensors").write_bytes(b"abc")
    with pytest.raises(FileFormatError, match="3 bytes, shorter than the 8-byte"):
        container.open_safetensors(tmp_path / "s.safetensors")


def test_directory_and_missing_files(tmp_path):
    with pytest.raises(FileFormatError, match="directory"):
        container.open_safetensors(tmp_path)
    with pytest.raises(FileFormatError, match="cannot read"):
        container.open_safetensors(tmp_path / "nope.safetensors")


# ---- sharded -------------------------------------------------------------------------


def write_shards(tmp_path, rng, n=3):
    names = {}
    for i in range(n):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        m = Model({f"l{i}.w": QTensor.quantize(rng.standard_normal((4, 8)).astype(np.float32), "F32"),
                   f"l{i}.b": QTensor.quantize(rng.standard_normal(8).astype(np.float32), "F16")},
                  {"arch": "x"})
        quantfmt.save(m, tmp_path / shard)
        names.update({k: shard for k in m})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": names}))
    return index, names


def test_sharded_index_opens_as_one_model(tmp_path, rng):
    index, names = write_shards(tmp_path, rng)
    with sharded.open_sharded(index) as m:
        assert sorted(m) == sorted(names) and m.metadata == {"arch": "x"}
        assert m["l2.b"].tag == "F16"
    with sharded.open_directory(tmp_path) as m:
        assert sorted(m) == sorted(names)


@pytest.mark.parametrize("change, match", [
    (lambda w: w.update({"ghost": next(iter(w.values()))}), "does not hold it"),
    (lambda w: w.update({"l0.w": "model-00002-of-00003.safetensors"}), "index maps it to"),
    (lambda w: w.update({"l0.w": "../x.safetensors"}), "plain file name"),
])
def test_sharded_index_inconsistencies(tmp_path, rng, change, match):
    index, names = write_shards(tmp_path, rng)
    change(names)
    index.write_text(json.dumps({"weight_map": names}))
    with pytest.raises(FileFormatError, match=match):
        sharded.open_sharded(index)


def test_shards_without_index_must_not_repeat_names(tmp_path, rng):
    for i in range(2):
        quantfmt.save(Model({"w": QTensor.quantize(np.ones((2, 2), np.float32), "F32")}),
                      tmp_path / f"s{i}.safetensors")
    with pytest.raises(FileFormatError, match="two shards"):
        sharded.open_directory(tmp_path)


# ---- writing -------------------------------------------------------------------------


def test_writer_streams_header_first_then_one_tensor_at_a_time(tmp_path):
    out = tmp_path / "o.safetensors"
    seen = []

    def produce(i):
        def f():
            # At this point the temporary file holds the header and the tensors before i.
            (tmp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
            seen.append(os.path.getsize(tmp))
            return np.full((128, 128), i, np.float32).view(np.uint8).reshape(-1)
        return f

    # 64 KiB tensors: each goes out as soon as it is written (tinier ones are flushed in batches)
    plans = [files.TensorPlan(f"t{i}", "F32", (128, 128), produce(i)) for i in range(3)]
    container.write_safetensors(out, plans)
    hdr_len = 8 + struct.unpack("<Q", out.read_bytes()[:8])[0]
    assert seen == [hdr_len, hdr_len + 65536, hdr_len + 2 * 65536]
    assert hdr_len % 8 == 0
    with container.open_safetensors(out) as m:
        assert [float(m[f"t{i}"].dequantize()[0, 0]) for i in range(3)] == [0, 1, 2]


def test_writer_refuses_a_wrong_byte_count_and_leaves_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    plans = [files.TensorPlan("t", "F32", (4, 4), lambda: np.zeros(10, np.uint8))]
    with pytest.raises(FileFormatError, match="produced 10 bytes, the header promised 64"):
        container.write_safetensors(out, plans)
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_failure_keeps_previous(tmp_path):
    out = tmp_path / "o.bin"
    out.write_bytes(b"previous")
    with pytest.raises(RuntimeError), files.atomic_output(out, overwrite=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("boom")
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["o.bin"]
    with files.atomic_output(out, overwrite=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert out.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["o.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask


def test_output_identity_checks(tmp_path):
    inp = tmp_path / "in.bin"
    inp.write_bytes(b"x")
    os.link(inp, tmp_path / "hard.bin")
    os.symlink(inp, tmp_path / "sym.bin")
    (tmp_path / "sub").mkdir()
    for out in [inp, tmp_path / "hard.bin", tmp_path / "sym.bin", tmp_path / "sub" / ".." / "in.bin"]:
        with pytest.raises(OutputExistsError, match="same file as the input"):
            files.check_output(out, overwrite=True, inputs=[inp])
    with pytest.raises(OutputExistsError, match="--overwrite"):
        files.check_output(inp, inputs=[])
    with pytest.raises(OutputExistsError, match="directory"):
        files.check_output(tmp_path / "sub", overwrite=True)
    with pytest.raises(OutputExistsError, match="does not exist"):
        files.check_output(tmp_path / "nodir" / "x", overwrite=True)
    files.check_output(tmp_path / "new.bin", inputs=[inp])


def test_metadata_that_is_not_json_is_an_error(tmp_path):
    m = Model({"w": QTensor.quantize(np.ones(2, np.float32), "F32")}, {"bad": object()})
    with pytest.raises(FileFormatError, match="JSON"):
        quantfmt.save(m, tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_errors_are_quantfmt_errors():
    assert issubclass(FileFormatError, QuantfmtError) and issubclass(OutputExistsError, QuantfmtError)
