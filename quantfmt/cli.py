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


def main() -> None:
    cli(prog_name="quantfmt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
