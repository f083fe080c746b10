"""Commands about formats and plugins: `formats`, `plugins`, `check-format` (the conformance kit)."""

from __future__ import annotations

import click

from .output import output_options


@click.command()
@output_options("Print a JSON list instead of a table.")
def formats(out):
    """List the registered formats: tag, block geometry, bits per weight, matmul modes, plugin."""
    from ..plugins import formats as all_formats

    fmts = all_formats()
    rows = [
        [f.tag + (f" ({','.join(f.aliases)})" if f.aliases else ""), f"{f.block_shape[0]}x{f.block_shape[1]}",
         f.block_bytes, f"{f.bits_per_weight:g}", f.layout_version, ",".join(f.modes), f.plugin, f.summary]
        for f in fmts.values()
    ]
    out.emit([f.info() for f in fmts.values()],
             lambda: out.table(["tag", "block", "bytes", "bpw", "ver", "modes", "plugin", "summary"], rows,
                               right={2, 3, 4}))


@click.command()
@output_options("Print a JSON list instead of a table.")
def plugins(out):
    """List the plugins that were found, where from, and the formats each registered."""
    from ..plugins import plugin_list

    recs = plugin_list()
    rows = [[p["name"], p["source"], ",".join(p["formats"]) or "-", "error: " + p["error"] if p["error"] else "ok"]
            for p in recs]
    out.emit(recs, lambda: out.table(["plugin", "source", "formats", "status"], rows))


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


def _check(ctx, tags, all_, size, seed, out, verbose):
    from ..plugins import formats as all_formats
    from ..plugins import get_format
    from ..testing import check_format

    if all_ == bool(tags):
        raise click.UsageError("give format tags or --all (not both)")
    import sys

    fmts = list(all_formats().values()) if all_ else [get_format(t) for t in dict.fromkeys(tags)]
    reports = []
    with out.progress(len(fmts), "checking") as update:
        for i, f in enumerate(fmts):
            reports.append(check_format(f, seed=seed, size=size))
            if sys.stderr.isatty():
                update(1)
            elif len(fmts) > 1 and not out.as_json:
                r = reports[-1]
                out.note(f"[{i + 1:3d}/{len(fmts)}] {f.tag}: {'ok' if r.ok else 'FAIL'} "
                         f"({len(r) - len(r.failures)}/{len(r)} checks)")

    def render():
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
        out.table(["tag", "bpw", "rmse", "rel_rmse", "on N(0,1)", "checks", "status", "plugin"], rows,
                  right={1, 2, 3, 5})
        for r in reports:
            shown = list(r) if verbose else r.failures
            if shown:
                out.echo(f"\n{r.tag}:")
                for c in shown:
                    out.echo(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}")

    out.emit([r.to_dict() for r in reports], render)
    bad = [r.tag for r in reports if not r.ok]
    if bad:
        click.echo(f"{len(bad)} of {len(reports)} formats fail the conformance kit: " + ", ".join(bad), err=True)
        ctx.exit(1)


def _check_command(name: str, hidden: bool = False):
    @click.command(name, hidden=hidden)
    @click.argument("tags", nargs=-1)
    @click.option("--all", "all_", is_flag=True, help="Check every registered format.")
    @click.option("--size", callback=_parse_size, metavar="ROWSxCOLS",
                  help="Also measure the round-trip RMSE on N(0,1) weights of this size (rounded up to whole blocks).")
    @click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of test data.")
    @output_options("Print every check of every format as JSON.")
    @click.option("-v", "--verbose", is_flag=True, help="List every check, not only the failed ones.")
    @click.pass_context
    def command(ctx, tags, all_, size, seed, out, verbose):
        """Run the conformance kit (quantfmt.testing) on formats; exit code 1 if any check fails.

        `quantfmt check-format --all --size 4096x4096` reports each format's round-trip RMSE on
        N(0,1) weights and its bits per weight.
        """
        if hidden:
            out.note(f"note: `quantfmt {name}` is now `quantfmt check-format`")
        _check(ctx, tags, all_, size, seed, out, verbose)

    return command


check_format = _check_command("check-format")
check_alias = _check_command("check", hidden=True)  # the verb's name before check-format/check-file
