"""Thin wrapper kept for old commands: `python scripts/evaluate.py SUITE.yaml --model M --pack P --out DIR`
is `morphserve evaluate` (see `morphserve evaluate --help`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from morphserve.cli.commands import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
