"""File helpers every reader and writer shares.

Owns: read-only memory maps (and closing them safely under live views), giving pages back
to the kernel while streaming, checking an output path, the atomic output (temporary file,
fsync, rename; removed on any error, Ctrl-C or SIGTERM), `TensorPlan` (a tensor to write,
produced when its turn comes) and `write_stream`, the one loop that writes plans in order.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import queue
import re
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import FileFormatError, OutputExistsError, QuantfmtError

_PAGE = mmap.PAGESIZE
_SMALL = 1 << 16  # tensors below this are written and released in batches, not one syscall each
SMALL_BYTES = _SMALL  # release_pages does nothing for fewer bytes (callers may skip finding the array)


# ---- reading ----------------------------------------------------------------------------


def require_regular(path) -> int:
    """The size of `path` if it is a regular file (after symlinks); else FileFormatError.

    Called before any open(): opening a FIFO for reading blocks until a writer comes, and a
    character device never ends, so an input that is not a regular file must be refused first."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileFormatError("cannot read: no such file", file=str(path)) from None
    except OSError as e:
        raise FileFormatError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    if stat.S_ISDIR(st.st_mode):
        raise FileFormatError("cannot read: is a directory, not a model file", file=str(path))
    if not stat.S_ISREG(st.st_mode):
        raise FileFormatError("cannot read: not a regular file (a FIFO, socket or device?), refusing to open it",
                              file=str(path))
    return st.st_size


def map_readonly(path, expect_size: int | None = None):
    """(flat uint8 view of a read-only map of `path`, closer). An empty file maps to an empty array."""
    file = str(path)
    require_regular(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if expect_size is not None and size != expect_size:
                raise FileFormatError("the file changed size while being opened", file=file)
            if size == 0:
                return np.zeros(0, np.uint8), (lambda: None)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise FileFormatError(f"cannot map the file: {e.strerror or e}", file=file) from None

    def close():
        # The map closes when the last view of it goes away; closing it under live views
        # would crash them, so Python's mmap refuses (BufferError) while views exist.
        with contextlib.suppress(BufferError, ValueError):
            mm.close()

    return np.frombuffer(mm, np.uint8), close


def _mapped(base) -> bool:
    """Whether an array's base is a map made by map_readonly (np.frombuffer keeps a memoryview of it)."""
    return isinstance(base, mmap.mmap) or (isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap))


def release_pages(arr) -> None:
    """Tell the kernel we are done with the file pages under `arr` (a view of a map opened here).

    Streaming conversion calls this after each tensor, so resident memory stays ~ one tensor
    instead of growing with the file; the data stay valid (re-read from disk if touched again).
    """
    if getattr(arr, "nbytes", 0) < _SMALL:
        return  # a syscall per tiny tensor costs more than the few pages it would give back
    _advise(arr, getattr(mmap, "MADV_DONTNEED", None))


def prefetch_pages(arr) -> None:
    """Ask the kernel to start reading the file pages under `arr` (a view of a map opened here) into
    the page cache now, without waiting (MADV_WILLNEED): a streaming conversion asks for the next row
    block while it quantizes this one, so an input that is not in the page cache is read while the
    CPUs work instead of page fault by page fault, each one waiting for the disk. Pages already
    cached cost a walk over them (microseconds for 32 MB); nothing is mapped, so resident memory
    does not grow."""
    if getattr(arr, "nbytes", 0) < _SMALL:
        return
    _advise(arr, getattr(mmap, "MADV_WILLNEED", None))


def _advise(arr, advice) -> None:
    root = arr
    while isinstance(root, np.ndarray) and not _mapped(root.base):
        root = root.base
    if not isinstance(root, np.ndarray) or advice is None or arr.size == 0:
        return
    # the loop stopped at the array whose base _mapped() accepted: an mmap, or a memoryview of one
    mm = cast(mmap.mmap, root.base.obj if isinstance(root.base, memoryview) else root.base)
    off = arr.ctypes.data - root.ctypes.data
    if off < 0 or off + arr.nbytes > root.nbytes:
        return
    start = off // _PAGE * _PAGE
    stop = min(-(-(off + arr.nbytes) // _PAGE) * _PAGE, len(mm))
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(advice, start, stop - start)


_GGUF_SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<k>[0-9]{5})-of-(?P<n>[0-9]{5})\.gguf$")


def gguf_split_files(path) -> list[str] | None:
    """Every file of the split GGUF that `path` names (NAME-0000K-of-0000N.gguf, llama.cpp's names), or None."""
    m = _GGUF_SPLIT.match(str(path))
    if not m:
        return None
    n = int(m["n"])
    return [f"{m['prefix']}-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]


def input_files(path) -> list[str]:
    """Every file the model at `path` is read from (for refusing to overwrite an input)."""
    p = Path(path)
    if p.is_dir():
        return [str(f) for f in sorted(p.iterdir()) if f.is_file()]
    splits = gguf_split_files(p)
    if splits:
        return splits
    out = [str(p)]
    if p.name.endswith(".json") and p.is_file():
        with contextlib.suppress(Exception):
            with open(p, "rb") as f:
                idx = json.loads(f.read(100_000_000))
            out += [str(p.parent / s) for s in set(idx["weight_map"].values()) if isinstance(s, str)]
    return out


def split(sizes: list[int], max_bytes: int) -> list[range]:
    """Tensor index ranges, one per shard: greedy in order, a new shard when the next tensor would
    take the current one's data past `max_bytes`. A tensor larger than the limit gets a shard of its own."""
    out, start, used = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and used + n > max_bytes:
            out.append(range(start, i))
            start, used = i, 0
        used += n
    if sizes or not out:
        out.append(range(start, len(sizes)))
    return out


# ---- atomic output ----------------------------------------------------------------------


def check_output(path, *, overwrite: bool = False, inputs: Iterable = ()) -> None:
    """OutputExistsError if `path` is one of `inputs` (by identity of the file, not the name),
    or exists and `overwrite` is false, or is a directory."""
    out = Path(path)
    if str(path).endswith(("/", os.sep)):
        raise OutputExistsError("ends in a path separator: name a file, not a folder", file=str(path))
    try:
        lst = os.lstat(out)
        st = os.stat(out)
    except FileNotFoundError:
        if os.path.lexists(out):
            raise OutputExistsError("is a dangling symbolic link; refusing to write through it",
                                    file=str(path)) from None
        if not out.parent.is_dir():
            raise OutputExistsError(f"the folder {out.parent} does not exist", file=str(path)) from None
        return
    except OSError as e:
        raise OutputExistsError(f"cannot check the output path: {e.strerror or e}", file=str(path)) from None
    for i in inputs:
        try:
            si = os.stat(i)
        except OSError:
            continue
        if (si.st_dev, si.st_ino) == (st.st_dev, st.st_ino):
            raise OutputExistsError(f"is the same file as the input {i}; refusing to overwrite an input",
                                    file=str(path))
    if stat.S_ISDIR(st.st_mode):
        raise OutputExistsError("is a directory", file=str(path))
    if not overwrite:
        raise OutputExistsError("exists; pass --overwrite (overwrite=True) to replace it", file=str(path))
    if stat.S_ISLNK(lst.st_mode):
        raise OutputExistsError("is a symbolic link; refusing to replace it (name its target instead)",
                                file=str(path))
    if not stat.S_ISREG(st.st_mode):
        raise OutputExistsError("exists and is not a regular file (a FIFO, socket or device?): "
                                "refusing to replace it, even with --overwrite", file=str(path))


class _Terminated(KeyboardInterrupt):
    """SIGTERM during an atomic write: unwinds like Ctrl-C so the temporary file is removed."""


@contextlib.contextmanager
def sigterm_unwinds():
    """SIGTERM raises (like Ctrl-C) inside: for a writer holding several atomic outputs that it
    publishes in any order, so the handler stays in place until the last one is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise _Terminated()

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_parts(out: Path) -> list[str]:
    """Remove the temporary `.NAME.PID.*.part` files a killed writer of `out` left behind
    (their PID names a process that no longer exists); returns what was removed."""
    folder = out.parent if str(out.parent) else Path(".")
    removed = []
    for p in folder.glob(f".{out.name}.*.part"):
        rest = p.name[len(out.name) + 2 :]
        pid = rest.split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(str(p))
    return removed


@contextlib.contextmanager
def atomic_output(path, *, overwrite: bool = False, inputs: Iterable = ()):
    """Write a file all-or-nothing. Yields the path of a new empty temporary file in the same
    folder (`.NAME.PID.XXXX.part`); write it any way you like. On success it is fsynced and
    published as `path`: without `overwrite` by a hard link that fails if `path` appeared
    meanwhile (two writers racing: one wins, the other gets OutputExistsError, nothing is
    replaced silently); with it by a rename over the old file, whose permissions are kept. On
    any exception, Ctrl-C or SIGTERM the temporary file is removed and `path` is untouched.
    Temporary files of writers that were killed (SIGKILL) are removed on the next write.

        with atomic_output("out.safetensors", overwrite=False, inputs=["in.safetensors"]) as tmp:
            write_everything(tmp)
    """
    inputs = [str(i) for i in inputs]
    check_output(path, overwrite=overwrite, inputs=inputs)
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    remove_stale_parts(out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".part", dir=folder)
    except OSError as e:
        raise FileFormatError(f"cannot create a file in {folder}: {e.strerror or e}", file=str(path)) from None
    try:
        mode = stat.S_IMODE(os.stat(out).st_mode)  # --overwrite keeps the permissions the file had
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # mkstemp makes 0600; a new output gets ordinary permissions
    os.fchmod(fd, mode)
    os.close(fd)
    old = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise _Terminated()

        old = signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:  # e.g. the disk filled up at the last flush
            raise FileFormatError(f"cannot write: {e.strerror or e}", file=str(path)) from None
        # Re-check: the output may have appeared (or become an input's hard link) meanwhile.
        check_output(path, overwrite=overwrite, inputs=inputs)
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # atomic and never replaces: the race's loser fails here
            except FileExistsError:
                raise OutputExistsError("appeared while this file was being written (another writer?); "
                                        "left it as it is", file=str(path)) from None
            except OSError:  # a filesystem without hard links: rename, after the re-check above
                os.replace(tmp, out)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        with contextlib.suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


# ---- streaming writes -------------------------------------------------------------------


@dataclass
class TensorPlan:
    """A tensor to write: its tag and logical shape (so its byte size is known up front) and
    a function that produces its bytes when its turn comes."""

    name: str
    tag: str
    shape: tuple[int, ...]
    produce: Callable[[], object]  # -> uint8 array or bytes-like of exactly nbytes, or a list of arrays (parts)
    after: Callable[[], None] | None = None  # called once the bytes are written (e.g. release_pages)


def plans_from_model(model) -> list[TensorPlan]:
    """Plans that copy a Model's tensors as they are (bytes unchanged), without materializing any."""
    return [TensorPlan(s.name, s.tag, s.shape, s.load) for s in model.sources()]


# A tensor's bytes at least this large, in memory of their own (not a view of a mapped input), are
# written by a helper thread while the next tensor is produced (see _Writes).
_ASYNC_MIN = 1 << 20


def write_stream(f, plans: list[TensorPlan], sizes: list[int], *, align: int = 1,
                 progress: Callable[[int], None] | None = None) -> None:
    """Write each plan's bytes to the open file `f` in turn, each checked against the size the
    header promised and zero-padded to a multiple of `align`. One tensor is produced at a time;
    the bytes of the one before may still be going to the file (_Writes), in order.

    `produce()` returns the bytes (an array or bytes-like), or a list of arrays whose concatenation
    they are (a tensor converted in row blocks). `after` and `progress` of a plan are called (on this
    thread, in order) once its bytes are written. Errors name the tensor (one try around the loop,
    not a context manager per tensor: on a file of 2**20 one-value tensors that cost more than
    writing them)."""
    p = None
    writes = _Writes(f)
    try:
        for p, n in zip(plans, sizes, strict=True):
            data = p.produce()
            parts: list[np.ndarray] | None
            buf: np.ndarray | None
            if type(data) is list:  # the tensor's bytes in parts (row blocks), written in turn
                parts, buf = [_as_bytes(d) for d in data], None
                got = sum(b.size for b in parts)
            else:
                parts, buf = None, _as_bytes(data)
                got = buf.size
            del data
            if got != n:
                raise FileFormatError(f"{p.tag}: produced {got} bytes, the header promised {n}")
            pad = -n % align
            # after start() the helper thread holds the bytes; this loop lets go of them
            if n >= _ASYNC_MIN and (buf is None or not _mapped_view(buf)):
                # waits for the one before; returns at once
                writes.start(parts if parts is not None else [cast(np.ndarray, buf)], pad, p, n, progress)
            else:  # small, or a view of the input (kept resident until written): written here, now
                if writes.pending is not None:
                    writes.wait()
                # inline, not _write_one/_done: a file of 2**20 tiny tensors runs this 2**20 times
                if parts is None:
                    write(f, buf)
                else:
                    for b in parts:
                        write(f, b)
                if pad:
                    write(f, b"\0" * pad)
                if n >= _SMALL:
                    flush(f)
                if p.after is not None:
                    p.after()
                if progress is not None:
                    progress(n)
            del buf, parts
        writes.wait()
    except QuantfmtError as e:
        if e.tensor is None and p is not None:
            e.tensor = p.name
        raise
    finally:
        writes.close()  # never leave a write running into a file the caller is about to close


def _as_bytes(data) -> np.ndarray:
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(cast(bytes, data), np.uint8)  # bytes-like
    return np.ascontiguousarray(buf).reshape(-1).view(np.uint8)


def _write_one(f, parts: list, pad: int, n: int) -> None:
    for buf in parts:
        write(f, buf)
    if pad:
        write(f, b"\0" * pad)
    if n >= _SMALL:
        flush(f)  # each large tensor goes out as it is done: the file grows as the work progresses
        if n >= _ASYNC_MIN:
            start_writeback(f)


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, wait for none
_sync_file_range: Any = None  # libc's sync_file_range once looked up; False where there is none


def start_writeback(f) -> None:
    """Ask the kernel to start writing the open file's dirty pages to disk now, without waiting (Linux's
    sync_file_range(SYNC_FILE_RANGE_WRITE); elsewhere nothing). Only a head start: the output is made
    durable by atomic_output's fsync, as ever, and an error there (not here) is the one reported.

    Why: the fsync that publishes an output waited for all of it (and on ext4 the close before it
    allocated its blocks): ~50-80 ms for the 67 MB of a 500 MB model's Q4_0 conversion on this 2-core
    VM, all after the last tensor. Started tensor by tensor on the writer thread, that work overlaps
    the quantizing of the next tensor and the fsync finds most of the file already on its way."""
    global _sync_file_range
    fn = _sync_file_range
    if fn is None:
        fn = False
        if hasattr(os, "sched_getaffinity"):  # Linux (the call is Linux's own)
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError, ImportError):
                fn = False
        _sync_file_range = fn
    if fn is not False:
        with contextlib.suppress(OSError, ValueError):
            fn(f.fileno(), 0, 0, _SYNC_FILE_RANGE_WRITE)  # offset 0, nbytes 0: the whole file; GIL released


def _done(p, n: int, progress) -> None:
    if p.after is not None:
        p.after()
    if progress is not None:
        progress(n)


def _mapped_view(arr: np.ndarray) -> bool:
    """Whether `arr` views a map made by map_readonly (a tensor copied unchanged from the input)."""
    root: object = arr
    while isinstance(root, np.ndarray):
        if _mapped(root.base):
            return True
        root = root.base
    return False


class _Writes:
    """At most one tensor's bytes being written by a helper thread, while the caller produces the next.

    Why: writing a quantized tensor is a copy into the page cache (fresh pages the kernel zeroes; in
    a VM, pages the host must back first), measured 0.1-0.5 s for the 67 MB of a 500 MB model's Q4_0
    conversion on a 2-core machine, with a core idle meanwhile for part of each quantize (its
    single-threaded finiteness scan). The write syscall releases the GIL, so it overlaps the next
    tensor's quantize. Order, the file's bytes and the errors are those of writing in turn: one write
    in flight, each started only when the one before is done; a failed write is raised on the
    caller's thread at the next start/wait; `after`/`progress` run on the caller's thread once the
    tensor is written. The thread is started on the first large tensor and ended by close()."""

    def __init__(self, f) -> None:
        self.f = f
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()  # (parts, pad, n), or None: stop
        self.results: queue.SimpleQueue = queue.SimpleQueue()  # None (written) or the exception
        self.thread: threading.Thread | None = None
        self.pending: tuple | None = None  # (plan, n, progress) of the write in flight

    def start(self, parts: list, pad: int, p, n: int, progress) -> None:
        self.wait()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="quantfmt-write", daemon=True)
            self.thread.start()
        self.pending = (p, n, progress)
        self.jobs.put((parts, pad, n))

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                _write_one(self.f, *job)
            except BaseException as e:  # handed to the caller's thread
                self.results.put(e)
            else:
                self.results.put(None)
            del job

    def wait(self) -> None:
        """Wait for the write in flight; raise its error, or run its plan's after/progress."""
        if self.pending is None:
            return
        p, n, progress = self.pending
        err = self.results.get()
        self.pending = None
        if err is not None:
            if isinstance(err, QuantfmtError) and err.tensor is None:
                err.tensor = p.name  # the tensor being written, not the one produced meanwhile
            raise err
        _done(p, n, progress)

    def close(self) -> None:
        if self.thread is None:
            return
        if self.pending is not None:  # an error or Ctrl-C on the caller's thread: let the write end
            self.pending = None
            self.results.get()
        self.jobs.put(None)
        self.thread.join()
        self.thread = None


def pwrite_all(fd: int, buf, offset: int) -> None:
    """Write all of `buf` at `offset` of the open file `fd` (os.pwrite may write less than asked)."""
    view = memoryview(buf).cast("B")
    try:
        while view.nbytes:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as e:
        raise FileFormatError(f"cannot write: {e.strerror or e}") from None


def write(f, buf) -> None:
    try:
        f.write(memoryview(buf))
    except OSError as e:
        raise FileFormatError(f"cannot write: {e.strerror or e}") from None


def flush(f) -> None:
    try:
        f.flush()
    except OSError as e:
        raise FileFormatError(f"cannot write: {e.strerror or e}") from None


def open_for_write(tmp):
    """The (new, empty) temporary file of atomic_output, opened for writing without O_TRUNC: on ext4
    closing a file that was truncated to 0 starts writing all of it back and allocates its blocks
    there and then (its replace-via-truncate safeguard), 43 ms on the caller's thread for a 67 MB
    output; the fsync that follows does that work anyway (and start_writeback began it earlier)."""
    try:
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FileFormatError(f"cannot write: {e.strerror or e}") from None
    try:
        return os.fdopen(fd, "wb")
    except BaseException as e:
        os.close(fd)
        if not isinstance(e, OSError):
            raise
        raise FileFormatError(f"cannot write: {e.strerror or e}") from None
