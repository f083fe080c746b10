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
        return "  ".join((c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

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


# ---- model files: convert, inspect, dequantize, compare -------------------------------


# ---- gguf ------------------------------------------------------------------------------


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
@click.option("--quick", is_flag=True, help="A fast subset: two shapes, no cache or file figures, 3 repeats.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per measurement (JSON lines).")
@click.pass_context
def bench(ctx, tags, shapes, ops, repeat, threads, quick, as_json):
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
        for flag, val in (("--formats", tags), ("--shapes", shapes), ("--ops", ops)):
            if val:
                args += [flag, val]
        args += ["--quick"] * quick + ["--json"] * as_json
        ctx.exit(subprocess.call(args, env=env))

    def emit(rec):
        click.echo(json.dumps(rec))

    def progress(msg):
        click.echo(f"... {msg}", err=True)

    runner = b.Bench(
        formats=[t.strip() for t in tags.split(",") if t.strip()] or None, shapes=shape_list, ops=op_list,
        repeat=repeat, threads=threads, quick=quick, emit=emit if as_json else None, progress=progress,
    )
    records = runner.run()
    if not as_json:
        b.tables(records, click.echo)


def main() -> None:
    cli(prog_name="quantfmt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
