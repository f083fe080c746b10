"""The registry: built-in discovery, plugin dirs, duplicate tags, broken plugins, strict mode, CLI listing."""

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
from click.testing import CliRunner

from quantfmt import plugins
from quantfmt.cli import cli
from quantfmt.errors import PluginError, UnknownFormatError

DUP = """
import quantfmt
from quantfmt_formats.plain import F32

class Again(F32):
    summary = "a second F32"

@quantfmt.hookimpl
def register_formats(register):
    register(Again())
"""

GOOD = """
import quantfmt
from quantfmt_formats.plain import F32

class Z32(F32):
    tag = "Z32"

@quantfmt.hookimpl
def register_formats(register):
    register(Z32())
"""

BROKEN = "raise RuntimeError('boom at import')\n"
BADTAG = GOOD.replace('tag = "Z32"', 'tag = "toolong"')


def _dir(tmp_path, **files):
    for name, src in files.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(src))
    return tmp_path


def test_builtins_registered():
    tags = set(plugins.formats())
    assert {"F32", "F16", "BF16"} <= tags
    for fmt in plugins.formats().values():
        assert fmt.plugin.startswith("quantfmt_formats.")


def test_unknown_tag_lists_known():
    with pytest.raises(UnknownFormatError, match="unknown format tag 'NOPE'.*F32"):
        plugins.get_format("NOPE")


def test_plugins_dir_adds_format(tmp_path, fresh_registry):
    plugins.configure(plugins_dirs=[_dir(tmp_path, good=GOOD)])
    assert plugins.get_format("Z32").plugin == "good"


def test_duplicate_tag_warns_naming_both(tmp_path, fresh_registry):
    plugins.configure(plugins_dirs=[_dir(tmp_path, dup=DUP)])
    both = r"'F32' from plugin 'dup' is already registered by plugin 'quantfmt_formats.plain'"
    with pytest.warns(plugins.PluginWarning, match=both):
        fmts = plugins.formats()
    assert fmts["F32"].summary != "a second F32"


@pytest.mark.parametrize("src", [BROKEN, BADTAG, DUP])
def test_broken_plugin_is_warning_then_strict_error(tmp_path, fresh_registry, src):
    d = _dir(tmp_path, bad=src, good=GOOD)
    plugins.configure(plugins_dirs=[d])
    with pytest.warns(plugins.PluginWarning):
        fmts = plugins.formats()
    assert "Z32" in fmts and "F16" in fmts  # the rest still loads
    plugins.configure(plugins_dirs=[d], strict=True)
    with pytest.raises(PluginError, match="strict"):
        plugins.formats()


def test_cli_formats_json_and_warning(tmp_path):
    d = _dir(tmp_path, bad=BROKEN)
    res = CliRunner().invoke(cli, ["--plugins-dir", str(d), "formats", "--json"])
    assert res.exit_code == 0, res.output
    tags = [f["tag"] for f in json.loads(res.stdout)]
    assert {"F32", "F16", "BF16"} <= set(tags)
    assert "Warning: plugin 'bad'" in res.stderr and "boom at import" in res.stderr
    res = CliRunner().invoke(cli, ["--plugins-dir", str(d), "--strict-plugins", "plugins"])
    assert res.exit_code == 1 and "Error:" in res.stderr and "Traceback" not in res.output
    plugins.configure()


def test_help_does_not_import_numba():
    code = (
        "import sys; from quantfmt.cli import cli; cli(['--help'], standalone_mode=False); "
        "print('numba' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False False"), out


def test_register_rejects_non_format(tmp_path, fresh_registry):
    src = "import quantfmt\n@quantfmt.hookimpl\ndef register_formats(register):\n    register(object())\n"
    plugins.configure(plugins_dirs=[_dir(tmp_path, obj=src)], strict=True)
    with warnings.catch_warnings(), pytest.raises(PluginError, match="not a quantfmt.format.Format"):
        plugins.formats()
