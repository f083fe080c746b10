"""Hostile inputs of issue 10 item 10 (cost amplification), written fast with struct/bytes only.

    python scripts/hostile_files.py gguf-tiny OUT.gguf [N]       # N one-value F32 tensors (default 2**20)
    python scripts/hostile_files.py st-tiny OUT.safetensors [N]  # the same as a safetensors file
    python scripts/hostile_files.py st-empty OUT.safetensors [MB]  # a ~MB-MB header of empty JSON objects
    python scripts/hostile_files.py st-keys OUT.safetensors [MB]   # __metadata__ with millions of keys

The tests import these functions with small counts.
"""

from __future__ import annotations

import json
import struct
import sys


def gguf_tiny(path, n: int = 1 << 20, alignment: int = 32) -> int:
    """A valid GGUF with n F32 tensors of one value each (names t.0, t.1, ...); returns the file size."""
    head = [b"GGUF", struct.pack("<IQQ", 3, n, 0)]
    for i in range(n):
        name = f"t.{i}".encode()
        head.append(struct.pack("<Q", len(name)) + name + struct.pack("<IQIQ", 1, 1, 0, i * alignment))
    blob = b"".join(head)
    pad = -len(blob) % alignment
    cell = struct.pack("<f", 1.0) + bytes(alignment - 4)
    with open(path, "wb") as f:
        f.write(blob + bytes(pad))
        f.write(cell * (n - 1) + cell[:4] if n else b"")
    return len(blob) + pad + (alignment * (n - 1) + 4 if n else 0)


def safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def st_tiny(path, n: int = 1 << 20) -> int:
    """A valid safetensors file with n F32 tensors of one value each."""
    parts = [f'"t.{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(n)]
    blob = safetensors_bytes(("{" + ",".join(parts) + "}").encode(), struct.pack("<f", 1.0) * n)
    with open(path, "wb") as f:
        f.write(blob)
    return len(blob)


def st_empty_objects(path, mb: float = 99) -> int:
    """A safetensors header of ~mb MB: one tensor entry whose extra key holds a list of empty objects."""
    count = int(mb * 1e6) // 3
    header = b'{"x":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"junk":[' + b",".join([b"{}"] * count) + b"]}}"
    blob = safetensors_bytes(header)
    with open(path, "wb") as f:
        f.write(blob)
    return len(blob)


def st_many_keys(path, mb: float = 99) -> int:
    """A safetensors header of ~mb MB whose __metadata__ holds millions of distinct keys."""
    count = int(mb * 1e6) // 14
    meta = ",".join(f'"k{i:08d}":""' for i in range(count))
    header = ('{"__metadata__":{' + meta + '}}').encode()
    blob = safetensors_bytes(header)
    with open(path, "wb") as f:
        f.write(blob)
    return len(blob)


def main(argv: list[str]) -> None:
    kind, out = argv[0], argv[1]
    arg = argv[2] if len(argv) > 2 else None
    if kind == "gguf-tiny":
        size = gguf_tiny(out, int(arg) if arg else 1 << 20)
    elif kind == "st-tiny":
        size = st_tiny(out, int(arg) if arg else 1 << 20)
    elif kind == "st-empty":
        size = st_empty_objects(out, float(arg) if arg else 99)
    elif kind == "st-keys":
        size = st_many_keys(out, float(arg) if arg else 99)
    else:
        raise SystemExit(f"unknown kind {kind!r}; see the docstring")
    print(json.dumps({"file": out, "bytes": size}))


if __name__ == "__main__":
    main(sys.argv[1:])
