"""Cost amplification (issue 10 item 10): headers that are cheap to write and costly to read.

A header of huge numbers of empty JSON objects or metadata keys is refused before it is parsed,
with an error naming the file and the limit; the limits scale with the tensor count, so a real
file of many tiny tensors still opens. Per-tensor work is checked by what is built or called (no
garbage collection while a header becomes objects, no shape check a reader already made), not by
timing. The generators are scripts/hostile_files.py's (full size: `python scripts/hostile_files.py`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import quantfmt
from quantfmt.errors import FileFormatError
from quantfmt.format import Format
from quantfmt.io import safetensors as container
from quantfmt.recipe import Recipe
from quantfmt.sources import open_model
from quantfmt.tensor import QTensor

_spec = importlib.util.spec_from_file_location("hostile_files",
                                               Path(__file__).parent.parent / "scripts" / "hostile_files.py")
assert _spec is not None and _spec.loader is not None
hostile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostile)


@pytest.fixture
def small_caps(monkeypatch):
    """Caps as if real metadata were small, so small files show what 99 MB ones would."""
    monkeypatch.setattr(container, "METADATA_JSON_SLACK", 200)


def _never_parsed(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(container, "_loads", refuse)


def test_header_of_empty_objects_is_refused_unparsed(tmp_path, small_caps, monkeypatch):
    p = tmp_path / "empty.safetensors"
    hostile.st_empty_objects(p, mb=0.01)  # 3333 empty objects in one tensor entry
    _never_parsed(monkeypatch)
    with pytest.raises(FileFormatError, match=r"JSON objects and arrays for 1 tensors; at most 205 .*refusing") as e:
        container.read_header(p)
    assert e.value.file == str(p)


def test_header_of_many_metadata_keys_is_refused_unparsed(tmp_path, small_caps, monkeypatch):
    p = tmp_path / "keys.safetensors"
    hostile.st_many_keys(p, mb=0.01)  # 714 keys in __metadata__, no tensor
    _never_parsed(monkeypatch)
    with pytest.raises(FileFormatError, match=r"JSON keys for 0 tensors; at most 200 .*refusing") as e:
        container.read_header(p)
    assert str(p) in str(e.value)


def test_tensor_count_cap(tmp_path, monkeypatch):
    p = tmp_path / "many.safetensors"
    hostile.st_tiny(p, 50)
    monkeypatch.setattr(container, "MAX_TENSORS", 40)
    with pytest.raises(FileFormatError, match="more than 40 tensors"):
        container.read_header(p)


def test_caps_scale_with_tensors_written_by_quantfmt(tmp_path, small_caps):
    """Our own file of many quantized and float tensors, with metadata, is within the per-tensor caps."""
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(300):
        w = rng.standard_normal((2, 32)).astype(np.float32)
        tensors[f"blk.{i}.w"] = QTensor.quantize(w, "Q4_0", name=f"blk.{i}.w")
        tensors[f"blk.{i}.b"] = QTensor.from_numpy(w[0, :3], name=f"blk.{i}.b")
        tensors[f"blk.{i}.ids"] = QTensor.from_numpy(np.arange(2, dtype=np.int64), name=f"blk.{i}.ids")
    p = tmp_path / "ours.safetensors"
    quantfmt.save(quantfmt.Model(tensors, {"note": "x: {y} [z]"}), p)
    with quantfmt.load(p) as m:
        assert len(m) == 900 and m.metadata["note"] == "x: {y} [z]"


def _collections_during(fn) -> int:
    starts = []

    def cb(phase, info):
        if phase == "start":
            starts.append(info["generation"])

    gc.collect()
    gc.callbacks.append(cb)
    try:
        fn()
    finally:
        gc.callbacks.remove(cb)
    return len(starts)


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_opening_many_tiny_tensors_runs_no_garbage_collection(tmp_path, kind):
    """Each collection walks every young object: over a header of a million tensors that was ~40 % of
    the time to open it. The readers and the planner pause the collector (quantfmt.gcpause)."""
    write = hostile.gguf_tiny if kind == "gguf" else hostile.st_tiny
    p, warm = tmp_path / f"tiny.{kind}", tmp_path / f"warm.{kind}"
    write(p, 20000)
    write(warm, 2)
    open_model(warm).close()  # imports and the plugin registry: their objects are not the header's
    Recipe.coerce("Q8_0").plan(quantfmt.load(warm))
    assert gc.isenabled()
    models = []
    # at most the one collection when the collector resumes (it then sees the new objects once);
    # without the pause, one per ~700 new objects: hundreds here
    assert _collections_during(lambda: models.append(open_model(p))) <= 1
    m = models[0]
    try:
        assert len(m) == 20000
        assert _collections_during(lambda: Recipe.coerce("Q8_0").plan(m)) <= 1
    finally:
        m.close()
    assert gc.isenabled()


def test_gcpause_restores_the_state_it_found():
    from quantfmt.gcpause import paused

    with paused():
        assert not gc.isenabled()
        with paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused():
            pass
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()


def test_no_per_tensor_shape_checks_the_reader_already_made(tmp_path, monkeypatch):
    """A float tensor's shape fits its plain format by construction: neither reading the header
    nor planning a conversion that keeps the format asks the format again."""
    p = tmp_path / "tiny.safetensors"
    hostile.st_tiny(p, 500)
    calls = []
    real = Format.matrix_shape

    def counted(self, shape):
        calls.append(shape)
        return real(self, shape)

    monkeypatch.setattr(Format, "matrix_shape", counted)
    with open_model(p) as m:
        assert calls == []
        steps = Recipe(default=None).plan(m)
        assert calls == [] and {s.tag for s in steps} == {"F32"}


def test_gguf_fast_path_keeps_the_errors(tmp_path):
    """The tensor-info fast path reads what the cursor did: a bad name still gets its message."""
    p = tmp_path / "ok.gguf"
    hostile.gguf_tiny(p, 3)
    blob = bytearray(p.read_bytes())
    with quantfmt.load(p) as m:
        assert list(m) == ["t.0", "t.1", "t.2"] and m["t.2"].to_numpy().tolist() == [1.0]
    i = blob.index(b"t.1")
    bad = bytes(blob[:i]) + b"\xff\xfe\xfd" + bytes(blob[i + 3:])
    with pytest.raises(FileFormatError, match=r"the name of tensor 1 is not UTF-8"):
        quantfmt.io.gguf.scan_gguf_bytes(bad)
    long = bytes(blob[: i - 8]) + struct.pack("<Q", 70000) + bytes(blob[i:])  # a name length over the cap
    with pytest.raises(FileFormatError, match=r"the name of tensor 1 is 70000 bytes long; at most 65535"):
        quantfmt.io.gguf.scan_gguf_bytes(long)


def test_hostile_generators_write_valid_files(tmp_path):
    g, s = tmp_path / "a.gguf", tmp_path / "a.safetensors"
    assert hostile.gguf_tiny(g, 7) == g.stat().st_size
    assert hostile.st_tiny(s, 7) == s.stat().st_size
    (n,) = struct.unpack("<Q", s.read_bytes()[:8])
    assert len(json.loads(s.read_bytes()[8:8 + n])) == 7
    with quantfmt.load(g) as a, quantfmt.load(s) as b:
        assert list(a) == list(b) == [f"t.{i}" for i in range(7)]


def test_inspect_writes_its_table_at_once(tmp_path, monkeypatch):
    """A line per tensor, but not a write (and flush) per line."""
    import click
    from click.testing import CliRunner

    from quantfmt.cli import cli

    p = tmp_path / "tiny.gguf"
    hostile.gguf_tiny(p, 2000)
    calls = []
    real = click.echo
    monkeypatch.setattr(click, "echo", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = CliRunner().invoke(cli, ["inspect", str(p)])
    assert r.exit_code == 0, r.output
    assert r.output.count("\nt.") == 2000 and "2000 tensors" in r.output
    assert len(calls) < 20


def _count_calls(monkeypatch, obj, attr) -> list:
    calls: list = []
    real = getattr(obj, attr)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(obj, attr, counted)
    return calls


@pytest.mark.parametrize("out", ["o.safetensors", "o.gguf"])
def test_convert_looks_formats_up_per_tag_not_per_tensor(tmp_path, monkeypatch, out):
    """Planning, sizing and both writers' headers ask the format registry once per distinct tag and
    shape: three lookups per tensor were a third of converting 2**20 one-value tensors."""
    from quantfmt import plugins

    p = tmp_path / "tiny.gguf"
    hostile.gguf_tiny(p, 3000)
    quantfmt.convert(p, tmp_path / "warm.safetensors")  # imports, plugins: their lookups are not per tensor
    calls = _count_calls(monkeypatch, plugins, "find_format")
    with pytest.warns(UserWarning) if out.endswith(".gguf") else contextlib.nullcontext():
        rep = quantfmt.convert(p, tmp_path / out)
    assert len(rep.steps) == 3000 and all(s.copy for s in rep.steps)
    assert len(calls) < 30, f"{len(calls)} format lookups for 3000 tensors of one tag and shape"
    with quantfmt.load(tmp_path / out) as m:
        assert len(m) == 3000 and m["t.2999"].to_numpy().tolist() == [1.0]


def test_cli_convert_progress_sums_the_sizes_once(tmp_path, monkeypatch):
    """The line per tensor shows totals; summing every tensor's size for each line made converting
    2**17 tiny tensors take 84 s instead of 4 (quadratic)."""
    from click.testing import CliRunner

    from quantfmt.cli import cli
    from quantfmt.ops import convert as convert_mod

    p = tmp_path / "tiny.gguf"
    hostile.gguf_tiny(p, 2000)
    sums = []

    class Sizes(dict):
        def values(self):
            sums.append(1)
            return super().values()

    real = convert_mod.plan_convert

    def plan(*a, **k):
        rep = real(*a, **k)
        rep.in_bytes = Sizes(rep.in_bytes)
        return rep

    monkeypatch.setattr(convert_mod, "plan_convert", plan)
    r = CliRunner().invoke(cli, ["convert", str(p), str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0, r.output
    assert "[2000/2000] t.1999" in r.output
    assert len(sums) < 10, f"the input sizes were summed {len(sums)} times for 2000 tensors"


def test_convert_memory_per_tiny_tensor(tmp_path):
    """Peak traced memory of opening, planning and writing 2**14 one-value tensors, per tensor: it was
    ~2280 bytes before the per-tensor work was cut (two closures and a TensorPlan per tensor, the header as a dict
    per tensor, ...), ~1000 after (the reader's and the planner's objects, the header text)."""
    import tracemalloc

    p = tmp_path / "tiny.gguf"
    hostile.gguf_tiny(p, 1 << 14)
    hostile.gguf_tiny(tmp_path / "w.gguf", 4)
    quantfmt.convert(tmp_path / "w.gguf", tmp_path / "w.safetensors")  # imports, plugins: not per tensor
    gc.collect()
    tracemalloc.start()
    try:
        quantfmt.convert(p, tmp_path / "o.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / (1 << 14) < 1300, f"{peak / (1 << 14):.0f} bytes per tensor"


_FREEZE_CHILD = """
import gc, sys
from quantfmt import gcpause, plugins
if sys.argv[1] == "cli":
    gcpause.freeze_imports()  # what the `quantfmt` command does
plugins.get_format("Q4_0")
print(gc.get_freeze_count(), gc.isenabled())
"""


@pytest.mark.parametrize("who", ["cli", "library"])
def test_plugin_imports_are_frozen_only_in_the_command(who):
    import subprocess
    import sys

    out = subprocess.check_output([sys.executable, "-c", _FREEZE_CHILD, who], text=True).split()
    frozen, enabled = int(out[-2]), out[-1]
    assert enabled == "True"
    if who == "cli":
        assert frozen > 10_000  # numba and the plugin: out of the collector's generations
    else:
        assert frozen == 0  # a library never freezes its host program's objects
