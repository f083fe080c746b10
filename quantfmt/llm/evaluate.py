"""Perplexity, and KL divergence against a reference model, as llama.cpp's llama-perplexity defines them.

    res = evaluate(runner, token_ids, n_ctx=512)                        # PPL ± standard error
    res = evaluate(runner, token_ids, n_ctx=512, reference=ref_runner)  # + KLD, top-1, Δp, Δppl

Definitions (llama.cpp examples/perplexity/perplexity.cpp, `perplexity` and `kl_divergence`):
- the tokens are cut into len // n_ctx chunks of n_ctx tokens; each chunk is evaluated fresh
  (empty KV cache, positions 0..n_ctx-1); with add_bos the chunk's first token is replaced by
  BOS (the text's tokens are given as they are, BOS included if the tokenizer adds one);
- only the second half is scored: the logits at positions j = n_ctx/2 .. n_ctx-2 predict
  token j+1, so n_ctx - 1 - n_ctx/2 tokens per chunk (255 of 512);
- nll = -log softmax(logits)[next token]; PPL = exp(mean nll); its uncertainty is
  PPL * sqrt((mean nll² - mean nll²) / (count - 1));
- KLD per token = Σ_v p_ref(v) (log p_ref(v) - log p(v)); "same top p" = fraction of tokens where
  the argmaxes agree; Δp = p(next) - p_ref(next), RMS Δp = sqrt(mean Δp²); Δppl = PPL - PPL_ref with
  the covariance of the two nll series in its uncertainty; mean ± uncertainty as llama.cpp's
  `mean_and_uncertainty` (0 for 10 values or fewer); percentiles by linear interpolation.
Unlike llama-perplexity, the reference's log-probabilities are used exactly (it stores them as
16-bit steps over the top 16 nats and drops p_ref < e^-16), and both models run side by side
chunk by chunk, so no logits file is written. All statistics are accumulated in float64.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .config import ConfigError

# rows of vocab-wide float64 arrays processed at a time (bounds memory: 64 x 49152 x 8 B = 25 MB)
_ROWS = 64


def _mean_unc(s, s2, n):
    """llama.cpp's mean_and_uncertainty: mean and the standard error of the mean."""
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


@dataclass
class EvalResult:
    n_ctx: int
    chunks: int
    count: int  # scored tokens
    ppl: float
    ppl_unc: float
    seconds: float = 0.0
    reference: dict | None = None  # KLD statistics, present with a reference model
    chunk_ppl: list = field(default_factory=list)  # running PPL after each chunk, as llama.cpp prints it

    def to_dict(self) -> dict:
        d = {"n_ctx": self.n_ctx, "chunks": self.chunks, "tokens_scored": self.count, "ppl": self.ppl,
             "ppl_unc": self.ppl_unc, "seconds": self.seconds, "chunk_ppl": list(self.chunk_ppl)}
        if self.reference is not None:
            d["kld"] = dict(self.reference)
        return d


class _Acc:
    """Running sums, as llama.cpp's kl_divergence_result, plus the per-token values."""

    def __init__(self):
        self.n = 0
        self.nll = self.nll2 = 0.0
        self.nll_b = self.nll_b2 = self.nll_nll_b = 0.0
        self.kld = self.kld2 = 0.0
        self.dp = self.dp2 = self.dp4 = 0.0
        self.same_top = 0
        self.kld_values: list[np.ndarray] = []
        self.dp_values: list[np.ndarray] = []


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z


def _score(acc: _Acc, logits, ref_logits, nxt):
    rows = np.arange(nxt.size)
    lp = _log_softmax(logits)
    nll = -lp[rows, nxt]
    acc.n += nxt.size
    acc.nll += nll.sum()
    acc.nll2 += (nll * nll).sum()
    if ref_logits is None:
        return
    lr = _log_softmax(ref_logits)
    nll_b = -lr[rows, nxt]
    acc.nll_b += nll_b.sum()
    acc.nll_b2 += (nll_b * nll_b).sum()
    acc.nll_nll_b += (nll * nll_b).sum()
    kld = (np.exp(lr) * (lr - lp)).sum(axis=1)
    acc.kld += kld.sum()
    acc.kld2 += (kld * kld).sum()
    acc.kld_values.append(kld)
    # argmax of the logits themselves (first maximum, as llama.cpp's scan)
    acc.same_top += int((logits.argmax(axis=1) == ref_logits.argmax(axis=1)).sum())
    dp = np.exp(-nll) - np.exp(-nll_b)
    acc.dp += dp.sum()
    acc.dp2 += (dp * dp).sum()
    acc.dp4 += (dp**4).sum()
    acc.dp_values.append(dp)


def _kld_stats(acc: _Acc) -> dict:
    n = acc.n
    lq, lq_u = _mean_unc(acc.nll, acc.nll2, n)
    lb, lb_u = _mean_unc(acc.nll_b, acc.nll_b2, n)
    cov = (acc.nll_nll_b / n - (acc.nll / n) * (acc.nll_b / n)) / (n - 1) if n >= 10 else 0.0
    ppl, ppl_b = math.exp(lq), math.exp(lb)
    ppl_u, ppl_b_u = ppl * lq_u, ppl_b * lb_u
    ln_ratio = lq - lb
    ln_ratio_u = math.sqrt(max(lq_u**2 + lb_u**2 - 2 * cov, 0.0))
    dppl_u = math.sqrt(max(ppl_u**2 + ppl_b_u**2 - 2 * ppl * ppl_b * cov, 0.0))
    kld_m, kld_u = _mean_unc(acc.kld, acc.kld2, n)
    kv = np.concatenate(acc.kld_values)
    dv = np.concatenate(acc.dp_values)
    msq, msq_u = _mean_unc(acc.dp2, acc.dp4, n)
    rms = math.sqrt(msq)
    dp_m, dp_u = _mean_unc(acc.dp, acc.dp2, n)
    top = acc.same_top / n
    pct = np.percentile(kv, [1, 5, 10, 90, 95, 99, 99.9])  # linear interpolation, as llama.cpp's `percentile`
    return {
        "ppl_ref": ppl_b, "ppl_ref_unc": ppl_b_u,
        "ppl_ratio": math.exp(ln_ratio), "ppl_ratio_unc": math.exp(ln_ratio) * ln_ratio_u,
        "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_unc": ln_ratio_u,
        "dppl": ppl - ppl_b, "dppl_unc": dppl_u,
        "ppl_correlation": cov / (lq_u * lb_u) if lq_u and lb_u else 0.0,
        "kld_mean": kld_m, "kld_unc": kld_u, "kld_median": float(np.median(kv)),
        "kld_p01": float(pct[0]), "kld_p05": float(pct[1]), "kld_p10": float(pct[2]),
        "kld_p90": float(pct[3]), "kld_p95": float(pct[4]), "kld_p99": float(pct[5]), "kld_p999": float(pct[6]),
        "kld_max": float(kv.max()), "kld_min": float(kv.min()),
        "same_top": top, "same_top_unc": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        "rms_dp": rms, "rms_dp_unc": 0.5 / rms * msq_u if rms else 0.0,
        "mean_dp": dp_m, "mean_dp_unc": dp_u, "max_abs_dp": float(np.abs(dv).max()),
    }


def chunks_of(tokens, n_ctx: int, n_chunks: int | None = None) -> int:
    """How many chunks of n_ctx tokens llama-perplexity evaluates (len // n_ctx, at most n_chunks)."""
    n = len(tokens) // n_ctx
    return n if n_chunks is None or n_chunks < 0 else min(n, int(n_chunks))


def evaluate(runner, tokens, *, n_ctx: int = 512, n_chunks: int | None = None, reference=None,
             add_bos: bool | None = None, bos_id: int | None = None, progress=None) -> EvalResult:
    """Perplexity of `runner` over `tokens` (and KL divergence etc. against `reference`, another runner).

    add_bos (default: the runner's config, from the GGUF's tokenizer.ggml.add_bos_token) replaces
    each chunk's first token by BOS (bos_id, default the config's). `progress(i, n, partial)` is
    called after each chunk.
    """
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if n_ctx < 4 or n_ctx % 2:
        raise ConfigError(f"n_ctx must be an even number >= 4, got {n_ctx}")
    for r, what in ((runner, "the model"), (reference, "the reference")):
        if r is not None and r.n_ctx < n_ctx:
            raise ConfigError(f"{what}'s runner holds {r.n_ctx} positions, fewer than n_ctx = {n_ctx}")
    if reference is not None and reference.config.vocab_size != runner.config.vocab_size:
        raise ConfigError(f"vocabularies differ: {runner.config.vocab_size} tokens against "
                          f"{reference.config.vocab_size} in the reference")
    n = chunks_of(toks, n_ctx, n_chunks)
    if n < 1:
        raise ConfigError(f"{toks.size} tokens do not make one chunk of n_ctx = {n_ctx}")
    cfg = runner.config
    if add_bos is None:
        add_bos = bool(cfg.add_bos)
    if add_bos:
        bos_id = cfg.bos_token_id if bos_id is None else bos_id
        if bos_id is None:
            raise ConfigError("add_bos is set but the model config has no BOS token id; pass bos_id")
    first = n_ctx // 2
    acc = _Acc()
    chunk_ppl = []
    t0 = time.perf_counter()
    for c in range(n):
        chunk = toks[c * n_ctx:(c + 1) * n_ctx].copy()
        if add_bos:
            chunk[0] = bos_id
        # the last token is only predicted, never an input that matters: feed n_ctx - 1 tokens
        inp, nxt = chunk[:-1], chunk[first + 1:]
        runner.reset()
        lg = runner.forward(inp, 0, logits=first)
        rl = None
        if reference is not None:
            reference.reset()
            rl = reference.forward(inp, 0, logits=first)
        for r0 in range(0, nxt.size, _ROWS):
            r1 = min(nxt.size, r0 + _ROWS)
            _score(acc, lg[r0:r1], None if rl is None else rl[r0:r1], nxt[r0:r1])
        chunk_ppl.append(math.exp(acc.nll / acc.n))
        if progress is not None:
            progress(c + 1, n, chunk_ppl[-1])
    lq, lq_u = acc.nll / acc.n, 0.0
    var = acc.nll2 / acc.n - lq * lq
    if var > 0 and acc.n > 1:
        lq_u = math.sqrt(var / (acc.n - 1))
    ppl = math.exp(lq)
    return EvalResult(n_ctx=n_ctx, chunks=n, count=acc.n, ppl=ppl, ppl_unc=ppl * lq_u,
                      seconds=time.perf_counter() - t0,
                      reference=None if reference is None else _kld_stats(acc), chunk_ppl=chunk_ppl)
