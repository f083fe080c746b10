"""The `quantfmt` command: parses arguments, calls the library, prints (through cli.output).

Heavy modules (numpy, numba, plugins) are imported inside commands, so `quantfmt --help`
stays fast. Every QuantfmtError becomes a one-line "Error: ..." and exit code 1; an
interrupted command exits 130. No command prints a traceback for bad input.
"""

from __future__ import annotations

import warnings

import click

from ..errors import QuantfmtError
from . import bench, files, formats, llm


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
@click.option(
    "--gguf-unsupported",
    type=click.Choice(["error", "dequantize"]),
    envvar="QUANTFMT_GGUF_UNSUPPORTED",
    help="GGUF tensors of a ggml type no format stores: an error (default), or dequantized to F32 when used "
         "(env QUANTFMT_GGUF_UNSUPPORTED).",
)
def cli(plugins_dir, strict_plugins, gguf_unsupported):
    """quantfmt: quantization formats keyed by FourCC tags, their kernels, and model files."""
    import os

    from .. import plugins

    plugins.configure(plugins_dirs=list(plugins_dir) or None, strict=strict_plugins or None)
    if gguf_unsupported:
        os.environ["QUANTFMT_GGUF_UNSUPPORTED"] = gguf_unsupported  # read by the GGUF reader


for _cmd in (formats.formats, formats.plugins, formats.check_format, formats.check_alias,
             files.convert, files.dequantize, files.inspect, files.compare, files.check_file, files.gguf_check_alias,
             llm.run, llm.eval_, bench.bench):
    cli.add_command(_cmd)


def main() -> None:
    cli(prog_name="quantfmt")  # click's standalone mode exits with the command's code itself


if __name__ == "__main__":  # pragma: no cover
    main()
