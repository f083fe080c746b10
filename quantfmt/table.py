"""Tables for people: the one renderer behind the CLI's listings and the benchmark report.

Owns turning rows of cells into lines, as aligned plain text (two spaces between columns, a dashed
rule under the header, chosen columns right-aligned, trailing spaces stripped) or as a Markdown table.
Standard library only: the CLI imports it on paths that must not load numpy.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def _cells(rows: Iterable[Sequence[object]]) -> list[list[str]]:
    return [[str(c) for c in row] for row in rows]


def text_lines(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Collection[int] = ()) -> list[str]:
    """The table as plain-text lines; `right` holds the indexes of right-aligned columns."""
    cells = _cells(rows)
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        # the last column is left-aligned padding in most tables: strip it so lines carry no trailing blanks
        return "  ".join(padded).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in cells)]


def markdown_lines(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Collection[int] = ()) -> list[str]:
    """The table as Markdown (GitHub) lines; `right` columns get a right-aligned `---:` rule."""

    def line(row: Sequence[str]) -> str:
        # a literal "|" would end the cell early
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"
    return [line(list(headers)), rule, *(line(row) for row in _cells(rows))]
