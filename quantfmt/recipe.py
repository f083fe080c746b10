"""Recipes: which format each tensor of a model gets.

A recipe is an ordered list of rules `PATTERN=TAG` (fnmatch-style on the full tensor name:
`*` matches anything including dots, `?` one character, `[...]` a set; case-sensitive; or
`re:REGEX`, a Python regular expression that must match the whole name), a default tag, and a
fallback tag. Every tensor's Step records why it got its tag:

  1. a vector (1-D, scalar, or a single row), a norm (a name component such as attn_norm,
     input_layernorm, ln_f; `normal` is not one) or a bias is *protected*: tiny and sensitive,
     it keeps its format unless a rule names it explicitly, i.e. a matching rule whose pattern
     has no `*` or mentions "norm" (`*norm*=F16`, `blk.0.bias=F32`; not `blk.1.*=Q8_0`); the
     Step says why ("1-D kept", "norm kept", ...). `protect=false` turns this off;
  2. otherwise the first rule whose pattern matches the name decides (TAG may be `keep`:
     leave the tensor in its current format, bytes unchanged);
  3. otherwise the default tag (none, or `keep`: keep the current format). The output head
     (`output.weight`, `lm_head.weight`, or the token embedding when the model ties it to the
     output) is promoted as llama-quantize does when the default would give it fewer bits:
     to Q6_K where that format is registered and fits, else Q8_0 (`promote_output=false`, or
     a rule naming the tensor, overrides this).
  If the chosen format cannot take the tensor's shape (e.g. 4096x100 in blocks of 32), the
  fallback tag is used instead and reported; `fallback=None` (CLI `--strict`) makes that a
  RecipeError; `fallback="auto"` picks the registered format nearest in bits per weight whose
  blocks fit the shape. The default fallback is F16: any shape fits, half the size of F32, and
  every weight of a real model fits its range (a weight |w| >= 65520 is a clear RangeError;
  pass `--fallback F32` then). A rule that matches no tensor, or only tensors that protection
  keeps, is a warning (RecipeError in strict mode).

Recipe files are JSON (the same document recorded in the output's metadata):

    {"default": "Q4_0", "fallback": "F16", "protect": true,
     "rules": [{"pattern": "*.attn_v.*", "tag": "Q8_0"}, {"pattern": "token_embd.*", "tag": "keep"}]}
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
import warnings
from dataclasses import dataclass, field

from .errors import QuantfmtError, RecipeError, UnknownFormatError
from .gcpause import paused

KEEP = "keep"
AUTO = "auto"
#: Names of a model's output head; when none is present, the first token embedding found is
#: tied to the output (SmolLM2, many small models) and is treated as the head.
OUTPUT_NAMES = ("output.weight", "lm_head.weight")
EMBEDDING_NAMES = ("token_embd.weight", "model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")
#: What llama-quantize gives the output head, best first.
OUTPUT_PROMOTION = ("Q6_K", "Q8_0")


class RecipeWarning(UserWarning):
    """A rule that matched nothing, or whose tensors protection kept."""
FLOAT_TAGS = ("F32", "F16", "BF16")
DEFAULT_FALLBACK = "F16"
_UNSET = object()


def _check_tag(tag, where: str) -> str:
    from .plugins import get_format

    if tag == KEEP:
        return tag
    if not isinstance(tag, str):
        raise RecipeError(f"{where}: tag {tag!r} is not a string")
    try:
        get_format(tag)
    except UnknownFormatError as e:
        raise RecipeError(f"{where}: {e.message}") from None
    return tag


@dataclass(slots=True)  # one per tensor, kept for the whole conversion: no __dict__ each
class Step:
    """What the recipe decided for one tensor."""

    name: str
    src_tag: str
    tag: str  # the tag it will have
    why: str  # "rule PATTERN=TAG", "default", "1-D kept", "scalar kept", "kept (no default)",
    #           "output head promoted from TAG (as llama-quantize)", "fallback (...)"
    wanted: str | None = None  # the tag it should have had, when it fell back

    @property
    def copy(self) -> bool:
        """Bytes carried over unchanged."""
        return self.tag == self.src_tag

    @property
    def requantize(self) -> bool:
        """A quantized tensor quantized again into another quantized format: errors compound."""
        return not self.copy and self.src_tag not in FLOAT_TAGS and self.tag not in FLOAT_TAGS


@dataclass
class Recipe:
    default: str | None = None  # None: keep each tensor's format unless a rule says otherwise
    rules: list[tuple[str, str]] = field(default_factory=list)
    fallback: str | None = DEFAULT_FALLBACK  # None: a shape that does not fit is an error; "auto": nearest bpw
    protect: bool = True  # tensors of < 2 dimensions keep their format unless a rule names them explicitly
    promote_output: bool = True  # the output head gets Q6_K/Q8_0 when the default would give it fewer bits
    mix: str | None = None  # a llama.cpp named mix (Q4_K_M, ...): it chooses what the default would

    def __post_init__(self):
        if self.mix is not None:
            from .mixes import get_mix

            self.mix = get_mix(self.mix).name
        if self.default is not None:
            _check_tag(self.default, "default")
        if self.fallback is not None:
            if self.fallback == KEEP:
                raise RecipeError("fallback: 'keep' is not allowed; name a tag that takes any shape (F16, F32)")
            if self.fallback != AUTO:
                _check_tag(self.fallback, "fallback")
        rules = []
        self._matchers = []
        for i, r in enumerate(self.rules):
            if isinstance(r, dict) and set(r) == {"pattern", "tag"}:
                r = (r["pattern"], r["tag"])
            if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) and r[0]):
                raise RecipeError(f"rule {i + 1}: {r!r} is not a (pattern, tag) pair (or a {{'pattern', 'tag'}} "
                                  "dict) with a non-empty pattern")
            rules.append((r[0], _check_tag(r[1], f"rule {r[0]}={r[1]}")))
            self._matchers.append(_matcher(r[0]))
        self.rules = rules

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def from_options(cls, to=None, rules=(), fallback=_UNSET, strict=False, file=None) -> Recipe:
        """The CLI's flags: --recipe (a JSON file, or a llama.cpp mix name such as Q4_K_M) extended by
        --to, --rule (before the recipe's rules), --fallback. `--to Q4_K_M` (a mix name that is no
        format's tag: what llama-quantize takes) is `--recipe Q4_K_M`."""
        if to is not None and _mix_name(to):
            if file:
                raise RecipeError(f"--to {to}: that is a llama.cpp mix, and --recipe {file} is given too; "
                                  "--to takes a format tag (the default of the tensors no rule names)")
            file, to = to, None
        base = cls.named_or_file(file) if file else cls(fallback=DEFAULT_FALLBACK)
        parsed = [cls.parse_rule(r) for r in rules]
        default = to if to is not None else base.default
        fb = base.fallback if fallback is _UNSET or fallback is None else fallback
        if strict:
            fb = None
        return cls(default=default, rules=parsed + base.rules, fallback=fb, protect=base.protect,
                   promote_output=base.promote_output, mix=base.mix)

    @staticmethod
    def parse_rule(text: str) -> tuple[str, str]:
        pat, sep, tag = str(text).rpartition("=")
        if not sep or not pat.strip() or not tag.strip():
            raise RecipeError(f"rule {text!r} is not PATTERN=TAG (e.g. '*.attn_v.*=Q8_0')")
        return pat.strip(), tag.strip()

    @classmethod
    def load(cls, path) -> Recipe:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(1 << 20)
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"cannot read recipe file {path}: {e}") from None
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise RecipeError(f"recipe file {path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(doc)
        except RecipeError as e:
            e.file = str(path)
            raise

    @classmethod
    def from_dict(cls, doc) -> Recipe:
        if not isinstance(doc, dict):
            raise RecipeError("a recipe is a JSON object with keys default, fallback, rules")
        extra = set(doc) - {"default", "fallback", "protect", "promote_output", "mix", "rules", "fallbacks"}
        if extra:
            raise RecipeError(f"unknown recipe keys: {', '.join(sorted(map(str, extra)))} "
                              "(known: default, fallback, rules)")
        rules = doc.get("rules") or []
        if not isinstance(rules, list):
            raise RecipeError("'rules' must be a list of {\"pattern\": ..., \"tag\": ...}")
        pairs = []
        for i, r in enumerate(rules):
            if not (isinstance(r, dict) and set(r) == {"pattern", "tag"}):
                raise RecipeError(f"rule {i + 1}: {r!r} must be an object with exactly 'pattern' and 'tag'")
            pairs.append((r["pattern"], r["tag"]))
        fb = doc.get("fallback", DEFAULT_FALLBACK)
        protect = doc.get("protect", True)
        promote = doc.get("promote_output", True)
        if not isinstance(protect, bool) or not isinstance(promote, bool):
            raise RecipeError("'protect' and 'promote_output' must be true or false")
        return cls(default=doc.get("default"), rules=pairs, fallback=fb, protect=protect, promote_output=promote,
                   mix=doc.get("mix"))

    @classmethod
    def named_or_file(cls, what: str) -> Recipe:
        """A llama.cpp mix by name (`Q4_K_M`, see quantfmt.mixes.MIXES) or a JSON recipe file."""
        from pathlib import Path

        from .mixes import MIXES

        if not Path(what).exists() and what.upper() in {k.upper() for k in MIXES}:
            return cls(mix=what)
        if not Path(what).is_file():
            raise RecipeError(f"recipe {what!r} is neither a file nor a llama.cpp mix ({', '.join(MIXES)})")
        return cls.load(what)

    @classmethod
    def coerce(cls, recipe) -> Recipe:
        """A Recipe from a Recipe, a tag ("Q4_0" = that default), a dict, or a JSON file path."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        if isinstance(recipe, str):
            if recipe.endswith(".json"):
                return cls.load(recipe)
            if _mix_name(recipe):
                return cls(mix=recipe)  # Q4_K_M: a mix; Q4_0 stays the tag (cls(mix="Q4_0") for the mix)
            return cls(default=recipe)
        raise RecipeError(f"a recipe is a Recipe, a tag, a dict or a .json file, not {type(recipe).__name__}")

    def to_dict(self) -> dict:
        return {
            "default": self.default,
            "fallback": self.fallback,
            "protect": self.protect,
            "promote_output": self.promote_output,
            **({"mix": self.mix} if self.mix else {}),
            "rules": [{"pattern": p, "tag": t} for p, t in self.rules],
        }

    # ---- application -----------------------------------------------------------------

    def choose(self, name: str, src_tag: str, shape, *, head: bool = False, used: set | None = None,
               mix_tag: str | None = None, src_fmt=None) -> Step:
        """The Step for one tensor (RecipeError when its shape does not fit and there is no fallback).

        `head`: the tensor is the model's output head (see plan). `used` collects the indexes of the
        rules that decided a tensor, and (as -1 - i) of rules whose match protection overrode.
        `src_fmt`: the format of `src_tag` when the caller has it (plan looks each tag up once)."""
        from .plugins import get_format

        if (src_fmt if src_fmt is not None else get_format(src_tag)).value_kind != "f":
            # integer and bool buffers (position ids, masks) are data, not weights: never converted
            if used is not None:
                used.update(-1 - i for i, m in enumerate(self._matchers) if m(name))
            return Step(name, src_tag, src_tag, "non-float kept")
        prot = protection(name, shape) if self.protect else None
        small = prot is not None
        for i, ((pat, tag), match) in enumerate(zip(self.rules, self._matchers, strict=True)):
            if match(name):
                if small and not names_explicitly(pat):
                    if used is not None:
                        used.add(-1 - i)
                    continue
                if used is not None:
                    used.add(i)
                # interned: one string per rule, not per tensor (a file of 2**20 tensors keeps every Step)
                tag, why = (src_tag if tag == KEEP else tag), sys.intern(f"rule {pat}={tag}")
                break
        else:
            if small:
                tag, why = src_tag, sys.intern(f"{prot} kept")
            elif mix_tag is not None:
                # "F32" from a quantized mix: llama.cpp copies the tensor as it is; the F32 mix converts it
                keep = mix_tag == "F32" and self.mix != "F32"
                tag, why = (src_tag, f"mix {self.mix} keeps F32") if keep else (
                    get_format(mix_tag).tag, f"mix {self.mix}")
            elif self.default is None or self.default == KEEP:
                tag, why = src_tag, "kept (no default)"
            else:
                tag, why = self.default, "default"
                if head and self.promote_output:
                    tag, why = self._promote(tag, shape)
        if tag == src_tag or get_format(tag).accepts(shape):  # a source's own format fits its shape (the readers check)
            return Step(name, src_tag, tag, why)
        if self.fallback is None:
            raise RecipeError(
                f"{get_format(tag).tag} cannot take shape {tuple(shape)} ({why}) and the recipe is strict "
                "(no fallback): add a rule for this tensor or drop --strict",
                tensor=name,
            )
        fb = nearest_format(tag, shape) if self.fallback == AUTO else get_format(self.fallback)
        if fb is None or not fb.accepts(shape):
            raise RecipeError(f"neither {tag} nor the fallback {self.fallback} can take shape {tuple(shape)}",
                              tensor=name)
        return Step(name, src_tag, fb.tag, f"fallback ({why})", wanted=tag)

    @staticmethod
    def _promote(tag: str, shape) -> tuple[str, str]:
        """The output head's tag: llama-quantize's Q6_K (else Q8_0) when it has more bits than `tag`."""
        from .plugins import find_format, get_format

        bpw = get_format(tag).bits_per_weight
        for t in OUTPUT_PROMOTION:
            f = find_format(t)  # loads only that format's module (all formats were loaded here once)
            f = f if f is not None and f.tag == t else None
            if f is not None and f.accepts(shape):
                if f.bits_per_weight > bpw:
                    return f.tag, f"output head promoted from {tag} (as llama-quantize)"
                break
        return tag, "default"

    def plan(self, model, *, strict: bool = False) -> list[Step]:
        """A Step per tensor of `model` (a Model: its sources are read, no tensor is built).

        Warns (RecipeWarning; RecipeError with strict=True) about rules that matched no tensor
        and rules whose every match was kept by protection."""
        with paused():  # a Step per tensor: 2**20 tiny tensors are millions of small objects (gcpause.py)
            return self._plan(model, strict)

    def _plan(self, model, strict: bool) -> list[Step]:
        from .plugins import get_format

        if hasattr(model, "sources"):
            infos = [(t.name, t.tag, t.shape) for t in model.sources()]
        else:
            infos = [(name, t.tag, t.shape) for name, t in model.items()]
        head = output_head([n for n, _, _ in infos])
        mixed: dict[str, str] = {}
        if self.mix is not None:
            from .mixes import mix_types

            mixed = mix_types(self.mix, [(n, tuple(shape)) for n, _, shape in infos])
        used: set[int] = set()
        steps = []
        choose, n = self.choose, None
        fmts: dict = {}  # source tag -> its format, looked up once per tag, not per tensor
        try:  # not `with context(tensor=n)` per tensor: that costs more than choose() on a tiny tensor
            for n, tag, shape in infos:
                fmt = fmts.get(tag)
                if fmt is None:
                    fmt = fmts[tag] = get_format(tag)
                steps.append(choose(n, tag, shape, head=(n == head), used=used, mix_tag=mixed.get(n),
                                    src_fmt=fmt))
        except QuantfmtError as e:
            if e.tensor is None:
                e.tensor = n
            raise
        for i, (pat, tag) in enumerate(self.rules):
            if i in used:
                continue
            if -1 - i in used:
                msg = (f"rule {pat}={tag} matches only protected tensors (vectors, norms, biases, integer "
                       "buffers), which keep their format: name them explicitly (no '*') to change a float one")
            else:
                msg = f"rule {pat}={tag} matches no tensor of the model"
            if strict:
                raise RecipeError(msg)
            warnings.warn(msg, RecipeWarning, stacklevel=3)
        return steps


_NORM = re.compile(r"(^|_)(norm|rmsnorm|layernorm|layer_norm|ln|ln_\w+|ln\d+)($|_)", re.I)


def protection(name: str, shape) -> str | None:
    """Why a tensor is protected, by shape and by role, or None: "scalar", "1-D" (or any vector:
    one row), "norm" (a name component like attn_norm, input_layernorm, ln_f; not "normal"), "bias"."""
    if len(shape) == 0:
        return "scalar"
    n = 1
    for d in shape[:-1]:
        n *= int(d)
    if len(shape) == 1 or n == 1:
        return "1-D" if len(shape) == 1 else "vector"
    parts = name.split(".")
    if parts[-1] == "bias":
        return "bias"
    if any(_NORM.search(p) for p in parts[:-1] or parts):
        return "norm"
    return None


def _mix_name(name: str) -> bool:
    """Whether `name` is a llama.cpp mix (Q4_K_M) and no format's tag (Q4_0 and F16 are both: the tag)."""
    from .mixes import MIXES

    return name.upper() in {k.upper() for k in MIXES} and not _is_tag(name)


def _is_tag(name: str) -> bool:
    """Whether a format answers to `name` (a tag or an alias); loads plugins only if no built-in declares it."""
    from .plugins import has_format

    return has_format(name)


def output_head(names) -> str | None:
    """The name of the model's output head: output.weight/lm_head.weight, else a tied token embedding."""
    names = list(names)
    for n in OUTPUT_NAMES:
        if n in names:
            return n
    for n in EMBEDDING_NAMES:
        if n in names:
            return n
    return None


def nearest_format(tag: str, shape):
    """The registered format nearest to `tag` in bits per weight whose blocks fit `shape` (ties: more
    bits), among those that can quantize; None if none fits."""
    from .plugins import formats, get_format

    want = get_format(tag).bits_per_weight
    fits = [f for f in formats().values() if getattr(f, "can_quantize", True) and f.accepts(shape)]
    if not fits:
        return None
    return min(fits, key=lambda f: (abs(f.bits_per_weight - want), -f.bits_per_weight))


def _matcher(pattern: str):
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise RecipeError(f"rule pattern {pattern!r} is not a valid regular expression: {e}") from None
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def names_explicitly(pattern: str) -> bool:
    """Whether a rule may change a protected tensor (1-D or norm) it matches: its pattern has
    no `*` (an exact name, or `?`/`[...]` for a few), or it mentions "norm" (like `*norm*`)."""
    return "*" not in pattern or "norm" in pattern.lower()


def record(recipe: Recipe, steps: list[Step]) -> dict:
    """The recipe as recorded in an output's metadata, with the fallbacks that happened."""
    d = recipe.to_dict()
    d["fallbacks"] = {s.name: {"wanted": s.wanted, "used": s.tag} for s in steps if s.wanted is not None}
    return d
