"""The benchmark report, declared: which tables, which columns, read from records only.

A table is a title, a row selector (records -> rows) and columns, each a header and a function of one
row. REPORT lists the tables in order, with the free lines (environment, notes, the PASS/MISS summary)
between them; `tables()` is the one generic path that turns them into text through quantfmt.table.
`markdown()` does the same for the README's compact summary (SUMMARY: a column per figure, a row per
format). Standard library only: re-printing a records file loads no numpy.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..table import markdown_lines, text_lines
from .records import GET_ROWS_N, PREFILL_N, TARGET_SHAPE, TARGETS, Target, target_of, with_target

# ---- cells and columns --------------------------------------------------------------------


def fmt_s(s) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt(v, spec=".2f", suffix="") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def shape_of(r: dict) -> str:
    return "x".join(str(d) for d in r["shape"]) if r.get("shape") else "-"


Get = str | Callable[[dict], object]  # a record key, or a function of the row


def _get(key: Get, default: object = None) -> Callable[[dict], object]:
    return key if callable(key) else (lambda r: r.get(key, default))


Row = TypeVar("Row")  # what a column reads: a record dict in the tables, a format's group of records in SUMMARY


@dataclass(frozen=True)
class Col(Generic[Row]):
    header: str
    cell: Callable[[Row], object]
    right: bool = False  # numbers are right-aligned


def text(header: str, key: Get, default: object = "") -> Col[dict]:
    return Col(header, _get(key, default))


def secs(header: str, key: Get = "seconds") -> Col[dict]:
    get = _get(key)
    return Col(header, lambda r: fmt_s(get(r)), right=True)


def num(header: str, key: Get, spec: str = ".2f", suffix: str = "") -> Col[dict]:
    get = _get(key)
    return Col(header, lambda r: fmt(get(r), spec, suffix), right=True)


def ratio(header: str, a: str, b: str) -> Col[dict]:
    return num(header, lambda r: r[a] / r[b] if r.get(a) and r.get(b) else None, ".2f", "x")


# columns shared by several tables
FORMAT, SHAPE, MEDIAN = text("format", "format"), Col("shape", shape_of), secs("median")
TARGET, STATUS = text("target", "target"), text("status", "status")
RATIO3, GBPS2, OF_PROBE = num("ratio", "ratio", ".3f", "x"), num("GB/s", "gbps"), num("of probe", "of_probe", ".0%")


@dataclass(frozen=True)
class Table:
    title: str
    rows: Callable[[list[dict]], list[dict]]  # the records -> one dict per row
    cols: tuple[Col, ...]


def op(name: str, **where) -> Callable[[list[dict]], list[dict]]:
    """Select the records of one op whose keys equal `where`."""
    return lambda recs: [r for r in recs if r["op"] == name and all(r.get(k) == v for k, v in where.items())]


BEFORE, AFTER, INTER = "before numba", "after numba", "interleaved with a numba parallel kernel"


def f32_rows(records: list[dict]) -> list[dict]:
    """One row per (shape, n) of the float32 baselines, with the before/after/interleaved times side by side."""
    keyed: dict = {}
    for r in op("f32_matmul")(records):
        keyed.setdefault((tuple(r["shape"]), r["n"]), {"shape": r["shape"], "n": r["n"]})[r["when"]] = r["seconds"]
    return list(keyed.values())


def qmatmul_table(n: int, what: str, call: str) -> Table:
    return Table(
        f"qmatmul {what} (n={n}), QTensor.matmul vs numpy float32 {call} "
        + ("measured just before" if n == 1 else "(their samples taken in alternating rounds)"),
        op("qmatmul", n=n),
        (FORMAT, SHAPE, text("mode", "mode"), MEDIAN, secs("float32", "baseline_seconds"), RATIO3,
         num("GB/s", "gbps", ".1f"), OF_PROBE, secs("prepare", "prepare_seconds"), TARGET, STATUS))


def codec_table(name: str, io: str) -> Table:
    return Table(
        f"{name} (QTensor.{name}), GB/s of float32 {io}", op(name),
        (FORMAT, SHAPE, MEDIAN, text("baseline", "baseline"), secs("base median", "baseline_seconds"), RATIO3, GBPS2,
         OF_PROBE, TARGET, STATUS))


# ---- free lines between the tables ----------------------------------------------------------


def env_lines(records: list[dict]) -> list[str]:
    envs = op("env")(records)
    if not envs:
        return []
    e = envs[0]
    end = f", at end {envs[-1].get('loadavg')}" if len(envs) > 1 else ""
    return [*cpu_lines(records),
        f"threads {e.get('threads')} (BLAS reports {e.get('blas_threads')}, numba {e.get('numba_threads')}, "
        f"layer {e.get('numba_threading_layer')}); numpy {e.get('numpy')}, numba {e.get('numba')}, "
        f"{e.get('cpu_count')} CPUs; load average at start {e.get('loadavg')}{end}"
    ]


def cpu_lines(records: list[dict]) -> list[str]:
    """The CPU and the features kernels choose their paths by (quantfmt.cpu.reported()), if recorded."""
    e = next(iter(op("env")(records)), {})
    if "cpu_features" not in e:
        return []
    return [f"CPU: {e.get('cpu_model') or 'unknown model'}; features detected: "
            f"{' '.join(e['cpu_features']) or 'none of ' + 'the reported ones'}"]


def cache_dir_lines(records: list[dict]) -> list[str]:
    return [f"cache dir after the cold run: {r['cache_files']} files, {r['cache_bytes'] / 1e6:.1f} MB"
            for r in op("cache")(records) if r.get("cache_files") is not None]


def e2e_lines(records: list[dict]) -> list[str]:
    return [f"end to end: {r.get('note')}" for r in op("e2e")(records)]


def model_lines(records: list[dict]) -> list[str]:
    from .model import report_lines  # here, not at the top: model.py builds its table from this module

    return report_lines(records)


def skip_lines(records: list[dict]) -> list[str]:
    lines = [f"skipped {r['format']} {shape_of(r)}: {r['note']}" for r in op("skip")(records)]
    return ["", *lines] if lines else []


def path_rows(records: list[dict]) -> list[dict]:
    """One row per format: the kernel path each op took (records' "path", from Format.kernel_path)."""
    rows: dict = {}
    for r in records:
        if r.get("path") is None or r["op"] not in ("qmatmul", "quantize", "dequantize", "get_rows"):
            continue
        row = rows.setdefault(r["format"], {"format": r["format"]})
        key = f"qmatmul n={r['n']}" if r["op"] == "qmatmul" else r["op"]
        cell = row.setdefault(key, {})
        cell[r.get("mode") or ""] = r["path"]
    return [{k: v if isinstance(v, str) else ", ".join(f"{m} {p}".strip() for m, p in v.items())
             for k, v in row.items()} for row in rows.values()]


def _figure(r: dict, t: Target) -> str:
    if t.kind == "ratio<=":
        value = f"{fmt(r['ratio'], '.2f')}x"
    elif t.kind == "gbps>=":
        value = f"{fmt(r['gbps'], '.2f')} GB/s"
    else:
        value = fmt_s(r["seconds"])
    where = " ".join(str(p) for p in (r["format"], r.get("mode")) if p)
    if t.shape is None and r.get("shape") and tuple(r["shape"]) != TARGET_SHAPE:
        where += f" {shape_of(r)}"
    if r["op"] == "convert" and "(" in (r.get("what") or ""):
        where += " (" + r["what"].rsplit("(", 1)[1]  # which run: input in or out of the page cache
    return f"{where} {value} {r['status']}".strip()


def checklist_lines(records: list[dict]) -> list[str]:
    """Every stated target (records.TARGETS), each with the figures of this run it judges and PASS/MISS,
    or "not measured in this run". Records are judged afresh by the current targets."""
    judged = [with_target(dict(r)) for r in records if r["op"] not in ("env", "skip")]
    counts = {"PASS": 0, "MISS": 0, "-": 0}
    body = []
    for t in TARGETS:
        mine = [r for r in judged if r.get("status") and target_of(r) is t]
        if t.shape is None and any(tuple(r["shape"] or ()) == TARGET_SHAPE for r in mine):
            mine = [r for r in mine if tuple(r["shape"]) == TARGET_SHAPE]  # quantize etc.: the target shape only
        status = "-" if not mine else "MISS" if any(r["status"] == "MISS" for r in mine) else "PASS"
        counts[status] += 1
        figures = [_figure(r, t) for r in mine]
        missing = [tag for tag in t.formats or () if not any(r["format"] == tag for r in mine)]
        if missing:
            figures.append(f"not measured: {', '.join(missing)}")
        if not mine and not missing:
            figures.append("not measured in this run")
        body.append(f"  {status:4s}  {t.what}")
        body += textwrap.wrap("; ".join(figures), 118, initial_indent=" " * 8, subsequent_indent=" " * 8)
    head = f"stated targets, one line each (- = not measured): {counts['PASS']} met, {counts['MISS']} missed, " \
           f"{counts['-']} not measured"
    return ["", head, *body]


def target_lines(records: list[dict]) -> list[str]:
    judged = [r for r in records if r.get("status")]
    if not judged:
        return []
    miss = [r for r in judged if r["status"] == "MISS"]
    return ["", f"targets: {len(judged) - len(miss)} PASS, {len(miss)} MISS"] + [
        f"  MISS {r['op']} {r['format'] or ''} {shape_of(r)} n={r['n']} {r.get('mode', '') or ''}: "
        f"target {r['target']}, got ratio {fmt(r['ratio'], '.3f')} / {fmt(r['gbps'], '.2f')} GB/s "
        f"/ {fmt_s(r['seconds'])}"
        for r in miss
    ]


# ---- the report ---------------------------------------------------------------------------

# In order: a Table, or a function of the records giving free lines.
REPORT: tuple[Table | Callable[[list[dict]], list[str]], ...] = (
    env_lines,
    Table("Memory bandwidth probes", op("membw"), (text("probe", "what"), MEDIAN, num("GB/s", "gbps", ".1f"))),
    Table(
        "numpy float32 baselines (W @ x for n=1, X @ W.T for n=128): before numba ran, after, "
        "interleaved (each call right after a parallel numba kernel)",
        f32_rows,
        (SHAPE, num("n", "n", "d"), secs("before", BEFORE), secs("after", AFTER), ratio("after/before", AFTER, BEFORE),
         secs("interleaved", INTER), ratio("inter/before", INTER, BEFORE)),
    ),
    qmatmul_table(1, "decode", "W @ x"),
    qmatmul_table(PREFILL_N, "prefill", "X @ W.T"),
    codec_table("quantize", "input"),
    codec_table("dequantize", "output"),
    Table(
        f"get_rows ({GET_ROWS_N} random rows, QTensor.rows) vs numpy float32 W[idx]", op("get_rows"),
        (FORMAT, SHAPE, num("rows", "n", "d"), MEDIAN, secs("float32", "baseline_seconds"),
         num("ratio", "ratio", ".2f", "x"), GBPS2),
    ),
    Table(
        "first calls per format (tiny problem, this process): numba compile or on-disk cache load", op("compile"),
        (FORMAT, secs("first calls", lambda r: r["seconds"] + r["baseline_seconds"]),
         secs("second calls", "baseline_seconds"), secs("difference", lambda r: max(0.0, r["seconds"])),
         text("per kernel (s, >= 5 ms)",
              lambda r: ", ".join(f"{k} {v:.2f}" for k, v in r["kernels"].items() if v >= 0.005) or "-")),
    ),
    Table(
        "numba on-disk cache: a fresh process with an empty NUMBA_CACHE_DIR (cold), then another (warm)", op("cache"),
        (FORMAT, secs("cold"), secs("warm", "baseline_seconds"), num("cold/warm", "ratio", ".1f", "x"),
         # CPU seconds of the same first calls (compiling is one thread): what a busy machine does not inflate
         secs("cold CPU", lambda r: r.get("cold_cpu_seconds")),
         text("what", lambda r: r.get("what", "first call of every kernel") if r["seconds"] else r.get("note", ""))),
    ),
    cache_dir_lines,
    Table(
        "start-up (subprocess wall time, median)", op("startup"),
        (text("command", "command"), MEDIAN, secs("python -c pass", "baseline_seconds"),
         text("heavy imports", "heavy_imports"), TARGET, STATUS),
    ),
    Table(
        "quantfmt convert of a float32 model (subprocess: wall time incl. start-up; its peak RSS)", op("convert"),
        (text("what", "what"), num("in MB", "file_mb", ".0f"), num("out MB", "out_mb", ".0f"), secs("wall"),
         num("MB/s in", lambda r: r["gbps"] * 1e3 if r["gbps"] else None, ".0f"),
         num("peak RSS MB", "peak_rss_mb", ".0f"), TARGET, STATUS),
    ),
    Table(
        "parallel conversion F32 -> Q4_0 (fresh process per run, the conversion's wall time incl. starting its "
        "workers; median)", op("parallel"),
        (text("what", "what"), num("in MB", "file_mb", ".0f"), secs("wall"),
         num("MB/s in", lambda r: r["gbps"] * 1e3 if r["gbps"] else None, ".0f"), num("ratio", "ratio", ".2f", "x"),
         num("peak RSS/worker MB", "peak_rss_mb", ".0f"), num("of it at start MB", "worker_start_mb", ".0f"),
         num("largest tensor MB", "largest_mb", ".0f"), TARGET, STATUS),
    ),
    Table(
        "open a file and read one row (fresh process; 'file MB mapped' = resident pages of its mapping)",
        op("open_row"),
        (FORMAT, text("what", "what"), num("file MB", "file_mb", ".0f"), secs("open", "open_seconds"),
         secs("row", "row_seconds"), num("RSS delta MB", "rss_delta_mb", ".1f"),
         num("file MB mapped", "touched_mb", ".2f")),
    ),
    e2e_lines,
    model_lines,
    skip_lines,
    Table(
        "kernel path of each op (Format.kernel_path: which implementation ran, chosen by CPU features and size)",
        path_rows,
        (FORMAT, text("quantize", "quantize"), text("dequantize", "dequantize"), text("get_rows", "get_rows"),
         text("qmatmul n=1", "qmatmul n=1"), text(f"qmatmul n={PREFILL_N}", f"qmatmul n={PREFILL_N}")),
    ),
    checklist_lines,
    target_lines,
)


def table_lines(table: Table, records: list[dict], render=text_lines) -> list[str]:
    """The one generic path: select rows, apply every column, render (nothing for a table without rows)."""
    rows = [[c.cell(r) for c in table.cols] for r in table.rows(records)]
    if not rows:
        return []
    right = {i for i, c in enumerate(table.cols) if c.right}
    gap = [""] if render is markdown_lines else []  # Markdown needs a blank line between a paragraph and a table
    return ["", table.title, *gap, *render([c.header for c in table.cols], rows, right)]


def tables(records: list[dict], echo: Callable[[str], None] = print) -> None:
    """One table per op family, for people."""
    for part in REPORT:
        for line in table_lines(part, records) if isinstance(part, Table) else part(records):
            echo(line)


# ---- the Markdown summary ------------------------------------------------------------------


def _label(r: dict) -> str:
    n = "" if r["n"] is None else f" n={r['n']}"
    mode = f" {r['mode']}" if r.get("mode") else ""
    return f"{r['op']}{n}{mode}"


def _first(group: list[dict], name: str, **where) -> dict | None:
    return next(iter(op(name, **where)(group)), None)


def _qmatmul_cell(n: int, mode: str, *others: str) -> Callable[[list[dict]], str]:
    """The qmatmul ratio of n rows in `mode`, else in the first of `others` the format has (that
    mode's name then follows the figure: the k-quants' activations are "q8_k")."""

    def cell(group):
        for m in (mode, *others):
            r = _first(group, "qmatmul", n=n, mode=m)
            if r:
                return f"{r['ratio']:.2f}x ({fmt_s(r['seconds'])})" + (f" {m}" if m != mode else "")
        return "-"

    return cell


def _codec_cell(name: str) -> Callable[[list[dict]], str]:
    def cell(group):
        r = _first(group, name)
        if not r:
            return "-"
        vs = [f"{1 / r['ratio']:.1f}x gguf"] if r["baseline"].startswith("gguf") else []
        if r.get("ggml_c_seconds"):
            vs.append(f"{r['ggml_c_seconds'] / r['seconds']:.1f}x ggml C")
        return f"{r['gbps']:.2f}" + (f" ({', '.join(vs)})" if vs else "")

    return cell


# The summary's table: a row per format, each cell a function of that format's records at the shape.
SUMMARY: tuple[Col[list[dict]], ...] = (
    Col("format", lambda g: g[0]["format"]),
    Col("bpw", lambda g: f"{next((r.get('bpw') for r in g if r.get('bpw')), 0):g}"),
    Col("decode f32", _qmatmul_cell(1, "f32")),
    Col("decode q8_0", _qmatmul_cell(1, "q8_0", "q8_k")),
    Col("prefill f32", _qmatmul_cell(PREFILL_N, "f32")),
    Col("prefill q8_0", _qmatmul_cell(PREFILL_N, "q8_0", "q8_k")),
    Col("quantize GB/s", _codec_cell("quantize")),
    Col("dequantize GB/s", _codec_cell("dequantize")),
    Col(f"get_rows {GET_ROWS_N}", lambda g: fmt_s(r["seconds"]) if (r := _first(g, "get_rows")) else "-"),
    Col("targets", lambda g: ", ".join(f"{_label(r)} {r['status']}" for r in g if r.get("status")) or "-"),
)

# One sentence per record of these ops, after the table, in record order.
SENTENCES = {
    "startup": lambda r: (
        f"`quantfmt --help`: {fmt_s(r['seconds'])} (python -c pass {fmt_s(r['baseline_seconds'])}; "
        f"heavy imports: {r['heavy_imports']}); target {r.get('target') or '-'} {r.get('status') or ''}."
    ),
    "convert": lambda r: (
        f"{r['what']}: {r['file_mb']:.0f} MB -> {r['out_mb']:.0f} MB in {r['seconds']:.2f} s "
        f"({r['gbps'] * 1e3:.0f} MB/s of input, wall time incl. start-up"
        + (f", median of {r['runs']} runs" if (r.get("runs") or 1) > 1 else "") + "), "
        f"peak RSS {fmt(r['peak_rss_mb'], '.0f')} MB; target {r.get('target') or '-'} {r.get('status') or ''}."
        + (f" Note: {r['bytecode_note']}." if r.get("bytecode_note") else "")
    ),
    "parallel": lambda r: (
        f"{r['what']} ({r['file_mb']:.0f} MB F32 -> {r['format']}): "
        + (f"{r['seconds']:.2f} s, {r['gbps'] * 1e3:.0f} MB/s of input" if r["seconds"] else "")
        + (f"; ratio {r['ratio']:.2f}x" if r["ratio"] is not None else "")
        + (f"; peak RSS per worker {r['peak_rss_mb']:.0f} MB (largest tensor {r['largest_mb']:.0f} MB as float32)"
           if r.get("peak_rss_mb") else "")
        + (f", {r['worker_start_mb']:.0f} MB of it before its first tensor (interpreter, numba, plugins)"
           if r.get("worker_start_mb") else "")
        + (f"; target {r['target']} {r['status']}" if r.get("status") else "") + "."
    ),
    "open_row": lambda r: (
        f"{r['format']} file of {r['file_mb']:.0f} MB, {r['what']}: open {fmt_s(r['open_seconds'])}, "
        f"row {fmt_s(r['row_seconds'])}, RSS +{r['rss_delta_mb']:.1f} MB, "
        f"{r['touched_mb'] * 1e3:.0f} KB of the file mapped."
    ),
}


def _head(records: list[dict], shape: list[int]) -> list[str]:
    """The sentences before the table: threads and load, the float32 baselines at `shape`, the probes."""
    out = [line + "." for line in cpu_lines(records)]
    if envs := op("env")(records):
        e = envs[0]
        out.append(f"Threads: {e.get('threads')} (OpenBLAS reports {e.get('blas_threads')}, "
                   f"numba {e.get('numba_threads')}, layer {e.get('numba_threading_layer')}); "
                   f"load average at start {e.get('loadavg')}, at end {envs[-1].get('loadavg')}.")
    if f32 := {(r["n"], r["when"]): r["seconds"] for r in op("f32_matmul", shape=shape)(records)}:
        out.append(f"numpy float32 at {shape[0]}x{shape[1]}: W @ x {fmt_s(f32.get((1, BEFORE)))} "
                   f"(after numba ran: {fmt_s(f32.get((1, AFTER)))}; right after a numba parallel kernel: "
                   f"{fmt_s(f32.get((1, INTER)))}); X @ W.T with 128 rows {fmt_s(f32.get((PREFILL_N, BEFORE)))}.")
    if probes := op("membw")(records):
        out.append("Bandwidth probes: " + ", ".join(f"{r['what']} {r['gbps']:.1f} GB/s" for r in probes) + ".")
    return out


def _cache_sentence(records: list[dict], tags) -> list[str]:
    comp = [r for r in op("cache")(records) if r["format"] in tags]
    if not comp:
        return []
    part = {r["format"]: r for r in op("cache")(records) if r["seconds"]}
    line = "numba first calls per format in a fresh process (every kernel, tiny problem), cold cache -> warm: "
    line += ", ".join(f"{r['format']} {r['seconds']:.1f} s -> {r['baseline_seconds']:.2f} s" for r in comp)
    if "numba_init" in part:
        line += f"; numba's own start {part['numba_init']['baseline_seconds']:.1f} s"
    if "import" in part:
        line += f"; import + plugins {part['import']['baseline_seconds']:.1f} s"
    if a := part.get("all"):
        line += f"; whole process {a['seconds']:.0f} s cold, {a['baseline_seconds']:.1f} s warm"
    return [line + "."]


def markdown(records: list[dict], shape=TARGET_SHAPE) -> str:
    """A compact Markdown summary (the README's performance section): kernels at `shape`, then the rest."""
    shape = list(shape)
    tags = list(dict.fromkeys(r["format"] for r in records if r["op"] in ("qmatmul", "quantize")))

    def groups(records):
        return [g for tag in tags if (g := [r for r in records if r["format"] == tag and r["shape"] == shape])]

    than = ", and than ggml's C reference on one thread" if any(r.get("ggml_c_seconds") for r in records) else ""
    kernels = Table(f"Kernels at {shape[0]}x{shape[1]}; qmatmul as time / numpy float32 time (median), "
                    f"quantize/dequantize as GB/s of float32 (and x faster than gguf's numpy code{than}):",
                    groups, SUMMARY)
    return "\n".join([
        *_head(records, shape), *table_lines(kernels, records, markdown_lines), "", *_cache_sentence(records, tags),
        *(SENTENCES[r["op"]](r) for r in records if r["op"] in SENTENCES),
    ])
