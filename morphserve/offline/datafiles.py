"""The data `prepare` and `replay` use by default, shipped inside the package so a plain
(non-editable) install works from any directory: WikiText-2 (CC BY-SA 3.0) for
calibration and perplexity, and the Azure LLM inference trace 2023 (CC BY 4.0), code and
conversation. See morphserve/offline/data/NOTICE. `MORPHSERVE_SHARED=DIR` points at another copy
laid out as DIR/data/wikitext-2/{valid,test}.txt and DIR/traces/*.csv.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "data"


def _override() -> Path | None:
    value = os.environ.get("MORPHSERVE_SHARED")
    return Path(value) if value else None


def wikitext(split: str) -> Path:
    """WikiText-2 `valid` (calibration) or `test` (perplexity)."""
    root = _override()
    return (root / "data" / "wikitext-2" if root else PACKAGED / "wikitext-2") / f"{split}.txt"


def traces_dir() -> Path:
    root = _override()
    return root / "traces" if root else PACKAGED / "traces"
