"""Sharded safetensors checkpoints: a *.safetensors.index.json (weight_map: tensor -> shard
file), or a folder of *.safetensors files, opened as one Model; and every file a model is read from.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FileFormatError
from .files import input_files, require_regular  # noqa: F401  (input_files: re-exported)
from .safetensors import MAX_HEADER_BYTES, RECIPE_KEY, _loads, _short, open_safetensors


def open_sharded(index_path):
    """Open a *.safetensors.index.json (weight_map: name -> shard file) as one Model."""
    file = str(index_path)
    require_regular(index_path)
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
    from ..tensor import Model

    tensors, metadata, recipe, closers, seen_in = {}, {}, None, [], {}
    try:
        for p in paths:
            m = open_safetensors(p)
            closers.append(m.close)
            for t in m.sources():
                name = t.name
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
