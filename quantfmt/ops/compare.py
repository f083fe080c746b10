"""Comparing formats on a model's real weights (what `quantfmt compare` prints): round-trip error
and matmul error per tensor and per format, or of a quantized file against its original; the
activations the matmul error is measured on (random N(0,1), a .npz of real ones, or inputs captured
from running the original model on a text); and the plots (error histograms, bits vs error).

Why activations matter: the matmul error ||x (Wq - W)^T|| / ||x W^T|| weighs each column's error by
how large that input component is. Real activations are far from isotropic (a few large channels),
so N(0,1) inputs can misjudge a format by several times in either direction.
"""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import numpy as np

from ..errors import QuantfmtError, context, memory_error
from ..io.files import release_pages
from ..sources import RECIPE_KEY, open_model

RANDOM = "random N(0,1)"
# Weight errors are histogrammed relative to each tensor's RMS weight, in fixed bins so that the
# histogram accumulates tensor by tensor without keeping the errors (ends: everything beyond).
HIST_EDGES = np.linspace(-1.0, 1.0, 101)


class ActivationsError(QuantfmtError):
    """Activations that cannot be used: unreadable file, wrong shape, no tokens to run."""


# ---- activations ---------------------------------------------------------------------------


class Activations:
    """Input rows (n, cols) for each tensor's matmul error, by tensor-name pattern (fnmatch, first
    match wins); tensors that no pattern matches get random N(0,1) rows (and are labelled so)."""

    def __init__(self, arrays: dict[str, np.ndarray], description: str, *, exact: bool = False, source=None):
        self.arrays = arrays
        self.description = description
        self.exact = exact  # keys are tensor names, not patterns (captured)
        self.source = source

    @classmethod
    def from_npz(cls, path) -> Activations:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ActivationsError(f"cannot read activations (.npz of arrays keyed by tensor-name pattern): {e}",
                                   file=str(path)) from None
        out = {}
        for k, a in arrays.items():
            if a.ndim == 1:
                a = a[None, :]
            if a.ndim != 2 or a.shape[0] == 0 or not np.issubdtype(a.dtype, np.floating):
                raise ActivationsError(f"activations {k!r} must be a float array (n, cols) with n >= 1, got "
                                       f"{a.dtype} {a.shape}", file=str(path))
            if not np.all(np.isfinite(a)):
                raise ActivationsError(f"activations {k!r} hold NaN or inf", file=str(path))
            out[k] = np.ascontiguousarray(a, np.float32)
        if not out:
            raise ActivationsError("the file holds no arrays", file=str(path))
        return cls(out, f"{Path(path).name} ({len(out)} patterns)", source=str(path))

    def lookup(self, name: str, cols: int) -> tuple[np.ndarray, str] | None:
        """(rows, label) for tensor `name` with `cols` columns, or None when nothing matches."""
        key: str | None
        if self.exact:
            a = self.arrays.get(name)
            key = name
        else:
            key = next((k for k in self.arrays if fnmatch.fnmatchcase(name, k)), None)
            a = None if key is None else self.arrays[key]
        if a is None:
            return None
        if a.shape[1] != cols:
            raise ActivationsError(f"activations {key!r} have {a.shape[1]} columns, tensor {name!r} has {cols}",
                                   file=self.source, tensor=name)
        return a, ("captured" if self.exact else f"npz:{key}")


def capture_activations(path, text: str, *, n_tokens: int = 128, max_rows: int = 256, seed: int = 0,
                        tokenizer=None) -> Activations:
    """Run the model at `path` (float activations, no quantization on load) on up to `n_tokens`
    tokens of `text`, recording the input rows of every linear layer; keep a uniform sample of at
    most `max_rows` rows per tensor. The runner is not changed: its weight objects are swapped for
    recorders that note the input, then call the real matmul."""
    from .run import open_runner

    runner, tok, model = open_runner(path, activations="f32", tokenizer=tokenizer, n_ctx=max(2, n_tokens))
    with model:
        ids = tok.encode(text)[:n_tokens]
        if not ids:
            raise ActivationsError("the text gives no tokens to run the model on", file=str(path))
        store = _Reservoir(max_rows, seed)
        for L in runner.layers:
            for k in ("q", "k", "v", "o", "gate", "up", "down"):
                setattr(L, k, _Recorder(getattr(L, k), store))
            L.qkv = L.gate_up = None  # fused weights would hide which tensor an input belongs to
        runner.output = _Recorder(runner.output, store)
        runner.forward(ids, logits="all")  # every position through the head: its inputs too
        arrays = store.arrays()
    return Activations(arrays, f"captured from {len(ids)} tokens of text on {Path(path).name} "
                       f"(<= {max_rows} rows per tensor)", exact=True, source=str(path))


class _Reservoir:
    """A uniform sample without replacement of at most `k` rows per tensor over every call: each row
    gets a random key and the k smallest keys stay (so several forward calls are sampled fairly)."""

    def __init__(self, k: int, seed: int):
        self.k = k
        self.rng = np.random.default_rng(seed)
        self.rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, name: str, x: np.ndarray) -> None:
        keys: np.ndarray = np.asarray(self.rng.random(x.shape[0]))
        if name in self.rows:
            old_x, old_k = self.rows[name]
            x, keys = np.concatenate([old_x, x]), np.concatenate([old_k, keys])
        if x.shape[0] > self.k:
            keep = np.argpartition(keys, self.k - 1)[: self.k]
            x, keys = x[keep], keys[keep]
        self.rows[name] = (np.array(x, np.float32), keys)

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: x for n, (x, _) in self.rows.items()}


class _Recorder:
    """Stands in for a runner's weight QTensor: records matmul inputs, delegates everything else."""

    def __init__(self, t, store: _Reservoir):
        self._t = t
        self._store = store

    def matmul(self, x, mode=None):
        a = np.asarray(x)
        self._store.add(self._t.name, a.reshape(-1, a.shape[-1]))
        return self._t.matmul(x, mode)

    def __getattr__(self, k):
        return getattr(self._t, k)


# ---- error figures -------------------------------------------------------------------------


def _figures(w: np.ndarray, wd: np.ndarray, x: np.ndarray | None, y: np.ndarray | None) -> dict:
    """Error figures of `wd` (the format's values) against `w`; matmul error of y against x @ w.T."""
    w = np.asarray(w, np.float64)
    err = np.asarray(wd, np.float64) - w
    sig = float(np.sum(np.square(w)))
    noise = float(np.sum(np.square(err)))
    res = {
        "rmse": math.sqrt(noise / w.size) if w.size else 0.0,
        "max_abs": float(np.max(np.abs(err))) if err.size else 0.0,
        "snr_db": _snr(sig, noise),
        "matmul_rel_err": None,
        "_sig": sig, "_noise": noise, "_mm_err2": 0.0, "_mm_ref2": 0.0, "_err": err,
    }
    if x is not None and y is not None:
        y_ref = x.astype(np.float64) @ w.T
        e2 = float(np.sum(np.square(np.asarray(y, np.float64) - y_ref)))
        r2 = float(np.sum(np.square(y_ref)))
        res["matmul_rel_err"] = math.sqrt(e2 / r2) if r2 > 0 else 0.0
        res["_mm_err2"], res["_mm_ref2"] = e2, r2
    return res


def compare_tensor(w: np.ndarray, tag: str, x: np.ndarray) -> dict:
    """Error figures of `w` (float32, 2-D) quantized to `tag`; x: activations (n, cols)."""
    from ..plugins import get_format

    fmt = get_format(tag)
    data = fmt.quantize(w)
    wd = fmt.dequantize(data, w.shape)
    y = fmt.qmatmul(data, w.shape, x)
    res = _figures(w, wd, x, y)
    return {"tag": fmt.tag, "bits_per_weight": 8.0 * data.size / w.size, "bytes": int(data.size),
            "weights": int(w.size), **res}


def _snr(sig: float, noise: float):
    if noise == 0:
        return None  # exact: infinite SNR (JSON null)
    if sig == 0:
        return -math.inf
    return 10.0 * math.log10(sig / noise)


class _Summary:
    """Totals of one group of rows (a format, or a tag of the quantized file), and the histograms."""

    def __init__(self, hist: bool):
        self.bytes = self.weights = self.tensors = self.fallbacks = self.mm_tensors = 0
        self.sig = self.noise = self.mm_err2 = self.mm_ref2 = self.max_abs = 0.0
        self.by_activations: dict[str, int] = {}
        self.hist = np.zeros(len(HIST_EDGES) - 1, np.int64) if hist else None

    def add(self, row: dict, res: dict) -> None:
        self.bytes += row["bytes"]
        self.weights += row["weights"]
        self.tensors += 1
        self.fallbacks += bool(row.get("fallback"))
        self.sig += res.pop("_sig")
        self.noise += res.pop("_noise")
        self.mm_err2 += res.pop("_mm_err2")
        self.mm_ref2 += res.pop("_mm_ref2")
        err = res.pop("_err")
        self.max_abs = max(self.max_abs, row["max_abs"])
        if row.get("activations"):
            self.mm_tensors += 1
            self.by_activations[row["activations"]] = self.by_activations.get(row["activations"], 0) + 1
        if self.hist is not None and err.size:
            w_rms = row["_w_rms"]
            rel = np.clip(err.reshape(-1) / w_rms if w_rms > 0 else err.reshape(-1), HIST_EDGES[0], HIST_EDGES[-1])
            self.hist += np.histogram(rel, HIST_EDGES)[0]

    def to_dict(self) -> dict:
        if not self.tensors:
            return {"tensors": 0}
        d = {
            "tensors": self.tensors,
            "fallbacks": self.fallbacks,
            "weights": self.weights,
            "bytes": self.bytes,
            "bits_per_weight": 8.0 * self.bytes / self.weights if self.weights else 0.0,
            "rmse": math.sqrt(self.noise / self.weights) if self.weights else 0.0,
            "max_abs": self.max_abs,
            "snr_db": _snr(self.sig, self.noise),
            "matmul_rel_err": (math.sqrt(self.mm_err2 / self.mm_ref2) if self.mm_ref2 > 0 else 0.0)
            if self.mm_tensors else None,
            "activations": dict(sorted(self.by_activations.items())),
        }
        if self.hist is not None:
            d["error_histogram"] = self.hist.tolist()
        return d


def _inputs(acts: Activations | None, name: str, cols: int, n_inputs: int, rng) -> tuple[np.ndarray, str]:
    found = acts.lookup(name, cols) if acts is not None else None
    if found is not None:
        return found
    return rng.standard_normal((n_inputs, cols)).astype(np.float32), RANDOM


def _fallback_format(fallback, tag, shape):
    """The format a tensor of `shape` gets when `tag` cannot take it, as a recipe chooses it."""
    from ..plugins import get_format
    from ..recipe import AUTO, nearest_format

    if fallback is None:
        return None
    fb = nearest_format(tag, shape) if fallback == AUTO else get_format(fallback)
    return fb if fb is not None and fb.accepts(shape) else None


def _finish_row(row: dict, res: dict, w: np.ndarray, summary: _Summary) -> None:
    row["_w_rms"] = math.sqrt(res["_sig"] / w.size) if w.size else 0.0
    row.update({k: v for k, v in res.items() if not k.startswith("_")})
    summary.add(row, res)
    del row["_w_rms"]


def compare(path, tags: list[str], *, pattern: str | None = None, n_inputs: int = 4, seed: int = 0,
            activations: Activations | None = None, fallback: str | None = "F16", histograms: bool = False,
            progress=None) -> dict:
    """Quantize every 2-D float tensor of the model at `path` (matching `pattern`) to each of `tags`
    and measure the error. A format that cannot take a tensor's shape is replaced for that tensor by
    `fallback` (a tag, "auto": the nearest in bits per weight that fits, as a recipe does; None: the
    pair is listed as skipped), so every format's summary covers the same tensors.

    Returns {"tensors": [...], "skipped": [...], "summary": {tag: ...}, "activations": ...}."""
    from ..plugins import get_format

    fmts = [get_format(t) for t in tags]
    if fallback is not None and fallback != "auto":
        get_format(fallback)
    rng = np.random.default_rng(seed)
    rows, skipped = [], []
    agg = {f.tag: _Summary(histograms) for f in fmts}
    with open_model(path) as model:
        for info in model.sources():
            name = info.name
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
                continue
            if len(info.shape) != 2 or get_format(info.tag).value_kind != "f":
                continue  # only matrices of weights: vectors and integer buffers are not compared
            t = model[name]
            w = x = None
            for f in fmts:
                use, why = f, None
                if not f.accepts(t.shape):
                    why = f"shape does not fit blocks of {f.block_shape[0]}x{f.block_shape[1]}"
                    use = _fallback_format(fallback, f.tag, t.shape)
                    if use is None:
                        skipped.append({"tensor": name, "tag": f.tag, "shape": list(t.shape),
                                        "reason": why + ("" if fallback is None else
                                                         f", and the fallback {fallback} does not either")})
                        continue
                try:
                    with context(file=str(path), tensor=name):
                        if w is None or x is None:
                            w = t.dequantize()
                            x, label = _inputs(activations, name, t.shape[1], n_inputs, rng)
                        res = compare_tensor(w, use.tag, x)
                except MemoryError:
                    raise memory_error("compare it", 16 * math.prod(t.shape), file=str(path), tensor=name) from None
                except QuantfmtError as e:  # e.g. a value outside F16's range
                    if isinstance(e, ActivationsError):
                        raise
                    skipped.append({"tensor": name, "tag": f.tag, "shape": list(t.shape), "reason": e.message})
                    continue
                row = {"tensor": name, "shape": list(t.shape), "source_tag": t.tag, "format": f.tag,
                       "tag": res.pop("tag"), "fallback": why is not None, "activations": label,
                       "bits_per_weight": res.pop("bits_per_weight"), "bytes": res.pop("bytes"),
                       "weights": res.pop("weights")}
                if why is not None:
                    row["why"] = f"{f.tag}: {why}; fallback {use.tag}"
                _finish_row(row, res, w, agg[f.tag])
                rows.append(row)
            if progress is not None:
                progress(name)
            if w is not None:
                release_pages(t.data)
    return {"file": str(path), "formats": [f.tag for f in fmts], "fallback": fallback,
            "activations": activations.description if activations is not None else f"{RANDOM}, {n_inputs} rows",
            "tensors": rows, "skipped": skipped, "summary": {tag: a.to_dict() for tag, a in agg.items()}}


def compare_files(orig, quant, *, pattern: str | None = None, n_inputs: int = 4, seed: int = 0,
                  activations: Activations | None = None, histograms: bool = False, progress=None) -> dict:
    """Each float tensor of the model at `quant` against the same-named tensor of `orig` (dequantized:
    the reference): RMSE, max abs, SNR, and for matrices the matmul error of QUANT's own kernels
    against the float matmul with ORIG's weights. Summaries per tag of QUANT and over all tensors.
    Tensors in only one file, or of different shapes, are listed, never dropped."""
    from ..plugins import get_format

    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    not_compared: list[dict] = []
    by_tag: dict[str, _Summary] = {}
    total = _Summary(histograms)
    with open_model(orig) as mo, open_model(quant) as mq:
        o_info = {s.name: s for s in mo.sources()}
        rec = mq.metadata.get(RECIPE_KEY) if isinstance(mq.metadata, dict) else None
        # what convert recorded: tensors that did not fit the format the recipe wanted for them
        fbs = rec.get("fallbacks") if isinstance(rec, dict) else None
        fbs = fbs if isinstance(fbs, dict) else {}
        q_names = [s.name for s in mq.sources()]
        only_orig = [n for n in o_info if n not in set(q_names)]
        only_quant = []
        for s in mq.sources():
            name = s.name
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
                continue
            so = o_info.get(name)
            if so is None:
                only_quant.append(name)
                continue
            if tuple(so.shape) != tuple(s.shape):
                not_compared.append({"tensor": name, "reason": f"shape {list(so.shape)} in ORIG, {list(s.shape)} "
                                                               "in QUANT"})
                continue
            if get_format(s.tag).value_kind != "f" or get_format(so.tag).value_kind != "f":
                not_compared.append({"tensor": name, "reason": f"not float weights ({so.tag} -> {s.tag})"})
                continue
            to, tq = mo[name], mq[name]
            try:
                with context(file=str(quant), tensor=name):
                    w = to.dequantize()
                    wq = tq.dequantize()
                    x = y = label = None
                    if len(s.shape) == 2:
                        x, label = _inputs(activations, name, s.shape[1], n_inputs, rng)
                        y = tq.matmul(x)
                    res = _figures(w, wq, x, y)
            except MemoryError:
                raise memory_error("compare it", 24 * math.prod(s.shape), file=str(quant), tensor=name) from None
            row = {"tensor": name, "shape": list(s.shape), "source_tag": so.tag, "tag": s.tag,
                   "activations": label, "bits_per_weight": 8.0 * tq.nbytes / max(1, tq.numel),
                   "bytes": tq.nbytes, "weights": tq.numel}
            fb = fbs.get(name)
            if isinstance(fb, dict) and fb.get("wanted"):
                row["fallback"] = True
                row["why"] = f"recipe wanted {fb['wanted']}, which does not fit this shape; stored as {s.tag}"
            sub = by_tag.setdefault(s.tag, _Summary(histograms))
            # both summaries need the private sums: give the per-tag one a copy
            _finish_row(dict(row), dict(res), w, total)
            _finish_row(row, res, w, sub)
            rows.append(row)
            if progress is not None:
                progress(name)
            release_pages(to.data)
            release_pages(tq.data)
    summary = {tag: a.to_dict() for tag, a in sorted(by_tag.items())}
    return {"orig": str(orig), "quant": str(quant),
            "activations": activations.description if activations is not None else f"{RANDOM}, {n_inputs} rows",
            "tensors": rows, "only_in_orig": only_orig if pattern is None else
            [n for n in only_orig if fnmatch.fnmatchcase(n, pattern)],
            "only_in_quant": only_quant, "not_compared": not_compared, "summary": summary, "total": total.to_dict()}


# ---- plots ---------------------------------------------------------------------------------


def require_matplotlib():
    """pyplot on the Agg backend, or a clear error naming the extra that installs it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QuantfmtError("--plot needs matplotlib: pip install 'quantfmt[plot]'") from None
    return plt


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points (bits, error, name) no other point beats on both: fewer-or-equal bits and lower error."""
    front: list[tuple[float, float, str]] = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or p[1] < front[-1][1]:
            front.append(p)
    return front


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plot_compare(res: dict, outdir) -> list[str]:
    """Write, per format (or per tag of the quantized file), an error histogram PNG (weight errors
    relative to each tensor's RMS weight, and per-tensor matmul errors), and one PNG of bits per
    weight against matmul error with the Pareto front. Needs `compare(..., histograms=True)`."""
    plt = require_matplotlib()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    key = "format" if "formats" in res else "tag"
    written = []
    centers = (HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2
    points = []
    for tag, s in res["summary"].items():
        if not s.get("tensors"):
            continue
        errs = [r["matmul_rel_err"] for r in res["tensors"] if r[key] == tag and r["matmul_rel_err"] is not None]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        if "error_histogram" in s:
            a1.bar(centers, s["error_histogram"], width=HIST_EDGES[1] - HIST_EDGES[0])
            a1.set_yscale("log")
        a1.set_xlabel("weight error / tensor RMS weight (ends: beyond +-1)")
        a1.set_ylabel("weights")
        pos = [e for e in errs if e > 0]
        if pos:
            lo, hi = min(pos), max(pos)
            bins = np.geomspace(lo / 1.1, hi * 1.1, 30) if hi > lo else 10
            a2.hist(pos, bins=bins)
            a2.set_xscale("log")
        a2.set_xlabel("matmul relative error per tensor")
        a2.set_ylabel("tensors")
        fig.suptitle(f"{tag}: {s['tensors']} tensors ({s.get('fallbacks', 0)} fallbacks); activations: "
                     f"{res['activations']}", fontsize=9)
        fig.tight_layout()
        p = out / f"hist-{_safe(tag)}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(str(p))
        if s.get("matmul_rel_err") is not None:
            points.append((s["bits_per_weight"], max(s["matmul_rel_err"], 1e-9), tag))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points])
        for x, y, n in points:
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(points)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="C3", label="Pareto front")
        ax.legend()
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("matmul relative error")
    ax.set_title(f"bits vs error; activations: {res['activations']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    p = out / "bits-vs-error.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(str(p))
    return written
