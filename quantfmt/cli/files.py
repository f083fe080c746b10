"""Commands on model files: `convert`, `dequantize`, `inspect`, `compare`, `check-file`."""

from __future__ import annotations

import json
import math

import click

from .output import output_options, size


def _run_convert(src, dst, recipe, overwrite, out, strict=False, label="converting", **parallel):
    """One progress display for the whole job, whatever runs it (this process, a pool, a Dask cluster):
    a bar on a terminal (tensors, bytes, rate, ETA); otherwise a line per tensor on stderr, as
    llama-quantize logs, with the same totals. `parallel`: jobs, executor, max_shard_size for convert."""
    import contextlib
    import sys
    import time

    from ..ops.convert import convert

    show = not out.quiet and not out.as_json
    tty = show and sys.stderr.isatty()
    t0 = time.monotonic()
    done = {"tensors": 0, "bytes": 0}
    totals: dict[int, int] = {}  # id(report) -> its input bytes: summed once, not per tensor (2**20 tiny tensors)

    def status(rep) -> str:
        total = totals.get(id(rep))
        if total is None:
            total = totals[id(rep)] = sum(rep.in_bytes.values())
        el = max(time.monotonic() - t0, 1e-9)
        rate = done["bytes"] / el
        eta = f"{(total - done['bytes']) / rate:5.0f} s" if rate > 0 else "    ?"
        return (f"{done['tensors']}/{len(rep.steps)} tensors, {size(done['bytes'])} of {size(total)} in, "
                f"{rate / 1e6:6.0f} MB/s, ETA {eta}")

    with contextlib.ExitStack() as stack:
        bar = None

        def log(i, s, rep):
            nonlocal bar
            done["tensors"] += 1
            done["bytes"] += rep.in_bytes[s.name]
            if tty:
                if bar is None:  # the first tensor: totals are known now
                    bar = stack.enter_context(click.progressbar(length=sum(rep.in_bytes.values()), label=label,
                                                                file=sys.stderr, show_pos=False,
                                                                item_show_func=lambda _: status(rep)))
                bar.update(rep.in_bytes[s.name], s.name)
                return
            shape = "x".join(map(str, rep.shapes[s.name])) or "()"
            change = s.tag if s.copy else f"{s.src_tag} -> {s.tag}"
            out.note(f"[{done['tensors']:4d}/{len(rep.steps)}] {s.name:48s} {shape:>14s}  {change:14s} "
                     f"{size(rep.out_bytes[s.name]):>10s}  {rep.seconds[s.name]:6.2f} s  ({s.why})  |  {status(rep)}")

        return convert(src, dst, recipe, overwrite=overwrite, strict=strict, on_tensor=log if show else None,
                       **parallel)


def _tensor_ticker(out, path, pattern, label):
    """progress(name) for per-tensor work: a bar on a terminal, else a line per tensor on stderr."""
    import contextlib
    import fnmatch
    import sys

    from ..sources import open_model

    with open_model(path) as m:
        total = sum(1 for s in m.sources() if len(s.shape) == 2 and (pattern is None or
                                                                       fnmatch.fnmatchcase(s.name, pattern)))
    done = [0]

    @contextlib.contextmanager
    def ticker():
        with out.progress(total, label) as update:
            def progress(name):
                done[0] += 1
                if sys.stderr.isatty():
                    update(1)
                elif not out.as_json:  # a JSON consumer reads one document; no chatter beside it
                    out.note(f"[{done[0]:4d}/{total}] {name}")

            yield progress

    return ticker()


def _report_dict(rep) -> dict:
    return {
        "output": rep.output,
        "files": rep.files,
        "jobs": rep.jobs,
        "notes": rep.notes,
        "tensors": [{"name": s.name, "source_tag": s.src_tag, "tag": s.tag, "why": s.why, "wanted": s.wanted,
                     "shape": list(rep.shapes[s.name]), "in_bytes": rep.in_bytes[s.name],
                     "out_bytes": rep.out_bytes[s.name], "seconds": rep.seconds.get(s.name)} for s in rep.steps],
        "by_tag": {t: {"tensors": n, "weights": w, "bytes": b} for t, (n, w, b) in rep.by_tag().items()},
        "in_bytes": sum(rep.in_bytes.values()),
        "out_bytes": sum(rep.out_bytes.values()),
    }


def _print_report(rep, out) -> None:
    rows = []
    by_tag = rep.by_tag()  # once: a pass over every tensor
    for tag, (n, weights, nbytes) in sorted(by_tag.items()):
        rows.append([tag, n, weights, size(nbytes), f"{8.0 * nbytes / weights:.3g}" if weights else "-"])
    if rep.output.startswith("("):
        out.echo(rep.output)
    elif rep.files and rep.files[0] != rep.output and rep.files[0].endswith(".gguf"):
        out.echo(f"wrote {len(rep.files)} split files, {rep.files[0]} (the key-values) to {rep.files[-1]}")
    elif len(rep.files) > 1 or (rep.files and rep.files[0] != rep.output):
        out.echo(f"wrote {rep.output}: {len(rep.files)} shard{'s' * (len(rep.files) != 1)} and the index")
    else:
        out.echo(f"wrote {rep.output}")
    if rep.jobs != 1:
        out.echo(f"in parallel: {f'{rep.jobs} worker processes' if rep.jobs else 'on the executor'}"
                 + (f", peak RSS per worker {size(max(rep.workers.values()))}" if rep.workers else ""))
    for n in rep.notes:
        out.echo(f"note: {n}")
    out.table(["tag", "tensors", "weights", "size", "bpw"], rows, right={1, 2, 3, 4})
    tin, tout = sum(rep.in_bytes.values()), sum(rep.out_bytes.values())
    copied = sum(1 for s in rep.steps if s.copy)
    weights = sum(w for _, w, _ in by_tag.values())
    bpw = f" ({8.0 * tout / weights:.3f} bits per weight)" if weights else ""
    out.echo(f"total: {size(tin)} -> {size(tout)}{bpw}; {len(rep.steps) - copied} tensors converted, "
             f"{copied} copied unchanged")
    for s in rep.steps:
        if s.why.startswith("output head"):
            out.echo(f"{s.why}: {s.name} stored as {s.tag} (a rule naming it, or promote_output=false, overrides)")
    protected: dict[str, int] = {}
    for s in rep.steps:
        if s.why.endswith(" kept") and not s.why.startswith("rule"):
            protected[s.why[:-5]] = protected.get(s.why[:-5], 0) + 1
    if protected:
        n = sum(protected.values())
        out.echo(f"protected: {n} tensor{'s' * (n != 1)} kept as they were ("
                 + ", ".join(f"{k}: {v}" for k, v in sorted(protected.items())) + ")")
    fbs = rep.fallbacks
    for s in fbs if len(fbs) <= 12 else fbs[:8]:
        out.echo(f"fallback: {s.name} {list(rep.shapes[s.name])}: {s.wanted} does not fit this shape, "
                 f"stored as {s.tag}")
    if len(fbs) > 12:
        out.echo(f"fallback: ... and {len(fbs) - 8} more ({len(fbs)} in all; `quantfmt inspect --json OUT` "
                 "lists them under recipe.fallbacks)")
    if rep.requantized:
        out.echo(f"note: {len(rep.requantized)} tensors were already quantized and were requantized "
                 "(e.g. " + ", ".join(f"{s.name} {s.src_tag}->{s.tag}" for s in rep.requantized[:3])
                 + "): quantization error compounds; convert from the float original when you can")


@click.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("dst", metavar="OUT", type=click.Path(), required=False)
@click.option("--to", "to", metavar="TAG",
              help="Default format of the tensors no rule names ('keep', or nothing at all: keep each one's format); "
                   "a llama.cpp mix name (Q4_K_M, as llama-quantize takes) is --recipe MIX.")
@click.option("--rule", "rules", multiple=True, metavar="PATTERN=TAG",
              help="Give tensors whose name matches PATTERN (fnmatch: *, ?, [..]) format TAG ('keep' = unchanged); "
                   "first match wins; repeatable; before the recipe file's rules.")
@click.option("--recipe", "recipe_file", metavar="FILE|MIX",
              help="A JSON recipe file ({\"default\": TAG, \"fallback\": TAG, \"rules\": [{\"pattern\", \"tag\"}]}), "
                   "or a llama.cpp mix: Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q3_K_M, Q2_K, IQ4_XS, Q8_0, ...")
@click.option("--fallback", metavar="TAG", help="Format for tensors whose shape does not fit theirs (default F16).")
@click.option("--strict", is_flag=True,
              help="A tensor whose shape does not fit its format is an error, not a fallback.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never an input).")
@click.option("--dry-run", is_flag=True, help="Show each tensor's format, size and why, and the total bits per "
                                              "weight; write nothing (OUT may be left out).")
@click.option("-j", "--jobs", default="auto", show_default=True, metavar="N|auto",
              help="Worker processes quantizing in parallel (auto: this process, whose kernels use every core, on "
                   "machines of up to 4 CPUs or below 256 MB to convert; else one per CPU); the output is byte for "
                   "byte the same whatever N.")
@click.option("--max-shard-size", metavar="SIZE",
              help="Write OUT as a folder of Hugging Face shards (model-00001-of-0000N.safetensors) of at most SIZE "
                   "(e.g. 5GB, 500MiB) plus model.safetensors.index.json, written last; for OUT.gguf, llama.cpp's "
                   "split files OUT-00001-of-0000N.gguf. Rerunning after a failure keeps the shards already "
                   "complete.")
@click.option("--executor", metavar="URL",
              help="Run the work on a cluster instead of local processes: dask://HOST:PORT (a Dask scheduler; "
                   "pip install 'quantfmt[dask]'). Its workers must see IN and OUT at the same paths.")
@output_options("Print the conversion report as JSON (per tensor: tags, sizes, why).")
def convert(src, dst, to, rules, recipe_file, fallback, strict, overwrite, dry_run, jobs, max_shard_size, executor,
            out):
    """Convert a model (safetensors, sharded index, GGUF) to quantfmt/safetensors, or GGUF if OUT ends in .gguf.

    Streams tensor by tensor; OUT appears only when complete. Tensors that keep their format
    are copied byte for byte. 1-D tensors and norms stay as they are unless a rule names them
    explicitly (its pattern has no '*', or mentions 'norm').
    """
    from ..gcpause import paused
    from ..io.readahead import read_ahead, read_ahead_bytes

    if not dry_run:
        # the input comes from the disk while the modules load and the conversion starts (a quarter of
        # the available memory of it, io.readahead); the conversion then asks for each next row block
        # in turn (io.files.prefetch_pages)
        read_ahead(src, read_ahead_bytes())
    with paused(freeze=True):  # numpy and the modules a conversion runs: no collection while they load
        from ..ops import convert as _  # noqa: F401
        from ..recipe import Recipe

    # Nothing said: every tensor keeps its format (a lossless change of container).
    recipe = Recipe.from_options(to=to, rules=rules, fallback=fallback, strict=strict, file=recipe_file)
    if dry_run:
        from ..ops.convert import plan_convert
        from ..sources import open_model

        with open_model(src) as m:
            rep = plan_convert(m, recipe, strict=strict)
        rep.output = "(dry run: nothing written)"

        def render():
            out.table(["tensor", "shape", "from", "to", "bytes", "bpw", "why"],
                      [[s.name, "x".join(map(str, rep.shapes[s.name])) or "()", s.src_tag, s.tag, rep.out_bytes[s.name],
                        f"{8.0 * rep.out_bytes[s.name] / max(1, math.prod(rep.shapes[s.name])):.3g}", s.why]
                       for s in rep.steps], right={4, 5})
            out.echo("")
            _print_report(rep, out)

        out.emit(lambda: _report_dict(rep), render)
        return
    if dst is None:
        raise click.UsageError("give OUT, the file to write (or --dry-run to only show the plan)")
    if jobs == "auto":
        n_jobs = None
    else:
        try:
            n_jobs = int(jobs)
        except ValueError:
            raise click.BadParameter(f"{jobs!r} is not a number of processes or 'auto'", param_hint="--jobs") from None
        if n_jobs < 1:
            raise click.BadParameter("must be at least 1", param_hint="--jobs")
    pool, close = None, None
    if executor:
        from ..ops.parallel import executor_from_url

        pool, close = executor_from_url(executor)
    try:
        rep = _run_convert(src, dst, recipe, overwrite, out, strict=strict, jobs=n_jobs, executor=pool,
                           max_shard_size=max_shard_size)
    finally:
        if close is not None:
            close()
    out.emit(lambda: _report_dict(rep), lambda: _print_report(rep, out))


@click.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("dst", metavar="OUT", type=click.Path())
@click.option("--dtype", type=click.Choice(["F32", "F16", "BF16"]), default="F32", show_default=True,
              help="Float format of every tensor of OUT.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never an input).")
@output_options("Print the conversion report as JSON.")
def dequantize(src, dst, dtype, overwrite, out):
    """Write a plain float safetensors file: every tensor of IN dequantized to --dtype."""
    from ..recipe import Recipe

    recipe = Recipe(default=dtype, fallback=None, protect=False)
    rep = _run_convert(src, dst, recipe, overwrite, out, label="dequantizing")
    out.emit(lambda: _report_dict(rep), lambda: _print_report(rep, out))


@click.command()
@click.argument("path", metavar="FILE", type=click.Path(exists=True))
@output_options("Print JSON: tensors, totals, recipe, metadata.")
def inspect(path, out):
    """List every tensor of a model file: name, tag, shape, bytes, bits per weight; totals; recipe; metadata."""
    from ..ops.inspect import describe
    from ..sources import open_model

    with open_model(path) as m:
        d = describe(m)

    def render():
        out.table(["tensor", "tag", "shape", "bytes", "bpw"],
                  [[t["name"], t["tag"] + ("" if t["installed"] else " (not installed)"),
                    "x".join(map(str, t["shape"])) or "()", t["bytes"], f"{t['bits_per_weight']:.4g}"]
                   for t in d["tensors"]], right={3, 4})
        tot = d["totals"]
        out.echo("")
        out.echo(f"{tot['tensors']} tensors, {tot['weights']} weights, {size(tot['bytes'])} "
                 f"({tot['bits_per_weight']:.4g} bits per weight)")
        for tag, a in sorted(tot["by_tag"].items()):
            out.echo(f"  {tag}: {a['tensors']} tensors, {a['weights']} weights, {size(a['bytes'])}")
        missing = sorted({t["tag"] for t in d["tensors"] if not t["installed"]})
        if missing:
            out.note(f"note: no installed plugin provides {', '.join(missing)}: listed from the header only; "
                     "install or enable the plugin to read those tensors")
        if d["recipe"] is not None:
            rec = dict(d["recipe"])
            fbs = rec.pop("fallbacks", None) or {}
            out.echo("recipe: " + json.dumps(rec))
            if fbs:
                shown = ", ".join(f"{n} ({f.get('wanted')}->{f.get('used')})" for n, f in list(fbs.items())[:5]
                                  if isinstance(f, dict))
                out.echo(f"fallbacks: {len(fbs)}: {shown}" + (", ..." if len(fbs) > 5 else ""))
        if d["metadata"]:
            out.echo("metadata:")
            for k, v in d["metadata"].items():
                s = json.dumps(v, default=str)
                out.echo(f"  {k}: {s if len(s) <= 100 else s[:97] + '...'}")

    out.emit(d, render)


@click.command()
@click.argument("path", metavar="FILE", type=click.Path(exists=True))
@click.argument("quant", metavar="[QUANT]", type=click.Path(exists=True), required=False)
@click.option("--formats", "tags", metavar="TAG,TAG,...", help="Formats to try, comma-separated (without QUANT).")
@click.option("--tensors", "pattern", metavar="PATTERN", help="Only the tensors whose name matches (fnmatch).")
@click.option("--fallback", default="F16", show_default=True, metavar="TAG|auto",
              help="Format a tensor gets when a format's blocks do not fit its shape (auto: the nearest in bits per "
                   "weight that fits), as convert does; every format's summary then covers the same tensors.")
@click.option("--activations", "acts_file", type=click.Path(exists=True, dir_okay=False), metavar="FILE.npz",
              help="Real inputs for the matmul error: arrays (n, cols) keyed by tensor-name pattern (fnmatch, "
                   "first match wins); tensors no pattern matches get random N(0,1) inputs.")
@click.option("--activations-from-text", "acts_text", metavar="TEXT|@FILE",
              help="Capture each linear layer's real inputs by running FILE (a llama-family model) on this text "
                   "(@FILE: read it from a file).")
@click.option("--tokens", "n_tokens", default=128, show_default=True, type=click.IntRange(1, 1 << 16),
              help="Tokens of --activations-from-text to run.")
@click.option("--rows", "max_rows", default=256, show_default=True, type=click.IntRange(1, 1 << 16),
              help="Captured input rows kept per tensor (a uniform sample).")
@click.option("--tokenizer", type=click.Path(exists=True), help="A GGUF file or a folder with tokenizer.json, "
              "when FILE carries no tokenizer (for --activations-from-text).")
@click.option("--inputs", "n_inputs", default=4, show_default=True, type=click.IntRange(1, 65536),
              help="Random input vectors for the matmul error (tensors without real activations).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write error histograms per format and bits-vs-error with the Pareto front as PNGs into DIR "
                   "(needs matplotlib: pip install 'quantfmt[plot]').")
@output_options("Print JSON: per tensor and format, fallbacks, skipped, summary.")
def compare(path, quant, tags, pattern, fallback, acts_file, acts_text, n_tokens, max_rows, tokenizer, n_inputs, seed,
            plot_dir, out):
    """Measure quantization error per tensor: bits per weight, RMSE, max abs error, SNR (dB) and the
    relative error of the format's matmul against the float matmul.

    With --formats: quantize each 2-D tensor of FILE to each format. With QUANT: compare each tensor
    of QUANT (a quantized file) against FILE, its original. The matmul error is measured on random
    N(0,1) inputs unless --activations or --activations-from-text give real ones: real activations
    are far from isotropic, and random ones can misjudge a format by several times."""
    from ..ops import compare as ops

    if quant is None and not tags:
        raise click.UsageError("give --formats TAG,... (quantize FILE to each), or QUANT (a quantized file to "
                               "compare against FILE)")
    if quant is not None and tags:
        raise click.UsageError("give either --formats or QUANT, not both")
    if acts_file and acts_text:
        raise click.UsageError("give either --activations or --activations-from-text, not both")
    if plot_dir:
        ops.require_matplotlib()  # before the work, not after
    acts = None
    if acts_file:
        acts = ops.Activations.from_npz(acts_file)
    elif acts_text:
        text = acts_text
        if text.startswith("@"):
            try:
                with open(text[1:], encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise click.BadParameter(f"cannot read {text[1:]}: {e}", param_hint="--activations-from-text") from None
        acts = ops.capture_activations(path, text, n_tokens=n_tokens, max_rows=max_rows, seed=seed,
                                       tokenizer=tokenizer)
    tick = _tensor_ticker(out, quant or path, pattern, "comparing")
    with tick as progress:
        if quant is not None:
            res = ops.compare_files(path, quant, pattern=pattern, n_inputs=n_inputs, seed=seed, activations=acts,
                                    histograms=bool(plot_dir), progress=progress)
        else:
            fmts = [t.strip() for t in tags.split(",") if t.strip()]
            if not fmts:
                raise click.UsageError("--formats needs at least one tag")
            res = ops.compare(path, fmts, pattern=pattern, n_inputs=n_inputs, seed=seed, activations=acts,
                              fallback=fallback, histograms=bool(plot_dir), progress=progress)
    if plot_dir:
        res["plots"] = ops.plot_compare(res, plot_dir)
        for s in [*res["summary"].values(), res.get("total") or {}]:
            s.pop("error_histogram", None)

    def fmt(v, spec=".4g"):
        return "-" if v is None else format(v, spec)

    def snr(v):
        return "inf" if v is None else f"{v:.2f}"

    def summary_row(name, s):
        if not s.get("tensors"):
            return [name, 0, "-", "-", "-", "-", "-", "-"]
        return [name, s["tensors"], s.get("fallbacks", "-"), fmt(s["bits_per_weight"]), fmt(s["rmse"]),
                fmt(s["max_abs"]), snr(s["snr_db"]), fmt(s["matmul_rel_err"], ".3g")]

    heads = ["rmse", "max abs", "SNR dB", "matmul rel"]

    def render_formats():
        if res["tensors"]:
            out.table(["tensor", "from", "format", "stored as", "bpw", *heads, "activations"],
                      [[r["tensor"], r["source_tag"], r["format"], r["tag"] + (" (fallback)" if r["fallback"] else ""),
                        fmt(r["bits_per_weight"]), fmt(r["rmse"]), fmt(r["max_abs"]), snr(r["snr_db"]),
                        fmt(r["matmul_rel_err"], ".3g"), r["activations"]] for r in res["tensors"]],
                      right={4, 5, 6, 7, 8})
            out.echo("")
        out.echo(f"summary (per format, over the same tensors: where a format's blocks do not fit a shape the "
                 f"fallback {res['fallback']} stands in, as convert would store it):")
        out.table(["format", "tensors", "fallbacks", "bpw", *heads],
                  [summary_row(tag, s) for tag, s in res["summary"].items()], right={1, 2, 3, 4, 5, 6, 7})
        if res["skipped"]:
            out.echo(f"not compared: {len(res['skipped'])} (tensor, format) pairs:")
            for s in res["skipped"]:
                out.echo(f"  {s['tensor']} {s['shape']} {s['tag']}: {s['reason']}")

    def render_files():
        if res["tensors"]:
            out.table(["tensor", "shape", "source tag", "tag", "bpw", *heads, "activations"],
                      [[r["tensor"], "x".join(map(str, r["shape"])), r["source_tag"],
                        r["tag"] + (" (fallback)" if r.get("fallback") else ""),
                        fmt(r["bits_per_weight"]), fmt(r["rmse"]), fmt(r["max_abs"]), snr(r["snr_db"]),
                        fmt(r["matmul_rel_err"], ".3g"), r["activations"] or "-"] for r in res["tensors"]],
                      right={4, 5, 6, 7, 8})
            out.echo("")
        out.echo(f"summary ({res['quant']} against {res['orig']}, per tag of the quantized file):")
        out.table(["tag", "tensors", "fallbacks", "bpw", *heads],
                  [*(summary_row(tag, s) for tag, s in res["summary"].items()), summary_row("all", res["total"])],
                  right={1, 2, 3, 4, 5, 6, 7})
        for key, what in (("only_in_orig", "only in ORIG"), ("only_in_quant", "only in QUANT")):
            if res[key]:
                shown = res[key] if len(res[key]) <= 12 else res[key][:8] + [f"... {len(res[key]) - 8} more"]
                out.echo(f"{what} ({len(res[key])}): " + ", ".join(shown))
        for s in res["not_compared"]:
            out.echo(f"not compared: {s['tensor']}: {s['reason']}")

    def render():
        (render_files if quant is not None else render_formats)()
        out.echo(f"matmul error measured on: {res['activations']}")
        missing = sorted({r["tensor"] for r in res["tensors"] if r["activations"] == ops.RANDOM})
        if acts is not None and missing:
            out.echo(f"note: {len(missing)} tensors had no matching activations and used {ops.RANDOM} inputs: "
                     + ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))
        for p in res.get("plots", []):
            out.echo(f"wrote {p}")

    out.emit(res, render)


def _check_file_command(name: str, hidden: bool = False):
    @click.command(name, hidden=hidden)
    @click.argument("path", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
    @click.option("--against", type=click.Path(exists=True), metavar="MODEL",
                  help="Also require every tensor (tag, shape, bytes) (and GGUF key-values) to equal MODEL's.")
    @output_options("Print the report as JSON.")
    def command(path, against, out):
        """Verify a model file with a reader we did not write: a GGUF file with the gguf package's
        reader, a safetensors/quantfmt file with the safetensors library's; each must agree with
        quantfmt's reader on every tensor's type, shape and bytes. --against compares with a model
        file (e.g. the one it was converted from). Exit 1 on any problem."""
        from ..ops.verify import verify

        if hidden:
            out.note(f"note: `quantfmt {name}` is now `quantfmt check-file`")
        rep = verify(path, against)

        def render():
            if "by_type" in rep:
                types = ", ".join(f"{n} {t}" for t, n in sorted(rep["by_type"].items()))
                out.echo(f"{path}: GGUF v{rep['version']}, alignment {rep['alignment']}, {rep['key_values']} "
                         f"key-values, {rep['tensors']} tensors ({types})")
                out.echo("ok: quantfmt's pre-scan and reader accept it; "
                         "the gguf package's reader agrees on every tensor")
            else:
                tags = ", ".join(f"{n} {t}" for t, n in sorted(rep["by_tag"].items()))
                out.echo(f"{path}: safetensors, {rep['tensors']} tensors ({tags})")
                out.echo("ok: quantfmt's reader accepts it; the safetensors library's reader agrees on every tensor")
            if against:
                what = "every tensor (tag, shape, bytes)" + (" and the key-values" if "by_type" in rep else "")
                out.echo(f"ok: {what} equal {against}")

        out.emit(rep, render)

    return command


check_file = _check_file_command("check-file")
gguf_check_alias = _check_file_command("gguf-check", hidden=True)  # the name before check-file
