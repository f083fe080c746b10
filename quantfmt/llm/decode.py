"""The one-token (decode) steps of the llama forward pass between the matmuls, as small cached numba kernels.

Owns rmsnorm, RoPE plus the KV cache write, attention over the cache and SwiGLU for ONE position
(LlamaRunner.forward with n == 1); prefill keeps model.py's numpy code. Why: a decoded SmolLM2-135M
token is ~210 matmuls of 576x576..1536x576 weights that take ~3-12 us each in the kernels, and
around them ~40 numpy operations per layer (reshapes, temporaries, a batched matmul of 3 x (3, 64)
by (64, 600), max/exp/sum, ...) at a few microseconds each: measured, one 30-layer token spent more
time in numpy's per-call overhead and in the attention (~170 us a layer at position 600, the numpy
version) than in the weights' kernels. Each step here is one call.

The arithmetic is model.py's, in the same float32 order where it matters (rmsnorm's mean of squares
in float64, then x * s * w; RoPE's a*cos - b*sin and b*cos + a*sin, unfused; SwiGLU's g / (1 + exp(-g))
* u), so decode logits match prefill's to float rounding. The attention's dot products over head_dim
are summed in another order than BLAS's (fastmath "reassoc" lets LLVM vectorize them), and SwiGLU's
exp is libm's expf rather than numpy's SIMD one: rounding-level differences, as between two BLAS
builds. Greedy SmolLM2 text (`quantfmt run`, Q4_0/Q8_0/F32) is unchanged.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# reassoc: vectorize the dot products (sums in another order); no nnan/ninf: -inf and inf stay meaningful
_ATTN_MATH = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True)
def rmsnorm1(x, w, eps, out):  # pragma: no cover (numba)
    """out = x / sqrt(mean(x^2) + eps) * w for one row x (float32), the mean accumulated in float64
    as ggml does (model._rmsnorm)."""
    d = x.shape[0]
    ms = 0.0
    for j in range(d):
        v = np.float64(x[j])
        ms += v * v
    s = np.float32(1.0 / math.sqrt(ms / d + eps))
    for j in range(d):
        out[j] = x[j] * s * w[j]


@numba.njit(cache=True, nogil=True)
def rope_store1(q, k, v, cos, sin, kc, vc, p, adjacent, n_rot):  # pragma: no cover (numba)
    """Rotate q (heads, hd) in place and k (kv heads, hd) by position p's angles (cos, sin: (n_rot/2,)),
    then k into kc[:, p] and v (kv heads * hd,) into vc[:, p] (kc, vc: one layer's cache (kv, n_ctx, hd))."""
    half = n_rot // 2
    for x in (q, k):
        for h in range(x.shape[0]):
            for i in range(half):
                ia = 2 * i if adjacent else i
                ib = ia + 1 if adjacent else i + half
                a = x[h, ia]
                b = x[h, ib]
                x[h, ia] = a * cos[i] - b * sin[i]
                x[h, ib] = b * cos[i] + a * sin[i]
    hd = kc.shape[2]
    for h in range(kc.shape[0]):
        for j in range(hd):
            kc[h, p, j] = k[h, j]
            vc[h, p, j] = v[h * hd + j]


def attend1(q, kc, vc, ctx, scale, s, out):
    """Attention of one query per head, q (heads, hd), over positions 0..ctx-1 of one layer's cache
    (kc, vc: (kv heads, n_ctx, hd)); query head h reads kv head h // (heads / kv heads). s: float32
    scratch (heads, >= ctx); out (heads * hd,).

    The scores minus their maximum in numba (the dot products over head_dim vectorize); their exp,
    normalization and the weighted sum of values in numpy: numba's exp is a libm call per value (~40 us
    for 9 heads x 600 positions, numpy's SIMD one ~6), and the sum of values as one batched matmul per
    kv head ran ~5x faster than numba's loop here."""
    nkv, hd = vc.shape[0], vc.shape[2]
    sc = s[:, :ctx]
    _scores1(q, kc, ctx, scale, sc)
    np.exp(sc, out=sc)
    sc /= sc.sum(axis=1, keepdims=True)
    np.matmul(sc.reshape(nkv, -1, ctx), vc[:, :ctx], out=out.reshape(nkv, -1, hd))


@numba.njit(cache=True, nogil=True, fastmath=_ATTN_MATH)
def _scores1(q, kc, ctx, scale, s):  # pragma: no cover (numba)
    # s[h, t] = q[h] . k[t] * scale - max over t. The dot loop alone in its loop vectorizes (a zmm FMA
    # chain over head_dim per position); mixed with the running max it did not (~3x slower).
    nh, hd = q.shape
    g = nh // kc.shape[0]
    for h in range(nh):
        kv = h // g
        qh, sh = q[h], s[h]
        for t in range(ctx):
            kt = kc[kv, t]  # 1-D views: plain loads in the loop
            acc = np.float32(0.0)
            for j in range(hd):
                acc += qh[j] * kt[j]
            sh[t] = acc
    for h in range(nh):
        m = np.float32(-np.inf)
        sh = s[h]
        for t in range(ctx):
            sh[t] *= scale
            m = max(m, sh[t])
        for t in range(ctx):
            sh[t] -= m


@numba.njit(cache=True, nogil=True)
def swiglu1(g, u):  # pragma: no cover (numba)
    """g = silu(g) * u in place (one row): g / (1 + exp(-g)) * u; exp(-g) = inf for very negative g
    gives -0, the limit."""
    for j in range(g.shape[0]):
        gj = g[j]
        g[j] = gj / (np.float32(1.0) + np.exp(-gj)) * u[j]
