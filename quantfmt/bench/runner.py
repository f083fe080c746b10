"""One benchmark run in this process: which formats, shapes and ops, in which order, into records.

Owns timing every format's kernels the way users call them (QTensor.quantize, .dequantize, .rows,
.matmul) next to baselines measured in the same process (numpy float32 matmul, memory-bandwidth
probes, gguf's numpy quantizers). Order matters: the float32 baselines run before any numba kernel,
again after, and interleaved with a parallel numba kernel, so a numba thread pool that slows BLAS
shows; each format's first calls (compile or cache load) are timed on a tiny problem before its big
ones. The figures measured in child processes are procs.py's.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import cast

import numpy as np

from . import procs
from .records import GET_ROWS_N, PREFILL_N, TARGET_SHAPE, record, with_target
from .timing import (
    bandwidth_probes,
    blas_threads,
    cpu_model,
    first_call,
    loadavg,
    median_time,
    numba_parallel_sum,
    paired_medians,
    set_numba_threads,
)

DEFAULT_SHAPES = [(4096, 4096), TARGET_SHAPE, (4096, 11008), (576, 1536)]
QUICK_SHAPES = [TARGET_SHAPE]
KERNEL_OPS = ("qmatmul", "quantize", "dequantize", "get_rows")
OPS = (*KERNEL_OPS, "startup", "cache", "e2e", "model")
QUICK_OPS = (*KERNEL_OPS, "startup")
# The pause after a BLAS baseline before a format's kernels are timed (OpenBLAS's threads go idle).
BLAS_IDLE_SECONDS = 0.2

# Types gguf's numpy code can quantize, by our tag (F16/F32 there are plain casts, not quantizers).
GGUF_QUANTIZERS = ("Q4_0", "Q4_1", "Q8_0", "BF16")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """ "4096x4096,576x1536" -> [(4096, 4096), (576, 1536)]; ValueError naming the bad part."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        dims = part.split("x")
        if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"shape {part!r} is not ROWSxCOLS with positive integers (e.g. 4096x4096)")
        out.append((int(dims[0]), int(dims[1])))
    if not out:
        raise ValueError("no shape given")
    return out


def _gguf_type(tag: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[tag] if tag in GGUF_QUANTIZERS else None


class Bench:
    """One benchmark run; `emit` receives every record as it is measured."""

    def __init__(
        self,
        formats=None,
        shapes=None,
        ops=None,
        repeat=5,
        threads=None,
        quick=False,
        emit: Callable[[dict], None] | None = None,
        progress: Callable[[str], None] | None = None,
        seed: int = 0,
        probe_mb: int = 256,
        e2e_mb: int = 500,
        e2e_dask: bool = True,
    ):
        from ..plugins import formats as registered
        from ..plugins import get_format

        self.all_formats = registered()
        # by default the weight formats that quantize (not buffers such as I64, nor ggml types quantfmt
        # only decodes): what a kernel benchmark can time end to end
        self.tags = list(formats) if formats else [t for t, f in self.all_formats.items()
                                                    if f.can_quantize and f.value_kind == "f"]
        for tag in self.tags:
            if tag not in self.all_formats:
                get_format(tag)  # raises UnknownFormatError listing the known tags
        self.shapes = [tuple(s) for s in (shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES))]
        self.ops = tuple(ops) if ops else (QUICK_OPS if quick else OPS)
        self.repeat = max(1, int(repeat))
        self.threads = threads or os.cpu_count() or 1
        self.quick = quick
        self.records: list[dict] = []
        self._emit = emit
        self._progress = progress or (lambda msg: None)
        self.rng = np.random.default_rng(seed)
        self.probe_elements = max(1024, probe_mb << 18)  # float32 elements
        self.e2e_mb = e2e_mb
        self.e2e_dask = e2e_dask  # the Dask LocalCluster row (when distributed is installed)
        self.probe_gbps = 0.0

    def add(self, rec: dict) -> dict:
        if rec["op"] in ("qmatmul", "quantize", "dequantize") and rec["gbps"] and self.probe_gbps:
            rec["of_probe"] = rec["gbps"] / self.probe_gbps  # the share of the best bandwidth probe
        rec = with_target(rec)
        self.records.append(rec)
        if self._emit:
            self._emit(rec)
        return rec

    # -- environment and baselines --

    def env_record(self) -> dict:
        import numba

        from .. import cpu

        numba_threads = set_numba_threads(self.threads)
        return self.add(
            record(
                "env",
                cpu_model=cpu_model(),
                cpu_features=cpu.reported(),
                threads=self.threads,
                blas_threads=blas_threads(),
                numba_threads=numba_threads,
                numba_threading_layer=numba.config.THREADING_LAYER,  # type: ignore[attr-defined]
                numpy=np.__version__,
                numba=numba.__version__,
                cpu_count=os.cpu_count(),
                loadavg=loadavg(),
                env={k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")},
            )
        )

    def matrices(self, shape):
        w = self.rng.standard_normal(shape, dtype=np.float32)
        x = self.rng.standard_normal(shape[1], dtype=np.float32)
        xs = self.rng.standard_normal((PREFILL_N, shape[1]), dtype=np.float32)
        return w, x, xs

    def float_baselines(self, data, when: str, between: Callable[[], object] | None = None) -> dict:
        """numpy float32 W @ x and X @ W.T per shape; `between` runs (untimed) before every timed call."""
        out = {}
        for shape, (w, x, xs) in data.items():
            calls = ((1, lambda w=w, x=x: w @ x, "W @ x"), (PREFILL_N, lambda w=w, xs=xs: xs @ w.T, "X @ W.T"))
            for n, fn, what in calls:
                sec = out[(shape, n)] = median_time(fn, self.repeat, between=between)
                nbytes = w.nbytes + (x.nbytes + 4 * shape[0]) * n
                self.add(record("f32_matmul", "numpy-f32", shape, n, sec, nbytes=nbytes, when=when,
                                what=f"numpy float32 {what}"))
        return out

    def bandwidth_probes(self, numba_too: bool) -> float:
        a = self.rng.standard_normal(self.probe_elements, dtype=np.float32)  # default 256 MB, far above any cache
        best = 0.0
        for what, fn, nbytes in bandwidth_probes(a, self.threads, numba_too):
            sec = median_time(fn, self.repeat)
            best = max(best, self.add(record("membw", None, [a.size], None, sec, nbytes=nbytes, what=what))["gbps"])
        return best

    # -- one format --

    def compile_times(self, fmt) -> dict:
        """First call vs second call of every kernel on a tiny problem: numba compile or cache load."""
        from ..tensor import QTensor

        br, bc = fmt.block_shape
        shape = (math.lcm(br, 64), math.lcm(bc, 256))
        w = self.rng.standard_normal(shape, dtype=np.float32)
        made = []
        kernels = {"quantize": first_call(lambda: made.append(QTensor.quantize(w, fmt.tag, name="tiny")))}
        t = made[0]
        kernels["dequantize"] = first_call(t.dequantize)
        idx = np.arange(0, shape[0], 3)
        kernels["get_rows"] = first_call(lambda: t.rows(idx))
        for mode in fmt.modes:
            for n in (1, PREFILL_N):
                x = self.rng.standard_normal((n, shape[1]), dtype=np.float32)
                x = x[0] if n == 1 else x
                fresh = QTensor("tiny", fmt, shape, t.data)  # prepare() happens in the first call too
                kernels[f"qmatmul[{mode},n={n}]"] = first_call(functools.partial(fresh.matmul, x, mode))
        first = sum(a for a, _ in kernels.values())
        steady = sum(b for _, b in kernels.values())
        return self.add(
            record("compile", fmt.tag, shape, None, first - steady, "second calls (same kernels)", steady,
                   kernels={k: round(a - b, 4) for k, (a, b) in kernels.items()},
                   note="first call = numba compile or on-disk cache load")
        )

    def bench_format(self, fmt, data, f32: dict) -> None:
        from ..tensor import QTensor

        for shape, (w, x, xs) in data.items():
            if not fmt.accepts(shape):
                self.add(record("skip", fmt.tag, shape, note=f"shape does not fit blocks of {fmt.block_shape}"))
                continue
            rows, cols = shape
            self._progress(f"{fmt.tag} {rows}x{cols}")
            t = QTensor.quantize(w, fmt.tag, name="w")
            common = {"bytes": t.nbytes, "bpw": fmt.bits_per_weight}

            for op in ("quantize", "dequantize"):
                if op in self.ops:
                    self.codec(op, fmt, shape, w, t, common)

            if "get_rows" in self.ops:
                k = min(GET_ROWS_N, rows)
                idx = self.rng.choice(rows, k, replace=False)
                sec = median_time(functools.partial(t.rows, idx), self.repeat)

                def gather(w: np.ndarray = w, idx: np.ndarray = idx) -> np.ndarray:
                    return w[idx]

                base = median_time(gather, self.repeat)
                touched = len({int(i) // fmt.block_shape[0] for i in idx}) * fmt.row_group_bytes(cols)
                self.add(record("get_rows", fmt.tag, shape, k, sec, "numpy float32 W[idx]", base,
                                nbytes=touched + k * cols * 4, path=fmt.kernel_path("get_rows", k), **common))

            if "qmatmul" in self.ops:
                self.qmatmul(fmt, t, shape, x, xs, w, f32, common)

    def codec(self, op: str, fmt, shape, w, t, common: dict) -> None:
        """quantize or dequantize, against gguf's numpy code where it has the type, else a float32 copy."""
        from gguf import quants

        from ..tensor import QTensor

        gg = _gguf_type(fmt.tag)
        if op == "quantize":
            ours, theirs = (lambda: QTensor.quantize(w, fmt.tag, name="w")), (lambda: quants.quantize(w, gg))
        else:
            gq = quants.quantize(w, gg) if gg is not None else None
            # theirs is timed only when gg is set, and then so is gq
            ours, theirs = t.dequantize, (lambda: quants.dequantize(cast(np.ndarray, gq), gg))
        sec = median_time(ours, self.repeat)
        extra = dict(common)
        if op == "quantize" and (c := self._ggml_c(fmt)) is not None:
            # ggml's C reference (quantize_row_*_ref through ggml_quantize_chunk, one thread, no FMA): the
            # anchor issue 13 names for the byte-identical quantizers; timed only when the oracle is built
            extra["ggml_c_seconds"] = median_time(lambda: c.quantize(fmt.ggml_type, w), min(self.repeat, 3))
        if gg is not None:  # gguf's numpy code is slow: fewer samples
            base, what = median_time(theirs, min(self.repeat, 3)), f"gguf numpy {op}"
        else:
            base, what = median_time(w.copy, self.repeat), "numpy float32 copy"
        self.add(record(op, fmt.tag, shape, None, sec, what, base, nbytes=w.nbytes, path=fmt.kernel_path(op),
                        **extra))

    def _ggml_c(self, fmt):
        """The built ggml oracle when it quantizes fmt's ggml type without an importance matrix, else None.
        Never builds it (that needs a compiler and the network): `pytest -m oracle` or quantfmt.oracle.build()."""
        if not hasattr(self, "_oracle"):
            from .. import oracle

            try:
                self._oracle = oracle.load() if oracle.built() else None
            except oracle.OracleError:
                self._oracle = None
        c, name = self._oracle, fmt.ggml_type
        if c is None or not name or name not in c.quantizable or c.requires_imatrix(name):
            return None
        return c

    def qmatmul(self, fmt, t, shape, x, xs, w, f32: dict, common: dict) -> None:
        from ..tensor import QTensor

        rows, cols = shape
        t0 = time.perf_counter()
        prepared = fmt.prepare(t.data, rows, cols)
        prep = time.perf_counter() - t0
        for n, act in ((1, x), (PREFILL_N, xs)):
            base_fn = (lambda: w @ x) if n == 1 else (lambda: xs @ w.T)
            what = "numpy float32 W @ x" if n == 1 else "numpy float32 X @ W.T"
            # a fresh QTensor per mode: the untimed warm-up call does prepare() and any compile left
            calls = [functools.partial(QTensor("w", fmt, shape, t.data).matmul, act, mode) for mode in fmt.modes]
            info: dict = {}
            if n == 1:
                # Decode reads every weight once and is memory-bound: the baseline's 180 MB read right
                # before each sample would evict this format's bytes from the L3 (tried: Q4_0's q8_0 decode
                # read 2.4-3.7 ms instead of 1.5), so the float32 baseline is timed again just before the
                # format's samples, not between them. The pause before ours: OpenBLAS's threads spin
                # (sched_yield loops) after a call, ~20 ms of CPU in the next 100 ms measured on the 2-core
                # Xeon, and a kernel timed right then shares a core with them; the one before the baseline
                # lets numba's spinning pool threads go idle (see the "interleaved" figures).
                time.sleep(0.05)
                base = median_time(base_fn, self.repeat)
                secs, samples = [], []
                for fn in calls:
                    time.sleep(BLAS_IDLE_SECONDS)
                    secs.append(median_time(fn, self.repeat, info=info))
                    samples.append(info["samples"])
            else:
                # Prefill is compute-bound (each call ~0.1 s): the baseline's samples alternate with the
                # format's (timing.paired_medians), each after the same pauses, so a load that drifts
                # over seconds on a shared machine weighs on both sides of the ratio alike.
                base, *secs = paired_medians([base_fn, *calls], [0.05] + [BLAS_IDLE_SECONDS] * len(calls),
                                             self.repeat, info=info)
                samples = [info["samples"]] * len(calls)
            for mode, sec, k in zip(fmt.modes, secs, samples, strict=True):
                self.add(
                    record("qmatmul", fmt.tag, shape, n, sec, what, base, nbytes=t.nbytes + (cols * 4 + rows * 4) * n,
                           mode=mode, path=fmt.kernel_path("qmatmul", n, mode), prepare_seconds=prep,
                           prepared_bytes=getattr(prepared, "nbytes", None), samples=k,
                           paired=n != 1, baseline_before_numba=f32[(shape, n)], **common)
                )

    # -- the whole run --

    def run(self) -> list[dict]:
        """Every figure the ops ask for, as records. numba's thread count (which the run sets to
        `threads`) is put back after: a library call must not leave the caller's process changed."""
        import numba

        before = numba.get_num_threads()
        try:
            return self._run()
        finally:
            numba.set_num_threads(before)

    def _run(self) -> list[dict]:
        self.env_record()
        kernels = any(op in self.ops for op in KERNEL_OPS)
        data = {s: self.matrices(s) for s in self.shapes} if kernels else {}
        need_f32 = "qmatmul" in self.ops
        f32 = self.float_baselines(data, "before numba") if need_f32 else {}
        # after the float baselines: the numba probe is the first numba kernel of the run
        self.probe_gbps = self.bandwidth_probes(numba_too=True) if kernels else 0.0
        for tag in self.tags if kernels else ():
            fmt = self.all_formats[tag]
            self._progress(f"{tag}: first calls")
            self.compile_times(fmt)
            self.bench_format(fmt, data, f32)
        if need_f32:
            self._progress("float32 baselines after numba")
            self.float_baselines(data, "after numba")
            spin = self.rng.standard_normal(1 << 20, dtype=np.float32)
            self.float_baselines(data, "interleaved with a numba parallel kernel", lambda: numba_parallel_sum(spin))
        del data
        if "startup" in self.ops:
            self._progress("start-up")
            procs.startup(self)
        if "cache" in self.ops:
            self._progress("numba cache: cold vs warm (subprocesses)")
            procs.cache_cold_warm(self)
        if "e2e" in self.ops:
            self._progress("end-to-end (files)")
            procs.end_to_end(self)
        if "model" in self.ops:  # SmolLM2 end to end, ours vs llama.cpp (model.py)
            from .model import bench_model

            bench_model(self)
        self.add(record("env", note="end of run", loadavg=loadavg()))
        return self.records
