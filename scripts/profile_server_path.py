"""Where a server's time goes: plain vLLM's and MorphServe's engine-core and worker processes
sampled with py-spy under the same replay, one server at a time, alternated.

Each round starts plain vLLM, then MorphServe `default` (fp32, the budget of the development
window code 1200-1500 s at 700 MB by default), replays the same trace window against it with
`morphserve replay` while py-spy records both processes (20 Hz, non-blocking, active samples
only), and reads each process's CPU seconds over the replay from /proc, user and kernel time
apart, with its page faults. The summary counts,
per process, the samples waiting for the other process, in MorphServe's own code, in the
model's forward and in vLLM's two main kernels (oneDNN matmul, CPU attention).

With `--suite FILE --suite-window W --suite-budget B` the servers are that suite's systems
(`--systems` names them, e.g. `w8a8,morphserve`), started with the evaluation's own commands
at that budget, warmed up as the evaluation warms them up, and replayed that window: the
profile of one suite row's cell, any CPU kind.

py-spy is a profiler, not a dependency of MorphServe: install it into any environment
(`pip install py-spy`) and pass its path with --py-spy.

    python scripts/profile_server_path.py --py-spy PATH --out DIR [--window 1200:150] [--rounds 3]
    python scripts/profile_server_path.py --py-spy PATH --out DIR --suite evaluations/suite-v4-zen4c.yaml \\
        --suite-window conv-1200-90-long --suite-budget 329MB --systems w8a8,morphserve --pack out/avx512-default
    python scripts/profile_server_path.py --summarize DIR      # the summary of profiles already taken
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.harness import proc_stat  # noqa: E402

# the development window's 700 MB budget, as `morphserve evaluate` derived it for
# evaluations/calibration/dev-avx2-policy-cost.yaml (its server.log holds both commands)
KV_BYTES = 161939968
MEMORY_BUDGET_GB = 0.651925802230835
OWN_CODE = ("morphserve", "policies/", "kv_resize")


# morph-notrim: MorphServe `default` with its heap trimmer off; morph-held: the same, pinned at
# level 0 through its control endpoint (no transition: only the level-0 serving path differs from plain)
SYSTEMS = ("plain", "morph", "morph-notrim", "morph-held")


def server_cmd(system: str, model: str, pack: str, port: int, transition_log: Path) -> list[str]:
    from morphserve.vllm.server import PLAIN_VLLM_SERVER

    common = ["--kv-cache-memory-bytes", str(KV_BYTES), "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
              "--max-model-len", "1024", "--max-num-seqs", "64", "--served-model-name", "model", "--seed", "0",
              "--dtype", "float32"]
    if system == "plain":
        return [sys.executable, "-m", PLAIN_VLLM_SERVER, "--model", model, *common]
    config = {"morphserve": {"pack": pack, "twin": "pack", "shrink_strategy": "wait", "restore_mode": "background",
                             "compress_mode": "sync", "manual_min_interval_s": 0.0,
                             "heap_trim_interval_s": 0.0 if system in ("morph-notrim", "morph-held") else 0.5,
                             "memory_budget_gb": MEMORY_BUDGET_GB, "policy": "default",
                             "transition_log": str(transition_log)}}
    return [sys.executable, "-m", "morphserve.vllm.server", "--model", model, "--additional-config",
            json.dumps(config), *common]


def pids(title: str) -> list[int]:
    """The processes vLLM titled `title` (VLLM::EngineCore, VLLM::Worker)."""
    out = subprocess.run(["pgrep", "-f", title], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def counters(pid: int) -> dict:
    """A process's CPU seconds in user and kernel mode (the kernel's share is where page
    faults and madvise/munmap land, which Python stacks do not show) and its page faults."""
    stat = proc_stat.read(pid)
    if stat is None:
        raise SystemExit(f"error: process {pid} exited during the profile")
    return as_counters(stat)


def as_counters(stat: "proc_stat.ProcStat") -> dict:
    return {"user": stat.user_s, "system": stat.system_s, "minor_faults": stat.minor_faults,
            "major_faults": stat.major_faults}


def over_replay(before: dict, after: dict) -> dict:
    """Each process's CPU seconds over the replay (the total, kept under the process's name as
    the first profiles recorded it) and, under "detail", user and system time and faults."""
    out: dict = {}
    detail = {}
    for name in before:
        delta = {k: after[name][k] - before[name][k] for k in before[name]}
        out[name] = round(delta["user"] + delta["system"], 2)
        detail[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in delta.items()}
    out["detail"] = detail
    return out


def suite_cell(args, system: str, port: int, folder: Path) -> tuple[list[str], dict, list[str], object]:
    """The evaluation's own server command, environment and replay for one suite cell, and
    the System (morphserve.evaluation: the same code `morphserve evaluate` runs)."""
    from morphserve.evaluation.runner import replay_args
    from morphserve.evaluation.suite import load_suite
    from morphserve.evaluation.systems import server_command

    suite = load_suite(args.suite)
    by_name = lambda items, name, what: next((x for x in items if x.name == name), None) or \
        sys.exit(f"error: {args.suite} has no {what} {name!r}")  # noqa: E731
    window = by_name(suite.windows, args.suite_window, "window")
    budget = by_name(suite.budgets, args.suite_budget, "budget")
    spec = by_name(suite.systems, system, "system")
    cmd, env = server_command(spec, budget, suite, Path(args.model), Path(args.pack), port, folder)
    return cmd, env, replay_args(suite, window), (spec, suite)


def profile_one(args, system: str, folder: Path) -> dict:
    from morphserve.harness.servers import free_port, serving

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    cmd = server_cmd(system, args.model, args.pack, port, folder / "transitions.jsonl")
    replay_args = ["--trace", "azure-code", "--window", args.window, "--rate-scale", "0.05", "--length-scale", "0.25",
                   "--output-scale", "1.0", "--slo-ttft", "2", "--slo-tpot", "0.2", "--seed", "0", "--max-input", "512"]
    cell = None
    if args.suite:
        cmd, env, replay_args, cell = suite_cell(args, system, port, folder)
    with serving(cmd, env, folder / "server.log", port, timeout=300, cwd=REPO) as server:
        if cell is not None:  # as `morphserve evaluate` warms it up (MorphServe: 0 -> L -> 0, then its policy)
            from morphserve.evaluation.systems import warm_up

            spec, suite = cell
            top = None
            if spec.kind == "morphserve":
                top = json.loads(urllib_get(f"{server.url}/morphserve/state?memory=0"))["max_level"]
            warm_up(spec, server.url, suite.warmup_requests, top)
        if system == "morph-held":
            hold_level_zero(server.url)
        time.sleep(3)
        procs = {"core": pids("VLLM::EngineCor")[0], "worker": pids("VLLM::Worker")[0]}
        spies = [subprocess.Popen([args.py_spy, "record", "-p", str(pid), "-r", "20", "-f", "raw", "-o",
                                   str(folder / f"{name}.txt"), "--nonblocking"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in procs.items()]
        if args.perf:  # where the worker's page faults come from, by native call site
            spies.append(subprocess.Popen([args.perf, "record", "-q", "-e", "page-faults", "-g", "-p",
                                           str(procs["worker"]), "-o", str(folder / "worker-faults.data")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if args.perf_cpu:  # where both processes' CPU time goes, by native symbol, flat (the VM has no
            # hardware cycle counter, so the kernel's cpu-clock timer samples; no call graphs: the
            # wheels' libraries keep no frame pointers)
            for name, pid in procs.items():
                spies.append(subprocess.Popen([args.perf_cpu, "record", "-q", "-e", "cpu-clock", "-F", "499", "-p",
                                               str(pid), "-o", str(folder / f"{name}-cpu.data")],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if args.strace:  # the worker's memory system calls (mmap, munmap, madvise, brk), counted, every thread
            threads = ",".join(t.name for t in Path(f"/proc/{procs['worker']}/task").iterdir())
            spies.append(subprocess.Popen([args.strace, "-c", "-e", "trace=mmap,munmap,madvise,brk,mremap", "-p", threads,
                                           "-o", str(folder / "worker-syscalls.txt")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        before = {name: counters(pid) for name, pid in procs.items()}
        replay = subprocess.run([sys.executable, "-m", "morphserve.cli", "replay", *replay_args, "--url", server.url,
                                 "--out", str(folder / "replay"), "--system", system, "--tokenizer", args.model,
                                 "--no-plot"], cwd=REPO, env=env, capture_output=True, text=True)
        after = {name: counters(pid) for name, pid in procs.items()}
        try:  # vLLM's own counters after the replay: preemptions, prefix-cache hits, tokens computed
            (folder / "metrics.txt").write_text(urllib_get(f"{server.url}/metrics"))
        except OSError as e:
            (folder / "metrics.txt").write_text(f"# could not read /metrics: {e}\n")
        for spy in spies:
            spy.send_signal(2)
        for spy in spies:
            spy.wait(timeout=60)
    if replay.returncode != 0:
        raise SystemExit(f"error: the replay against {system} failed: {replay.stderr[-2000:]}")
    cpu = over_replay(before, after)
    if args.perf:
        report = subprocess.run([args.perf, "report", "--stdio", "--no-children", "-g", "none", "--percent-limit", "0.5",
                                 "--sort", "dso,sym", "-i", str(folder / "worker-faults.data")],
                                capture_output=True, text=True)
        (folder / "worker-faults.txt").write_text(report.stdout)
    if args.perf_cpu:
        for name in procs:
            report = subprocess.run([args.perf_cpu, "report", "--stdio", "-n", "--percent-limit", "0.05",
                                     "--sort", "dso,sym", "-i", str(folder / f"{name}-cpu.data")],
                                    capture_output=True, text=True)
            (folder / f"{name}-cpu.txt").write_text(report.stdout)
    (folder / "cpu_seconds.json").write_text(json.dumps(cpu) + "\n")
    return cpu


def urllib_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.read().decode()


def hold_level_zero(url: str) -> None:
    """Pin MorphServe at level 0 the way `morphserve evaluate`'s `hold_level` does."""
    import urllib.request

    req = urllib.request.Request(f"{url}/morphserve/level", data=json.dumps({"level": 0}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        state = json.loads(resp.read())
    if state.get("level") != 0:
        raise SystemExit(f"error: MorphServe did not hold level 0: {state.get('level')}")


def parse_perf_report(text: str) -> dict[str, int]:
    """`perf report --stdio -n --sort dso,sym`'s rows as samples per "dso symbol" (the
    header's `# Samples: N` under "total")."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("# Samples:"):
            word = line.split()[2]
            out["total"] = int(float(word[:-1]) * 1000) if word.endswith("K") else int(word)
            continue
        parts = line.split()
        if len(parts) < 4 or not parts[0].endswith("%") or line.startswith("#"):
            continue
        dso, sym = parts[2], " ".join(parts[3:]).removeprefix("[.] ").removeprefix("[k] ")
        if dso == "[JIT]":  # oneDNN's generated kernels: a thread id and addresses that differ per process
            dso, sym = "[JIT]", "(generated code)"
        elif sym.startswith("0x"):  # no symbol: one row per library, comparable across processes
            sym = "(unresolved)"
        out[f"{dso} {sym}"] = out.get(f"{dso} {sym}", 0) + int(parts[1])
    return out


def perf_difference(a: dict[str, int], b: dict[str, int], top: int = 25) -> list[tuple[str, int, int, int]]:
    """The symbols whose samples differ most between two profiles (b minus a), largest first."""
    keys = (set(a) | set(b)) - {"total"}
    rows = [(k, a.get(k, 0), b.get(k, 0), b.get(k, 0) - a.get(k, 0)) for k in keys]
    return sorted(rows, key=lambda r: -abs(r[3]))[:top]


def load(path: Path) -> list[tuple[str, int]]:
    """py-spy's raw format: one collapsed stack per line, frames joined by ';', then a count."""
    rows = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            rows.append((stack, int(count)))
    return rows


def share(rows: list[tuple[str, int]], *needles: str) -> int:
    return sum(n for stack, n in rows if any(needle in stack for needle in needles))


def vllm_counters(path: Path) -> dict[str, float]:
    """vLLM's counters from a saved /metrics page, read as `morphserve evaluate` reads them
    (morphserve.evaluation.vllm_counters); empty where the page is missing or unreadable."""
    from morphserve.evaluation import vllm_counters as counters

    try:
        return counters.parse(path.read_text()) if path.is_file() else {}
    except ValueError:  # "# could not read /metrics: ..." or a truncated page
        return {}


def summarize(folder: Path) -> list[dict]:
    out = []
    for run in sorted(p for p in folder.iterdir() if (p / "worker.txt").is_file()):
        core, worker = load(run / "core.txt"), load(run / "worker.txt")
        cpu_file = run / "cpu_seconds.json"
        out.append({
            "run": run.name,
            "core_samples": sum(n for _, n in core),
            "core_waiting_on_worker": share(core, "acquire_read"),
            "core_own_code": share(core, *OWN_CODE),
            "core_step_hooks": share(core, "on_step_boundary", "on_arrivals"),
            "worker_samples": sum(n for _, n in worker),
            "worker_forward": share(worker, "execute_model"),
            "worker_own_code": share(worker, *OWN_CODE),
            "worker_onednn_mm": share(worker, "onednn_mm"),
            "worker_attention": share(worker, "cpu_attention_with_kv_cache"),
            "cpu_seconds": json.loads(cpu_file.read_text()) if cpu_file.is_file() else None,
            "vllm": vllm_counters(run / "metrics.txt"),
        })
    return out


def print_summary(rows: list[dict]) -> None:
    print("| run | engine core: samples, waiting on the worker, MorphServe code (step hooks) | worker: samples, "
          "forward, MorphServe code, oneDNN matmul, attention | CPU s over the replay: core, worker | "
          "worker: user s, system s, minor faults |")
    print("|---|---|---|---|---|")
    for r in rows:
        pct = lambda n, total: f"{100 * n / total:.1f}%" if total else "-"  # noqa: E731
        cpu = r["cpu_seconds"]
        cpu_cell = f"{cpu['core']}, {cpu['worker']}" if cpu else "-"
        worker = (cpu or {}).get("detail", {}).get("worker")  # the first profiles recorded totals only
        detail_cell = f"{worker['user']}, {worker['system']}, {worker['minor_faults']}" if worker else "-"
        print(f"| {r['run']} | {r['core_samples']}, {pct(r['core_waiting_on_worker'], r['core_samples'])}, "
              f"{pct(r['core_own_code'], r['core_samples'])} ({pct(r['core_step_hooks'], r['core_samples'])}) | "
              f"{r['worker_samples']}, {pct(r['worker_forward'], r['worker_samples'])}, "
              f"{pct(r['worker_own_code'], r['worker_samples'])}, {r['worker_onednn_mm']}, {r['worker_attention']} | "
              f"{cpu_cell} | {detail_cell} |")
    for r in rows:
        if r.get("vllm"):
            print(f"{r['run']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["vllm"].items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / ".cache/models/SmolLM2-135M-Instruct"), help="the model folder")
    ap.add_argument("--pack", default=str(REPO / "out/avx2-default"), help="the pack MorphServe serves")
    ap.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy executable (default: on PATH)")
    ap.add_argument("--out", type=Path, help="folder for the profiles, the servers' logs and the replays")
    ap.add_argument("--window", default="1200:150", help="the azure-code window replayed, START:SECONDS")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every system, one after another")
    ap.add_argument("--systems", default="plain,morph",
                    help=f"the servers of each round, in order, comma-separated, from {', '.join(SYSTEMS)}")
    ap.add_argument("--perf", help="a perf executable: also record where the worker's page faults come from "
                    "(worker-faults.txt, by library and symbol)")
    ap.add_argument("--perf-cpu", help="a perf executable: also sample where the engine core's and worker's CPU "
                    "time goes, by library and symbol (core-cpu.txt, worker-cpu.txt)")
    ap.add_argument("--perf-diff", nargs=2, type=Path, metavar=("A", "B"),
                    help="only compare two perf CPU reports (*-cpu.txt): the symbols whose samples differ most, B minus A")
    ap.add_argument("--strace", help="a strace executable: also count the worker's memory system calls "
                    "(worker-syscalls.txt)")
    ap.add_argument("--summarize", type=Path, help="only summarize the profiles already in this folder")
    ap.add_argument("--suite", type=Path, help="profile one cell of this evaluation suite: its systems (named in "
                    "--systems), commands, warm-up and window")
    ap.add_argument("--suite-window", help="with --suite: the window's name")
    ap.add_argument("--suite-budget", help="with --suite: the budget's name")
    args = ap.parse_args()
    if args.perf_diff:
        try:
            a, b = (parse_perf_report(path.read_text()) for path in args.perf_diff)
        except OSError as e:
            print(f"error: cannot read a perf report: {e}", file=sys.stderr)
            return 2
        print(f"samples: A {a.get('total', 0)}, B {b.get('total', 0)}")
        for key, in_a, in_b, diff in perf_difference(a, b):
            print(f"{diff:+7d}  {in_a:7d} -> {in_b:7d}  {key}")
        return 0
    if args.summarize:
        rows = summarize(args.summarize)
        if not rows:
            print(f"error: no profile (*/worker.txt) under {args.summarize}", file=sys.stderr)
            return 2
        print_summary(rows)
        return 0
    if not args.out:
        ap.error("--out is required to take profiles")
    if not args.py_spy or not Path(args.py_spy).is_file():
        print("error: py-spy not found: install it (pip install py-spy) and pass --py-spy PATH", file=sys.stderr)
        return 2
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    if args.suite and not (args.suite_window and args.suite_budget):
        ap.error("--suite needs --suite-window and --suite-budget")
    unknown = [] if args.suite else sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        print(f"error: --systems takes names from {', '.join(SYSTEMS)}; got {args.systems!r}", file=sys.stderr)
        return 2
    for rnd in range(1, args.rounds + 1):
        for system in systems:
            cpu = profile_one(args, system, args.out / f"{system}-{rnd}")
            print(f"{system} round {rnd}: CPU seconds over the replay: core {cpu['core']}, worker {cpu['worker']} "
                  f"(worker {cpu['detail']['worker']})", flush=True)
    print_summary(summarize(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
