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
files lazily (one read-only memory map; a tensor's data is a zero-copy view of it), sharded
checkpoints (*.safetensors.index.json), and writing: streaming (header first, then one
tensor at a time) into an atomic output (temporary file, fsync, os.replace).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import signal
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FileFormatError, OutputExistsError, QuantfmtError, UnknownFormatError, context
from .format import MAX_ELEMENTS

CONTAINER_VERSION = 1
META_KEY = "quantfmt"  # the __metadata__ key holding quantfmt's JSON document
RECIPE_KEY = "quantfmt.recipe"  # Model.metadata key of the recipe a file was made with
# The same cap as the safetensors library: a header is small; a hostile length prefix must
# not make us read (or allocate) gigabytes before we can say the file is bad.
MAX_HEADER_BYTES = 100_000_000
MAX_RANK = 64
# Tensors whose dtype *is* their format: stored natively so plain safetensors readers see floats.
NATIVE_TAGS = ("F32", "F16", "BF16")
# Every dtype the safetensors library knows, with its size in bytes (so a foreign file parses
# and gets a precise error if it holds a dtype quantfmt cannot represent).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_PAGE = mmap.PAGESIZE


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
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _Dup(k)
        seen[k] = v
    return seen


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


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shape(v, file, name, what="shape") -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_RANK or not all(_int(d) and d >= 0 for d in v):
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
    file = str(path)
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
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"header is not valid UTF-8 (byte {e.start})", file=file) from None
    hdr = _loads(text, "header", file)
    if not isinstance(hdr, dict):
        raise FileFormatError(f"header is a JSON {type(hdr).__name__}, not an object", file=file)
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
        if not (isinstance(offs, list) and len(offs) == 2 and all(_int(o) and o >= 0 for o in offs)):
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
    for begin, end, name, dtype, shape in raw_entries:
        if name in qinfo:
            tag, shape = _quantized(qinfo[name], dtype, shape, end - begin, file, name)
        elif dtype in NATIVE_TAGS:
            tag = dtype
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
    from .plugins import get_format

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
    try:
        fmt = get_format(tag)
    except UnknownFormatError:
        from .plugins import formats

        raise FileFormatError(
            f"format tag {_short(tag, 20)} is not provided by any loaded plugin (known: {', '.join(formats())}); "
            f"install or enable the plugin that defines {_short(tag, 20)}",
            file=file, tensor=name,
        ) from None
    if ver != fmt.version:
        raise FileFormatError(
            f"{tag} layout version {ver} differs from the registered {tag} format's version {fmt.version} "
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
    """Open one safetensors/quantfmt file lazily: a Model whose tensors are views of a read-only map."""
    from .tensor import Model, QTensor

    file = str(path)
    hdr = read_header(path)
    try:
        mm = np.memmap(path, mode="r", dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise FileFormatError(f"cannot map the file: {e}", file=file) from None
    if mm.size != hdr.data_start + sum(e.nbytes for e in hdr.entries):
        raise FileFormatError("the file changed size while being opened", file=file)
    flat = mm.view(np.ndarray)
    tensors = {}
    for e in hdr.entries:
        with _as_file_error(file, e.name):
            tensors[e.name] = QTensor(e.name, e.tag, e.shape, flat[e.begin:e.end], source=file)
    meta = dict(hdr.metadata)
    if hdr.recipe is not None:
        meta[RECIPE_KEY] = hdr.recipe
    return Model(tensors, meta, path=file, closers=[_closer(mm)])


@contextlib.contextmanager
def _as_file_error(file, tensor):
    try:
        yield
    except QuantfmtError as e:
        raise FileFormatError(e.message, file=file, tensor=tensor) from None


def _closer(mm):
    def close():
        # The map closes when the last view of it goes away; closing it under live views
        # would crash them, and Python's mmap refuses (BufferError) while views exist.
        with contextlib.suppress(BufferError, ValueError, AttributeError):
            mm._mmap.close()

    return close


def release_pages(arr) -> None:
    """Tell the kernel we are done with the file pages under `arr` (a view of a map opened here).

    Streaming conversion calls this after each tensor, so resident memory stays ~ one tensor
    instead of growing with the file; the data stay valid (re-read from disk if touched again).
    """
    a = arr
    while isinstance(a, np.ndarray) and not (isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap)):
        a = a.base
    if not isinstance(a, np.memmap) or not hasattr(mmap, "MADV_DONTNEED") or arr.size == 0:
        return
    off = arr.ctypes.data - a.ctypes.data
    if off < 0 or off + arr.nbytes > a.size:
        return
    start = off // _PAGE * _PAGE
    stop = -(-(off + arr.nbytes) // _PAGE) * _PAGE
    stop = min(stop, len(a.base))
    with contextlib.suppress(OSError, ValueError):
        a.base.madvise(mmap.MADV_DONTNEED, start, stop - start)


# ---- sharded checkpoints ----------------------------------------------------------------


def open_sharded(index_path):
    """Open a *.safetensors.index.json (weight_map: name -> shard file) as one Model."""
    file = str(index_path)
    try:
        with open(index_path, "rb") as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
    except OSError as e:
        raise FileFormatError(f"cannot read: {e.strerror or e}", file=file) from None
    if len(raw) > MAX_HEADER_BYTES:
        raise FileFormatError(f"index larger than {MAX_HEADER_BYTES} bytes", file=file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FileFormatError("index is not valid UTF-8", file=file) from None
    idx = _loads(text, "index", file)
    wmap = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise FileFormatError("index has no 'weight_map' object of tensor name -> shard file name", file=file)
    base = Path(index_path).parent
    shards = []
    for s in dict.fromkeys(wmap.values()):
        if not s or Path(s).name != s:
            raise FileFormatError(f"shard {_short(s)} is not a plain file name next to the index", file=file)
        shards.append(s)
    return _merge_shards([base / s for s in shards], wmap, idx.get("metadata"), file)


def _merge_shards(paths, wmap, index_meta, file):
    from .tensor import Model

    tensors, metadata, recipe, closers, seen_in = {}, {}, None, [], {}
    try:
        for p in paths:
            m = open_safetensors(p)
            closers.append(m.close)
            for name, t in m.items():
                if name in tensors:
                    raise FileFormatError(f"is in two shards: {seen_in[name]} and {p.name}", file=file, tensor=name)
                if wmap is not None and wmap.get(name) != p.name:
                    raise FileFormatError(
                        f"is in shard {p.name}, but the index maps it to {wmap.get(name)!r}", file=file, tensor=name
                    )
                tensors[name], seen_in[name] = t, p.name
            meta = dict(m.metadata)
            recipe = meta.pop(RECIPE_KEY, recipe)
            metadata.update(meta)
        if wmap is not None:
            for name, shard in wmap.items():
                if name not in tensors:
                    raise FileFormatError(f"is mapped to shard {shard}, which does not hold it", file=file, tensor=name)
    except BaseException:
        for c in closers:
            c()
        raise
    if isinstance(index_meta, dict):
        metadata.update({k: v for k, v in index_meta.items() if k != "total_size"})
    if recipe is not None:
        metadata[RECIPE_KEY] = recipe
    return Model(tensors, metadata, path=file, closers=closers)


def open_directory(path):
    """A folder: its one *.safetensors.index.json, else all its *.safetensors files as shards."""
    p = Path(path)
    idx = sorted(p.glob("*.safetensors.index.json"))
    if len(idx) > 1:
        raise FileFormatError(f"holds {len(idx)} *.safetensors.index.json files; name one", file=str(p))
    if idx:
        return open_sharded(idx[0])
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileFormatError("holds no *.safetensors file", file=str(p))
    if len(files) == 1:
        return open_safetensors(files[0])
    return _merge_shards(files, None, None, str(p))


def input_files(path) -> list[str]:
    """Every file the model at `path` is read from (for refusing to overwrite an input)."""
    p = Path(path)
    if p.is_dir():
        return [str(f) for f in sorted(p.iterdir()) if f.is_file()]
    out = [str(p)]
    if p.name.endswith(".json") and p.is_file():
        with contextlib.suppress(Exception):
            with open(p, "rb") as f:
                idx = json.loads(f.read(MAX_HEADER_BYTES))
            out += [str(p.parent / s) for s in set(idx["weight_map"].values()) if isinstance(s, str)]
    return out


# ---- atomic output ----------------------------------------------------------------------


def check_output(path, *, overwrite: bool = False, inputs: Iterable = ()) -> None:
    """OutputExistsError if `path` is one of `inputs` (by identity of the file, not the name),
    or exists and `overwrite` is false, or is a directory."""
    out = Path(path)
    try:
        st = os.stat(out)
    except FileNotFoundError:
        if not out.parent.is_dir():
            raise OutputExistsError(f"the folder {out.parent} does not exist", file=str(path)) from None
        return
    except OSError as e:
        raise OutputExistsError(f"cannot check the output path: {e.strerror or e}", file=str(path)) from None
    for i in inputs:
        try:
            si = os.stat(i)
        except OSError:
            continue
        if (si.st_dev, si.st_ino) == (st.st_dev, st.st_ino):
            raise OutputExistsError(f"is the same file as the input {i}; refusing to overwrite an input",
                                    file=str(path))
    if out.is_dir():
        raise OutputExistsError("is a directory", file=str(path))
    if not overwrite:
        raise OutputExistsError("exists; pass --overwrite (overwrite=True) to replace it", file=str(path))


class _Terminated(KeyboardInterrupt):
    """SIGTERM during an atomic write: unwinds like Ctrl-C so the temporary file is removed."""


@contextlib.contextmanager
def atomic_output(path, *, overwrite: bool = False, inputs: Iterable = ()):
    """Write a file all-or-nothing. Yields the path of a new empty temporary file in the same
    folder; write it any way you like. On success it is fsynced and renamed over `path`;
    on any exception, Ctrl-C or SIGTERM it is removed and `path` is untouched.

        with atomic_output("out.safetensors", overwrite=False, inputs=["in.safetensors"]) as tmp:
            write_everything(tmp)
    """
    inputs = [str(i) for i in inputs]
    check_output(path, overwrite=overwrite, inputs=inputs)
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=folder)
    except OSError as e:
        raise FileFormatError(f"cannot create a file in {folder}: {e.strerror or e}", file=str(path)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the output gets ordinary permissions
    os.close(fd)
    old = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise _Terminated()

        old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # Re-check: the output may have appeared (or become an input's hard link) meanwhile.
        check_output(path, overwrite=overwrite, inputs=inputs)
        os.replace(tmp, out)
        with contextlib.suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


# ---- writing ----------------------------------------------------------------------------


@dataclass
class TensorPlan:
    """A tensor to write: its tag and logical shape (so its byte size is known up front) and
    a function that produces its bytes when its turn comes."""

    name: str
    tag: str
    shape: tuple[int, ...]
    produce: Callable[[], object]  # -> uint8 array or bytes-like of exactly nbytes
    after: Callable[[], None] | None = None  # called once the bytes are written (e.g. release_pages)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (bytes, bytearray)):
        return o.decode("utf-8", "replace")
    raise TypeError(f"{type(o).__name__} is not JSON-serializable")


def build_header(plans: list[TensorPlan], metadata: dict | None, recipe: dict | None) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included, padded to 8 bytes) and each tensor's byte count."""
    from .plugins import get_format

    hdr, qinfo, sizes, pos = {}, {}, [], 0
    for p in plans:
        if not isinstance(p.name, str) or p.name == "__metadata__" or p.name in hdr:
            raise FileFormatError(f"invalid or duplicate tensor name {p.name!r}")
        fmt = get_format(p.tag)
        shape = [int(d) for d in p.shape]
        with _as_file_error(None, p.name):
            n = fmt.nbytes(shape)
        if fmt.tag in NATIVE_TAGS:
            hdr[p.name] = {"dtype": fmt.tag, "shape": shape, "data_offsets": [pos, pos + n]}
        else:
            hdr[p.name] = {"dtype": "U8", "shape": [n], "data_offsets": [pos, pos + n]}
            qinfo[p.name] = {"tag": fmt.tag, "layout_version": fmt.version, "shape": shape}
        sizes.append(n)
        pos += n
    doc = {"container_version": CONTAINER_VERSION, "tensors": qinfo, "recipe": recipe, "metadata": metadata or {}}
    try:
        doc_text = json.dumps(doc, default=_json_default, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise FileFormatError(f"model metadata cannot be stored as JSON: {e}") from None
    full = {"__metadata__": {META_KEY: doc_text}, **hdr}
    text = json.dumps(full, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors' own writer aligns the data region to 8 bytes
    if len(text) > MAX_HEADER_BYTES:
        raise FileFormatError(f"header would be {len(text)} bytes, over the limit of {MAX_HEADER_BYTES}")
    return struct.pack("<Q", len(text)) + text, sizes


def write_safetensors(path, plans: list[TensorPlan], *, metadata: dict | None = None, recipe: dict | None = None,
                      overwrite: bool = False, inputs: Iterable = (), progress: Callable[[int], None] | None = None):
    """Stream `plans` into the container `path`: header first, then each tensor's bytes in turn.

    Peak memory is one tensor's production (plus what `produce` holds), never the model.
    The output appears only complete (see atomic_output). `progress(nbytes)` after each tensor.
    """
    file = str(path)
    with context(file=file):
        header, sizes = build_header(plans, metadata, recipe)
        with atomic_output(path, overwrite=overwrite, inputs=inputs) as tmp:
            try:
                f = open(tmp, "wb")
            except OSError as e:
                raise FileFormatError(f"cannot write: {e.strerror or e}") from None
            with f:
                _write(f, header)
                f.flush()  # each tensor goes out as it is done: the file grows as the work progresses
                for p, n in zip(plans, sizes, strict=True):
                    with context(tensor=p.name):
                        data = p.produce()
                        buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
                        buf = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
                        if buf.size != n:
                            raise FileFormatError(f"{p.tag}: produced {buf.size} bytes, the header promised {n}")
                        _write(f, buf)
                        f.flush()
                        del data, buf
                    if p.after is not None:
                        p.after()
                    if progress is not None:
                        progress(n)


def _write(f, buf) -> None:
    try:
        f.write(memoryview(buf))
    except OSError as e:
        raise FileFormatError(f"cannot write: {e.strerror or e}") from None


def plans_from_model(model) -> list[TensorPlan]:
    """Plans that copy a Model's tensors as they are (bytes unchanged)."""
    return [TensorPlan(name, t.tag, t.shape, (lambda t=t: t.data)) for name, t in model.items()]


def save(path, model, *, overwrite: bool = False, recipe: dict | None = None) -> None:
    """Write a Model (any mix of formats) to a quantfmt/safetensors file, bytes unchanged."""
    meta = dict(model.metadata)
    rec = meta.pop(RECIPE_KEY, None)
    inputs = []
    if getattr(model, "path", None):
        with contextlib.suppress(Exception):
            inputs = input_files(model.path)
    write_safetensors(path, plans_from_model(model), metadata=meta, recipe=recipe if recipe is not None else rec,
                      overwrite=overwrite, inputs=inputs)
