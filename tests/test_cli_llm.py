"""`quantfmt run` and `quantfmt eval` (and its scoreboard) on a tiny random llama whose file carries
its GGUF key-values, tokenizer included, as a GGUF converted to quantfmt does."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from test_llm import N_EMBD, gguf_kv, random_weights
from test_tokenizer import gpt2_kv

import quantfmt
from quantfmt.cli import cli
from quantfmt.tensor import Model, QTensor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok_kv = gpt2_kv()
    vocab = len(tok_kv[1][2])
    w = random_weights(3, tied=True)
    r = np.random.default_rng(5)
    w["token_embd.weight"] = r.standard_normal((vocab, N_EMBD)).astype(np.float32)
    kv = [e for e in gguf_kv() if not e[0].endswith("vocab_size") and not e[0].startswith("tokenizer.")]
    kv += [["llama.vocab_size", "UINT32", vocab]] + tok_kv
    m = Model({n: QTensor.quantize(a, "F32", n) for n, a in w.items()}, {"gguf": {"version": 3, "kv": kv}})
    path = d / "tiny.safetensors"
    quantfmt.save(m, path)
    text = d / "text.txt"
    text.write_text("the thing is in the thing, and the thing's thing is in it. " * 12)
    return path, text


def cli_json(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_run_generates_and_reports_speed(tiny):
    path, _ = tiny
    rec = cli_json("run", path, "-p", "the thing", "-n", "6", "--json")
    assert 1 <= rec["generated_tokens"] <= 6 and isinstance(rec["text"], str)
    assert rec["prefill_tokens_per_s"] > 0 and rec["kv_cache_bytes"] > 0
    # greedy is deterministic; a quantized-on-load run works the same way
    assert cli_json("run", path, "-p", "the thing", "-n", "6", "--json")["text"] == rec["text"]
    q = cli_json("run", path, "-p", "the thing", "-n", "6", "--json", "--to", "Q8_0")
    assert q["model_bytes"] < rec["model_bytes"]
    r = CliRunner().invoke(cli, ["run", str(path), "-p", "the thing", "-n", "4"])
    assert r.exit_code == 0 and r.stdout.startswith("the thing") and "decode:" in r.stderr
    # the kernels' first calls run before the prompt and are reported apart, not in the speeds
    assert rec["warm_up_seconds"] > 0 and "first calls of the kernels" in r.stderr
    # one token is the prefill's: no decode rate (it printed "0.0 tokens/s")
    r = CliRunner().invoke(cli, ["run", str(path), "-p", "the thing", "-n", "1"])
    # (a number of its own: a prefill of 6650.0 tokens/s ends in "0.0 tokens/s" too)
    assert r.exit_code == 0 and "decode: 1 tokens, no decode step" in r.stderr
    assert not re.search(r"(?<![\d.])0\.0 tokens/s", r.stderr), r.stderr


def test_warm_up_leaves_the_generation_unchanged(tiny):
    from quantfmt.ops.run import open_runner, run_text

    path, _ = tiny
    runner, tok, model = open_runner(path)
    with model:
        cold = run_text(runner, tok, "the thing " * 20, 8, warm=False)
        warm = run_text(runner, tok, "the thing " * 20, 8)
    assert warm[0] == cold[0] and warm[1].generated_tokens == cold[1].generated_tokens
    assert warm[1].warm_up_seconds > 0 and cold[1].warm_up_seconds == 0


def test_eval_perplexity_and_kld_against_a_reference(tiny):
    path, text = tiny
    base = cli_json("eval", path, "--text", text, "--ctx", "32", "--json")
    assert np.isfinite(base["ppl"]) and base["ppl"] > 1 and base["chunks"] >= 2
    q = cli_json("eval", path, "--text", text, "--ctx", "32", "--to", "Q4_0", "--reference", path, "--json")
    k = q["kld"]
    assert k["kld_mean"] > 0 and 0 <= k["same_top"] <= 1 and k["ppl_ref"] == pytest.approx(base["ppl"], rel=1e-6)
    same = cli_json("eval", path, "--text", text, "--ctx", "32", "--reference", path, "--json")["kld"]
    assert same["kld_mean"] < 1e-9 and same["same_top"] == 1.0


def test_scoreboard(tiny):
    path, text = tiny
    board = cli_json("eval", path, "--text", text, "--ctx", "32", "--chunks", "2", "--formats", "Q8_0,Q4_0",
                     "--recipes", "Q4_K_M", "--json")
    e = {x["name"]: x for x in board["entries"]}
    assert set(e) == {"Q8_0", "Q4_0", "Q4_K_M"}
    assert e["Q4_0"]["bits_per_weight"] < e["Q8_0"]["bits_per_weight"] < 32
    assert e["Q8_0"]["kld"]["kld_mean"] < e["Q4_0"]["kld"]["kld_mean"]
    assert all(x["decode_tokens_per_s"] > 0 for x in board["entries"])
    r = CliRunner().invoke(cli, ["eval", str(path), "--text", str(text), "--ctx", "32", "--chunks", "1",
                                 "--formats", "Q8_0"])
    assert r.exit_code == 0 and "KLD mean" in r.stdout and "Q8_0" in r.stdout
