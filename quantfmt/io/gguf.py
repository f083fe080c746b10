"""GGUF interop: a bounded pre-scan, a lazy zero-copy reader, and a byte-faithful writer.

GGUF (llama.cpp's file format, little-endian) is, in order:
    magic "GGUF" · u32 version · u64 tensor_count · u64 kv_count
    kv_count key-values:   string key · u32 value type · value
    tensor_count infos:    string name · u32 n_dims · n_dims x u64 dims (innermost first)
                           · u32 ggml type · u64 offset
    zero padding to the alignment (key general.alignment, default 32)
    the data section; each tensor's offset is relative to its start and aligned.
A string is u64 length + bytes; an array is u32 item type + u64 count + items.

`scan_gguf` parses and checks all of that with our own code before anything is mapped,
so a hostile file fails with a FileFormatError in time and memory linear in the file size
(gguf 0.19's reader hangs on a 49-byte file declaring a 2**63-item array, and accepts
overlapping tensors). Every count and length is checked against the bytes that remain
before it is used; see formats.md, "GGUF interop", for the full list of rules.

`read_gguf` maps the file and gives each tensor of a ggml type that a registered format stores
(the format's `ggml_type`: same bytes) as a lazy source whose bytes are a view of the file;
shapes are reversed into numpy order. The key-values go into `Model.metadata["gguf"]` with
their GGUF value types (the JSON form is specified in formats.md), so `write_gguf` can write
them back identically: GGUF -> quantfmt -> GGUF reproduces the original file byte for byte
when the original was laid out the standard way (tensors packed in order, zero padding).
`write_gguf_plans` is the same writer fed one tensor at a time.

Split files, the llama.cpp way (`gguf-split`): `NAME-00001-of-0000N.gguf` ..., each a complete
GGUF holding some of the tensors, the first with every key-value, each with `split.no` (u16, from
0), `split.count` (u16) and `split.tensors.count` (i32, all splits together). `split_layouts`
plans them (greedy in tensor order under a byte limit); `read_gguf` on any split opens them all
as one Model.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import FileFormatError, QuantfmtError, context
from ..format import MAX_ELEMENTS, Format
from ..gcpause import paused
from .files import (
    atomic_output,
    gguf_split_files,
    input_files,
    map_readonly,
    open_for_write,
    require_regular,
    split,
    write,
    write_stream,
)

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
#: Largest accepted general.alignment: a power of two up to 1 MiB (real files use 32).
MAX_ALIGNMENT = 1 << 20
MAX_DIMS = 4  # GGML_MAX_DIMS
#: Arrays of arrays nest at most this deep (real files do not nest at all).
MAX_ARRAY_DEPTH = 8
#: Array items over all key-values: far above real files (a 256k vocabulary with scores and
#: types is under 1M), and it bounds the memory a hostile header can make us spend on lists.
MAX_ARRAY_ITEMS = 1 << 23
#: Counts far above real files (tens of key-values, thousands of tensors), bounding memory.
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
#: Keys and tensor names longer than this are refused (GGUF caps keys at 65535 bytes).
MAX_NAME_BYTES = 65535

#: Environment variable giving read_gguf's `unsupported` when the caller does not.
UNSUPPORTED_ENV = "QUANTFMT_GGUF_UNSUPPORTED"

# GGUF scalar value types: id -> (name, struct code).
_SCALARS = {
    0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "H"), 3: ("INT16", "h"),
    4: ("UINT32", "I"), 5: ("INT32", "i"), 6: ("FLOAT32", "f"), 7: ("BOOL", "B"),
    10: ("UINT64", "Q"), 11: ("INT64", "q"), 12: ("FLOAT64", "d"),
}
STRING, ARRAY = 8, 9
TYPE_NAMES = {**{k: v[0] for k, v in _SCALARS.items()}, STRING: "STRING", ARRAY: "ARRAY"}
TYPE_IDS = {v: k for k, v in TYPE_NAMES.items()}
_INT_RANGES = {
    "UINT8": (0, 2**8 - 1), "INT8": (-(2**7), 2**7 - 1),
    "UINT16": (0, 2**16 - 1), "INT16": (-(2**15), 2**15 - 1),
    "UINT32": (0, 2**32 - 1), "INT32": (-(2**31), 2**31 - 1),
    "UINT64": (0, 2**64 - 1), "INT64": (-(2**63), 2**63 - 1),
}
# The fewest bytes one array item of each type can take (a string: its u64 length;
# an inner array: its u32 type and u64 count), used to bound counts before reading.
_MIN_ITEM = {**{k: struct.calcsize("<" + v[1]) for k, v in _SCALARS.items()}, STRING: 8, ARRAY: 12}


def _ggml_sizes() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, elements per block, bytes per block), from the gguf package."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): (t.name, bs, ts) for t, (bs, ts) in GGML_QUANT_SIZES.items()}


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (contiguous) first
    ggml_type: int
    type_name: str
    offset: int  # relative to the data section
    nbytes: int

    shape: tuple[int, ...] = ()  # the logical shape in numpy order (outermost first), set from dims

    def __post_init__(self):
        self.shape = self.dims[::-1]


@dataclass
class GGUFHeader:
    path: str
    version: int
    kv: list = field(default_factory=list)  # [key, type, value] in file order, JSON form (formats.md)
    tensors: list = field(default_factory=list)  # TensorInfo in file order
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0  # absolute start of the data section
    file_size: int = 0


# ---- the pre-scan ---------------------------------------------------------------------


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.items = 0  # array items read so far, against MAX_ARRAY_ITEMS

    def fail(self, msg: str, tensor: str | None = None) -> FileFormatError:
        return FileFormatError(msg, file=self.path, tensor=tensor)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, but the file has only "
                            f"{self.size - self.pos} left (truncated or corrupt)")

    def unpack(self, code: str, what: str):
        n = struct.calcsize("<" + code)
        self.need(n, what)
        v = struct.unpack_from("<" + code, self.buf, self.pos)[0]
        self.pos += n
        return v

    def raw_string(self, what: str, limit: int | None = None) -> bytes:
        n = self.unpack("Q", f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long; at most {limit} are allowed")
        self.need(n, f"{what} ({n} bytes)")
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def name(self, what: str) -> str:
        """A key or tensor name: a string of at most MAX_NAME_BYTES that must be UTF-8."""
        b = self.raw_string(what, MAX_NAME_BYTES)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8: {b[:40]!r}") from None


def _string_json(b: bytes):
    """A GGUF string in JSON form: the text if it is UTF-8, else {"hex": ...} (exact bytes)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": b.hex()}


def _float_json(v: float, bits: int, code: str):
    """A float exactly: a JSON number if finite, else its IEEE bits as a hex string (keeps NaN payloads)."""
    if math.isfinite(v):
        return v
    return f"0x{bits:0{8 if code == 'f' else 16}x}"


def _read_scalar(cur: _Cursor, vtype: int, what: str):
    name, code = _SCALARS[vtype]
    if code in "fd":
        bcode = "I" if code == "f" else "Q"
        bits = cur.unpack(bcode, what)
        return _float_json(struct.unpack("<" + code, struct.pack("<" + bcode, bits))[0], bits, code)
    v = cur.unpack(code, what)
    if name == "BOOL" and v > 1:
        raise cur.fail(f"{what}: a BOOL must be 0 or 1, found {v}")
    return bool(v) if name == "BOOL" else v


def _read_array(cur: _Cursor, what: str, depth: int):
    """An array's (item type name, items in JSON form); inner arrays become [type, items] pairs."""
    if depth > MAX_ARRAY_DEPTH:
        raise cur.fail(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
    itype = cur.unpack("I", f"the item type of {what}")
    if itype not in TYPE_NAMES:
        raise cur.fail(f"{what}: unknown array item type {itype} (known: 0-12)")
    count = cur.unpack("Q", f"the length of {what}")
    if count > (cur.size - cur.pos) // _MIN_ITEM[itype]:
        raise cur.fail(f"{what}: array of {count} {TYPE_NAMES[itype]} items cannot fit in the "
                       f"{cur.size - cur.pos} bytes left in the file")
    cur.items += count
    if cur.items > MAX_ARRAY_ITEMS:
        raise cur.fail(f"{what}: the key-values hold more than {MAX_ARRAY_ITEMS} array items in all")
    if itype in _SCALARS:
        name, code = _SCALARS[itype]
        dt = np.dtype("<" + code)
        a = np.frombuffer(cur.buf, dtype=dt, count=count, offset=cur.pos)
        cur.pos += count * dt.itemsize
        if name == "BOOL":
            if count and a.max() > 1:
                raise cur.fail(f"{what}: a BOOL must be 0 or 1, found {int(a.max())}")
            return name, [bool(x) for x in a.tolist()]
        if code in "fd" and count and not np.isfinite(a).all():
            bits = a.view("<u4" if code == "f" else "<u8").tolist()
            return name, [_float_json(x, b, code) for x, b in zip(a.tolist(), bits, strict=True)]
        return name, a.tolist()
    if itype == STRING:
        # The hot loop of real files (tokenizer vocabularies): kept inline and lean.
        buf, size, pos = cur.buf, cur.size, cur.pos
        unpack_from = struct.unpack_from
        items: list[object] = []  # str, or {"hex": ...} for bytes that are not UTF-8
        for i in range(count):
            if size - pos < 8:
                cur.pos = pos
                cur.need(8, f"the length of item {i} of {what}")
            n = unpack_from("<Q", buf, pos)[0]
            pos += 8
            if n > size - pos:
                cur.pos = pos
                cur.need(n, f"item {i} of {what} ({n} bytes)")
            b = bytes(buf[pos : pos + n])
            pos += n
            try:
                items.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                items.append({"hex": b.hex()})
        cur.pos = pos
        return "STRING", items
    items = []
    for i in range(count):
        t, v = _read_array(cur, f"item {i} of {what}", depth + 1)
        items.append([f"ARRAY[{t}]", v])
    return "ARRAY", items


def _read_value(cur: _Cursor, vtype: int, key: str):
    what = f"the value of key {key!r}"
    if vtype in _SCALARS:
        return _SCALARS[vtype][0], _read_scalar(cur, vtype, what)
    if vtype == STRING:
        return "STRING", _string_json(cur.raw_string(what))
    t, v = _read_array(cur, what, 1)
    return f"ARRAY[{t}]", v


_INFO = {n: struct.Struct(f"<{n}QIQ") for n in range(1, MAX_DIMS + 1)}
_U64, _U32 = struct.Struct("<Q"), struct.Struct("<I")


def _scan(buf, size: int, path: str) -> GGUFHeader:
    cur = _Cursor(buf, size, path)
    cur.need(4, "the GGUF magic")
    magic = bytes(buf[0:4])
    if magic != MAGIC:
        raise cur.fail(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    cur.pos = 4
    version = cur.unpack("I", "the GGUF version")
    if version not in VERSIONS:
        if struct.unpack(">I", struct.pack("<I", version))[0] in VERSIONS:
            raise cur.fail("big-endian GGUF files are not supported (only little-endian)")
        raise cur.fail(f"GGUF version {version} is not supported (supported: 2, 3)")
    n_tensors = cur.unpack("Q", "the tensor count")
    n_kv = cur.unpack("Q", "the key-value count")
    # Each key-value takes at least 13 bytes (key length, type, a 1-byte value); each
    # tensor info at least 32 (name length, n_dims, one dim, type, offset).
    left = size - cur.pos
    if n_kv > MAX_KV:
        raise cur.fail(f"the header declares {n_kv} key-values; at most {MAX_KV} are accepted")
    if n_tensors > MAX_TENSORS:
        raise cur.fail(f"the header declares {n_tensors} tensors; at most {MAX_TENSORS} are accepted")
    if n_kv > left // 13:
        raise cur.fail(f"the header declares {n_kv} key-values, more than the {left} bytes left can hold")
    if n_tensors > (left - 13 * n_kv) // 32:
        raise cur.fail(f"the header declares {n_tensors} tensors, more than the {left} bytes left can hold")
    hdr = GGUFHeader(path=path, version=version, file_size=size)
    seen = set()
    for i in range(n_kv):
        key = cur.name(f"the key of key-value {i}")
        if not key:
            raise cur.fail(f"key-value {i} has an empty key")
        if key in seen:
            raise cur.fail(f"key {key!r} appears twice")
        seen.add(key)
        vtype = cur.unpack("I", f"the value type of key {key!r}")
        if vtype not in TYPE_NAMES:
            raise cur.fail(f"key {key!r}: unknown value type {vtype} (known: 0-12)")
        t, v = _read_value(cur, vtype, key)
        hdr.kv.append([key, t, v])
        if key == "general.alignment":
            if t != "UINT32":
                raise cur.fail(f"key 'general.alignment' must be a UINT32, found {t}")
            if not (1 <= v <= MAX_ALIGNMENT) or v & (v - 1):
                raise cur.fail(f"general.alignment {v} must be a power of two from 1 to {MAX_ALIGNMENT}")
            hdr.alignment = v

    sizes = _ggml_sizes()
    names = set()
    for i in range(n_tensors):
        # Fast path (a million tiny tensors cost ~1 us each here): name length, name and dimension
        # count read directly when they are in the file and valid; else the cursor's reads, whose
        # messages say what is wrong.
        pos = cur.pos
        n = _U64.unpack_from(buf, pos)[0] if size - pos >= 8 else -1
        if 0 <= n <= MAX_NAME_BYTES and size - pos - 8 - n >= 4:
            try:
                name = str(buf[pos + 8 : pos + 8 + n], "utf-8")
            except UnicodeDecodeError:
                name = cur.name(f"the name of tensor {i}")  # raises, naming the bytes
            n_dims = _U32.unpack_from(buf, pos + 8 + n)[0]
            cur.pos = pos + 12 + n
        else:
            name = cur.name(f"the name of tensor {i}")
            n_dims = cur.unpack("I", f"the dimension count of tensor {name!r}")
        if name in names:
            raise cur.fail("two tensors have this name", tensor=name)
        names.add(name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"{n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}", tensor=name)
        # the dims, type and offset in one unpack: files with a million tiny tensors exist
        cur.need(8 * n_dims + 12, f"the dimensions, type and offset of tensor {name!r}")
        *dl, gtype, offset = _INFO[n_dims].unpack_from(buf, cur.pos)
        cur.pos += 8 * n_dims + 12
        dims = tuple(dl)
        if min(dims) < 1:
            raise cur.fail(f"dimensions {list(dims)} include 0 (each must be at least 1)", tensor=name)
        numel = 1
        for d in dims:
            numel *= d
        if numel > MAX_ELEMENTS:
            raise cur.fail(f"dimensions {list(dims)} give {numel} elements, more than 2**40", tensor=name)
        if gtype not in sizes:
            raise cur.fail(f"unknown ggml type {gtype}", tensor=name)
        tname, bs, ts = sizes[gtype]
        if dims[0] % bs:
            raise cur.fail(f"{tname} stores blocks of {bs} along the innermost dimension, "
                           f"which is {dims[0]} (dimensions {list(dims)})", tensor=name)
        hdr.tensors.append(TensorInfo(name, dims, gtype, tname, offset, numel // bs * ts))

    align = hdr.alignment
    hdr.data_offset = -(-cur.pos // align) * align
    data_size = size - hdr.data_offset
    if hdr.tensors and data_size < 0:
        raise cur.fail(f"the file ends at byte {size}, before its data section (at byte {hdr.data_offset})")
    prev = None
    for t in sorted(hdr.tensors, key=lambda t: t.offset):
        if t.offset % align:
            raise cur.fail(f"data offset {t.offset} is not a multiple of the alignment {align}",
                           tensor=t.name)
        if t.nbytes > data_size - t.offset:
            raise cur.fail(f"its {t.nbytes} bytes of {t.type_name} data at offset {t.offset} run past "
                           f"the end of the file (data section of {max(data_size, 0)} bytes)", tensor=t.name)
        if prev is not None and t.offset < prev.offset + prev.nbytes:
            raise cur.fail(f"its data (offset {t.offset}, {t.nbytes} bytes) overlaps tensor "
                           f"{prev.name!r} (offset {prev.offset}, {prev.nbytes} bytes)", tensor=t.name)
        prev = t
    return hdr


def _map(path) -> tuple[mmap.mmap | None, int]:
    require_regular(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return None, 0
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except OSError as e:
        raise FileFormatError(f"cannot read: {e.strerror or e}", file=str(path)) from None


def scan_gguf_bytes(blob: bytes, name: str = "<bytes>") -> GGUFHeader:
    """scan_gguf on a GGUF file's bytes in memory (for tests and fuzzing)."""
    return _scan(blob, len(blob), name)


def scan_gguf(path) -> GGUFHeader:
    """Parse and check a GGUF file's header without trusting it; FileFormatError if invalid.

    Time and memory are linear in the file size; nothing beyond the header is read.
    """
    m, size = _map(path)
    try:
        return _scan(m if m is not None else b"", size, str(path))
    finally:
        if m is not None:
            # An error raised mid-array leaves a numpy view of the map in its traceback;
            # then the map is released with that view instead.
            with contextlib.suppress(BufferError):
                m.close()


# ---- the reader -----------------------------------------------------------------------


def ggml_formats() -> dict[str, Format]:
    """ggml type name -> the registered Format whose bytes are that type's bytes (its `ggml_type`),
    when its block geometry matches ggml's for that type."""
    from ..plugins import formats

    out: dict[str, Format] = {}
    for fmt in formats().values():
        name = fmt.ggml_type
        if name is not None and name not in out and _stores_ggml(fmt, name):
            out[name] = fmt
    return out


def ggml_format(name: str) -> Format | None:
    """ggml_formats().get(name), importing only the built-in module that declares `name` as a tag or
    alias when it is that type's format (every built-in answers to its ggml name, and built-ins come
    first in registration order, so it is the one ggml_formats() would pick); else from every format."""
    from ..plugins import BUILTIN_PACKAGE, find_format

    fmt = find_format(name)
    if fmt is not None and fmt.plugin.startswith(BUILTIN_PACKAGE + ".") and _stores_ggml(fmt, name):
        return fmt
    return ggml_formats().get(name)


def ggml_name_of(tag: str) -> str | None:
    """The ggml type whose bytes format `tag` stores (its GGUF type), or None; loads only what it takes."""
    from ..plugins import find_format

    fmt = find_format(tag)
    name = fmt.ggml_type if fmt is not None else None
    return name if name is not None and ggml_format(name) is fmt else None


def _stores_ggml(fmt: Format, name: str) -> bool:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if fmt.ggml_type != name or name not in GGMLQuantizationType.__members__:
        return False
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    return tuple(fmt.block_shape) == (1, bs) and fmt.block_bytes == ts


def read_gguf(path, *, unsupported: str | None = None):
    """Open a GGUF file as a Model whose tensors are zero-copy views of the mapped file.

    unsupported="error": a tensor of a ggml type with no quantfmt format is an error;
    "dequantize": such tensors are dequantized to F32 with gguf.quants.dequantize (listed in
    metadata["gguf"]["dequantized"]). None (the default): the environment variable
    QUANTFMT_GGUF_UNSUPPORTED if set (how CLI users choose), else "error".
    Close the Model (or use `with`) to release the map.
    """

    if unsupported is None:
        unsupported = os.environ.get(UNSUPPORTED_ENV) or "error"
    if unsupported not in ("error", "dequantize"):
        raise QuantfmtError(f"unsupported={unsupported!r} (or {UNSUPPORTED_ENV}): expected 'error' or "
                            "'dequantize'", file=str(path))
    one = isinstance(path, _OneSplit)
    path = str(path)
    with paused():  # a header of 2**20 tiny tensors: millions of small objects, no cycles (gcpause.py)
        return _read(path, unsupported, one)


def _read(path: str, unsupported: str, one: bool):
    from ..tensor import Model, TensorSource

    hdr = scan_gguf(path)
    n_split = _kv_value(hdr.kv, "split.count")
    if isinstance(n_split, int) and n_split > 1 and not one:
        return _read_splits(path, hdr, unsupported)
    fmts = {n: ggml_format(n) for n in dict.fromkeys(t.type_name for t in hdr.tensors)}  # only the types used
    bad = [t for t in hdr.tensors if fmts[t.type_name] is None]
    if bad and unsupported == "error":
        listed = ", ".join(f"{t.name} ({t.type_name})" for t in bad[:8])
        listed += ", ..." if len(bad) > 8 else ""
        have = ", ".join(ggml_formats())
        raise FileFormatError(
            f"{len(bad)} tensor(s) have a ggml type with no quantfmt format: {listed}. Supported ggml "
            f"types: {have}. To convert them to F32 instead, pass unsupported='dequantize' (from the "
            f"command line: `quantfmt --gguf-unsupported dequantize ...`, or set {UNSUPPORTED_ENV}=dequantize)",
            file=path)
    for t in {t.type_name: t for t in bad}.values():
        _dequantize(np.zeros(0, np.uint8), t, path, probe=True)  # a clear error now, not when used
    tensors, dequantized = {}, {}
    flat, close = np.zeros(0, np.uint8), (lambda: None)
    if hdr.tensors:
        # One read-only map, like the container's, so streaming conversion can release pages as it goes.
        flat, close = map_readonly(path, expect_size=hdr.file_size)
    for t in hdr.tensors:
        start = hdr.data_offset + t.offset
        fmt = fmts[t.type_name]
        if fmt is not None:
            tensors[t.name] = TensorSource(t.name, fmt.tag, t.shape, t.nbytes, _View(flat, start, start + t.nbytes),
                                           path)
        else:  # decoded only when used, never at open
            def decode(a: int = start, info: TensorInfo = t) -> np.ndarray:
                return _dequantize(flat[a : a + info.nbytes], info, path)

            tensors[t.name] = TensorSource(t.name, "F32", t.shape, 4 * math.prod(t.shape), decode, path)
            dequantized[t.name] = t.type_name
    meta = {
        "gguf": {
            "version": hdr.version,
            "alignment": hdr.alignment,
            "kv": hdr.kv,
            "tensor_order": [t.name for t in hdr.tensors],
        }
    }
    if dequantized:
        meta["gguf"]["dequantized"] = dequantized

    return Model(tensors, meta, path=path, closers=[close])


class _View:
    """load() of a tensor stored as it is: its bytes, a view of the file's map. A slotted object, not a
    closure (a function and its defaults per tensor: ~200 bytes more on a file of 2**20 tensors)."""

    __slots__ = ("flat", "start", "stop")

    def __init__(self, flat: np.ndarray, start: int, stop: int):
        self.flat, self.start, self.stop = flat, start, stop

    def __call__(self) -> np.ndarray:
        return self.flat[self.start : self.stop]


def _kv_value(kv: list, key: str):
    return next((e[2] for e in kv if e[0] == key), None)


SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def split_path(path, k: int, n: int) -> str:
    """The k-th (from 1) of n split files of the output `path` ("model.gguf" -> "model-00001-of-00003.gguf")."""
    p = str(path)
    return f"{p[:-5] if p.endswith('.gguf') else p}-{k:05d}-of-{n:05d}.gguf"


def _read_splits(path: str, hdr: GGUFHeader, unsupported: str):
    """All the split files `path` belongs to, as one Model: tensors from each, key-values from the first."""
    from ..tensor import Model

    n = _kv_value(hdr.kv, "split.count")
    files = gguf_split_files(path)
    if files is None or len(files) != n:
        raise FileFormatError(f"is split {_kv_value(hdr.kv, 'split.no')} of {n} (split.count), but its name "
                              "is not NAME-0000K-of-0000N.gguf, so the other splits cannot be found", file=path)
    tensors, closers, order, kv = {}, [], [], None
    try:
        for k, f in enumerate(files):
            if not os.path.exists(f):
                raise FileFormatError(f"split {k + 1} of {n} of {path} is missing", file=f)
            h = scan_gguf(f)
            got = (_kv_value(h.kv, "split.no"), _kv_value(h.kv, "split.count"))
            if got != (k, n):
                raise FileFormatError(f"holds split.no {got[0]} of split.count {got[1]}; expected split {k} of {n} "
                                      "(from its name)", file=f)
            m = read_gguf(_OneSplit(f), unsupported=unsupported)
            closers.append(m.close)
            for t in m.sources():
                if t.name in tensors:
                    raise FileFormatError("is in two splits", file=f, tensor=t.name)
                tensors[t.name] = t
            order += m.metadata["gguf"]["tensor_order"]
            if k == 0:
                kv = [e for e in m.metadata["gguf"]["kv"] if e[0] not in SPLIT_KEYS]
                meta = m.metadata
        total = _kv_value(hdr.kv, "split.tensors.count")
        if total is not None and total != len(tensors):
            raise FileFormatError(f"the {n} splits hold {len(tensors)} tensors, but split.tensors.count says {total}",
                                  file=path)
    except BaseException:
        for c in closers:
            c()
        raise
    g = dict(meta["gguf"])
    g.update(kv=kv, tensor_order=order)
    return Model(tensors, {**meta, "gguf": g}, path=files[0], closers=closers)


def one_file(metadata: dict | None) -> dict | None:
    """`metadata` for a GGUF written as one file: without the split keys (`SPLIT_KEYS`), which describe
    a set of split files and which the writer of splits sets itself. Kept, they made a file that says it
    is split k of n, which readers (quantfmt's, llama.cpp's) then look for its siblings for."""
    g = (metadata or {}).get("gguf") if isinstance(metadata, dict) else None
    if not isinstance(g, dict) or not isinstance(g.get("kv"), list):
        return metadata
    kv = [e for e in g["kv"] if not (isinstance(e, (list, tuple)) and e and e[0] in SPLIT_KEYS)]
    return metadata if len(kv) == len(g["kv"]) else {**(metadata or {}), "gguf": {**g, "kv": kv}}


class _OneSplit(str):
    """A split's path, read as one file (read_gguf does not follow split.count from it)."""


def split_layouts(path, plans, metadata: dict | None, max_bytes: int) -> list[tuple[str, GGUFLayout]]:
    """The split files of `path` (as llama.cpp's gguf-split writes them) for the tensors of `plans`:
    greedy in tensor order, each file's tensor data at most `max_bytes` (a tensor larger than that
    alone); the first file carries every key-value. Deterministic: same plans, same bytes."""
    full = gguf_layout(path, plans, metadata)  # validates, and gives the tensor order
    g = dict((metadata or {}).get("gguf") or {})
    kv = [e for e in g.get("kv", []) if not (isinstance(e, (list, tuple)) and e and e[0] in SPLIT_KEYS)]
    ranges = split(full.sizes, max_bytes)
    by_name = {p.name: p for p in plans}
    out = []
    for k, r in enumerate(ranges):
        names = full.order[r.start:r.stop]
        split_kv = [["split.no", "UINT16", k], ["split.count", "UINT16", len(ranges)],
                    ["split.tensors.count", "INT32", len(full.order)]]
        meta = {"gguf": {**g, "kv": (kv if k == 0 else []) + split_kv, "tensor_order": names}}
        p = split_path(path, k + 1, len(ranges))
        out.append((p, gguf_layout(p, [by_name[n] for n in names], meta)))
    return out


def _dequantize(raw: np.ndarray, t: TensorInfo, path: str, probe: bool = False) -> np.ndarray:
    """Tensor t's data decoded to F32 bytes by the gguf package; probe=True: only check it can."""
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType(t.ggml_type)
    bs, ts = GGML_QUANT_SIZES[qtype]
    rows = t.nbytes // (t.dims[0] // bs * ts)
    if probe:
        raw, rows = np.zeros(ts, np.uint8), 1
    try:
        with np.errstate(all="ignore"):
            w = quants.dequantize(raw.reshape(rows, -1), qtype)
            if probe:
                return w
    except NotImplementedError:
        raise FileFormatError(f"the gguf package cannot dequantize ggml type {t.type_name}",
                              file=path, tensor=t.name) from None
    w = np.asarray(w, dtype=np.float32).reshape(t.shape)
    if not np.isfinite(w).all():
        raise FileFormatError(f"dequantizing its {t.type_name} data gives non-finite values",
                              file=path, tensor=t.name)
    return np.ascontiguousarray(w, dtype="<f4").reshape(-1).view(np.uint8)


# ---- the writer -----------------------------------------------------------------------


def _bad_meta(msg: str) -> FileFormatError:
    return FileFormatError(f"cannot write GGUF: metadata['gguf'] {msg}")


def _pack_scalar(tname: str, v, key: str) -> bytes:
    code = dict(_SCALARS.values())[tname]
    if tname == "BOOL":
        if not isinstance(v, bool):
            raise _bad_meta(f"key {key!r}: BOOL value {v!r} is not true/false")
        return struct.pack("<B", v)
    if tname in ("FLOAT32", "FLOAT64"):
        if isinstance(v, str):
            try:
                bits = int(v, 16)
                return struct.pack("<I" if code == "f" else "<Q", bits)
            except (ValueError, struct.error):
                raise _bad_meta(f"key {key!r}: {tname} value {v!r} is neither a number nor "
                                "IEEE bits in hex") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _bad_meta(f"key {key!r}: {tname} value {v!r} is not a number")
        if code == "f" and math.isfinite(v) and abs(v) > 3.4028234663852886e38:
            raise _bad_meta(f"key {key!r}: {v!r} does not fit a FLOAT32")
        return struct.pack("<" + code, v)
    lo, hi = _INT_RANGES[tname]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad_meta(f"key {key!r}: {tname} value {v!r} is not an integer in [{lo}, {hi}]")
    return struct.pack("<" + code, v)


def _pack_string(v, key: str) -> bytes:
    if isinstance(v, str):
        try:
            b = v.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad_meta(f"key {key!r}: string {v!r:.60} cannot be encoded as UTF-8") from None
    elif isinstance(v, dict) and set(v) == {"hex"} and isinstance(v["hex"], str):
        try:
            b = bytes.fromhex(v["hex"])
        except ValueError:
            raise _bad_meta(f"key {key!r}: {v!r} is not valid hex") from None
    else:
        raise _bad_meta(f"key {key!r}: STRING value {v!r} is neither a string nor {{'hex': ...}}")
    return struct.pack("<Q", len(b)) + b


def _pack_array(tname: str, v, key: str, out: list, depth: int = 1) -> None:
    if depth > MAX_ARRAY_DEPTH:
        raise _bad_meta(f"key {key!r}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
    if not (tname.startswith("ARRAY[") and tname.endswith("]")):
        raise _bad_meta(f"key {key!r}: {tname!r} is not an array type")
    item = tname[6:-1]
    if item not in TYPE_IDS or not isinstance(v, list):
        raise _bad_meta(f"key {key!r}: bad array type {tname!r} or value not a list")
    out.append(struct.pack("<IQ", TYPE_IDS[item], len(v)))
    if item in ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64") and v:
        lo, hi = _INT_RANGES[item]
        if not all(type(x) is int and lo <= x <= hi for x in v):
            raise _bad_meta(f"key {key!r}: an item of the {tname} is not an integer in [{lo}, {hi}]")
        out.append(np.array(v, dtype="<" + dict(_SCALARS.values())[item]).tobytes())
    elif item in ("FLOAT32", "FLOAT64", "BOOL"):
        out.extend(_pack_scalar(item, x, key) for x in v)
    elif item == "STRING":
        out.extend(_pack_string(x, key) for x in v)
    else:
        for x in v:
            if not (isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)):
                raise _bad_meta(f"key {key!r}: an inner array is not a [type, items] pair")
            _pack_array(x[0], x[1], key, out, depth + 1)


def _pack_kv(entry) -> bytes:
    if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)
            and isinstance(entry[1], str)):
        raise _bad_meta(f"kv entry {entry!r:.80} is not a [key, type, value] triple")
    key, tname, v = entry
    head = _pack_string(key, key)
    if tname in ("STRING",):
        return head + struct.pack("<I", STRING) + _pack_string(v, key)
    if tname.startswith("ARRAY"):
        out = [head, struct.pack("<I", ARRAY)]
        _pack_array(tname, v, key, out)
        return b"".join(out)
    if tname not in TYPE_IDS:
        raise _bad_meta(f"key {key!r}: unknown value type {tname!r}")
    return head + struct.pack("<I", TYPE_IDS[tname]) + _pack_scalar(tname, v, key)


def write_gguf(path, model, *, overwrite: bool = False, metadata: dict | None = None) -> None:
    """Write `model` as a GGUF file (version 3 unless the metadata says otherwise).

    Tensors whose format has a ggml type are written byte for byte; any other tag is refused,
    listing the tensors. Key-values come from `metadata` (default
    model.metadata), key "gguf", in the JSON form read_gguf produces, with their types.
    Tensors are written in the recorded tensor_order, then any others in model order.
    """
    from .files import plans_from_model

    inputs = input_files(model.path) if getattr(model, "path", None) else []  # every shard, not only the index
    write_gguf_plans(path, plans_from_model(model), metadata=model.metadata if metadata is None else metadata,
                     overwrite=overwrite, inputs=inputs)


@dataclass(frozen=True)
class GGUFLayout:
    """Where everything of a GGUF file goes, from tags and shapes alone (no tensor produced)."""

    header: bytes  # magic, key-values, tensor infos and the padding up to the data section
    order: list[str]  # tensor names in file order
    offsets: list[int]  # absolute file offset of each tensor's bytes
    sizes: list[int]
    align: int
    size: int  # the whole file


def gguf_layout(path, plans, metadata: dict | None = None) -> GGUFLayout:
    """The layout write_gguf_plans gives `plans` (errors name `path`): writers that place each
    tensor's bytes at these offsets, in any order, make the same file byte for byte."""
    from gguf.constants import GGMLQuantizationType

    from ..plugins import get_format

    file = str(path)
    g = metadata.get("gguf") if isinstance(metadata, dict) else None
    if g is None:
        g = {}
    if not isinstance(g, dict):
        raise _bad_meta("is not a JSON object")
    by_name = {}
    for p in plans:
        if not isinstance(p.name, str) or p.name in by_name:
            raise FileFormatError(f"cannot write GGUF: invalid or duplicate tensor name {p.name!r}",
                                  file=file)
        by_name[p.name] = p
    # The format of each distinct tag, asked of the registry once (not per tensor: 2**20 tiny tensors)
    fmt_of = {t: get_format(t) for t in {p.tag for p in plans}}
    type_of = {f.tag: ggml_name_of(t) for t, f in fmt_of.items()}  # tag -> its ggml type or None
    bad = [(p.name, p.tag) for p in plans if type_of[fmt_of[p.tag].tag] is None]
    ggml_of = {t: n for t, n in type_of.items() if n is not None}
    if bad:
        can_hold = {f.tag: name for name, f in ggml_formats().items()}
        listed = ", ".join(f"{n} ({t})" for n, t in bad[:10])
        listed += f", and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise FileFormatError(
            f"cannot write GGUF: {len(bad)} tensor(s) have formats with no ggml type: {listed}. "
            f"GGUF can hold {', '.join(can_hold)}; requantize those tensors to one of them first",
            file=file)
    version = g.get("version", 3)
    if version not in VERSIONS:
        raise _bad_meta(f"version {version!r} is not 2 or 3")
    kv = list(g.get("kv", []))
    align = DEFAULT_ALIGNMENT
    for e in kv:
        if isinstance(e, (list, tuple)) and len(e) == 3 and e[0] == "general.alignment":
            align = e[2]
            if (e[1] != "UINT32" or type(align) is not int or not 1 <= align <= MAX_ALIGNMENT
                    or align & (align - 1)):
                raise _bad_meta(f"general.alignment {e[1]} {align!r} is not a UINT32 power of two "
                                f"up to {MAX_ALIGNMENT}")
    if len({e[0] for e in kv if isinstance(e, (list, tuple)) and e}) != len(kv):
        raise _bad_meta("kv has duplicate or malformed keys")
    order = [n for n in g.get("tensor_order", []) if isinstance(n, str) and n in by_name]
    order = list(dict.fromkeys(order + list(by_name)))

    parts = [MAGIC, struct.pack("<IQQ", version, len(order), len(kv))]
    parts.extend(_pack_kv(e) for e in kv)
    offset = 0
    rel, sizes = [], []
    # Per (tag, shape), computed once: the byte count and the packed dims and type that precede the
    # offset in a tensor info. One try around the loop names the failing tensor (no context per tensor).
    known: dict[tuple, tuple[int, bytes]] = {}
    offset_of = struct.Struct("<Q").pack
    name = None
    try:
        for name in order:
            p = by_name[name]
            key = (p.tag, p.shape if type(p.shape) is tuple else tuple(p.shape))
            got = known.get(key)
            if got is None:
                shape = tuple(int(d) for d in p.shape)
                if not 1 <= len(shape) <= MAX_DIMS or min(shape) < 1:
                    raise FileFormatError(f"cannot write GGUF: shape {shape} is not 1 to {MAX_DIMS} dimensions "
                                          "each at least 1", file=file, tensor=name)
                fmt = fmt_of[p.tag]
                gtype = int(GGMLQuantizationType[ggml_of[fmt.tag]])
                got = known[key] = (fmt.nbytes(shape), struct.pack(f"<I{len(shape)}QI", len(shape),
                                                                   *reversed(shape), gtype))
            n, info = got
            parts.append(_pack_string(name, name))
            parts.append(info + offset_of(offset))
            rel.append(offset)
            sizes.append(n)
            offset += -(-n // align) * align
    except QuantfmtError as e:
        if e.file is None:
            e.file = file
        if e.tensor is None:
            e.tensor = name
        raise
    header = b"".join(parts)
    header += b"\0" * (-len(header) % align)
    return GGUFLayout(header, order, [len(header) + o for o in rel], sizes, align, len(header) + offset)


def write_gguf_plans(path, plans, *, metadata: dict | None = None, overwrite: bool = False, inputs=(),
                     progress=None) -> None:
    """write_gguf, streaming: `plans` are container.TensorPlan (name, tag, shape, produce, after);
    the header is written from tags and shapes, then each tensor is produced and written in
    turn, so memory holds one tensor at a time. `progress(nbytes)` after each tensor."""
    file = str(path)
    lay = gguf_layout(path, plans, one_file(metadata))
    by_name = {p.name: p for p in plans}
    with context(file=file), atomic_output(path, overwrite=overwrite, inputs=inputs) as tmp, \
            open_for_write(tmp) as f:
        write(f, lay.header)
        write_stream(f, [by_name[n] for n in lay.order], lay.sizes, align=lay.align, progress=progress)
