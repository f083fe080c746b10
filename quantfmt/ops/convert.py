"""Converting models: in memory while loading (`load` with a recipe), to a file (`convert`,
streaming, one tensor at a time), and saving a Model as it is (`save`).

    quantfmt.load("model.safetensors")                  # lazy: memory-mapped, any mix of formats
    quantfmt.load("model-f16.safetensors", "Q4_0")      # quantize on the fly, nothing written
    quantfmt.convert("in.safetensors", "out.safetensors", Recipe("Q4_0", rules=[("*.attn_v.*", "Q8_0")]))

`convert` streams: one tensor is dequantized, quantized and written at a time, so memory
stays ~ the largest tensor, not the model, and for formats that declare `rows_independent` a
large tensor goes through in row blocks (memory ~ one block of float32 plus the tensor's output);
tensors whose format is kept are copied byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import QuantfmtError, context, memory_error
from ..gcpause import paused
from ..io.files import SMALL_BYTES, TensorPlan, check_output, plans_from_model, prefetch_pages, release_pages
from ..recipe import Recipe, Step, record
from ..sources import RECIPE_KEY, input_files, open_model, writer_for

# Row blocks of a large tensor are quantized one at a time (formats that are rows_independent):
# about this much float32 per block. Memory grows by one block; each block is a quantize call of
# its own, whose output is copied into place. Measured (scripts/bench_row_blocks.py: a 180 MB
# mapped F32 tensor, whole vs blocks alternated 7 times, medians, 2-core machine at load ~1.5, 2
# numba threads): the quantize step takes 1.24x / 1.21x / 1.16x the whole-tensor time for Q4_0 in blocks
# of 16 / 32 / 64 MiB, 1.14x / 1.12x / 1.11x for Q8_0, 1.03x / 1.02x / 1.02x for Q4_K (~12 ms per
# 180 MB of Q4_0, a few % of a conversion's wall time).
ROW_BLOCK_BYTES = 32 << 20
# Tensors at least this large have their first row block's pages asked for (io.files.prefetch_pages)
# while the tensor before them is converted.
_PREFETCH_MIN = 1 << 20


def _requantize(t, tag: str, file, chunks: bool = False):
    """The bytes of tensor `t` in format `tag` (via float32); with `chunks`, a tensor converted in row
    blocks comes as a list of arrays whose concatenation they are (no copy into one array; for a writer).

    When both formats are rows_independent, a tensor larger than ROW_BLOCK_BYTES of float32 goes
    through in blocks of whole row groups: each block is read (a view of the mapped bytes for F32,
    else dequantized), quantized into its slice of the output, and its input pages are released
    (file-backed pages count in resident memory), so memory holds one block plus the output
    instead of the whole float32 tensor and the output. The bytes are the whole tensor's."""
    from ..plugins import get_format

    with context(file=file, tensor=t.name):
        fmt = get_format(tag)
        try:
            blocks = _row_blocks(t, fmt)
            if blocks is None:
                # An F32 source goes in as a view of its (mapped) bytes: quantize never writes to its
                # input, and skipping dequantize's copy saves a pass over the tensor.
                return fmt.quantize(_floats(t))
            rows, cols, step = blocks
            return _requantize_blocks(t, fmt, rows, cols, step, chunks=chunks)
        except MemoryError:
            # float32 of the tensor, plus the quantizer's output and temporaries
            raise memory_error(f"convert it to {tag}", 8 * math.prod(t.shape)) from None


def _floats(t) -> np.ndarray:
    return t.data.view("<f4").reshape(t.shape) if t.tag == "F32" else t.dequantize()


def _row_blocks(t, fmt):
    """(rows, cols, rows per block) when `t` is converted to `fmt` in row blocks, else None."""
    src = t.fmt
    if not (fmt.rows_independent and src.rows_independent) or not t.shape:
        return None
    rows, cols = fmt.matrix_shape(t.shape)
    if src.matrix_shape(t.shape) != (rows, cols) or 4 * rows * cols <= ROW_BLOCK_BYTES or cols == 0:
        return None
    data = t.data
    if not (isinstance(data, np.ndarray) and data.ndim == 1 and data.dtype == np.uint8):
        return None
    unit = math.lcm(fmt.block_shape[0], src.block_shape[0])  # blocks never straddle a row group of either
    step = max(unit, ROW_BLOCK_BYTES // (4 * cols) // unit * unit)
    return (rows, cols, step) if step < rows else None


def _requantize_blocks(t, fmt, rows: int, cols: int, step: int, chunks: bool = False):
    src = t.fmt
    # chunks: each block's output kept as it is (written in turn), not copied into one array: the
    # copy and the fresh pages of that array were ~0.1 s of a 500 MB Q4_0 conversion (2-core machine)
    parts: list[np.ndarray] = []
    out = np.empty(0 if chunks else fmt.nbytes(t.shape), np.uint8)
    in_group, out_group = src.row_group_bytes(cols), fmt.row_group_bytes(cols)
    in_rows, out_rows = src.block_shape[0], fmt.block_shape[0]
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        part = t.data[r0 // in_rows * in_group : r1 // in_rows * in_group]
        if r1 < rows:  # the next block read from disk (if it is not cached) while this one is quantized
            prefetch_pages(t.data[r1 // in_rows * in_group : min(rows, r1 + step) // in_rows * in_group])
        w = part.view("<f4").reshape(r1 - r0, cols) if t.tag == "F32" else src.dequantize(part, (r1 - r0, cols))
        try:
            q = fmt.quantize(w)
        except QuantfmtError:
            # A value the format refuses: its message names the index within this block. Quantizing
            # the whole tensor raises the error a whole-tensor conversion raises (first bad value,
            # index and shape of the tensor); only this failing path holds the tensor.
            del w
            fmt.quantize(_floats(t))
            raise  # not reached for a rows_independent format: the whole tensor holds the same block
        if chunks:
            parts.append(q)
        else:
            out[r0 // out_rows * out_group : r1 // out_rows * out_group] = q
        del w, q
        release_pages(part)
    return parts if chunks else out


def load(path, recipe=None, *, strict: bool = False):
    """A Model from `path` (see open_model). With a recipe (a Recipe, a tag, a dict or a .json
    file), tensors are converted while loading, in memory, one at a time; nothing is written.

    Tensors whose format the recipe keeps stay memory-mapped views of the file. The recipe
    used, with each fallback (tensor -> wanted and used tag), is in
    `model.metadata["quantfmt.recipe"]`. `strict=True` makes a fallback an error.
    """
    from ..tensor import Model, QTensor

    src = open_model(path)
    if recipe is None:
        return src
    try:
        r = Recipe.coerce(recipe)
        if strict:
            r = dataclasses.replace(r, fallback=None)
        steps = r.plan(src, strict=strict)
        tensors = {}
        for s in steps:
            if s.copy:
                tensors[s.name] = src.source(s.name)  # stays a lazy view of the file
            else:
                t = src[s.name]
                data = _requantize(t, s.tag, src.path)
                release_pages(t.data)
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
    seconds: dict[str, float] = field(default_factory=dict)  # per tensor: produce + write
    files: list[str] = field(default_factory=list)  # every file written (a sharded output: the shards)
    jobs: int = 1  # worker processes used (1: this process)
    workers: dict[int, int] = field(default_factory=dict)  # parallel runs: worker pid -> its peak RSS (bytes)
    worker_threads: dict[int, int] = field(default_factory=dict)  # parallel runs: worker pid -> numba threads
    # parallel runs: worker pid -> its resident memory before its first tensor (interpreter, numba, plugins)
    worker_start_rss: dict[int, int] = field(default_factory=dict)

    def by_tag(self) -> dict[str, tuple[int, int, int]]:
        """tag -> (tensors, weights, bytes) of the output."""
        agg: dict[str, list[int]] = {}
        counts: dict[tuple, int] = {}  # shape -> weights, computed once per distinct shape
        shapes, out_bytes = self.shapes, self.out_bytes
        for s in self.steps:
            a = agg.get(s.tag)
            if a is None:
                a = agg[s.tag] = [0, 0, 0]
            shape = shapes[s.name]
            w = counts.get(shape)
            if w is None:
                w = counts[shape] = math.prod(shape)
            a[0] += 1
            a[1] += w
            a[2] += out_bytes[s.name]
        return {k: (v[0], v[1], v[2]) for k, v in agg.items()}

    @property
    def fallbacks(self) -> list[Step]:
        return [s for s in self.steps if s.wanted is not None]

    @property
    def requantized(self) -> list[Step]:
        return [s for s in self.steps if s.requantize]


def plan_convert(src, recipe: Recipe, *, strict: bool = False) -> ConvertReport:
    from ..plugins import get_format

    steps = recipe.plan(src, strict=strict)
    shapes, in_bytes, out_bytes = {}, {}, {}
    # The output size per (tag, shape), asked of the format once: a registry lookup and nbytes per
    # tensor cost more than the rest of planning on a file of 2**20 one-value tensors.
    sized: dict[tuple, int] = {}
    with paused():
        for s in steps:
            info = src.source(s.name)
            shape = info.shape
            shapes[s.name] = shape
            in_bytes[s.name] = info.nbytes
            key = (s.tag, shape)
            n = sized.get(key)
            if n is None:
                n = sized[key] = get_format(s.tag).nbytes(shape)
            out_bytes[s.name] = n
    return ConvertReport(steps, shapes, in_bytes, out_bytes)


def convert(in_path, out_path, recipe=None, *, overwrite: bool = False, strict: bool = False, progress=None,
            metadata: dict | None = None, on_tensor=None, jobs: int | None = 1, executor=None,
            max_shard_size: int | str | None = None) -> ConvertReport:
    """Convert the model at `in_path` into `out_path` (quantfmt/safetensors, or GGUF if it ends in .gguf).

    Streaming: the header is written first (every size is known from tag and shape), then
    each tensor is produced and written in turn, for both outputs; tensors whose tag is
    unchanged are copied byte for byte. The output appears only complete; an input is never
    overwritten. `progress(nbytes)` is called after each tensor, and `on_tensor(i, step, report)`
    (i counts from 0) once tensor i is written; `report.seconds[name]` holds its time. No recipe:
    every tensor keeps its format (a lossless change of container).

    GGUF from a Hugging Face llama-family checkpoint (quantfmt.llm.export): GGUF tensor names,
    llama.cpp's q/k row permutation and the architecture/tokenizer key-values, so llama.cpp runs
    it. Other sources written as GGUF without general.architecture get a warning.

    Parallel and sharded (quantfmt.ops.parallel; quantfmt/safetensors output): `jobs` worker
    processes (None: one per CPU, or this process alone when there is little to convert), or
    `executor`, any concurrent.futures.Executor or a Dask Client (its workers must see the input
    and output paths); the output is byte for byte the one-process result. `max_shard_size`
    (bytes or "5GB"): `out_path` is a folder of Hugging Face shards plus
    model.safetensors.index.json, written last, or for *.gguf llama.cpp's split files
    (NAME-00001-of-0000N.gguf, the first written last); a rerun keeps the shards already complete.
    """
    r = Recipe.coerce(recipe if recipe is not None else Recipe(default=None))
    if strict:
        r = dataclasses.replace(r, fallback=None)
    gguf = str(out_path).endswith(".gguf")
    if max_shard_size is not None:
        from ..io.sharded import parse_size

        max_shard_size = parse_size(max_shard_size)
    if executor is not None:
        from .parallel import as_executor  # here, not above: --jobs 1 never needs ops.parallel (start-up)

        executor = as_executor(executor)
    inputs = input_files(in_path)
    if max_shard_size is None:
        check_output(out_path, overwrite=overwrite, inputs=inputs)  # fail before any work
    src = open_model(in_path)
    try:
        rep = plan_convert(src, r, strict=strict)
        rep.output = str(out_path)
        meta = {k: v for k, v in src.metadata.items() if k != RECIPE_KEY}
        rec = record(r, rep.steps)
        if jobs is None:  # auto: a worker per CPU, unless starting them costs more than they save
            from .parallel import auto_jobs

            jobs = auto_jobs(sum(rep.in_bytes[s.name] for s in rep.steps if not s.copy))
        if jobs < 1:
            raise QuantfmtError(f"jobs must be at least 1, not {jobs}")
        if not gguf and (jobs > 1 or executor is not None or max_shard_size is not None):
            from .parallel import write_parallel

            meta.update(metadata or {})
            rep.jobs = jobs if executor is None else 0
            write_parallel(src, rep, meta, rec, out_path, jobs=jobs, executor=executor,
                           max_shard_size=max_shard_size, overwrite=overwrite, inputs=inputs, progress=progress,
                           on_tensor=on_tensor)
            return rep
        rep.files = [str(out_path)]
        exp = _gguf_export(src, rep, meta) if str(out_path).endswith(".gguf") else None
        if gguf:
            _retype_gguf(meta, rep, r)
        meta.update(metadata or {})
        if str(out_path).endswith(".gguf") and not _has_arch(meta):
            from ..llm.export import NOT_RUNNABLE  # the llm package only for GGUF output (start-up)

            warnings.warn(f"{out_path}: {NOT_RUNNABLE}", stacklevel=2)
        job = _Job(src, rep, exp, on_tensor)
        plans: list = []
        for i, s in enumerate(rep.steps):
            if exp is not None and s.name not in exp.names:
                continue  # a tensor llama.cpp's converter drops (rope tables)
            plans.append(_Plan(exp.names[s.name] if exp is not None else s.name, i, s, job))
        for name, arr in (exp.extra.items() if exp is not None else ()):
            def extra(a=arr) -> object:
                return a.astype("<f4").view(np.uint8)

            plans.append(TensorPlan(name, "F32", arr.shape, extra))
        if jobs > 1 or executor is not None or max_shard_size is not None:  # GGUF (safetensors: write_parallel)
            from .parallel import write_gguf_parallel

            sources = {(exp.names[s.name] if exp is not None else s.name):
                       (s.name, exp.permute.get(s.name, 0) if exp is not None else 0)
                       for s in rep.steps if exp is None or s.name in exp.names}
            extras = {n: a.astype("<f4").tobytes() for n, a in (exp.extra.items() if exp is not None else ())}
            rep.jobs = jobs if executor is None else 0
            write_gguf_parallel(src, rep, out_path, plans, sources, extras, {**meta, RECIPE_KEY: rec}, jobs=jobs,
                                executor=executor, max_shard_size=max_shard_size, overwrite=overwrite,
                                inputs=inputs, progress=progress, on_tensor=on_tensor)
            return rep
        writer_for(out_path)(out_path, plans, metadata=meta, recipe=rec, overwrite=overwrite, inputs=inputs,
                             progress=progress)
        return rep
    finally:
        src.close()


class _Job:
    """What every tensor of one convert() shares (one object, not a closure per tensor)."""

    __slots__ = ("src", "rep", "exp", "on_tensor")

    def __init__(self, src, rep: ConvertReport, exp, on_tensor):
        self.src, self.rep, self.exp, self.on_tensor = src, rep, exp, on_tensor


class _Plan:
    """A TensorPlan (io.files) for tensor `i` of a conversion: name, tag, shape, produce(), after().

    One small object per tensor with methods, instead of a TensorPlan holding two closures (each a
    function object with its defaults): on a file of 2**20 one-value tensors those were ~600 bytes per
    tensor, a third of the peak memory of converting it."""

    __slots__ = ("name", "i", "step", "job")

    def __init__(self, name: str, i: int, step: Step, job: _Job):
        self.name, self.i, self.step, self.job = name, i, step, job

    @property
    def tag(self) -> str:
        return self.step.tag

    @property
    def shape(self) -> tuple[int, ...]:
        return self.job.rep.shapes[self.step.name]

    def produce(self):
        s, job = self.step, self.job
        job.rep.seconds[s.name] = -time.perf_counter()
        if s.copy:  # bytes unchanged: never build the tensor
            data = job.src.source(s.name).load()
        else:
            # No automatic collection while a tensor is produced: it makes a few large arrays and no
            # cycles, and the first one loads numba's kernels (its target context: ~10^5 new objects),
            # where the collector's repeated passes cost ~0.08 s of a 500 MB Q4_0 conversion.
            permuted = job.exp is not None and s.name in job.exp.permute  # needs the whole tensor's bytes
            self._prefetch_next()
            with paused():
                data = _requantize(job.src[s.name], s.tag, job.src.path, chunks=not permuted)
        if job.exp is not None and s.name in job.exp.permute:
            from ..llm.export import permute_rows

            data = permute_rows(data, s.tag, job.rep.shapes[s.name], job.exp.permute[s.name], name=s.name)
        return data

    def _prefetch_next(self) -> None:
        """Start reading the first row block of the next tensor (prefetch_pages) while this one is converted."""
        steps = self.job.rep.steps
        if self.i + 1 >= len(steps):
            return
        nxt = steps[self.i + 1]
        if self.job.rep.in_bytes[nxt.name] < _PREFETCH_MIN:
            return  # small tensors: not worth loading a source (2**20 tiny tensors)
        with contextlib.suppress(Exception):  # only a hint: the tensor is read (and errors raised) in its turn
            data = self.job.src.source(nxt.name).load()
            prefetch_pages(data[:ROW_BLOCK_BYTES] if isinstance(data, np.ndarray) else data)

    def after(self) -> None:
        s, job = self.step, self.job
        if not s.copy:
            release_pages(job.src[s.name].data)
        elif job.rep.in_bytes[s.name] >= SMALL_BYTES:  # release_pages skips smaller ones: skip loading them
            release_pages(job.src.source(s.name).load())
        job.rep.seconds[s.name] += time.perf_counter()
        if job.on_tensor is not None:
            job.on_tensor(self.i, s, job.rep)


def _has_arch(meta) -> bool:
    g = meta.get("gguf")
    kv = g.get("kv") if isinstance(g, dict) else None
    return isinstance(kv, list) and any(isinstance(e, (list, tuple)) and e and e[0] == "general.architecture"
                                        for e in kv)


def _retype_gguf(meta: dict, rep: ConvertReport, recipe: Recipe) -> None:
    """general.file_type (and general.quantization_version) of a GGUF output as its tensors are written: a
    GGUF source's own key-values named the source's type (a Q4_1 file converted to Q4_K_M said Q4_1). A
    llama.cpp mix names its file type (Q4_K_M: 15), as llama-quantize writes it; otherwise the type holding
    most matrix weights does, when llama.cpp has a name for it (llm.export.file_type_kv). Kept in place; a
    conversion that changes no tensor keeps the source's key-values as they are."""
    g = meta.get("gguf")
    if not isinstance(g, dict):
        return
    kv = g.get("kv")
    if not isinstance(kv, list) or all(s.tag == s.src_tag for s in rep.steps):
        return  # nothing converted: the key-values stay the source's, byte for byte
    from ..llm.export import file_type_kv

    tags = {s.name: s.tag for s in rep.steps}
    new = {e[0]: e for e in file_type_kv(tags, {n: rep.shapes[n] for n in tags})}
    if recipe.mix is not None:
        from ..mixes import get_mix

        new["general.file_type"] = ["general.file_type", "UINT32", get_mix(recipe.mix).ftype]
    keys = ("general.file_type", "general.quantization_version")
    out = []
    for e in kv:
        k = e[0] if isinstance(e, (list, tuple)) and e else None
        if k in keys:
            if k in new:
                out.append(new.pop(k))
            continue
        out.append(e)
    meta["gguf"] = {**g, "kv": out + [new[k] for k in keys if k in new]}


def _gguf_export(src, rep: ConvertReport, meta: dict):
    """For an HF llama-family source written as GGUF: the export plan (llm.export), with
    meta["gguf"] set to its key-values and GGUF tensor order. None for other sources."""
    from ..llm.export import ExportError, file_type_kv, gguf_export
    from ..plugins import get_format

    exp = gguf_export(src)
    if exp is None:
        return None
    for s in rep.steps:  # refuse before anything is written
        if s.name in exp.permute and len(rep.shapes[s.name]) == 2 and get_format(s.tag).block_shape[0] != 1:
            raise ExportError(f"{s.tag} stores blocks of {get_format(s.tag).block_shape[0]} rows, so the q/k row "
                              "permutation llama.cpp needs cannot be applied to its bytes; use a row-wise format "
                              "(e.g. Q8_0, Q4_0, F16) for this tensor", file=str(src.path), tensor=s.name)
    kept = [s for s in rep.steps if s.name in exp.names]
    tags = {exp.names[s.name]: s.tag for s in kept}
    shapes = {exp.names[s.name]: rep.shapes[s.name] for s in kept}
    meta["gguf"] = {"version": 3, "kv": exp.kv + file_type_kv(tags, shapes),
                    "tensor_order": [exp.names[s.name] for s in kept] + list(exp.extra)}
    rep.notes.append(f"GGUF export as llama.cpp architecture {exp.arch!r}: {len(exp.names)} tensors renamed, "
                     f"{len(exp.permute)} q/k tensors' rows permuted" +
                     (f", {len(exp.skipped)} dropped" if exp.skipped else ""))
    rep.notes.extend(exp.notes)
    return exp


def save(model, path, *, overwrite: bool = False, recipe: dict | None = None) -> None:
    """Write a Model (any mix of formats) to `path` (quantfmt/safetensors, or GGUF for *.gguf), bytes unchanged."""
    meta = dict(model.metadata)
    rec = meta.pop(RECIPE_KEY, None)
    inputs: list[str] = []
    if getattr(model, "path", None):
        with contextlib.suppress(Exception):
            inputs = input_files(model.path)
    writer_for(path)(path, plans_from_model(model), metadata=meta, recipe=recipe if recipe is not None else rec,
                     overwrite=overwrite, inputs=inputs)
