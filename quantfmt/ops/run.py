"""Running and scoring models: a runner and its tokenizer from any file quantfmt opens (GGUF, an HF
folder or checkpoint with config.json, a quantfmt file converted from either), optionally quantized
on load; text generation; and the scoreboard, which evaluates a reference model against itself
quantized to each of several formats or recipes (perplexity, KL divergence, top-1 agreement, size,
decode speed), the comparison `llama-perplexity --kl-divergence` makes, for any registered format.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QuantfmtError
from ..llm import LlamaRunner
from ..llm.evaluate import evaluate
from ..llm.sample import generate
from ..llm.tokenizer import Tokenizer
from ..recipe import Recipe
from .convert import load


def load_tokenizer(model, path, explicit=None) -> Tokenizer:
    """The model's tokenizer: `explicit` (a GGUF file or a folder with tokenizer.json), else the GGUF
    key-values the model carries (a GGUF, or a quantfmt file converted from one), else a
    tokenizer.json beside the weights."""
    if explicit is not None:
        p = Path(explicit)
        return Tokenizer.from_folder(p) if p.is_dir() else Tokenizer.from_gguf(p)
    g = model.metadata.get("gguf")
    if isinstance(g, dict) and g.get("kv"):
        return Tokenizer.from_gguf_kv(g["kv"], source=str(path))
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder)
    raise QuantfmtError("no tokenizer: the file carries no GGUF tokenizer key-values and no tokenizer.json lies "
                        "beside it; name one with --tokenizer (a GGUF file or a folder with tokenizer.json)",
                        file=str(path))


def open_runner(path, recipe=None, *, n_ctx: int | None = None, activations: str = "auto", tokenizer=None,
                need_tokenizer: bool = True):
    """(runner, tokenizer or None, model) for the model at `path`, quantized on load by `recipe` if given."""
    model = load(path, recipe)
    try:
        runner = LlamaRunner.from_model(model, n_ctx=n_ctx, activations=activations)
        tok = load_tokenizer(model, path, tokenizer) if need_tokenizer else None
    except BaseException:
        model.close()
        raise
    return runner, tok, model


# Tokens of the warm-up's batch: enough to take every prefill path a longer prompt takes (the int8 and
# tile paths switch on at 8-16 activation rows), few enough to cost a fraction of a real prefill.
WARM_UP_TOKENS = 32


def warm_up(runner, ids) -> float:
    """Run the kernels a generation after `ids` will use once (a decode step, and a prefill batch of up to
    WARM_UP_TOKENS of the prompt) and forget the positions; returns the seconds it took.

    Why: numba compiles a kernel on its first call in a process (or loads it from its on-disk cache), which on
    an empty cache takes seconds per format; counted in the first prompt's tokens/s it would read as a speed
    of the model (0.3 tokens/s for what runs at 40). The first call is timed here and reported apart."""
    t0 = time.perf_counter()
    if len(ids) > 1:
        runner.forward(ids[:WARM_UP_TOKENS], 0, logits="last")
    runner.forward(ids[:1], 0, logits="last")
    runner.reset()
    return time.perf_counter() - t0


def run_text(runner, tokenizer, prompt: str, n: int, *, temperature=0.0, top_p=1.0, seed=None, on_text=None,
             warm: bool = True):
    """Generate up to n tokens after `prompt`; `on_text(piece)` gets the text as it is decoded.
    Returns (text, stats); with `warm`, the kernels run once first (warm_up), stats.warm_up_seconds."""
    ids = tokenizer.encode(prompt)
    warm_s = warm_up(runner, ids) if warm and ids else 0.0
    gen = generate(runner, ids, n, temperature=temperature, top_p=top_p, seed=seed, stop=tokenizer.eos_ids)
    dec = tokenizer.stream_decoder()
    out = []
    for tok in gen:
        if tokenizer.is_eog(tok):
            break
        piece = dec.add(tok)
        if piece:
            out.append(piece)
            if on_text is not None:
                on_text(piece)
    tail = dec.flush()
    if tail:
        out.append(tail)
        if on_text is not None:
            on_text(tail)
    gen.stats.warm_up_seconds = warm_s
    return "".join(out), gen.stats


def model_size(model) -> tuple[int, int, float]:
    """(bytes, weights, bits per weight) of the model's tensors."""
    nbytes = weights = 0
    for s in model.sources():
        nbytes += s.nbytes
        weights += math.prod(s.shape)
    return nbytes, weights, 8.0 * nbytes / weights if weights else 0.0


def decode_speed(runner, n: int = 16, prompt=(1, 2, 3, 4)) -> float:
    """Decode tokens per second: greedy generation of n tokens after a short prompt."""
    gen = generate(runner, list(prompt), n + 1)
    for _ in gen:
        pass
    return gen.stats.decode_tokens_per_s


@dataclass
class Entry:
    """One row of the scoreboard: what was evaluated and how it fared against the reference."""

    name: str  # the format tag or the recipe
    recipe: dict
    bytes: int
    bits_per_weight: float
    result: dict  # EvalResult.to_dict(): ppl, KLD statistics, top-1 agreement, ...
    decode_tokens_per_s: float
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "recipe": self.recipe, "bytes": self.bytes, "bits_per_weight": self.bits_per_weight,
                "decode_tokens_per_s": self.decode_tokens_per_s, "seconds": self.seconds, **self.result, **self.extra}


def scoreboard(path, tokens, candidates, *, n_ctx: int = 512, n_chunks: int | None = None, reference=None,
               activations: str = "auto", progress=None, speed_tokens: int = 16, fallback: str | None = None) -> dict:
    """Evaluate the model at `path` quantized on load by each candidate (a tag, a Recipe, a recipe
    file or a llama.cpp mix name) against `reference` (another model file; default: `path` as it is),
    on `tokens`; `fallback` is the fallback of the tag candidates' recipes (default F16; "auto": the
    nearest format that fits). Returns {"reference": {...}, "entries": [Entry.to_dict(), ...]}."""
    ref_runner, _, ref_model = open_runner(reference or path, n_ctx=n_ctx, activations=activations,
                                           need_tokenizer=False)
    try:
        t0 = time.perf_counter()
        ref_res = evaluate(ref_runner, tokens, n_ctx=n_ctx, n_chunks=n_chunks)
        nbytes, _, bpw = model_size(ref_model)
        out: dict[str, Any] = {"reference": {"file": str(reference or path), "bytes": nbytes, "bits_per_weight": bpw,
                             "ppl": ref_res.ppl, "ppl_unc": ref_res.ppl_unc, "seconds": time.perf_counter() - t0,
                             "decode_tokens_per_s": decode_speed(ref_runner, speed_tokens)},
               "entries": []}
        for i, cand in enumerate(candidates):
            recipe = Recipe.coerce(cand) if not isinstance(cand, Recipe) else cand
            if fallback is not None and recipe.mix is None:
                recipe = dataclasses.replace(recipe, fallback=fallback)
            name = cand if isinstance(cand, str) else (recipe.mix or recipe.default or "recipe")
            t0 = time.perf_counter()
            runner, _, model = open_runner(path, recipe, n_ctx=n_ctx, activations=activations, need_tokenizer=False)
            try:
                res = evaluate(runner, tokens, n_ctx=n_ctx, n_chunks=n_chunks, reference=ref_runner)
                nbytes, _, bpw = model_size(model)
                speed = decode_speed(runner, speed_tokens)
            finally:
                model.close()
            d = res.to_dict()
            d["delta_ppl"] = res.ppl - ref_res.ppl
            entry = Entry(name, recipe.to_dict(), nbytes, bpw, d, speed, time.perf_counter() - t0)
            out["entries"].append(entry.to_dict())
            if progress is not None:
                progress(i + 1, len(candidates), entry)
        return out
    finally:
        ref_model.close()


def plot_available() -> None:
    """QuantfmtError unless matplotlib can be imported (the [plot] extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QuantfmtError("--plot needs matplotlib: pip install 'quantfmt[plot]'") from None


def plot_scoreboard(board: dict, png) -> None:
    """KLD against bits per weight, one point per entry (matplotlib: pip install quantfmt[plot])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QuantfmtError("--plot needs matplotlib: pip install 'quantfmt[plot]'") from None
    xs = [e["bits_per_weight"] for e in board["entries"]]
    ys = [max(e["kld"]["kld_mean"], 1e-7) for e in board["entries"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(xs, ys)
    for e, x, y in zip(board["entries"], xs, ys, strict=True):
        ax.annotate(e["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole model)")
    ax.set_ylabel("mean KL divergence to the reference")
    ax.set_title(f"{Path(board['reference']['file']).name}: KLD vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
