"""io.files.write_stream: large tensors are written by a helper thread while the next is produced
(_Writes); the bytes, their order, the after/progress calls and the errors are those of writing in turn."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

import quantfmt
from quantfmt.errors import FileFormatError
from quantfmt.io import files
from quantfmt.io.files import TensorPlan, write_stream


def _plans(sizes, log, rng):
    plans = []
    for i, n in enumerate(sizes):
        data = rng.integers(0, 256, n, dtype=np.uint8)

        def produce(i=i, data=data):
            log.append(("produce", i, threading.current_thread() is threading.main_thread()))
            return data.copy()

        def after(i=i):
            log.append(("after", i, threading.current_thread() is threading.main_thread()))

        plans.append(TensorPlan(f"t{i}", "U8", (n,), produce, after))
    return plans


@pytest.mark.parametrize("async_min", [1, 1 << 40])  # every tensor on the helper thread / none
def test_bytes_order_and_callbacks_are_those_of_writing_in_turn(monkeypatch, async_min):
    monkeypatch.setattr(files, "_ASYNC_MIN", async_min)
    rng = np.random.default_rng(0)
    sizes = [5, 3 << 20, 7, 1 << 20, 100, 2 << 20]
    log: list = []
    plans = _plans(sizes, log, rng)
    f = io.BytesIO()
    done = []
    write_stream(f, plans, sizes, align=8, progress=lambda n: done.append(n))
    expect = b"".join(p.produce().tobytes() + b"\0" * (-n % 8) for p, n in zip(plans, sizes, strict=True))
    assert f.getvalue() == expect
    assert done == sizes
    afters = [e for e in log[: -len(sizes)] if e[0] == "after"]
    assert [i for _, i, _ in afters] == list(range(len(sizes)))
    assert all(main for _, _, main in log)  # produce, after and progress all on the caller's thread
    # each tensor's after() comes after its own production, and before the next but one is produced
    order = [(k, i) for k, i, _ in log[: -len(sizes)]]
    for i in range(len(sizes)):
        assert order.index(("produce", i)) < order.index(("after", i))
        if i + 2 < len(sizes):
            assert order.index(("after", i)) < order.index(("produce", i + 2))


def test_a_failed_write_on_the_helper_thread_names_its_tensor_and_stops(monkeypatch):
    monkeypatch.setattr(files, "_ASYNC_MIN", 1)
    real = files._write_one

    def failing(f, buf, pad, n):
        if n == 3 << 20:
            raise FileFormatError("cannot write: No space left on device")
        real(f, buf, pad, n)

    monkeypatch.setattr(files, "_write_one", failing)
    rng = np.random.default_rng(1)
    sizes = [1 << 20, 3 << 20, 2 << 20, 1 << 20]
    log: list = []
    with pytest.raises(FileFormatError, match="No space") as e:
        write_stream(io.BytesIO(), _plans(sizes, log, rng), sizes)
    assert e.value.tensor == "t1"
    assert ("produce", 3, True) not in log  # nothing produced after the failure was seen
    assert not [t for t in threading.enumerate() if t.name == "quantfmt-write"]


def test_an_error_while_producing_waits_for_the_write_in_flight(monkeypatch):
    monkeypatch.setattr(files, "_ASYNC_MIN", 1)
    rng = np.random.default_rng(2)
    sizes = [2 << 20, 10]
    log: list = []
    plans = _plans(sizes, log, rng)

    def boom():
        raise KeyboardInterrupt

    plans[1] = TensorPlan("t1", "U8", (10,), boom)
    f = io.BytesIO()
    with pytest.raises(KeyboardInterrupt):
        write_stream(f, plans, sizes)
    assert len(f.getvalue()) == sizes[0]  # the first tensor's write ended before write_stream returned
    assert not [t for t in threading.enumerate() if t.name == "quantfmt-write"]


def test_convert_through_the_helper_thread_matches_in_turn(monkeypatch, tmp_path):
    rng = np.random.default_rng(3)
    from safetensors.numpy import save_file

    src = tmp_path / "in.safetensors"
    save_file({f"w{i}": rng.standard_normal((64 * (i + 1), 256), dtype=np.float32) for i in range(4)}
              | {"copied": rng.standard_normal((32, 64), dtype=np.float32)}, str(src))
    outs = []
    for async_min in (1 << 40, 1):
        monkeypatch.setattr(files, "_ASYNC_MIN", async_min)
        out = tmp_path / f"out-{async_min}.safetensors"
        quantfmt.convert(src, out, quantfmt.Recipe("Q8_0", rules=[("copied", "keep")]))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("async_min", [1, 1 << 40])
def test_a_tensor_produced_in_parts_is_written_as_their_concatenation(monkeypatch, async_min):
    monkeypatch.setattr(files, "_ASYNC_MIN", async_min)
    rng = np.random.default_rng(4)
    parts = [rng.integers(0, 256, k, dtype=np.uint8) for k in (1 << 20, 5, 3 << 19)]
    n = sum(p.size for p in parts)
    plans = [TensorPlan("a", "U8", (n,), lambda: list(parts)), TensorPlan("b", "U8", (3,), lambda: b"xyz")]
    f = io.BytesIO()
    write_stream(f, plans, [n, 3], align=8)
    assert f.getvalue() == b"".join(p.tobytes() for p in parts) + b"\0" * (-n % 8) + b"xyz" + b"\0" * 5
    with pytest.raises(FileFormatError, match="promised"):
        write_stream(io.BytesIO(), plans[:1], [n + 1])


def test_convert_in_row_blocks_writes_the_whole_tensor_bytes(monkeypatch, tmp_path):
    """convert's row blocks reach the writer as parts (no copy into one array): same bytes as whole."""
    from safetensors.numpy import save_file

    from quantfmt.ops import convert as conv

    rng = np.random.default_rng(5)
    src = tmp_path / "in.safetensors"
    save_file({"w": rng.standard_normal((512, 256), dtype=np.float32),
               "v": rng.standard_normal((96, 512), dtype=np.float32)}, str(src))
    outs = []
    for block in (1 << 40, 1 << 16):  # whole tensors / blocks of 64 KiB of float32 (several per tensor)
        monkeypatch.setattr(conv, "ROW_BLOCK_BYTES", block)
        out = tmp_path / f"out-{block}.safetensors"
        quantfmt.convert(src, out, "Q4_0")
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    ref = quantfmt.load(src, "Q4_0")
    with quantfmt.open_model(tmp_path / f"out-{1 << 16}.safetensors") as m:
        for name in ("w", "v"):
            assert np.array_equal(m[name].data, ref[name].data)


def test_prefetch_pages_asks_for_the_views_pages_of_a_map_only(tmp_path, monkeypatch):
    import mmap

    p = tmp_path / "x.bin"
    p.write_bytes(bytes(range(256)) * (1 << 13))  # 2 MiB
    arr, close = files.map_readonly(p)
    base = arr.ctypes.data
    seen = []
    real = files._advise

    def spy(a, advice):
        seen.append((a.ctypes.data - base, a.nbytes, advice))
        real(a, advice)

    monkeypatch.setattr(files, "_advise", spy)
    files.prefetch_pages(arr[4096:4096 + (1 << 20)])
    files.prefetch_pages(arr[:100])  # tiny: not worth a syscall
    files.prefetch_pages(np.zeros(1 << 20, np.uint8))  # not a map: _advise finds no mmap and does nothing
    assert seen[0] == (4096, 1 << 20, mmap.MADV_WILLNEED) and len(seen) == 2
    assert bytes(arr[4096:4100]) == bytes(range(0, 4))  # the data unchanged
    arr = None
    close()


def test_read_ahead_is_a_hint_that_never_fails(tmp_path):
    import os
    import time

    from quantfmt.io.readahead import read_ahead

    p = tmp_path / "m.bin"
    p.write_bytes(b"x" * (3 << 20))
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    read_ahead(p, 1 << 30)
    read_ahead(tmp_path, 1 << 20)  # a directory: nothing
    read_ahead(tmp_path / "missing", 1 << 20)  # no file: nothing (the command reports it)
    if fds is not None:  # the helper thread closes its descriptor when it is done
        for _ in range(100):
            if len(os.listdir("/proc/self/fd")) <= fds:
                break
            time.sleep(0.01)
        assert len(os.listdir("/proc/self/fd")) <= fds
    assert p.read_bytes() == b"x" * (3 << 20)


def test_read_ahead_bytes_is_a_quarter_of_available_memory(monkeypatch):
    import builtins
    import os

    from quantfmt.io import readahead

    n = readahead.read_ahead_bytes()
    assert n >= readahead.DEFAULT_BYTES
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        # memory moves between the two reads: within 10% of a quarter, or the floor
        assert n == readahead.DEFAULT_BYTES or abs(n - avail // 4) < avail // 40
    real_open = builtins.open

    def no_meminfo(p, *a, **k):
        if p == "/proc/meminfo":
            raise OSError("no /proc here")
        return real_open(p, *a, **k)

    monkeypatch.setattr(builtins, "open", no_meminfo)
    assert readahead.read_ahead_bytes() == readahead.DEFAULT_BYTES
