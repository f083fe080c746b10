"""numba's process-wide settings, made before any kernel is decorated or run: somewhere writable for
its on-disk cache, so `cache=True` kernels work for every user, and the threading layer.

numba decides where a `cache=True` kernel's cache lives when the kernel is *decorated*
(at plugin import): NUMBA_CACHE_DIR if set, else `__pycache__` next to the source file,
else the user-wide cache dir (~/.cache/numba). If none is writable (a read-only
site-packages and a read-only or missing HOME: containers, services, some CI), the
decorator raises "cannot cache function ...: no locator available" and the plugin fails
to import. `ensure_writable()` runs before the plugins are imported and, only in that
case, points numba at a private directory under the system temp dir (created 0700 and
checked to be ours: numba's cache index is a pickle, so a directory someone else can
write into must never be used). It does not import numba (plugins that need no kernel,
such as the plain formats, load without it).

`light_cache_loads()` makes loading a quantfmt kernel from the on-disk cache skip numba's context
refresh (what it is and why it is safe: its docstring), a third of a `quantfmt convert`'s start-up,
and takes numba's runtime (the NRT) from object code cached beside the kernels (`nrt_initialize`).

`choose_threading_layer()` makes numba's workqueue layer the default (why, with figures:
quantfmt.numba_threads), without importing numba either: before numba loads it sets the
environment variable numba's config reads, after, the config itself. A user's NUMBA_THREADING_LAYER
stands.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import stat
import sys
import tempfile

ENV = "NUMBA_CACHE_DIR"


def _writable(path: str) -> bool:
    # numba's own test: the directory can be created and a file can be made in it.
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _numba_appdirs():
    """numba's own (vendored) appdirs module, without importing numba: `import numba.misc.appdirs`
    would import the whole of numba (about 0.3 s), which a command that never runs a kernel does not
    need. appdirs.py is a standalone file (sys, os, platform): run it from numba's folder."""
    mod = sys.modules.get("numba.misc.appdirs")
    if mod is not None:
        return mod
    spec = importlib.util.find_spec("numba")  # locates the package; imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("numba is not installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "misc", "appdirs.py")
    file_spec = importlib.util.spec_from_file_location("_quantfmt_numba_appdirs", path)
    if file_spec is None or file_spec.loader is None or not os.path.isfile(path):
        raise ImportError(f"numba's appdirs module is not at {path}")
    mod = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(mod)
    return mod


def user_cache_dir() -> str:
    """numba's user-wide cache dir (what it falls back to when `__pycache__` is read-only), computed
    as numba computes it (numba.core.caching's _UserWideCacheLocator)."""
    return _numba_appdirs().AppDirs(appname="numba", appauthor=False).user_cache_dir


def _private_dir(path: str) -> bool:
    """Create `path` 0700, or accept it if it exists, is a real directory, ours, and writable only by us."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return False
    return _writable(path)


def fallback_dir() -> str:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"quantfmt-numba-cache-{uid}")


def ensure_writable() -> str | None:
    """Point numba at a private temp cache dir if it has nowhere to write; return that dir, else None."""
    if os.environ.get(ENV):
        return None  # the user's explicit choice
    try:
        if _writable(user_cache_dir()):
            return None  # numba's own fallback works (after __pycache__ next to the source)
    except ImportError:
        return None  # no numba: nothing to cache
    path = fallback_dir()
    if not _private_dir(path):
        return None  # nothing we can safely use: numba reports the problem itself
    os.environ[ENV] = path  # read by numba at import, and by child processes
    config = sys.modules.get("numba.core.config")
    if config is not None:
        # numba already imported: its config is read when a kernel is decorated (numba ships no stubs for it)
        config.CACHE_DIR = path  # type: ignore[attr-defined]
    return path


#: The threading layer quantfmt prefers (quantfmt.numba_threads says why).
THREADING_LAYER = "workqueue"
LAYER_ENV = "NUMBA_THREADING_LAYER"


def choose_threading_layer() -> str | None:
    """Make THREADING_LAYER numba's layer for this process (and the processes it starts) unless the
    user chose one; returns the layer set here, or None. Call before the first parallel kernel runs."""
    if os.environ.get(LAYER_ENV):
        return None
    os.environ[LAYER_ENV] = THREADING_LAYER  # read by numba's config when numba loads; workers inherit it
    numba = sys.modules.get("numba")
    if numba is not None and hasattr(numba, "config"):  # already loaded: its config was read
        numba.config.THREADING_LAYER = THREADING_LAYER
    return THREADING_LAYER


# Set to 0 for numba's own cache loads (the full context refresh before the first), e.g. to compare.
LIGHT_ENV = "QUANTFMT_NUMBA_LIGHT_LOAD"
_LIGHT_PREFIXES = ("quantfmt.", "quantfmt_formats.")


def light_cache_loads() -> bool:
    """Load quantfmt's cached kernels without numba's full target-context refresh; True if installed.

    numba's Cache.load_overload calls `target_context.refresh()` before reading a cached function.
    The first refresh in a process imports ~30 of numba's lowering modules (arraymath, linalg, random,
    typed containers, unicode, ...) and installs their registries in the typing and target contexts:
    0.15-0.4 s measured on a 2-core machine, the largest single step of a `quantfmt convert` after
    the imports. A cache load needs none of it: the cached object code is linked as it is, and what
    it can call must be in LLVM's symbol table, which numba fills in four places only: when the CPU
    context is made (numba's C helpers, libm), `rtsys.initialize` (the NRT: allocation, refcounts),
    `numba.cpython.hashing`'s import (the hash secret) and a parallel kernel's own reload hooks
    (the thread pool, run by the load itself). The light load does the two that a refresh does (the
    hashing import only for object code that names its symbols) and then what numba's own
    `_load_overload` does. Registries matter only to compiling, and every compile (a cache
    miss, another signature, a kernel of the user's) runs numba's pipeline, which refreshes both
    contexts first. Only functions defined in quantfmt's modules and plugins go this way (their kernels
    are tested loaded so, in fresh processes); any other function is loaded as numba does.

    Installed once, after numba is imported (by the first plugin that needs it); a no-op if numba's
    Cache lacks what it relies on, or LIGHT_ENV is 0."""
    global _light_installed
    if _light_installed is not None:
        return _light_installed
    _light_installed = False
    if os.environ.get(LIGHT_ENV, "1") in ("0", ""):
        return False
    caching = sys.modules.get("numba.core.caching")
    if caching is None:
        return False
    cls = getattr(caching, "Cache", None)
    full = getattr(cls, "load_overload", None)
    if cls is None or full is None or not all(hasattr(cls, a) for a in ("_load_overload",
                                                                         "_guard_against_spurious_io_errors")):
        return False

    def load_overload(self, sig, target_context):
        mod = getattr(getattr(self, "_py_func", None), "__module__", None) or ""
        if not mod.startswith(_LIGHT_PREFIXES):
            return full(self, sig, target_context)
        nrt_initialize(target_context)  # the NRT's symbols (once per process; numba's refresh does this)
        with self._guard_against_spurious_io_errors():
            # numba's _load_overload, with one step between reading and linking: the hash secret's
            # symbols are registered (by importing numba's hashing module, 10-16 ms) only when the
            # cached object code names them (none of quantfmt's kernels hashes; a str/dict one would)
            cache_file, impl = getattr(self, "_cache_file", None), getattr(self, "_impl", None)
            if not getattr(self, "_enabled", False) or cache_file is None or impl is None:
                if getattr(self, "_enabled", True):
                    import numba.cpython.hashing  # noqa: F401
                return self._load_overload(sig, target_context)
            data = cache_file.load(self._index_key(sig, target_context.codegen()))
            if data is None:
                return None
            if _names_or_unknown(data, b"_numba_hashsecret_"):
                import numba.cpython.hashing  # noqa: F401  (its import registers those symbols)
            return impl.rebuild(target_context, data)

    load_overload.__doc__ = "quantfmt's light cache load (quantfmt.numba_cache.light_cache_loads)"
    cls.load_overload = load_overload
    _light_installed = True
    return True


_light_installed: bool | None = None


# ---- numba's runtime (NRT) from cached object code ----------------------------------------------
# numba.core.runtime.rtsys.initialize compiles the NRT's LLVM module (allocation, reference counts:
# what every kernel that makes an array links against) from IR in every process: 35-60 ms of LLVM
# measured on the 2-core Xeon, the largest step of a cached kernel's first call once the light load
# skips the refresh. nrt_initialize does what initialize does (the C helpers' symbols, then the
# module) but keeps the module's object code in a file beside the kernels' cache and loads it in
# later processes (~3 ms), as numba loads a cached kernel: the same codegen call, keyed by what
# numba keys a kernel's object code by (numba's and llvmlite's versions, the target triple, CPU and
# features), with a checksum, written atomically. Anything unexpected (another numba's internals,
# an unreadable, stale or damaged file) falls back to numba's own initialize.
#: Whether this process took the NRT from the file (tests read it).
nrt_from_file = False


def _nrt_cache_path(codegen) -> str | None:
    import hashlib

    import llvmlite
    import numba
    from numba.core import caching

    key = repr((numba.__version__, llvmlite.__version__, codegen.magic_tuple(), sys.implementation.cache_tag))
    impl = vars(caching).get("CacheImpl") or vars(caching)["_CacheImpl"]  # (older numba: _CacheImpl)
    if getattr(numba.config, "CACHE_LOCATOR_CLASSES", None):  # the user's own rules: numba's own way
        return None
    for cls in impl._locator_classes:  # numba's: NUMBA_CACHE_DIR, __pycache__, the user's cache dir
        locator = cls.from_function(nrt_initialize, __file__)  # (None unless its folder is writable)
        if locator is not None:
            name = f"quantfmt-nrt-{hashlib.sha256(key.encode()).hexdigest()[:20]}.nbo"
            return os.path.join(locator.get_cache_path(), name)
    return None


def _nrt_read(path: str):
    import hashlib
    import pickle

    with open(path, "rb") as f:
        blob = f.read()
    digest, payload = blob[:32], blob[32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"{path}: checksum mismatch")
    return pickle.loads(payload)


def _nrt_write(path: str, state) -> None:
    import hashlib
    import pickle

    payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".nrt-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def nrt_initialize(ctx) -> None:
    """numba's rtsys.initialize(ctx), with the NRT module's object code cached on disk (see above)."""
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.runtime import rtsys

    if getattr(rtsys, "_init", False):
        return
    try:
        import llvmlite.binding as ll
        from numba.core import config
        from numba.core.runtime import nrtdynmod

        helpers = importlib.import_module("numba.core.runtime._nrt_python").c_helpers
        create = nrtdynmod.create_nrt_module
        codegen = ctx.codegen()
        path = _nrt_cache_path(codegen)
    except Exception:  # another numba's internals: its own way
        return rtsys.initialize(ctx)
    if path is None or getattr(config, "NRT_STATS", False):
        return rtsys.initialize(ctx)
    with global_compiler_lock:
        if rtsys._init:
            return
        for py_name, address in helpers.items():  # as initialize registers them
            ll.add_symbol(py_name if py_name.startswith("_") else "NRT_" + py_name, address)
        try:
            library = codegen.unserialize_library(_nrt_read(path))
        except Exception:  # missing, stale or damaged: compile it (and replace the file)
            library = None
        global nrt_from_file
        nrt_from_file = library is not None
        if library is None:
            ir_mod, library = create(ctx)
            library.enable_object_caching()
            library.add_ir_module(ir_mod)
            library.finalize()
            with contextlib.suppress(Exception):
                _nrt_write(path, library.serialize_using_object_code())
        rtsys._library = library
        rtsys._init = True


def _names_or_unknown(data, symbol: bytes) -> bool:
    """Whether the bytes in a cached function's data (its object code among them) contain `symbol`;
    True as well when the data holds no bytes at all (a layout this check does not know)."""
    blobs: list = []
    todo = [data]
    while todo:
        o = todo.pop()
        if isinstance(o, (bytes, bytearray)):
            blobs.append(o)
        elif isinstance(o, (tuple, list)):
            todo.extend(o)
    return not blobs or any(symbol in b for b in blobs)
