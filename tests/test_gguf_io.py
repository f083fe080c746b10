"""GGUF interop: the pre-scan's rules one by one, the reader against gguf's own reader, round trips."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from ggufkit import kv, raw_gguf, s, sample_tensors, tinfo, write_sample

from quantfmt import errors
from quantfmt.io.gguf import read_gguf, scan_gguf, scan_gguf_bytes, write_gguf
from quantfmt.plugins import formats

# the built-in formats that are ggml types, byte for byte
GGML_TAGS = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")


def test_every_ggml_tag_is_registered_with_ggmls_geometry():
    # The zero-copy mapping relies on this; the tests below need it too.
    from gguf.constants import GGML_QUANT_SIZES

    for tag in GGML_TAGS:
        fmt = formats()[tag]
        bs, ts = GGML_QUANT_SIZES[T[tag]]
        assert (fmt.block_shape, fmt.block_bytes) == ((1, bs), ts), tag


@pytest.fixture
def sample(tmp_path):
    p = tmp_path / "sample.gguf"
    write_sample(p)
    return p


# ---- reading, checked against the gguf package's reader -------------------------------


def test_read_matches_gguf_reader(sample):
    ref = gguf.GGUFReader(str(sample))
    with read_gguf(sample) as m:
        assert list(m) == [t.name for t in ref.tensors]
        for rt in ref.tensors:
            qt = m[rt.name]
            assert qt.tag == rt.tensor_type.name
            assert qt.shape == tuple(int(d) for d in reversed(rt.shape))
            assert qt.data.tobytes() == rt.data.tobytes()
            # zero-copy: a read-only view of the mapped file, not a copy
            assert not qt.data.flags.owndata and not qt.data.flags.writeable
            want = gguf.quants.dequantize(rt.data, rt.tensor_type)
            np.testing.assert_array_equal(qt.dequantize(), np.asarray(want, np.float32).reshape(qt.shape))


def test_metadata_matches_gguf_reader(sample):
    ref = gguf.GGUFReader(str(sample))
    with read_gguf(sample, unsupported="dequantize") as m:
        g = m.metadata["gguf"]
    assert g["version"] == 3 and g["alignment"] == 32
    assert g["tensor_order"] == [t.name for t in ref.tensors]
    ours = {k: (t, v) for k, t, v in g["kv"]}
    theirs = [f for f in ref.fields.values() if not f.name.startswith("GGUF.")]
    assert [k for k, _, _ in g["kv"]] == [f.name for f in theirs]
    for f in theirs:
        t, v = ours[f.name]
        names = [V(x).name for x in f.types]
        assert t == (names[0] if len(names) == 1 else f"ARRAY[{names[1]}]"), f.name
        if f.name == "test.bytes":
            assert v == {"hex": bytes(f.parts[-1]).hex()}
        elif f.name == "test.nested":  # gguf's contents() flattens nested arrays; ours keeps the structure
            assert v == [["ARRAY[INT32]", [1, 2]], ["ARRAY[INT32]", [3]]]
        else:
            assert v == f.contents(), f.name
    json.dumps(g, allow_nan=False)  # JSON-able, no NaN literals


@pytest.fixture
def no_q5(monkeypatch):
    """Q5_0 and Q5_1 as if no plugin stored them (every ggml type gguf decodes has a format now)."""
    from quantfmt.io import gguf as gguf_io

    real, real_one = gguf_io.ggml_formats, gguf_io.ggml_format
    monkeypatch.setattr(gguf_io, "ggml_formats",
                        lambda: {k: v for k, v in real().items() if k not in ("Q5_0", "Q5_1")})
    monkeypatch.setattr(gguf_io, "ggml_format", lambda name: None if name in ("Q5_0", "Q5_1") else real_one(name))


def test_unsupported_type_is_an_error_or_dequantized(tmp_path, monkeypatch, no_q5):
    w = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    tensors = {"norm": (np.ones(32, np.float32), T.F32),
               "blk.0.q5": (gguf.quants.quantize(w, T.Q5_0), T.Q5_0),
               "blk.0.k4": (gguf.quants.quantize(w, T.Q5_1), T.Q5_1)}
    p = tmp_path / "q5.gguf"
    write_sample(p, tensors=tensors)
    with pytest.raises(errors.FileFormatError) as e:
        read_gguf(p)
    msg = str(e.value)
    assert str(p) in msg and "blk.0.q5 (Q5_0)" in msg and "blk.0.k4 (Q5_1)" in msg
    assert "QUANTFMT_GGUF_UNSUPPORTED=dequantize" in msg
    with read_gguf(p, unsupported="dequantize") as m:
        assert m["blk.0.q5"].tag == "F32" and m["blk.0.q5"].shape == (4, 256)
        ref = gguf.GGUFReader(str(p))
        for rt in ref.tensors[1:]:
            want = gguf.quants.dequantize(rt.data, rt.tensor_type)
            np.testing.assert_array_equal(m[rt.name].dequantize(), want)
        assert m.metadata["gguf"]["dequantized"] == {"blk.0.q5": "Q5_0", "blk.0.k4": "Q5_1"}
    with pytest.raises(errors.QuantfmtError, match="unsupported='maybe'"):
        read_gguf(p, unsupported="maybe")
    monkeypatch.setenv("QUANTFMT_GGUF_UNSUPPORTED", "dequantize")  # the CLI's way to choose
    with read_gguf(p) as m:
        assert m["blk.0.q5"].tag == "F32"
    monkeypatch.delenv("QUANTFMT_GGUF_UNSUPPORTED")
    # a ggml type the gguf package cannot dequantize either (Q8_K: ggml's activation type)
    write_sample(p2 := tmp_path / "q8k.gguf", tensors={"act": (np.zeros((1, 292), np.uint8), T.Q8_K)})
    with pytest.raises(errors.FileFormatError, match="cannot dequantize ggml type Q8_K") as e:
        read_gguf(p2, unsupported="dequantize")
    assert e.value.tensor == "act"


def test_custom_alignment_is_read(tmp_path):
    p = tmp_path / "a.gguf"
    write_sample(p, alignment=256, tensors={"x": (np.arange(96, dtype=np.float32), T.F32),
                                            "y": (np.arange(5 * 32, dtype=np.float32).reshape(5, 32), T.F32)})
    h = scan_gguf(p)
    assert h.alignment == 256 and h.data_offset % 256 == 0 and all(t.offset % 256 == 0 for t in h.tensors)
    with read_gguf(p) as m:
        np.testing.assert_array_equal(m["y"].dequantize(), np.arange(160, dtype=np.float32).reshape(5, 32))


# ---- GGUF -> quantfmt container -> GGUF ----------------------------------------------


def _through_container(src, tmp_path):
    from quantfmt import convert, open_model
    from quantfmt.recipe import Recipe

    keep = Recipe(rules=[("*", "keep")])
    mid, out = tmp_path / "mid.safetensors", tmp_path / "back.gguf"
    convert(src, mid, keep)
    with open_model(mid) as m:
        assert m.metadata["gguf"] == read_gguf(src).metadata["gguf"]
    convert(mid, out, keep)
    return out


def test_round_trip_through_the_container(tmp_path, sample):
    assert _through_container(sample, tmp_path).read_bytes() == sample.read_bytes()


def test_round_trip_through_the_container_plain_types(tmp_path):
    src = tmp_path / "plain.gguf"
    plain = {k: v for k, v in sample_tensors().items() if v[1] in (T.F32, T.F16, T.BF16)}
    write_sample(src, alignment=16, tensors=plain)
    assert _through_container(src, tmp_path).read_bytes() == src.read_bytes()


# ---- writing --------------------------------------------------------------------------


def _kv_types(path):
    return {f.name: [V(t).name for t in f.types] for f in gguf.GGUFReader(str(path)).fields.values()}


@pytest.mark.parametrize("alignment", [None, 64])
def test_write_reproduces_the_gguf_writer_file(tmp_path, alignment):
    src, out = tmp_path / "src.gguf", tmp_path / "out.gguf"
    write_sample(src, alignment=alignment)
    with read_gguf(src) as m:
        write_gguf(out, m)
    assert out.read_bytes() == src.read_bytes()


def test_write_dequantized_model_reads_back(tmp_path, sample):
    # The written file, read by the gguf package: same tensors, types and bytes; same typed key-values.
    out = tmp_path / "out.gguf"
    with read_gguf(sample, unsupported="dequantize") as m:
        write_gguf(out, m)
        ref = gguf.GGUFReader(str(out))
        assert [t.name for t in ref.tensors] == list(m)
        for rt in ref.tensors:
            assert rt.tensor_type.name == m[rt.name].tag
            assert rt.data.tobytes() == m[rt.name].data.tobytes()
        with read_gguf(out) as back:
            assert back.metadata["gguf"]["kv"] == m.metadata["gguf"]["kv"]
    assert _kv_types(out) == _kv_types(sample)


def test_exotic_metadata_round_trips_exactly(tmp_path):
    # NaN payloads, infinities, -0.0, non-UTF-8 strings, empty and nested arrays: all kept bit for bit.
    nan_bits = struct.pack("<I", 0x7FC00123)
    kvs = [
        kv("f.nan", 6, nan_bits), kv("f.inf", 6, struct.pack("<f", float("inf"))),
        kv("f.negzero", 6, struct.pack("<f", -0.0)), kv("d.nan", 12, struct.pack("<Q", 0x7FF0000000000001)),
        kv("a.f32", 9, struct.pack("<IQ", 6, 3) + nan_bits + struct.pack("<ff", 1.5, float("-inf"))),
        kv("a.empty", 9, struct.pack("<IQ", 8, 0)),
        kv("a.bin", 9, struct.pack("<IQ", 8, 2) + s(b"\x80") + s("ok")),
        kv("a.deep", 9, struct.pack("<IQ", 9, 2) + struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, 2)
           + b"\1\2" + struct.pack("<IQ", 8, 1) + s("x")),
    ]
    src = tmp_path / "exotic.gguf"
    src.write_bytes(raw_gguf(kvs, [tinfo("t", [32], 0, 0)], np.arange(32, dtype="<f4").tobytes()))
    with read_gguf(src) as m:
        g = m.metadata["gguf"]
        vals = {k: v for k, _, v in g["kv"]}
        assert vals["f.nan"] == "0x7fc00123" and vals["d.nan"] == "0x7ff0000000000001"
        assert vals["a.deep"] == [["ARRAY[ARRAY]", [["ARRAY[UINT8]", [1, 2]]]], ["ARRAY[STRING]", ["x"]]]
        assert vals["a.bin"] == [{"hex": "80"}, "ok"]
        g2 = json.loads(json.dumps(g, allow_nan=False))  # what a container stores and gives back
        out = tmp_path / "out.gguf"
        write_gguf(out, m, metadata={"gguf": g2})
    assert out.read_bytes() == src.read_bytes()


def test_streaming_writer_produces_one_tensor_at_a_time(tmp_path, sample):
    from quantfmt.io.files import TensorPlan
    from quantfmt.io.gguf import write_gguf_plans

    events = []
    with read_gguf(sample) as m:
        plans = [TensorPlan(n, t.tag, t.shape, (lambda n=n, t=t: events.append(("produce", n)) or t.data),
                            after=(lambda n=n: events.append(("after", n)))) for n, t in m.items()]
        out = tmp_path / "streamed.gguf"
        done = []
        write_gguf_plans(out, plans, metadata=m.metadata, progress=done.append)
        assert events == [(e, n) for n in m for e in ("produce", "after")]
        assert done == [t.nbytes for t in m.values()]
        assert out.read_bytes() == sample.read_bytes()
        short = [*plans[:-1], TensorPlan(plans[-1].name, plans[-1].tag, plans[-1].shape, lambda: b"\0" * 3)]
        bad = tmp_path / "short.gguf"
        with pytest.raises(errors.FileFormatError, match="produced 3 bytes, the header promised"):
            write_gguf_plans(bad, short, metadata=m.metadata)
        assert not bad.exists() and not list(tmp_path.glob(".short.gguf*"))


def test_write_refuses_formats_without_a_ggml_type(tmp_path, fresh_registry):
    plug = tmp_path / "plugs"
    plug.mkdir()
    (plug / "tst.py").write_text(
        "import numpy as np\nimport quantfmt\nfrom quantfmt.format import Format\n"
        "class TST8(Format):\n    tag = 'TST8'\n    block_bytes = 1\n"
        "    def _quantize(self, w):\n"
        "        return np.clip(np.rint(w), -127, 127).astype(np.int8).view(np.uint8).ravel()\n"
        "    def _dequantize(self, d, r, c):\n"
        "        return d.view(np.int8).astype(np.float32).reshape(r, c)\n"
        "@quantfmt.hookimpl\ndef register_formats(register):\n    register(TST8())\n")
    fresh_registry.configure(plugins_dirs=[str(plug)])
    from quantfmt.tensor import Model, QTensor

    w = np.ones((4, 32), np.float32)
    m = Model({"a": QTensor.quantize(w, "F32", "a"), "b.weight": QTensor.quantize(w, "TST8", "b.weight"),
               "c.weight": QTensor.quantize(w, "TST8", "c.weight")})
    out = tmp_path / "x.gguf"
    with pytest.raises(errors.FileFormatError) as e:
        write_gguf(out, m)
    msg = str(e.value)
    assert "b.weight (TST8)" in msg and "c.weight (TST8)" in msg and "a (F32)" not in msg
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_write_is_overwrite_safe(tmp_path, sample):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    with read_gguf(sample, unsupported="dequantize") as m:
        with pytest.raises(errors.OutputExistsError):
            write_gguf(out, m)
        assert out.read_bytes() == b"precious"
        with pytest.raises(errors.OutputExistsError):
            write_gguf(sample, m, overwrite=True)  # never over its own input
        write_gguf(out, m, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_write_without_gguf_metadata_and_bad_shapes(tmp_path):
    from quantfmt.tensor import Model, QTensor

    out = tmp_path / "plain.gguf"
    m = Model({"w": QTensor.quantize(np.arange(64, dtype=np.float32).reshape(2, 32), "F16", "w")})
    write_gguf(out, m)
    ref = gguf.GGUFReader(str(out))
    t0 = ref.tensors[0]
    assert t0.name == "w" and t0.tensor_type == T.F16 and list(t0.shape) == [32, 2]
    assert [f for f in ref.fields if not f.startswith("GGUF.")] == []
    five = Model({"v": QTensor.quantize(np.zeros((1, 1, 1, 1, 2), np.float32), "F32", "v")})
    with pytest.raises(errors.FileFormatError, match="1 to 4 dimensions"):
        write_gguf(tmp_path / "five.gguf", five)


@pytest.mark.parametrize("bad, match", [
    ({"kv": [["k", "UINT8", 256]]}, "UINT8 value 256"),
    ({"kv": [["k", "UINT32", True]]}, "UINT32 value True"),
    ({"kv": [["k", "FLOAT32", "zz"]]}, "neither a number nor IEEE bits"),
    ({"kv": [["k", "FLOAT32", 1e39]]}, "does not fit a FLOAT32"),
    ({"kv": [["k", "BOOL", 1]]}, "not true/false"),
    ({"kv": [["k", "STRING", 5]]}, "neither a string"),
    ({"kv": [["k", "STRING", {"hex": "zz"}]]}, "not valid hex"),
    ({"kv": [["k", "ARRAY[NOPE]", []]]}, "bad array type"),
    ({"kv": [["k", "ARRAY[INT8]", [1, 500]]]}, "not an integer in"),
    ({"kv": [["k", "ARRAY[ARRAY]", [[1, 2]]]]}, "not a \\[type, items\\] pair"),
    ({"kv": [["k", "WHAT", 1]]}, "unknown value type"),
    ({"kv": [["k", "UINT8"]]}, "not a \\[key, type, value\\] triple"),
    ({"kv": [["k", "UINT8", 1], ["k", "UINT8", 2]]}, "duplicate"),
    ({"kv": [["general.alignment", "UINT32", 48]]}, "power of two"),
    ({"kv": [["general.alignment", "UINT64", 32]]}, "power of two"),
    ({"version": 7}, "version 7"),
])
def test_write_refuses_bad_metadata(tmp_path, bad, match):
    from quantfmt.tensor import Model, QTensor

    m = Model({"w": QTensor.quantize(np.zeros((1, 32), np.float32), "F32", "w")})
    out = tmp_path / "bad.gguf"
    with pytest.raises(errors.FileFormatError, match=match):
        write_gguf(out, m, metadata={"gguf": bad})
    assert not out.exists()


# ---- the pre-scan, rule by rule -------------------------------------------------------

F32_32 = [tinfo("t", [32], 0, 0)]
DATA = bytes(128)


PRESCAN_CASES = [
    (b"", "needs 4 bytes"),
    (b"GGML" + bytes(20), "not a GGUF file"),
    (raw_gguf(version=1), "version 1 is not supported"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (raw_gguf(n_kv=2**40), "declares 1099511627776 key-values; at most 65536"),
    (raw_gguf(n_tensors=2**63), "declares 9223372036854775808 tensors; at most 1048576"),
    (raw_gguf(n_kv=1000), "declares 1000 key-values, more than the 8 bytes left"),
    (raw_gguf(n_tensors=1000), "declares 1000 tensors, more than the 8 bytes left"),
    # the 43-byte file that makes gguf 0.19 hang: one key-value, an array of 2**63 UINT8
    (raw_gguf([kv("k", 9, struct.pack("<IQ", 0, 2**63))], alignment=1), "array of 9223372036854775808 UINT8"),
    (raw_gguf([kv("k", 9, struct.pack("<IQ", 9, 2**40))]), "array of 1099511627776 ARRAY"),
    (raw_gguf([kv("k", 9, struct.pack("<IQ", 9, 1) * 9 + struct.pack("<IQ", 0, 0))]), "nested more than 8"),
    (raw_gguf([kv("k", 8, struct.pack("<Q", 2**62))]), "needs 4611686018427387904 bytes"),
    (raw_gguf([struct.pack("<Q", 2**64 - 1) + bytes(16)]), "at most 65535"),
    (raw_gguf([kv("k", 13, b"\0" * 8)]), "unknown value type 13"),
    (raw_gguf([kv("k", 9, struct.pack("<IQ", 77, 1))]), "unknown array item type 77"),
    (raw_gguf([kv("k", 7, b"\2")]), "BOOL must be 0 or 1"),
    (raw_gguf([kv("k", 9, struct.pack("<IQ", 7, 2) + b"\1\5")]), "BOOL must be 0 or 1"),
    (raw_gguf([kv("k", 4, b"\0" * 4), kv("k", 4, b"\0" * 4)]), "appears twice"),
    (raw_gguf([kv("", 4, b"\0" * 4)]), "empty key"),
    (raw_gguf([s(b"\xff") + struct.pack("<IB", 0, 1)]), "not UTF-8"),
    (raw_gguf([kv("general.alignment", 10, struct.pack("<Q", 32))]), "must be a UINT32"),
    (raw_gguf([kv("general.alignment", 4, struct.pack("<I", 48))]), "alignment 48 must be a power of two"),
    (raw_gguf([kv("general.alignment", 4, struct.pack("<I", 0))]), "general.alignment 0 must be"),
    (raw_gguf([kv("general.alignment", 4, struct.pack("<I", 1 << 21))]), "2097152 must be a power of two"),
    (raw_gguf([], [tinfo("t", [], 0, 0)], DATA), "0 dimensions"),
    (raw_gguf([], [tinfo("t", [1] * 5, 0, 0)], DATA), "5 dimensions"),
    (raw_gguf([], [tinfo("t", [32, 0], 0, 0)], DATA), "include 0"),
    (raw_gguf([], [tinfo("t", [2**32, 2**32], 0, 0)], DATA), "more than 2\\*\\*40"),
    (raw_gguf([], [tinfo("t", [32], 99, 0)], DATA), "unknown ggml type 99"),
    (raw_gguf([], [tinfo("t", [48], 2, 0)], DATA), "blocks of 32 along the innermost dimension, which is 48"),
    (raw_gguf([], [tinfo("t", [32], 0, 16)], DATA), "not a multiple of the alignment 32"),
    (raw_gguf([], [tinfo("t", [32], 0, 0)], bytes(100)), "run past the end"),
    (raw_gguf([], [tinfo("t", [32], 0, 2**64 - 32)], DATA), "run past the end"),
    (raw_gguf([], [tinfo("a", [32], 0, 0), tinfo("b", [32], 0, 96)], bytes(256)), "overlaps tensor 'a'"),
    (raw_gguf([], [tinfo("a", [64], 0, 0), tinfo("b", [32], 0, 0)], bytes(256)), "overlaps tensor"),
    (raw_gguf([], [tinfo("a", [32], 0, 0), tinfo("a", [32], 0, 128)], bytes(256)), "two tensors have"),
    (raw_gguf([], F32_32)[:-8], r"the file ends at byte|needs \d+ bytes"),
]


@pytest.mark.parametrize("blob, match", PRESCAN_CASES,
                         ids=[f"{i}:{m[:30]}" for i, (_, m) in enumerate(PRESCAN_CASES)])
def test_prescan_rejects(tmp_path, blob, match):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(errors.FileFormatError, match=match) as e:
        read_gguf(p, unsupported="dequantize")
    assert str(e.value).startswith(str(p))


def test_prescan_bounds_the_array_items_in_all(monkeypatch):
    from quantfmt.io import gguf as gguf_io

    monkeypatch.setattr(gguf_io, "MAX_ARRAY_ITEMS", 10)
    six = kv("a", 9, struct.pack("<IQ", 0, 6) + bytes(6))
    ok = raw_gguf([six, kv("b", 9, struct.pack("<IQ", 0, 4) + bytes(4))])
    assert len(scan_gguf_bytes(ok).kv) == 2
    bad = raw_gguf([six, kv("b", 9, struct.pack("<IQ", 8, 5) + s("") * 5)])
    with pytest.raises(errors.FileFormatError, match="more than 10 array items in all"):
        scan_gguf_bytes(bad)


def test_prescan_names_the_tensor(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(raw_gguf([], [tinfo("blk.3.ffn_up.weight", [32], 0, 64)], bytes(64)))
    with pytest.raises(errors.FileFormatError) as e:
        scan_gguf(p)
    assert e.value.tensor == "blk.3.ffn_up.weight" and "blk.3.ffn_up.weight" in str(e.value)


def test_prescan_accepts_disjoint_out_of_order_tensors_and_empty_files(tmp_path):
    p = tmp_path / "ok.gguf"
    data = np.arange(64, dtype="<f4").tobytes()
    infos = [tinfo("second", [32], 0, 128), tinfo("first", [32], 0, 0)]
    p.write_bytes(raw_gguf([], infos, data[:128] + data))
    with read_gguf(p) as m:
        assert list(m) == ["second", "first"]
        np.testing.assert_array_equal(m["first"].dequantize(), np.arange(32, dtype=np.float32))
    e = tmp_path / "empty.gguf"
    e.write_bytes(raw_gguf(alignment=1))
    with read_gguf(e) as m:
        assert len(m) == 0 and m.metadata["gguf"]["kv"] == []


def test_every_truncation_of_a_real_file_is_an_error(tmp_path, sample):
    blob = sample.read_bytes()
    h = scan_gguf(sample)
    # every cut inside the header, every 16th inside the data
    for n in [*range(h.data_offset), *range(h.data_offset, len(blob), 16), len(blob) - 1]:
        with pytest.raises(errors.FileFormatError):
            scan_gguf_bytes(blob[:n])
    p = tmp_path / "cut.gguf"
    for n in (0, 3, 20, h.data_offset - 1, h.data_offset, len(blob) - 1):  # and through a file
        p.write_bytes(blob[:n])
        with pytest.raises(errors.FileFormatError):
            read_gguf(p, unsupported="dequantize")


def test_unreadable_path(tmp_path):
    with pytest.raises(errors.FileFormatError, match="cannot read"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(errors.FileFormatError, match="cannot read"):
        read_gguf(tmp_path)


def test_sample_covers_each_mapped_type():
    assert {q.name for _, q in sample_tensors().values()} == set(GGML_TAGS)


# ---- the command line -----------------------------------------------------------------


def _cli(*args, env=None):
    from click.testing import CliRunner

    from quantfmt.cli import cli

    return CliRunner().invoke(cli, list(map(str, args)), env=env)


def test_cli_bad_gguf_is_one_line_error(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(raw_gguf([kv("k", 9, struct.pack("<IQ", 0, 2**63))], alignment=1))
    for cmd in (["inspect", p], ["check-file", p], ["convert", p, tmp_path / "o.safetensors", "--to", "F16"]):
        r = _cli(*cmd)
        assert r.exit_code == 1, (cmd, r.output)
        assert "Error:" in r.output and "array of 9223372036854775808 UINT8" in r.output
        assert "Traceback" not in r.output
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_gguf_check(tmp_path):
    src = tmp_path / "plain.gguf"
    write_sample(src, tensors={k: v for k, v in sample_tensors().items() if v[1] in (T.F32, T.F16, T.BF16)})
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.gguf"
    assert _cli("convert", src, mid, "--rule", "*=keep").exit_code == 0
    r = _cli("convert", mid, back, "--rule", "*=keep")
    assert r.exit_code == 0, r.output
    r = _cli("check-file", back, "--against", src)
    assert r.exit_code == 0, r.output
    assert "gguf package's reader agrees" in r.output and f"equal {src}" in r.output
    # a model with other bytes is a difference
    other = tmp_path / "other.safetensors"
    assert _cli("convert", mid, other, "--rule", "blk.0.cube=F16").exit_code == 0
    r = _cli("check-file", back, "--against", other)
    assert r.exit_code == 1 and "blk.0.cube" in r.output


def test_cli_convert_unsupported_types_with_env(tmp_path, no_q5):
    w = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    p = tmp_path / "q5.gguf"
    write_sample(p, tensors={"q5": (gguf.quants.quantize(w, T.Q5_0), T.Q5_0)})
    out = tmp_path / "q5.safetensors"
    r = _cli("convert", p, out, "--rule", "*=keep")
    assert r.exit_code == 1 and "q5 (Q5_0)" in r.output and "QUANTFMT_GGUF_UNSUPPORTED" in r.output
    r = _cli("convert", p, out, "--rule", "*=keep", env={"QUANTFMT_GGUF_UNSUPPORTED": "dequantize"})
    assert r.exit_code == 0, r.output
    with read_gguf(p, unsupported="dequantize") as a:
        from quantfmt import open_model

        with open_model(out) as b:
            assert b["q5"].tag == "F32" and np.array_equal(a["q5"].data, b["q5"].data)
