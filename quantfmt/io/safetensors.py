"""The quantfmt container: a plain safetensors file where every tensor carries its own format.

Layout (formats.md, section "The container", is the normative text):

    u64 little-endian N | N bytes of UTF-8 JSON header | data region

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the data region) and may hold "__metadata__", a {str: str} map. Float tensors
(tags F32, F16, BF16) are ordinary safetensors tensors of that dtype. Every other tensor is
stored as its format's bytes, dtype "U8", shape [nbytes]; its tag, layout version and logical
shape are in the JSON document kept as a string under __metadata__["quantfmt"]:

    {"container_version": 1,
     "tensors": {name: {"tag": "Q4_0", "layout_version": 1, "shape": [4096, 4096]}},
     "recipe": {...} or null, "metadata": {...model metadata...}}

So any safetensors reader lists and reads every tensor; quantfmt reads them back as QTensors.

This module owns: parsing and validating a header before anything in it is trusted, opening
a file lazily (one read-only memory map; each tensor a source whose bytes are a zero-copy view
of it), and writing: the header from tags and shapes, then one tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np

from ..errors import FileFormatError, QuantfmtError, UnknownFormatError, context
from ..format import MAX_ELEMENTS, TAG_RE
from ..gcpause import paused
from ..plugins import get_format
from .files import (
    TensorPlan,
    atomic_output,
    flush,
    map_readonly,
    open_for_write,
    require_regular,
    write,
    write_stream,
)

CONTAINER_VERSION = 1
META_KEY = "quantfmt"  # the __metadata__ key holding quantfmt's JSON document
RECIPE_KEY = "quantfmt.recipe"  # Model.metadata key of the recipe a file was made with
# The same cap as the safetensors library: a header is small; a hostile length prefix must
# not make us read (or allocate) gigabytes before we can say the file is bad.
MAX_HEADER_BYTES = 100_000_000
MAX_RANK = 64
#: Tensors in one header: the GGUF reader's cap, far above real checkpoints (thousands).
MAX_TENSORS = 1 << 20
# What the JSON of a header may hold, by its tensor count T (counted before parsing as occurrences of
# '"data_offsets"', an upper bound): a tensor entry is one object with two arrays and four keys (with
# its name), and its quantfmt document entry (an escaped JSON string in __metadata__, whose brackets
# and colons are in the same bytes) one object, one array and four keys. METADATA_JSON_SLACK more of
# each cover the model metadata (GGUF key-values with a vocabulary: a few thousand). Counting "{", "["
# and ":" bytes over-counts those inside strings, so the caps are upper bounds with room to spare.
# Parsing builds objects, so this is what bounds its cost: 99 MB of "{}" or of metadata keys would
# otherwise take seconds and GBs before any check could say the file is bad.
CONTAINERS_PER_TENSOR = 5
KEYS_PER_TENSOR = 8
METADATA_JSON_SLACK = 1 << 20
# Tensors whose dtype *is* their format: stored natively so plain safetensors readers see floats.
NATIVE_TAGS = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL")
# Every dtype the safetensors library knows, with its size in bytes (so a foreign file parses
# and gets a precise error if it holds a dtype quantfmt cannot represent).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# ---- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One validated header entry: where a tensor's bytes are and what they are."""

    name: str
    dtype: str  # the safetensors dtype
    shape: tuple[int, ...]  # the logical shape (for quantized tensors: from the quantfmt document)
    begin: int  # absolute file offsets
    end: int
    tag: str  # the quantfmt format tag

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    entries: list[Entry]  # in data order
    metadata: dict  # model metadata (the document's "metadata", plus foreign __metadata__ keys)
    recipe: dict | None
    data_start: int


def _no_duplicates(pairs):
    d = dict(pairs)  # one dict per JSON object (not a second one to look for duplicates): a C loop
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _Dup(k)
            seen.add(k)
    return d


def _check_size(raw: bytes, file: str) -> None:
    """Refuse, before parsing, a header whose JSON holds more objects/arrays or keys than its tensor
    count needs (see CONTAINERS_PER_TENSOR); FileFormatError naming the count and the limit."""
    tensors = raw.count(b'"data_offsets"')
    if tensors > MAX_TENSORS + 1:  # +1: the name may occur in metadata text
        raise FileFormatError(f"header describes more than {MAX_TENSORS} tensors ({tensors} 'data_offsets' keys); "
                              f"at most {MAX_TENSORS} are accepted", file=file)
    containers = raw.count(b"{") + raw.count(b"[")
    limit = CONTAINERS_PER_TENSOR * tensors + METADATA_JSON_SLACK
    if containers > limit:
        raise FileFormatError(f"header holds up to {containers} JSON objects and arrays for {tensors} tensors; at "
                              f"most {limit} are accepted ({CONTAINERS_PER_TENSOR} per tensor + "
                              f"{METADATA_JSON_SLACK} for metadata): refusing to parse it", file=file)
    keys = raw.count(b":")
    limit = KEYS_PER_TENSOR * tensors + METADATA_JSON_SLACK
    if keys > limit:
        raise FileFormatError(f"header holds up to {keys} JSON keys for {tensors} tensors; at most {limit} are "
                              f"accepted ({KEYS_PER_TENSOR} per tensor + {METADATA_JSON_SLACK} for metadata): "
                              "refusing to parse it", file=file)


class _Dup(Exception):
    def __init__(self, key):
        self.key = key


def _loads(text: str, what: str, file: str):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _Dup as e:
        raise FileFormatError(f"{what} names {e.key!r} twice (duplicate JSON key)", file=file) from None
    except RecursionError:
        raise FileFormatError(f"{what} is nested too deeply", file=file) from None
    except ValueError as e:  # JSONDecodeError, and ints too long to convert
        raise FileFormatError(f"{what} is not valid JSON: {e}", file=file) from None


def _check_text(obj, file, tensor=None, depth=0) -> None:
    """Every string in a parsed header must be encodable as UTF-8: JSON's escapes can spell a lone
    surrogate ("\\ud800"), which no writer could store again and which breaks every printer."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise FileFormatError(f"holds a string that is not valid Unicode (a lone surrogate): {obj!r:.60}",
                                  file=file, tensor=tensor) from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_text(k, file, tensor, depth + 1)
            _check_text(v, file, tensor, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_text(v, file, tensor, depth + 1)


def _int(v) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _shape(v, file, name, what="shape") -> tuple[int, ...]:
    # type(d) is int: a JSON number that is an integer (never a bool: json makes those from true/false)
    if type(v) is not list or len(v) > MAX_RANK or not all(type(d) is int and d >= 0 for d in v):
        raise FileFormatError(
            f"{what} {_short(v)} is not a list of at most {MAX_RANK} non-negative integers", file=file, tensor=name
        )
    n = 1
    for d in v:
        n *= d
        if n > MAX_ELEMENTS:
            raise FileFormatError(f"{what} {v} has more than 2**40 elements", file=file, tensor=name)
    return tuple(v)


def _short(v, limit=80) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


def read_header(path) -> Header:
    """Parse and validate the header of the safetensors file `path`; FileFormatError if anything is off.

    Reads only the header bytes; never trusts a length, offset, dtype, shape or tag before
    checking it, so a hostile file costs at most MAX_HEADER_BYTES of memory.
    """
    with paused():  # a header of 2**20 tiny tensors: millions of small objects, no cycles (gcpause.py)
        return _read_header(path)


def _read_header(path) -> Header:
    file = str(path)
    require_regular(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise FileFormatError(f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise FileFormatError(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
            if 8 + n > size:
                raise FileFormatError(f"header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except FileFormatError as e:
        e.file = file
        raise
    except IsADirectoryError:
        raise FileFormatError("is a directory, not a safetensors file", file=file) from None
    except OSError as e:
        raise FileFormatError(f"cannot read: {e.strerror or e}", file=file) from None
    if len(raw) != n:
        raise FileFormatError("file shrank while reading its header", file=file)
    _check_size(raw, file)  # before decoding: a refused header costs its bytes once
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"header is not valid UTF-8 (byte {e.start})", file=file) from None
    hdr = _loads(text, "header", file)
    if not isinstance(hdr, dict):
        raise FileFormatError(f"header is a JSON {type(hdr).__name__}, not an object", file=file)
    if "\\u" in text:  # only escapes can make a lone surrogate: skip the walk for plain headers
        _check_text(hdr, file)
    data_start = 8 + n
    data_size = size - data_start

    st_meta = hdr.pop("__metadata__", None)
    if st_meta is None:
        st_meta = {}
    if not isinstance(st_meta, dict) or not all(isinstance(v, str) for v in st_meta.values()):
        raise FileFormatError("__metadata__ must be an object of strings", file=file)

    raw_entries = []
    for name, info in hdr.items():
        if not isinstance(info, dict):
            raise FileFormatError(f"header entry is a {type(info).__name__}, not an object", file=file, tensor=name)
        extra = set(info) - {"dtype", "shape", "data_offsets"}
        missing = {"dtype", "shape", "data_offsets"} - set(info)
        if missing or extra:
            what = []
            if missing:
                what.append("missing " + ", ".join(sorted(missing)))
            if extra:
                what.append("unknown keys " + ", ".join(sorted(_short(k, 40) for k in extra)))
            raise FileFormatError("header entry " + "; ".join(what), file=file, tensor=name)
        dtype = info["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise FileFormatError(
                f"unknown dtype {_short(dtype, 40)} (known: {', '.join(DTYPE_SIZES)})", file=file, tensor=name
            )
        shape = _shape(info["shape"], file, name)
        offs = info["data_offsets"]
        if not (type(offs) is list and len(offs) == 2 and all(type(o) is int and o >= 0 for o in offs)):
            raise FileFormatError(f"data_offsets {_short(offs)} is not [begin, end] of non-negative integers",
                                  file=file, tensor=name)
        begin, end = offs
        if begin > end:
            raise FileFormatError(f"data_offsets [{begin}, {end}] end before they begin", file=file, tensor=name)
        if end > data_size:
            raise FileFormatError(
                f"data_offsets [{begin}, {end}] run past the data region ({data_size} bytes)", file=file, tensor=name
            )
        expect = DTYPE_SIZES[dtype] * math.prod(shape)
        if end - begin != expect:
            raise FileFormatError(
                f"holds {end - begin} bytes, but dtype {dtype} and shape {list(shape)} need {expect}",
                file=file, tensor=name,
            )
        raw_entries.append((begin, end, name, dtype, shape))

    # The data region must be exactly the tensors, back to back, in offset order: no gap, no
    # overlap, nothing after. (Zero-size tensors share their offset with a neighbour.)
    raw_entries.sort(key=lambda e: (e[0], e[1]))
    pos = 0
    for begin, end, name, _, _ in raw_entries:
        if begin != pos:
            problem = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise FileFormatError(f"data_offsets [{begin}, {end}] {problem} (expected to start at {pos})",
                                  file=file, tensor=name)
        pos = end
    if pos != data_size:
        raise FileFormatError(
            f"tensors cover {pos} bytes of the data region, but it holds {data_size} bytes", file=file
        )

    doc = _document(st_meta, file)
    qinfo = doc.get("tensors", {})
    for qname in qinfo:
        if qname not in hdr:
            raise FileFormatError("named in the quantfmt metadata but not in the header", file=file, tensor=qname)
    entries = []
    plain: dict[str, bool] = {}
    for begin, end, name, dtype, shape in raw_entries:
        if name in qinfo:
            tag, shape = _quantized(qinfo[name], dtype, shape, end - begin, file, name)
        elif dtype in NATIVE_TAGS:
            tag = dtype
            if tag not in plain:  # once per dtype, not per tensor: a million tiny tensors exist
                plain[tag] = get_format(tag).block_shape == (1, 1)
            try:
                if not plain[tag]:  # a (1, 1) block takes any shape _shape() accepted
                    get_format(tag).matrix_shape(shape)
            except QuantfmtError as e:
                raise FileFormatError(e.message, file=file, tensor=name) from None
        else:
            raise FileFormatError(
                f"dtype {dtype} is not a format quantfmt reads (floats F32/F16/BF16, or a tensor described in "
                "the quantfmt metadata)", file=file, tensor=name,
            )
        entries.append(Entry(name, dtype, shape, data_start + begin, data_start + end, tag))

    metadata = {k: v for k, v in st_meta.items() if k != META_KEY}
    metadata.update(doc.get("metadata") or {})
    return Header(entries, metadata, doc.get("recipe"), data_start)


def _document(st_meta: dict, file: str) -> dict:
    text = st_meta.get(META_KEY)
    if text is None:
        return {}
    doc = _loads(text, f"__metadata__[{META_KEY!r}]", file)
    if "\\u" in text:
        _check_text(doc, file)
    if not isinstance(doc, dict):
        raise FileFormatError(f"__metadata__[{META_KEY!r}] is not a JSON object", file=file)
    ver = doc.get("container_version")
    if not _int(ver):
        raise FileFormatError(f"the quantfmt metadata has no integer container_version (got {_short(ver)})", file=file)
    if ver != CONTAINER_VERSION:
        raise FileFormatError(
            f"container version {ver} is not supported: this quantfmt reads version {CONTAINER_VERSION}"
            + (" (the file was written by a newer quantfmt; upgrade)" if ver > CONTAINER_VERSION else ""),
            file=file,
        )
    if not isinstance(doc.get("tensors", {}), dict):
        raise FileFormatError("the quantfmt metadata's 'tensors' is not an object", file=file)
    if not isinstance(doc.get("metadata") or {}, dict):
        raise FileFormatError("the quantfmt metadata's 'metadata' is not an object", file=file)
    if not isinstance(doc.get("recipe") or {}, dict):
        raise FileFormatError("the quantfmt metadata's 'recipe' is not an object", file=file)
    return doc


def _quantized(info, dtype, st_shape, nbytes, file, name):
    if not isinstance(info, dict) or set(info) != {"tag", "layout_version", "shape"}:
        raise FileFormatError(
            f"quantfmt metadata entry {_short(info)} must have exactly the keys tag, layout_version, shape",
            file=file, tensor=name,
        )
    tag, ver = info["tag"], info["layout_version"]
    if dtype != "U8" or st_shape != (nbytes,):
        raise FileFormatError(
            f"a quantized tensor must be stored as dtype U8, shape [{nbytes}]; found {dtype} {list(st_shape)}",
            file=file, tensor=name,
        )
    if not isinstance(tag, str) or not _int(ver):
        raise FileFormatError(f"tag {_short(tag)} / layout_version {_short(ver)} must be a string and an integer",
                              file=file, tensor=name)
    if tag in NATIVE_TAGS:
        raise FileFormatError(f"tag {tag} must be stored as a native {tag} tensor, not as bytes",
                              file=file, tensor=name)
    if not TAG_RE.match(tag):
        raise FileFormatError(f"tag {_short(tag, 20)} is not 1-4 characters of A-Z, 0-9, _", file=file, tensor=name)
    try:
        fmt = get_format(tag)
    except UnknownFormatError:
        # Listed (name, tag, shape, bytes need only the header); using it names the missing plugin.
        return tag, _shape(info["shape"], file, name, what=f"{tag} shape")
    if ver != fmt.layout_version:
        raise FileFormatError(
            f"{tag} layout version {ver} differs from the registered {tag} format's version {fmt.layout_version} "
            f"(plugin {fmt.plugin}); refusing to misread it: use the quantfmt/plugin version that wrote the file",
            file=file, tensor=name,
        )
    shape = _shape(info["shape"], file, name, what=f"{tag} shape")
    try:
        expect = fmt.nbytes(shape)
    except QuantfmtError as e:
        raise FileFormatError(e.message, file=file, tensor=name) from None
    if expect != nbytes:
        raise FileFormatError(
            f"{tag} shape {list(shape)} needs {expect} bytes, but the file holds {nbytes}", file=file, tensor=name
        )
    return tag, shape


def open_safetensors(path):
    """Open one safetensors/quantfmt file lazily: a Model of sources whose bytes are views of a read-only map."""

    file = str(path)
    with paused():  # a header of 2**20 tiny tensors: millions of small objects, no cycles (gcpause.py)
        return _open(path, file)


def _open(path, file):
    from ..tensor import Model, TensorSource

    hdr = read_header(path)
    flat, close = map_readonly(path, expect_size=hdr.data_start + sum(e.nbytes for e in hdr.entries))
    tensors = {
        e.name: TensorSource(e.name, e.tag, e.shape, e.nbytes, (lambda b=e.begin, n=e.end: flat[b:n]), file)
        for e in hdr.entries
    }
    meta = dict(hdr.metadata)
    if hdr.recipe is not None:
        meta[RECIPE_KEY] = hdr.recipe
    return Model(tensors, meta, path=file, closers=[close])


@contextlib.contextmanager
def _as_file_error(file, tensor):
    try:
        yield
    except QuantfmtError as e:
        raise FileFormatError(e.message, file=file, tensor=tensor) from None


# ---- writing ----------------------------------------------------------------------------


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (bytes, bytearray)):
        return o.decode("utf-8", "replace")
    raise TypeError(f"{type(o).__name__} is not JSON-serializable")


def build_header(plans: list[TensorPlan], metadata: dict | None, recipe: dict | None) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included, padded to 8 bytes) and each tensor's byte count.

    The JSON is written in one pass, a string per tensor, byte for byte what json.dumps(ensure_ascii=False,
    separators=(",", ":")) makes of the header dict: no dict and lists per tensor (on a file of 2**20
    one-value tensors those were most of the memory of writing it). The format, byte count and the
    fixed part of the entry are computed once per (tag, shape); one try around the loop names the
    failing tensor (no context manager per tensor)."""
    enc = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses for every string
    entries, names, qinfo, sizes, pos = [], set(), {}, [], 0
    known: dict[tuple, tuple] = {}
    name = None
    try:
        for p in plans:
            name = p.name
            if not isinstance(name, str) or name == "__metadata__" or name in names:
                raise FileFormatError(f"invalid or duplicate tensor name {name!r}")
            names.add(name)
            pshape = p.shape
            key = (p.tag, pshape if type(pshape) is tuple else tuple(pshape))
            got = known.get(key)
            if got is None:
                fmt = get_format(p.tag)
                shape = [int(d) for d in pshape]
                with _as_file_error(None, name):
                    n = fmt.nbytes(shape)
                native = fmt.tag in NATIVE_TAGS
                dtype, st_shape = (fmt.tag, shape) if native else ("U8", [n])
                fixed = f':{{"dtype":{enc(dtype)},"shape":[{",".join(map(str, st_shape))}],"data_offsets":['
                q = None if native else {"tag": fmt.tag, "layout_version": fmt.layout_version, "shape": shape}
                got = known[key] = (n, fixed, q)
            n, fixed, q = got
            entries.append(f",{enc(name)}{fixed}{pos},{pos + n}]}}")
            if q is not None:
                qinfo[name] = q
            sizes.append(n)
            pos += n
    except QuantfmtError as e:
        if e.tensor is None:
            e.tensor = name if isinstance(name, str) else None
        raise
    doc = {"container_version": CONTAINER_VERSION, "tensors": qinfo, "recipe": recipe, "metadata": metadata or {}}
    try:
        doc_text = json.dumps(doc, default=_json_default, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise FileFormatError(f"model metadata cannot be stored as JSON: {e}") from None
    meta = json.dumps({META_KEY: doc_text}, ensure_ascii=False, separators=(",", ":"))
    text = f'{{"__metadata__":{meta}{"".join(entries)}}}'.encode()
    del entries
    text += b" " * (-len(text) % 8)  # safetensors' own writer aligns the data region to 8 bytes
    if len(text) > MAX_HEADER_BYTES:
        raise FileFormatError(f"header would be {len(text)} bytes, over the limit of {MAX_HEADER_BYTES}")
    return struct.pack("<Q", len(text)) + text, sizes


@dataclass(frozen=True)
class Layout:
    """Where everything of one output file goes, known before any tensor is produced."""

    header: bytes  # length prefix, JSON, padding: the file's first len(header) bytes
    offsets: list[int]  # absolute file offset of each plan's bytes
    sizes: list[int]
    size: int  # the whole file


def layout(plans: list[TensorPlan], metadata: dict | None, recipe: dict | None) -> Layout:
    """The layout write_safetensors gives `plans`: writers that place bytes at these offsets
    (in any order, from any process) make the same file, byte for byte."""
    header, sizes = build_header(plans, metadata, recipe)
    offsets, pos = [], len(header)
    for n in sizes:
        offsets.append(pos)
        pos += n
    return Layout(header, offsets, sizes, pos)


def write_safetensors(path, plans: list[TensorPlan], *, metadata: dict | None = None, recipe: dict | None = None,
                      overwrite: bool = False, inputs: Iterable = (), progress: Callable[[int], None] | None = None):
    """Stream `plans` into the container `path`: header first, then each tensor's bytes in turn.

    Peak memory is one tensor's production (plus what `produce` holds), never the model.
    The output appears only complete (see atomic_output). `progress(nbytes)` after each tensor.
    """
    file = str(path)
    with context(file=file):
        header, sizes = build_header(plans, metadata, recipe)
        with atomic_output(path, overwrite=overwrite, inputs=inputs) as tmp, open_for_write(tmp) as f:
            write(f, header)
            flush(f)
            write_stream(f, plans, sizes, progress=progress)
