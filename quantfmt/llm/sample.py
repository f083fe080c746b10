"""Choosing the next token, and the timed generation loop.

    for tok in generate(runner, prompt_ids, 64, temperature=0.8, top_p=0.95, seed=1):
        ...
    g = generate(runner, ids, 64); list(g); g.stats  # prefill / decode tokens per second

`Sampler` is greedy at temperature 0, otherwise softmax(logits / T) truncated to the smallest
set of most likely tokens whose mass reaches top_p (llama2.c's and HF's nucleus rule), drawn
with a seeded numpy Generator, so a seed reproduces a run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .config import ConfigError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if not temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.rng = np.random.default_rng(seed)

    def probabilities(self, logits) -> np.ndarray:
        """The distribution a token is drawn from (float64, sums to 1; zero outside the nucleus)."""
        z = np.asarray(logits, np.float64) / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # keep tokens up to and including the first one at which the mass reaches top_p
            keep = order[: int(np.searchsorted(cum, self.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return p

    def __call__(self, logits) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        p = self.probabilities(logits)
        return int(self.rng.choice(p.size, p=p))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # forward passes of generated tokens
    sample_seconds: float = 0.0
    warm_up_seconds: float = 0.0  # kernels' first calls before the prompt (ops.run.warm_up), not in the speeds

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first generated token comes from the prefill's logits; each later one costs a decode step
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "sample_seconds": self.sample_seconds, "warm_up_seconds": self.warm_up_seconds,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s}


class Generation:
    """An iterator of generated token ids; `stats` fills in as it runs."""

    def __init__(self, runner, prompt_ids, n: int, sampler: Sampler, stop=(), reset: bool = True):
        self.runner = runner
        self.prompt = [int(t) for t in prompt_ids]
        if not self.prompt:
            raise ConfigError("generate() needs a prompt of at least one token")
        if n < 0:
            raise ConfigError(f"the number of tokens to generate must be >= 0, got {n}")
        self.n = int(n)
        self.sampler = sampler
        self.stop = {int(s) for s in stop}
        self.reset = reset
        self.stats = GenerationStats(prompt_tokens=len(self.prompt))

    def __iter__(self):
        r, st = self.runner, self.stats
        if self.n == 0:
            return
        if self.reset:
            r.reset()
        room = r.n_ctx - r.pos - len(self.prompt)
        n = min(self.n, room + 1)  # the last token need not be fed back
        t0 = time.perf_counter()
        logits = r.forward(self.prompt, logits="last")
        st.prefill_seconds = time.perf_counter() - t0
        for i in range(n):
            t0 = time.perf_counter()
            tok = self.sampler(logits)
            st.sample_seconds += time.perf_counter() - t0
            st.generated_tokens += 1
            yield tok  # the consumer's time between tokens is not counted
            if tok in self.stop or i == n - 1:
                break
            t0 = time.perf_counter()
            logits = r.forward([tok], logits="last")
            st.decode_seconds += time.perf_counter() - t0


def generate(runner, prompt_ids, n: int, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop=(), reset: bool = True) -> Generation:
    """Generate up to `n` tokens after `prompt_ids` (fewer at a stop token or when the context is full)."""
    return Generation(runner, prompt_ids, n, Sampler(temperature, top_p, seed), stop, reset)
