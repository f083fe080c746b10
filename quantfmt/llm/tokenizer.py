"""Text <-> token ids for the models quantfmt runs, giving the ids current llama.cpp gives.

This module owns tokenization: building a tokenizer from a GGUF's `tokenizer.ggml.*` key-values
(model "gpt2": byte-level BPE with merges; model "llama": SentencePiece tokens + scores + types with
byte fallback) or from a Hugging Face folder's `tokenizer.json`, encoding, decoding, and streaming
detokenization that never emits half a UTF-8 character.

The BPE itself runs in the `tokenizers` package. What is ours is the part llama.cpp does around it:
- the pre-tokenizer named by `tokenizer.ggml.pre`: llama.cpp splits text with a list of regexes,
  each applied to the pieces the previous one produced, keeping matches and the text between them
  as separate pieces. That is `tokenizers`' Split(behavior="isolated"), chained, then ByteLevel;
  the regex lists per name are in PRE_TOKENIZERS below (facts from llama.cpp's llama-vocab.cpp).
- special tokens: llama.cpp cuts the text at control tokens only when asked (parse_special), and at
  user-defined tokens always, before any pre-tokenization; longer tokens are cut first.
- SentencePiece ("llama") vocabularies: llama.cpp merges the adjacent pair whose concatenation is
  the highest-scoring token. We hand `tokenizers` a merge list ranked by that score (see _spm_merges
  for the one tie-break that can differ).
- decoding works per token from the token's bytes, as llama.cpp's token_to_piece does, so that
  streaming and whole-sequence decoding agree byte for byte.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from quantfmt.errors import QuantfmtError

__all__ = [
    "PRE_TOKENIZERS",
    "PRE_TOKENIZER_NAMES",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "TokenType",
]


class TokenizerError(QuantfmtError, ValueError):
    """Tokenizer data that cannot be used (missing keys, duplicate tokens, bad merges, unknown model)."""


class TokenType:
    """GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# --- pre-tokenizer regexes (llama.cpp, src/llama-vocab.cpp, llm_tokenizer_bpe) -----------------------
# llama.cpp runs the GPT-2 and Llama-3 patterns through hand-written matchers and the others through
# std::regex; both implement these regexes' semantics, which Oniguruma (used by `tokenizers`) shares.
# llama.cpp's GPT-2 pattern lacks the trailing "|\s+" of the original; with "isolated" splitting the
# unmatched single whitespace characters become pieces anyway, so the result is the same.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS_CI
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Upper-then-lower word shapes written with lookaheads (llama.cpp's std::regex has no \p{Lu}).
_UPPER_LOWER = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+@C@"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*@C@"
)
_TEKKEN = (
    _UPPER_LOWER.replace("@C@", "")
    + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    _UPPER_LOWER.replace("@C@", _CONTRACTIONS_CI + "?")
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# CJK ideographs (U+4E00-U+9FA5), U+0800-U+4E00, Hangul syllables and the rest up to U+D7FF.
_CJK_BLOCKS = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# deepseek-llm's cased-letter class (Unicode LC), as code point ranges; written with escapes because
# several of these characters (e.g. U+2126 OHM SIGN, U+212A KELVIN SIGN, U+1FBE) change under NFC.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
)
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

# pre-type -> (split regexes, ignore_merges). ignore_merges: a piece that is a whole vocabulary token is
# emitted as that token without running merges (llama.cpp sets it for the Llama-3 family).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    "gpt2": ((_GPT2,), False),
    "llama3": ((_LLAMA3,), True),
    "llama3-regex": ((_LLAMA3,), False),  # dbrx, smaug, chatglm4: Llama-3 splits, merges always run
    "starcoder": ((r"\p{N}", _GPT2), False),  # also smollm, refact, command-r: digits one by one
    "qwen2": ((_QWEN2,), False),
    "qwen35": ((_QWEN35,), False),
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"), False),
    "deepseek-llm": (
        (
            r"[\r\n]",
            r"\s?[" + _DEEPSEEK_LETTERS + r"]+",
            "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
            r"\s+\z",  # std::regex "$" is end of input; Oniguruma's "$" would also match before "\n"
            _CJK_BLOCKS,
            r"\p{N}+",
        ),
        False,
    ),
    "deepseek-coder": ((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_BLOCKS, r"\p{N}"), False),
    "poro": ((_PORO,), False),
    "viking": ((_PORO, r"\p{N}"), False),
    "tekken": ((_TEKKEN,), True),
    "gpt-4o": ((_GPT4O,), False),
    "chameleon": (
        (
            r"<sentinel:[0-9]+>",
            r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            r"([\t\n]|    |  )",
            r"\p{N}",
            r"[\p{P}!-/:-@\[-`{-~]",
            _GPT2,
        ),
        False,
    ),
    "seed-coder": (
        (
            _CONTRACTIONS_CI
            + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        False,
    ),
    "bailingmoe": (
        (
            r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
        ),
        False,
    ),
    "minicpm5": (
        (
            r"\p{N}{1,3}",
            _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        True,
    ),
    "ufakzeka": ((r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",), False),
    "laguna": ((r"[^\n]+|[\n]+", _QWEN2), False),
}

# tokenizer.ggml.pre value -> pre-type above (llama.cpp's llama_vocab::impl::load name table).
PRE_TOKENIZER_NAMES: dict[str, str] = {
    "default": "default",
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"],
        "llama3",
    ),
    **dict.fromkeys(["dbrx", "smaug-bpe", "glm4", "chatglm-bpe"], "llama3-regex"),
    **dict.fromkeys(
        [
            "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
            "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4", "mpt", "olmo", "jais",
            "trillion", "granite-docling",
        ],
        "gpt2",
    ),
    **dict.fromkeys(
        ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"], "starcoder"
    ),
    **dict.fromkeys(
        ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open", "grok-2"],
        "qwen2",
    ),
    "qwen35": "qwen35",
    "falcon": "falcon",
    "deepseek-llm": "deepseek-llm",
    "deepseek-coder": "deepseek-coder",
    **dict.fromkeys(["poro-chat", "bloom", "gpt3-finnish"], "poro"),
    "viking": "viking",
    "tekken": "tekken",
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], "gpt-4o"),
    "chameleon": "chameleon",
    "seed-coder": "seed-coder",
    **dict.fromkeys(["bailingmoe", "bailingmoe2", "llada-moe"], "bailingmoe"),
    "minicpm5": "minicpm5",
    "ufakzeka": "ufakzeka",
    "laguna": "laguna",
}

# Names llama.cpp knows whose rules are not reproduced here (custom matchers, zero-width splits, no byte
# encoding, or per-model special cases); they get the warning and the default rules.
_LLAMA_CPP_ONLY = frozenset(
    ["jais-2", "deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4", "spark2_5", "youtu", "gemma4",
     "granite-embed-multi-311m", "granite-embed-multi-97m", "sarvam-moe", "whitespace", "tiny_aya", "cohere2moe",
     "superbpe", "kimi-k2", "afmoe", "exaone-moe", "hybriddna"]
)

# Names whose llama.cpp default is add_bos = true (before tokenizer.ggml.add_bos_token overrides it).
_ADD_BOS_BY_DEFAULT = {"llama3", "tekken", "chameleon"}

# Tokens llama.cpp treats as end of generation, found by their text (llama-vocab.cpp, special_eog_ids).
_EOG_TEXTS = frozenset(
    [
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    ]
)
# Fill-in-the-middle pad/repo/file-separator tokens: llama.cpp ends generation on these too.
_FIM_EOG_TEXTS = frozenset(
    ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
     "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>"]
)


# --- byte-level alphabet (GPT-2): each byte is shown as one printable character -------------------------

def _byte_level_alphabet() -> list[str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


_BYTE_TO_CHAR = _byte_level_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_bytes(text: str) -> bytes:
    # A character outside the alphabet cannot come from byte-level BPE; keep its UTF-8 as is.
    out = bytearray()
    for ch in text:
        b = _CHAR_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def _looks_special(text: str) -> bool:
    # convert_hf_to_gguf marks these added tokens as control even when tokenizer.json does not.
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
    )


def _pre_tokenizer(regexes: Sequence[str]):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    steps: list[pt.PreTokenizer] = [pt.Split(Regex(r), behavior="isolated") for r in regexes]
    steps.append(pt.ByteLevel(add_prefix_space=False, use_regex=False))
    return pt.Sequence(steps)


def _spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every pair (a, b) with a, b and a+b in the vocabulary, best-scoring a+b first.

    llama.cpp merges the adjacent pair whose concatenation scores highest, leftmost on ties. A rank
    per pair reproduces that except when two *different* pairs giving equally-scored tokens compete
    at once; we break such ties by token id, then split position.
    """
    index = {t: i for i, t in enumerate(tokens)}
    order = sorted(range(len(tokens)), key=lambda i: (-float(scores[i]), i))
    merges: list[tuple[str, str]] = []
    for i in order:
        piece = tokens[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in index and right in index:
                merges.append((left, right))
    return merges


def _kv_dict(kv) -> dict:
    if isinstance(kv, dict):
        return dict(kv)
    out = {}
    for item in kv:
        try:
            key, _type, value = item
        except (TypeError, ValueError):
            raise TokenizerError(f"GGUF key-value entry {item!r} is not [key, type, value]") from None
        out[key] = value
    return out


@dataclass(frozen=True)
class _Special:
    id: int
    text: str
    control: bool  # control/unknown: cut out only with parse_special; user-defined: always


class Tokenizer:
    """Encode text to token ids and back; build with from_gguf_kv, from_gguf or from_folder.

    encode(text) gives llama.cpp's ids for `llama_tokenize(text, add_special, parse_special=False)`;
    decode(ids) concatenates llama.cpp's token pieces (control tokens rendered only with special=True).
    """

    def __init__(
        self,
        core,
        *,
        tokens: Sequence[str],
        attrs: Sequence[int],
        pieces: Sequence[bytes],
        bos_id: int | None,
        eos_id: int | None,
        eog_ids: Iterable[int],
        add_bos: bool,
        add_space_prefix: bool,
        pre: str,
        model: str,
        source: str | None = None,
        prefix_in_core: bool = False,
    ):
        self._core = core
        self._tokens = list(tokens)
        self._attrs = list(attrs)
        self._pieces = list(pieces)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids: tuple[int, ...] = tuple(sorted(set(eog_ids)))
        self._eog = frozenset(self.eos_ids)
        self.add_bos = bool(add_bos)
        self.add_space_prefix = bool(add_space_prefix)
        self.pre = pre
        self.model = model
        self.source = source
        # True when the core pipeline (a tokenizer.json normalizer) adds the SentencePiece space itself.
        self._prefix_in_core = prefix_in_core
        self._index: dict[str, int] | None = None
        specials = [
            _Special(i, t, a in (TokenType.CONTROL, TokenType.UNKNOWN))
            for i, (t, a) in enumerate(zip(self._tokens, self._attrs, strict=True))
            if a in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN) and t
        ]
        # llama.cpp cuts longer special tokens first (sorted by byte length, descending).
        specials.sort(key=lambda s: -len(s.text.encode("utf-8")))
        self._specials = {
            True: specials,
            False: [s for s in specials if not s.control],
        }
        # One regex per mode only to skip the partition loop quickly for text without any special token.
        self._special_probe = {
            k: (re.compile("|".join(re.escape(s.text) for s in v)) if v else None) for k, v in self._specials.items()
        }

    # --- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Tokenizer of a GGUF file (reads its key-values through quantfmt.load)."""
        import quantfmt

        meta = quantfmt.load(str(path)).metadata
        try:
            kv = meta["gguf"]["kv"]
        except (KeyError, TypeError):
            raise TokenizerError("not a GGUF file (no gguf key-values in its metadata)", file=str(path)) from None
        return cls.from_gguf_kv(kv, source=str(path))

    @classmethod
    def from_gguf_kv(cls, kv, *, source: str | None = None) -> Tokenizer:
        """Tokenizer from GGUF key-values: a list of [key, type, value] (quantfmt's metadata) or a dict."""
        try:
            return cls._from_kv(_kv_dict(kv), source)
        except TokenizerError as e:
            if e.file is None and source is not None:
                e.file = source
            raise

    @classmethod
    def _from_kv(cls, kv: dict, source: str | None) -> Tokenizer:
        from tokenizers import Tokenizer as CoreTokenizer
        from tokenizers import models, normalizers

        model = kv.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError("no tokenizer.ggml.model key: the file carries no tokenizer")
        tokens = kv.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("no tokenizer.ggml.tokens key (the vocabulary)")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp names empty tokens
        n = len(tokens)
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in vocab:
                raise TokenizerError(f"duplicate token in vocabulary: {t!r} has ids {vocab[t]} and {i}")
            vocab[t] = i
        types = kv.get("tokenizer.ggml.token_type")
        if types is not None and len(types) < n:
            raise TokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        attrs = [int(a) for a in types[:n]] if types is not None else [TokenType.NORMAL] * n
        attrs = [a if TokenType.NORMAL <= a <= TokenType.BYTE else TokenType.UNDEFINED for a in attrs]

        if model == "gpt2":
            merges_raw = kv.get("tokenizer.ggml.merges")
            if merges_raw is None:
                raise TokenizerError("byte-level BPE (model gpt2) without tokenizer.ggml.merges")
            merges = []
            for m in merges_raw:
                cut = m.find(" ", 1)  # llama.cpp looks for the separator from the second character on
                if cut < 0:
                    raise TokenizerError(f"merge {m!r} has no space between its two parts")
                merges.append((m[:cut], m[cut + 1:]))
            pre_name = kv.get("tokenizer.ggml.pre") or ""
            pre_type = PRE_TOKENIZER_NAMES.get(pre_name)
            if pre_type is None:
                if not pre_name:
                    what = "no tokenizer.ggml.pre key"
                elif pre_name in _LLAMA_CPP_ONLY:
                    what = f"pre-tokenizer {pre_name!r} (known to llama.cpp) is not implemented here"
                else:
                    what = f"unknown pre-tokenizer {pre_name!r}"
                warnings.warn(
                    f"{source + ': ' if source else ''}{what}; splitting text with llama.cpp's 'default' rules, "
                    "token ids may differ from the model's own tokenizer",
                    UserWarning,
                    stacklevel=3,
                )
                pre_type = "default"
            regexes, ignore_merges = PRE_TOKENIZERS[pre_type]
            try:
                core = CoreTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
            except Exception as e:  # tokenizers raises plain Exception for merges outside the vocabulary
                raise TokenizerError(f"cannot build BPE from the GGUF vocabulary and merges: {e}") from None
            core.pre_tokenizer = _pre_tokenizer(regexes)
            pieces = [
                _byte_token_piece(t) if a == TokenType.BYTE else
                (t.encode("utf-8") if a in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
                 else _byte_level_bytes(t))
                for t, a in zip(tokens, attrs, strict=True)
            ]
            default_bos, default_eos = 11, 11  # llama.cpp's defaults for BPE vocabularies
            add_bos = pre_type in _ADD_BOS_BY_DEFAULT
            add_space_prefix = False
            pre_label = pre_name or "default"
        elif model == "llama":
            scores = kv.get("tokenizer.ggml.scores")
            if scores is None:
                scores = [0.0] * n
            elif len(scores) < n:
                raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
            unk = kv.get("tokenizer.ggml.unknown_token_id", 0)
            unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < n else None
            try:
                core = CoreTokenizer(
                    models.BPE(vocab, _spm_merges(tokens, scores), unk_token=unk_token, byte_fallback=True)
                )
            except Exception as e:
                raise TokenizerError(f"cannot build the SentencePiece vocabulary: {e}") from None
            # The space prefix is added per text fragment in encode(), as llama.cpp does.
            core.normalizer = normalizers.Replace(" ", "\u2581")
            pieces = [
                _byte_token_piece(t) if a == TokenType.BYTE else
                (t.encode("utf-8") if a in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
                 else t.replace("\u2581", " ").encode("utf-8"))
                for t, a in zip(tokens, attrs, strict=True)
            ]
            default_bos, default_eos = 1, 2
            add_bos = True
            add_space_prefix = True
            pre_label = "spm"
        else:
            raise TokenizerError(
                f"tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
            )

        def special_id(key: str, default: int | None) -> int | None:
            value = kv.get(key)
            if value is None or not 0 <= int(value) < n:
                return default if default is not None and 0 <= default < n else None
            return int(value)

        bos_id = special_id("tokenizer.ggml.bos_token_id", default_bos)
        eos_id = special_id("tokenizer.ggml.eos_token_id", default_eos)
        if "tokenizer.ggml.add_bos_token" in kv:
            add_bos = bool(kv["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.add_space_prefix" in kv and model == "llama":
            add_space_prefix = bool(kv["tokenizer.ggml.add_space_prefix"])
        if add_bos and bos_id is None:
            raise TokenizerError("tokenizer.ggml.add_bos_token is true but there is no BOS token")
        extra = [
            special_id(k, None)
            for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id", "tokenizer.ggml.fim_pad_token_id",
                      "tokenizer.ggml.fim_rep_token_id", "tokenizer.ggml.fim_sep_token_id")
        ]
        eog = _eog_ids(tokens, attrs, eos_id, [e for e in extra if e is not None])
        return cls(
            core, tokens=tokens, attrs=attrs, pieces=pieces, bos_id=bos_id, eos_id=eos_id, eog_ids=eog,
            add_bos=add_bos, add_space_prefix=add_space_prefix, pre=pre_label, model=model, source=source,
        )

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """Tokenizer of a Hugging Face model folder: tokenizer.json (+ tokenizer_config.json, config.json).

        The folder's own tokenizer.json pipeline (normalizer, pre-tokenizer, BPE) is the reference that
        llama.cpp's per-name rules reproduce, so it is used as is; added tokens are taken out of it and
        handled as llama.cpp handles them (special ones = control tokens, cut only with parse_special).
        """
        from tokenizers import Tokenizer as CoreTokenizer

        folder = os.fspath(path)
        tj = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tj):
            raise TokenizerError("no tokenizer.json in the model folder (SentencePiece-only folders are not read)",
                                 file=folder)
        try:
            with open(tj, encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read tokenizer.json: {e}", file=tj) from None

        def read_json(name: str) -> dict:
            p = os.path.join(folder, name)
            if not os.path.isfile(p):
                return {}
            try:
                with open(p, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise TokenizerError(f"cannot read {name}: {e}", file=p) from None
            return data if isinstance(data, dict) else {}

        tcfg = read_json("tokenizer_config.json")
        cfg = read_json("config.json")
        gcfg = read_json("generation_config.json")

        added = spec.get("added_tokens") or []
        post_processor = spec.get("post_processor")
        model_spec = spec.get("model") or {}
        if model_spec.get("type") != "BPE":
            raise TokenizerError(f"tokenizer.json model {model_spec.get('type')!r} is not supported (BPE only)",
                                 file=tj)
        spec["added_tokens"] = []
        spec["post_processor"] = None  # BOS is added by encode(), like llama.cpp
        try:
            core = CoreTokenizer.from_str(json.dumps(spec))
        except Exception as e:
            raise TokenizerError(f"tokenizers cannot load tokenizer.json: {e}", file=tj) from None

        model_vocab: dict[str, int] = model_spec.get("vocab") or {}
        n = max([*model_vocab.values(), *(int(a["id"]) for a in added)], default=-1) + 1
        tokens = [""] * n
        attrs = [TokenType.UNUSED] * n
        for t, i in model_vocab.items():
            tokens[i] = t
            attrs[i] = TokenType.BYTE if _BYTE_TOKEN.fullmatch(t) and model_spec.get("byte_fallback") else \
                TokenType.NORMAL
        for a in added:
            i, t = int(a["id"]), a["content"]
            tokens[i] = t
            attrs[i] = TokenType.CONTROL if (a.get("special") or _looks_special(t)) else TokenType.USER_DEFINED
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]

        byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
            spec.get("decoder")
        )
        normalizer = json.dumps(spec.get("normalizer"))
        pre_tok = json.dumps(spec.get("pre_tokenizer"))
        add_space_prefix = not byte_level and (
            '"Prepend"' in normalizer or ('"Metaspace"' in pre_tok and '"never"' not in pre_tok)
        )
        pieces = []
        for t, a in zip(tokens, attrs, strict=True):
            if a == TokenType.BYTE:
                pieces.append(_byte_token_piece(t))
            elif a in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN):
                pieces.append(t.encode("utf-8"))
            elif byte_level:
                pieces.append(_byte_level_bytes(t))
            else:
                pieces.append(t.replace("\u2581", " ").encode("utf-8"))

        index = {t: i for i, t in enumerate(tokens)}

        def token_id(value) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return index.get(value)
            if isinstance(value, int) and 0 <= value < n:
                return value
            return None

        bos_id = token_id(tcfg.get("bos_token"))
        if bos_id is None:
            bos_id = token_id(cfg.get("bos_token_id"))
        eos_id = token_id(tcfg.get("eos_token"))
        if eos_id is None:
            eos_id = token_id(cfg.get("eos_token_id") if not isinstance(cfg.get("eos_token_id"), list)
                              else cfg["eos_token_id"][0])
        extra: list[int] = []
        for c in (cfg, gcfg):
            ids = c.get("eos_token_id")
            for v in ids if isinstance(ids, list) else [ids]:
                if (tid := token_id(v)) is not None:
                    extra.append(tid)
        if "add_bos_token" in tcfg:
            add_bos = bool(tcfg["add_bos_token"])
        else:
            add_bos = _template_adds_bos(post_processor, tokens[bos_id] if bos_id is not None else None)
        if add_bos and bos_id is None:
            raise TokenizerError("the tokenizer adds a BOS token but none is defined", file=folder)
        eog = _eog_ids(tokens, attrs, eos_id, extra)
        return cls(
            core, tokens=tokens, attrs=attrs, pieces=pieces, bos_id=bos_id, eos_id=eos_id, eog_ids=eog,
            add_bos=add_bos, add_space_prefix=add_space_prefix, pre="tokenizer.json",
            model="gpt2" if byte_level else "llama", source=folder, prefix_in_core=True,
        )

    # --- properties --------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of a token (byte-level or ▁ form, as stored)."""
        return self._tokens[self._check_id(token_id)]

    def token_bytes(self, token_id: int, *, special: bool = True) -> bytes:
        """The bytes a token stands for (llama.cpp's token_to_piece); control tokens give b'' unless special.

        Unused and undefined tokens give b'' (llama.cpp renders them like suppressed control tokens).
        """
        i = self._check_id(token_id)
        a = self._attrs[i]
        if (not special and a in (TokenType.CONTROL, TokenType.UNKNOWN)) or a in (TokenType.UNUSED,
                                                                                  TokenType.UNDEFINED):
            return b""
        return self._pieces[i]

    def token_id(self, text: str) -> int | None:
        """Id of the vocabulary entry `text` (exact match), or None."""
        if self._index is None:
            self._index = {t: i for i, t in enumerate(self._tokens)}
        return self._index.get(text)

    def is_eog(self, token_id: int) -> bool:
        """True for tokens that end generation (eos and the end-of-turn tokens llama.cpp recognises)."""
        return token_id in self._eog

    def is_control(self, token_id: int) -> bool:
        return self._attrs[self._check_id(token_id)] in (TokenType.CONTROL, TokenType.UNKNOWN)

    def _check_id(self, token_id: int) -> int:
        i = int(token_id)
        if not 0 <= i < len(self._tokens):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {len(self._tokens)})",
                                 file=self.source)
        return i

    # --- encoding ----------------------------------------------------------------------------------------

    def partition(self, text: str, *, parse_special: bool = False) -> list[str | int]:
        """Cut text at special tokens the way llama.cpp does: a list of text fragments and token ids."""
        frags: list[str | int] = [text] if text else []
        probe = self._special_probe[parse_special]
        if probe is None or not probe.search(text):
            return frags
        for sp in self._specials[parse_special]:
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or sp.text not in f:
                    out.append(f)
                    continue
                for j, part in enumerate(f.split(sp.text)):
                    if j:
                        out.append(sp.id)
                    if part:
                        out.append(part)
            frags = out
        return frags

    def encode(self, text: str, add_bos: bool | None = None, *, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's llama_tokenize(text, add_special=add_bos, parse_special).

        add_bos: None follows the model (tokenizer.ggml.add_bos_token / tokenizer_config.json).
        parse_special: False (llama.cpp's default) tokenizes "<|im_start|>" in the text as plain text;
        True turns control tokens written in the text into their ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes str, not {type(text).__name__}")
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TokenizerError("add_bos requested but the model has no BOS token", file=self.source)
            ids.append(self.bos_id)
        prev_special = True  # SentencePiece: a fragment at the start or after a token gets a space prefix
        for frag in self.partition(text, parse_special=parse_special):
            if isinstance(frag, int):
                ids.append(frag)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special and not self._prefix_in_core:
                frag = " " + frag
            ids.extend(self._core.encode(frag, add_special_tokens=False).ids)
            prev_special = False
        return ids

    def pre_split(self, text: str) -> list[str]:
        """The pieces the pre-tokenizer cuts plain text into (before BPE), as text; for inspection and tests."""
        pt = self._core.pre_tokenizer
        if pt is None:
            return [text] if text else []
        pieces = [p for p, _ in pt.pre_tokenize_str(text)]
        if self.model == "gpt2":
            return [_byte_level_bytes(p).decode("utf-8", errors="replace") for p in pieces]
        return pieces

    # --- decoding ----------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], *, special: bool = False) -> str:
        """Text of a token sequence. Control tokens (BOS, <|im_end|>, ...) are left out unless special=True.

        Bytes that do not form valid UTF-8 (a sequence cut mid-character) become U+FFFD.
        """
        # Same bytes as StreamDecoder, joined once (a Python call per token is the slow part).
        parts = [self.token_bytes(i, special=special) for i in ids]
        if self.add_space_prefix:
            first = next((k for k, p in enumerate(parts) if p), None)
            if first is not None and parts[first].startswith(b" "):
                parts[first] = parts[first][1:]
        return b"".join(parts).decode("utf-8", errors="replace")

    def stream_decoder(self, *, special: bool = False) -> StreamDecoder:
        """An incremental detokenizer for streaming generation (see StreamDecoder)."""
        return StreamDecoder(self, special=special)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, add_bos={self.add_bos})"
        )


def _byte_token_piece(text: str) -> bytes:
    m = _BYTE_TOKEN.fullmatch(text)
    if m is None:
        return text.encode("utf-8")
    return bytes([int(m.group(1), 16)])


def _template_adds_bos(spec_post, bos: str | None) -> bool:
    """Whether tokenizer.json's post-processor puts the BOS token first (when tokenizer_config says nothing)."""
    if not spec_post or bos is None:
        return False
    procs = spec_post.get("processors", [spec_post]) if spec_post.get("type") == "Sequence" else [spec_post]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            if single and "SpecialToken" in single[0]:
                return single[0]["SpecialToken"].get("id") == bos
    return False


def _eog_ids(tokens: Sequence[str], attrs: Sequence[int], eos_id: int | None, extra: Iterable[int]) -> set[int]:
    eog = {i for i, t in enumerate(tokens) if t in _EOG_TEXTS or t in _FIM_EOG_TEXTS}
    eog.update(extra)
    if eos_id is not None:
        eog.add(eos_id)
    texts = {tokens[i]: i for i in eog}
    # llama.cpp's own exceptions: with <|return|> and <|call|> (gpt-oss), <|end|> does not end generation;
    # with <|tool_response> (gemma4), </s> does not.
    if ("<|return|>" in texts or "<|flush|>" in texts) and ("<|call|>" in texts or "<|calls|>" in texts) \
            and "<|end|>" in texts:
        eog.discard(texts["<|end|>"])
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(texts["</s>"])
    return eog


class StreamDecoder:
    """Turns token ids into text as they are generated, one call per token.

    add(id) returns the text that is complete so far; bytes of a UTF-8 character split across tokens
    are held back until the character is complete, so the concatenated output is never a broken
    sequence. flush() returns what is left (an unfinished character becomes U+FFFD).
    For SentencePiece models the space prefix of the first piece is dropped, as llama.cpp does.
    """

    def __init__(self, tokenizer: Tokenizer, *, special: bool = False):
        self._tok = tokenizer
        self._special = special
        # An incremental UTF-8 decoder holds back exactly the bytes of an unfinished character.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer.add_space_prefix
        self._started = False

    def add(self, token_id: int) -> str:
        piece = self._tok.token_bytes(token_id, special=self._special)
        if not self._started and piece:  # the first piece with text (a leading BOS renders as nothing)
            self._started = True
            if self._strip_space and piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)

    @property
    def pending(self) -> int:
        """Number of bytes held back (an incomplete UTF-8 character)."""
        return len(self._utf8.getstate()[0])
