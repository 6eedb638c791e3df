"""The run loop: for every repetition, every cell (window x budget) and every system in
a rotating order, a fresh server is started, warmed up the same way, sampled for memory
while the trace replays, and stopped. Each run's folder is complete only once its
run.json exists, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from morphserve.offline import pack as packfmt
from morphserve.offline.ladder import Ladder, level_ppl_curve, served_quality
from morphserve.runtime.config import serve_tiers
from morphserve.errors import MorphServeError
from morphserve.evaluation import cpu_share, kv_quality, machine, quality, systems, vllm_counters
from morphserve.evaluation.suite import Budget, Suite, System, Window
from morphserve.harness.servers import free_port, group_rss, group_work, start_server, stop_server, work_between
from morphserve.runtime.proc_memory import process_breakdown

MIB = 2**20
# smaps is read only when the group's total passes the last breakdown by this much, and at
# most once per BREAKDOWN_EVERY_S. One breakdown parses every mapping of the server's
# processes: about 85 ms of CPU against a MorphServe server (24k smaps lines a process).
# Measured on a 2-vCPU machine, a breakdown at every 4 MiB of new high, which a server whose
# KV pages are touched as blocks are first used (MorphServe's KV reserve) reaches all run
# long while a preallocated cache does not, took 9% of a core from the core vLLM's engine
# core spins on, against MorphServe only (docs/RESULTS.md, "The harness's own memory
# sampler").
BREAKDOWN_STEP = 4 * MIB
BREAKDOWN_EVERY_S = 10.0
# The sampler's thread runs at the lowest priority: a server's processes, not the
# measurement, get the CPU when both want it. Reading /proc/PID/status takes well under a
# millisecond, so a sample is late by a scheduler slice at most.
SAMPLER_NICE = 19


class MemorySampler(threading.Thread):
    """Peak RssAnon, RssFile and their sum over every process of the server's group, and
    each process's own peaks (by vLLM's process title), to place a difference."""

    def __init__(self, pgid: int, every: float = 0.25, breakdown_every_s: float = BREAKDOWN_EVERY_S):
        super().__init__(daemon=True)
        self.pgid, self.every, self.breakdown_every_s = pgid, every, breakdown_every_s
        self.last_breakdown = float("-inf")  # monotonic time of the last smaps read
        self.peak = {"anon": 0, "file": 0, "total": 0}
        self.by_process: dict[str, dict[str, int]] = {}
        self.samples = 0
        self.at_peak: dict = {}  # which mappings held the memory, read when the total reached a new high
        self.stop = threading.Event()

    @staticmethod
    def _breakdown(pids: dict[int, str]) -> dict:
        out: dict = {}
        for pid, name in pids.items():
            try:
                parts = process_breakdown(pid)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            out[name if name not in out else f"{name}-{pid}"] = parts
        return out

    def breakdown_due(self, total: int, now: float) -> bool:
        """A new high by BREAKDOWN_STEP, and the last smaps read breakdown_every_s ago: the
        breakdown may be up to that long before the peak; its own total says which."""
        return (total >= self.at_peak.get("total", 0) + BREAKDOWN_STEP
                and now - self.last_breakdown >= self.breakdown_every_s)

    def run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SAMPLER_NICE)  # this thread only
        except (OSError, AttributeError):
            pass  # a measurement at normal priority rather than none
        while not self.stop.is_set():
            rss = group_rss(self.pgid)
            anon, file = rss["rss_anon_bytes"], rss["rss_file_bytes"]
            self.peak = {"anon": max(self.peak["anon"], anon), "file": max(self.peak["file"], file),
                         "total": max(self.peak["total"], anon + file)}
            for name, (p_anon, p_file) in rss["by_process"].items():
                seen = self.by_process.setdefault(name, {"anon": 0, "file": 0})
                seen["anon"], seen["file"] = max(seen["anon"], p_anon), max(seen["file"], p_file)
            now = time.monotonic()
            if self.breakdown_due(anon + file, now):
                self.at_peak = {"total": anon + file, "by_process": self._breakdown(rss["pids"])}
                self.last_breakdown = now
            self.samples += 1
            self.stop.wait(self.every)


def run_order(suite: Suite) -> list[tuple[int, Window, Budget, System]]:
    """Repetition-major, so repetitions are spread over the whole evaluation; inside a cell
    the systems' order rotates by one each repetition, so none always runs first."""
    order = []
    for rep in range(suite.repetitions):
        for window, budget in suite.cells():
            present = suite.systems_at(window, budget)
            shift = rep % len(present)
            for system in present[shift:] + present[:shift]:
                order.append((rep, window, budget, system))
    return order


def run_dir(out: Path, rep: int, window: Window, budget: Budget, system: System) -> Path:
    return out / window.name / budget.name / system.name / f"rep{rep + 1}"


def check_resumable(suite: Suite, out: Path, suite_path: Path, pack: Path) -> None:
    """An output folder belongs to one suite and one pack: resuming with another is refused."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "suite.json"
    pack_id = hashlib.sha256((pack / packfmt.MANIFEST).read_bytes()).hexdigest()[:16]
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous["fingerprint"] != suite.fingerprint():
            raise MorphServeError(f"{out} holds runs of a different suite ({previous['file']}); "
                                  "use another --out or delete it")
        if previous.get("pack_manifest_sha256", pack_id) != pack_id:
            raise MorphServeError(f"{out} holds runs made with a different pack than {pack}; "
                                  "use another --out or delete it")
        here = machine.describe()
        if "machine" in previous and not machine.same_machine(previous["machine"], here):
            raise MorphServeError(f"{out} holds runs made on {machine.label(previous['machine'])}, not on this "
                                  f"{machine.label(here)}; use another --out")
    else:
        marker.write_text(json.dumps({"file": str(suite_path), "fingerprint": suite.fingerprint(),
                                      "pack_manifest_sha256": pack_id, "machine": machine.describe(),
                                      "suite": suite.model_dump()}, indent=2) + "\n")


def served_ladder(manifest: packfmt.Manifest, quality: dict, tiers: list[str] | None,
                  probe) -> tuple[int, dict[int, float]]:
    """The top level and the perplexity per level of the ladder MorphServe serves on this
    CPU with `tiers` (None: every tier of the pack that `probe` says runs here)."""
    served = serve_tiers(manifest, tiers, probe)
    return Ladder.from_manifest(manifest, served).top, level_ppl_curve(
        served_quality(quality, manifest.tier_names, served))


STATIC_TIERS = {"w8a8": "w8a8", "w4": "w4a16"}  # a static system's kind -> the tier every layer is in


def static_levels(ladder: Ladder, num_layers: int) -> dict[str, int]:
    """The level of `ladder` at which each static quantized kind has every layer in its tier,
    for the kinds whose configuration is on it. Read from the ladder, not from its top: all-W8A8
    is level L on a tiered ladder (its W8A8 half) and on a W8A8-only one (its top), all-W4A16 the
    top where W4A16 is served. (The evaluation once took all-W8A8 as half the top, which on a
    W8A8-only pack charged static W8A8 the quality of 15 W8A8 layers, not 30.)"""
    out = {}
    for kind, tier in STATIC_TIERS.items():
        level = ladder.level_of({layer: tier for layer in range(num_layers)})
        if level is not None:
            out[kind] = level
    return out


def evaluate(suite: Suite, suite_path: Path, model: Path, pack: Path, out: Path) -> list[Path]:
    check_resumable(suite, out, suite_path, pack)
    manifest = packfmt.load_manifest(pack)
    from morphserve.vllm.kernels import probe_tiers

    quality = json.loads((pack / packfmt.QUALITY).read_text())
    # The static systems' levels are read on the ladder of every tier served here; a
    # MorphServe system that names its tiers serves (and is scored on) that ladder.
    default = served_ladder(manifest, quality, None, probe_tiers)
    served_here = serve_tiers(manifest, None, probe_tiers)
    statics = static_levels(Ladder.from_manifest(manifest, served_here), manifest.num_layers)
    for s in suite.systems:
        if s.kind in STATIC_TIERS and s.kind not in statics:
            raise MorphServeError(f"{s.name}: static {STATIC_TIERS[s.kind]}'s quality is read at the level where every "
                                  f"layer is {STATIC_TIERS[s.kind]}, and the ladder served on this CPU has none "
                                  f"(tiers served: {', '.join(served_here)})")
    ladders = {s.name: served_ladder(manifest, quality, s.tiers, probe_tiers) if s.tiers else default
               for s in suite.systems}
    order = run_order(suite)
    kv_factors = kv_cost_factors(suite, out, model, pack, {s.name: serve_tiers(manifest, s.tiers, probe_tiers)
                                                          for s in suite.systems if s.kv_cache_dtype != "auto"},
                                 ladders)
    rescore_kv_cost(suite, out, order, kv_factors)  # runs made before the KV cost was charged
    rescore_static_quality(out, order, ladders, statics, kv_factors)  # runs charged at a wrong static level
    todo = [item for item in order if not (run_dir(out, *item) / "run.json").exists()]
    if len(todo) < len(order):
        print(f"resuming: {len(order) - len(todo)} of {len(order)} runs already done in {out}", file=sys.stderr)
    bar = tqdm(todo, unit="run", desc="evaluate", dynamic_ncols=True)
    for rep, window, budget, system in bar:
        bar.set_description(f"{window.name}/{budget.name}/{system.name} rep {rep + 1}/{suite.repetitions}")
        top, curve = ladders[system.name]
        one_run(suite, rep, window, budget, system, model, pack, top, curve,
                run_dir(out, rep, window, budget, system), kv_factors.get(system.name), statics.get(system.kind, 0))
    return [run_dir(out, *item) for item in order]


def kv_cost_factors(suite: Suite, out: Path, model: Path, pack: Path, served: dict[str, list[str]],
                    ladders: dict[str, tuple[int, dict[int, float]]]) -> dict[str, dict[int, float]]:
    """system name -> its KV cache's perplexity factor at every level of the ladder it is read
    on (`served`: its tiers), for every system whose KV cache is not bf16 (measured once per
    pack, ladder and CPU kind)."""
    return {s.name: kv_quality.measured_factors(out, model, pack, served[s.name], ladders[s.name][0],
                                                s.kv_cache_dtype)
            for s in suite.systems if s.kv_cache_dtype != "auto"}


def rescore_kv_cost(suite: Suite, out: Path, order: list, kv_factors: dict[str, dict[int, float]]) -> None:
    for rep, window, budget, system in order:
        path = run_dir(out, rep, window, budget, system) / "run.json"
        if system.name not in kv_factors or not path.exists():
            continue
        record = json.loads(path.read_text())
        if "kv_ppl_factor" not in record:
            record.update(kv_quality.charged(record, kv_factors[system.name]))
            path.write_text(json.dumps(record, indent=1) + "\n")


def rescore_static_quality(out: Path, order: list, ladders: dict[str, tuple[int, dict[int, float]]],
                           statics: dict[str, int], kv_factors: dict[str, dict[int, float]]) -> None:
    """A static quantized run whose quality was read at another level than `static_levels`
    gives (made before that was fixed, or with no level recorded) is read again from its own
    requests: the measurement is unchanged, only the level its tokens are charged at."""
    for rep, window, budget, system in order:
        path = run_dir(out, rep, window, budget, system) / "run.json"
        if system.kind not in statics or not path.exists():
            continue
        record = json.loads(path.read_text())
        level = statics[system.kind]
        if record.get("static_level") == level:
            continue
        rows = [json.loads(x) for x in (path.parent / "requests.jsonl").read_text().splitlines()]
        for key in [k for k in record if k.endswith("_weights_only")] + ["kv_ppl_factor"]:
            record.pop(key, None)
        record.update(quality.quality_of_run(rows, ladders[system.name][1], None, level), static_level=level)
        if system.name in kv_factors:
            record.update(kv_quality.charged(record, kv_factors[system.name]))
        path.write_text(json.dumps(record, indent=1) + "\n")


def twins_held(system: System, warmup: dict | None) -> int:
    """The prompt twins a run is charged by: the suite's count, or with `auto` the count the
    server reported after its warm-up (0 if it never said: every token at its level)."""
    if system.prompt_twin_layers != "auto":
        return system.prompt_twin_layers or 0
    return int((warmup or {}).get("prompt_twin_layers") or 0)


def one_run(suite: Suite, rep: int, window: Window, budget: Budget, system: System, model: Path, pack: Path,
            top_level: int, curve: dict[int, float], folder: Path,
            kv_factors: dict[int, float] | None = None, static_level: int = 0) -> dict:
    """`top_level`: the top of the ladder the system is read on (every tier served here, or
    a MorphServe system's own tiers); `curve`: perplexity per level of that ladder (weights
    only); `kv_factors`: its KV cache's perplexity factor per level, where it is not bf16;
    `static_level`: a static system's level on that ladder (`static_levels`; 0 for FP16)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("transitions.jsonl", "bench.json", "summary.json"):
        (folder / stale).unlink(missing_ok=True)  # a half-done earlier attempt
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd, env = systems.server_command(system, budget, suite, model, pack, port, folder)
    idle = machine.wait_until_idle()
    if idle["busy"]:
        tqdm.write(f"warning: {idle['load']:.1f} of {idle['cores']} cores were in use after {idle['waited_s']:.0f} s "
                   f"of waiting before {folder.relative_to(folder.parents[3])}: this run's timings are suspect "
                   "(flagged in its run.json and the report)")
    t0 = time.monotonic()
    try:
        proc = start_server(cmd, env, folder / "server.log", port, timeout=600)
    except RuntimeError as e:
        raise MorphServeError(f"{folder}: {system.name} did not start: {e}") from None
    record: dict = {"system": system.name, "kind": system.kind, "window": window.name, "budget": budget.name,
                    "repetition": rep + 1, "startup_s": round(time.monotonic() - t0, 1), "cpu_before": idle}
    if system.extra_memory_mb is not None:  # its budget is not the cell's: say so in the run's own record
        record["extra_memory_mb"] = system.extra_memory_mb
    sampler = MemorySampler(proc.pid)
    try:
        record["warmup"] = systems.warm_up(system, base, suite.warmup_requests, top_level)
        record["kv_blocks"] = systems.kv_blocks(system, base)
        counters, work = _counters(base), group_work(proc.pid)
        cpu_at_start = cpu_share.read()  # what other work takes from the cores during the replay
        sampler.start()
        # A cut run's decisions are read shortly before its deadline, while the server still
        # answers: there they explain most (the level it held under load it could not serve).
        before_cut = (lambda: systems.last_decisions(base)) if system.kind == "morphserve" else None
        def read_now() -> dict:  # vLLM's counters and each process's work, which die with the server
            now = {"vllm": _counters(base), "work": group_work(proc.pid), "cpu": cpu_share.read()}
            return now | ({"served": systems.served_now(base)} if system.kind == "morphserve" else {})

        record.update(_replay(suite, window, system, model, base, folder, proc, before_cut, at_cut=read_now))
        # a cut run's server is gone by now: its counters were read just before the cut
        at_cut = record.pop("counters_at_cut", None) or read_now()
        after = at_cut["vllm"]
        # which server process did the work, and how much of it was page faults (the kernel's)
        record["process_work"] = work_between(work, at_cut["work"])
        record["cpu_during"] = cpu_share.others_during(cpu_at_start, at_cut.get("cpu"))
        if (record["cpu_during"] or {}).get("busy"):
            tqdm.write(f"warning: other work used {record['cpu_during']['others_cores']:.2f} cores on average during "
                       f"{folder.relative_to(folder.parents[3])}'s replay: this run's timings are suspect "
                       "(flagged in its run.json and the report)")
        record["vllm_counters"] = (vllm_counters.between(counters, after) if "error" not in counters | after
                                   else {"error": (counters | after)["error"]})
        if system.kind == "morphserve" and not record["cut_at_deadline"]:
            # the policy's own quality figure (to check against ours) and why it held where it did not move
            record.update(systems.policy_record(base))
        elif at_cut.get("served"):
            record["served_by_level"] = at_cut["served"]  # a cut run's: the count at the deadline
    except (OSError, RuntimeError) as e:
        raise MorphServeError(f"{folder}: {system.name}: {e}") from None
    finally:
        sampler.stop.set()
        stop_server(proc)
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(x) for x in (folder / "requests.jsonl").read_text().splitlines()]
    changes = quality.level_changes(folder / "transitions.jsonl") if system.kind == "morphserve" else None
    record.update({k: v for k, v in summary.items() if k not in ("system", "window")})
    record["trace_window"] = summary["window"]  # START:DURATION; record["window"] stays the suite's name
    twins = twins_held(system, record.get("warmup"))
    served_before = (record.get("warmup") or {}).get("served_by_level")
    twin_share = quality.twin_share_between(served_before, record.get("served_by_level")) if twins else None
    # the server's own count from after the warm-up: without that reading it would count the warm-up too
    served = quality.served_between(served_before, record.get("served_by_level")) if served_before else None
    record.update(quality.quality_of_run(rows, curve, changes, static_level, twins, twin_share, served))
    if system.kind in STATIC_TIERS:
        record["static_level"] = static_level
    if kv_factors is not None:
        record.update(kv_quality.charged(record, kv_factors))
    record.update(peak_rss_anon_mib=sampler.peak["anon"] / MIB, peak_rss_file_mib=sampler.peak["file"] / MIB,
                  peak_rss_total_mib=sampler.peak["total"] / MIB, memory_samples=sampler.samples,
                  peak_rss_by_process_mib={name: {k: v / MIB for k, v in peak.items()}
                                           for name, peak in sampler.by_process.items()},
                  mappings_at_peak_mib=_in_mib(sampler.at_peak),
                  trace_sha256=hashlib.sha256((folder / "trace.jsonl").read_bytes()).hexdigest(),
                  input_lens=[r["input_len"] for r in rows], output_lens=[r["output_len"] for r in rows],
                  served_output_lens=[r.get("served_tokens", r["output_len"]) for r in rows],
                  requested_output_lens=[json.loads(x)["output_length"]
                                         for x in (folder / "trace.jsonl").read_text().splitlines()],
                  ok=[r["ok"] for r in rows])
    if changes is not None:
        record["transitions"] = sum(1 for line in (folder / "transitions.jsonl").read_text().splitlines()
                                    if json.loads(line).get("reason") != "manual")
        record["max_level_serving"] = max((int(k) for part in record["tokens_by_level"].values() for k in part),
                                          default=0)
    (folder / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _counters(base: str) -> dict:
    """vLLM's scheduler counters now (morphserve.evaluation.vllm_counters), or why not: a
    figure beside the run, never a reason to fail it."""
    try:
        return vllm_counters.read(base)
    except (OSError, ValueError) as e:
        return {"error": f"vLLM's /metrics not read: {e}"}


BEFORE_CUT_S = 10.0  # a cut run's policy decisions are read this long before its deadline


def replay_args(suite: Suite, window: Window) -> list[str]:
    """`morphserve replay`'s arguments for a window of a suite: the trace, its scaling, the
    SLOs and the seed (scripts/profile_server_path.py replays a suite cell with them too)."""
    args = ["--trace", window.trace, "--window", f"{window.start_s}:{window.duration_s}",
            "--rate-scale", repr(window.rate_scale), "--length-scale", repr(window.length_scale),
            "--output-scale", repr(window.output_scale), "--timestamp-unit", window.timestamp_unit,
            "--slo-ttft", str(suite.slo_ttft_s), "--slo-tpot", str(suite.slo_tpot_s), "--seed", str(suite.seed)]
    if window.max_input:
        args += ["--max-input", str(window.max_input)]
    if window.hash_block_size:
        args += ["--hash-block-size", str(window.hash_block_size)]
    return args


def _replay(suite: Suite, window: Window, system: System, model: Path, base: str, folder: Path,
            proc: subprocess.Popen, before_cut: Callable[[], dict] | None = None,
            at_cut: Callable[[], dict] | None = None) -> dict:
    """`morphserve replay` with a deadline: once the window plus `drain_s` has passed on the
    trace's clock, the server is stopped and the requests still running fail (they count
    as violations with infinite latency). `before_cut` runs `BEFORE_CUT_S` before the
    deadline (so its time is not extra time for the requests still running); what it
    returns joins the record if the run is cut. `at_cut` runs at the deadline, just before
    the server is stopped (vLLM's counters and the processes' work, which die with it); its
    result is returned as `counters_at_cut`."""
    cmd = [sys.executable, "-m", "morphserve.cli", "replay", *replay_args(suite, window), "--url", base,
           "--out", str(folder), "--system", system.name, "--tokenizer", str(model), "--no-plot"]
    bench_log = folder / "bench.log"
    bench_log.unlink(missing_ok=True)
    with open(folder / "replay.log", "w") as log:
        replay = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        started = _wait_for_start(replay, bench_log)
        deadline = started + window.duration_s + suite.drain_s
        cut, read, at_deadline = False, None, None
        while replay.poll() is None:
            if before_cut and read is None and time.monotonic() > deadline - BEFORE_CUT_S:
                read = before_cut()
            if time.monotonic() > deadline and not cut:
                at_deadline = at_cut() if at_cut else None
                stop_server(proc)  # in-flight requests fail; vLLM's load generator then finishes
                cut = True
            time.sleep(0.2)
    if replay.returncode != 0:
        raise RuntimeError(f"replay failed (exit {replay.returncode}); see {folder / 'replay.log'}")
    return {"cut_at_deadline": cut, "replay_wall_s": round(time.monotonic() - started, 1),
            **(read if cut and read else {}), **({"counters_at_cut": at_deadline} if at_deadline else {})}


def _wait_for_start(replay: subprocess.Popen, bench_log: Path, timeout: float = 300) -> float:
    """The trace's clock starts when vLLM's load generator says so."""
    until = time.monotonic() + timeout
    while time.monotonic() < until and replay.poll() is None:
        if bench_log.exists() and "Starting main benchmark run" in bench_log.read_text(errors="replace"):
            return time.monotonic()
        time.sleep(0.1)
    return time.monotonic()


def _in_mib(value):
    """A breakdown's byte counts in MiB (two decimals), its structure kept."""
    if isinstance(value, dict):
        return {k: _in_mib(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_in_mib(v) for v in value]
    return round(value / MIB, 2) if isinstance(value, int) else value
