"""Verifying a written file with a reader we did not write, and against another model.

`verify(path, against=None)` checks a GGUF file with the gguf package's reader and a
safetensors/quantfmt file with the safetensors library's: both must list the same tensors
as quantfmt's own reader, with the same types, shapes and bytes. With `against` (any model
file quantfmt opens), every tensor's tag, shape and bytes must equal that model's too.
"""

from __future__ import annotations

import numpy as np

from ..errors import FileFormatError
from ..plugins import get_format
from ..sources import is_gguf, open_model


def verify(path, against=None) -> dict:
    """Check `path` (GGUF or safetensors) as above; a report dict, or FileFormatError on any difference."""
    return verify_gguf(path, against) if is_gguf(path) else verify_safetensors(path, against)


def _same_tensors(m, other, path, against) -> None:
    if set(other) != set(m):
        missing = sorted(set(other) ^ set(m))[:5]
        raise FileFormatError(f"tensor names differ from {against}: e.g. {missing}", file=str(path))
    for t in other.sources():
        u = m.source(t.name)
        if (u.tag, u.shape) != (t.tag, t.shape) or not np.array_equal(u.load(), t.load()):
            raise FileFormatError(f"differs from {against}: {u.tag} {u.shape} here, {t.tag} {t.shape} there, "
                                  "or other bytes", file=str(path), tensor=t.name)


def verify_safetensors(path, against=None) -> dict:
    """Our reader and the safetensors library's must agree on every tensor's dtype, shape and bytes."""
    from safetensors import safe_open

    from ..io.safetensors import read_header

    path = str(path)
    hdr = read_header(path)
    report = {"file": path, "kind": "safetensors", "tensors": len(hdr.entries), "by_tag": {}}
    for e in hdr.entries:
        report["by_tag"][e.tag] = report["by_tag"].get(e.tag, 0) + 1
    with open_model(path) as m:
        try:
            f = safe_open(path, framework="numpy")
        except Exception as e:  # noqa: BLE001 - foreign reader: any failure is the finding
            raise FileFormatError(f"the safetensors library cannot read it: {type(e).__name__}: {e}",
                                  file=path) from None
        with f:
            if sorted(f.keys()) != sorted(e.name for e in hdr.entries):
                raise FileFormatError("the safetensors library sees other tensors than ours", file=path)
            for entry in hdr.entries:
                sl = f.get_slice(entry.name)
                if sl.get_dtype() != entry.dtype:
                    raise FileFormatError(
                        f"the safetensors library reads dtype {sl.get_dtype()}, we read {entry.dtype}",
                        file=path, tensor=entry.name)
                if entry.dtype != "BF16":  # numpy has no bfloat16: compare its bytes through ours only
                    theirs = np.ascontiguousarray(f.get_tensor(entry.name)).reshape(-1).view(np.uint8)
                    if not np.array_equal(theirs, m.source(entry.name).load()):
                        raise FileFormatError("the safetensors library reads other bytes than ours",
                                              file=path, tensor=entry.name)
        report["safetensors_agrees"] = True
        if against is not None:
            with open_model(against) as other:
                _same_tensors(m, other, path, against)
            report["identical_to"] = str(against)
    return report


def verify_gguf(path, against=None) -> dict:
    """Check a GGUF file three ways and report: our pre-scan and reader; the gguf package's
    own reader (tensor names, types, shapes and bytes must agree with ours); and, with
    `against` (any model file quantfmt opens), every tensor's tag, shape and bytes and the
    GGUF key-values compared with that model. Raises FileFormatError on any difference.
    """
    import gguf

    from ..io.gguf import read_gguf, scan_gguf

    path = str(path)
    hdr = scan_gguf(path)
    report = {"file": path, "version": hdr.version, "alignment": hdr.alignment, "key_values": len(hdr.kv),
              "tensors": len(hdr.tensors), "by_type": {}}
    for t in hdr.tensors:
        report["by_type"][t.type_name] = report["by_type"].get(t.type_name, 0) + 1
    with read_gguf(path, unsupported="dequantize") as m:
        try:
            ref = gguf.GGUFReader(path)
        except Exception as e:  # noqa: BLE001 - foreign reader: any failure is the finding
            raise FileFormatError(f"the gguf package cannot read it: {type(e).__name__}: {e}",
                                  file=path) from None
        if [t.name for t in ref.tensors] != list(m):
            raise FileFormatError("the gguf package's reader sees other tensors than ours", file=path)
        dequantized = m.metadata["gguf"].get("dequantized", {})
        for rt in ref.tensors:
            t = m.source(rt.name)
            ggml = dequantized.get(rt.name) or get_format(t.tag).ggml_type
            same = rt.tensor_type.name == ggml and tuple(int(d) for d in reversed(rt.shape)) == t.shape
            if same and rt.name not in dequantized:
                same = np.array_equal(rt.data.reshape(-1).view(np.uint8), t.load())
            if not same:
                raise FileFormatError("the gguf package's reader disagrees with ours on type, shape or bytes",
                                      file=path, tensor=rt.name)
        report["gguf_package_agrees"] = True
        if against is not None:
            with open_model(against) as other:
                _same_tensors(m, other, path, against)
                theirs = other.metadata.get("gguf", {}).get("kv")
                if theirs is not None and theirs != m.metadata["gguf"]["kv"]:
                    raise FileFormatError(f"its key-values differ from those recorded in {against}",
                                          file=path)
            report["identical_to"] = str(against)
    return report
