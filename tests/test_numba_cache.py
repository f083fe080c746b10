"""numba_cache: cache=True kernels keep working when numba has nowhere to write its cache."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from quantfmt import numba_cache

PLUGIN = textwrap.dedent('''
    """ZZCT: a throwaway format whose dequantize is a cache=True numba kernel."""
    import numba
    import numpy as np

    import quantfmt
    from quantfmt.format import Format


    @numba.njit(cache=True)
    def _dq(data, out):
        for i in range(out.size):
            out[i] = np.float32(data[i]) - 128.0


    class ZZCT(Format):
        tag = "ZZCT"
        block_bytes = 1

        def _quantize(self, w):
            return np.clip(np.round(w) + 128, 0, 255).astype(np.uint8).reshape(-1)

        def _dequantize(self, data, rows, cols):
            out = np.empty(rows * cols, np.float32)
            _dq(data, out)
            return out.reshape(rows, cols)


    @quantfmt.hookimpl
    def register_formats(register):
        register(ZZCT())
''')

CHILD = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from quantfmt import QTensor, plugins
    if sys.argv[1] == "off":
        from quantfmt import numba_cache
        numba_cache.ensure_writable = lambda: None
    try:
        t = QTensor.quantize(np.full((2, 4), 3.0, np.float32), "ZZCT")
        print(json.dumps({"ok": float(t.dequantize()[1, 2]), "dir": os.environ.get("NUMBA_CACHE_DIR")}))
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
""")


@pytest.fixture
def nowhere_to_write(tmp_path):
    """A plugin dir whose __pycache__ cannot be a directory and a HOME that cannot hold ~/.cache."""
    plug = tmp_path / "plug"
    plug.mkdir()
    (plug / "zz_cachetest.py").write_text(PLUGIN)
    (plug / "__pycache__").write_text("a file where numba wants a directory")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(
        HOME="/dev/null",
        QUANTFMT_PLUGINS_DIR=str(plug),
        QUANTFMT_STRICT_PLUGINS="1",
        TMPDIR=str(tmp),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env, tmp


def _child(env, mode):
    p = subprocess.run(
        [sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX temp-dir ownership checks")
def test_plugin_with_cached_kernel_loads_when_numba_has_nowhere_to_write(nowhere_to_write):
    env, tmp = nowhere_to_write
    off = _child(env, "off")  # numba's own behaviour: the decorator fails, so the plugin does
    assert "no locator available" in off.get("error", ""), off
    on = _child(env, "on")
    assert on.get("ok") == 3.0, on
    assert on["dir"] == str(tmp / f"quantfmt-numba-cache-{os.getuid()}")
    cached = [f for _, _, fs in os.walk(on["dir"]) for f in fs if f.endswith(".nbi")]
    assert cached, "the kernel's cache index was written to the fallback dir"
    assert os.stat(on["dir"]).st_mode & 0o777 == 0o700


def test_explicit_numba_cache_dir_is_left_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(numba_cache, "user_cache_dir", lambda: "/dev/null/x")
    assert numba_cache.ensure_writable() is None


def test_writable_user_cache_means_no_change(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba_cache, "user_cache_dir", lambda: str(tmp_path / "c"))
    assert numba_cache.ensure_writable() is None
    assert "NUMBA_CACHE_DIR" not in os.environ


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_fallback_dir_is_private_and_updates_numba_config(monkeypatch, tmp_path):
    import numba.core.config as config

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(config, "CACHE_DIR", config.CACHE_DIR)  # restored after the test
    monkeypatch.setattr(numba_cache, "user_cache_dir", lambda: "/dev/null/numba")
    fb = tmp_path / "fb"
    monkeypatch.setattr(numba_cache, "fallback_dir", lambda: str(fb))
    try:
        assert numba_cache.ensure_writable() == str(fb)
        assert os.environ["NUMBA_CACHE_DIR"] == str(fb) and config.CACHE_DIR == str(fb)
        assert fb.stat().st_mode & 0o777 == 0o700
    finally:
        os.environ.pop("NUMBA_CACHE_DIR", None)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_fallback_dir_others_can_write_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba_cache, "user_cache_dir", lambda: "/dev/null/numba")
    fb = tmp_path / "shared"
    fb.mkdir()
    fb.chmod(0o777)
    monkeypatch.setattr(numba_cache, "fallback_dir", lambda: str(fb))
    assert numba_cache.ensure_writable() is None  # numba's cache index is a pickle: never trust it
    assert "NUMBA_CACHE_DIR" not in os.environ
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setattr(numba_cache, "fallback_dir", lambda: str(link))
    assert numba_cache.ensure_writable() is None


# Every kernel of every built-in format, run in a fresh process whose kernels come from numba's cache
# through quantfmt's light load (numba_cache.light_cache_loads: no target-context refresh), against
# the same calls in this process. Prints per format the CRC32 of each result, and the dispatchers
# that had to compile (a cache miss runs numba's full pipeline, refresh included: not a light load).
LIGHT_CHILD = textwrap.dedent(r"""
    import json, math, sys, zlib
    import numpy as np
    from quantfmt import QTensor, formats

    def results(tag, fmt):
        br, bc = fmt.block_shape
        shape = (math.lcm(br, 64), math.lcm(bc, 256))
        w = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        t = QTensor.quantize(w, tag)
        out = [t.data, t.dequantize(), t.rows(np.arange(0, shape[0], 3))]
        for mode in fmt.modes:
            out += [t.matmul(w[0], mode), t.matmul(w, mode)]
        return [zlib.crc32(np.ascontiguousarray(a).tobytes()) for a in out]

    tags = [t for t, f in formats().items() if f.can_quantize and f.value_kind == "f"]
    got = {t: results(t, formats()[t]) for t in tags}
    if len(sys.argv) > 1:
        from numba.core.caching import Cache
        from numba.core.dispatcher import Dispatcher
        import gc
        misses = sorted({d.py_func.__module__ + "." + d.py_func.__name__ for d in gc.get_objects()
                         if isinstance(d, Dispatcher) and d.py_func.__module__.startswith("quantfmt")
                         and sum(d.stats.cache_misses.values())})
        light = (Cache.load_overload.__doc__ or "").startswith("quantfmt's light")
        print(json.dumps({"results": got, "misses": misses, "light": light}))
    else:
        print(json.dumps({"results": got}))
""")


def test_light_cache_loads_run_every_kernel_as_numba_loads_them():
    env = {k: v for k, v in os.environ.items() if k != numba_cache.LIGHT_ENV}
    # numba's own loads (the full refresh) first: they also fill the cache for the light process
    full = subprocess.run([sys.executable, "-c", LIGHT_CHILD], capture_output=True, text=True,
                          env={**env, numba_cache.LIGHT_ENV: "0"})
    assert full.returncode == 0, full.stderr[-2000:]
    light = subprocess.run([sys.executable, "-c", LIGHT_CHILD, "light"], capture_output=True, text=True, env=env)
    assert light.returncode == 0, light.stderr[-2000:]
    a = json.loads(full.stdout.strip().splitlines()[-1])
    b = json.loads(light.stdout.strip().splitlines()[-1])
    assert b["light"], "the light load was not installed"
    assert b["misses"] == [], f"kernels compiled instead of loading from the cache: {b['misses']}"
    assert b["results"] == a["results"]


def test_hash_secret_check_finds_the_symbol_or_assumes_it():
    names = numba_cache._names_or_unknown
    assert names(("lib", "object", (b"..._numba_hashsecret_siphash_k0...", b"x")), b"_numba_hashsecret_")
    assert not names(("lib", "object", (b"NRT_incref", bytearray(b"y"))), b"_numba_hashsecret_")
    assert names(("no", "bytes", ("at", "all")), b"_numba_hashsecret_")  # a layout it does not know


_COMPILE_AFTER_LIGHT = textwrap.dedent("""
    import numpy as np, numba, quantfmt
    quantfmt.get_format("Q4_0").quantize(np.ones((64, 1024), np.float32))  # its kernel: a light load

    @numba.njit
    def f(a):  # needs what the light load skipped: dict, set and str-hash lowering (numba's refresh)
        d = {0: 0.0, 1: 0.0, 2: 0.0}
        for i in range(a.size):
            d[i % 3] = d[i % 3] + a[i]
        s = {"a", "b"}
        return np.sort(a)[-1] + d[0] + len(s) + (hash("abc") - hash("abc"))

    print(f(np.arange(10.0)))
""")


def test_a_compile_after_light_loads_gets_numbas_full_context():
    out = subprocess.check_output([sys.executable, "-W", "ignore", "-c", _COMPILE_AFTER_LIGHT], text=True)
    assert float(out.split()[-1]) == 29.0


_NRT_CHILD = textwrap.dedent("""
    import numpy as np, numba, quantfmt
    from quantfmt import numba_cache
    data = quantfmt.get_format("Q4_0").quantize(np.linspace(-1, 1, 64 * 1024, dtype=np.float32).reshape(64, 1024))

    @numba.njit
    def g(n):  # compiled here, after the runtime came from the file or not: links against it
        a = np.ones(n)
        b = [a, a + 1.0]
        return b[1].sum()

    print(numba_cache.nrt_from_file, int(data.sum()), g(10))
""")


def test_the_runtime_comes_from_its_cached_object_code_and_a_bad_file_is_replaced(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != numba_cache.LIGHT_ENV}
    env[numba_cache.ENV] = str(tmp_path)

    def child(**extra):
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", _NRT_CHILD], capture_output=True, text=True,
                             env={**env, **extra})
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    first = child()  # empty cache: kernels compiled, the runtime compiled and written
    files = list(tmp_path.rglob("quantfmt-nrt-*.nbo"))
    assert first[0] == "False" and len(files) == 1
    second = child()
    assert second == ["True", *first[1:]] and first[2] == "20.0"
    # a damaged file: numba's compile again, the same results, and a good file back
    blob = bytearray(files[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    files[0].write_bytes(bytes(blob))
    assert child() == first
    assert child() == second
    # numba's own loads leave the runtime to numba
    assert child(**{numba_cache.LIGHT_ENV: "0"}) == first
