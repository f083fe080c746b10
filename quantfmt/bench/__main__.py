"""`python -m quantfmt.bench RECORDS.jsonl [--markdown]`: re-print a saved run's tables (or its Markdown summary)."""

from __future__ import annotations

import argparse
import json

from .report import markdown, tables


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m quantfmt.bench", description=__doc__.split(":", 1)[1].strip())
    ap.add_argument("records", help="a file of JSON records, one a line (quantfmt bench --records FILE)")
    ap.add_argument("--markdown", action="store_true", help="print the compact Markdown summary instead")
    args = ap.parse_args(argv)
    with open(args.records) as f:
        recs = [json.loads(line) for line in f if line.startswith("{")]
    if args.markdown:
        print(markdown(recs))
    else:
        tables(recs)


if __name__ == "__main__":  # pragma: no cover
    main()
