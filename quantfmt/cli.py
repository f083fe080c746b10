"""The `quantfmt` command: parses arguments, calls the library, prints.

Heavy modules (numpy, numba, plugins) are imported inside commands, so `quantfmt --help`
stays fast. Every QuantfmtError becomes a one-line "Error: ..." and exit code 1; an
interrupted command exits 130. No command prints a traceback for bad input.
"""

from __future__ import annotations

import json
import sys
import warnings

import click

from .errors import QuantfmtError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    return super().invoke(ctx)
                finally:
                    _print_warnings(caught)
        except QuantfmtError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            ctx.exit(141)


def _print_warnings(caught) -> None:
    for w in caught:
        if issubclass(w.category, DeprecationWarning):
            continue
        click.echo(f"Warning: {w.message}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantfmt")
@click.option(
    "--plugins-dir",
    multiple=True,
    type=click.Path(file_okay=False),
    envvar="QUANTFMT_PLUGINS_DIR",
    help="Also load format plugins from the .py files in this folder (repeatable; env QUANTFMT_PLUGINS_DIR).",
)
@click.option(
    "--strict-plugins",
    is_flag=True,
    envvar="QUANTFMT_STRICT_PLUGINS",
    help="A plugin that fails to load is an error, not a warning.",
)
def cli(plugins_dir, strict_plugins):
    """quantfmt: quantization formats keyed by FourCC tags, their kernels, and model files."""
    from . import plugins

    plugins.configure(plugins_dirs=list(plugins_dir) or None, strict=strict_plugins or None)


def _echo_table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(r):
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        return "  ".join(padded).rstrip()

    click.echo(fmt(headers))
    click.echo("  ".join("-" * w for w in widths))
    for r in cells:
        click.echo(fmt(r))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def formats(as_json):
    """List the registered formats: tag, block geometry, bits per weight, matmul modes, plugin."""
    from .plugins import formats as all_formats

    fmts = all_formats()
    if as_json:
        click.echo(json.dumps([f.info() for f in fmts.values()], indent=2))
        return
    rows = [
        [f.tag, f"{f.block_shape[0]}x{f.block_shape[1]}", f.block_bytes, f"{f.bits_per_weight:g}", f.version,
         ",".join(f.modes), f.plugin, f.summary]
        for f in fmts.values()
    ]
    _echo_table(["tag", "block", "bytes", "bpw", "ver", "modes", "plugin", "summary"], rows, right={2, 3, 4})


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def plugins(as_json):
    """List the plugins that were found, where from, and the formats each registered."""
    from .plugins import plugin_list

    recs = plugin_list()
    if as_json:
        click.echo(json.dumps(recs, indent=2))
        return
    rows = [[p["name"], p["source"], ",".join(p["formats"]) or "-", "error: " + p["error"] if p["error"] else "ok"]
            for p in recs]
    _echo_table(["plugin", "source", "formats", "status"], rows)


# ---- check: the conformance kit (quantfmt.testing) -----------------------------------


def _parse_size(ctx, param, value):
    if value is None:
        return None
    try:
        r, c = (int(v) for v in value.lower().split("x"))
        if r < 1 or c < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{value!r} is not ROWSxCOLS of positive integers, e.g. 4096x4096") from None
    return r, c


@cli.command()
@click.argument("tags", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Check every registered format.")
@click.option(
    "--size",
    callback=_parse_size,
    metavar="ROWSxCOLS",
    help="Also measure the round-trip RMSE on N(0,1) weights of this size (rounded up to whole blocks).",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of test data.")
@click.option("--json", "as_json", is_flag=True, help="Print every check of every format as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List every check, not only the failed ones.")
@click.pass_context
def check(ctx, tags, all_, size, seed, as_json, verbose):
    """Run the conformance kit (quantfmt.testing) on formats; exit code 1 if any check fails.

    `quantfmt check --all --size 4096x4096` reports each format's round-trip RMSE on
    N(0,1) weights and its bits per weight.
    """
    from .plugins import formats as all_formats
    from .plugins import get_format
    from .testing import check_format

    if all_ == bool(tags):
        raise click.UsageError("give format tags or --all (not both)")
    fmts = list(all_formats().values()) if all_ else [get_format(t) for t in dict.fromkeys(tags)]
    reports = [check_format(f, seed=seed, size=size) for f in fmts]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        key = "size_" if size else ""
        rows = []
        for r in reports:
            m = r.metrics
            shape = m.get(key + "shape")
            rows.append([
                r.tag, f"{r.bits_per_weight:g}",
                "-" if m.get(key + "rmse") is None else f"{m[key + 'rmse']:.5g}",
                "-" if m.get(key + "rel_rmse") is None else f"{m[key + 'rel_rmse']:.5g}",
                "x".join(map(str, shape)) if shape else "-",
                f"{len(r) - len(r.failures)}/{len(r)}", "ok" if r.ok else "FAIL", r.plugin,
            ])
        _echo_table(["tag", "bpw", "rmse", "rel_rmse", "on N(0,1)", "checks", "status", "plugin"], rows,
                    right={1, 2, 3, 5})
        for r in reports:
            shown = list(r) if verbose else r.failures
            if shown:
                click.echo(f"\n{r.tag}:")
                for c in shown:
                    click.echo(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    bad = [r.tag for r in reports if not r.ok]
    if bad:
        click.echo(f"{len(bad)} of {len(reports)} formats fail the conformance kit: " + ", ".join(bad),
                   err=True)
        ctx.exit(1)


# ---- model files: convert, inspect, dequantize, compare -------------------------------


def _progress(length: int, label: str):
    """A click progress bar on stderr when it is a terminal; else a no-op. Yields update(n)."""
    import contextlib

    if not sys.stderr.isatty() or length <= 0:
        return contextlib.nullcontext(lambda n: None)

    @contextlib.contextmanager
    def bar():
        with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=False) as b:
            yield b.update

    return bar()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _run_convert(src, dst, recipe, overwrite, strict=False, label="converting"):
    from .loader import convert, open_model, plan_convert

    size = 0
    if sys.stderr.isatty():
        with open_model(src) as m:
            size = sum(plan_convert(m, recipe).out_bytes.values())
    with _progress(size, label) as update:
        return convert(src, dst, recipe, overwrite=overwrite, strict=strict, progress=update)


def _print_report(rep) -> None:
    rows = []
    for tag, (n, weights, nbytes) in sorted(rep.by_tag().items()):
        rows.append([tag, n, weights, _size(nbytes), f"{8.0 * nbytes / weights:.3g}" if weights else "-"])
    click.echo(f"wrote {rep.output}")
    _echo_table(["tag", "tensors", "weights", "size", "bpw"], rows, right={1, 2, 3, 4})
    tin, tout = sum(rep.in_bytes.values()), sum(rep.out_bytes.values())
    copied = sum(1 for s in rep.steps if s.copy)
    click.echo(f"total: {_size(tin)} -> {_size(tout)}; {len(rep.steps) - copied} tensors converted, "
               f"{copied} copied unchanged")
    fbs = rep.fallbacks
    for s in fbs if len(fbs) <= 12 else fbs[:8]:
        click.echo(f"fallback: {s.name} {list(rep.shapes[s.name])}: {s.wanted} does not fit this shape, "
                   f"stored as {s.tag}")
    if len(fbs) > 12:
        click.echo(f"fallback: ... and {len(fbs) - 8} more ({len(fbs)} in all; `quantfmt inspect --json OUT` "
                   "lists them under recipe.fallbacks)")
    if rep.requantized:
        click.echo(f"note: {len(rep.requantized)} tensors were already quantized and were requantized "
                   "(e.g. " + ", ".join(f"{s.name} {s.src_tag}->{s.tag}" for s in rep.requantized[:3])
                   + "): quantization error compounds; convert from the float original when you can")


@cli.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("dst", metavar="OUT", type=click.Path())
@click.option("--to", "to", metavar="TAG", help="Default format of the tensors no rule names.")
@click.option("--rule", "rules", multiple=True, metavar="PATTERN=TAG",
              help="Give tensors whose name matches PATTERN (fnmatch: *, ?, [..]) format TAG ('keep' = unchanged); "
                   "first match wins; repeatable; before the recipe file's rules.")
@click.option("--recipe", "recipe_file", type=click.Path(exists=True, dir_okay=False),
              help="A JSON recipe file: {\"default\": TAG, \"fallback\": TAG, \"rules\": [{\"pattern\", \"tag\"}]}.")
@click.option("--fallback", metavar="TAG", help="Format for tensors whose shape does not fit theirs (default F16).")
@click.option("--strict", is_flag=True,
              help="A tensor whose shape does not fit its format is an error, not a fallback.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never an input).")
def convert(src, dst, to, rules, recipe_file, fallback, strict, overwrite):
    """Convert a model (safetensors, sharded index, GGUF) to quantfmt/safetensors, or GGUF if OUT ends in .gguf.

    Streams tensor by tensor; OUT appears only when complete. Tensors that keep their format
    are copied byte for byte. 1-D tensors and norms stay as they are unless a rule names them
    explicitly (its pattern has no '*', or mentions 'norm').
    """
    from .recipe import Recipe

    if to is None and not rules and recipe_file is None:
        raise click.UsageError("say what to convert to: --to TAG, --rule PATTERN=TAG or --recipe FILE")
    recipe = Recipe.from_options(to=to, rules=rules, fallback=fallback, strict=strict, file=recipe_file)
    rep = _run_convert(src, dst, recipe, overwrite, strict=strict)
    _print_report(rep)


@cli.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("dst", metavar="OUT", type=click.Path())
@click.option("--dtype", type=click.Choice(["F32", "F16", "BF16"]), default="F32", show_default=True,
              help="Float format of every tensor of OUT.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never an input).")
def dequantize(src, dst, dtype, overwrite):
    """Write a plain float safetensors file: every tensor of IN dequantized to --dtype."""
    from .recipe import Recipe

    recipe = Recipe(default=dtype, fallback=None, protect=False)
    rep = _run_convert(src, dst, recipe, overwrite, label="dequantizing")
    _print_report(rep)


@cli.command()
@click.argument("path", metavar="FILE", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON: tensors, totals, recipe, metadata.")
def inspect(path, as_json):
    """List every tensor of a model file: name, tag, shape, bytes, bits per weight; totals; recipe; metadata."""
    from .loader import describe, open_model

    with open_model(path) as m:
        d = describe(m)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    _echo_table(["tensor", "tag", "shape", "bytes", "bpw"],
                [[t["name"], t["tag"], "x".join(map(str, t["shape"])) or "()", t["bytes"],
                  f"{t['bits_per_weight']:.4g}"] for t in d["tensors"]], right={3, 4})
    tot = d["totals"]
    click.echo("")
    click.echo(f"{tot['tensors']} tensors, {tot['weights']} weights, {_size(tot['bytes'])} "
               f"({tot['bits_per_weight']:.4g} bits per weight)")
    for tag, a in sorted(tot["by_tag"].items()):
        click.echo(f"  {tag}: {a['tensors']} tensors, {a['weights']} weights, {_size(a['bytes'])}")
    if d["recipe"] is not None:
        rec = dict(d["recipe"])
        fbs = rec.pop("fallbacks", None) or {}
        click.echo("recipe: " + json.dumps(rec))
        if fbs:
            shown = ", ".join(f"{n} ({f.get('wanted')}->{f.get('used')})" for n, f in list(fbs.items())[:5]
                              if isinstance(f, dict))
            click.echo(f"fallbacks: {len(fbs)}: {shown}" + (", ..." if len(fbs) > 5 else ""))
    if d["metadata"]:
        click.echo("metadata:")
        for k, v in d["metadata"].items():
            s = json.dumps(v, default=str)
            click.echo(f"  {k}: {s if len(s) <= 100 else s[:97] + '...'}")


@cli.command()
@click.argument("path", metavar="FILE", type=click.Path(exists=True))
@click.option("--formats", "tags", required=True, metavar="TAG,TAG,...", help="Formats to try, comma-separated.")
@click.option("--tensors", "pattern", metavar="PATTERN", help="Only the tensors whose name matches (fnmatch).")
@click.option("--inputs", "n_inputs", default=4, show_default=True, help="Random input vectors for the matmul error.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: per tensor and format, skipped, summary.")
def compare(path, tags, pattern, n_inputs, seed, as_json):
    """Quantize each 2-D tensor of FILE to each format and measure bits per weight, RMSE, max abs
    error, SNR (dB) and the relative error of qmatmul on random inputs against the float matmul."""
    from .loader import compare as run

    fmts = [t.strip() for t in tags.split(",") if t.strip()]
    if not fmts:
        raise click.UsageError("--formats needs at least one tag")
    res = run(path, fmts, pattern=pattern, n_inputs=n_inputs, seed=seed)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return

    def snr(v):
        return "inf" if v is None else f"{v:.2f}"

    if res["tensors"]:
        _echo_table(["tensor", "format", "bpw", "rmse", "max abs", "SNR dB", "matmul rel"],
                    [[r["tensor"], r["tag"], f"{r['bits_per_weight']:.4g}", f"{r['rmse']:.4g}",
                      f"{r['max_abs']:.4g}", snr(r["snr_db"]), f"{r['matmul_rel_err']:.3g}"]
                     for r in res["tensors"]], right={2, 3, 4, 5, 6})
        click.echo("")
    click.echo("summary (all compared tensors of each format):")
    _echo_table(["format", "tensors", "bpw", "rmse", "max abs", "SNR dB", "matmul rel"],
                [[tag, s["tensors"], f"{s['bits_per_weight']:.4g}", f"{s['rmse']:.4g}", f"{s['max_abs']:.4g}",
                  snr(s["snr_db"]), f"{s['matmul_rel_err']:.3g}"] if s["tensors"] else [tag, 0, "-", "-", "-", "-", "-"]
                 for tag, s in res["summary"].items()], right={1, 2, 3, 4, 5, 6})
    if res["skipped"]:
        click.echo(f"skipped {len(res['skipped'])} (tensor, format) pairs:")
        for s in res["skipped"]:
            click.echo(f"  {s['tensor']} {s['shape']} {s['tag']}: {s['reason']}")


# ---- gguf ------------------------------------------------------------------------------


@cli.command("gguf-check")
@click.argument("path", metavar="FILE.gguf", type=click.Path(exists=True, dir_okay=False))
@click.option("--against", type=click.Path(exists=True), metavar="MODEL",
              help="Also require every tensor (tag, shape, bytes) and the GGUF key-values to equal MODEL's.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def gguf_check(path, against, as_json):
    """Validate a GGUF file: quantfmt's bounded pre-scan and reader, then the gguf package's own
    reader must agree with ours on every tensor's type, shape and bytes; --against compares with a
    model file (e.g. the quantfmt file it was exported from). Exit 1 on any problem."""
    from .gguf_io import check_gguf

    rep = check_gguf(path, against)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
        return
    types = ", ".join(f"{n} {t}" for t, n in sorted(rep["by_type"].items()))
    click.echo(f"{path}: GGUF v{rep['version']}, alignment {rep['alignment']}, {rep['key_values']} key-values, "
               f"{rep['tensors']} tensors ({types})")
    click.echo("ok: quantfmt's pre-scan and reader accept it; "
               "the gguf package's reader agrees on every tensor")
    if against:
        click.echo(f"ok: every tensor (tag, shape, bytes) and the key-values equal {against}")


# ---- bench -----------------------------------------------------------------------------

_BENCH_CHILD = "QUANTFMT_BENCH_CHILD"


@cli.command()
@click.option("--formats", "tags", default="", help="Comma-separated tags (default: all registered formats).")
@click.option("--shapes", default="",
              help="Comma-separated ROWSxCOLS (default: 4096x4096,11008x4096,4096x11008,576x1536).")
@click.option("--ops", default="",
              help="Comma-separated subset of: qmatmul,quantize,dequantize,get_rows,startup,cache,e2e.")
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="Timed calls per figure (the median is reported; one warm-up call is never timed).")
@click.option("--threads", default=None, type=click.IntRange(1, 1024),
              help="Threads for BLAS and numba (default: the number of CPUs).")
@click.option("--quick", is_flag=True,
              help="A fast subset: shape 11008x4096 only, no cache or file figures, 3 repeats.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per measurement (JSON lines).")
@click.option("--records", "records_path", type=click.Path(dir_okay=False, writable=True),
              help="Also write the JSON records to this file (re-print: python -m quantfmt.bench FILE).")
@click.pass_context
def bench(ctx, tags, shapes, ops, repeat, threads, quick, as_json, records_path):
    """Time every format's kernels against numpy float32 and gguf, print ratios and PASS/MISS per target.

    Runs in a child process whose BLAS and numba thread counts are set before numpy loads.
    """
    import os
    import subprocess

    from . import bench as b

    try:
        shape_list = b.parse_shapes(shapes) if shapes else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--shapes") from None
    op_list = [o.strip() for o in ops.split(",") if o.strip()] or None
    bad = [o for o in op_list or () if o not in b.OPS]
    if bad:
        raise click.BadParameter(f"unknown op {bad[0]!r}; choose from {', '.join(b.OPS)}", param_hint="--ops")
    threads = threads or os.cpu_count() or 1
    if quick and ctx.get_parameter_source("repeat") == click.core.ParameterSource.DEFAULT:
        repeat = 3

    if os.environ.get(_BENCH_CHILD) != str(threads):
        # numpy (and its OpenBLAS) is already loaded here; thread counts only hold if set before that.
        from . import plugins

        env = b.thread_env(threads)
        env[_BENCH_CHILD] = str(threads)
        if plugins._config["plugins_dirs"]:
            env["QUANTFMT_PLUGINS_DIR"] = os.pathsep.join(plugins._config["plugins_dirs"])
        if plugins._config["strict"]:
            env["QUANTFMT_STRICT_PLUGINS"] = "1"
        args = [sys.executable, "-m", "quantfmt.cli", "bench"]
        args += ["--repeat", str(repeat), "--threads", str(threads)]
        opts = (("--formats", tags), ("--shapes", shapes), ("--ops", ops), ("--records", records_path))
        for flag, val in opts:
            if val:
                args += [flag, val]
        args += ["--quick"] * quick + ["--json"] * as_json
        ctx.exit(subprocess.call(args, env=env))

    sink = None

    def emit(rec):
        line = json.dumps(rec)
        if as_json:
            click.echo(line)
        if sink is not None:
            sink.write(line + "\n")
            sink.flush()

    def progress(msg):
        click.echo(f"... {msg}", err=True)

    runner = b.Bench(
        formats=[t.strip() for t in tags.split(",") if t.strip()] or None, shapes=shape_list, ops=op_list,
        repeat=repeat, threads=threads, quick=quick, emit=emit, progress=progress,
    )
    if records_path:
        sink = open(records_path, "w")  # closed in the finally below
    try:
        records = runner.run()
    finally:
        if sink is not None:
            sink.close()
    if not as_json:
        b.tables(records, click.echo)


def main() -> None:
    cli(prog_name="quantfmt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
