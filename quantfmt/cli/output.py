"""One output path for every command: tables and lines on stdout, or one JSON document with
--json; notes and progress on stderr, silenced by -q/--quiet; a progress bar only on a terminal.

Commands build their result as data and hand it to `Output.emit(data, render)`: `render`
prints the human form through `out.table`/`out.echo`, and --json prints `data` instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys

import click

from .. import table


class Output:
    def __init__(self, as_json: bool = False, quiet: bool = False):
        self.as_json = as_json
        self.quiet = quiet

    def echo(self, text: str = "") -> None:
        if not self.as_json:
            click.echo(text)

    def table(self, headers, rows, right=()) -> None:
        # one write, not one per line: `inspect` of a file of 2**20 tensors printed (and flushed) 2**20 times
        self.echo("\n".join(table.text_lines(headers, rows, right)))

    def note(self, text: str) -> None:
        """A remark for the user on stderr (not part of the result); -q silences it."""
        if not self.quiet:
            click.echo(text, err=True)

    def emit(self, data, render=None) -> None:
        """The command's result: `data` as JSON with --json, else `render()` (or `data` as JSON if none).
        `data` may be a function returning it, called only when JSON is written (a report of 2**20
        tensors is a dict per tensor: not built for a table)."""
        if self.as_json or render is None:
            if callable(data):
                data = data()
            click.echo(json.dumps(data, indent=2, default=str))
        else:
            render()

    def progress(self, length: int, label: str):
        """A context yielding update(n): a progress bar on stderr when it is a terminal, else a no-op."""
        if self.quiet or self.as_json or not sys.stderr.isatty() or length <= 0:
            return contextlib.nullcontext(lambda n: None)

        @contextlib.contextmanager
        def bar():
            with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=False) as b:
                yield b.update

        return bar()


def output_options(json_help: str = "Print the result as JSON."):
    """--json and -q/--quiet, passed to the command as `out`."""

    def deco(f):
        @click.option("--json", "as_json", is_flag=True, help=json_help)
        @click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes on stderr.")
        @functools.wraps(f)
        def wrapper(*args, as_json, quiet, **kw):
            return f(*args, out=Output(as_json, quiet), **kw)

        return wrapper

    return deco


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
