"""The `quantfmt` command's exit (cli._exit): skipping the interpreter's teardown loses nothing a
normal exit would give: the exit code, the output file complete, stdout flushed into a pipe,
atexit handlers run (the benchmark's peak-RSS probe is one), and QUANTFMT_FULL_EXIT=1 restores
the normal exit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import quantfmt

# Runs `main()` as the console script does, with an atexit handler registered first (it runs last).
_CHILD = r"""
import atexit, sys
atexit.register(lambda: print("ATEXIT-RAN", file=sys.stderr, flush=True))
from quantfmt.cli import main
sys.argv = ["quantfmt", *sys.argv[1:]]
main()
"""


def _quantfmt(*args, full_exit=False):
    env = dict(os.environ)
    env.pop("QUANTFMT_FULL_EXIT", None)
    if full_exit:
        env["QUANTFMT_FULL_EXIT"] = "1"
    return subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture
def model(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "in.safetensors"
    save_file({"a.weight": rng.standard_normal((64, 256), dtype=np.float32),
               "b.weight": rng.standard_normal((32, 64), dtype=np.float32)}, str(p))
    return p


@pytest.mark.parametrize("full_exit", [False, True])
def test_convert_writes_a_complete_file_prints_everything_and_runs_atexit(model, tmp_path, full_exit):
    out = tmp_path / "out.safetensors"
    r = _quantfmt("convert", model, out, "--to", "Q8_0", "--jobs", "1", full_exit=full_exit)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}") and "total:" in r.stdout  # stdout (a pipe) flushed
    assert r.stderr.rstrip().endswith("ATEXIT-RAN")
    with quantfmt.open_model(out) as m:  # complete: every tensor, the same bytes as in-process
        ref = quantfmt.load(model, "Q8_0")
        assert sorted(m) == ["a.weight", "b.weight"]
        for name in m:
            assert m[name].tag == "Q8_0" and np.array_equal(m[name].data, ref[name].data)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]


def test_an_error_exits_1_with_its_message_and_runs_atexit(model, tmp_path):
    out = tmp_path / "out.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(out))
    r = _quantfmt("convert", model, out, "--to", "Q8_0")
    assert r.returncode == 1
    assert "exists" in r.stderr and "Traceback" not in r.stderr and "ATEXIT-RAN" in r.stderr
    assert list(load_file(str(out))) == ["x"]  # untouched


def test_usage_errors_and_help_keep_their_exit_codes():
    assert _quantfmt("--help").returncode == 0
    r = _quantfmt("no-such-command")
    assert r.returncode == 2 and "No such command" in r.stderr and "ATEXIT-RAN" in r.stderr
