"""Soak: a real `morphserve serve` under a replayed trace while the level is forced to
random values every few seconds, with the policy in charge in between.

    python scripts/soak.py --model MODEL_DIR --pack PACK_DIR [--duration 600] [--out soak.json]

Checks (exit 1 if any fails; all are decided here, before a run):
- no request fails, and every output has exactly the requested length (ignore_eos);
- the server stays healthy and MorphServe reports no failed transition;
- memory does not grow. Every --checkpoint-every seconds (and not before the level events
  since the last checkpoint have forced a level and handed it back) the load pauses, in-flight
  requests finish, level 0 is forced and, a second later, the anonymous memory that the
  budget does not explain is read: RssAnon of every server process, minus the KV pages
  resident in the reserve, minus the weights as computed with, minus layers prepared by a
  background restore. (Read under load it swings by a few percent with the batch's
  activations, which would hide a leak.) The median of the last 3 checkpoints must be
  < 1% (--memory-growth-limit) above the median of the first 3 after the warm-up;
- the number of memory mappings of the server's processes grows by < 2% the same way;
- the number of server processes never changes, and none survives the server's stop.
Load is closed-loop (at most --concurrency requests in flight), so a slow machine gets
fewer requests, never an ever-growing queue.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from morphserve.replay.run import trace
from morphserve.offline.datafiles import traces_dir
from morphserve.harness.servers import (free_port, group_pids, group_rss, group_survivors, start_server,
                                        stop_server)
from morphserve.runtime.allocator import ALLOCATOR_ENV, ALLOCATORS, AllocatorNotFound, default_allocator, preload_env
from morphserve.runtime.proc_memory import process_rss
from morphserve.vllm.server import PLAIN_VLLM_SERVER

MEMORY_GROWTH_LIMIT = 0.01
MAPPINGS_GROWTH_LIMIT = 0.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="full-precision model folder")
    p.add_argument("--pack", default=None, help="pack written by `morphserve prepare` (not with --plain)")
    p.add_argument("--duration", type=float, default=600, help="seconds of load after the server is up")
    p.add_argument("--warmup", type=float, default=60, help="seconds excluded from the memory comparison")
    p.add_argument("--checkpoint-every", type=float, default=30,
                   help="seconds between quiescent memory checkpoints (load paused, level 0); a checkpoint "
                        "also waits for a forced level and a hand-back since the last one")
    p.add_argument("--force-every", type=float, default=4.0,
                   help="seconds between level events: force a random level, then hand back to the policy "
                        "(0: never)")
    p.add_argument("--min-level-events", type=int, default=0,
                   help="go on past --duration (up to 3x it) until this many level events were made: a "
                        "slower machine then exercises as many transitions as a fast one (default 0: stop "
                        "at --duration)")
    p.add_argument("--min-transitions", type=int, default=0,
                   help="likewise, go on past --duration (up to 3x it) until the server reports this many "
                        "completed transitions: a level event can be absorbed (the policy may pick the level "
                        "already held), so events alone do not promise transitions (default 0)")
    p.add_argument("--policy", default="default", help="policy between forced levels ('none': no policy)")
    p.add_argument("--concurrency", type=int, default=6, help="requests in flight at most")
    p.add_argument("--max-input", type=int, default=600, help="cap on a trace request's prompt tokens")
    p.add_argument("--max-output", type=int, default=96, help="cap on a trace request's output tokens")
    p.add_argument("--memory-growth-limit", type=float, default=MEMORY_GROWTH_LIMIT,
                   help="largest accepted growth of unexplained anonymous memory, as a fraction (default 0.01)")
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples")
    p.add_argument("--dtype", default="auto",
                   help="the server's --dtype (auto: the checkpoint's, bf16 for SmolLM2; float32 is several "
                        "times faster where the CPU emulates bf16, e.g. AVX2-only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain", action="store_true",
                   help="soak plain vLLM (no plugin, no level events) under the same load, for comparison")
    p.add_argument("--allocator", choices=ALLOCATORS, default=default_allocator(),
                   help="malloc preloaded into the server's processes (system: glibc's; tcmalloc is what "
                        "vLLM's CPU docs recommend; auto: tcmalloc where installed; default: "
                        f"${ALLOCATOR_ENV} or system)")
    p.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    return p.parse_args(argv)


class Client:
    def __init__(self, base: str, key: str):
        self.base, self.key = base, key

    def call(self, path: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read()
                return r.status, json.loads(text) if text.strip() else {}
        except urllib.error.HTTPError as e:
            return e.code, {"error": e.read().decode(errors="replace")[:300]}
        except OSError as e:
            return 0, {"error": str(e)}


class Load:
    """Trace requests (prompt and output lengths) sent back to back by a few threads."""

    def __init__(self, client: Client, model: str, requests: list[trace.TraceRequest], args, rng: random.Random):
        self.client, self.model, self.args = client, model, args
        self.requests, self.rng = requests, rng
        self.next = 0
        self.lock = threading.Lock()
        self.sent = self.completed = 0
        self.failures: list[str] = []
        self.wrong_length: list[str] = []
        self.stop = threading.Event()
        self.running = threading.Event()
        self.running.set()
        self.in_flight = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(args.concurrency)]

    def _take(self) -> tuple[list[int], int]:
        while True:  # counted in flight under the lock that pause() clears `running` under
            self.running.wait()
            with self.lock:
                if self.running.is_set():
                    self.in_flight += 1
                    break
        with self.lock:
            r = self.requests[self.next % len(self.requests)]
            self.next += 1
            self.sent += 1
            n_in = max(1, min(r.input_length, self.args.max_input))
            prompt = [self.rng.randrange(1000, 40000) for _ in range(n_in)]
        return prompt, max(1, min(r.output_length, self.args.max_output))

    def _run(self) -> None:
        while not self.stop.is_set():
            prompt, n_out = self._take()
            status, out = self.client.call("/v1/completions", {
                "model": self.model, "prompt": prompt, "max_tokens": n_out, "temperature": 0,
                "ignore_eos": True})
            with self.lock:
                self.in_flight -= 1
                if status != 200:
                    self.failures.append(f"{status}: {out.get('error', out)}"[:300])
                elif out["usage"]["completion_tokens"] != n_out:
                    self.wrong_length.append(f"asked {n_out}, got {out['usage']['completion_tokens']}")
                else:
                    self.completed += 1

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def pause(self, timeout: float = 300) -> None:
        """Stop sending and wait for every request in flight to finish."""
        with self.lock:
            self.running.clear()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)

    def resume(self) -> None:
        self.running.set()

    def finish(self) -> None:
        self.running.set()
        self.stop.set()
        for t in self.threads:
            t.join(timeout=600)


def map_count(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def sample(client: Client, pgid: int, plain: bool) -> dict | None:
    """Plain vLLM allocates its KV cache with torch.zeros (all resident from the start) and
    never changes its weights, so there all of RssAnon is compared."""
    status, state = client.call("/health" if plain else "/morphserve/state?kv_resident=1", timeout=60)
    if status != 200 or (not plain and "error" in state.get("memory", {})):
        return None
    rss = group_rss(pgid)
    pids = group_pids(pgid)
    mem = {"kv_resident_bytes": 0, "weights_bytes": 0, "prepared_bytes": 0} if plain else state["memory"]
    explained = mem["kv_resident_bytes"] + mem["weights_bytes"] + mem["prepared_bytes"]
    by_process = {}
    for pid in pids:
        try:  # keyed "pid:name" (vLLM names its engine core process), so growth can be placed
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            by_process[f"{pid}:{name}"] = process_rss(pid)["rss_anon_bytes"]
        except OSError:
            continue
    return {"t": time.monotonic(), "level": None if plain else state["level"],
            "rss_anon": rss["rss_anon_bytes"],
            "rss_anon_by_process": by_process,
            "unexplained_anon": rss["rss_anon_bytes"] - explained, "kv_resident": mem["kv_resident_bytes"],
            "processes": len(pids), "mappings": sum(map_count(p) for p in pids),
            "errors": 0 if plain else state["errors"], "transitions": 0 if plain else state.get("transitions", 0)}


def growth(checkpoints: list[dict], key: str, warmup: float, k: int = 3) -> dict:
    after = [c[key] for c in checkpoints if c["t"] >= warmup]
    if len(after) < 2:
        return {"first": None, "last": None, "growth": None, "n": len(after)}
    k = min(k, len(after) // 2)
    m0, m1 = statistics.median(after[:k]), statistics.median(after[-k:])
    ts = [c["t"] for c in checkpoints if c["t"] >= warmup]
    minutes = (statistics.median(ts[-k:]) - statistics.median(ts[:k])) / 60
    return {"first": m0, "last": m1, "growth": (m1 - m0) / m0, "n": len(after), "k": k,
            "per_minute": (m1 - m0) / minutes if minutes > 0 else None}


def checkpoint(client: Client, pgid: int, load: Load, t0: float, plain: bool) -> dict | None:
    """Quiescent reading: no request in flight, level 0, a second to settle."""
    load.pause()
    if not plain and client.call("/morphserve/level", {"level": 0})[0] != 200:
        load.resume()
        return None
    time.sleep(1.0)
    c = sample(client, pgid, plain)
    load.resume()
    if c is not None:
        c["t"] -= t0
    return c


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    key = secrets.token_hex(16)
    port = free_port()
    reqs = trace.load(trace.resolve("azure-conv", traces_dir()))
    log = Path(args.out).with_suffix(".server.log") if args.out else Path(f"/tmp/morphserve-soak-{port}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    common = ["--api-key", key, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
              "--max-num-seqs", str(args.concurrency), "--dtype", args.dtype]
    env = preload_env(args.allocator, {**os.environ, ALLOCATOR_ENV: args.allocator,
                                       "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    if args.plain:  # the same server without the plugin, for comparison
        cmd = [sys.executable, "-m", PLAIN_VLLM_SERVER, "--model", args.model,
               "--enforce-eager", *common]
        env["VLLM_PLUGINS"] = ""
    else:
        cmd = [sys.executable, "-m", "morphserve.cli", "serve", args.model, "--pack", args.pack,
               *(["--policy", args.policy] if args.policy != "none" else []),
               "--manual-min-interval", "0", *common]  # its level events and checkpoints are scripted
    proc = start_server(cmd, env, log, port)
    pgid = proc.pid
    client = Client(f"http://127.0.0.1:{port}", key)
    samples: list[dict] = []
    checkpoints: list[dict] = []
    forced = {"events": 0, "statuses": {}}
    health_failures = 0
    try:
        num_layers = 0 if args.plain else client.call("/morphserve/state")[1]["swappable_layers"]
        load = Load(client, args.model, reqs, args, rng)
        t0 = time.monotonic()
        load.start()
        next_force = t0 + args.force_every
        next_sample = t0
        next_checkpoint = t0 + args.checkpoint_every
        holding = False
        transitions_seen = 0
        level_now = 0
        # A checkpoint waits until the cycle since the last one has forced a level and handed
        # control back: on a slow machine (a 2-core AVX2 EPYC, bf16 emulated) one step of a
        # prefill batch can take seconds, and a timetable alone then left whole cycles with
        # nothing but a hand-back (a CI run: 8 level events, 4 transitions).
        cycle_events = 0

        def short() -> bool:
            return forced["events"] < args.min_level_events or transitions_seen < args.min_transitions

        while time.monotonic() < t0 + args.duration or (short() and time.monotonic() < t0 + 3 * args.duration):
            now = time.monotonic()
            if now >= next_checkpoint and (cycle_events >= 2 or args.plain or args.force_every <= 0):
                c = checkpoint(client, pgid, load, t0, args.plain)
                cycle_events, level_now = 0, 0
                if c is None:
                    health_failures += 1
                else:
                    checkpoints.append(c)
                    print(f"[soak] checkpoint at {c['t']:.0f}s: unexplained anon {c['unexplained_anon'] / 2**20:.1f} MiB, "
                          f"{c['mappings']} mappings", file=sys.stderr, flush=True)
                holding = True  # level 0 is forced now: the next event hands control back
                next_checkpoint = time.monotonic() + args.checkpoint_every
                next_force = time.monotonic() + args.force_every
                continue
            if now >= next_force and args.force_every > 0 and not args.plain:
                # a forced level differs from the last one seen, so a forced event moves weights
                body = {"level": None if holding else rng.choice([n for n in range(num_layers + 1) if n != level_now])}
                status, _ = client.call("/morphserve/level", body)
                forced["events"] += 1
                cycle_events += 1
                forced["statuses"][str(status)] = forced["statuses"].get(str(status), 0) + 1
                holding = not holding
                next_force = now + args.force_every
            if now >= next_sample:
                s = sample(client, pgid, args.plain)
                if s is None:
                    health_failures += 1
                else:
                    s["t"] -= t0
                    samples.append(s)
                    transitions_seen, level_now = s["transitions"], s["level"]
                next_sample = now + args.sample_every
                print(f"[soak] {now - t0:5.0f}s sent {load.sent} done {load.completed} failed {len(load.failures)} "
                      f"level {s['level'] if s else '?'} unexplained anon "
                      f"{s['unexplained_anon'] / 2**20 if s else 0:.0f} MiB", file=sys.stderr, flush=True)
            time.sleep(0.1)
        load.finish()
        status, state = client.call("/health" if args.plain else "/morphserve/state")
        state = {"errors": 0} if args.plain else state
        final_health = client.call("/health")[0]
    finally:
        stop_server(proc)
    survivors = group_survivors(pgid)

    memory = growth(checkpoints, "unexplained_anon", args.warmup)
    mappings = growth(checkpoints, "mappings", args.warmup)
    processes = sorted({s["processes"] for s in samples})
    checks = {
        "no failed request": not load.failures,
        "every output has the requested length": not load.wrong_length,
        "server healthy throughout": health_failures == 0 and final_health == 200,
        "no failed transition": state.get("errors") == 0,
        "level events accepted": set(forced["statuses"]) <= {"200"},
        f"at least {args.min_level_events} level events": forced["events"] >= args.min_level_events,
        f"at least {args.min_transitions} transitions": (state.get("transitions") or 0) >= args.min_transitions,
        f"unexplained anonymous memory grows < {args.memory_growth_limit:.1%}":
            memory["growth"] is not None and memory["growth"] < args.memory_growth_limit,
        f"mappings grow < {MAPPINGS_GROWTH_LIMIT:.0%}":
            mappings["growth"] is not None and mappings["growth"] < MAPPINGS_GROWTH_LIMIT,
        "process count constant": len(processes) == 1,
        "no process survives the stop": not survivors,
    }
    return {
        "args": {k: str(v) for k, v in vars(args).items()},
        "requests": {"sent": load.sent, "completed": load.completed, "failed": len(load.failures),
                     "wrong_length": len(load.wrong_length), "examples": (load.failures + load.wrong_length)[:5]},
        "level_events": forced, "transitions": state.get("transitions"),
        "transitions_by_direction": state.get("transitions_by_direction"),
        "memory_unexplained_anon": memory, "mappings": mappings, "processes": processes,
        "survivors": survivors, "checkpoints": checkpoints, "samples": samples, "checks": checks, "passed": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.plain and not args.pack:
        print("soak: --pack is required (or --plain)", file=sys.stderr)
        return 2
    if args.plain and (args.min_level_events or args.min_transitions):
        print("soak: --plain makes no level events or transitions; drop --min-level-events and --min-transitions",
              file=sys.stderr)
        return 2
    if args.duration < args.warmup + 2 * args.checkpoint_every:
        print(f"soak: --duration must leave at least 2 checkpoints after the warm-up "
              f"(>= {args.warmup + 2 * args.checkpoint_every:.0f} s)", file=sys.stderr)
        return 2
    try:
        preload_env(args.allocator, {})
    except AllocatorNotFound as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    result = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    r, m, mp = result["requests"], result["memory_unexplained_anon"], result["mappings"]
    print(f"requests: {r['completed']} completed of {r['sent']} sent, {r['failed']} failed, "
          f"{r['wrong_length']} of the wrong length")
    print(f"level events: {result['level_events']}; transitions {result['transitions']} "
          f"{result['transitions_by_direction']}")
    if m["growth"] is not None:
        print(f"unexplained anon memory: {m['first'] / 2**20:.1f} -> {m['last'] / 2**20:.1f} MiB "
              f"({m['growth']:+.2%}); mappings {mp['first']:.0f} -> {mp['last']:.0f} ({mp['growth']:+.2%})")
    for name, ok in result["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
