"""What a Hugging Face llama-family checkpoint needs to become a GGUF file llama.cpp runs.

`gguf_export(model)` looks at a source Model (HF tensor names, its config from config.json beside
it or from quantfmt metadata) and returns a `GGUFExport`: the GGUF name of every tensor (from
the gguf package's TensorNameMap), the q/k tensors whose rows llama.cpp's converter permutes,
extra tensors llama.cpp expects (rope_freqs for llama3 scaling), and the GGUF key-values
(architecture hyperparameters, file type, and the tokenizer's when a tokenizer.json is beside
the weights). It returns None for anything that is not such a checkpoint (a GGUF, an unknown
architecture): those are written as they are, without architecture key-values.

Rope layout: HF llama checkpoints rotate the halves (i, i + d/2) of each head; llama.cpp's
"llama" architecture rotates adjacent pairs (2i, 2i+1). Its converter therefore reorders the
rows of attn_q/attn_k (weights and biases) within each head: output row (h, i, s) is input row
(h, s, i) for h < heads, i < d/2, s in {0, 1}. That is a pure row permutation, so quantized
bytes are permuted by whole rows (formats whose row groups are single rows), never requantized.
Qwen2 GGUF files keep the HF ("neox") layout: no permutation.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import QuantfmtError
from .config import ADJACENT, ConfigError, LlamaConfig

# Our LlamaConfig.arch -> the GGUF architecture llama.cpp's converter writes (Mistral is "llama").
GGUF_ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# GGUF architectures whose files rotate adjacent pairs, so HF q/k rows get permuted.
PERMUTED_ARCHS = {"llama"}
# HF tensors llama.cpp's converter drops: precomputed rope tables.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)

NOT_RUNNABLE = "not a runnable llama.cpp model: no architecture key-values"

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class ExportError(QuantfmtError):
    """A checkpoint that cannot be exported as a runnable llama.cpp GGUF in the way asked."""


@dataclass
class GGUFExport:
    arch: str  # GGUF architecture
    config: LlamaConfig
    names: dict[str, str]  # source tensor -> GGUF tensor (skipped tensors absent)
    permute: dict[str, int]  # source tensor -> head count whose rows are permuted
    kv: list  # [key, type, value], without general.file_type (it depends on the recipe)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # GGUF name -> float32 tensor to add
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def qk_row_order(rows: int, heads: int) -> np.ndarray:
    """Source row of each output row for llama.cpp's q/k permutation (halves -> adjacent pairs)."""
    if rows % (2 * heads):
        raise ExportError(f"{rows} rows do not split into {heads} heads of an even size")
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, 2, half).swapaxes(1, 2).reshape(-1)


def permute_rows(data: np.ndarray, tag: str, shape: tuple[int, ...], heads: int, *, name: str = "") -> np.ndarray:
    """Tensor bytes in format `tag` with their rows reordered by qk_row_order (no requantization)."""
    from ..plugins import get_format

    fmt = get_format(tag)
    rows = shape[0]
    if len(shape) == 2 and fmt.block_shape[0] != 1:
        raise ExportError(f"{tag} stores blocks of {fmt.block_shape[0]} rows, so the q/k row permutation llama.cpp "
                          "needs cannot be applied to its bytes; export this tensor in a row-wise format "
                          "(e.g. Q8_0, Q4_0, F16) instead", tensor=name)
    per_row = fmt.nbytes((1, *shape[1:])) if len(shape) == 2 else fmt.nbytes((rows,)) // rows
    b = np.asarray(data).reshape(-1).view(np.uint8)
    if b.size != per_row * rows or (len(shape) == 1 and fmt.block_shape[-1] != 1):
        raise ExportError(f"cannot permute the rows of a {tag} tensor of shape {shape}", tensor=name)
    return b.reshape(rows, per_row)[qk_row_order(rows, heads)].reshape(-1)


def _name_map(arch: str, n_layer: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layer)


def gguf_export(model) -> GGUFExport | None:
    """The GGUF export plan of an HF llama-family checkpoint, or None if `model` is not one."""
    meta = getattr(model, "metadata", {}) or {}
    if isinstance(meta.get("gguf"), dict) and meta["gguf"].get("kv"):
        return None  # already GGUF key-values: written as they are
    try:
        cfg = LlamaConfig.from_model(model)
    except ConfigError:
        return None
    if cfg.naming != "hf" or cfg.arch not in GGUF_ARCH_OF:
        return None
    arch = GGUF_ARCH_OF[cfg.arch]
    where = str(getattr(model, "path", None) or "model")
    permuted = arch in PERMUTED_ARCHS and cfg.rope_layout != ADJACENT
    if permuted and cfg.n_rot != cfg.head_dim:
        raise ExportError(f"{where}: partial rotary (n_rot {cfg.n_rot} of head_dim {cfg.head_dim}) is not "
                          "supported by llama.cpp's llama architecture")
    tmap = _name_map(arch, cfg.n_layer)
    names, permute, skipped = {}, {}, []
    for n in model:
        if n.endswith(_SKIPPED_SUFFIXES):
            skipped.append(n)
            continue
        g = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ExportError(f"{where}: tensor {n!r} has no GGUF name for architecture {arch!r}", tensor=n)
        names[n] = g
        if permuted and (g.endswith((".attn_q.weight", ".attn_q.bias"))):
            permute[n] = cfg.n_head
        elif permuted and (g.endswith((".attn_k.weight", ".attn_k.bias"))):
            permute[n] = cfg.n_head_kv
    dup = [g for g, c in Counter(names.values()).items() if c > 1]
    if dup:
        raise ExportError(f"{where}: several tensors map to the GGUF names {dup[:5]}")
    kv, extra = arch_kv(cfg, arch, name=_model_name(model))
    if "rope_freqs.weight" in extra and "rope_freqs.weight" in names.values():
        del extra["rope_freqs.weight"]
    out = GGUFExport(arch, cfg, names, permute, kv, extra, skipped)
    folder = _folder(model)
    if folder is not None and (folder / "tokenizer.json").is_file():
        try:
            tok_kv, notes = tokenizer_kv(folder, cfg)
        except ExportError as e:
            # the weights are still worth writing; llama.cpp needs a vocabulary to load them, though
            msg = f"no tokenizer key-values written: {e}"
            warnings.warn(msg, stacklevel=3)
            tok_kv, notes = [], [msg]
        out.kv += tok_kv
        out.notes += notes
    return out


def _folder(model) -> Path | None:
    p = getattr(model, "path", None)
    if not p:
        return None
    p = Path(p)
    return p if p.is_dir() else p.parent


def _model_name(model) -> str:
    f = _folder(model)
    return f.name if f is not None and f.name else "model"


def arch_kv(cfg: LlamaConfig, arch: str, name: str = "model") -> tuple[list, dict[str, np.ndarray]]:
    """The hyperparameter key-values llama.cpp reads for `arch`, and tensors the scaling needs."""
    a = arch
    kv = [
        ["general.architecture", "STRING", a],
        ["general.name", "STRING", name],
        [f"{a}.vocab_size", "UINT32", cfg.vocab_size],
        [f"{a}.context_length", "UINT32", cfg.context_length],
        [f"{a}.embedding_length", "UINT32", cfg.n_embd],
        [f"{a}.block_count", "UINT32", cfg.n_layer],
        [f"{a}.feed_forward_length", "UINT32", cfg.n_ff],
        [f"{a}.rope.dimension_count", "UINT32", cfg.n_rot],
        [f"{a}.attention.head_count", "UINT32", cfg.n_head],
        [f"{a}.attention.head_count_kv", "UINT32", cfg.n_head_kv],
        [f"{a}.rope.freq_base", "FLOAT32", float(cfg.rope_base)],
        [f"{a}.attention.layer_norm_rms_epsilon", "FLOAT32", float(cfg.rms_eps)],
    ]
    if cfg.head_dim != cfg.n_embd // cfg.n_head:
        kv += [[f"{a}.attention.key_length", "UINT32", cfg.head_dim],
               [f"{a}.attention.value_length", "UINT32", cfg.head_dim]]
    extra = {}
    sc = cfg.rope_scaling
    if sc and sc["type"] == "linear":
        kv += [[f"{a}.rope.scaling.type", "STRING", "linear"], [f"{a}.rope.scaling.factor", "FLOAT32", sc["factor"]]]
    elif sc and sc["type"] == "llama3":
        # llama.cpp's converter stores llama3 scaling as per-pair divisors of the angle: 1 for short
        # wavelengths, `factor` for long ones, the inverse of the blended rate in between.
        inv = cfg.rope_base ** (-np.arange(cfg.n_rot // 2, dtype=np.float64) * 2.0 / cfg.n_rot)
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_context"])
        smooth = np.clip((old / (2 * math.pi / inv) - lo) / (hi - lo), 0.0, 1.0)
        extra["rope_freqs.weight"] = (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)
    return kv, extra


def file_type_kv(tags: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> list:
    """general.file_type from the tag holding most matrix weights (omitted if llama.cpp has no name
    for it), and general.quantization_version when anything is quantized."""
    from gguf.constants import LlamaFileType

    from ..io.gguf import ggml_name_of

    ggml_of = {t: ggml_name_of(t) or t for t in set(tags.values())}
    weight: Counter[str] = Counter()
    for n, t in tags.items():
        if len(shapes[n]) == 2:
            weight[ggml_of.get(t, t)] += math.prod(shapes[n])
    kv = []
    if weight:
        main = weight.most_common(1)[0][0]
        ft = LlamaFileType.__members__.get("ALL_F32" if main == "F32" else f"MOSTLY_{main}")
        if ft is not None:
            kv.append(["general.file_type", "UINT32", int(ft)])
    if any(ggml_of.get(t, t) not in ("F32", "F16", "BF16") for t in tags.values()):
        kv.append(["general.quantization_version", "UINT32", 2])
    return kv


# ---- tokenizer ---------------------------------------------------------------------------------------

# HF pre-tokenizer regexes of families llama.cpp names (facts from the families' tokenizer.json files).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Recognized pre-tokenizer pipelines -> tokenizer.ggml.pre. A pipeline is the tuple of its steps:
# ("bytelevel", use_regex), ("digits", individual_digits), ("split", regex).
PRE_TABLE: dict[tuple, str] = {
    (("bytelevel", True),): "gpt-2",
    (("digits", True), ("bytelevel", True)): "smollm",
    (("split", _LLAMA3_RE), ("bytelevel", False)): "llama-bpe",
    (("split", _QWEN2_RE), ("bytelevel", False)): "qwen2",
}


def _pre_steps(spec) -> tuple | None:
    """A tokenizer.json pre_tokenizer as PRE_TABLE's step tuple, or None for anything else."""
    if not isinstance(spec, dict):
        return None
    items = spec.get("pretokenizers") if spec.get("type") == "Sequence" else [spec]
    steps = []
    for p in items or []:
        t = p.get("type") if isinstance(p, dict) else None
        if t == "ByteLevel":
            steps.append(("bytelevel", bool(p.get("use_regex", True))))
        elif t == "Digits":
            steps.append(("digits", bool(p.get("individual_digits", False))))
        elif t == "Split" and isinstance(p.get("pattern"), dict) and "Regex" in p["pattern"]:
            steps.append(("split", p["pattern"]["Regex"]))
        else:
            return None
    return tuple(steps)


def _read_json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read: {e}", file=str(p)) from None
    return d if isinstance(d, dict) else {}


def tokenizer_kv(folder, cfg: LlamaConfig | None = None) -> tuple[list, list[str]]:
    """tokenizer.ggml.* key-values from a byte-level BPE tokenizer.json in `folder`, and notes.

    Every id gets a token: vocabulary, then added tokens (special ones are CONTROL, others
    USER_DEFINED), holes filled with "[PAD<id>]" UNUSED tokens as llama.cpp's converter does.
    An unrecognized pre-tokenizer gets "default" and a warning.
    """
    folder = Path(folder)
    tj = folder / "tokenizer.json"
    spec = _read_json(tj)
    model = spec.get("model") or {}
    pre_spec = spec.get("pre_tokenizer")
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre_spec):
        raise ExportError("only byte-level BPE tokenizers (GGUF model 'gpt2') are exported; this one is "
                          f"{model.get('type')!r} with pre-tokenizer {json.dumps(pre_spec)[:80]}", file=str(tj))
    vocab: dict = model.get("vocab") or {}
    added = spec.get("added_tokens") or []
    n = max([*vocab.values(), *(int(a["id"]) for a in added)], default=-1) + 1
    if cfg is not None and cfg.vocab_size > n:
        n = cfg.vocab_size  # the embedding may be padded past the tokenizer: pad tokens fill it
    tokens: list[str | None] = [None] * n
    types = [UNUSED] * n
    for t, i in vocab.items():
        tokens[int(i)] = t
        types[int(i)] = NORMAL
    for a in added:
        i = int(a["id"])
        tokens[i] = a["content"]
        types[i] = CONTROL if a.get("special") else USER_DEFINED
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    notes = []
    steps = _pre_steps(pre_spec)
    pre = PRE_TABLE.get(steps) if steps is not None else None
    if pre is None:
        pre = "default"
        msg = (f"{tj}: pre-tokenizer not recognized; tokenizer.ggml.pre = 'default' (llama.cpp may split text "
               "differently from the source tokenizer)")
        notes.append(msg)
        warnings.warn(msg, stacklevel=3)
    kv = [
        ["tokenizer.ggml.model", "STRING", "gpt2"],
        ["tokenizer.ggml.pre", "STRING", pre],
        ["tokenizer.ggml.tokens", "ARRAY[STRING]", tokens],
        ["tokenizer.ggml.token_type", "ARRAY[INT32]", types],
        ["tokenizer.ggml.merges", "ARRAY[STRING]", merges],
    ]
    tcfg = _read_json(folder / "tokenizer_config.json")
    index = {t: i for i, t in enumerate(tokens)}

    def token_id(v):
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            return index.get(v)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n:
            return v
        return None

    for key, tc, cid in (("bos", "bos_token", cfg.bos_token_id if cfg else None),
                         ("eos", "eos_token", cfg.eos_token_id if cfg else None)):
        i = token_id(tcfg.get(tc))
        if i is None:
            i = token_id(cid)
        if i is not None:
            kv.append([f"tokenizer.ggml.{key}_token_id", "UINT32", i])
    for key, tc in (("unknown", "unk_token"), ("padding", "pad_token")):
        i = token_id(tcfg.get(tc))
        if i is not None:
            kv.append([f"tokenizer.ggml.{key}_token_id", "UINT32", i])
    if isinstance(tcfg.get("add_bos_token"), bool):
        kv.append(["tokenizer.ggml.add_bos_token", "BOOL", tcfg["add_bos_token"]])
    if isinstance(tcfg.get("chat_template"), str):
        kv.append(["tokenizer.chat_template", "STRING", tcfg["chat_template"]])
    return kv, notes
