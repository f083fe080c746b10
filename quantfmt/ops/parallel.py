"""Parallel and sharded conversion: `convert(..., jobs=N, executor=..., max_shard_size=...)`, to
quantfmt/safetensors (one file, or Hugging Face shards + index) or GGUF (one file, or llama.cpp's splits).

Owns: the task list of a conversion and running it. Every output file's header and every
tensor's byte offset follow from the recipe and the shapes alone (io.safetensors.layout,
io.sharded.split), so the work is a list of small picklable tasks (input path, tensor names and
tags, output file, offsets) that any worker can run in any order: it opens the input
memory-mapped, produces each of its tensors and pwrite()s it at its offset. The result is byte
for byte what the one-process writer makes.

Executors: in this process (jobs=1), a spawned process pool of `jobs` workers whose numba/BLAS
thread pools are sized so workers x threads = cores (set in their environment before numpy
loads), or any concurrent.futures.Executor (a Dask client's `get_executor()`, a Ray pool...),
whose workers must see the input and output paths (a shared filesystem).

Output is never seen half-written: each file is written as a temporary `.part` next to it and
published (fsync, link/rename: io.files.atomic_output) once all its tensors are in; a sharded
output's index is written last, so an index never names a missing or partial shard. A rerun
keeps the shards already on disk whose header and size are the planned ones (resume). A worker
that dies fails the run with a WorkerError (the pool's tasks cannot be retried safely by us;
Dask retries a lost worker's task itself, which is safe: a task only writes its own offsets).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import CancelledError, Executor, Future, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, OutputExistsError, QuantfmtError, WorkerError, context
from ..io.files import TensorPlan, atomic_output, check_output, pwrite_all, release_pages, sigterm_unwinds
from ..io.safetensors import layout
from ..io.sharded import INDEX_NAME, index_bytes, matches, shard_name, split

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
# Consecutive small tensors of one file share a task up to this much input: a task per norm
# vector would cost more in scheduling than its work.
GROUP_BYTES = 32 << 20
# jobs=None ("auto") stays in this process below this much input to convert: starting workers
# (each imports numpy, numba and the plugins) costs about a second.
AUTO_MIN_BYTES = 256 << 20
# ... and on machines with at most this many CPUs, whatever the size: the in-process kernels already
# use every core, and on 2 cores a 500 MB F32 -> Q4_0 convert measured 0.46 s in-process against
# 1.51 s with 2 workers (2 GB: 4.2 s against 8.4 s), each worker paying numba's start-up and the two
# competing for memory bandwidth. Above it, a pool overlaps reading, quantizing and writing.
AUTO_MAX_INPROCESS_CPUS = 4


def auto_jobs(work_bytes: int) -> int:
    """What jobs=None ("auto") means for this much input to convert, here."""
    n = cpu_count()
    return n if work_bytes >= AUTO_MIN_BYTES and n > AUTO_MAX_INPROCESS_CPUS else 1


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Item:
    """One tensor of a task: produce `name` as `tag` (or copy its bytes) at `offset` of the file."""

    name: str
    tag: str
    copy: bool
    offset: int
    nbytes: int  # output bytes
    in_bytes: int
    permute: int = 0  # GGUF export: the head count whose q/k rows llama.cpp's layout permutes (0: none)
    shape: tuple[int, ...] = ()  # the tensor's shape (for the permutation)


@dataclass(frozen=True)
class Task:
    input: str  # the model path, as open_model takes it
    output: str  # the temporary file to write into (created with its header and full size)
    final: str  # the file it becomes (for messages)
    items: tuple[Item, ...]
    plugins: tuple[tuple[str, ...], bool]  # the coordinator's plugin folders and strictness
    threads: int | None = None  # numba threads in the worker; None: as the worker is


@dataclass(frozen=True)
class TaskResult:
    seconds: dict[str, float]  # per tensor: produce + write
    pid: int
    peak_rss: int | None  # the worker process's peak resident memory so far (VmHWM)
    start_rss: int | None  # its resident memory when this task started (imports and plugins loaded)
    threads: int  # numba's thread count in the worker


# ---- the worker side ----------------------------------------------------------------------

_models: dict[tuple, object] = {}
_models_lock = threading.Lock()


def _open_cached(path: str):
    """The input opened once per worker process (a Dask worker runs many tasks); reopened if the
    file was replaced since."""
    from ..sources import open_model

    try:
        st = os.stat(path)
    except OSError as e:
        raise FileFormatError(f"cannot read: {e.strerror or e} (is the input on a filesystem this worker "
                              "sees?)", file=path) from None
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _models_lock:
        m = _models.get(key)
        if m is None:
            for k in list(_models):
                _models.pop(k).close()  # type: ignore[attr-defined]
            m = _models[key] = open_model(path)
    return m


def _rss(field: str = "VmHWM") -> int | None:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _configure(task: Task) -> None:
    from .. import plugins

    dirs, strict = task.plugins
    if plugins.settings() != (list(dirs), strict):
        plugins.configure(plugins_dirs=list(dirs), strict=strict)
    for tag in dict.fromkeys(it.tag for it in task.items):
        plugins.get_format(tag)  # the task's formats loaded now (once per process), not inside a tensor's time
    if task.threads is not None:
        import numba

        n = max(1, min(task.threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)


def run_task(task: Task, src=None) -> TaskResult:
    """Produce each tensor of `task` and write it at its offset of `task.output` (the worker's job).

    `src`: the opened input, when running in the coordinator's process."""
    from .convert import _requantize

    _configure(task)
    m = src if src is not None else _open_cached(task.input)
    start = _rss("VmRSS")
    seconds = {}
    with context(file=task.final):
        try:
            fd = os.open(task.output, os.O_WRONLY)
        except OSError as e:
            raise FileFormatError(f"cannot open the temporary file {task.output}: {e.strerror or e} (cancelled, "
                                  "or not on a filesystem this worker sees?)") from None
        try:
            for it in task.items:
                t0 = time.perf_counter()
                with context(tensor=it.name):
                    if it.copy:  # bytes unchanged: never build the tensor
                        data = m.source(it.name).load()
                        mapped = data
                    else:
                        t = m[it.name]
                        data, mapped = _requantize(t, it.tag, m.path), t.data
                    if it.permute:
                        from ..llm.export import permute_rows

                        data = permute_rows(data, it.tag, it.shape, it.permute, name=it.name)
                    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)  # bytes-like
                    buf = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
                    if buf.size != it.nbytes:
                        raise FileFormatError(f"{it.tag}: produced {buf.size} bytes, the header promised {it.nbytes}")
                    pwrite_all(fd, buf, it.offset)
                    del data, buf
                    release_pages(mapped)
                    del mapped
                seconds[it.name] = time.perf_counter() - t0
        finally:
            os.close(fd)
    import numba

    return TaskResult(seconds, os.getpid(), _rss(), start, numba.get_num_threads())


def _init_worker(threads: int) -> None:
    import signal

    # Already in the environment the pool was spawned with (so numpy's and numba's pools were sized
    # at import); set again for anything the worker starts.
    os.environ.update(dict.fromkeys(THREAD_VARS, str(threads)))
    # Ctrl-C reaches the whole process group: the coordinator handles it (cancels, removes the
    # temporary files, shuts the pool down); a worker dying of it mid-wait would print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Leave without the interpreter's teardown once the pool lets the worker go (as the `quantfmt`
    # command does, cli._exit): after numba's kernels it is mostly full GC passes over numba's
    # objects, and the coordinator waits for it in shutdown(wait=True): measured 1.1-1.3 s of
    # shutdown for --jobs 2 of a 500 MB Q4_0 conversion, 0.02-0.04 s with this (loaded 2-core
    # machine). Runs last of multiprocessing's exit steps (its finalizers, flushing), so those ran.
    from multiprocessing import util

    util.Finalize(None, _leave_worker, exitpriority=-(1 << 30))


def _leave_worker() -> None:
    """os._exit(0) at the end of a worker's normal exit (its loop returned); on any other exit (the
    worker failing) nothing: the normal exit reports it. QUANTFMT_FULL_EXIT=1 (cli.FULL_EXIT_ENV,
    inherited from the coordinator) keeps the normal exit (e.g. for a coverage tool that saves there)."""
    import sys
    import threading

    if (os.environ.get("QUANTFMT_FULL_EXIT", "") not in ("", "0") or sys.exc_info()[0] is not None
            or threading.current_thread() is not threading.main_thread()):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


# ---- executors ----------------------------------------------------------------------------


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _main_not_reimported():
    """Hide the main module's file and spec while the pool spawns its workers. A spawned child
    re-imports the parent's main script to find its functions; ours are all in quantfmt, and
    re-running a user's unguarded script (no `if __name__ == "__main__":`) would convert again in
    every worker."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def threads_per_worker(jobs: int) -> int:
    return max(1, cpu_count() // max(1, jobs))


def executor_from_url(url: str):
    """(executor, close) for `--executor`: "dask://HOST:PORT" (a running Dask scheduler, quantfmt[dask])."""
    if not url.startswith("dask://"):
        raise QuantfmtError(f"executor {url!r} is not one quantfmt knows: give dask://HOST:PORT (a Dask scheduler)")
    try:
        from distributed import Client
    except ImportError:
        raise QuantfmtError("--executor dask://... needs Dask's distributed package: pip install 'quantfmt[dask]'") \
            from None
    addr = "tcp://" + url[len("dask://"):]
    try:
        client = Client(addr, timeout=30)
    except OSError as e:
        raise QuantfmtError(f"cannot reach the Dask scheduler at {addr}: {e}") from None
    return client.get_executor(), client.close


def as_executor(executor) -> Executor:
    """A concurrent.futures.Executor from what the API accepts: an Executor, or a Dask Client."""
    if hasattr(executor, "get_executor") and not isinstance(executor, Executor):
        return executor.get_executor()
    if not callable(getattr(executor, "submit", None)):
        raise QuantfmtError(f"executor {executor!r} has no submit(): give a concurrent.futures.Executor "
                            "(e.g. ProcessPoolExecutor, a Dask Client or its get_executor())")
    return executor


def _lost(e: BaseException) -> bool:
    """Whether an exception says the worker itself went away, rather than the task failing."""
    from concurrent.futures.process import BrokenProcessPool

    return isinstance(e, (BrokenProcessPool, CancelledError)) or type(e).__name__ in ("KilledWorker",
                                                                                       "CommClosedError")


def _execute(tasks: list[Task], jobs: int, executor, src) -> Generator[tuple[Task, TaskResult], None, None]:
    """Run the tasks; yield (task, result) as each completes."""
    if executor is None and jobs <= 1:
        for t in tasks:
            yield t, run_task(t, src)
        return
    own = executor is None
    threads = threads_per_worker(jobs)
    if own:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per worker (forking a process that has started numba's or
        # BLAS's threads is unsafe), whose environment sizes its thread pools.
        executor = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(threads,))
    futures: dict[Future, Task] = {}
    try:
        # The pool spawns its workers during submit(): they inherit this environment.
        with contextlib.ExitStack() as spawning:
            if own:
                spawning.enter_context(_environ(dict.fromkeys(THREAD_VARS, str(threads))))
                spawning.enter_context(_main_not_reimported())
            for t in tasks:
                futures[executor.submit(run_task, t)] = t
        for f in as_completed(futures):
            t = futures[f]
            try:
                res = f.result()
            except Exception as e:
                if _lost(e):
                    names = ", ".join(i.name for i in t.items[:3]) + (", ..." if len(t.items) > 3 else "")
                    raise WorkerError(f"a worker died (killed, or out of memory?) while converting {names}; "
                                      "nothing incomplete was published: rerun to resume",
                                      file=t.final) from None
                raise
            yield t, res
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    finally:
        if own:
            executor.shutdown(wait=True, cancel_futures=True)


# ---- the coordinator ----------------------------------------------------------------------


@dataclass
class _OutFile:
    path: Path
    items: list[Item]  # in file order
    header: bytes
    size: int
    extras: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, bytes) the coordinator writes
    done: bool = False


def _out_dir(path, inputs) -> Path:
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise OutputExistsError("is a file; a sharded output (--max-shard-size) is a folder", file=str(d))
    if str(d.resolve()) in {str(Path(i).resolve()) for i in inputs if Path(i).is_dir()}:
        raise OutputExistsError("is the input folder; refusing to write shards among the input's", file=str(d))
    if not d.exists():
        if not d.parent.is_dir():
            raise OutputExistsError(f"the folder {d.parent} does not exist", file=str(d))
        try:
            d.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            raise OutputExistsError(f"cannot create the folder: {e.strerror or e}", file=str(d)) from None
    return d


def write_parallel(src, rep, meta: dict, rec: dict, out_path, *, jobs: int, executor=None,
                   max_shard_size: int | None = None, overwrite: bool = False, inputs=(),
                   progress: Callable[[int], None] | None = None, on_tensor=None) -> None:
    """Write the planned conversion `rep` of the open model `src` to `out_path` (one quantfmt file),
    or to the folder `out_path` as shards of at most `max_shard_size` bytes plus the index."""
    inputs = [str(i) for i in inputs]
    steps = rep.steps
    if max_shard_size is None:
        groups, index = [(Path(out_path), steps)], None
    else:
        out_dir = _out_dir(out_path, inputs)
        ranges = split([rep.out_bytes[s.name] for s in steps], max_shard_size)
        groups = [(out_dir / shard_name(k + 1, len(ranges)), [steps[i] for i in r]) for k, r in enumerate(ranges)]
        index = out_dir / INDEX_NAME
    files = []
    for path, ss in groups:
        lay = layout([TensorPlan(s.name, s.tag, rep.shapes[s.name], _unused) for s in ss], meta, rec)
        items = [Item(s.name, s.tag, s.copy, off, n, rep.in_bytes[s.name])
                 for s, off, n in zip(ss, lay.offsets, lay.sizes, strict=True)]
        files.append(_OutFile(path, items, lay.header, lay.size))
    rep.files = [str(f.path) for f in files]
    if index is not None:
        _resume(rep, files, index, overwrite, inputs, "shard")
    _run(src, rep, files, jobs=jobs, executor=executor, overwrite=overwrite, inputs=inputs, progress=progress,
         on_tensor=on_tensor)
    if index is not None:
        total = sum(rep.out_bytes[s.name] for s in steps)
        with atomic_output(index, overwrite=overwrite, inputs=inputs) as tmp, open(tmp, "wb") as fh:
            fh.write(index_bytes({it.name: f.path.name for f in files for it in f.items}, total))


def write_gguf_parallel(src, rep, out_path, plans: list[TensorPlan], sources: dict[str, tuple[str, int]],
                        extras: dict[str, bytes], meta: dict, *, jobs: int, executor=None,
                        max_shard_size: int | None = None, overwrite: bool = False, inputs=(),
                        progress: Callable[[int], None] | None = None, on_tensor=None) -> None:
    """GGUF from workers: one file, or llama.cpp's split files with `max_shard_size`. `plans` as the
    one-process writer takes them (GGUF names, tags, shapes); `sources`: GGUF name -> (source tensor,
    heads whose q/k rows llama.cpp permutes, or 0); `extras`: GGUF name -> bytes the coordinator
    writes itself (small tensors the export adds). Split files: the first one (the key-values) is
    published last, and a rerun keeps the splits already complete."""
    from ..io.gguf import gguf_layout, one_file, split_layouts

    inputs = [str(i) for i in inputs]
    steps = {s.name: s for s in rep.steps}
    if max_shard_size is None:
        layouts = [(str(out_path), gguf_layout(out_path, plans, one_file(meta)))]
    else:
        layouts = split_layouts(out_path, plans, meta, max_shard_size)
    files = []
    for path, lay in layouts:
        items, extra = [], []
        for name, off, n in zip(lay.order, lay.offsets, lay.sizes, strict=True):
            if name in extras:
                extra.append((off, extras[name]))
                continue
            s = steps[sources[name][0]]
            items.append(Item(s.name, s.tag, s.copy, off, n, rep.in_bytes[s.name], sources[name][1],
                              tuple(rep.shapes[s.name])))
        files.append(_OutFile(Path(path), items, lay.header, lay.size, extra))
    rep.files = [str(f.path) for f in files]
    last = None
    if max_shard_size is not None:
        last = files[0].path
        _resume(rep, files, files[0].path, overwrite, inputs, "split")
    _run(src, rep, files, jobs=jobs, executor=executor, overwrite=overwrite, inputs=inputs, progress=progress,
         on_tensor=on_tensor, last=last)


def _resume(rep, files: list[_OutFile], complete: Path, overwrite: bool, inputs: list[str], what: str) -> None:
    """Mark the files already on disk as the plan has them (done); refuse others without `overwrite`.
    `complete` is the file written last (the index; a split output's first file): its presence
    means a finished output, refused without `overwrite`."""
    check_output(complete, overwrite=overwrite, inputs=inputs)
    resumed = 0
    for f in files:
        if f.path == complete or not os.path.lexists(f.path):
            continue
        check_output(f.path, overwrite=True, inputs=inputs)  # an input, a link, a folder: refused
        if not overwrite:
            if not matches(f.path, f.header, f.size):
                raise OutputExistsError(f"exists and is not the {what} this conversion writes (another model, "
                                        f"recipe or size limit?); pass --overwrite to replace it", file=str(f.path))
            f.done, resumed = True, resumed + 1
    if resumed:
        rep.notes.append(f"resumed: {resumed} of {len(files)} {what}s were already complete (same header and "
                         "size) and were kept")


def _run(src, rep, files: list[_OutFile], *, jobs: int, executor, overwrite: bool, inputs: list[str],
         progress, on_tensor, last: Path | None = None) -> None:
    """Write the files not yet done: each a temporary file holding its header, filled by the tasks and
    published (atomic_output) as soon as its last task is in; `last` only once every other file is."""
    from .. import plugins

    dirs, strict = plugins.settings()
    threads = threads_per_worker(jobs) if executor is None and jobs > 1 else None
    by_name = {s.name: s for s in rep.steps}
    todo = [f for f in files if not f.done]
    # Tasks of up to GROUP_BYTES of input, smaller when that would leave a pool's workers idle
    work = sum(it.in_bytes for f in todo for it in f.items)
    group_bytes = min(GROUP_BYTES, max(1, work // (4 * jobs))) if executor is None and jobs > 1 else GROUP_BYTES
    with contextlib.ExitStack() as outer:
        outer.enter_context(sigterm_unwinds())
        tasks, publish, empty = [], {}, []
        for f in todo:
            stack = contextlib.ExitStack()
            outer.enter_context(stack)  # an error anywhere unwinds every unpublished file: .part removed
            tmp = stack.enter_context(atomic_output(f.path, overwrite=overwrite, inputs=inputs))
            _prefill(tmp, f.header, f.size, f.extras)
            publish[str(f.path)] = stack
            group: list[Item] = []
            size = 0
            for it in f.items:
                group.append(it)
                size += it.in_bytes
                if size >= group_bytes:
                    tasks.append(Task(str(src.path), tmp, str(f.path), tuple(group), (tuple(dirs), strict), threads))
                    group, size = [], 0
            if group:
                tasks.append(Task(str(src.path), tmp, str(f.path), tuple(group), (tuple(dirs), strict), threads))
            elif not f.items:
                empty.append(str(f.path))
        held = str(last) if last is not None else None
        for path in empty:  # no tensor to wait for (an empty model)
            if path != held:
                publish[path].close()
        left = {str(f.path): 0 for f in todo}
        for t in tasks:
            left[t.final] += 1
        done = 0
        results = outer.enter_context(contextlib.closing(_execute(tasks, jobs, executor, src)))
        for t, res in results:
            rep.worker_threads[res.pid] = res.threads
            if res.peak_rss is not None:
                rep.workers[res.pid] = max(rep.workers.get(res.pid, 0), res.peak_rss)
            if res.start_rss is not None:
                rep.worker_start_rss[res.pid] = min(rep.worker_start_rss.get(res.pid, res.start_rss), res.start_rss)
            for it in t.items:
                rep.seconds[it.name] = res.seconds[it.name]
                if progress is not None:
                    progress(it.nbytes)
                if on_tensor is not None:
                    on_tensor(done, by_name[it.name], rep)
                done += 1
            left[t.final] -= 1
            if left[t.final] == 0 and t.final != held:
                publish[t.final].close()  # fsync and publish this file now: a later failure keeps it
        if held in publish:
            publish[held].close()


def _unused():
    raise AssertionError("layout only: bytes are produced by the tasks")


def _prefill(tmp: str, header: bytes, size: int, extras=()) -> None:
    """The temporary file as the workers expect it: the header, then `size` bytes in all (a sparse
    hole, zeros where nothing is written: GGUF's alignment padding), and the coordinator's own bytes."""
    try:
        with open(tmp, "r+b") as fh:
            fh.write(header)
            fh.truncate(size)
            for off, data in extras:
                fh.seek(off)
                fh.write(data)
    except OSError as e:
        raise FileFormatError(f"cannot write: {e.strerror or e}", file=tmp) from None
