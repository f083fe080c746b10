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


# ---- gguf ------------------------------------------------------------------------------


# ---- bench -----------------------------------------------------------------------------


def main() -> None:
    cli(prog_name="quantfmt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
