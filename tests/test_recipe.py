"""Recipes as users meet them (issue 10, items 3-5, 7, 8): protection by shape and role with a
reason for every tensor, regular-expression rules, rules as dicts, warnings for rules that do
nothing, the output head promoted as llama-quantize does, --fallback auto; plugin mistakes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import quantfmt
from quantfmt import plugins
from quantfmt.cli import cli
from quantfmt.errors import PluginError, RecipeError
from quantfmt.recipe import Recipe, RecipeWarning, nearest_format, protection
from quantfmt.tensor import Model, QTensor


def model(names_shapes, rng=None):
    rng = rng or np.random.default_rng(0)
    return Model({n: QTensor.quantize(rng.standard_normal(s).astype(np.float32), "F32") for n, s in names_shapes})


def plan(recipe, m, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {s.name: s for s in recipe.plan(m, **kw)}


def test_protection_is_by_shape_and_role_not_name_fragments():
    assert protection("blk.0.attn_norm.weight", (64,)) == "1-D"
    assert protection("blk.0.ffn_norm.weight", (1, 64)) == "vector"
    assert protection("model.layers.0.input_layernorm.weight", (2, 64)) == "norm"
    assert protection("encoder.layer.0.output.LayerNorm.weight", (3, 64)) == "norm"
    assert protection("transformer.ln_f.weight", (3, 64)) == "norm"
    assert protection("blk.0.attn_q.bias", (4, 64)) == "bias"
    assert protection("scale", ()) == "scalar"
    # the user report: a matrix whose name merely contains "norm" is not a norm
    assert protection("decoder.abnormal.weight", (64, 64)) is None
    assert protection("blk.0.normal_proj.weight", (64, 64)) is None
    steps = plan(Recipe("Q8_0"), model([("decoder.abnormal.weight", (64, 64)), ("blk.0.attn_norm.weight", (64,))]))
    assert steps["decoder.abnormal.weight"].tag == "Q8_0"
    assert (steps["blk.0.attn_norm.weight"].tag, steps["blk.0.attn_norm.weight"].why) == ("F32", "1-D kept")


def test_regex_rules_and_dict_rules():
    m = model([(f"blk.{i}.attn_q.weight", (64, 64)) for i in (0, 1, 10)])
    r = Recipe("Q4_0", rules=[{"pattern": r"re:blk\.1\d*\.attn_q\.weight", "tag": "Q8_0"}])
    tags = {n: s.tag for n, s in plan(r, m).items()}
    assert tags == {"blk.0.attn_q.weight": "Q4_0", "blk.1.attn_q.weight": "Q8_0", "blk.10.attn_q.weight": "Q8_0"}
    # fullmatch: a regex matching only part of a name does not apply
    with pytest.warns(RecipeWarning, match="matches no tensor"):
        Recipe("Q4_0", rules=[("re:attn_q", "Q8_0")]).plan(m)
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        Recipe(rules=[("re:(", "Q8_0")])


def test_rules_that_do_nothing_warn_and_strict_refuses():
    m = model([("a.weight", (64, 64)), ("a.norm.weight", (64,))])
    with pytest.warns(RecipeWarning, match="rule nope.*=Q8_0 matches no tensor"):
        Recipe("Q4_0", rules=[("nope.*", "Q8_0")]).plan(m)
    with pytest.raises(RecipeError, match="matches no tensor"):
        Recipe("Q4_0", rules=[("nope.*", "Q8_0")]).plan(m, strict=True)
    with pytest.warns(RecipeWarning, match="matches only protected tensors"):
        Recipe("Q4_0", rules=[("a.n*.weight", "Q8_0")]).plan(m)
    # an explicit name does change a protected tensor, silently
    steps = plan(Recipe("Q4_0", rules=[("a.norm.weight", "F16")]), m)
    assert steps["a.norm.weight"].tag == "F16"


def test_tied_embedding_and_output_head_are_promoted_like_llama_quantize():
    tied = model([("token_embd.weight", (128, 64)), ("blk.0.ffn_up.weight", (96, 64))])
    steps = plan(Recipe("Q4_1"), tied)
    head = steps["token_embd.weight"]
    want = "Q6_K" if "Q6_K" in plugins.formats() and plugins.get_format("Q6_K").accepts((128, 64)) else "Q8_0"
    assert head.tag == want and "output head promoted from Q4_1" in head.why
    assert steps["blk.0.ffn_up.weight"].tag == "Q4_1"
    # a rule naming it wins; promote_output=False turns it off; a default with more bits is kept
    assert plan(Recipe("Q4_1", rules=[("token_embd.weight", "Q4_0")]), tied)["token_embd.weight"].tag == "Q4_0"
    assert plan(Recipe("Q4_1", promote_output=False), tied)["token_embd.weight"].tag == "Q4_1"
    assert plan(Recipe("F16"), tied)["token_embd.weight"].tag == "F16"
    # with a separate output head, that one is promoted and the embedding is not
    sep = model([("token_embd.weight", (128, 64)), ("output.weight", (128, 64))])
    steps = plan(Recipe("Q4_0"), sep)
    assert steps["output.weight"].tag == want and steps["token_embd.weight"].tag == "Q4_0"
    # the recipe file records the choice
    assert Recipe.from_dict(Recipe("Q4_0", promote_output=False).to_dict()).promote_output is False


def test_fallback_auto_picks_the_nearest_bits_per_weight_that_fits():
    shape = (8, 64)  # Q4_A needs rows of 256
    step = plan(Recipe("Q4_A", fallback="auto"), model([("w.weight", shape)]))["w.weight"]
    assert step.wanted == "Q4_A" and step.why.startswith("fallback")
    chosen = plugins.get_format(step.tag)
    want = plugins.get_format("Q4_A").bits_per_weight
    fitting = [f for f in plugins.formats().values() if f.accepts(shape) and getattr(f, "can_quantize", True)]
    assert chosen.accepts(shape) and abs(chosen.bits_per_weight - want) == min(
        abs(f.bits_per_weight - want) for f in fitting)
    assert chosen.bits_per_weight < 16  # not the F16 of the default fallback
    assert nearest_format("Q4_A", (3, 7)).tag in ("F16", "BF16")  # only the plain formats fit 7 columns


def test_cli_summary_shows_bits_per_weight_and_reasons(tmp_path):
    src = tmp_path / "m.safetensors"
    quantfmt.save(model([("token_embd.weight", (128, 64)), ("blk.0.w.weight", (64, 64)),
                         ("blk.0.odd.weight", (8, 48)), ("blk.0.attn_norm.weight", (64,))]), src)
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "o.safetensors"), "--to", "Q4_0"])
    assert r.exit_code == 0, r.output
    assert "bits per weight" in r.output
    assert "output head" in r.output and "token_embd.weight" in r.output
    assert "fallback: blk.0.odd.weight" in r.output
    assert "protected: 1 tensor" in r.output


def test_qtensor_matmul_takes_batch_seq_activations(rng):
    w = rng.standard_normal((48, 64)).astype(np.float32)
    t = QTensor.quantize(w, "Q8_0")
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    y = t.matmul(x)
    assert y.shape == (2, 3, 48)
    np.testing.assert_allclose(y.reshape(6, 48), t.matmul(x.reshape(6, 64)), rtol=1e-6, atol=1e-6)


TYPO = '''
import quantfmt

@quantfmt.hookimpl
def register_format(register):
    pass
'''

NOTHING = '''
import quantfmt

@quantfmt.hookimpl
def register_formats(register):
    pass
'''

GOOD = '''
import quantfmt
from quantfmt.families import BlockFormat

class Z8(BlockFormat):
    tag = "Z8"
    block_shape = (1, 8)
    block_bytes = 32

    def quantize_blocks(self, b):
        return b.astype("<f4").view("u1")

    def dequantize_blocks(self, b):
        return b.copy().view("<f4")

@quantfmt.hookimpl
def register_formats(register):
    register(Z8())
'''


@pytest.mark.parametrize("src, match", [(TYPO, "register_format"), (NOTHING, "registered no format")])
def test_plugin_mistakes_warn_and_strict_refuses(tmp_path, fresh_registry, src, match):
    d = tmp_path / "p"
    d.mkdir()
    (d / "mine.py").write_text(src)
    plugins.configure(plugins_dirs=[d])
    with pytest.warns(plugins.PluginWarning, match=match):
        plugins.formats()
    plugins.configure(plugins_dirs=[d], strict=True)
    with pytest.raises(PluginError, match=match):
        plugins.formats()


def test_plugins_dir_can_be_added_from_python_after_first_use(tmp_path, fresh_registry):
    assert "Q4_0" in plugins.formats()  # the registry is in use
    d = tmp_path / "p"
    d.mkdir()
    (d / "zeight.py").write_text(GOOD)
    plugins.add_plugins_dir(d)
    assert plugins.get_format("Z8").plugin == "zeight"


# ---- llama.cpp's named mixes through a Recipe (issue 13, item 3) -------------------------------


def _smollm2_sources():
    import json
    from pathlib import Path

    from quantfmt.tensor import TensorSource

    d = json.loads((Path(__file__).parent / "data" / "llamacpp_mixes_smollm2.json").read_text())
    m = Model({n: TensorSource(n, "F32", tuple(s), 4 * int(np.prod(s)), lambda: None) for n, s in d["tensors"]})
    return m, d["mixes"]


@pytest.mark.parametrize(
    "mix", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS", "Q8_0", "Q4_0", "F16", "F32"]
)
def test_named_mix_recipe_picks_llama_cpps_type_for_every_tensor(mix):
    """On SmolLM2's tensors (names, shapes, file order), quantfmt's recipe gives every tensor the
    ggml type llama.cpp's llama_model_quantize gave it (ground truth recorded from the wheel)."""
    m, truth = _smollm2_sources()
    if any(t not in plugins.registry().formats and t not in plugins.registry().aliases
           for t in set(truth[mix].values()) - {"F32"}):
        pytest.skip(f"a format of mix {mix} is not registered")
    steps = plan(Recipe(mix=mix), m)
    got = {n: plugins.get_format(s.tag).ggml_type for n, s in steps.items()}
    assert got == truth[mix]
    assert all(s.why.startswith(("mix ", "1-D kept")) for s in steps.values())
    # the recipe, recorded in a file, names the mix; a rule still wins over it
    assert Recipe.from_dict(Recipe(mix=mix).to_dict()).mix == mix
    steps = plan(Recipe(mix=mix, rules=[("blk.0.attn_q.weight", "Q8_0")]), m)
    assert steps["blk.0.attn_q.weight"].tag == "Q8_0"


def test_mix_names_on_the_cli_and_dry_run(tmp_path):
    src = tmp_path / "m.safetensors"
    quantfmt.save(model([("token_embd.weight", (64, 256)), ("blk.0.attn_v.weight", (256, 256)),
                         ("blk.0.attn_norm.weight", (256,))]), src)
    r = CliRunner().invoke(cli, ["convert", str(src), "--recipe", "Q4_K_M", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "dry run: nothing written" in r.output and "mix Q4_K_M" in r.output and "bits per weight" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    # --to with a mix name (what llama-quantize takes) is the mix; beside --recipe, an error that says why
    r2 = CliRunner().invoke(cli, ["convert", str(src), "--to", "Q4_K_M", "--dry-run"])
    assert r2.exit_code == 0 and r2.output == r.output, r2.output
    r2 = CliRunner().invoke(cli, ["convert", str(src), "--to", "q4_k_m", "--recipe", "Q5_K_M", "--dry-run"])
    assert r2.exit_code == 1 and "--to q4_k_m: that is a llama.cpp mix" in r2.output and "Traceback" not in r2.output
    r = CliRunner().invoke(cli, ["convert", str(src), "--recipe", "Q9_K_X", "--dry-run"])
    assert r.exit_code == 1 and "neither a file nor a llama.cpp mix" in r.output
    r = CliRunner().invoke(cli, ["convert", str(src)])
    assert r.exit_code == 2 and "OUT" in r.output


def test_importance_weights_through_the_public_api(rng):
    from quantfmt.errors import UnsupportedModeError

    w = rng.standard_normal((4, 256)).astype(np.float32)
    qw = rng.random(256).astype(np.float32) + 0.1
    for tag in ("Q4_K", "Q5_0", "IQ4_NL"):
        fmt = plugins.get_format(tag)
        t = QTensor.quantize(w, tag, quant_weights=qw)
        assert np.array_equal(t.data, fmt.quantize_weighted(w, qw))
        assert not np.array_equal(t.data, fmt.quantize(w))  # the weights change the choice
    with pytest.raises(UnsupportedModeError, match="F32.*importance weights"):
        QTensor.quantize(w, "F32", quant_weights=qw)


def test_a_line_per_tensor_when_stderr_is_not_a_terminal(tmp_path):
    """As llama-quantize logs each tensor: convert and compare (CliRunner's stderr is no terminal);
    -q silences it, --json keeps stderr quiet for the JSON consumer."""
    src = tmp_path / "m.safetensors"
    quantfmt.save(model([("a.weight", (64, 64)), ("b.weight", (64, 64))]), src)
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "o.safetensors"), "--to", "Q8_0"])
    assert r.exit_code == 0 and "[   1/2] a.weight" in r.stderr and "F32 -> Q8_0" in r.stderr
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "p.safetensors"), "--to", "Q8_0", "-q"])
    assert r.exit_code == 0 and r.stderr == ""
    r = CliRunner().invoke(cli, ["compare", str(src), "--formats", "Q8_0"])
    assert r.exit_code == 0 and "[   2/2] b.weight" in r.stderr
    r = CliRunner().invoke(cli, ["check-format", "F32", "F16"])
    assert r.exit_code == 0 and "[  2/2] F16: ok" in r.stderr
