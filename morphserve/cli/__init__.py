"""The `morphserve` command: prepare, serve, replay, evaluate, policy (see main.py)."""

from morphserve.cli.commands import main

__all__ = ["main"]
