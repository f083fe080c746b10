"""Commands on model files: `convert`, `dequantize`, `inspect`, `compare`, `check-file`."""

from __future__ import annotations

import json
import math

import click

from .output import output_options, size


def _run_convert(src, dst, recipe, overwrite, out, strict=False, label="converting"):
    """A progress bar on a terminal; otherwise a line per tensor on stderr, as llama-quantize logs."""
    import sys

    from ..ops.convert import convert, plan_convert
    from ..sources import open_model

    total = 0
    tty = sys.stderr.isatty()
    if not out.quiet and not out.as_json and tty:
        with open_model(src) as m:
            total = sum(plan_convert(m, recipe).out_bytes.values())

    def log(i, s, rep):
        shape = "x".join(map(str, rep.shapes[s.name])) or "()"
        change = s.tag if s.copy else f"{s.src_tag} -> {s.tag}"
        out.note(f"[{i + 1:4d}/{len(rep.steps)}] {s.name:48s} {shape:>14s}  {change:14s} "
                 f"{size(rep.out_bytes[s.name]):>10s}  {rep.seconds[s.name]:6.2f} s  ({s.why})")

    with out.progress(total, label) as update:
        return convert(src, dst, recipe, overwrite=overwrite, strict=strict, progress=update,
                       on_tensor=None if tty else log)


def _report_dict(rep) -> dict:
    return {
        "output": rep.output,
        "tensors": [{"name": s.name, "source_tag": s.src_tag, "tag": s.tag, "why": s.why, "wanted": s.wanted,
                     "shape": list(rep.shapes[s.name]), "in_bytes": rep.in_bytes[s.name],
                     "out_bytes": rep.out_bytes[s.name], "seconds": rep.seconds.get(s.name)} for s in rep.steps],
        "by_tag": {t: {"tensors": n, "weights": w, "bytes": b} for t, (n, w, b) in rep.by_tag().items()},
        "in_bytes": sum(rep.in_bytes.values()),
        "out_bytes": sum(rep.out_bytes.values()),
    }


def _print_report(rep, out) -> None:
    rows = []
    for tag, (n, weights, nbytes) in sorted(rep.by_tag().items()):
        rows.append([tag, n, weights, size(nbytes), f"{8.0 * nbytes / weights:.3g}" if weights else "-"])
    out.echo(rep.output if rep.output.startswith("(") else f"wrote {rep.output}")
    out.table(["tag", "tensors", "weights", "size", "bpw"], rows, right={1, 2, 3, 4})
    tin, tout = sum(rep.in_bytes.values()), sum(rep.out_bytes.values())
    copied = sum(1 for s in rep.steps if s.copy)
    weights = sum(w for _, w, _ in rep.by_tag().values())
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
              help="Default format of the tensors no rule names ('keep', or nothing at all: keep each one's format).")
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
@output_options("Print the conversion report as JSON (per tensor: tags, sizes, why).")
def convert(src, dst, to, rules, recipe_file, fallback, strict, overwrite, dry_run, out):
    """Convert a model (safetensors, sharded index, GGUF) to quantfmt/safetensors, or GGUF if OUT ends in .gguf.

    Streams tensor by tensor; OUT appears only when complete. Tensors that keep their format
    are copied byte for byte. 1-D tensors and norms stay as they are unless a rule names them
    explicitly (its pattern has no '*', or mentions 'norm').
    """
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

        out.emit(_report_dict(rep), render)
        return
    if dst is None:
        raise click.UsageError("give OUT, the file to write (or --dry-run to only show the plan)")
    rep = _run_convert(src, dst, recipe, overwrite, out, strict=strict)
    out.emit(_report_dict(rep), lambda: _print_report(rep, out))


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
    out.emit(_report_dict(rep), lambda: _print_report(rep, out))


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
@click.option("--formats", "tags", required=True, metavar="TAG,TAG,...", help="Formats to try, comma-separated.")
@click.option("--tensors", "pattern", metavar="PATTERN", help="Only the tensors whose name matches (fnmatch).")
@click.option("--inputs", "n_inputs", default=4, show_default=True, type=click.IntRange(1, 65536),
              help="Random input vectors for the matmul error.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@output_options("Print JSON: per tensor and format, skipped, summary.")
def compare(path, tags, pattern, n_inputs, seed, out):
    """Quantize each 2-D tensor of FILE to each format and measure bits per weight, RMSE, max abs
    error, SNR (dB) and the relative error of qmatmul on random inputs against the float matmul."""
    from ..ops.compare import compare as run

    fmts = [t.strip() for t in tags.split(",") if t.strip()]
    if not fmts:
        raise click.UsageError("--formats needs at least one tag")
    res = run(path, fmts, pattern=pattern, n_inputs=n_inputs, seed=seed)

    def snr(v):
        return "inf" if v is None else f"{v:.2f}"

    def render():
        if res["tensors"]:
            out.table(["tensor", "format", "bpw", "rmse", "max abs", "SNR dB", "matmul rel"],
                      [[r["tensor"], r["tag"], f"{r['bits_per_weight']:.4g}", f"{r['rmse']:.4g}",
                        f"{r['max_abs']:.4g}", snr(r["snr_db"]), f"{r['matmul_rel_err']:.3g}"]
                       for r in res["tensors"]], right={2, 3, 4, 5, 6})
            out.echo("")
        out.echo("summary (all compared tensors of each format):")
        out.table(["format", "tensors", "bpw", "rmse", "max abs", "SNR dB", "matmul rel"],
                  [[tag, s["tensors"], f"{s['bits_per_weight']:.4g}", f"{s['rmse']:.4g}", f"{s['max_abs']:.4g}",
                    snr(s["snr_db"]), f"{s['matmul_rel_err']:.3g}"] if s["tensors"] else [tag, 0, "-", "-", "-", "-",
                                                                                           "-"]
                   for tag, s in res["summary"].items()], right={1, 2, 3, 4, 5, 6})
        if res["skipped"]:
            out.echo(f"skipped {len(res['skipped'])} (tensor, format) pairs:")
            for s in res["skipped"]:
                out.echo(f"  {s['tensor']} {s['shape']} {s['tag']}: {s['reason']}")

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
