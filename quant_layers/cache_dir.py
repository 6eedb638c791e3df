"""Where MorphServe keeps what it computes once: the converted default model, verified
weight hashes, kernel-layout twins. In this room because the weights side writes most of
it and must not import the application package."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`MORPHSERVE_CACHE`; else `.cache/` at the repository root (where the Makefile puts
    it) when running from a checkout; else the user's cache folder (an installed package
    must not write into site-packages)."""
    env = os.environ.get("MORPHSERVE_CACHE")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent  # quant_layers/ sits at the checkout's root
    if (checkout / "pyproject.toml").exists():
        return checkout / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "morphserve"
