"""Model files as a whole: open any supported file, load with a recipe, convert, compare.

    quantfmt.load("model.safetensors")                  # lazy: memory-mapped, any mix of formats
    quantfmt.load("model-f16.safetensors", "Q4_0")      # quantize on the fly, nothing written
    convert("in.safetensors", "out.safetensors", Recipe("Q4_0", rules=[("*.attn_v.*", "Q8_0")]))

`open_model` dispatches on content: a folder or *.index.json is a sharded safetensors
checkpoint, a file starting with b"GGUF" goes to quantfmt.gguf_io, anything else is a
safetensors/quantfmt file (container.py). `convert` streams: one tensor is dequantized,
quantized and written at a time, so memory stays ~ the largest tensor, not the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import container
from .errors import FileFormatError, QuantfmtError, context
from .recipe import FLOAT_TAGS, Recipe, Step, record

RECIPE_KEY = container.RECIPE_KEY


def _gguf_io():
    import importlib

    try:
        return importlib.import_module("quantfmt.gguf_io")
    except ModuleNotFoundError as e:
        if e.name == "quantfmt.gguf_io":
            raise FileFormatError(
                "GGUF support (the module quantfmt.gguf_io) is not available in this quantfmt installation"
            ) from None
        raise FileFormatError(f"GGUF support needs the Python package {e.name!r}, which is not installed") from None


def is_gguf(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except IsADirectoryError:
        return False
    except OSError as e:
        raise FileFormatError(f"cannot read: {e.strerror or e}", file=str(path)) from None


def open_model(path):
    """Open a model lazily, whatever its kind: safetensors/quantfmt file, sharded checkpoint, or GGUF."""
    p = Path(path)
    if p.is_dir():
        return container.open_directory(p)
    if not p.exists():
        raise FileFormatError("no such file", file=str(p))
    if p.name.endswith(".json"):
        return container.open_sharded(p)
    if is_gguf(p):
        with context(file=str(p)):
            return _gguf_io().read_gguf(str(p))
    return container.open_safetensors(p)


def _requantize(t, tag: str, file) -> np.ndarray:
    """The bytes of tensor `t` in format `tag` (via float32)."""
    from .plugins import get_format

    with context(file=file, tensor=t.name):
        # An F32 source goes in as a view of its (mapped) bytes: quantize never writes to its
        # input, and skipping dequantize's copy saves a pass over the tensor.
        w = t.data.view("<f4").reshape(t.shape) if t.tag == "F32" else t.dequantize()
        return get_format(tag).quantize(w)


def load(path, recipe=None, *, strict: bool = False):
    """A Model from `path` (see open_model). With a recipe (a Recipe, a tag, a dict or a .json
    file), tensors are converted while loading, in memory, one at a time; nothing is written.

    Tensors whose format the recipe keeps stay memory-mapped views of the file. The recipe
    used, with each fallback (tensor -> wanted and used tag), is in
    `model.metadata["quantfmt.recipe"]`. `strict=True` makes a fallback an error.
    """
    from .tensor import Model, QTensor

    src = open_model(path)
    if recipe is None:
        return src
    try:
        r = Recipe.coerce(recipe)
        if strict:
            r = Recipe(r.default, r.rules, None, r.protect)
        steps = r.plan(src)
        tensors = {}
        for s in steps:
            t = src[s.name]
            if s.copy:
                tensors[s.name] = t
            else:
                data = _requantize(t, s.tag, src.path)
                container.release_pages(t.data)
                tensors[s.name] = QTensor(s.name, s.tag, t.shape, data)
    except BaseException:
        src.close()
        raise
    meta = dict(src.metadata)
    meta[RECIPE_KEY] = record(r, steps)
    return Model(tensors, meta, path=src.path, closers=[src.close])


# ---- convert ----------------------------------------------------------------------------


@dataclass
class ConvertReport:
    steps: list[Step]
    shapes: dict[str, tuple[int, ...]]
    in_bytes: dict[str, int]
    out_bytes: dict[str, int]
    output: str = ""
    notes: list[str] = field(default_factory=list)

    def by_tag(self) -> dict[str, tuple[int, int, int]]:
        """tag -> (tensors, weights, bytes) of the output."""
        agg: dict[str, list[int]] = {}
        for s in self.steps:
            a = agg.setdefault(s.tag, [0, 0, 0])
            a[0] += 1
            a[1] += math.prod(self.shapes[s.name])
            a[2] += self.out_bytes[s.name]
        return {k: tuple(v) for k, v in agg.items()}

    @property
    def fallbacks(self) -> list[Step]:
        return [s for s in self.steps if s.wanted is not None]

    @property
    def requantized(self) -> list[Step]:
        return [s for s in self.steps if s.requantize]


def plan_convert(src, recipe: Recipe) -> ConvertReport:
    from .plugins import get_format

    steps = recipe.plan(src)
    shapes = {s.name: src[s.name].shape for s in steps}
    return ConvertReport(
        steps, shapes, {s.name: src[s.name].nbytes for s in steps},
        {s.name: get_format(s.tag).nbytes(shapes[s.name]) for s in steps},
    )


def convert(in_path, out_path, recipe, *, overwrite: bool = False, strict: bool = False, progress=None,
            metadata: dict | None = None) -> ConvertReport:
    """Convert the model at `in_path` into `out_path` (quantfmt/safetensors, or GGUF if it ends in .gguf).

    Streaming: the header is written first (every size is known from tag and shape), then
    each tensor is produced and written in turn, for both outputs; tensors whose tag is
    unchanged are copied byte for byte. The output appears only complete; an input is never
    overwritten. `progress(nbytes)` is called after each tensor.
    """

    r = Recipe.coerce(recipe)
    if strict:
        r = Recipe(r.default, r.rules, None, r.protect)
    inputs = container.input_files(in_path)
    container.check_output(out_path, overwrite=overwrite, inputs=inputs)  # fail before any work
    src = open_model(in_path)
    try:
        rep = plan_convert(src, r)
        rep.output = str(out_path)
        meta = {k: v for k, v in src.metadata.items() if k != RECIPE_KEY}
        meta.update(metadata or {})
        rec = record(r, rep.steps)
        plans = []
        for s in rep.steps:
            t = src[s.name]

            def produce(t=t, s=s):
                return t.data if s.copy else _requantize(t, s.tag, src.path)

            def after(t=t):
                container.release_pages(t.data)

            plans.append(container.TensorPlan(s.name, s.tag, t.shape, produce, after=after))
        if str(out_path).endswith(".gguf"):
            # Streams like safetensors output; tags with no ggml type are refused before any work.
            with context(file=str(out_path)):
                _gguf_io().write_gguf_plans(str(out_path), plans, metadata={**meta, RECIPE_KEY: rec},
                                            overwrite=overwrite, inputs=inputs, progress=progress)
        else:
            container.write_safetensors(out_path, plans, metadata=meta, recipe=rec, overwrite=overwrite,
                                        inputs=inputs, progress=progress)
        return rep
    finally:
        src.close()


# ---- compare ----------------------------------------------------------------------------


def compare_tensor(w: np.ndarray, tag: str, x: np.ndarray) -> dict:
    """Error figures of `w` (float32, 2-D) quantized to `tag`; x: activations (n, cols)."""
    from .plugins import get_format

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

    from .plugins import get_format

    fmts = [get_format(t) for t in tags]
    rng = np.random.default_rng(seed)
    rows, skipped = [], []
    agg = {f.tag: {"bytes": 0, "weights": 0, "sig": 0.0, "noise": 0.0, "mm_err2": 0.0, "mm_ref2": 0.0,
                   "max_abs": 0.0, "tensors": 0} for f in fmts}
    with open_model(path) as model:
        for name, t in model.items():
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
                continue
            if len(t.shape) != 2:
                continue
            w = None
            for f in fmts:
                if not f.accepts(t.shape):
                    skipped.append({"tensor": name, "tag": f.tag, "shape": list(t.shape),
                                    "reason": f"shape does not fit blocks of {f.block_shape[0]}x{f.block_shape[1]}"})
                    continue
                if w is None:
                    w = t.dequantize()
                    x = rng.standard_normal((n_inputs, t.shape[1])).astype(np.float32)
                try:
                    with context(file=str(path), tensor=name):
                        res = compare_tensor(w, f.tag, x)
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
                container.release_pages(t.data)
    summary = {}
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


def describe(model) -> dict:
    """What `quantfmt inspect --json` prints: every tensor, totals, the recipe and metadata."""
    tensors = []
    for name, t in model.items():
        tensors.append({"name": name, "tag": t.tag, "shape": list(t.shape), "bytes": t.nbytes,
                        "bits_per_weight": t.bits_per_weight})
    weights = sum(math.prod(t["shape"]) for t in tensors)
    total = sum(t["bytes"] for t in tensors)
    by_tag: dict[str, dict] = {}
    for t in tensors:
        a = by_tag.setdefault(t["tag"], {"tensors": 0, "weights": 0, "bytes": 0})
        a["tensors"] += 1
        a["weights"] += math.prod(t["shape"])
        a["bytes"] += t["bytes"]
    meta = dict(model.metadata)
    recipe = meta.pop(RECIPE_KEY, None)
    return {
        "file": str(model.path),
        "tensors": tensors,
        "totals": {"tensors": len(tensors), "weights": weights, "bytes": total,
                   "bits_per_weight": 8.0 * total / weights if weights else 0.0, "by_tag": by_tag},
        "recipe": recipe,
        "metadata": meta,
    }


__all__ = ["load", "open_model", "convert", "compare", "describe", "Recipe", "FLOAT_TAGS"]
