"""Comparing formats on a model's real weights: round-trip error and matmul error per tensor
and per format (what `quantfmt compare` prints)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import QuantfmtError, context, memory_error
from ..io.files import release_pages
from ..sources import open_model


def compare_tensor(w: np.ndarray, tag: str, x: np.ndarray) -> dict:
    """Error figures of `w` (float32, 2-D) quantized to `tag`; x: activations (n, cols)."""
    from ..plugins import get_format

    fmt = get_format(tag)
    data = fmt.quantize(w)
    wd = fmt.dequantize(data, w.shape)
    err = (wd.astype(np.float64) - w.astype(np.float64))
    sig = float(np.sum(np.square(w, dtype=np.float64)))
    noise = float(np.sum(np.square(err)))
    y_ref = x.astype(np.float64) @ w.T.astype(np.float64)
    y = fmt.qmatmul(data, w.shape, x).astype(np.float64)
    ref_norm = float(np.linalg.norm(y_ref))
    return {
        "tag": fmt.tag,
        "bits_per_weight": 8.0 * data.size / w.size,
        "bytes": int(data.size),
        "weights": int(w.size),
        "rmse": math.sqrt(noise / w.size),
        "max_abs": float(np.max(np.abs(err))) if err.size else 0.0,
        "snr_db": _snr(sig, noise),
        "matmul_rel_err": float(np.linalg.norm(y - y_ref)) / ref_norm if ref_norm > 0 else 0.0,
        "_sig": sig, "_noise": noise, "_mm_err2": float(np.sum(np.square(y - y_ref))), "_mm_ref2": ref_norm**2,
    }


def _snr(sig: float, noise: float):
    if noise == 0:
        return None  # exact: infinite SNR (JSON null)
    if sig == 0:
        return -math.inf
    return 10.0 * math.log10(sig / noise)


def compare(path, tags: list[str], *, pattern: str | None = None, n_inputs: int = 4, seed: int = 0,
            progress=None) -> dict:
    """Quantize every 2-D tensor of the model at `path` (matching `pattern`) to each of `tags`
    and measure the error. Returns {"tensors": [...], "skipped": [...], "summary": {tag: ...}}."""
    import fnmatch

    from ..plugins import get_format

    fmts = [get_format(t) for t in tags]
    rng = np.random.default_rng(seed)
    rows, skipped = [], []
    agg = {f.tag: {"bytes": 0, "weights": 0, "sig": 0.0, "noise": 0.0, "mm_err2": 0.0, "mm_ref2": 0.0,
                   "max_abs": 0.0, "tensors": 0} for f in fmts}
    with open_model(path) as model:
        for info in model.sources():
            name = info.name
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
                continue
            if len(info.shape) != 2 or get_format(info.tag).value_kind != "f":
                continue  # only matrices of weights: vectors and integer buffers are not compared
            t = model[name]
            w = None
            for f in fmts:
                if not f.accepts(t.shape):
                    skipped.append({"tensor": name, "tag": f.tag, "shape": list(t.shape),
                                    "reason": f"shape does not fit blocks of {f.block_shape[0]}x{f.block_shape[1]}"})
                    continue
                try:
                    with context(file=str(path), tensor=name):
                        if w is None:
                            w = t.dequantize()
                            x = rng.standard_normal((n_inputs, t.shape[1])).astype(np.float32)
                        res = compare_tensor(w, f.tag, x)
                except MemoryError:
                    raise memory_error("compare it", 16 * math.prod(t.shape), file=str(path), tensor=name) from None
                except QuantfmtError as e:  # e.g. a value outside F16's range
                    skipped.append({"tensor": name, "tag": f.tag, "shape": list(t.shape), "reason": e.message})
                    continue
                a = agg[f.tag]
                a["bytes"] += res["bytes"]
                a["weights"] += res["weights"]
                a["sig"] += res.pop("_sig")
                a["noise"] += res.pop("_noise")
                a["mm_err2"] += res.pop("_mm_err2")
                a["mm_ref2"] += res.pop("_mm_ref2")
                a["max_abs"] = max(a["max_abs"], res["max_abs"])
                a["tensors"] += 1
                rows.append({"tensor": name, "shape": list(t.shape), "source_tag": t.tag, **res})
            if progress is not None:
                progress(1)
            if w is not None:
                release_pages(t.data)
    summary: dict[str, dict[str, float]] = {}
    for tag, a in agg.items():
        if not a["weights"]:
            summary[tag] = {"tensors": 0}
            continue
        summary[tag] = {
            "tensors": a["tensors"],
            "weights": a["weights"],
            "bytes": a["bytes"],
            "bits_per_weight": 8.0 * a["bytes"] / a["weights"],
            "rmse": math.sqrt(a["noise"] / a["weights"]),
            "max_abs": a["max_abs"],
            "snr_db": _snr(a["sig"], a["noise"]),
            "matmul_rel_err": math.sqrt(a["mm_err2"] / a["mm_ref2"]) if a["mm_ref2"] > 0 else 0.0,
        }
    return {"file": str(path), "formats": [f.tag for f in fmts], "tensors": rows, "skipped": skipped,
            "summary": summary}
