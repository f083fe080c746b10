"""A reference runner for llama-family models on quantfmt tensors (llama2.c's run.c, in numpy).

    config.py    hyperparameters from GGUF key-values, an HF config.json or quantfmt metadata
    model.py     LlamaRunner: weights as QTensors in their own formats, KV cache, forward pass
    sample.py    greedy / temperature / top-p sampling and a timed `generate` loop
    evaluate.py  perplexity and KL divergence against a reference, as llama-perplexity computes them
"""

from .config import METADATA_KEY, ConfigError, LlamaConfig
from .model import LlamaRunner, RunnerError

__all__ = ["METADATA_KEY", "ConfigError", "LlamaConfig", "LlamaRunner", "RunnerError"]
