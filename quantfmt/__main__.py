"""`python -m quantfmt` runs the CLI."""

from .cli import main

main()
