"""formats.md and the registry stay in step: every built-in tag has a section whose header line is true."""

import re
from pathlib import Path

from quantfmt import plugins

DOC = Path(__file__).resolve().parent.parent / "formats.md"
HEADER = re.compile(
    r"^tag (?P<tag>[A-Z0-9_]{1,4}) · layout version (?P<ver>\d+) · block (?P<br>\d+)x(?P<bc>\d+) · "
    r"(?P<bytes>\d+) bytes per block · (?P<bpw>[\d.]+) bits per weight$",
    re.M,
)


def test_every_builtin_format_is_specified_truthfully():
    text = DOC.read_text()
    sections = set(re.findall(r"^## `([A-Z0-9_]{1,4})`$", text, re.M))
    headers = {m["tag"]: m for m in HEADER.finditer(text)}
    builtin = {t: f for t, f in plugins.formats().items() if f.plugin.startswith("quantfmt_formats.")}
    assert set(builtin) <= sections, f"formats.md lacks sections for {set(builtin) - sections}"
    assert sections <= set(builtin), f"formats.md specifies unregistered tags {sections - set(builtin)}"
    for tag, fmt in builtin.items():
        m = headers.get(tag)
        assert m, f"formats.md: section {tag} has no header line"
        assert int(m["ver"]) == fmt.layout_version, tag
        assert (int(m["br"]), int(m["bc"])) == tuple(fmt.block_shape), tag
        assert int(m["bytes"]) == fmt.block_bytes, tag
        assert abs(float(m["bpw"]) - fmt.bits_per_weight) < 1e-9, tag
