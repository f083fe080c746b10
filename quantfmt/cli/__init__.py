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


# Set to 1 for the interpreter's full shutdown after a command (module teardown, garbage collection),
# e.g. to debug a leak or a finalizer; by default the `quantfmt` command skips it (see _exit).
FULL_EXIT_ENV = "QUANTFMT_FULL_EXIT"


def main() -> None:
    """The `quantfmt` console command: run it, then leave without the interpreter's teardown (_exit)."""
    from ..gcpause import freeze_imports

    freeze_imports()  # a short-lived process: plugin imports leave the collector's sight (gcpause)
    try:
        cli(prog_name="quantfmt")  # click's standalone mode exits with the command's code itself
    except SystemExit as e:
        _exit(e.code)
        raise
    _exit(0)  # pragma: no cover - standalone mode always raises SystemExit


def _exit(code) -> None:
    """End the process now, once everything a normal exit would finish is finished; return only when
    a normal exit is wanted (FULL_EXIT_ENV) or a step failed (the caller then exits normally).

    Why: after a command that ran a numba kernel, the interpreter's own shutdown (clearing every
    module, full garbage collections over numba's and llvmlite's ~10^5 objects, LLVM's finalizers)
    took 0.3-0.6 s, measured from the last atexit handler to the parent seeing the exit (2-core
    machine): a quarter of `quantfmt convert` of a 500 MB model. Nothing in it is work a user can
    see: every output is already complete (written, fsynced and renamed inside the command). What a
    normal exit does that can matter is done here, in its order: Python threads are joined (thread
    pools' exit hooks run first, as at shutdown), atexit handlers run (coverage, logging, a parent's
    probes), stdout and stderr are flushed; then os._exit with the command's code."""
    import os
    import sys

    if os.environ.get(FULL_EXIT_ENV, "") not in ("", "0"):
        return
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what Py_Finalize calls first (CPython)
    if shutdown is None or threading.current_thread() is not threading.main_thread():
        return
    try:
        shutdown()
        atexit._run_exitfuncs()
    except BaseException:  # a handler failed or was interrupted: leave it to the normal exit
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:  # sys.exit("message"): printed to stderr, status 1, as the interpreter does
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BrokenPipeError:  # the reader left (`quantfmt ... | head`): as click's handler, status 141
            status = status or 141
        except (OSError, ValueError):
            status = status or 120  # what the interpreter returns when flushing stdout fails at exit
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
