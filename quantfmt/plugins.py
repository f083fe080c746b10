"""The format registry: loads plugins and maps FourCC tags to formats.

Plugins come from three places, all registered the same way (the `register_formats`
hook, see hookspecs.py):
  1. the built-in formats, every module of the `quantfmt_formats` package (plugins/);
  2. installed distributions with an entry point in the group "quantfmt";
  3. .py files in plugin directories (`--plugins-dir`, or QUANTFMT_PLUGINS_DIR, os.pathsep-separated).
A third-party plugin that fails to load, or registers an invalid or duplicate format, is
reported as a warning and skipped, unless strict mode is on (`--strict-plugins` or
QUANTFMT_STRICT_PLUGINS=1), where it is an error. A built-in that fails is always an error.

Loading is lazy, so a command pays only for the formats it uses (importing a format module
imports numba and decorates its kernels). The built-in package declares which module registers
which tags and aliases (`quantfmt_formats.MANIFEST`): `get_format("Q4_0")` imports q4_0.py and
nothing else. Everything is loaded, built-ins first as always, when a name no built-in declares
is asked for (a third-party tag, or an unknown one: its error lists every known tag), when
all formats or plugins are listed (`formats()`, `registry()`, `plugin_list()`), and on first
use in strict mode (so a broken plugin is an error whatever the command).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
import threading
import warnings
from pathlib import Path
from typing import TypedDict

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownFormatError
from .format import TAG_RE, Format
from .gcpause import paused

BUILTIN_PACKAGE = "quantfmt_formats"
ENTRY_POINT_GROUP = "quantfmt"


class PluginWarning(UserWarning):
    """A third-party plugin was skipped (not in strict mode)."""


class _Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("quantfmt")
        self.pm.add_hookspecs(hookspecs)
        self.formats: dict[str, Format] = {}
        self.aliases: dict[str, str] = {}  # another accepted name (e.g. a ggml name) -> tag
        self.plugins: list[dict] = []  # one record per plugin: name, source, formats, error
        self.tried: set[tuple[str, str]] = set()  # (name, source) of plugins loaded or failed: never twice
        self.complete = False  # every plugin tried (not just the built-ins some tags needed)
        self.cache_checked = False  # numba_cache.ensure_writable() has run
        self.light_checked = False  # numba_cache.light_cache_loads() has run (numba was loaded)


_lock = threading.RLock()
_registry: _Registry | None = None


class _Config(TypedDict):
    plugins_dirs: list[str] | None  # None: fall back to QUANTFMT_PLUGINS_DIR
    strict: bool | None  # None: fall back to QUANTFMT_STRICT_PLUGINS


_config: _Config = {"plugins_dirs": None, "strict": None}


def configure(plugins_dirs=None, strict: bool | None = None) -> None:
    """Set plugin directories and strictness before first use (the CLI's options). Resets the registry."""
    global _registry
    with _lock:
        _config["plugins_dirs"] = [str(p) for p in plugins_dirs] if plugins_dirs else None
        _config["strict"] = strict
        _registry = None


def settings() -> tuple[list[str], bool]:
    """(plugin folders, strict) in force here, environment included: what a worker process of a
    parallel conversion passes to `configure` so it loads the same formats."""
    return _plugin_dirs(), _strict()


def add_plugins_dir(path) -> None:
    """Also load the format plugins in folder `path`, now: the registry is rebuilt with it (the
    way to enable a plugins folder from Python once formats have been used)."""
    dirs = _plugin_dirs()
    if str(path) not in dirs:
        configure(plugins_dirs=[*dirs, str(path)], strict=_config["strict"])
    else:
        configure(plugins_dirs=dirs, strict=_config["strict"])


def _strict() -> bool:
    if _config["strict"] is not None:
        return bool(_config["strict"])
    return os.environ.get("QUANTFMT_STRICT_PLUGINS", "") not in ("", "0", "false", "no")


def _plugin_dirs() -> list[str]:
    if _config["plugins_dirs"] is not None:
        return list(_config["plugins_dirs"])
    env = os.environ.get("QUANTFMT_PLUGINS_DIR", "")
    return [p for p in env.split(os.pathsep) if p]


def _builtin_modules() -> list[str]:
    pkg = importlib.import_module(BUILTIN_PACKAGE)
    return sorted(
        f"{BUILTIN_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")
    )


def _load_dir_module(path: Path):
    import hashlib  # here: only plugin folders need it (OpenSSL's module, ~5 ms of every start-up)

    # A stable module name (not hash(), which is salted per process): numba's on-disk cache
    # records it, and a second process must find the same module to reuse compiled kernels.
    digest = hashlib.sha1(str(path.resolve().parent).encode()).hexdigest()[:12]
    name = f"quantfmt_plugin_dir_{digest}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _candidates():
    """(name, source, loader) for every plugin, built-ins first."""
    for mod in _builtin_modules():
        yield mod, "built-in", _builtin_loader(mod)
    import importlib.metadata  # only here: scanning installed distributions is not free

    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        label = f"{dist.name}:{ep.name}" if dist is not None else ep.name
        yield label, f"entry point {ep.value}", ep.load
    for d in _plugin_dirs():
        p = Path(d)
        if not p.is_dir():
            yield str(p), "plugins dir", (lambda p=p: (_ for _ in ()).throw(PluginError(f"{p} is not a directory")))
            continue
        for f in sorted(p.glob("*.py")):
            if not f.name.startswith("_"):
                yield f"{f.stem}", f"plugins dir {p}", (lambda f=f: _load_dir_module(f))


def _validate(fmt, plugin: str) -> None:
    if not isinstance(fmt, Format):
        raise PluginError(f"plugin {plugin!r} registered {fmt!r}, which is not a quantfmt.format.Format instance")
    if not isinstance(fmt.tag, str) or not TAG_RE.match(fmt.tag):
        raise PluginError(
            f"plugin {plugin!r} registered a format with tag {fmt.tag!r}: a tag is 1-4 characters of A-Z, 0-9, _"
        )
    br, bc = fmt.block_shape
    if not (isinstance(br, int) and isinstance(bc, int) and br >= 1 and bc >= 1):
        raise PluginError(f"plugin {plugin!r}: format {fmt.tag} has an invalid block_shape {fmt.block_shape!r}")
    if not (isinstance(fmt.block_bytes, int) and fmt.block_bytes >= 1):
        raise PluginError(f"plugin {plugin!r}: format {fmt.tag} has an invalid block_bytes {fmt.block_bytes!r}")
    if not (isinstance(fmt.layout_version, int) and fmt.layout_version >= 1):
        raise PluginError(f"plugin {plugin!r}: format {fmt.tag} has an invalid layout version {fmt.layout_version!r}")
    if "f32" not in fmt.modes:
        raise PluginError(f"plugin {plugin!r}: format {fmt.tag} must support the 'f32' qmatmul mode")
    if not isinstance(fmt.aliases, tuple) or not all(isinstance(a, str) and a for a in fmt.aliases):
        raise PluginError(f"plugin {plugin!r}: format {fmt.tag}'s aliases must be a tuple of non-empty strings")


def _manifest() -> dict[str, str]:
    """Every name (tag or alias) a built-in module declares it registers -> that module.

    Read from the package's MANIFEST without importing any format module. Only a shortcut: a name
    missing from it is found by loading every plugin, and a module that does not register a name
    it declares costs one extra import, never a wrong answer (tests/test_registry.py checks it)."""
    pkg = importlib.import_module(BUILTIN_PACKAGE)
    declared = getattr(pkg, "MANIFEST", {})
    return {n: f"{BUILTIN_PACKAGE}.{mod}" for mod, names in declared.items() for n in names}


def _builtin_loader(mod: str):
    return lambda: importlib.import_module(mod)


def _load_one(reg: _Registry, name: str, source: str, loader, strict: bool) -> None:
    """Import one plugin, call its register_formats hook, validate what it registers."""
    reg.tried.add((name, source))
    if not reg.cache_checked:
        from . import numba_cache

        numba_cache.ensure_writable()  # before any plugin decorates a cache=True kernel
        numba_cache.choose_threading_layer()  # before any parallel kernel runs
        reg.cache_checked = True
    record: dict = {"name": name, "source": source, "formats": [], "error": None}
    reg.plugins.append(record)
    builtin = source == "built-in"
    try:
        # Importing a plugin imports numba (~10^5 objects, no garbage): the collector's passes over
        # that growing heap were ~8 % of loading Q4_0's plugin; it runs once afterwards instead.
        with paused(freeze=True):  # the `quantfmt` command: its objects frozen (gcpause.freeze_imports)
            module = loader()
        if not reg.light_checked and "numba.core.caching" in sys.modules:
            from . import numba_cache

            numba_cache.light_cache_loads()  # numba is loaded; no kernel has run yet (they run on first use)
            reg.light_checked = True
        if reg.pm.is_registered(module):
            return
        reg.pm.register(module, name=name)
        problems: list[str] = []

        def register(fmt, _name=name, _record=record, _problems=problems):
            try:
                _validate(fmt, _name)
                for name in (fmt.tag, *fmt.aliases):
                    taken = reg.formats.get(name) or reg.formats.get(reg.aliases.get(name, ""))
                    if taken is not None:
                        raise PluginError(
                            f"format name {name!r} from plugin {_name!r} is already registered by plugin "
                            f"{taken.plugin!r} (format {taken.tag})"
                        )
            except PluginError as e:
                _problems.append(str(e))
                return
            fmt.plugin = _name
            reg.formats[fmt.tag] = fmt
            reg.aliases.update(dict.fromkeys(fmt.aliases, fmt.tag))
            _record["formats"].append(fmt.tag)

        try:
            reg.pm.check_pending()  # a @hookimpl whose name is no hook (a typo) is an error, not silence
        except pluggy.PluginValidationError as e:
            reg.pm.unregister(module)
            raise PluginError(f"plugin {name!r} ({source}): {e}; the hook is named 'register_formats'") from None
        for impl in reg.pm.hook.register_formats.get_hookimpls():
            if impl.plugin is module:
                impl.function(register=register)
        if problems:
            raise PluginError("; ".join(problems))
        if not record["formats"]:
            raise PluginError(f"plugin {name!r} ({source}) registered no format: does it define "
                              "`register_formats(register)` marked with @quantfmt.hookimpl, and call register()?")
    except Exception as e:  # a plugin is foreign code: any failure is reported, not a crash
        if isinstance(e, PluginError):
            msg = str(e)
        else:
            msg = f"plugin {name!r} ({source}) failed to load: {type(e).__name__}: {e}"
        record["error"] = msg
        if builtin or strict:
            raise PluginError(msg + ("" if builtin else " (strict plugin mode)")) from e
        warnings.warn(msg, PluginWarning, stacklevel=5)


def _load_builtin(reg: _Registry, mod: str) -> None:
    """Load the one built-in module `mod` (what a tag from the manifest needs)."""
    if (mod, "built-in") not in reg.tried:
        _load_one(reg, mod, "built-in", _builtin_loader(mod), _strict())


def _load_all(reg: _Registry) -> None:
    """Load every plugin not loaded yet (built-ins first, then entry points, then plugin dirs), and
    order plugins and formats as if all had been loaded at once: what is listed never depends on
    which formats were asked for before. Third-party plugins always load after every built-in, so
    a duplicate name is refused in the third-party plugin, exactly as when everything loads at once."""
    strict = _strict()
    rank: dict[tuple[str, str], int] = {}
    for name, source, loader in _candidates():
        rank.setdefault((name, source), len(rank))
        if (name, source) not in reg.tried:
            _load_one(reg, name, source, loader, strict)
    reg.plugins.sort(key=lambda r: rank.get((r["name"], r["source"]), len(rank)))  # stable: a repeat stays after
    reg.formats = {t: reg.formats[t] for r in reg.plugins for t in r["formats"] if t in reg.formats}
    reg.complete = True


def _current(full: bool) -> _Registry:
    """The registry; with `full`, every plugin loaded. In strict mode every plugin is loaded on first
    use, so that a broken plugin is an error whatever the command. A failed load discards the registry
    (the next call tries again), as a failed first load always did."""
    global _registry
    with _lock:
        reg = _registry if _registry is not None else _Registry()
        _registry = reg
        try:
            if (full or _strict()) and not reg.complete:
                _load_all(reg)
        except BaseException:
            _registry = None
            raise
        return reg


def registry() -> _Registry:
    """The registry with every plugin loaded."""
    return _current(full=True)


def formats() -> dict[str, Format]:
    """Every registered format, by tag, in registration order."""
    return dict(registry().formats)


def _lookup(reg: _Registry, tag) -> Format | None:
    if not isinstance(tag, str):
        return None
    return reg.formats.get(tag) or reg.formats.get(reg.aliases.get(tag, ""))


def find_format(tag) -> Format | None:
    """The format registered under `tag` (or one of its aliases), or None. Loads only what it takes:
    the built-in module that declares `tag`, and every plugin only for a tag no built-in declares."""
    global _registry
    with _lock:
        reg = _current(full=False)
        fmt = _lookup(reg, tag)
        if fmt is None and not reg.complete:
            try:
                mod = _manifest().get(tag) if isinstance(tag, str) else None
                if mod is not None:
                    _load_builtin(reg, mod)
                    fmt = _lookup(reg, tag)
                if fmt is None:
                    _load_all(reg)
                    fmt = _lookup(reg, tag)
            except BaseException:
                _registry = None
                raise
        return fmt


def has_format(tag) -> bool:
    """Whether `tag` names a format, without importing a built-in module the manifest vouches for."""
    with _lock:
        reg = _current(full=False)
        if _lookup(reg, tag) is not None or (isinstance(tag, str) and tag in _manifest()):
            return True
    return find_format(tag) is not None


def get_format(tag: str) -> Format:
    """The format registered under `tag` (or one of its aliases), or UnknownFormatError listing the known tags."""
    fmt = find_format(tag)
    if fmt is None:
        known = ", ".join(registry().formats) or "none"
        raise UnknownFormatError(
            f"unknown format tag {tag!r}: no loaded plugin provides it (known tags: {known}); "
            "install or enable the plugin that defines it"
        )
    return fmt


def plugin_formats(plugin: str) -> list[Format]:
    """The formats plugin `plugin` registered, in its order, if it is loaded (loads nothing)."""
    with _lock:
        reg = _current(full=False)
        tags: list[str] = next((r["formats"] for r in reg.plugins if r["name"] == plugin), [])
        return [reg.formats[t] for t in tags if t in reg.formats]


def plugin_list() -> list[dict]:
    """One record per plugin seen: name, source, formats registered, error (None if loaded)."""
    return [dict(p) for p in registry().plugins]
