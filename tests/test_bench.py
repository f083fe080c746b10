"""The benchmark harness on tiny shapes: its records are right (schema, arithmetic, targets); no timing.
The report renders saved records exactly as before the package split (fixture in tests/data/bench)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from quantfmt import bench
from quantfmt.cli import cli
from quantfmt.plugins import formats
from quantfmt.table import markdown_lines, text_lines

DATA = Path(__file__).parent / "data" / "bench"

KEYS = ["op", "format", "shape", "n", "seconds", "baseline", "baseline_seconds", "ratio", "gbps"]
KERNEL_OPS = ("qmatmul", "quantize", "dequantize", "get_rows")


@pytest.fixture(scope="module")
def records():
    b = bench.Bench(
        formats=["F32", "BF16"],
        shapes=[(64, 256), (32, 512)],
        ops=KERNEL_OPS,
        repeat=2,
        threads=1,
        probe_mb=1,
    )
    return b.run()


def test_every_record_has_the_schema_keys_in_order(records):
    for r in records:
        assert list(r)[: len(KEYS)] == KEYS
        json.dumps(r)  # serializable as one JSON line


def test_kernel_records_cover_every_format_shape_op_and_mode(records):
    got = {
        (r["op"], r["format"], tuple(r["shape"]), r["n"], r.get("mode"))
        for r in records
        if r["op"] in KERNEL_OPS
    }
    for tag in ("F32", "BF16"):
        for shape in ((64, 256), (32, 512)):
            assert ("quantize", tag, shape, None, None) in got
            assert ("dequantize", tag, shape, None, None) in got
            assert ("get_rows", tag, shape, min(bench.GET_ROWS_N, shape[0]), None) in got
            for mode in formats()[tag].modes:
                assert ("qmatmul", tag, shape, 1, mode) in got
                assert ("qmatmul", tag, shape, bench.PREFILL_N, mode) in got


def test_ratio_and_gbps_are_computed_from_the_measured_figures(records):
    for r in records:
        if r["op"] not in KERNEL_OPS:
            continue
        assert r["seconds"] > 0 and r["baseline_seconds"] > 0
        assert r["ratio"] == pytest.approx(r["seconds"] / r["baseline_seconds"])
        rows, cols = r["shape"]
        if r["op"] in ("quantize", "dequantize"):
            assert r["gbps"] == pytest.approx(rows * cols * 4 / r["seconds"] / 1e9)
        if r["op"] == "qmatmul":
            moved = r["bytes"] + (cols + rows) * 4 * r["n"]
            assert r["gbps"] == pytest.approx(moved / r["seconds"] / 1e9)
            assert r["baseline"] == ("numpy float32 W @ x" if r["n"] == 1 else "numpy float32 X @ W.T")
            assert r["prepare_seconds"] >= 0


def test_qmatmul_records_carry_the_float_baselines_of_their_shape_and_n(records):
    base = {
        (tuple(r["shape"]), r["n"]): r["seconds"]
        for r in records
        if r["op"] == "f32_matmul" and r["when"] == "before numba"
    }
    for r in records:
        if r["op"] == "qmatmul":
            assert r["baseline_before_numba"] == base[(tuple(r["shape"]), r["n"])]


def test_float_baselines_are_measured_before_after_and_interleaved(records):
    whens = {r["when"] for r in records if r["op"] == "f32_matmul"}
    assert whens == {"before numba", "after numba", "interleaved with a numba parallel kernel"}


def test_bf16_quantize_is_compared_with_gguf_and_judged(records):
    r = next(r for r in records if r["op"] == "quantize" and r["format"] == "BF16")
    assert r["baseline"] == "gguf numpy quantize"
    assert r["target"] == ">= 1 GB/s, <= 0.25x gguf"
    assert r["status"] == ("PASS" if r["ratio"] <= 0.25 and r["gbps"] >= 1 else "MISS")
    f = next(r for r in records if r["op"] == "quantize" and r["format"] == "F32")
    assert f["baseline"] == "numpy float32 copy"  # every format quantizes at >= 1 GB/s (issue 11)
    assert f["target"] == ">= 1 GB/s" and f["status"] == ("PASS" if f["gbps"] >= 1 else "MISS")


def test_compile_records_one_per_format(records):
    comp = [r for r in records if r["op"] == "compile"]
    assert [r["format"] for r in comp] == ["F32", "BF16"]
    for r in comp:
        assert set(r["kernels"]) >= {"quantize", "dequantize", "get_rows", "qmatmul[f32,n=1]"}


def test_env_record_reports_threads(records):
    env = records[0]
    assert env["op"] == "env" and env["threads"] == 1 and env["numba_threads"] == 1


def test_run_puts_numba_threads_back():
    """The run sets numba to `threads` and puts the caller's count back after (the fixture's run
    with threads=1 used to leave every later kernel of the process on one thread)."""
    import numba

    before = numba.get_num_threads()
    bench.Bench(formats=["F32"], shapes=[(32, 256)], ops=("quantize",), repeat=1, threads=1, probe_mb=1).run()
    assert numba.get_num_threads() == before


def test_targets_pass_and_miss():
    def q(tag, n, sec, base, shape=bench.TARGET_SHAPE):
        return bench.with_target(bench.record("qmatmul", tag, shape, n, sec, "numpy float32 W @ x", base))

    assert q("Q4_0", 1, 2.0, 10.0)["status"] == "PASS"
    assert q("Q4_0", 1, 3.0, 10.0)["status"] == "MISS"
    assert q("Q8_0", bench.PREFILL_N, 10.0, 10.0)["status"] == "PASS"
    # issue 11: other formats' prefill <= 1.2x, F16/BF16 <= 1.1x; Q4_0/Q4_1 with float activations <= 0.35x
    assert q("Q4_A", bench.PREFILL_N, 12.0, 10.0)["status"] == "PASS"
    assert q("Q4_A", bench.PREFILL_N, 12.1, 10.0)["status"] == "MISS"
    assert q("BF16", bench.PREFILL_N, 11.5, 10.0)["target"] == "<= 1.1x"
    assert q("F16", 1, 6.0, 10.0)["status"] == "PASS" and q("F16", 1, 6.1, 10.0)["status"] == "MISS"
    f32_mode = bench.with_target(bench.record("qmatmul", "Q4_1", bench.TARGET_SHAPE, 1, 3.4, "x", 10.0, mode="f32"))
    assert f32_mode["target"] == "<= 0.35x" and f32_mode["status"] == "PASS"
    q8_mode = bench.with_target(bench.record("qmatmul", "Q4_1", bench.TARGET_SHAPE, 1, 3.4, "x", 10.0, mode="q8_0"))
    assert q8_mode["target"] == "<= 0.3x" and q8_mode["status"] == "MISS"
    assert q("Q4_0", 1, 2.0, 10.0, shape=(4096, 4096)).get("status") is None  # targets are for 11008x4096
    # cold compile per format, not the cache run's other parts
    cold = bench.with_target(bench.record("cache", "Q4_0", None, None, 5.5, "warm", 0.1, cold_seconds=5.5))
    assert cold["target"] == "<= 5 s" and cold["status"] == "MISS"
    assert bench.with_target(bench.record("cache", "all", None, None, 60.0, "warm", 1.0)).get("status") is None
    # issue 12's parallel conversion rows are told apart by what they measure
    par = bench.with_target(
        bench.record("parallel", "Q4_0", None, 2, 1.0, "--jobs 1", 2.0, what="--jobs 2 vs --jobs 1"))
    assert par["target"] == "<= 0.59x" and par["status"] == "PASS"
    one = bench.with_target(bench.record("parallel", "Q4_0", None, 1, 2.0, what="--jobs 1 (this process)"))
    assert one.get("status") is None
    # quantize Q4_0: both >= 3 GB/s and <= 0.25x gguf must hold
    w_bytes = 3e9
    ok = bench.with_target(
        bench.record("quantize", "Q4_0", (1, 1), None, 0.9, "gguf numpy quantize", 4.0, nbytes=w_bytes)
    )
    assert ok["status"] == "PASS"
    slow_vs_gguf = bench.with_target(
        bench.record("quantize", "Q4_0", (1, 1), None, 0.9, "gguf numpy quantize", 1.0, nbytes=w_bytes)
    )
    assert slow_vs_gguf["status"] == "MISS"
    deq = bench.with_target(bench.record("dequantize", "Q8_0", (1, 1), None, 1.0, "x", 1.0, nbytes=3.9e9))
    assert deq["status"] == "MISS" and deq["target"] == ">= 4 GB/s"


def test_median_time_loops_short_calls():
    calls = []
    sec = bench.median_time(lambda: calls.append(1), 3)
    assert sec > 0 and len(calls) > 3 * 10  # a no-op is far below MIN_SAMPLE_SECONDS: looped


def test_median_time_calls_between_before_every_timed_call_and_never_loops():
    log = []
    bench.median_time(lambda: log.append("f"), 4, between=lambda: log.append("b"))
    assert log == ["f"] + ["b", "f"] * 4  # the untimed warm-up, then each timed call right after `between`


def test_paired_medians_alternates_the_functions_in_rounds_after_their_pauses(monkeypatch):
    from quantfmt.bench import timing

    log = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: log.append(f"sleep{s}"))

    def slow(name):
        def fn():
            log.append(name)
            t0 = timing.time.perf_counter()
            while timing.time.perf_counter() - t0 < 2 * timing.MIN_SAMPLE_SECONDS:  # never looped
                pass
        return fn

    info = {}
    secs = timing.paired_medians([slow("a"), slow("b")], [0.0, 0.5], 3, info=info)
    # two untimed warm-ups each, then rounds: (a), (pause, b), in turn
    assert log == ["a", "a", "b", "b"] + ["a", "sleep0.5", "b"] * 3
    assert info["samples"] == 3 and all(s >= 2 * timing.MIN_SAMPLE_SECONDS for s in secs)


def test_paired_medians_loops_short_calls_and_stops_at_its_budget():
    from quantfmt.bench import timing

    calls = []
    fast, slow = (lambda: calls.append(1)), (lambda: timing.time.sleep(0.02))
    info = {}
    secs = timing.paired_medians([fast, slow], [0.0, 0.0], 50, budget=0.05, info=info)
    assert len(calls) > 2 + 10  # a no-op sample is a loop of calls
    assert 1 <= info["samples"] < 50 and secs[0] < secs[1]


def test_parse_shapes():
    assert bench.parse_shapes("4096x4096, 576x1536") == [(4096, 4096), (576, 1536)]
    for bad in ("4096", "0x5", "axb", "1x2x3", ","):
        with pytest.raises(ValueError):
            bench.parse_shapes(bad)


def test_tables_print_every_family(records, capsys):
    bench.tables(records)
    out = capsys.readouterr().out
    for title in (
        "qmatmul decode",
        "qmatmul prefill",
        "quantize",
        "dequantize",
        "get_rows",
        "first calls",
        "numpy float32 baselines",
        "Memory bandwidth",
    ):
        assert title in out
    assert "BF16" in out and "64x256" in out


def test_cli_json_in_process(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTFMT_BENCH_CHILD", "1")  # already the child for 1 thread: no re-exec
    saved = tmp_path / "recs.jsonl"
    args = ["bench", "--formats", "F16", "--shapes", "32x64", "--ops", "quantize", "--repeat", "1"]
    res = CliRunner().invoke(cli, args + ["--threads", "1", "--json", "--records", str(saved)])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("{")]
    recs = [json.loads(line) for line in lines]
    q = [r for r in recs if r["op"] == "quantize"]
    assert len(q) == 1 and q[0]["format"] == "F16" and q[0]["shape"] == [32, 64] and q[0]["n"] is None
    assert saved.read_text().splitlines() == lines


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--shapes", "12"], "ROWSxCOLS"),
        (["--ops", "nope"], "unknown op"),
        (["--formats", "ZZZZ"], "unknown format tag"),
    ],
)
def test_cli_bad_arguments(monkeypatch, args, msg):
    monkeypatch.setenv("QUANTFMT_BENCH_CHILD", "1")
    res = CliRunner().invoke(cli, ["bench", "--threads", "1", *args])
    assert res.exit_code != 0
    assert msg in res.output
    assert "Traceback" not in res.output


def test_cli_child_process_gets_the_thread_count():
    """The real path: the CLI re-runs itself with OPENBLAS_NUM_THREADS set, and OpenBLAS reports it."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "QUANTFMT_BENCH_CHILD")}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantfmt.cli",
            "bench",
            "--formats",
            "F32",
            "--shapes",
            "32x64",
            "--ops",
            "dequantize",
            "--repeat",
            "1",
            "--threads",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    env_rec = recs[0]
    assert env_rec["op"] == "env" and env_rec["env"]["OPENBLAS_NUM_THREADS"] == "1"
    if env_rec["blas_threads"] is not None:
        assert env_rec["blas_threads"] == 1


def test_cache_cold_then_warm_records():
    b = bench.Bench(formats=["F32"], shapes=[(32, 64)], ops=(), repeat=1, threads=1, probe_mb=1)
    bench.cache_cold_warm(b)
    recs = [r for r in b.records if r["op"] == "cache"]
    assert [r["format"] for r in recs] == ["F32", "import", "numba_init", "all"], recs
    assert recs[0]["cold_seconds"] > 0 and recs[0]["warm_seconds"] > 0
    assert np.isfinite(recs[-1]["ratio"])


def test_end_to_end_records_on_a_small_model():
    # the Dask row (a LocalCluster's start costs ~10 s here) is left to `quantfmt bench --ops e2e`
    b = bench.Bench(formats=["F32"], shapes=[(32, 64)], ops=(), repeat=1, threads=1, probe_mb=1, e2e_mb=4,
                    e2e_dask=False)
    bench.end_to_end(b)
    conv = [r for r in b.records if r["op"] == "convert"]
    rows = [r for r in b.records if r["op"] == "open_row"]
    assert len(conv) == 2 and len(rows) == 4, b.records
    for r in conv:
        assert r["file_mb"] == pytest.approx(4.19, abs=0.1) and r["peak_rss_mb"] > 0
        assert r["gbps"] == pytest.approx(r["file_mb"] / 1e3 / r["seconds"], rel=0.01)
        assert r["status"] in ("PASS", "MISS")
    par = {r["what"]: r for r in b.records if r["op"] == "parallel"}
    assert par["--jobs 2 vs --jobs 1"]["ratio"] == pytest.approx(
        par["--jobs 2 vs --jobs 1"]["seconds"] / par["--jobs 1 (this process, numba threads = 1)"]["seconds"])
    rss = next(r for w, r in par.items() if w.startswith("peak RSS per worker"))
    assert rss["ratio"] == pytest.approx(rss["peak_rss_mb"] / rss["largest_mb"]) and rss["status"] in ("PASS", "MISS")
    for r in rows:
        assert r["open_seconds"] > 0 and r["row_seconds"] > 0
        # one row of a 1024-column float32 matrix: the file's mapping holds far less than the file
        assert 0 < r["touched_mb"] < r["file_mb"]


def test_of_probe_is_the_share_of_the_best_bandwidth_probe(records):
    best = max(r["gbps"] for r in records if r["op"] == "membw")
    for r in records:
        if r["op"] in ("qmatmul", "quantize", "dequantize"):
            assert r["of_probe"] == pytest.approx(r["gbps"] / best)


def test_no_numba_kernel_runs_before_the_float_baselines(records):
    last_before = max(i for i, r in enumerate(records) if r.get("when") == "before numba")
    first_numba = min(
        i for i, r in enumerate(records) if r["op"] == "compile" or "numba" in (r.get("what") or "")
    )
    assert last_before < first_numba


def test_qmatmul_modes_of_one_format_share_the_adjacent_float_baseline(records):
    seen = {}
    for r in records:
        if r["op"] == "qmatmul":
            key = (r["format"], tuple(r["shape"]), r["n"])
            assert seen.setdefault(key, r["baseline_seconds"]) == r["baseline_seconds"]


def test_markdown_summary_has_a_row_per_format(records):
    md = bench.markdown(records, shape=(64, 256))
    assert "| F32 | 32 |" in md and "| BF16 | 16 |" in md
    assert "quantize MISS" in md or "quantize PASS" in md  # BF16 is judged against gguf


def test_subprocess_ops_alone_do_not_run_the_kernels():
    b = bench.Bench(formats=["F32"], shapes=[(32, 64)], ops=("startup",), repeat=1, threads=1, probe_mb=1)
    recs = b.run()
    assert {r["op"] for r in recs} == {"env", "startup"}
    assert next(r for r in recs if r["op"] == "startup")["heavy_imports"] == "none"


# The fixture: records of a tiny run of every op (F32, Q4_0, Q8_A at 64x256 and 128x512, so one skip) plus a
# few made-up records at the target shape (PASS/MISS, a failed cache run, an e2e note), and the text that
# quantfmt/bench.py on main (57cc174, before the package split) printed for them.
@pytest.fixture(scope="module")
def saved():
    return [json.loads(line) for line in (DATA / "records.jsonl").read_text().splitlines()]


def test_tables_render_the_fixture_as_the_old_report_did(saved):
    out = []
    bench.tables(saved, out.append)
    assert out == (DATA / "tables.txt").read_text().splitlines()


@pytest.mark.parametrize("shape, name", [(bench.TARGET_SHAPE, "markdown.txt"), ((128, 512), "markdown-128x512.txt")])
def test_markdown_renders_the_fixture_as_the_old_summary_did(saved, shape, name):
    assert bench.markdown(saved, shape=shape) + "\n" == (DATA / name).read_text()


def test_markdown_names_ggml_c_when_the_oracle_was_timed(saved):
    """A quantize record with ggml's C time (the bench times it when the oracle is built) shows how many
    times faster ours is, and the caption says so; records without it render as before."""
    recs = [dict(r) for r in saved]
    q = next(r for r in recs if r["op"] == "quantize" and r["format"] == "Q4_0"
             and r["shape"] == list(bench.TARGET_SHAPE))
    q["ggml_c_seconds"] = 3 * q["seconds"]
    md = bench.markdown(recs)
    assert "than ggml's C reference on one thread" in md
    row = next(line for line in md.splitlines() if line.startswith("| Q4_0 |"))
    assert "3.0x ggml C" in row


def test_reprint_from_a_records_file_loads_no_numpy():
    """`python -m quantfmt.bench FILE --markdown` re-prints a saved run, and the report needs no numpy."""
    code = (
        "import runpy, sys; sys.argv = ['quantfmt.bench', sys.argv[1], '--markdown'];"
        "runpy.run_module('quantfmt.bench', run_name='__main__', alter_sys=True); print('numpy' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code, str(DATA / "records.jsonl")], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == (DATA / "markdown.txt").read_text() + "False\n"


def test_text_table_aligns_right_columns_and_strips_trailing_blanks():
    lines = text_lines(["name", "n", "note"], [["a", 1, ""], ["long", 100, "x"]], right={1})
    assert lines == ["name    n  note", "----  ---  ----", "a       1", "long  100  x"]


def test_markdown_table_escapes_pipes_and_marks_right_columns():
    lines = markdown_lines(["a", "b"], [["x|y", 2]], right={1})
    assert lines == ["| a | b |", "|---|---:|", "| x\\|y | 2 |"]


def test_kernel_records_name_their_path_and_the_env_the_cpu(records, capsys):
    import numba

    from quantfmt import cpu

    before = numba.get_num_threads()
    numba.set_num_threads(records[0]["numba_threads"])  # paths as the run took them (threads=1)
    try:
        for r in records:
            if r["op"] in KERNEL_OPS:
                fmt = formats()[r["format"]]
                want = fmt.kernel_path(r["op"], r["n"] or 1, r.get("mode") or "f32")
                assert r["path"] == want, r
    finally:
        numba.set_num_threads(before)
    assert records[0]["cpu_features"] == cpu.reported()
    bench.tables(records)
    out = capsys.readouterr().out
    assert "features detected: " + " ".join(cpu.reported()) in out
    assert "kernel path of each op" in out
    assert "stated targets, one line each" in out and "not measured: Q4_0" in out  # F32/BF16 only were run


def test_convert_and_startup_sentences_state_their_records_targets():
    """The e2e sentence's target comes from the record (records.CONVERT_GBPS), not a literal."""
    from quantfmt.bench.records import CONVERT_GBPS, STARTUP_SECONDS, record, with_target
    from quantfmt.bench.report import SENTENCES

    conv = with_target(record("convert", "Q4_0", None, None, 0.5, "quantfmt --help (process start-up)", 0.2,
                              nbytes=498_000_000, what="quantfmt convert F32 -> Q4_0 --jobs 1 (input in page cache)",
                              file_mb=498.0, out_mb=70.0, peak_rss_mb=200.0, bytecode_note=None))
    text = SENTENCES["convert"](conv)
    assert f"target >= {CONVERT_GBPS:g} GB/s PASS." in text and "1 GB/s" not in text and "Note" not in text
    conv["bytecode_note"] = "no cached bytecode"
    assert SENTENCES["convert"](conv).endswith("Note: no cached bytecode.")
    start = with_target(record("startup", None, None, None, 0.25, "python -c pass", 0.02, heavy_imports="none"))
    assert f"target < {STARTUP_SECONDS:g} s PASS." in SENTENCES["startup"](start)
