"""The conformance kit (quantfmt.testing, `quantfmt check`): every built-in format passes it,
a correct toy format with an unusual block passes it, and deliberately broken formats FAIL it;
parametrize_with_checks gives one pytest item per check."""

import json
import re
import textwrap
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from quantfmt import plugins, testing
from quantfmt.cli import cli
from quantfmt.errors import RangeError
from quantfmt.format import Format
from quantfmt.testing import Q8_TOL, assert_conforms, check_format, parametrize_with_checks, small_shape

pytest_plugins = ["pytester"]

# Every built-in format, those without a quantizer included (the kit runs its decode-only checks
# on their example bytes).
BUILTINS = sorted(t for t, f in plugins.formats().items() if f.plugin.startswith("quantfmt_formats."))


@parametrize_with_checks(BUILTINS)
def test_builtin_format_conforms(fmt, check):
    check(fmt)


def _items(fmt_or_formats, seed=0):
    """{pytest id: (fmt, check)} as parametrize_with_checks generates them."""
    mark = parametrize_with_checks(fmt_or_formats, seed=seed)
    assert mark.args[0] == ("fmt", "check")
    return {p.id: p.values for p in mark.args[1]}


def test_builtin_items_cover_every_check_and_mode():
    ids = _items(BUILTINS)
    for tag in BUILTINS:
        fmt = plugins.get_format(tag)
        want = ["geometry", "get_rows", *(f"qmatmul[{m}]" for m in fmt.modes), "error:mode"]
        if fmt.can_quantize:
            want += ["roundtrip", "range"]
        assert all(f"{tag}-{name}" in ids for name in want), tag
        assert ids[f"{tag}-geometry"][0] is fmt
    assert "Q4_0-qmatmul[q8_0]" in ids and "Q4_0-qmatmul[f32]" in ids and "F32-qmatmul[q8_0]" not in ids


def test_items_are_the_report_in_order():
    report = check_format("Q4_0", seed=5)
    items = _items("Q4_0", seed=5)
    assert list(items) == [f"Q4_0-{c.name}" for c in report]
    fmt, check = items["Q4_0-roundtrip"]
    assert check(fmt).detail == report.get("roundtrip").detail  # same seed, same matrix


PLUGIN_AUTHOR_TESTS = """
import numpy as np
from quantfmt.testing import parametrize_with_checks
from quantfmt_formats.plain import F32

class OffByOne(F32):
    tag = "OB1"

    def _get_rows(self, data, rows, cols, idx):
        return super()._get_rows(data, rows, cols, np.minimum(idx + 1, rows - 1))

@parametrize_with_checks(["F32", OffByOne, "NOPE"])
def test_conformance(fmt, check):
    check(fmt)

def test_unrelated():
    pass
"""


def test_parametrize_with_checks_one_item_per_check(pytester):
    """A plugin author's pytest: one item per format and check; a broken check fails only its own
    item, with its own message; a tag no plugin provides fails one item, not the collection."""
    pytester.makepyfile(test_plugin=PLUGIN_AUTHOR_TESTS)
    result = pytester.runpytest("-q", "-rf", "-p", "no:cacheprovider")
    ns = {}
    exec(compile(PLUGIN_AUTHOR_TESTS, "plugin_tests", "exec"), ns)
    broken = check_format(ns["OffByOne"])
    n_checks = len(check_format("F32"))
    assert len(broken) == n_checks and 0 < len(broken.failures) < n_checks
    want_failed = {f"OB1-{c.name}" for c in broken.failures} | {"NOPE-load"}
    result.assert_outcomes(passed=2 * n_checks - len(want_failed) + 2, failed=len(want_failed))
    # the summary line is "FAILED path::test[id] - message" where the message may hold brackets, and is cut
    # at the terminal's width (CI's differs from ours), so the id ends at the first "] - " or at the line's end
    item = re.compile(r"FAILED \S+?::test_conformance\[(.+?)\](?: - |$)")
    failed = {m.group(1) for ln in result.outlines if (m := item.match(ln))}
    assert failed == want_failed
    out = result.stdout.str()
    assert "OB1 (" in out and "fails conformance check get_rows: get_rows(" in out
    assert "format 'NOPE' could not be loaded" in out and "unknown format tag 'NOPE'" in out
    assert "test_plugin.py::test_conformance[F32-qmatmul[f32]] PASSED" in pytester.runpytest(
        "-v", "-p", "no:cacheprovider", "-k", "F32"
    ).stdout.str()


def test_parametrize_with_checks_quantizes_the_shared_matrix_once():
    calls = []

    class Counting(Toy):
        tag = "CNT"

        def _quantize(self, w):
            calls.append(w.shape)
            return super()._quantize(w)

    check_format(Counting)
    in_report = len(calls)
    calls.clear()
    items = [*_items(Counting, seed=0).values(), *_items(Counting, seed=1).values()]  # two kits
    for fmt, check in items:
        check(fmt)
    assert len(calls) == 2 * in_report  # each check once, the shared matrix quantized once per kit
    calls.clear()
    for fmt, check in items:  # again (as a second decorated test of the same formats): kits reused
        check(fmt)
    assert len(calls) == 2 * (in_report - 1)


def test_parametrize_with_checks_rejects_other_things():
    with pytest.raises(TypeError):
        parametrize_with_checks([42])


# ---- toy formats: symmetric int8 with a float32 scale, in plain numpy -------------------


def _q8_activations(x):
    """ggml's Q8_0 on activations, per 32 values: d = amax/127 stored as fp16, q = round(x/d)."""
    b = x.reshape(x.shape[0], -1, 32)
    d = np.abs(b).max(axis=2, keepdims=True) / np.float32(127)
    inv = np.divide(1, d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(b * inv)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


class Toy(Format):
    """Blocks of 2 rows x 4 columns: a float32 scale then 8 int8 (row-major in the block)."""

    tag = "TOY"
    block_shape = (2, 4)
    block_bytes = 12
    summary = "test toy"

    def _blocks(self, w):
        rows, cols = w.shape
        br, bc = self.block_shape
        return w.reshape(rows // br, br, cols // bc, bc).transpose(0, 2, 1, 3).reshape(-1, br * bc)

    def _quantize(self, w):
        b = self._blocks(w)
        d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
        # divide by d, not multiply by 1/d: for a subnormal d (max |w| ~1e-40), 1/d is inf
        q = np.divide(b, d[:, None], out=np.zeros_like(b), where=d[:, None] > 0)
        q = np.clip(np.rint(q), -127, 127).astype(np.int8)
        out = np.empty((b.shape[0], self.block_bytes), np.uint8)
        out[:, :4] = d.astype("<f4").view(np.uint8).reshape(-1, 4)
        out[:, 4:] = q.view(np.uint8)
        return out.reshape(-1)

    def _dequantize(self, data, rows, cols):
        br, bc = self.block_shape
        blk = data.reshape(-1, self.block_bytes)
        d = blk[:, :4].copy().view("<f4").reshape(-1)
        b = blk[:, 4:].view(np.int8).astype(np.float32) * d[:, None]
        return np.ascontiguousarray(
            b.reshape(rows // br, cols // bc, br, bc).transpose(0, 2, 1, 3).reshape(rows, cols)
        )


class ToyQ8(Toy):
    """Blocks of 1x32, with a real q8_0 mode (activations quantized like ggml's Q8_0)."""

    tag = "TOYQ"
    block_shape = (1, 32)
    block_bytes = 36
    modes = ("f32", "q8_0")

    def _qmatmul(self, data, rows, cols, x, mode):
        if mode == "q8_0":
            x = _q8_activations(x)
        return x @ self._dequantize(data, rows, cols).T


def test_correct_toys_conform():
    for fmt in (Toy, ToyQ8):
        report = assert_conforms(fmt)
        assert report.tag == fmt.tag
    # the q8_0 mode really moves results, yet stays within the kit's documented bound
    assert 1e-4 < float(check_format(ToyQ8).get("qmatmul[q8_0]").detail.split()[2]) < Q8_TOL


def test_module_docstring_lists_every_check_in_order():
    rows = re.findall(r"^  (\S+) {2,}", testing.__doc__, re.M)
    listed = []
    for c in check_format(ToyQ8, size=(8, 64)):
        name = re.sub(r"\[.*\]$", "[MODE]", re.sub(r"^error:.*", "error:*", c.name))
        if name.endswith("_size"):
            assert f"{name}: at `size`" in testing.__doc__
        elif name not in listed:
            listed.append(name)
    assert rows == listed


def test_small_shape_fits_blocks_with_remainders():
    for br, bc in [(1, 1), (2, 4), (1, 32), (128, 1), (4, 256)]:
        fmt = type("G", (Toy,), {"block_shape": (br, bc)})()
        rows, cols = small_shape(fmt)
        assert rows % br == 0 and cols % bc == 0
        assert (rows // br) % 2 == 1 and rows // br >= 3 and (cols // bc) % 2 == 1 and cols // bc >= 3


def test_size_figure_rounds_up_to_blocks():
    report = check_format(Toy, size=(7, 10))
    assert report.ok
    assert report.metrics["size_shape"] == [8, 12]
    assert 0 < report.metrics["size_rel_rmse"] < 0.02  # int8: ~0.5/127 of the block max


def test_own_max_rel_rmse_is_enforced():
    strict = type("Strict", (Toy,), {"max_rel_rmse": 1e-4})
    report = check_format(strict)
    assert not report.ok and [c.name for c in report.failures] == ["roundtrip"]
    assert "exceeds 0.0001" in report.get("roundtrip").detail


# ---- broken formats: the kit must catch each ----------------------------------------------


class RowsOffByOne(Toy):
    def _get_rows(self, data, rows, cols, idx):
        return self._dequantize(data, rows, cols)[np.minimum(idx + 1, rows - 1)]


class QmatmulDropsLastColumn(Toy):
    def _qmatmul(self, data, rows, cols, x, mode):
        w = self._dequantize(data, rows, cols)
        return x[:, :-1] @ w[:, :-1].T


class Q8MixesActivationRows(ToyQ8):
    def _qmatmul(self, data, rows, cols, x, mode):
        y = super()._qmatmul(data, rows, cols, x, mode)
        return y[::-1].copy() if mode == "q8_0" else y


class WrongOnBigMatrices(Toy):
    def _get_rows(self, data, rows, cols, idx):
        out = super()._get_rows(data, rows, cols, idx)
        if rows * cols > 20000:  # a "fast path" for big tensors that is off by a sign
            out[:, 0] *= -1
        return out


class NonDeterministic(Toy):
    _calls = 0

    def _quantize(self, w):
        NonDeterministic._calls += 1
        out = super()._quantize(w)
        out[0] ^= NonDeterministic._calls & 1  # the last bit of the first scale flips every call
        return out


class OneByteTooMany(Toy):
    def _quantize(self, w):
        return np.append(super()._quantize(w), np.uint8(0))


class WrongBlockBytes(Toy):
    block_bytes = 13  # declares 13, writes 12: nbytes and quantize disagree


class AcceptsBadShapes(Toy):
    def matrix_shape(self, shape):
        dims = tuple(int(d) for d in shape) or (1,)
        rows = int(np.prod(dims[:-1])) if len(dims) > 1 else 1
        return rows - rows % 2, dims[-1] - dims[-1] % 4  # silently drops the ragged edge


class NaNOnZeroBlocks(Toy):
    def _quantize(self, w):
        b = self._blocks(w)
        d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
        q = np.clip(np.rint(b / d[:, None]), -127, 127)  # 0/0 -> NaN -> int8 garbage
        q = np.nan_to_num(q, nan=-128).astype(np.int8)
        d = np.where(d > 0, d, np.float32(np.nan))
        out = np.empty((b.shape[0], self.block_bytes), np.uint8)
        out[:, :4] = d.astype("<f4").view(np.uint8).reshape(-1, 4)
        out[:, 4:] = q.view(np.uint8)
        return out.reshape(-1)


class Warns(Toy):
    def _dequantize(self, data, rows, cols):
        warnings.warn("scale underflow", RuntimeWarning, stacklevel=1)
        return super()._dequantize(data, rows, cols)


class ChangesInput(Toy):
    def _quantize(self, w):
        w *= 1  # harmless
        w[0, 0] = 0  # but this writes into the caller's array
        return super()._quantize(w)


class Float64Direct(Toy):
    def quantize(self, w):
        w = np.asarray(w)
        if w.dtype == np.float64:  # quantizes float64 values without going through float32
            return super().quantize(np.round(w, 2))
        return super().quantize(w)


class WrongErrorType(Toy):
    def get_rows(self, data, shape, indices):
        rows, _ = self.matrix_shape(shape)
        if max(indices, default=0) >= rows:
            raise IndexError("row out of range")
        return super().get_rows(data, shape, indices)


class UndeclaredModeRuns(Toy):
    def qmatmul(self, data, shape, x, mode=None, *, prepared=None):
        return super().qmatmul(data, shape, x, "f32", prepared=prepared)  # ignores the mode asked for


class TooLossy(Toy):
    def _quantize(self, w):
        return super()._quantize(np.sign(w) * np.float32(0.1))


class ScalesInFloat16Subnormal(Toy):
    """Stores nothing usable for tiny weights: dequantizes 1e-6 weights to inf."""

    def _dequantize(self, data, rows, cols):
        out = super()._dequantize(data, rows, cols)
        tiny = (np.abs(out) < 1e-3) & (out != 0)
        return np.where(tiny, np.float32(np.inf), out).astype(np.float32)


class Fp16Scale(Toy):
    """Blocks of 2x4: the block's max |w| as an fp16 scale, then 8 int8 of 127 * w / max |w|.
    fp16 holds at most 65504 and rounds 65520 up to infinity: such blocks are a RangeError."""

    tag = "TF16"
    block_bytes = 10
    max_abs = 65520.0
    refuse = True  # raise RangeError where the scale would be fp16 infinity
    clamp = False  # store such a scale as 65504 instead
    message = "{tag}: a block's max |w| reaches 65520, beyond fp16"

    def _quantize(self, w):
        b = self._blocks(w)
        amax = np.abs(b).max(axis=1)
        d = (np.minimum(amax, 65504) if self.clamp else amax).astype(np.float16)
        if self.refuse and not np.isfinite(d).all():
            raise RangeError(self.message.format(tag=self.tag))
        d32 = d.astype(np.float32)[:, None]
        q = np.divide(b * np.float32(127), d32, out=np.zeros_like(b), where=d32 > 0)
        out = np.empty((b.shape[0], self.block_bytes), np.uint8)
        out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
        out[:, 2:] = np.clip(np.rint(q), -127, 127).astype(np.int8).view(np.uint8)
        return out.reshape(-1)

    def _dequantize(self, data, rows, cols):
        br, bc = self.block_shape
        blk = data.reshape(-1, self.block_bytes)
        d = blk[:, :2].copy().view("<f2").astype(np.float32) / np.float32(127)
        b = blk[:, 2:].view(np.int8).astype(np.float32) * d
        return np.ascontiguousarray(
            b.reshape(rows // br, cols // bc, br, bc).transpose(0, 2, 1, 3).reshape(rows, cols)
        )


class Fp16ScaleOverflows(Fp16Scale):
    """The plugin bug the range check was added for: a scale of 65520 or more is stored as fp16
    infinity without a word, and its weights dequantize to inf and NaN."""

    max_abs = None
    refuse = False


class Fp16ScaleClamps(Fp16ScaleOverflows):
    """Clamps the scale to fp16's largest instead: finite, but far from the weights."""

    clamp = True


class Fp16ScaleClaimsTooMuch(Fp16Scale):
    max_abs = 1e5  # but refuses 65520 and up


class Fp16ScaleClaimsTooLittle(Fp16Scale):
    max_abs = 60000.0  # but accepts up to 65519.99


class Fp16ScaleUnnamedRangeError(Fp16Scale):
    message = "scale overflow"  # does not say which format


@parametrize_with_checks([Fp16Scale])
def test_fp16_scale_toy_conforms(fmt, check):
    check(fmt)


def _run_check(fmt, name):
    """One check of the kit on fmt, through parametrize_with_checks: its Check, or AssertionError."""
    fmt, check = _items(fmt)[f"{getattr(fmt, 'tag', fmt)}-{name}"]
    return check(fmt)


# What the built-in formats refuse (a block's scale or min overflowing fp16; BF16 rounding to
# infinity): declared as max_abs, the range check holds them to it, to the last float32.
BF16_LIMIT = float(np.array([0x7F7F8000], np.uint32).view(np.float32)[0])  # halfway to bf16's inf
LIMITS = {"F16": 65520.0, "BF16": BF16_LIMIT, "Q4_0": 65520.0 * 8, "Q4_1": 65520.0, "Q8_0": 65520.0 * 127}


@pytest.mark.parametrize("tag", sorted(LIMITS))
def test_range_check_holds_builtins_to_their_limits(tag):
    cls = type(plugins.get_format(tag))
    ok = _run_check(type(tag, (cls,), {"max_abs": LIMITS[tag]})(), "range")
    assert f"declared max_abs {LIMITS[tag]:.9g}" in ok.detail
    for off, says in ((1 + 1e-6, "refused below the declared"), (1 - 1e-6, "quantized without RangeError")):
        wrong = type(tag, (cls,), {"max_abs": LIMITS[tag] * off})()
        with pytest.raises(AssertionError, match=says):
            _run_check(wrong, "range")


@pytest.mark.parametrize("tag", ["F32", "Q8_A", "Q4_A"])
def test_range_formats_with_float32_scales_refuse_nothing(tag):
    detail = _run_check(tag, "range").detail
    assert "refused (RangeError) none" in detail and "3e+38" in detail


BROKEN = [
    (RowsOffByOne, {"get_rows"}),
    (QmatmulDropsLastColumn, {"qmatmul[f32]"}),
    (Q8MixesActivationRows, {"qmatmul[q8_0]"}),
    (WrongOnBigMatrices, {"kernels_medium"}),
    (NonDeterministic, {"determinism"}),
    (OneByteTooMany, {"geometry", "roundtrip", "error:bytes"}),
    (WrongBlockBytes, {"geometry", "roundtrip"}),
    (AcceptsBadShapes, {"error:shape"}),
    (NaNOnZeroBlocks, {"zeros"}),
    (Warns, {"roundtrip", "get_rows", "zeros"}),
    (ChangesInput, {"determinism"}),
    (Float64Direct, {"input_layouts"}),
    (WrongErrorType, {"error:row_index"}),
    (UndeclaredModeRuns, {"error:mode"}),
    (TooLossy, {"roundtrip", "constant"}),
    (ScalesInFloat16Subnormal, {"magnitudes"}),
    (Fp16ScaleOverflows, {"range"}),
    (Fp16ScaleClamps, {"range"}),
    (Fp16ScaleClaimsTooMuch, {"range"}),
    (Fp16ScaleClaimsTooLittle, {"range"}),
    (Fp16ScaleUnnamedRangeError, {"range"}),
]


@pytest.mark.parametrize("broken,expected", BROKEN, ids=[b.__name__ for b, _ in BROKEN])
def test_kit_catches_broken_format(broken, expected):
    report = check_format(broken)
    failed = {c.name for c in report.failures}
    assert not report.ok
    assert expected <= failed, f"expected {expected} among the failures, got:\n{report}"
    with pytest.raises(AssertionError) as e:
        assert_conforms(broken)
    for name in failed:  # the message lists every failure, not just the first
        assert f"  {name}: " in str(e.value)


def test_warning_detail_names_the_warning():
    detail = check_format(Warns).get("roundtrip").detail
    assert "RuntimeWarning: scale underflow" in detail


def test_crashing_format_is_a_failed_check_not_a_crash():
    class Crashes(Toy):
        def _dequantize(self, data, rows, cols):
            raise ZeroDivisionError("oops")

    report = check_format(Crashes)
    assert "raised ZeroDivisionError: oops" in report.get("roundtrip").detail
    assert report.get("error:dtype").ok  # the checks that do not dequantize still run


def test_resolve_rejects_other_things():
    with pytest.raises(TypeError):
        check_format(42)


# ---- the CLI ----------------------------------------------------------------------------------

BROKEN_PLUGIN = """
import numpy as np
import quantfmt
from quantfmt_formats.plain import F32

class OffByOne(F32):
    tag = "OB1"

    def _get_rows(self, data, rows, cols, idx):
        return super()._get_rows(data, rows, cols, np.minimum(idx + 1, rows - 1))

@quantfmt.hookimpl
def register_formats(register):
    register(OffByOne())
"""


def test_cli_check_table_and_json(fresh_registry):
    res = CliRunner().invoke(cli, ["check-format", "F32", "BF16", "--size", "64x96"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["tag", "bpw", "rmse", "rel_rmse"]
    row = next(ln.split() for ln in lines if ln.startswith("BF16"))
    assert row[1] == "16" and row[4] == "64x96" and row[6] == "ok" and 1e-3 < float(row[3]) < 3e-3
    res = CliRunner().invoke(cli, ["check-format", "F16", "--json"])
    assert res.exit_code == 0, res.output
    (rep,) = json.loads(res.stdout)
    assert rep["tag"] == "F16" and rep["ok"] and rep["bits_per_weight"] == 16
    assert {c["name"] for c in rep["checks"]} >= {"get_rows", "qmatmul[f32]", "error:shape"}


def test_cli_check_verbose_lists_every_check(fresh_registry):
    res = CliRunner().invoke(cli, ["check-format", "-v", "F16"])
    assert res.exit_code == 0, res.output
    listed = [ln.split()[1].rstrip(":") for ln in res.stdout.splitlines() if ln.startswith("  PASS")]
    assert listed == [c.name for c in check_format("F16")]


def test_cli_check_all_covers_every_format(fresh_registry, monkeypatch):
    # Every format's checks run in test_builtin_format_conforms; here only which formats --all
    # picks and how the CLI passes --seed and --size on (a stub Report per format).
    seen = []

    def fake_check(fmt, *, seed, size):
        seen.append((fmt.tag, seed, size))
        report = testing.Report(fmt)
        report.append(testing.Check("stub", fmt.tag != "F16", "stubbed"))
        return report

    monkeypatch.setattr(testing, "check_format", fake_check)
    res = CliRunner().invoke(cli, ["check-format", "--all", "--json", "--seed", "3", "--size", "8x64"])
    assert res.exit_code == 1, res.output
    assert [r["tag"] for r in json.loads(res.stdout)] == list(plugins.formats())
    assert seen == [(t, 3, (8, 64)) for t in plugins.formats()]
    assert "1 of" in res.stderr and ": F16" in res.stderr


def test_cli_check_errors(fresh_registry):
    res = CliRunner().invoke(cli, ["check-format", "F32", "NOPE"])
    assert res.exit_code == 1 and res.stderr.startswith("Error: unknown format tag 'NOPE'")
    assert "Traceback" not in res.output
    for args in (["check-format"], ["check-format", "--all", "F32"], ["check-format", "F32", "--size", "4096"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and "Error:" in res.stderr, args


def test_cli_check_fails_broken_plugin(tmp_path, fresh_registry):
    (tmp_path / "ob1.py").write_text(textwrap.dedent(BROKEN_PLUGIN))
    res = CliRunner().invoke(cli, ["--plugins-dir", str(tmp_path), "check-format", "F32", "OB1"])
    assert res.exit_code == 1, res.output
    row = next(ln.split() for ln in res.stdout.splitlines() if ln.startswith("OB1"))
    assert "FAIL" in row and "ob1" in row
    assert "FAIL  get_rows:" in res.stdout
    assert "1 of 2 formats fail the conformance kit: OB1" in res.stderr


def test_readme_plugin_example_conforms(tmp_path, fresh_registry):
    """The minimal plugin in the README section 'Writing a format plugin' runs and passes the kit."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Writing a format plugin", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(code) == 2 and "register_formats" in code[0] and "assert_conforms" in code[1]
    (tmp_path / "my_format.py").write_text(code[0])
    fresh_registry.configure(plugins_dirs=[tmp_path], strict=True)
    tag = re.search(r'tag = "(\w+)"', code[0]).group(1)
    assert fresh_registry.get_format(tag).plugin == "my_format"
    assert_conforms(tag)
