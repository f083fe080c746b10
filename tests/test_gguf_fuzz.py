"""Fuzzing GGUF: mutated valid files must give a QuantfmtError or a usable Model, never hang;
random typed key-values must survive a write, read back by our reader and by gguf's.

The seeds are valid files written by gguf.GGUFWriter. Mutations: truncations, byte flips,
crafted counts and lengths (0, 2**31, 2**63, 2**64-1, ...) written over 4- and 8-byte fields,
and chunk insertions/deletions. A file the pre-scan accepts must also read, dequantize,
write back to GGUF and read again with the same tensors and metadata. Each example runs
under an alarm, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from ggufkit import sample_tensors, write_sample
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantfmt.errors import QuantfmtError
from quantfmt.io.gguf import SPLIT_KEYS, read_gguf, scan_gguf_bytes, write_gguf

HANG_SECONDS = 30  # per example; a real one takes milliseconds
QUICK = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
LONG = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

_DIR = Path(tempfile.mkdtemp(prefix="quantfmt-fuzz-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)


def _seed(name: str, **kw) -> bytes:
    p = _DIR / f"seed-{name}.gguf"
    write_sample(p, **kw)
    return p.read_bytes()


def _plain_tensors():
    return {k: v for k, v in sample_tensors().items() if v[1] in (T.F32, T.F16, T.BF16)}


SEEDS = [
    _seed("full"),  # every mapped ggml type, typed key-values of every kind
    _seed("plain", tensors=_plain_tensors(), alignment=8),
    _seed("notensor", tensors={}),
]

INTERESTING = [0, 1, 2, 3, 4, 5, 9, 12, 13, 31, 32, 33, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@contextlib.contextmanager
def _no_hang():
    def boom(signum, frame):
        raise TimeoutError(f"the GGUF reader ran for more than {HANG_SECONDS} s on one input")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check(blob: bytes) -> None:
    """The property: QuantfmtError, or a model that reads, dequantizes and round-trips exactly."""
    with _no_hang():
        try:
            scan_gguf_bytes(blob)
        except QuantfmtError:
            return
        src, out = _DIR / "case.gguf", _DIR / "case-out.gguf"
        src.write_bytes(blob)
        out.unlink(missing_ok=True)
        try:
            m = read_gguf(src, unsupported="dequantize")
        except QuantfmtError:
            return  # e.g. a ggml type that even gguf cannot dequantize
        with m:
            for t in m.values():
                try:
                    t.dequantize()
                except QuantfmtError:
                    pass
            write_gguf(out, m)
            with read_gguf(out, unsupported="dequantize") as back:
                assert list(back) == list(m)
                for name, t in m.items():
                    assert back[name].tag == t.tag and back[name].shape == t.shape
                    assert np.array_equal(back[name].data, t.data)
                assert back.metadata["gguf"]["kv"] == m.metadata["gguf"]["kv"]


seeds = st.sampled_from(range(len(SEEDS)))


@st.composite
def truncated(draw):
    b = SEEDS[draw(seeds)]
    return b[: draw(st.integers(0, len(b) - 1))]


@st.composite
def flipped(draw):
    b = bytearray(SEEDS[draw(seeds)])
    for _ in range(draw(st.integers(1, 8))):
        # mostly in the header, where the structure is
        hi = min(len(b), 2048) if draw(st.booleans()) else len(b)
        b[draw(st.integers(0, hi - 1))] = draw(st.integers(0, 255))
    return bytes(b)


@st.composite
def crafted(draw):
    b = bytearray(SEEDS[draw(seeds)])
    for _ in range(draw(st.integers(1, 3))):
        v = draw(st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1))
        width = draw(st.sampled_from([4, 8]))
        v %= 1 << (8 * width)
        pos = draw(st.integers(4, min(len(b), 2048) - width))
        b[pos : pos + width] = struct.pack("<I" if width == 4 else "<Q", v)
    return bytes(b)


@st.composite
def spliced(draw):
    b = SEEDS[draw(seeds)]
    i = draw(st.integers(0, len(b)))
    j = draw(st.integers(i, min(len(b), i + 64)))
    return b[:i] + draw(st.binary(max_size=64)) + b[j:]


def test_seeds_are_valid_and_round_trip():
    for b in SEEDS:
        scan_gguf_bytes(b)
        check(b)


@QUICK
@given(truncated())
def test_fuzz_truncations(blob):
    check(blob)


@QUICK
@given(flipped())
def test_fuzz_byte_flips(blob):
    check(blob)


@QUICK
@given(crafted())
def test_fuzz_crafted_counts_and_lengths(blob):
    check(blob)


@QUICK
@given(spliced())
def test_fuzz_splices(blob):
    check(blob)


@QUICK
@given(st.binary(max_size=200).map(lambda b: b"GGUF" + struct.pack("<I", 3) + b))
def test_fuzz_random_headers(blob):
    check(blob)


@pytest.mark.slow
@LONG
@given(truncated() | flipped() | crafted() | spliced())
def test_fuzz_long(blob):
    check(blob)


# ---- the writer: random typed key-values survive a write and two independent readers ----

_INT_BOUNDS = {"UINT8": (0, 255), "INT8": (-128, 127), "UINT16": (0, 2**16 - 1),
               "INT16": (-(2**15), 2**15 - 1), "UINT32": (0, 2**32 - 1), "INT32": (-(2**31), 2**31 - 1),
               "UINT64": (0, 2**64 - 1), "INT64": (-(2**63), 2**63 - 1)}


def _scalar(t):
    if t in _INT_BOUNDS:
        return st.integers(*_INT_BOUNDS[t])
    if t == "BOOL":
        return st.booleans()
    if t == "FLOAT32":
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    if t == "FLOAT64":
        return st.floats(allow_nan=False, allow_infinity=False)
    return st.text(max_size=20)  # STRING


_SCALAR_TYPES = [*_INT_BOUNDS, "BOOL", "FLOAT32", "FLOAT64", "STRING"]


@st.composite
def typed_kv(draw):
    t = draw(st.sampled_from(_SCALAR_TYPES))
    if draw(st.booleans()):
        return f"ARRAY[{t}]", draw(st.lists(_scalar(t), max_size=6))
    return t, draw(_scalar(t))


@QUICK
@given(st.dictionaries(st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=12),
                       typed_kv(), max_size=8))
def test_fuzz_written_key_values_read_back(kvs):
    import gguf

    from quantfmt.tensor import Model, QTensor

    given_kv = [[k, t, v] for k, (t, v) in kvs.items() if k != "general.alignment"]  # the writer checks that one
    m = Model({"w": QTensor.quantize(np.arange(32, dtype=np.float32), "F32", "w")},
              {"gguf": {"version": 3, "kv": given_kv}})
    kv = [e for e in given_kv if e[0] not in SPLIT_KEYS]  # one file: the split keys are left out (io.gguf.one_file)
    out = _DIR / "kv.gguf"
    with _no_hang():
        write_gguf(out, m, overwrite=True)
        with read_gguf(out) as back:
            assert back.metadata["gguf"]["kv"] == kv  # ours: exact, types included
        ref = gguf.GGUFReader(str(out))  # theirs: same keys, types and values
        fields = {f.name: f for f in ref.fields.values() if not f.name.startswith("GGUF.")}
        assert list(fields) == [k for k, _, _ in kv]
        for k, t, v in kv:
            f = fields[k]
            names = [gguf.GGUFValueType(x).name for x in f.types]
            if t.startswith("ARRAY["):
                assert names[0] == "ARRAY" and (not v or names[1] == t[6:-1])
            else:
                assert names == [t]
            assert f.contents() == v
