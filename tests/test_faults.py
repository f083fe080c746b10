"""Faults and hostile input (issue 10, item 10): each ends in a clear error naming the file, with
no traceback, no hang, nothing lost, and no output that looks complete when it is not."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import struct
import threading
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import quantfmt
from quantfmt.cli import cli
from quantfmt.errors import FileFormatError, OutputExistsError, QuantfmtError, RangeError
from quantfmt.io import files
from quantfmt.io.gguf import write_gguf
from quantfmt.tensor import Model, QTensor


def small_model(seed=0):
    w = np.random.default_rng(seed).standard_normal((4, 64)).astype(np.float32)
    return Model({"a.weight": QTensor.quantize(w, "F32"), "b.weight": QTensor.quantize(w, "F16")})


def cli_fails(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error:") or "\nError:" in r.output, r.output
    assert "Traceback" not in r.output
    return r.output


def test_racing_writers_without_overwrite_never_replace_each_other(tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputExistsError, match="exists|appeared while"):
        with files.atomic_output(out) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"mine")
            out.write_bytes(b"theirs")  # the other writer published first
    assert out.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["o.safetensors"]  # no temporary left


def test_two_concurrent_converts_one_wins(tmp_path):
    src = tmp_path / "in.safetensors"
    quantfmt.save(small_model(), src)
    out = tmp_path / "out.safetensors"
    results = []

    def go():
        try:
            quantfmt.convert(src, out, "F16")
            results.append("ok")
        except OutputExistsError:
            results.append("refused")

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1 and results.count("refused") == 3, results


@pytest.mark.parametrize("kind", ["fifo", "chardev", "symlink", "dangling"])
def test_overwrite_replaces_only_regular_files(tmp_path, kind):
    src = tmp_path / "in.safetensors"
    quantfmt.save(small_model(), src)
    out = tmp_path / "out.safetensors"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "chardev":
        out.symlink_to("/dev/null")
    elif kind == "symlink":
        (tmp_path / "target").write_bytes(b"keep me")
        out.symlink_to(tmp_path / "target")
    else:
        out.symlink_to(tmp_path / "nowhere")
    msg = cli_fails("convert", src, out, "--to", "F16", "--overwrite")
    assert str(out) in msg
    assert os.path.lexists(out)
    if kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(out).st_mode)
    else:
        assert os.path.islink(out)
    if kind == "symlink":
        assert (tmp_path / "target").read_bytes() == b"keep me"


def test_output_path_ending_in_a_separator_creates_nothing(tmp_path):
    src = tmp_path / "in.safetensors"
    quantfmt.save(small_model(), src)
    msg = cli_fails("convert", src, str(tmp_path / "newdir") + "/", "--to", "F16")
    assert "separator" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_overwrite_keeps_permissions(tmp_path):
    src = tmp_path / "in.safetensors"
    quantfmt.save(small_model(), src)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    quantfmt.convert(src, out, "F16", overwrite=True)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    with quantfmt.load(out) as m:
        assert m["a.weight"].tag == "F16"


def _header_file(path, header: dict, data: bytes):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("where", ["name", "metadata", "document"])
def test_lone_surrogate_is_refused_at_read(tmp_path, where):
    p = tmp_path / "s.safetensors"
    name = "a\ud800" if where == "name" else "a"
    meta = {"k": "v\udfff"} if where == "metadata" else {}
    if where == "document":
        meta = {"quantfmt": json.dumps({"container_version": 1, "tensors": {}, "metadata": {"x": "\ud800"}})}
    _header_file(p, {"__metadata__": meta, name: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                 b"\0" * 8)
    with pytest.raises(FileFormatError, match="lone surrogate"):
        quantfmt.open_model(p)
    for cmd in ("inspect", "check-file"):
        assert "lone surrogate" in cli_fails(cmd, p)


def test_full_disk_at_the_final_flush_is_a_clear_error(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    quantfmt.save(small_model(), src)
    out = tmp_path / "out.safetensors"

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(FileFormatError, match="No space left") as e:
        quantfmt.convert(src, out, "F16")
    assert e.value.file == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if the test blocks, e.g. opening a FIFO."""
    def alarm(signum, frame):
        raise TimeoutError("blocked for 60 s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_fifo_input_and_fifo_shard_are_refused_without_blocking(tmp_path, no_hang):
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)
    assert "not a regular file" in cli_fails("inspect", fifo)
    d = tmp_path / "sharded"
    d.mkdir()
    quantfmt.save(small_model(), d / "model-00001.safetensors")
    os.mkfifo(d / "model-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "model-00001.safetensors", "b.weight": "model-00001.safetensors",
                        "x": "model-00002.safetensors"}}))
    assert "not a regular file" in cli_fails("inspect", d / "model.safetensors.index.json")
    g = tmp_path / "x.gguf"
    os.mkfifo(g)
    assert "not a regular file" in cli_fails("check-file", g)


def test_tensor_larger_than_memory_is_a_clear_error(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    quantfmt.save(small_model(), src)

    def oom(self, *a, **k):
        raise MemoryError()

    monkeypatch.setattr("quantfmt.format.Format.quantize", oom)
    msg = cli_fails("convert", src, tmp_path / "o.safetensors", "--to", "Q8_0")
    assert "not enough memory" in msg and "a.weight" in msg and "GiB" in msg
    monkeypatch.setattr("quantfmt.format.Format.dequantize", oom)
    msg = cli_fails("compare", src, "--formats", "Q8_0")
    assert "not enough memory" in msg and "weight" in msg


def test_write_gguf_never_replaces_a_shard_of_its_input(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    m = small_model()
    quantfmt.save(Model({"a.weight": m["a.weight"]}), d / "s1.safetensors")
    quantfmt.save(Model({"b.weight": m["b.weight"]}), d / "s2.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"}}))
    before = (d / "s2.safetensors").read_bytes()
    with quantfmt.open_model(d / "model.safetensors.index.json") as model:
        with pytest.raises(OutputExistsError, match="input"):
            write_gguf(d / "s2.safetensors", model, overwrite=True)
    assert (d / "s2.safetensors").read_bytes() == before


def test_stale_part_files_of_killed_writers_are_removed(tmp_path):
    src = tmp_path / "in.safetensors"
    quantfmt.save(small_model(), src)
    out = tmp_path / "out.safetensors"
    dead = 2**22 + 12345  # above pid_max's default: no such process
    stale = tmp_path / f".out.safetensors.{dead}.abc123.part"
    stale.write_bytes(b"half a file")
    live = tmp_path / f".out.safetensors.{os.getpid()}.zzz.part"  # our own: not touched
    live.write_bytes(b"x")
    quantfmt.convert(src, out, "F16")
    assert not stale.exists() and live.exists() and out.exists()


def test_float64_beyond_float32_is_a_range_error_without_warnings():
    w = np.ones((2, 32))
    w[1, 3] = 1e39
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for tag in ("F32", "F16", "Q8_0", "Q4_0"):
            with pytest.raises(RangeError, match=r"1e\+39.*\(1, 3\).*float32"):
                QTensor.quantize(w, tag)


def test_missing_tensor_is_a_key_error_and_mapping_contract_holds():
    m = small_model()
    assert "a.weight" in m and "nope" not in m and m.get("nope") is None and 3 not in m
    with pytest.raises(KeyError):
        m["nope"]
    with pytest.raises(QuantfmtError, match="no tensor named 'nope'"):
        m["nope"]
