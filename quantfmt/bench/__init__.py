"""The benchmark behind `quantfmt bench` / `make bench`: speed and memory figures, honestly measured.

Where things live:
- timing.py: thread settings, the one statistic (median of the timed calls after an untimed warm-up),
  first-call cost, the bandwidth and numba parallel-sum probes;
- runner.py: `Bench`, one run in this process (formats x shapes x ops, baselines, order);
- procs.py: figures measured in child processes (start-up, numba cache cold/warm, files end to end,
  peak RSS);
- records.py: the record schema and the stated targets (PASS/MISS);
- report.py: the declared tables and the Markdown summary, rendered with quantfmt.table;
- __main__.py: `python -m quantfmt.bench RECORDS.jsonl [--markdown]` re-prints a saved run.

How it stays honest: thread counts are explicit (the CLI runs the benchmark in a child process whose
OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / NUMBA_NUM_THREADS are set before numpy is imported, and the BLAS
thread count in force is read back from OpenBLAS itself); every ratio compares figures of the same run.
"""

from __future__ import annotations

from .records import GET_ROWS_N, PREFILL_N, TARGET_SHAPE, judge, record, with_target
from .report import markdown, tables
from .timing import median_time, thread_env

__all__ = [
    "GET_ROWS_N", "OPS", "PREFILL_N", "TARGET_SHAPE", "Bench", "cache_cold_warm", "end_to_end", "judge", "markdown",
    "median_time", "parse_shapes", "record", "startup", "tables", "thread_env", "with_target",
]

# runner imports numpy: loaded on first use, so re-printing a records file (report.py) loads no numpy.
_LAZY = {"Bench": "runner", "OPS": "runner", "parse_shapes": "runner", "cache_cold_warm": "procs",
         "end_to_end": "procs", "startup": "procs"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
