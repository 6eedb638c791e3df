"""One engine's step with and without transparent huge pages: the same cells as
scripts/bench_same_rung.py (decode at batch 1, 8 and 32; prefill of 8 x 512 tokens), each in a
fresh child process started once with the environment `morphserve serve --huge-pages auto`
gives (morphserve.runtime.huge_pages) and once without it, alternated for `--rounds` rounds
so drift of a shared machine lands on both.

    python scripts/bench_huge_pages.py --model MODEL_DIR --pack PACK_DIR --engine static [--rounds 3]

`--engine static`: plain vLLM serving the pack's static W8A8 checkpoint; `morph`: MorphServe
held at all-W8A8. Prints each cell's median [range] per side and the ratio of the medians
(huge / 4 KiB); `--out` also writes every child's figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.harness.children import run_measurement  # noqa: E402
from morphserve.runtime import huge_pages  # noqa: E402
from scripts.bench_same_rung import alternated, print_cells  # noqa: E402  (the same cells, printed the same way)

SIDES = ("4k", "huge")


def side_env(side: str) -> dict[str, str]:
    """The child's environment: as this process has it without either switch, or with both."""
    env = {k: v for k, v in os.environ.items() if k not in (huge_pages.TORCH_ENV, huge_pages.TUNABLES_ENV)}
    return dict(huge_pages.apply(env, "auto")) if side == "huge" else env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the full-precision model folder the pack was prepared from")
    ap.add_argument("--pack", required=True, help="a pack with a W8A8 tier")
    ap.add_argument("--engine", choices=("static", "morph"), default="static",
                    help="static: plain vLLM on the static W8A8 checkpoint (default); morph: MorphServe at all-W8A8")
    ap.add_argument("--heap-trim-interval", type=float, default=None, metavar="S",
                    help="MorphServe's workers trim their heaps every S s (0: never; default: serve's default)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating 4k/huge rounds (default 3)")
    ap.add_argument("--out", type=Path, default=None, help="also write every child's figures here as JSON")
    args = ap.parse_args(argv)
    kernel = huge_pages.kernel_mode()
    if not huge_pages.usable(kernel):
        print(f"error: this kernel gives no transparent huge pages (THP mode: {kernel or 'unknown'})", file=sys.stderr)
        return 2
    child = [sys.executable, str(REPO / "scripts" / "bench_same_rung.py"), "--child", args.engine,
             "--model", args.model, "--pack", args.pack, "--kv-cache-dtype", "auto", "--rung", "w8a8",
             "--dtype", "bfloat16", "--repeats", "2", "--prefill-batch", "8", "--prefill-tokens", "512",
             *(["--heap-trim-interval", repr(args.heap_trim_interval)] if args.heap_trim_interval is not None else [])]
    saved = dict(os.environ)

    def measure(side: str) -> dict | None:
        os.environ.clear()
        os.environ.update(side_env(side))  # run_measurement starts the child with this process's environment
        try:
            return run_measurement(child)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    runs = alternated(args.rounds, SIDES, measure)
    if isinstance(runs, int):
        return runs
    trims = "" if args.heap_trim_interval is None else f", heap trims every {args.heap_trim_interval} s"
    print(f"engine {args.engine}{trims}, kernel THP mode {kernel}; medians [range] over {args.rounds} rounds")
    print("| cell | 4 KiB pages | huge pages | huge / 4 KiB |")
    print("|---|---|---|---|")
    print_cells(runs["4k"], runs["huge"], "8 x 512")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"engine": args.engine, "kernel_thp": kernel, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
