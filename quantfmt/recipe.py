"""Recipes: which format each tensor of a model gets.

A recipe is an ordered list of rules `PATTERN=TAG` (fnmatch-style on the full tensor name:
`*` matches anything including dots, `?` one character, `[...]` a set; case-sensitive),
a default tag, and a fallback tag:

  1. a 1-D tensor, or one whose name contains "norm" (any case), is *protected*: it keeps its
     format (float stays float; norms and biases are tiny and sensitive) unless a rule names it
     explicitly, i.e. a matching rule whose pattern has no `*` or mentions "norm"
     (`*norm*=F16`, `blk.0.bias=F32`; not `blk.1.*=Q8_0`). `protect=false` turns this off;
  2. otherwise the first rule whose pattern matches the name decides (TAG may be `keep`:
     leave the tensor in its current format, bytes unchanged);
  3. otherwise the default tag (none: keep the current format).
  If the chosen format cannot take the tensor's shape (e.g. 4096x100 in blocks of 32), the
  fallback tag is used instead and reported; `fallback=None` (CLI `--strict`) makes that a
  RecipeError. The default fallback is F16: any shape fits, half the size of F32, and every
  weight of a real model fits its range (a weight |w| >= 65520 is a clear RangeError; pass
  `--fallback F32` then).

Recipe files are JSON (the same document recorded in the output's metadata):

    {"default": "Q4_0", "fallback": "F16", "protect": true,
     "rules": [{"pattern": "*.attn_v.*", "tag": "Q8_0"}, {"pattern": "token_embd.*", "tag": "keep"}]}
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field

from .errors import RecipeError, UnknownFormatError

KEEP = "keep"
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


@dataclass
class Step:
    """What the recipe decided for one tensor."""

    name: str
    src_tag: str
    tag: str  # the tag it will have
    why: str  # "rule PATTERN=TAG", "default", "1-D kept", "norm kept", "no default", "fallback (...)"
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
    fallback: str | None = DEFAULT_FALLBACK  # None: a shape that does not fit is an error
    protect: bool = True  # 1-D tensors and norms keep their format unless a rule names them explicitly

    def __post_init__(self):
        if self.default is not None:
            _check_tag(self.default, "default")
        if self.fallback is not None:
            if self.fallback == KEEP:
                raise RecipeError("fallback: 'keep' is not allowed; name a tag that takes any shape (F16, F32)")
            _check_tag(self.fallback, "fallback")
        rules = []
        for i, r in enumerate(self.rules):
            if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) and r[0]):
                raise RecipeError(f"rule {i + 1}: {r!r} is not a (pattern, tag) pair with a non-empty pattern")
            rules.append((r[0], _check_tag(r[1], f"rule {r[0]}={r[1]}")))
        self.rules = rules

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def from_options(cls, to=None, rules=(), fallback=_UNSET, strict=False, file=None) -> Recipe:
        """The CLI's flags: a recipe file (if any) extended by --to, --rule (before the file's rules), --fallback."""
        base = cls.load(file) if file else cls(fallback=DEFAULT_FALLBACK)
        parsed = [cls.parse_rule(r) for r in rules]
        default = to if to is not None else base.default
        fb = base.fallback if fallback is _UNSET or fallback is None else fallback
        if strict:
            fb = None
        return cls(default=default, rules=parsed + base.rules, fallback=fb, protect=base.protect)

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
        extra = set(doc) - {"default", "fallback", "protect", "rules", "fallbacks"}
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
        if not isinstance(protect, bool):
            raise RecipeError("'protect' must be true or false")
        return cls(default=doc.get("default"), rules=pairs, fallback=fb, protect=protect)

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
            return cls(default=recipe)
        raise RecipeError(f"a recipe is a Recipe, a tag, a dict or a .json file, not {type(recipe).__name__}")

    def to_dict(self) -> dict:
        return {
            "default": self.default,
            "fallback": self.fallback,
            "protect": self.protect,
            "rules": [{"pattern": p, "tag": t} for p, t in self.rules],
        }

    # ---- application -----------------------------------------------------------------

    def choose(self, name: str, src_tag: str, shape) -> Step:
        """The Step for one tensor (RecipeError when its shape does not fit and there is no fallback)."""
        from .plugins import get_format

        small = self.protect and (len(shape) <= 1 or "norm" in name.lower())
        for pat, tag in self.rules:
            if fnmatch.fnmatchcase(name, pat) and (not small or names_explicitly(pat)):
                tag, why = (src_tag if tag == KEEP else tag), f"rule {pat}={tag}"
                break
        else:
            if small:
                tag, why = src_tag, ("1-D kept" if len(shape) <= 1 else "norm kept")
            elif self.default is None or self.default == KEEP:
                tag, why = src_tag, "kept (no default)"
            else:
                tag, why = self.default, "default"
        if get_format(tag).accepts(shape):
            return Step(name, src_tag, tag, why)
        if self.fallback is None:
            raise RecipeError(
                f"{get_format(tag).tag} cannot take shape {tuple(shape)} ({why}) and the recipe is strict "
                "(no fallback): add a rule for this tensor or drop --strict",
                tensor=name,
            )
        fb = get_format(self.fallback)
        if not fb.accepts(shape):
            raise RecipeError(f"neither {tag} nor the fallback {fb.tag} can take shape {tuple(shape)}", tensor=name)
        return Step(name, src_tag, fb.tag, f"fallback ({why})", wanted=tag)

    def plan(self, model) -> list[Step]:
        """A Step per tensor of `model` (a Model: its sources are read, no tensor is built)."""
        if hasattr(model, "sources"):
            return [self.choose(t.name, t.tag, t.shape) for t in model.sources()]
        return [self.choose(name, t.tag, t.shape) for name, t in model.items()]


def names_explicitly(pattern: str) -> bool:
    """Whether a rule may change a protected tensor (1-D or norm) it matches: its pattern has
    no `*` (an exact name, or `?`/`[...]` for a few), or it mentions "norm" (like `*norm*`)."""
    return "*" not in pattern or "norm" in pattern.lower()


def record(recipe: Recipe, steps: list[Step]) -> dict:
    """The recipe as recorded in an output's metadata, with the fallbacks that happened."""
    d = recipe.to_dict()
    d["fallbacks"] = {s.name: {"wanted": s.wanted, "used": s.tag} for s in steps if s.wanted is not None}
    return d
