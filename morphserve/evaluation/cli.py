"""`morphserve evaluate SUITE.yaml`: run a pre-registered suite against plain vLLM and
write OUT/report.{md,json,png}. `--report-only` rebuilds the report from finished runs."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from morphserve.errors import MorphServeError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="run a pre-registered evaluation suite (evaluations/*.yaml) against plain vLLM",
        description=(
            "Replays every window of the suite at every budget against fresh servers of every system "
            "(plain vLLM FP16, eager and compiled; plain vLLM serving the static W4 twin; MorphServe), "
            "repeated in a rotating order, with the same warm-up, greedy decoding and prompts for all. "
            "Memory (RssAnon + RssFile of every server process) is sampled during each replay. Failed or "
            "unfinished requests count as SLO violations with infinite latency. The output folder is "
            "resumable: finished runs are kept and skipped. Exit status 1 if the systems did not do equal work."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("suite", type=Path, metavar="SUITE.yaml", help="the suite file (see evaluations/)")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR", help="the bf16 model folder")
    p.add_argument("--pack", type=Path, required=True, metavar="PACK_DIR", help="the pack prepared from it")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="results; resumed if it holds runs of this suite")
    p.add_argument("--report-only", action="store_true", help="do not run anything; rebuild the report from DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from morphserve.offline import pack as packfmt
    from morphserve.evaluation.runner import check_resumable, evaluate
    from morphserve.evaluation.suite import load_suite

    suite = load_suite(args.suite)
    # servers and the load generator run with other working folders: make every path absolute
    args.model, args.pack, args.out = args.model.resolve(), args.pack.resolve(), args.out.resolve()
    signal.signal(signal.SIGTERM, _interrupt)  # so the server being measured is reaped, not orphaned
    for path, what in ((args.model / "config.json", "a model folder"), (args.pack / packfmt.MANIFEST, "a pack")):
        if not path.exists():
            raise MorphServeError(f"{path.parent} is not {what} (no {path.name})")
    if args.report_only:
        check_resumable(suite, args.out, args.suite, args.pack)
    else:
        warn_over_length(suite)
        evaluate(suite, args.suite, args.model, args.pack, args.out)
    report = build_report(suite, args.out)
    problems = [p for c in report["cells"] for p in c["equal_work_problems"]]
    print(report_markdown(report))
    if problems:
        print("error: the systems did not do equal work:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


def warn_over_length(suite) -> None:
    """Before any server starts: name each window whose requests outgrow max_model_len."""
    from morphserve.evaluation.window_fit import warning, window_requests

    for window in suite.windows:
        try:
            line = warning(window.name, window_requests(window), suite.max_model_len)
        except MorphServeError:  # a courtesy only: the replay reports a trace it cannot read, as before
            continue
        if line:
            print(line, file=sys.stderr)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def build_report(suite, out: Path) -> dict:
    from morphserve.evaluation.aggregate import check_equal_work, summarize_cell
    from morphserve.evaluation.render import figure
    from morphserve.evaluation.runner import run_dir

    cells = []
    for window, budget in suite.cells():
        runs: dict[str, dict[int, dict]] = {}
        flat = []
        for system in suite.systems_at(window, budget):
            for rep in range(suite.repetitions):
                path = run_dir(out, rep, window, budget, system) / "run.json"
                if path.exists():
                    record = json.loads(path.read_text())
                    runs.setdefault(system.name, {})[rep + 1] = record
                    flat.append(record)
        if not flat:
            continue
        cells.append({"window": window.name, "budget": budget.name, "regime": window.regime, "runs": len(flat),
                      "kinds": {s.name: s.kind for s in suite.systems_at(window, budget)},
                      "requests": flat[0]["requests"], "trace_sha256": flat[0]["trace_sha256"],
                      "equal_work_problems": check_equal_work(flat),
                      "systems": summarize_cell(runs, suite.baseline, suite.static_quantized)})
    marker = out / "suite.json"
    ran_on = json.loads(marker.read_text()).get("machine") if marker.exists() else None
    report = {"suite": suite.name, "fingerprint": suite.fingerprint(), "repetitions": suite.repetitions,
              "machine": ran_on, "cells": cells, "busy_starts": busy_starts(suite, out)}
    kv_measured = out / "kv-quality.json"
    if kv_measured.exists():
        report["kv_quality"] = json.loads(kv_measured.read_text())
        report["kv_charged_systems"] = sorted(s.name for s in suite.systems if s.kv_cache_dtype != "auto")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(report_markdown(report) + "\n")
    if cells:
        figure(report, out / "report.png")
    return report


def busy_starts(suite, out: Path) -> list[str]:
    """Runs that started while other work held the cores (`cpu_before` in run.json), or during
    whose replay other work took the cores (`cpu_during`); runs made before a check was
    recorded have none and are not listed for it."""
    from morphserve.evaluation.runner import run_dir

    found = []
    for window, budget in suite.cells():
        for system in suite.systems_at(window, budget):
            for rep in range(suite.repetitions):
                path = run_dir(out, rep, window, budget, system) / "run.json"
                run = json.loads(path.read_text()) if path.exists() else {}
                before, during = run.get("cpu_before"), run.get("cpu_during")
                name = f"{window.name}/{budget.name}/{system.name} rep {rep + 1}"
                if before and before.get("busy"):
                    found.append(f"{name} ({before['load']} of {before['cores']} cores in use at its start)")
                if during and during.get("busy"):
                    found.append(f"{name} (other work used {during['others_cores']} cores on average during "
                                 "its replay)")
    return found


def report_markdown(report: dict) -> str:
    from morphserve.evaluation.machine import label
    from morphserve.evaluation.render import equal_work, table, versus_static_table
    from morphserve.evaluation.versus_static import compare

    ran_on = f" on {label(report['machine'])}" if report.get("machine") else " (machine not recorded)"
    versus = compare(report)
    lead = (f"Against each row's best static system:\n\n{versus_static_table(versus)}\n\nEvery system:\n\n"
            if versus else "")
    return (f"suite {report['suite']} ({report['fingerprint']}), {report['repetitions']} repetitions{ran_on}; "
            f"each figure: median [low, high]\n\n{lead}{table(report)}\n\nEqual work:\n{equal_work(report)}"
            f"{kv_cost_note(report)}{busy_note(report)}")


def busy_note(report: dict) -> str:
    starts = report.get("busy_starts") or []
    if not starts:
        return ""
    return ("\n\nRun on a busy machine (other work held the cores at the start after a minute's wait, or took "
            "them during the replay; these runs' timings are suspect):\n" + "\n".join(f"- {s}" for s in starts))


def kv_cost_note(report: dict) -> str:
    """Which perplexity figures include a KV cache's own cost, and the factors measured."""
    if not report.get("kv_quality"):
        return ""
    lines = [f"\n\nPerplexity increases of {', '.join(report.get('kv_charged_systems', [])) or 'no system'} "
             "include their KV cache's own cost, measured in vLLM on MorphServe's engine (chunked prefill, "
             "bf16 against the named cache; levels between interpolated), kv-quality.json:"]
    for key, entry in report["kv_quality"].items():
        factors = ", ".join(f"{k}: {v - 1:+.2%}" for k, v in entry["factor"].items())
        lines.append(f"- {key} (ladder top {entry['top']}, {entry['tokens']} tokens): {factors}")
    return "\n".join(lines)
