"""`python -m quantfmt.cli` (the benchmark re-runs itself this way in a child process)."""

from . import main

main()
