"""The third-party path: examples/quantfmt-example-format (format Q3_X) as an installed
distribution found through its entry point, and as a file in a --plugins-dir, with no
change to quantfmt; plus its numba kernels checked against its numpy reference."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from quantfmt.cli import cli
from quantfmt.errors import RangeError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "quantfmt-example-format"
MODULE = EXAMPLE / "quantfmt_example_format.py"
TAG = "Q3_X"


@pytest.fixture(scope="module")
def q3x(tmp_path_factory):
    """The example module, imported from a private copy: numba's on-disk cache (cache=True)
    records the module name, so a cache written under another name for the same file
    would not load; a copy keeps this test independent of other runs."""
    path = tmp_path_factory.mktemp("q3x") / MODULE.name
    shutil.copy(MODULE, path)
    name = "quantfmt_example_format_under_test"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # numba's cache pickles kernels' environments by module name
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


def _quantfmt(*args, pythonpath=None, check=True):
    """Run `python -m quantfmt ARGS` in a fresh process, plugins strict, no inherited plugin dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTFMT_") and k != "PYTHONHASHSEED"}
    env["QUANTFMT_STRICT_PLUGINS"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res = subprocess.run(
        [sys.executable, "-m", "quantfmt", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(pythonpath or ROOT),
        timeout=600,
    )
    if check:
        assert res.returncode == 0, (
            f"quantfmt {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
        )
    return res


def test_core_does_not_know_the_example():
    for d in ("quantfmt", "plugins"):
        for f in (ROOT / d).rglob("*.py"):
            # As a whole word: the ggml name IQ3_XXS contains the letters Q3_X.
            assert not re.search(rf"(?<![A-Za-z0-9_]){TAG}(?![A-Za-z0-9_])", f.read_text()), (
                f"{f} mentions {TAG}: the example must need no change to the core"
            )


# ---- the example's kernels against its numpy reference --------------------------------------


# 1.5e-7: fp16-subnormal scales, rounded down enough that codes need the 0..7 clamp
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e-6, 1.5e-7, 3e-8, 0.0])
def test_example_kernels_match_reference(q3x, scale):
    fmt = q3x.Q3_X()
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((9, 96), dtype=np.float32) * np.float32(scale)).astype(np.float32)
    w[2, :32] = w[2, 0]  # a constant block
    w[3, 32:64] = 0  # a zero block
    w[4, 64:96] = np.float32(scale) * np.arange(32, dtype=np.float32) / 8  # exact ties at x.5 steps
    data = fmt.quantize(w)
    assert np.array_equal(data, q3x.quantize_ref(w))
    deq = fmt.dequantize(data, w.shape)
    assert np.array_equal(deq.view(np.uint32), q3x.dequantize_ref(data, *w.shape).view(np.uint32))
    assert (deq[3, 32:64] == 0).all()
    x = rng.standard_normal((3, 96), dtype=np.float32)
    ref = x.astype(np.float64) @ deq.astype(np.float64).T
    got = fmt.qmatmul(data, w.shape, x)
    bound = 1e-5 * np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(deq, axis=1)[None, :]
    assert (np.abs(got - ref) <= bound + 1e-30).all()


def test_example_layout_by_hand(q3x):
    """One block built by hand from the layout in the module docstring."""
    codes = np.array([(3 * i + 1) % 8 for i in range(32)], np.uint8)  # every code 0..7 occurs
    d = np.float16(0.5)
    lo = [
        int(codes[j] & 3 | (codes[j + 8] & 3) << 2 | (codes[j + 16] & 3) << 4 | (codes[j + 24] & 3) << 6)
        for j in range(8)
    ]
    hi = [sum(int(codes[4 * k + j] >> 2) << k for k in range(8)) for j in range(4)]
    block = np.frombuffer(d.astype("<f2").tobytes() + bytes(lo) + bytes(hi), np.uint8)
    want = 0.5 * (codes.astype(np.float32) - 4)
    assert np.array_equal(q3x.Q3_X().dequantize(block, (32,)), want)
    assert np.array_equal(q3x.Q3_X().quantize(want), block)  # the extreme -2 = -4d sets d = 0.5


def test_example_range_error(q3x):
    w = np.ones((2, 64), np.float32)
    w[1, 40] = 3e5
    with pytest.raises(RangeError, match=r"Q3_X: block 1 of row 1 .*262016"):
        q3x.Q3_X().quantize(w)


# ---- as a plugins-dir file ---------------------------------------------------------------


def _plugins_dir(tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    shutil.copy(MODULE, d)
    return d


def test_plugins_dir_registers(tmp_path, fresh_registry):
    d = _plugins_dir(tmp_path)
    res = CliRunner().invoke(cli, ["--plugins-dir", str(d), "--strict-plugins", "formats", "--json"])
    assert res.exit_code == 0, res.output
    (info,) = [f for f in json.loads(res.stdout) if f["tag"] == TAG]
    assert info["plugin"] == "quantfmt_example_format" and info["bits_per_weight"] == 3.5
    fresh_registry.configure(plugins_dirs=[d], strict=True)
    assert type(fresh_registry.get_format(TAG)).__name__ == "Q3_X"


@pytest.mark.slow
def test_plugins_dir_numba_cache_works_in_a_second_process(tmp_path):
    d = _plugins_dir(tmp_path)
    for _ in range(2):
        res = _quantfmt("--plugins-dir", str(d), "check-format", TAG, check=False)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_plugins_dir_check(tmp_path):
    d = _plugins_dir(tmp_path)
    res = _quantfmt("--plugins-dir", str(d), "check-format", TAG, "--json")
    (rep,) = json.loads(res.stdout)
    assert rep["tag"] == TAG and rep["ok"] and rep["plugin"] == "quantfmt_example_format"
    assert rep["bits_per_weight"] == 3.5 and rep["metrics"]["rel_rmse"] < 0.2


# ---- as an installed distribution (entry point) ---------------------------------------------


def _pip_install_target(src: Path, target: Path) -> None:
    """pip install --no-deps --target. The build needs setuptools >= 61 (PEP 621 metadata) and,
    before setuptools 70.1, wheel: use this interpreter's when it has them, else let pip fetch
    them into an isolated build environment."""
    try:
        import setuptools

        local = int(setuptools.__version__.split(".")[0]) >= 61
        if local and int(setuptools.__version__.split(".")[0]) < 71:
            local = importlib.util.find_spec("wheel") is not None
    except ImportError:
        local = False
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-input", "--target", str(target)]
    cmd += ["--no-build-isolation"] if local else []
    res = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "quantfmt-example-format"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = tmp_path_factory.mktemp("site")
    _pip_install_target(src, target)
    return target


@pytest.mark.slow
def test_installed_distribution_is_found_by_entry_point(installed):
    eps = (installed / "quantfmt_example_format-0.1.0.dist-info" / "entry_points.txt").read_text()
    assert "[quantfmt]" in eps and "q3x = quantfmt_example_format" in eps

    fmts = json.loads(_quantfmt("formats", "--json", pythonpath=installed).stdout)
    (info,) = [f for f in fmts if f["tag"] == TAG]
    assert info["plugin"].endswith(":q3x") and "example" in info["plugin"].replace("_", "-")
    assert info["block_shape"] == [1, 32] and info["block_bytes"] == 14 and info["modes"] == ["f32"]

    out = _quantfmt("plugins", pythonpath=installed).stdout
    (line,) = [ln for ln in out.splitlines() if ln.startswith(info["plugin"])]
    assert "entry point quantfmt_example_format" in line and TAG in line and line.rstrip().endswith("ok")

    out = _quantfmt("check-format", TAG, pythonpath=installed).stdout
    (row,) = [ln.split() for ln in out.splitlines() if ln.startswith(TAG)]
    assert row[1] == "3.5" and "ok" in row and info["plugin"] in row

    code = (
        "from quantfmt import plugins, QTensor; import numpy as np\n"
        f"f = plugins.get_format({TAG!r}); print(type(f).__module__, f.plugin)\n"
        f"t = QTensor.quantize(np.ones((2, 64), np.float32), {TAG!r})\n"
        "print(t.nbytes, t.dequantize().sum())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTFMT_")}
    env["PYTHONPATH"] = str(installed)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.split() == ["quantfmt_example_format", info["plugin"], "56", "128.0"]


@pytest.mark.slow
def test_uninstalled_example_is_unknown():
    res = _quantfmt("check-format", TAG, check=False)
    assert res.returncode == 1 and res.stderr.startswith(f"Error: unknown format tag '{TAG}'")


# ---- the simple route: I8_X, two numpy functions on a BlockFormat ----------------------------

SIMPLE = EXAMPLE / "quantfmt_example_simple.py"


def test_simple_route_example_conforms(tmp_path, fresh_registry):
    d = tmp_path / "plugins"
    d.mkdir()
    shutil.copy(SIMPLE, d)
    fresh_registry.configure(plugins_dirs=[d], strict=True)
    fmt = fresh_registry.get_format("I8_X")
    assert fmt.plugin == "quantfmt_example_simple"
    from quantfmt.testing import check_format

    rep = check_format(fmt)
    assert rep.ok, str(rep)
    # the simple route's get_rows decodes only the wanted rows, and matches dequantize
    w = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    data = fmt.quantize(w)
    assert np.array_equal(fmt.get_rows(data, w.shape, [4, 0]), fmt.dequantize(data, w.shape)[[4, 0]])
    with pytest.raises(RangeError, match="I8_X"):
        fmt.quantize(np.full((1, 32), 65520.0 * 127, np.float32))
