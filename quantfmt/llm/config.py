"""The hyperparameters of a llama-family model, and where they come from.

One `LlamaConfig` describes Llama 1/2/3, SmolLM/SmolLM2, TinyLlama, Mistral (no sliding window)
and Qwen2 (q/k/v biases). It is read from, in this order of preference:

  1. quantfmt metadata: `model.metadata["quantfmt.llm.config"]`, the dict `to_dict()` makes
     (what a convert step stores, so a converted file runs without its source);
  2. a GGUF's key-values (`model.metadata["gguf"]["kv"]`, [key, type, value] triples):
     `general.architecture`, then `<arch>.block_count`, `<arch>.attention.head_count`, ...;
  3. a Hugging Face `config.json` beside the weights (LlamaForCausalLM / Qwen2ForCausalLM).

What depends on the tensors rather than the key-values (is the output head tied to the
embedding, are there q/k/v biases, GGUF or HF tensor names) is settled by `resolve(model)`.

Rope layout: llama.cpp's converter permutes the q/k rows of HF llama checkpoints so that its
GGUF files rotate ADJACENT pairs (2i, 2i+1) of each head; HF checkpoints (and GGUF Qwen2,
which is not permuted) rotate the halves (i, i + d/2). The layout goes with the source, so
no weights are ever permuted here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import QuantfmtError

METADATA_KEY = "quantfmt.llm.config"
ADJACENT = "adjacent"  # GGUF llama: pairs (2i, 2i+1); ggml's rope mode 0 ("norm")
HALF = "half"  # HF and GGUF qwen2: pairs (i, i + n_rot/2); ggml's "neox" mode
LAYOUTS = (ADJACENT, HALF)
NAMINGS = ("gguf", "hf")
# GGUF architectures this runner executes, and the rope layout their GGUF files use.
GGUF_ARCHS = {"llama": ADJACENT, "mistral": ADJACENT, "qwen2": HALF}
HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


class ConfigError(QuantfmtError):
    """Hyperparameters that are missing, inconsistent, or name a model this runner cannot execute."""


@dataclass
class LlamaConfig:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    vocab_size: int
    arch: str = "llama"
    head_dim: int = 0  # 0 = n_embd // n_head
    n_rot: int = 0  # rotated dimensions per head; 0 = head_dim
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    # None, or {"type": "linear", "factor": f} or {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_context"}
    rope_scaling: dict | None = None
    context_length: int = 2048
    tied_output: bool | None = None  # None = decided from the tensors (no output weight -> tied)
    qkv_bias: bool | None = None  # None = decided from the tensors
    rope_layout: str = ADJACENT
    naming: str = "gguf"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos: bool | None = None
    source: str = field(default="", compare=False)  # where it was read from, for messages

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.n_embd // self.n_head if self.n_head else 0
        if not self.n_rot:
            self.n_rot = self.head_dim

    # ---- checks ---------------------------------------------------------------------------

    def validate(self) -> LlamaConfig:
        def bad(msg):
            return ConfigError(f"model config ({self.source or 'given'}): {msg}")

        for name in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "vocab_size", "head_dim", "context_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(f"{name} must be a positive integer, got {v!r}")
        if self.n_head % self.n_head_kv:
            raise bad(f"n_head ({self.n_head}) is not a multiple of n_head_kv ({self.n_head_kv})")
        if self.n_rot <= 0 or self.n_rot > self.head_dim or self.n_rot % 2:
            raise bad(f"n_rot ({self.n_rot}) must be even and in 1..head_dim ({self.head_dim})")
        if self.rope_layout not in LAYOUTS:
            raise bad(f"rope_layout {self.rope_layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.naming not in NAMINGS:
            raise bad(f"naming {self.naming!r} is not one of {', '.join(NAMINGS)}")
        if not (self.rms_eps > 0 and self.rope_base > 0):
            raise bad(f"rms_eps ({self.rms_eps}) and rope_base ({self.rope_base}) must be positive")
        sc = self.rope_scaling
        if sc is not None:
            if not isinstance(sc, dict) or sc.get("type") not in ("linear", "llama3"):
                raise bad(f"rope scaling {sc!r} is not supported (only linear and llama3)")
            if not float(sc.get("factor", 0)) > 0:
                raise bad(f"rope scaling factor must be positive, got {sc.get('factor')!r}")
            if sc["type"] == "llama3":
                for k in ("low_freq_factor", "high_freq_factor", "original_context"):
                    if k not in sc:
                        raise bad(f"llama3 rope scaling needs {k!r}")
                if not float(sc["high_freq_factor"]) > float(sc["low_freq_factor"]):
                    raise bad("llama3 rope scaling needs high_freq_factor > low_freq_factor")
        return self

    # ---- quantfmt metadata ----------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = METADATA_KEY) -> LlamaConfig:
        if isinstance(d, str):  # a container may hold it as JSON text
            try:
                d = json.loads(d)
            except ValueError as e:
                raise ConfigError(f"{source}: not JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{source}: unknown keys {sorted(unknown)}")
        try:
            return cls(**d, source=source).validate()
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    # ---- GGUF key-values ------------------------------------------------------------------

    @classmethod
    def from_gguf_kv(cls, kv, source: str = "GGUF key-values") -> LlamaConfig:
        try:
            d = {e[0]: e[2] for e in kv}
        except (TypeError, IndexError, KeyError):
            raise ConfigError(f"{source}: key-values are not [key, type, value] triples") from None
        arch = d.get("general.architecture")
        if arch not in GGUF_ARCHS:
            raise ConfigError(f"{source}: general.architecture {arch!r} is not a llama-family model this runner "
                              f"executes ({', '.join(GGUF_ARCHS)})")

        def get(key, default=None, required=False):
            v = d.get(f"{arch}.{key}", default)
            if required and v is None:
                raise ConfigError(f"{source}: missing key {arch}.{key}")
            return v

        n_head = int(get("attention.head_count", required=True))
        n_embd = int(get("embedding_length", required=True))
        vocab = get("vocab_size")
        if vocab is None:  # older files: the tokenizer's list is the vocabulary
            toks = d.get("tokenizer.ggml.tokens")
            vocab = len(toks) if isinstance(toks, list) else 0
        head_dim = int(get("attention.key_length", 0) or 0) or n_embd // n_head
        scaling = None
        st = get("rope.scaling.type")
        factor = get("rope.scaling.factor")
        if st == "linear" and factor and float(factor) != 1.0:
            scaling = {"type": "linear", "factor": float(factor)}
        elif st not in (None, "none", "linear"):
            raise ConfigError(f"{source}: rope scaling type {st!r} is not supported (only linear; llama3 scaling "
                              "comes as the rope_freqs.weight tensor)")
        bos = d.get("tokenizer.ggml.bos_token_id")
        eos = d.get("tokenizer.ggml.eos_token_id")
        add_bos = d.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones do not
            add_bos = d.get("tokenizer.ggml.model") == "llama"
        return cls(
            arch=arch,
            n_layer=int(get("block_count", required=True)),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(get("attention.head_count_kv", n_head)),
            n_ff=int(get("feed_forward_length", required=True)),
            vocab_size=int(vocab),
            head_dim=head_dim,
            n_rot=int(get("rope.dimension_count", 0) or 0),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            context_length=int(get("context_length", 2048)),
            rope_layout=GGUF_ARCHS[arch],
            naming="gguf",
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=None if eos is None else int(eos),
            add_bos=None if add_bos is None else bool(add_bos),
            source=source,
        ).validate()

    # ---- Hugging Face config.json -----------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> LlamaConfig:
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        archs = cfg.get("architectures") or []
        arch = next((HF_ARCHS[a] for a in archs if a in HF_ARCHS), None)
        if arch is None:
            mt = cfg.get("model_type")
            arch = mt if mt in GGUF_ARCHS else None
        if arch is None:
            raise ConfigError(f"{source}: architectures {archs!r} / model_type {cfg.get('model_type')!r} is not a "
                              f"llama-family model this runner executes ({', '.join(HF_ARCHS)})")
        def need(key):
            if key not in cfg:
                raise ConfigError(f"{source}: missing {key!r}")
            return cfg[key]

        n_head = int(need("num_attention_heads"))
        n_embd = int(need("hidden_size"))
        head_dim = int(cfg.get("head_dim") or 0) or n_embd // n_head
        scaling = None
        rs = cfg.get("rope_scaling")
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "linear":
                scaling = {"type": "linear", "factor": float(rs["factor"])}
            elif kind == "llama3":
                scaling = {"type": "llama3", "factor": float(rs["factor"]),
                           "low_freq_factor": float(rs["low_freq_factor"]),
                           "high_freq_factor": float(rs["high_freq_factor"]),
                           "original_context": int(rs["original_max_position_embeddings"])}
            elif kind not in (None, "default"):
                raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (only linear and llama3)")
        partial = float(cfg.get("partial_rotary_factor", 1.0))
        bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            arch=arch,
            n_layer=int(need("num_hidden_layers")),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            n_ff=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            head_dim=head_dim,
            n_rot=int(head_dim * partial),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_base=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            context_length=int(cfg.get("max_position_embeddings", 2048)),
            tied_output=cfg.get("tie_word_embeddings"),
            qkv_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
            rope_layout=HALF,
            naming="hf",
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=None if eos is None else int(eos),
            source=source,
        ).validate()

    # ---- from a loaded model ----------------------------------------------------------------

    @classmethod
    def from_model(cls, model) -> LlamaConfig:
        """The config of a `quantfmt.Model`: its quantfmt metadata, its GGUF key-values, or a
        config.json beside it (in that order), settled against its tensors."""
        meta = getattr(model, "metadata", {}) or {}
        path = getattr(model, "path", None)
        where = str(path) if path else "model"
        if METADATA_KEY in meta:
            cfg = cls.from_dict(meta[METADATA_KEY], f"{where}: metadata {METADATA_KEY!r}")
        elif isinstance(meta.get("gguf"), dict) and "kv" in meta["gguf"]:
            cfg = cls.from_gguf_kv(meta["gguf"]["kv"], f"{where}: GGUF key-values")
        else:
            cj = _config_json_beside(path)
            if cj is None:
                raise ConfigError(f"{where}: no model config: no {METADATA_KEY!r} or GGUF key-values in the metadata "
                                  "and no config.json beside the weights")
            try:
                doc = json.loads(cj.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{cj}: cannot read: {e}") from None
            cfg = cls.from_hf(doc, str(cj))
        return cfg.resolve(model)

    def resolve(self, model) -> LlamaConfig:
        """Settle naming, tied output and biases against the tensors the model has."""
        names = set(model)
        naming = self.naming
        if "token_embd.weight" in names:
            naming = "gguf"
        elif "model.embed_tokens.weight" in names:
            naming = "hf"
        if naming != self.naming and self.naming == "gguf" and self.rope_layout == ADJACENT:
            # HF tensors under GGUF key-values: HF rows are not permuted, so they rotate halves.
            out = replace(self, naming=naming, rope_layout=HALF)
        else:
            out = replace(self, naming=naming)
        names_of = tensor_names(out)
        if out.tied_output is None or (out.tied_output is False and names_of["output"] not in names):
            out.tied_output = names_of["output"] not in names
        if out.qkv_bias is None:
            out.qkv_bias = names_of["q_bias"].format(0) in names
        return out.validate()


def tensor_names(cfg: LlamaConfig) -> dict[str, str]:
    """Role -> tensor name (with `{}` for the layer index) in the config's naming."""
    if cfg.naming == "gguf":
        blk = "blk.{}."
        return {
            "embd": "token_embd.weight", "output_norm": "output_norm.weight", "output": "output.weight",
            "rope_freqs": "rope_freqs.weight",
            "attn_norm": blk + "attn_norm.weight", "ffn_norm": blk + "ffn_norm.weight",
            "q": blk + "attn_q.weight", "k": blk + "attn_k.weight", "v": blk + "attn_v.weight",
            "o": blk + "attn_output.weight",
            "q_bias": blk + "attn_q.bias", "k_bias": blk + "attn_k.bias", "v_bias": blk + "attn_v.bias",
            "gate": blk + "ffn_gate.weight", "up": blk + "ffn_up.weight", "down": blk + "ffn_down.weight",
        }
    blk = "model.layers.{}."
    return {
        "embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight", "output": "lm_head.weight",
        "rope_freqs": "rope_freqs.weight",
        "attn_norm": blk + "input_layernorm.weight", "ffn_norm": blk + "post_attention_layernorm.weight",
        "q": blk + "self_attn.q_proj.weight", "k": blk + "self_attn.k_proj.weight",
        "v": blk + "self_attn.v_proj.weight", "o": blk + "self_attn.o_proj.weight",
        "q_bias": blk + "self_attn.q_proj.bias", "k_bias": blk + "self_attn.k_proj.bias",
        "v_bias": blk + "self_attn.v_proj.bias",
        "gate": blk + "mlp.gate_proj.weight", "up": blk + "mlp.up_proj.weight", "down": blk + "mlp.down_proj.weight",
    }


def _config_json_beside(path) -> Path | None:
    if not path:
        return None
    p = Path(path)
    for cand in ((p / "config.json") if p.is_dir() else None, p.parent / "config.json"):
        if cand is not None and cand.is_file():
            return cand
    return None
