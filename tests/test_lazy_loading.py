"""Start-up and first use: a command imports only the format modules it needs, numba only when a
kernel is needed, and compiles only the kernels it runs. Checked in child processes (sys.modules and
numba's on-disk cache files), as a user's command would run."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

import quantfmt_formats
from quantfmt import plugins
from quantfmt.errors import UnknownFormatError

# Runs the quantfmt CLI in-process with the given arguments, then prints which format modules and
# whether numba were imported.
CHILD = textwrap.dedent("""
    import json, sys
    from quantfmt.cli import cli
    try:
        cli.main(sys.argv[1:], prog_name="quantfmt", standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
    mods = sorted(m for m in sys.modules if m.startswith("quantfmt_formats."))
    print(json.dumps({"numba": "numba" in sys.modules, "modules": mods}))
""")


def _run(args, env=None):
    p = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _public(mods):
    return {m for m in mods if not m.split(".")[-1].startswith("_")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lazy")
    rng = np.random.default_rng(0)
    f32 = d / "f32.safetensors"
    save_file({"blk.0.w": rng.standard_normal((64, 256), dtype=np.float32),
               "blk.0.norm": np.ones(256, np.float32)}, str(f32))
    q4 = d / "q4.safetensors"
    subprocess.run([sys.executable, "-m", "quantfmt.cli", "convert", str(f32), str(q4), "--to", "Q4_0", "-q"],
                   check=True, capture_output=True)
    return d, f32, q4


def test_inspect_of_a_float_file_imports_no_kernel_module_and_no_numba(files):
    _, f32, _ = files
    got = _run(["inspect", str(f32)])
    assert got == {"numba": False, "modules": ["quantfmt_formats.plain"]}


def test_inspect_of_a_q4_0_file_imports_only_its_formats(files):
    _, _, q4 = files
    got = _run(["inspect", str(q4)])
    assert _public(got["modules"]) == {"quantfmt_formats.plain", "quantfmt_formats.q4_0"}, got


def test_convert_to_q4_0_imports_only_q4_0_and_compiles_only_its_kernels(files, tmp_path):
    _, f32, _ = files
    cache = tmp_path / "numba-cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    got = _run(["convert", str(f32), str(tmp_path / "out.safetensors"), "--to", "Q4_0", "-q"], env)
    assert _public(got["modules"]) == {"quantfmt_formats.plain", "quantfmt_formats.q4_0"}, got
    compiled = sorted(f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".nbi"))
    # numba names a cache index <module>.<function>-<line>.<python>.nbi
    assert compiled, "the quantize kernel was compiled and cached"
    assert {f.split(".")[0] for f in compiled} == {"q4_0"}, compiled
    assert all("quantize" in f for f in compiled), compiled  # convert quantizes: no matmul, no dequantize


def test_formats_and_unknown_tags_still_see_everything(files):
    d, f32, _ = files
    got = _run(["formats", "--json"])
    assert _public(got["modules"]) == {f"quantfmt_formats.{m}" for m in quantfmt_formats.MANIFEST}
    p = subprocess.run([sys.executable, "-m", "quantfmt.cli", "convert", str(f32), str(d / "x.safetensors"),
                        "--to", "NOPE"], capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "unknown format tag 'NOPE'" in p.stderr and "Q4_0, Q4_1" in p.stderr and "IQ4N" in p.stderr


def test_manifest_matches_what_the_modules_register(fresh_registry):
    declared = {f"quantfmt_formats.{m}": set(names) for m, names in quantfmt_formats.MANIFEST.items()}
    seen: dict[str, set] = {}
    for rec in plugins.plugin_list():
        if rec["source"] == "built-in":
            names = set(rec["formats"])
            for t in rec["formats"]:
                names.update(plugins.get_format(t).aliases)
            seen[rec["name"]] = names
    assert seen == declared


def test_ggml_types_resolve_lazily_to_what_the_full_table_says(fresh_registry):
    from quantfmt.io import gguf as gguf_io

    table = gguf_io.ggml_formats()
    for name, fmt in table.items():
        plugins.configure()
        assert gguf_io.ggml_format(name).tag == fmt.tag, name
        assert gguf_io.ggml_name_of(fmt.tag) == name
    assert gguf_io.ggml_format("Q9_9") is None and gguf_io.ggml_name_of("U8") is None


def test_lazy_then_full_load_lists_in_the_same_order(fresh_registry):
    plugins.configure()
    first = plugins.get_format("Q8_0")
    assert plugins.find_format("IQ4_NL").tag == "IQ4N"  # an alias, from the manifest
    lazy_order = list(plugins.formats())
    names = [r["name"] for r in plugins.plugin_list()]
    plugins.configure()
    assert list(plugins.formats()) == lazy_order
    assert [r["name"] for r in plugins.plugin_list()] == names
    assert plugins.get_format("Q8_0") is not first  # a new registry, its own instances
    with pytest.raises(UnknownFormatError, match=r"known tags: I1_S, .*Q4_0, .*Q8_B"):
        plugins.get_format("NOPE")


def test_a_third_party_tag_loads_the_plugins_dir(tmp_path, fresh_registry):
    (tmp_path / "zz.py").write_text(textwrap.dedent("""
        import quantfmt
        from quantfmt_formats.plain import F32

        class ZZ32(F32):
            tag = "ZZ32"

        @quantfmt.hookimpl
        def register_formats(register):
            register(ZZ32())
    """))
    plugins.configure(plugins_dirs=[tmp_path])
    assert plugins.get_format("Q4_0").plugin == "quantfmt_formats.q4_0"
    assert "zz" not in [r["name"] for r in plugins._current(full=False).plugins]  # not needed yet
    assert plugins.get_format("ZZ32").plugin == "zz"
    assert [r["name"] for r in plugins.plugin_list()][-1] == "zz"  # third parties after every built-in


def test_strict_mode_loads_every_plugin_on_first_use(tmp_path, fresh_registry):
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom at import')\n")
    plugins.configure(plugins_dirs=[tmp_path], strict=True)
    with pytest.raises(plugins.PluginError, match="boom at import.*strict"):
        plugins.get_format("Q4_0")  # a built-in tag: still an error, as before lazy loading
    plugins.configure(plugins_dirs=[tmp_path])
    assert plugins.get_format("Q4_0").tag == "Q4_0"  # not strict: a tag that needs no third party works


def test_parallel_rows_covers_every_row_once_on_the_threads_numba_allows():
    import threading

    import numba

    from quantfmt.families import n_chunks, parallel_rows

    rows, cols = 1000, 4096
    seen = np.zeros(rows, np.int64)
    threads = set()
    lock = threading.Lock()

    def kernel(out, r0, r1):
        with lock:
            out[r0:r1] += 1
            threads.add(threading.get_ident())

    assert n_chunks(rows, cols) > 2
    parallel_rows(kernel, rows, cols, seen)
    assert (seen == 1).all()
    assert len(threads) <= numba.get_num_threads()
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        threads.clear()
        parallel_rows(kernel, rows, cols, seen)
        assert (seen == 2).all() and threads == {threading.get_ident()}  # one thread: the caller's
    finally:
        numba.set_num_threads(before)


def test_parallel_rows_never_waits_for_a_helper_that_has_not_started(monkeypatch):
    # A helper descheduled (here: asleep for 2 s before it looks at any job) must not hold up a call:
    # the caller takes every range itself and returns; the late helper finds the job closed.
    import threading

    import numba

    from quantfmt import families

    if numba.get_num_threads() < 2:
        pytest.skip("one thread: parallel_rows runs inline")
    monkeypatch.setattr(families._RowsPool, "_current", None)  # a fresh pool, with the slow helper
    woke = threading.Event()
    helper = families._RowsPool._helper

    def late(self, index):
        time.sleep(2.0)
        woke.set()
        helper(self, index)

    monkeypatch.setattr(families._RowsPool, "_helper", late)
    seen = np.zeros(64, np.int64)
    threads = set()

    def kernel(out, r0, r1):
        out[r0:r1] += 1
        threads.add(threading.get_ident())

    t0 = time.perf_counter()
    families.parallel_rows(kernel, 64, 1 << 16, seen)
    assert time.perf_counter() - t0 < 1.0 and not woke.is_set()
    assert (seen == 1).all() and threads == {threading.get_ident()}
    assert woke.wait(5.0)
    families.parallel_rows(kernel, 64, 1 << 16, seen)  # the pool works on once the helper is up
    assert (seen == 2).all()


def test_decode_threads_splits_only_work_that_pays_for_the_hand_off():
    import numba

    from quantfmt.families import MIN_THREADED_WEIGHTS, decode_threads

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        assert decode_threads(1 << 16, 1 << 16) == 1
        if before >= 2:
            numba.set_num_threads(2)  # T/(T-1) = 2: from twice MIN_THREADED_WEIGHTS
            assert decode_threads(576, 1536) == 1
            assert decode_threads(MIN_THREADED_WEIGHTS // 4096, 4096) == 1
            assert decode_threads(2 * MIN_THREADED_WEIGHTS // 4096 - 1, 4096) == 1
            assert decode_threads(2 * MIN_THREADED_WEIGHTS // 4096, 4096) == 2
            assert decode_threads(11008, 4096) == 2
    finally:
        numba.set_num_threads(before)


def test_parallel_rows_reraises_a_kernel_error():
    from quantfmt.families import parallel_rows

    def kernel(r0, r1):
        if r1 == 64:  # the last range: whichever thread runs it, on any number of threads
            raise ValueError(f"rows {r0}..{r1}")

    with pytest.raises(ValueError, match="rows"):
        parallel_rows(kernel, 64, 1 << 16)


def test_parallel_rows_stops_handing_out_ranges_after_a_failure():
    from quantfmt.families import n_chunks, parallel_rows

    calls = []

    def kernel(r0, r1):
        calls.append(r0)
        if r0 == 0:  # the first range: taken before any other, by whichever thread
            raise KeyboardInterrupt
        time.sleep(0.005)  # a range takes a while (and lets the failing thread run)

    assert n_chunks(64, 1 << 16) == 64
    with pytest.raises(KeyboardInterrupt):
        parallel_rows(kernel, 64, 1 << 16)
    assert 0 in calls and len(calls) < 64
