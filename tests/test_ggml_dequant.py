"""The ggml types stored as they are and decoded through gguf (plugins/ggml_dequant.py).

For each type: the registry and the GGUF reader know it by its tag and its ggml name; a GGUF
tensor of it inspects with its true tag and size, converts GGUF -> quantfmt -> GGUF byte for
byte and opens without being decoded; dequantize and get_rows are bit for bit the gguf
package's decoding (the outside authority; ggml's own C decoder in the opt-in oracle test);
qmatmul agrees with dequantize() @ x.T; quantize is gguf's for TQ1_0/TQ2_0 and a clear error
otherwise. The conformance kit runs what it can (see test_kit_*).
"""

import filecmp
import functools
import json
import warnings

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T
from ggufkit import write_sample

import quantfmt
from quantfmt import QTensor, formats, get_format, testing
from quantfmt.cli import cli
from quantfmt.errors import QuantfmtError, RangeError
from quantfmt.format import TAG_RE
from quantfmt.io.gguf import ggml_formats, read_gguf
from quantfmt_formats import ggml_dequant
from quantfmt_formats.ggml_dequant import QuantizerUnavailableError

PLUGIN = "quantfmt_formats.ggml_dequant"
TAGS = [t[1] for t in ggml_dequant.TYPES]
NAMES = {t[1]: t[0] for t in ggml_dequant.TYPES}
QUANTIZES = {"TQ10", "TQ20"}
# Types other formats own: F32/F16/BF16 and the ggml formats with kernels (some on other
# branches), and the integer/F64 types, handled elsewhere.
OWNED_ELSEWHERE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4", "I8", "I16", "I32", "I64", "F64"}
SHAPE = (6, 512)


def fmt_of(tag):
    return get_format(tag)


def gguf_decode(data, tag, cols):
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(np.asarray(data, np.uint8).reshape(-1, cols // fmt_of(tag).block_shape[1]
                                                                        * fmt_of(tag).block_bytes), T[NAMES[tag]])


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def sample_bytes(tag, shape=SHAPE, seed=0):
    """gguf's quantization of N(0,1) weights where gguf has a quantizer, else valid random blocks."""
    f = fmt_of(tag)
    rng = np.random.default_rng([seed, TAGS.index(tag)])
    if tag in QUANTIZES:
        w = rng.standard_normal(shape).astype(np.float32)
        return gguf.quants.quantize(w.reshape(-1, shape[-1]), T[NAMES[tag]]).reshape(-1)
    return f.example_bytes(shape, rng)


# ---- registry ------------------------------------------------------------------------------------


def test_the_types_are_those_gguf_decodes_and_no_other_format_owns():
    decodable = set()
    for t in T:
        bs, ts = GGML_QUANT_SIZES[t]
        try:
            gguf.quants.dequantize(np.zeros((1, ts), np.uint8), t)
        except NotImplementedError:
            continue
        decodable.add(t.name)
    assert decodable - OWNED_ELSEWHERE == set(NAMES.values())


@pytest.mark.parametrize("tag", TAGS)
def test_registered_with_ggmls_geometry_tag_and_alias(tag):
    f = formats()[tag]
    name = NAMES[tag]
    assert f.plugin == PLUGIN and TAG_RE.match(tag)
    bs, ts = GGML_QUANT_SIZES[T[name]]
    assert (f.block_shape, f.block_bytes) == ((1, bs), ts)
    assert f.ggml_type == name and f.aliases == (name,)
    assert get_format(name) is f
    assert ggml_formats()[name] is f  # what the GGUF reader and writer use
    assert f.summary.startswith(f"ggml {name} (read, convert, dequantize; ")
    assert ("quantize via gguf" in f.summary) == (tag in QUANTIZES) == f.can_quantize
    info = f.info()
    assert json.loads(json.dumps(info)) == info and info["can_quantize"] == f.can_quantize


def test_tags_are_distinct_from_every_other_name():
    others = {n for f in formats().values() if f.plugin != PLUGIN for n in (f.tag, *f.aliases)}
    assert len(set(TAGS)) == len(TAGS) and not (set(TAGS) | set(NAMES.values())) & others


def test_formats_command_tells_them_apart():
    res = CliRunner().invoke(cli, ["formats"])
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln for ln in res.stdout.splitlines() if ln.split()}
    assert "no quantizer: needs an importance matrix" in lines["I2XX"] and "(IQ2_XXS)" in lines["I2XX"]
    assert "no quantizer" in lines["I3_S"] and "importance" not in lines["I3_S"]
    assert "quantize via gguf" in lines["TQ10"]


# ---- kernels against gguf ------------------------------------------------------------------------


@pytest.mark.parametrize("tag", TAGS)
def test_dequantize_and_get_rows_are_ggufs_bit_for_bit(tag):
    f = fmt_of(tag)
    data = sample_bytes(tag)
    want = gguf_decode(data, tag, SHAPE[1])
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    got = f.dequantize(data, SHAPE)
    assert got.dtype == np.float32 and got.shape == SHAPE
    np.testing.assert_array_equal(bits(got), bits(want))
    for idx in ([3], [5, 0, 0, -1], np.arange(SHAPE[0])[::-1], np.array([2, 4], np.int32)):
        np.testing.assert_array_equal(bits(f.get_rows(data, SHAPE, idx)), bits(want[np.asarray(idx)]))
    # as a 3-D tensor and from a read-only buffer at an odd address (a mapped file)
    odd = np.empty(data.size + 1, np.uint8)[1:]
    odd[:] = data
    odd.flags.writeable = False
    np.testing.assert_array_equal(bits(f.dequantize(odd, (2, 3, SHAPE[1]))), bits(want.reshape(2, 3, -1)))


@pytest.mark.parametrize("tag", ["I2XX", "NVF4", "I1_M"])
def test_chunked_decoding_is_the_same(tag, monkeypatch):
    # blocks_per_call splits the work into several calls into gguf; a chunk boundary must not show.
    f = fmt_of(tag)
    shape = (7, 4 * f.block_shape[1])
    data = sample_bytes(tag, shape, seed=3)
    want = gguf_decode(data, tag, shape[1])
    monkeypatch.setattr(f, "blocks_per_call", 3)
    np.testing.assert_array_equal(bits(f.dequantize(data, shape)), bits(want))
    np.testing.assert_array_equal(bits(f.get_rows(data, shape, [6, 1, 6])), bits(want[[6, 1, 6]]))


@pytest.mark.parametrize("tag", TAGS)
def test_qmatmul_is_dequantize_times_x(tag, monkeypatch):
    f = fmt_of(tag)
    data = sample_bytes(tag)
    w = f.dequantize(data, SHAPE).astype(np.float64)
    x = np.random.default_rng(5).standard_normal((5, SHAPE[1])).astype(np.float32)
    scale = np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(w, axis=1)[None, :]
    for tile in (None, 2 * SHAPE[1]):  # default tiles, and two rows per tile
        if tile:
            monkeypatch.setattr(f, "prefill_tile_elements", tile)
        y = f.qmatmul(data, SHAPE, x)
        assert y.dtype == np.float32 and y.shape == (5, SHAPE[0])
        assert (np.abs(y - x.astype(np.float64) @ w.T) <= 1e-5 * scale).all()
        y1 = f.qmatmul(data, SHAPE, x[2])
        assert y1.shape == (SHAPE[0],) and (np.abs(y1 - w @ x[2]) <= 1e-5 * scale[2]).all()
    assert f.modes == ("f32",)


# ---- TQ1_0 / TQ2_0: numba kernels of their own ---------------------------------------------------


def tq_byte_sets(tag):
    """(name, bytes, shape) for a TQ type: gguf's quantization of real-looking data, random blocks with
    modest scales (example_bytes), every byte value in every digit position, and all-random bytes (fp16
    scales that are subnormal, inf and NaN included)."""
    f = fmt_of(tag)
    rng = np.random.default_rng([7, TAGS.index(tag)])
    cols = 3 * 256
    w = (rng.standard_normal((37, cols)) * 10.0 ** rng.uniform(-6, 4, (37, 1))).astype(np.float32)
    w[5] = (rng.integers(-1, 2, cols) * 0.37).astype(np.float32)  # ternary: every level, exact
    w[6] = 0
    out = [("quantized", gguf.quants.quantize(w, T[NAMES[tag]]).reshape(-1), w.shape),
           ("example bytes", f.example_bytes((301, 512), rng), (301, 512))]
    blk = (np.add.outer(np.arange(256), np.arange(f.block_bytes)) % 256).astype(np.uint8)  # each byte everywhere
    blk[:, f.block_bytes - 2 :] = np.array([0.75], np.float16).view(np.uint8)
    out.append(("every byte", blk.reshape(-1), (16, 16 * 256)))
    out.append(("random bytes", rng.integers(0, 256, 19 * 2 * f.block_bytes, dtype=np.uint8), (19, 512)))
    return out


@pytest.mark.parametrize("tag", sorted(QUANTIZES))
def test_tq_kernels_are_ggufs_bit_for_bit(tag):
    # The numba kernels (not gguf) decode these two; their float32 values must be gguf's bits, signed
    # zeros and the NaN/inf of non-finite scales included. Odd row counts; 301 rows run on several threads.
    f = fmt_of(tag)
    assert isinstance(f, ggml_dequant.TernaryFormat) and f.kernel_path("dequantize") == "numba"
    rng = np.random.default_rng(1)
    for what, data, shape in tq_byte_sets(tag):
        want = gguf_decode(data, tag, shape[1])
        with np.errstate(all="ignore"):
            got = f.dequantize(data, shape)
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=what)
        for idx in ([0], [shape[0] - 1, 0, 0, -1], np.arange(shape[0])[::-1], rng.integers(0, shape[0], 50),
                    rng.integers(-shape[0], shape[0], 7).astype(np.int32)):
            with np.errstate(all="ignore"):
                rows = f.get_rows(data, shape, idx)
            np.testing.assert_array_equal(bits(rows), bits(want[np.asarray(idx)]), err_msg=what)


@pytest.mark.parametrize("per_thread", [True, False], ids=["per-thread", "fallback"])
@pytest.mark.parametrize("tag", sorted(QUANTIZES))
def test_tq_qmatmul_every_path(tag, per_thread, monkeypatch):
    # n = 1: the fused dot kernel; n <= dot_max_n: decoded rows dotted; more: per-thread tiles + sgemm,
    # or (fallback) tiles then BLAS.
    from quantfmt import families

    f = fmt_of(tag)
    monkeypatch.setattr(families, "PER_THREAD_PREFILL", per_thread)
    if per_thread and not families.prefill_threads():
        pytest.skip("numpy's BLAS threads cannot be set here, or one thread only")
    rng = np.random.default_rng(4)
    shape = (301, 1024)  # odd rows; several ranges of parallel_rows
    data = f.quantize(rng.standard_normal(shape, dtype=np.float32))
    w = f.dequantize(data, shape).astype(np.float64)
    for n in (1, 2, 3, f.dot_max_n, f.dot_max_n + 1, 40):
        x = rng.standard_normal((n, shape[1]), dtype=np.float32)
        mag = np.abs(x).astype(np.float64) @ np.abs(w).T
        got = f.qmatmul(data, shape, x)
        assert got.dtype == np.float32 and got.shape == (n, shape[0])
        assert (np.abs(got - x.astype(np.float64) @ w.T) <= 1e-6 * mag + 1e-30).all(), n
        kp = f.kernel_path("qmatmul", n)
        tiles = families.prefill_path() if per_thread else "blas-tiles"
        assert kp == ("dot1" if n == 1 else "dot" if n <= f.dot_max_n else tiles), kp
    got1 = f.qmatmul(data, shape, x[0])
    assert got1.shape == (shape[0],)
    np.testing.assert_allclose(got1, w @ x[0], rtol=0, atol=1e-6 * float((np.abs(w) @ np.abs(x[0])).max()))
    # a matrix too small for the pool (one range, on this thread) and a single row
    for small in ((1, 256), (3, 512)):
        d = f.quantize(rng.standard_normal(small, dtype=np.float32))
        ws = f.dequantize(d, small).astype(np.float64)
        for n in (1, 12):
            x = rng.standard_normal((n, small[1]), dtype=np.float32)
            np.testing.assert_allclose(f.qmatmul(d, small, x), x @ ws.T, rtol=1e-5, atol=1e-5)


# ---- quantize --------------------------------------------------------------------------------------


def tq_corpus():
    rng = np.random.default_rng(11)
    z = np.zeros((1, 256), np.float32)
    ties = np.tile(np.array([0.5, -0.5, 1.0, -1.0, 0.25, 0.0], np.float32), 43)[:256] * 3.0  # x/d on .5
    neg0 = np.where(np.arange(256) % 2, -0.0, 0.0).astype(np.float32)
    return {
        "normal": rng.standard_normal((8, 512)).astype(np.float32),
        "scaled": (rng.standard_normal((4, 256)) * 10.0 ** rng.uniform(-6, 4, (4, 1))).astype(np.float32),
        "ternary": (rng.integers(-1, 2, (4, 512)) * 0.37).astype(np.float32),
        # the kernel splits rows into ~16K-weight chunks: several of them, rows of different scales
        "many chunks": (rng.standard_normal((72, 1024)) * 10.0 ** rng.uniform(-8, 4, (72, 1))).astype(np.float32),
        "zeros": z, "ties": ties[None], "signed zeros": neg0[None],
        "near fp16 max": np.full((1, 256), 65519.0, np.float32) * np.sign(rng.standard_normal(256)).astype(np.float32),
    }


@pytest.mark.parametrize("tag", sorted(QUANTIZES))
def test_tq_quantize_is_ggufs(tag):
    f = fmt_of(tag)
    for what, w in tq_corpus().items():
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            want = gguf.quants.quantize(w, T[NAMES[tag]]).reshape(-1)
        np.testing.assert_array_equal(f.quantize(w), want, err_msg=what)
        assert np.isfinite(f.dequantize(want, w.shape)).all(), what


@pytest.mark.parametrize("tag", sorted(QUANTIZES))
def test_tq_scale_overflow_is_a_range_error(tag):
    f = fmt_of(tag)
    assert f.max_abs == 65520.0
    w = np.zeros((2, 512), np.float32)
    w[1, 300] = -65520.0
    with pytest.raises(RangeError, match=rf"{tag}: .*row 1, columns 256..511 .*65520"):
        f.quantize(w)
    w[1, 300] = np.nextafter(np.float32(-65520.0), np.float32(0))
    assert np.isfinite(f.dequantize(f.quantize(w), w.shape)).all()


@pytest.mark.parametrize("tag", sorted(set(TAGS) - QUANTIZES))
def test_no_quantizer_is_a_clear_error(tag):
    f = fmt_of(tag)
    name = NAMES[tag]
    with pytest.raises(QuantizerUnavailableError) as e:
        f.quantize(np.ones((2, 512), np.float32))
    assert isinstance(e.value, QuantfmtError) and isinstance(e.value, NotImplementedError)
    msg = str(e.value)
    assert msg.startswith(f"{tag} ({name}): ") and "llama-quantize" in msg
    needs_imatrix = name in ("IQ2_XXS", "IQ2_XS", "IQ1_S")
    assert ("needs an importance matrix, which quantfmt cannot compute yet" in msg) == needs_imatrix
    assert ("--imatrix" in msg) == (name in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ1_M"))
    with pytest.raises(QuantizerUnavailableError):
        QTensor.quantize(np.ones(256, np.float32), name)
    # bad input is still named as such first
    with pytest.raises(QuantfmtError, match="non-finite"):
        f.quantize(np.full((1, 512), np.nan, np.float32))


def test_requantizing_to_a_type_without_quantizer_fails_cleanly(tmp_path):
    src = tmp_path / "x.gguf"
    w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    write_sample(src, tensors={"blk.0.w": (w, T.F32)})
    res = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "y.safetensors"), "--rule", "*=IQ2_XXS"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "importance matrix" in res.stderr and "blk.0.w" in res.stderr


# ---- GGUF files ------------------------------------------------------------------------------------


def gguf_tensors():
    """name -> (bytes as GGUFWriter takes them: uint8 (rows, row bytes), ggml type), one per type."""
    out = {"blk.0.attn_norm.weight": (np.linspace(-1, 1, 512, dtype=np.float32), T.F32)}
    for tag in TAGS:
        shape = (3, 2, 512) if tag == "I3_S" else SHAPE  # one 3-D tensor
        data = sample_bytes(tag, shape, seed=7)
        out[f"blk.0.{NAMES[tag].lower()}.weight"] = (data.reshape(*shape[:-1], -1), T[NAMES[tag]])
    return out


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_gguf_inspect_convert_and_back_byte_identical(tmp_path):
    src, mid, back = tmp_path / "x.gguf", tmp_path / "y.safetensors", tmp_path / "z.gguf"
    tensors = gguf_tensors()
    write_sample(src, tensors=tensors)
    d = json.loads(run("inspect", src, "--json").stdout)
    seen = {t["name"]: t for t in d["tensors"]}
    ref = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    for tag in TAGS:
        name = f"blk.0.{NAMES[tag].lower()}.weight"
        shape = tuple(int(s) for s in reversed(ref[name].shape))
        assert seen[name]["tag"] == tag and tuple(seen[name]["shape"]) == shape
        assert seen[name]["bytes"] == ref[name].n_bytes == fmt_of(tag).nbytes(shape)
        assert seen[name]["bits_per_weight"] == pytest.approx(fmt_of(tag).bits_per_weight)
    run("convert", src, mid, "--rule", "*=keep")
    run("inspect", mid)
    run("convert", mid, back, "--rule", "*=keep")
    assert filecmp.cmp(src, back, shallow=False)
    # the GGUF's and the container's tensors decode as gguf decodes the original; so does `quantfmt dequantize`
    run("dequantize", mid, f32 := tmp_path / "f32.safetensors")
    with read_gguf(src) as m, quantfmt.open_model(mid) as c, quantfmt.open_model(f32) as d:
        for name, rt in ref.items():
            if rt.tensor_type == T.F32:
                continue
            want = bits(gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(m[name].shape))
            assert m[name].tag == c[name].tag == get_format(rt.tensor_type.name).tag and d[name].tag == "F32"
            for t in (m[name], c[name], d[name]):
                np.testing.assert_array_equal(bits(t.dequantize()), want)


def test_open_inspect_and_keep_convert_never_decode(tmp_path, monkeypatch):
    # Garbage bytes (fp16 scales of NaN) still open and convert: nothing is decoded until asked for.
    tensors = {name: (np.full_like(a, 0xFF) if q != T.F32 else a, q) for name, (a, q) in gguf_tensors().items()}
    src, mid = tmp_path / "x.gguf", tmp_path / "y.safetensors"
    write_sample(src, tensors=tensors)

    def boom(*a, **k):
        raise AssertionError("tensor data was decoded")

    monkeypatch.setattr(gguf.quants, "dequantize", boom)
    with read_gguf(src) as m:
        assert {m[n].tag for n in m} == set(TAGS) | {"F32"}
        assert all(m[n].data[:4].tolist() == [255] * 4 for n in m if m[n].tag != "F32")
    run("inspect", src)
    run("convert", src, mid, "--rule", "*=keep")
    monkeypatch.undo()
    with read_gguf(src) as m:
        name = "blk.0.iq2_xxs.weight"
        assert np.isnan(m[name].row(0)).all()  # decoded when asked: NaN scales give NaN, as in gguf


# ---- the conformance kit ----------------------------------------------------------------------------

# The kit's checks that need no quantize: a format without a quantizer can be run through
# these on bytes from example_bytes (the rest start from quantize).
DECODE_ONLY = ("geometry", "get_rows", "qmatmul[f32]", "byte_inputs", "empty", "error:shape", "error:bytes",
               "error:nonfinite", "error:dtype", "error:row_index", "error:mode")


@pytest.mark.parametrize("tag", sorted(set(TAGS) - QUANTIZES))
def test_kit_decode_only_checks_pass_on_example_bytes(tag):
    f = fmt_of(tag)
    kit = testing._Kit(f, 0, {})
    kit._data = f.example_bytes(kit.shape, kit.rng(0))
    plan = dict(testing._plan(f, sized=False))
    assert set(DECODE_ONLY) <= set(plan)
    for name in DECODE_ONLY:
        check = testing._run(name, functools.partial(plan[name], kit))
        assert check.ok, f"{tag}: {check}"
    # the kit itself runs exactly the checks that need no quantizer, on the format's example bytes
    report = testing.check_format(f)
    assert report.ok, str(report)
    assert {c.name for c in report} == {n.replace("{mode}", "f32") for n in testing.DECODE_ONLY}


@pytest.mark.parametrize("tag", sorted(QUANTIZES))
def test_kit_on_ternary_formats(tag):
    # Ternary weights with d = max |w| lose ~0.81 of an N(0,1) block's RMS, past the kit's
    # generic 0.75 bound (meant for formats made for N(0,1)-like weights): the formats declare
    # max_rel_rmse = 0.85 and the kit holds them to that; on ternary weights the round trip is exact.
    report = testing.check_format(tag)
    assert report.ok, str(report)
    assert "roundtrip" in {c.name for c in report} and fmt_of(tag).max_rel_rmse == 0.85
    f = fmt_of(tag)
    w = (np.random.default_rng(2).integers(-1, 2, (4, 512)) * 0.375).astype(np.float32)
    w[:, ::256] = 0.375  # every block reaches its scale
    np.testing.assert_array_equal(f.dequantize(f.quantize(w), w.shape), w)


# ---- ggml's C reference (opt-in: needs quantfmt.oracle, from the oracle branch, and a C compiler) -------


@pytest.mark.oracle
@pytest.mark.parametrize("tag", TAGS)
def test_against_ggml_reference(tag):
    oracle = pytest.importorskip("quantfmt.oracle")
    o = oracle.load()
    f, name = fmt_of(tag), NAMES[tag]
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 512)).astype(np.float32)
    imatrix = (2.0 ** rng.integers(-2, 3, 512)).astype(np.float32) if o.requires_imatrix(name) else None
    for data in (o.quantize(name, w, imatrix).reshape(-1), rng.integers(0, 256, f.nbytes(w.shape), dtype=np.uint8)):
        with np.errstate(all="ignore"):
            got = f.dequantize(data, w.shape)
        want = o.dequantize(name, data, w.shape)
        same = (bits(got) == bits(want)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), f"{tag}: {int((~same).sum())} values differ from ggml's to_float"
    if tag in QUANTIZES:
        for what, x in tq_corpus().items():
            np.testing.assert_array_equal(f.quantize(x), o.quantize(name, x).reshape(-1), err_msg=what)
