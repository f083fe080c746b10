"""Property-based fuzzing of the container reader: mutate valid files every way we can think
of and check that opening and reading them either works or raises a QuantfmtError, nothing
else (no crash, no IndexError/KeyError/MemoryError, no numpy warning), in bounded time.

The hypothesis deadline (10 s per example, against ~1 ms typical) is a hang detector, not a
speed check: a reader that trusted a hostile length or shape would allocate or loop for far
longer than that."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import warnings
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_container import mixed_model, write_toy_plugin

import quantfmt
from quantfmt import plugins
from quantfmt.errors import QuantfmtError
from quantfmt.io import safetensors as container
from quantfmt.io import sharded

SETTINGS = dict(deadline=timedelta(seconds=10), suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module")
def base():
    """(bytes of a valid mixed-format file, its header dict, a scratch folder) with the toy formats loaded."""
    with tempfile.TemporaryDirectory() as d:
        plugins.configure(plugins_dirs=[write_toy_plugin(os.path.join(d, "plugins"))])
        try:
            p = os.path.join(d, "base.safetensors")
            quantfmt.save(mixed_model(np.random.default_rng(7)), p, recipe={"default": "TQ8"})
            with open(p, "rb") as f:
                raw = f.read()
            (n,) = struct.unpack("<Q", raw[:8])
            yield raw, json.loads(raw[8:8 + n]), d
        finally:
            plugins.configure()


def check(raw: bytes, folder: str) -> None:
    """Open and fully read `raw` as a file: only QuantfmtError may come out."""
    p = os.path.join(folder, "fuzz.safetensors")
    with open(p, "wb") as f:
        f.write(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with container.open_safetensors(p) as m:
                for t in m.values():
                    t.dequantize()
                    if t.shape and t.shape[0] and len(t.shape) > 1:
                        t.row(0)
        except QuantfmtError:
            pass


def assemble(header: dict | str, data: bytes, length_delta: int = 0) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    b = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", max(0, len(b) + length_delta)) + b + data


def split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n], raw[8 + n:]


# ---- byte-level mutations ------------------------------------------------------------


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_truncations_and_appends(base, data):
    raw, _, d = base
    cut = data.draw(st.integers(0, len(raw)))
    tail = data.draw(st.binary(max_size=16))
    check(raw[:cut] + tail, d)


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_header_byte_flips(base, data):
    raw, _, d = base
    b = bytearray(raw)
    hdr_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, hdr_end - 1))
        b[i] = data.draw(st.integers(0, 255))
    check(bytes(b), d)


@settings(max_examples=100, **SETTINGS)
@given(n=st.one_of(st.integers(0, 1 << 64 - 1), st.integers(0, 4096)))
def test_length_prefix(base, n):
    raw, _, d = base
    check(struct.pack("<Q", n) + raw[8:], d)


# ---- structural mutations ------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
dims = st.one_of(st.integers(-3, 70), st.integers(0, 1 << 64), st.just(1 << 40))
shapes = st.one_of(st.lists(dims, max_size=5), json_values)


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_entry_mutations(base, data):
    raw, header, d = base
    hdr_bytes, body = split(raw)
    h = json.loads(hdr_bytes)
    names = [k for k in h if k != "__metadata__"]
    name = data.draw(st.sampled_from(names))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "extra", "drop"]))
    e = h[name]
    if field == "dtype":
        e["dtype"] = data.draw(st.one_of(st.sampled_from(list(container.DTYPE_SIZES)), json_values))
    elif field == "shape":
        e["shape"] = data.draw(shapes)
    elif field == "data_offsets":
        e["data_offsets"] = data.draw(st.one_of(st.lists(dims, min_size=2, max_size=2), json_values))
    elif field == "entry":
        h[name] = data.draw(json_values)
    elif field == "extra":
        e[data.draw(st.text(max_size=5))] = data.draw(json_values)
    else:
        del h[name]
    check(assemble(h, body, data.draw(st.sampled_from([0, 0, 0, -1, 1, 7]))), d)


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_quantfmt_document_mutations(base, data):
    raw, header, d = base
    hdr_bytes, body = split(raw)
    h = json.loads(hdr_bytes)
    doc = json.loads(h["__metadata__"][container.META_KEY])
    what = data.draw(st.sampled_from(["version", "tag", "layout", "shape", "entry", "tensors", "doc", "text",
                                      "metadata", "recipe", "add"]))
    q = doc["tensors"]["tq8"]
    if what == "version":
        doc["container_version"] = data.draw(st.one_of(st.integers(-2, 3), json_values))
    elif what == "tag":
        q["tag"] = data.draw(st.one_of(st.sampled_from(list(plugins.formats()) + ["Q9ZZ", ""]), json_values))
    elif what == "layout":
        q["layout_version"] = data.draw(st.one_of(st.integers(-1, 5), json_values))
    elif what == "shape":
        q["shape"] = data.draw(shapes)
    elif what == "entry":
        doc["tensors"]["tq8"] = data.draw(json_values)
    elif what == "tensors":
        doc["tensors"] = data.draw(json_values)
    elif what == "metadata":
        doc["metadata"] = data.draw(json_values)
    elif what == "recipe":
        doc["recipe"] = data.draw(json_values)
    elif what == "add":
        doc["tensors"][data.draw(st.sampled_from(["f32", "f16", "ghost", "empty"]))] = data.draw(
            st.one_of(json_values, st.just({"tag": "TQ8", "layout_version": 3, "shape": [2, 8]})))
    if what == "doc":
        h["__metadata__"][container.META_KEY] = json.dumps(data.draw(json_values))
    elif what == "text":
        h["__metadata__"][container.META_KEY] = data.draw(st.text(max_size=30))
    else:
        h["__metadata__"][container.META_KEY] = json.dumps(doc)
    check(assemble(h, body), d)


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_raw_header_text(base, data):
    """Headers that are not what json.dumps makes: duplicates, bad UTF-8, deep nesting, garbage."""
    raw, _, d = base
    hdr_bytes, body = split(raw)
    text = hdr_bytes.decode()
    kind = data.draw(st.sampled_from(["dup", "utf8", "deep", "garbage", "splice"]))
    if kind == "dup":  # repeat one entry under the same name, as raw JSON text
        h = json.loads(text)
        name = data.draw(st.sampled_from([k for k in h if k != "__metadata__"]))
        dup = json.dumps({name: h[name]})[1:-1]
        b = ("{" + dup + "," + text.strip()[1:]).encode()
    elif kind == "utf8":
        i = data.draw(st.integers(0, len(hdr_bytes)))
        b = hdr_bytes[:i] + data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + hdr_bytes[i:]
    elif kind == "deep":
        k = data.draw(st.integers(1, 200_000))
        b = b'{"a": ' + b"[" * k + b"]" * k + b"}"
    elif kind == "garbage":
        b = data.draw(st.binary(max_size=64))
    else:
        i, j = sorted(data.draw(st.lists(st.integers(0, len(hdr_bytes)), min_size=2, max_size=2)))
        b = hdr_bytes[:i] + hdr_bytes[j:]
    check(struct.pack("<Q", len(b)) + b + body, d)


@pytest.mark.slow
@settings(max_examples=3000, **SETTINGS)
@given(data=st.data())
def test_many_mutations(base, data):
    """The same mutations, many more examples (run by .ci/run)."""
    raw, _, d = base
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 20))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del b[i:i + data.draw(st.integers(1, 16))]
        else:
            b[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    check(bytes(b), d)


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_sharded_index_mutations(base, data):
    """A *.safetensors.index.json with any JSON in it: only QuantfmtError."""
    raw, header, d = base
    shard = os.path.join(d, "shard-1.safetensors")
    if not os.path.exists(shard):
        with open(shard, "wb") as f:
            f.write(raw)
    names = [k for k in header if k != "__metadata__"]
    wmap = {n: "shard-1.safetensors" for n in names}
    what = data.draw(st.sampled_from(["value", "name", "map", "doc", "bytes"]))
    idx = {"metadata": {"total_size": 1}, "weight_map": wmap}
    if what == "value":
        wmap[data.draw(st.sampled_from(names))] = data.draw(st.one_of(json_values, st.sampled_from(
            ["../base.safetensors", "/etc/passwd", "", "base.safetensors", "shard-2.safetensors", "."])))
    elif what == "name":
        wmap[data.draw(st.text(max_size=6))] = "shard-1.safetensors"
    elif what == "map":
        idx["weight_map"] = data.draw(json_values)
    elif what == "doc":
        idx = data.draw(json_values)
    text = json.dumps(idx).encode() if what != "bytes" else data.draw(st.binary(max_size=40))
    p = os.path.join(d, "m.safetensors.index.json")
    with open(p, "wb") as f:
        f.write(text)
    try:
        with sharded.open_sharded(p) as m:
            for t in m.values():
                t.dequantize()
    except QuantfmtError:
        pass
