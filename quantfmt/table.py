"""Plain tables, the one renderer the CLI and the benchmark share (stdlib only, cheap to import).

    render(["tag", "bpw"], [["Q4_0", 4.5]], right={1})   -> lines: header, dashed rule, rows
    markdown(["tag", "bpw"], [["Q4_0", 4.5]], right={1})  -> lines of a GitHub markdown table
Columns are separated by two spaces; `right` holds the indexes of right-aligned columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def render(headers: Sequence[str], rows: Iterable[Sequence], right: Iterable[int] = ()) -> list[str]:
    right = set(right)
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(r):
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        return "  ".join(padded).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]


def markdown(headers: Sequence[str], rows: Iterable[Sequence], right: Iterable[int] = ()) -> list[str]:
    right = set(right)
    rule = ["---:" if i in right else "---" for i in range(len(headers))]
    return ["| " + " | ".join(r) + " |" for r in [list(headers), rule, *([str(c) for c in r] for r in rows)]]
