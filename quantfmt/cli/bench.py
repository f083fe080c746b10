"""`quantfmt bench`: parses options and re-runs itself in a child process whose thread counts
are set before numpy loads; the measuring and the tables are in quantfmt.bench."""

from __future__ import annotations

import json
import sys

import click

_BENCH_CHILD = "QUANTFMT_BENCH_CHILD"


@click.command()
@click.option("--formats", "tags", default="", help="Comma-separated tags (default: all registered formats).")
@click.option("--shapes", default="",
              help="Comma-separated ROWSxCOLS (default: 4096x4096,11008x4096,4096x11008,576x1536).")
@click.option("--ops", default="",
              help="Comma-separated subset of: qmatmul,quantize,dequantize,get_rows,startup,cache,e2e,"
                   "model (SmolLM2 prefill/decode vs llama.cpp).")
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="Timed calls per figure (the median is reported; one warm-up call is never timed).")
@click.option("--threads", default=None, type=click.IntRange(1, 1024),
              help="Threads for BLAS and numba (default: the number of CPUs).")
@click.option("--e2e-mb", default=500, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Size of the float32 model the e2e figures convert (MB).")
@click.option("--quick", is_flag=True,
              help="A fast subset: shape 11008x4096 only, no cache or file figures, 3 repeats.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per measurement (JSON lines).")
@click.option("--records", "records_path", type=click.Path(dir_okay=False, writable=True),
              help="Also write the JSON records to this file (re-print: python -m quantfmt.bench FILE).")
@click.pass_context
def bench(ctx, tags, shapes, ops, repeat, threads, e2e_mb, quick, as_json, records_path):
    """Time every format's kernels against numpy float32 and gguf, print ratios and PASS/MISS per target.

    Runs in a child process whose BLAS and numba thread counts are set before numpy loads.
    """
    import os
    import subprocess

    from .. import bench as b

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
        from .. import plugins

        env = b.thread_env(threads)
        env[_BENCH_CHILD] = str(threads)
        if plugins._config["plugins_dirs"]:
            env["QUANTFMT_PLUGINS_DIR"] = os.pathsep.join(plugins._config["plugins_dirs"])
        if plugins._config["strict"]:
            env["QUANTFMT_STRICT_PLUGINS"] = "1"
        args = [sys.executable, "-m", "quantfmt.cli", "bench"]
        args += ["--repeat", str(repeat), "--threads", str(threads), "--e2e-mb", str(e2e_mb)]
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
        repeat=repeat, threads=threads, quick=quick, emit=emit, progress=progress, e2e_mb=e2e_mb,
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
