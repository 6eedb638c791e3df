"""How each evaluated system is started, and the warm-up every one of them gets.

Every system is a fresh vLLM OpenAI server on the same model, with the same scheduler
limits, seed and weights+KV budget:
- fp16: plain vLLM (MorphServe not even loaded), eager, KV = budget - bf16 weights;
- fp16-compiled: the same without --enforce-eager (kept for the suites that named it; any
  system can say `compiled: true`);
- w4: plain vLLM serving the pack's static W4A16 twin, KV = budget - W4 weights (the bytes
  quantization frees become KV);
- morphserve: `morphserve serve` with a policy, the budget given as its memory budget.
Every system runs eager unless it says `compiled: true` (vLLM's compiled CPU graph: plain
vLLM's own default, and `morphserve serve --compile`).
Any of them may keep its KV cache in FP8 (`kv_cache_dtype: fp8`): the same bytes, twice
the tokens, where vLLM's CPU attention supports it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from morphserve.errors import MorphServeError
from morphserve.offline import pack as packfmt
from morphserve.runtime import compute_cpus, huge_pages, large_buffers
from morphserve.runtime.kv_sizing import model_weight_bytes
from morphserve.evaluation.suite import SERVE_FLAGS, Budget, Suite, System
from morphserve.vllm.kernels import W4A16_ENV
from morphserve.vllm.server import PLAIN_VLLM_SERVER

WARMUP_PROMPT = "Summarize the following: " + " ".join(f"item {i}" for i in range(40))


# Fields any system may set, each a `morphserve serve` flag that works through the environment
# its processes start with: MorphServe gets the flag, a plain vLLM server the environment.
ENVIRONMENT_FIELDS = {
    "huge_pages": ("--huge-pages", huge_pages.apply),
    "large_buffers": ("--large-buffers", large_buffers.apply),
    "compute_cpus": ("--compute-cpus", compute_cpus.apply),
}


def server_command(system: System, budget: Budget, suite: Suite, model: Path, pack: Path, port: int,
                   out: Path) -> tuple[list[str], dict]:
    weights = model_weight_bytes(model, suite.dtype)  # what the engine holds: fp32 doubles a bf16 file
    total = budget.total_bytes(weights) + int((system.extra_memory_mb or 0) * 10**6)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    # /reset_prefix_cache is a dev-mode route; the server only listens on loopback here
    env.update(VLLM_LOGGING_LEVEL="WARNING", VLLM_SERVER_DEV_MODE="1")
    env.update(W4A16_ENV)  # every 4-bit system runs the kernel the pack's quality curve measured
    common = ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(suite.max_model_len),
              "--max-num-seqs", str(suite.max_num_seqs), "--served-model-name", "model", "--seed", str(suite.seed)]
    if system.kv_cache_dtype != "auto":  # the same KV bytes, in vLLM's FP8 format
        common += ["--kv-cache-dtype", system.kv_cache_dtype]
    if suite.dtype != "auto":
        common += ["--dtype", suite.dtype]
    if system.max_num_batched_tokens is not None:
        common += ["--max-num-batched-tokens", str(system.max_num_batched_tokens)]
    if system.kind in ("fp16", "fp16-compiled", "w4", "w8a8"):
        env["VLLM_PLUGINS"] = ""  # plain vLLM: MorphServe not loaded at all
        served = (static_tier_dir(pack, "w4a16") if system.kind == "w4" else static_w8a8_dir(pack)
                  if system.kind == "w8a8" else model)
        if system.kind == "w8a8":  # fp32 scales and the kernel's own rows, as MorphServe's budget counts them
            from morphserve.evaluation.held_bytes import engine_weight_bytes
            from morphserve.vllm.kernels import int8_held_bytes

            kv = total - engine_weight_bytes(served, suite.dtype, int8_held_bytes)
        else:
            kv = total - model_weight_bytes(served, suite.dtype)
        if kv <= 0:
            raise MorphServeError(f"system {system.name!r} at budget {budget.name!r}: {total / 1e6:.0f} MB does not "
                                  f"cover its weights, so no KV cache is left")
        cmd = [sys.executable, "-m", PLAIN_VLLM_SERVER, "--model", str(served),
               "--tokenizer", str(model), "--kv-cache-memory-bytes", str(kv), *common]
        if system.kind != "fp16-compiled" and not system.compiled:
            cmd.append("--enforce-eager")
        for field, (_, give) in ENVIRONMENT_FIELDS.items():  # the environment serve's flag would give it
            if getattr(system, field) is not None:
                give(env, getattr(system, field))
        return cmd, env
    cmd = [sys.executable, "-m", "morphserve.cli", "serve", str(model), "--pack", str(pack),
           *(["--policy", system.policy] if system.policy else []), "--memory-budget-gb", repr(total / 2**30),
           "--shrink-strategy", suite.shrink_strategy, "--transition-log", str(out / "transitions.jsonl"),
           "--kv-cache-memory-bytes", str(total - weights), "--compile" if system.compiled else "--enforce-eager",
           "--manual-min-interval", "0", *common]  # the warm-up forces 0 -> L -> 0 back to back
    if system.compress_mode is not None:
        cmd += ["--compress-mode", system.compress_mode]
    if system.tiers:
        cmd += ["--tiers", ",".join(system.tiers)]
    for field, flag in SERVE_FLAGS.items():
        value = getattr(system, field)
        if value is not None:
            cmd += [flag, value if isinstance(value, str) else repr(value)]
    if system.prompt_twin_layers:
        cmd += ["--prompt-twin-layers", str(system.prompt_twin_layers)]
    for field, (flag, _) in ENVIRONMENT_FIELDS.items():
        if getattr(system, field) is not None:
            cmd += [flag, getattr(system, field)]
    return cmd, env


def static_w8a8_dir(pack: Path) -> Path:
    return static_tier_dir(pack, "w8a8")


def static_tier_dir(pack: Path, name: str) -> Path:
    """The pack's checkpoint of tier `name`, served statically by plain vLLM."""
    tier = packfmt.load_manifest(pack).tier(name)
    if tier is None:
        raise MorphServeError(f"a {'w4' if name == 'w4a16' else name} system needs a pack with a {name.upper()} tier; "
                              f"{pack} has none (prepare it with --tiers {name if name == 'w8a8' else 'w8a8,w4a16'})")
    return pack / tier.quantized_dir


def _request(url: str, body: dict | None = None, method: str | None = None, timeout: float = 120) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read()
    return json.loads(text) if text.strip().startswith(b"{") else {}


# How long the level must hold still after the warm-up hands control back, and the most the
# evaluation waits for that: a policy that moves up while idle (`idle_rest: next_request`)
# does so within a cooldown and a move (about 2 s on 2 vCPUs), as it would on a server left
# idle between bursts; the trace then starts where such a server would be.
SETTLE_QUIET_S = 3.0
SETTLE_LIMIT_S = 30.0


def _settled_level(base: str) -> int | None:
    """The level once it has not changed for SETTLE_QUIET_S (or SETTLE_LIMIT_S has passed).
    A state read waits for a transition in progress, so a move is never read half-way."""
    start = time.monotonic()
    level = _request(f"{base}/morphserve/state?memory=0").get("level")
    since = time.monotonic()
    while time.monotonic() - since < SETTLE_QUIET_S and time.monotonic() - start < SETTLE_LIMIT_S:
        time.sleep(0.2)
        now = _request(f"{base}/morphserve/state?memory=0").get("level")
        if now != level:
            level, since = now, time.monotonic()
    return level


def _complete(base: str, n: int, max_tokens: int = 16) -> None:
    for i in range(n):
        _request(f"{base}/v1/completions", {"model": "model", "prompt": f"{i}. {WARMUP_PROMPT}",
                                            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})


def warm_up(system: System, base: str, n_requests: int, num_layers: int | None) -> dict:
    """The same requests for every system; MorphServe also runs each kernel once
    (0 -> L -> 0, then control goes back to its policy, or a `hold_level` is set and kept for
    the replay). The prefix cache is reset last so
    that no system starts the trace with cached blocks. `num_layers`: the top of the ladder
    the system serves."""
    done = {"requests": n_requests}
    if system.kind == "morphserve":
        state = _request(f"{base}/morphserve/state?memory=0")
        tiered = len(state.get("tiers", ["bf16", "w4a16"])) > 2  # the tiers served on this CPU
        floor = state.get("floor", 0)  # the lowest level served: where the policy rests
        # A tiered pack also runs all-W8A8 (the middle of its ladder) once.
        levels = [num_layers, num_layers // 2, floor] if tiered else [num_layers, floor]
        share = max(1, n_requests // len(levels))
        for k, level in enumerate(levels):
            _request(f"{base}/morphserve/level", {"level": level})
            _complete(base, share if k < len(levels) - 1 else n_requests - share * (len(levels) - 1))
        hold = system.hold_level
        if hold is not None and not floor <= hold <= num_layers:
            raise RuntimeError(f"hold_level {hold} is outside the levels served here ({floor}..{num_layers})")
        state = _request(f"{base}/morphserve/level", {"level": hold})  # None: back to the policy
        if state.get("level") != (floor if hold is None else hold):
            raise RuntimeError(f"warm-up left MorphServe at level {state.get('level')}, not "
                               f"{floor if hold is None else hold}")
        done["levels"] = levels + ([hold] if hold is not None else [])
        if hold is None:  # where the policy puts an idle server (idle_rest), before the trace's first request
            done["policy_start_level"] = _settled_level(base)
        # what the server has served so far: the replay's quality charge counts from here
        state = _request(f"{base}/morphserve/state?memory=0")
        done["served_by_level"] = state.get("served_tokens")
        done["prompt_twin_layers"] = state.get("prompt_twin_layers")  # the count held (what `auto` chose)
    else:
        _complete(base, n_requests)
    _request(f"{base}/reset_prefix_cache", method="POST")
    return done


def policy_record(base: str) -> dict:
    """What the policy says about the replay, from one state read after it: its quality
    ledger (the token-weighted perplexity increase over its window and the tokens in it;
    None without a budget), its last decisions, holds included (the server keeps 32, one
    per change of kind), for reading why a burst was not met, and the tokens it served by
    level (with prompt twins, the exact quality charge: `quality.twin_share_between`)."""
    state = _request(f"{base}/morphserve/state")
    signals = state.get("signals") or {}
    ledger = ({"ppl_increase": signals["quality_increase"], "tokens": signals["quality_tokens"]}
              if signals.get("quality_tokens") else None)
    return {"ledger": ledger, "decisions": state.get("recent_decisions") or [], "heap_trim": heap_trim(state),
            "served_by_level": state.get("served_tokens"), "boundary": state.get("boundary_us")}


def heap_trim(state: dict) -> dict | None:
    """The worker's heap trimmer counters (trims, skipped intervals, seconds inside
    malloc_trim) as of the worker's last memory reading, a few seconds old at most: how
    often a setting trimmed, beside the memory and speed it bought. None where the state has
    no memory reading (a read that failed) or the trimmer reports nothing."""
    memory = state.get("memory") or {}
    return memory.get("heap_trim") if isinstance(memory, dict) else None


def last_decisions(base: str, timeout: float = 8.0) -> dict:
    """The policy's last decisions just before a replay's drain deadline, best effort: in
    a run cut there they explain most (the level it held and why), but the server is busy
    then, so a read that fails is recorded as such rather than failing the run.
    The ledger is not read: a cut run's tokens are not all counted by the evaluation."""
    try:
        state = _request(f"{base}/morphserve/state", timeout=timeout)
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors; a bad body a ValueError
        return {"decisions": [], "decisions_error": f"state not read before the cut: {e}"}
    return {"decisions": state.get("recent_decisions") or [], "heap_trim": heap_trim(state),
            "boundary": state.get("boundary_us")}


def served_now(base: str, timeout: float = 8.0) -> dict | None:
    """The server's `served_tokens` at a run's cut, best effort: with it a cut run's quality
    is still charged at the levels that computed its tokens; None (a busy server) leaves
    the client's clock to charge them."""
    try:
        return _request(f"{base}/morphserve/state?memory=0", timeout=timeout).get("served_tokens")
    except (OSError, ValueError):
        return None


def kv_blocks(system: System, base: str) -> dict:
    """The KV blocks the server can use: vLLM's own count from /metrics, or, for
    MorphServe, its capacity at every level."""
    if system.kind == "morphserve":
        state = _request(f"{base}/morphserve/state")
        by_level = state["kv_blocks_by_level"]
        floor = state.get("floor", 0)  # the lowest level served: where it rests
        return {"level0": by_level[0], "max_level": by_level[-1], "by_level": by_level,
                "swappable_layers": state["swappable_layers"], "floor": floor, "rest": by_level[floor]}
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info"):
            for part in line[line.index("{") + 1: line.index("}")].split(","):
                key, _, value = part.partition("=")
                if key == "num_gpu_blocks":
                    # vLLM counts its null block too; it never holds KV
                    return {"level0": int(value.strip('"')) - 1}
    return {}
