"""Commands that run models: `run` (generate text) and `eval` (perplexity, KL divergence against a
reference, and the format scoreboard)."""

from __future__ import annotations

import os
import sys

import click

from .output import output_options, size


def _threads(n: int | None) -> None:
    """Thread counts for BLAS and numba: environment variables count only before numpy loads
    (the CLI imports it lazily, so here it has not), numba's can also be set later."""
    if n:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(n)


def _recipe(to, recipe_file):
    from ..recipe import Recipe

    if to is None and recipe_file is None:
        return None
    return Recipe.from_options(to=to, file=recipe_file)


_model_options = [
    click.option("--to", "to", metavar="TAG", help="Quantize on load: every matrix to TAG (the recipe defaults); "
                 "a llama.cpp mix name (Q4_K_M) is --recipe MIX."),
    click.option("--recipe", "recipe_file", metavar="FILE|MIX", help="Quantize on load with a recipe file or a "
                 "llama.cpp mix (Q4_K_M, ...)."),
    click.option("--threads", type=click.IntRange(1, 1024), help="Threads for BLAS and numba (default: all CPUs)."),
    click.option("--activations", type=click.Choice(["auto", "f32", "blas"]), default="auto", show_default=True,
                 help="auto: quantized activations where a format pairs with them (as llama.cpp); f32: float."),
    click.option("--tokenizer", type=click.Path(exists=True), help="A GGUF file or a folder with tokenizer.json, "
                 "when the model file carries no tokenizer."),
]


def model_options(f):
    for opt in reversed(_model_options):
        f = opt(f)
    return f


@click.command()
@click.argument("path", metavar="MODEL", type=click.Path(exists=True))
@click.option("--prompt", "-p", required=True, help="The text to continue.")
@click.option("-n", "n_tokens", type=click.IntRange(0, 1 << 20), default=128, show_default=True,
              help="Tokens to generate at most (generation also stops at an end-of-generation token).")
@click.option("--temperature", type=click.FloatRange(0, 100), default=0.0, show_default=True,
              help="0: greedy (the most likely token every time).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Seed of the sampler (default: random).")
@click.option("--ctx", "n_ctx", type=click.IntRange(2, 1 << 20), help="Context length (default: min(model, 4096)).")
@model_options
@output_options("Print one JSON record (text and speeds) instead of streaming the text.")
def run(path, prompt, n_tokens, temperature, top_p, seed, n_ctx, to, recipe_file, threads, activations, tokenizer,
        out):
    """Generate text from MODEL (GGUF, HF folder, quantfmt file), each tensor running in its own format.

    Streams the text; prefill and decode tokens/s go to stderr at the end."""
    _threads(threads)
    from ..ops.run import open_runner, run_text

    runner, tok, model = open_runner(path, _recipe(to, recipe_file), n_ctx=n_ctx, activations=activations,
                                     tokenizer=tokenizer)
    with model:
        def stream(piece):
            if not out.as_json:
                click.echo(piece, nl=False)
                sys.stdout.flush()

        if not out.as_json:
            click.echo(prompt, nl=False)
        text, st = run_text(runner, tok, prompt, n_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            on_text=stream)
        if not out.as_json:
            click.echo("")
        rec = {"file": str(path), "prompt": prompt, "text": text, **st.to_dict(),
               "kv_cache_bytes": runner.kv_cache_bytes, "model_bytes": model.nbytes}
        out.emit(rec, lambda: None)
        # one generated token is no decode step (it comes from the prefill's logits): no rate to print
        rate = f"{st.decode_tokens_per_s:.1f} tokens/s" if st.generated_tokens > 1 else "no decode step"
        out.note(f"prefill: {st.prompt_tokens} tokens, {st.prefill_tokens_per_s:.1f} tokens/s; decode: "
                 f"{st.generated_tokens} tokens, {rate} "
                 f"(model {size(model.nbytes)}, KV cache {size(runner.kv_cache_bytes)}; first calls of the "
                 f"kernels before it, numba compiling or loading its cache: {st.warm_up_seconds:.1f} s)")


@click.command("eval")
@click.argument("path", metavar="MODEL", type=click.Path(exists=True))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A UTF-8 text file to score on.")
@click.option("--ctx", "n_ctx", type=click.IntRange(4, 1 << 20), default=512, show_default=True,
              help="Tokens per chunk (each chunk's second half is scored, as llama-perplexity does).")
@click.option("--chunks", "n_chunks", type=click.IntRange(1, 1 << 20), help="At most this many chunks.")
@click.option("--reference", type=click.Path(exists=True),
              help="A reference model (another file, or the same file without --to/--recipe): KL divergence "
                   "of the next-token distributions, top-1 agreement, RMS dp, delta ppl.")
@click.option("--formats", "tags", metavar="TAG,TAG,...",
              help="The scoreboard: MODEL is the reference, quantized on load to each format in turn.")
@click.option("--recipes", "recipes", metavar="FILE|MIX,...", help="Scoreboard rows from recipes or llama.cpp mixes.")
@click.option("--fallback", metavar="TAG|auto", help="Scoreboard: where a format's blocks do not fit a tensor, this "
              "format instead (default F16; auto: the nearest in bits per weight that fits).")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), help="Scoreboard: write KLD against bits per "
              "weight as a PNG (needs matplotlib: pip install 'quantfmt[plot]').")
@model_options
@output_options("Print the results as JSON.")
def eval_(path, text_file, n_ctx, n_chunks, reference, tags, recipes, fallback, plot_png, to, recipe_file, threads,
          activations, tokenizer, out):
    """Perplexity of MODEL on a text, with KL divergence against --reference; or, with --formats /
    --recipes, the scoreboard of formats: bits per weight, size, KLD, delta ppl, top-1 agreement and
    decode speed of each, measured against MODEL itself."""
    _threads(threads)
    from ..errors import QuantfmtError
    from ..ops.run import load_tokenizer, open_runner, plot_scoreboard, scoreboard
    from ..sources import open_model

    if n_ctx % 2:
        raise click.BadParameter("must be even", param_hint="--ctx")
    if plot_png:
        from ..ops.run import plot_available

        plot_available()  # before any work, not after it
    try:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise QuantfmtError(f"cannot read the text: {e}", file=text_file) from None
    with open_model(path) as m:
        tok = load_tokenizer(m, path, tokenizer)
    tokens = tok.encode(text, add_bos=False)
    out.note(f"{text_file}: {len(tokens)} tokens, {len(tokens) // n_ctx} chunks of {n_ctx}")
    if tags or recipes:
        cands = [t.strip() for t in (tags or "").split(",") if t.strip()]
        cands += [r.strip() for r in (recipes or "").split(",") if r.strip()]

        def progress(i, n, e):
            out.note(f"[{i}/{n}] {e.name}: {e.bits_per_weight:.3f} bpw, KLD {e.result['kld']['kld_mean']:.5f}, "
                     f"ppl {e.result['ppl']:.4f}, {e.seconds:.0f} s")

        board = scoreboard(path, tokens, cands, n_ctx=n_ctx, n_chunks=n_chunks, reference=reference,
                           activations=activations, progress=progress, fallback=fallback)
        if plot_png:
            plot_scoreboard(board, plot_png)

        def render():
            r = board["reference"]
            out.echo(f"reference {r['file']}: {r['bits_per_weight']:.2f} bpw, {size(r['bytes'])}, "
                     f"ppl {r['ppl']:.4f} ± {r['ppl_unc']:.4f}, decode {r['decode_tokens_per_s']:.1f} tokens/s")
            rows = []
            for e in board["entries"]:
                k = e["kld"]
                rows.append([e["name"], f"{e['bits_per_weight']:.3f}", size(e["bytes"]),
                             f"{k['kld_mean']:.5f} ± {k['kld_unc']:.5f}", f"{k['kld_p99']:.4f}",
                             f"{e['delta_ppl']:+.4f} ± {k['dppl_unc']:.4f}", f"{100 * k['same_top']:.2f}%",
                             f"{k['rms_dp'] * 100:.3f}%", f"{e['decode_tokens_per_s']:.1f}"])
            out.table(["format", "bpw", "size", "KLD mean", "KLD p99", "delta ppl", "top-1 same", "RMS dp",
                       "decode tok/s"], rows, right=set(range(1, 9)))
            if plot_png:
                out.echo(f"plot: {plot_png}")

        out.emit(board, render)
        return
    from ..recipe import Recipe

    recipe = _recipe(to, recipe_file)
    runner, _, model = open_runner(path, recipe, n_ctx=n_ctx, activations=activations, need_tokenizer=False)
    ref = ref_model = None
    with model:
        if reference is not None:
            ref, _, ref_model = open_runner(reference, n_ctx=n_ctx, activations=activations, need_tokenizer=False)
        try:
            from ..llm.evaluate import evaluate

            res = evaluate(runner, tokens, n_ctx=n_ctx, n_chunks=n_chunks, reference=ref,
                           progress=lambda i, n, p: out.note(f"[{i}/{n}] ppl {p:.4f}"))
        finally:
            if ref_model is not None:
                ref_model.close()
    d = res.to_dict()
    d["file"] = str(path)
    d["recipe"] = None if recipe is None else Recipe.coerce(recipe).to_dict()

    def render_one():
        out.echo(f"{path}: ppl {res.ppl:.4f} ± {res.ppl_unc:.4f} over {res.count} tokens ({res.chunks} chunks of "
                 f"{res.n_ctx}), {res.seconds:.1f} s")
        if res.reference is not None:
            k = res.reference
            out.echo(f"against {reference}: ppl {k['ppl_ref']:.4f}; delta ppl {k['dppl']:+.4f} ± {k['dppl_unc']:.4f}")
            out.echo(f"  KLD mean {k['kld_mean']:.6f} ± {k['kld_unc']:.6f}, median {k['kld_median']:.6f}, "
                     f"p99 {k['kld_p99']:.6f}, max {k['kld_max']:.6f}")
            out.echo(f"  same top token {100 * k['same_top']:.3f} ± {100 * k['same_top_unc']:.3f} %, "
                     f"RMS dp {100 * k['rms_dp']:.4f} %")

    out.emit(d, render_one)
