"""Policy YAML: schema, presets, and loading with one clear error per problem.

A policy reference is a preset name (accuracy, default, performance: the files next to
this module) or a path to a YAML file. YAML is parsed with yaml.safe_load only.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PRESETS = ("accuracy", "default", "performance")


class PolicyError(ValueError):
    pass


DEPRECATED_KEYS = {"max_quantized_layers": "max_level", "max_quantized_fraction": "max_level_fraction"}
log = logging.getLogger("morphserve")


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Literal["threshold", "slo", "demand"] = Field(
        description="threshold (the paper's), slo (predictive, staircase) or demand (jumps to the level the "
                    "demand needs, weighs step time and a quality budget over time)")
    # quality guard: the tightest of these bounds the level
    max_level_fraction: float = Field(1.0, ge=0.0, le=1.0, description="of the ladder's top level")
    max_level: int | None = Field(None, ge=0, description="the highest rung of the ladder the policy may ask for")
    max_ppl_increase: float | None = Field(
        None, gt=0.0, description="relative, read against the pack's quality.json (0.05 = +5%)")
    # transitions
    step_layers: int = Field(4, ge=1, description="layers per transition")
    cooldown_s: float = Field(1.0, ge=0.0, description="minimum time between transitions")
    quick_up: bool = Field(True, description="demand: one move up may follow a move up that waited out the "
                                             "cooldown at once, while requests wait for KV blocks (false: every "
                                             "transition waits out cooldown_s)")
    calm_s: float = Field(2.0, ge=0.0, description="how long load must stay low before a restore")
    window_s: float = Field(2.0, gt=0.0, description="signal smoothing window")
    # threshold policy
    kv_high: float = Field(0.85, gt=0.0, le=1.0, description="quantize when KV usage reaches this")
    kv_low: float = Field(0.7, ge=0.0, lt=1.0, description="restore only if usage after it stays below this")
    queue_delay_high_s: float = Field(0.1, gt=0.0, description="quantize when the oldest waiting request is this old")
    # slo policy
    ttft_slo_s: float = Field(2.0, gt=0.0)
    tpot_slo_s: float = Field(0.2, gt=0.0)
    slo_margin: float = Field(0.8, gt=0.0, le=1.0, description="aim at this fraction of the SLOs")
    restore_margin: float = Field(0.5, gt=0.0, le=1.0, description="restore only if predictions stay under this fraction")
    horizon_s: float = Field(5.0, gt=0.0, description="how far ahead arrivals are projected")
    # demand policy
    headroom: float = Field(0.1, ge=0.0, description="quantize until capacity >= demand x (1 + headroom)")
    restore_headroom: float = Field(
        0.3, ge=0.0, description="restore only to a level whose capacity >= demand x (1 + restore_headroom)")
    max_avg_ppl_increase: float | None = Field(
        None, gt=0.0, description="quality budget over time: token-weighted perplexity increase accepted over "
                                  "quality_window_s (0.05 = +5%), read against the pack's quality.json")
    quality_window_s: float = Field(300.0, gt=0.0, description="the window the quality budget is averaged over")
    quality_no_worse_than: Literal["w8a8"] | None = Field(
        None, description="w8a8: with a pack that serves a W8A8 tier, the quality budget over time is at most "
                          "what serving every layer in W8A8 costs (static W8A8's increase, from the pack's "
                          "quality.json), so on average MorphServe is no worse than a static W8A8 checkpoint; "
                          "without such a tier, max_avg_ppl_increase alone")
    fast_rest_idle_s: float | None = Field(
        None, ge=0.0, description="while requests come, rest on the top of the run of rungs above the "
                                  "highest-quality sufficient one that compute the present work faster (a decode "
                                  "step at the present batch and a prompt token, measured by the step-time model), "
                                  "within the quality limits, and restore below it only after this many seconds "
                                  "without a request; null: rest on the highest-quality rung that meets the SLOs")
    further_slack: float = Field(
        0.0, ge=0.0, le=0.5, description="how much speed a climb past the highest-quality sufficient rung (a move "
                                        "up for speed, or resting fast with fast_rest_idle_s) leaves for quality: "
                                        "the climb stops at the lowest rung of the run of faster rungs whose decode "
                                        "step and prompt token are each within this fraction of the run's top's "
                                        "(0.05: at most 5% slower), so the last, dearest layers stay in full "
                                        "precision where they buy little speed; 0: the top of the run")
    idle_rest: Literal["quality", "next_request"] = Field(
        "quality", description="with fast_rest_idle_s: where an idle server waits once fast_rest_idle_s has passed "
                               "without a request. quality: the highest-quality rung (bf16); next_request: the "
                               "rung a request arriving then would be moved to (the run of faster rungs at batch "
                               "1, measured), so that a burst's first request finds the server there instead of "
                               "waiting on a move (a move made while idle stalls nobody, and idle time serves no "
                               "token that quality could be charged for); where int8 is slower at batch 1 that "
                               "is bf16 either way")
    admission_cap: bool = Field(
        False, description="demand: where the CPU, not KV, runs out, admit only as many requests at once as keep "
                           "the step each feels (decode plus the others' prefill) within tpot_slo x slo_margin at "
                           "the level served, from the step-time model (vLLM's max_num_active_reqs, set at step "
                           "boundaries; nothing running is preempted); false: vLLM admits as its KV allows")
    kv_admission: bool = Field(
        False, description="demand: admit a waiting request only while the blocks every running request and it "
                           "will hold at completion (prompt plus expected output) fit the level's KV capacity, so "
                           "that vLLM need not preempt one and compute it again (vLLM's max_num_active_reqs, set at "
                           "step boundaries; nothing running is preempted; an empty engine always admits one); "
                           "false: vLLM admits once a prompt's blocks are free")
    step_token_budget: bool = Field(
        False, description="demand: while requests decode, schedule only as many tokens per step as keep the step "
                           "within tpot_slo x slo_margin at the level served, from the step-time model (vLLM's "
                           "chunked prefill then cuts long prompts, so decodes come round every step; vLLM's "
                           "max_num_scheduled_tokens, set at step boundaries; at least 128 prompt tokens a step); "
                           "false: vLLM's max_num_batched_tokens")
    kernel_profile: bool = Field(
        True, description="time each tier's kernels at start-up (seconds, cached per machine) so the step-time "
                          "model knows which rung is fast enough before the first request")
    expected_output_tokens: int = Field(
        256, ge=1, description="output length assumed for a request until finished requests teach the real one")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data):
        """The names from before the ladder had tiers, when a level counted W4A16 layers:
        accepted for one release, with a warning."""
        if isinstance(data, dict):
            for old, new in DEPRECATED_KEYS.items():
                if old in data:
                    if new in data:
                        raise ValueError(f"{old} is the deprecated name of {new}: give only {new}")
                    log.warning("policy key %s is deprecated (the level is a rung of the ladder); use %s", old, new)
                    data = {**{k: v for k, v in data.items() if k != old}, new: data[old]}
        return data

    @model_validator(mode="after")
    def _bands(self):
        if self.kv_low >= self.kv_high:
            raise ValueError(f"kv_low ({self.kv_low}) must be below kv_high ({self.kv_high}): that gap is the hysteresis")
        if self.restore_margin > self.slo_margin:
            raise ValueError("restore_margin must not exceed slo_margin: that gap is the hysteresis")
        if self.restore_headroom < self.headroom:
            raise ValueError(f"restore_headroom ({self.restore_headroom}) must not be below headroom "
                             f"({self.headroom}): that gap is the hysteresis")
        return self

    def level_cap(self, num_layers: int, quality: dict | None) -> int:
        """The largest level the quality guard allows."""
        cap = int(self.max_level_fraction * num_layers + 1e-9)
        if self.max_level is not None:
            cap = min(cap, self.max_level)
        if self.max_ppl_increase is not None:
            cap = min(cap, ppl_cap(quality, self.max_ppl_increase))
        return max(0, min(cap, num_layers))


def quality_curve(quality: dict | None, needed_by: str = "max_ppl_increase") -> dict[int, float]:
    """Perplexity at each level: the tiered ladder's curve (quality.json, ladder.ppl) in a
    pack with tiers, else the W4A16 swap order's (orders.lis.ppl)."""
    try:
        source = quality["ladder"] if "ladder" in quality else quality["orders"]["lis"]
        curve = {int(k): float(v) for k, v in source["ppl"].items()}
        if 0 not in curve or curve[0] <= 0:
            raise ValueError
    except (TypeError, KeyError, ValueError, AttributeError):
        raise PolicyError(f"{needed_by} needs the pack's quality.json (orders.lis.ppl)") from None
    return curve


def kv_factor(quality: dict | None, level: int) -> float:
    """The served KV cache's own perplexity factor at `level` (1 where none was measured:
    a bf16 cache, or an FP8 one nobody measured). The engine puts it in `quality["kv_cost"]`
    (morphserve.offline.kv_cost), so every figure the policy reads includes what the
    evaluation charges: perplexity x factor, against bf16 weights with a bf16 cache."""
    factors = (quality or {}).get("kv_cost", {}).get("factor_by_level")
    if not factors:
        return 1.0
    top = max(int(k) for k in factors)
    return float(factors[str(min(level, top))])


def dearer_fill(curve: dict) -> dict[int, float]:
    """A curve measured at some levels (keys: levels, as ints or strings), given at every
    level from 0 to its last: a level between two measured ones takes the one above it, the
    dearer side (perplexity rises with the level), so a quality budget read from it is never
    too generous. A tiered pack measures its W4A16-only curve this sparsely (`prepare`)."""
    values = {int(k): v for k, v in curve.items()}
    known = sorted(values)
    return {k: values[next(m for m in known if m >= k)] for k in range(known[-1] + 1)}


def prompt_twin_layers(quality: dict | None) -> int:
    """N for a server holding prompt twins for the ladder's first N layers (the engine marks
    `quality["prompt_twins"]`), else 0."""
    return int((quality or {}).get("prompt_twins", {}).get("layers", 0))


def prompt_twin_min_tokens(quality: dict | None) -> int | None:
    """The smallest step the prompt twins compute (None: no twins, or a mark written before
    the engine recorded it, where every step is charged as a twin step)."""
    twins = (quality or {}).get("prompt_twins") or {}
    return int(twins["min_tokens"]) if twins.get("layers") and twins.get("min_tokens") else None


def charged_level(quality: dict | None, level: int, through_twins: bool = True) -> int:
    """The level a token served at `level` is charged at. A server holding prompt twins for
    the ladder's first N layers computes every step of at least the twins' `min_tokens`
    through them at any level below N (a prompt's, and the decodes that share its step):
    those steps' tokens are charged at max(level, N), the others at `level`. Planning ahead,
    where the steps to come are not known, charges every token as a twin step's (an upper
    bound)."""
    return max(level, prompt_twin_layers(quality)) if through_twins else level


def log_ppl_ratios(quality: dict | None, num_layers: int, through_twins: bool = True) -> list[float]:
    """log(ppl_k / ppl_0) for k = 0..num_layers, each level charged as `charged_level` says;
    a level the curve skips takes the next one measured above it (the dearer neighbour), a
    level past its last takes the last."""
    curve = dearer_fill(quality_curve(quality, "max_avg_ppl_increase"))
    top = max(curve)
    return [math.log(curve[min(charged_level(quality, k, through_twins), top)] * kv_factor(quality, k) / curve[0])
            for k in range(num_layers + 1)]


def static_tier_level(mix: list[dict[str, int]], tier: str) -> int | None:
    """The level at which every swappable layer computes in `tier` (None if no level does)."""
    layers = sum(mix[-1].values()) if mix else 0
    return next((k for k, counts in enumerate(mix) if layers and counts.get(tier, 0) == layers
                 and sum(counts.values()) == layers), None)


def resolve_budget(cfg: PolicyConfig, quality: dict | None, mix: list[dict[str, int]]) -> PolicyConfig:
    """The config with `quality_no_worse_than` folded into `max_avg_ppl_increase` for this
    pack (unchanged when the pack serves no such tier)."""
    if cfg.quality_no_worse_than is None:
        return cfg
    level = static_tier_level(mix, cfg.quality_no_worse_than)
    if level is None:
        log.info("policy: quality_no_worse_than %s: the pack serves no such tier here; the budget is %s",
                 cfg.quality_no_worse_than, cfg.max_avg_ppl_increase)
        return cfg
    curve = quality_curve(quality, "quality_no_worse_than")
    above = next((k for k in sorted(curve) if k >= level), None)
    if above is None:
        raise PolicyError(f"quality_no_worse_than: the pack's quality curve has no level at or above {level}")
    static = curve[above] * kv_factor(quality, above) / curve[0] - 1  # served with this KV cache
    budget = static if cfg.max_avg_ppl_increase is None else min(cfg.max_avg_ppl_increase, static)
    return cfg.model_copy(update={"max_avg_ppl_increase": max(budget, 1e-6)})


def budget_below_level0(cfg: PolicyConfig, ratios: list[float] | None) -> str | None:
    """Why no level fits the quality budget on this server, or None.

    Level 0 is charged the KV cache's own cost (kv_factor): an FP8 cache measured at +7.38%
    on an AMX Xeon, over `default`'s +5% cap. Every level is then over budget, so
    `quality_limit` returns 0 and the policy holds bf16 weights under any load, queueing
    requests that every quantized rung would serve (suite-v4-amx: 80 of 102 requests
    violated, against 33 for static W8A8, medians). Said once at start, since nothing in the
    decisions' own reasons tells an operator the budget can never be met."""
    budget = cfg.max_avg_ppl_increase
    if budget is None or not ratios or ratios[0] <= math.log1p(budget) + 1e-12:
        return None
    return (f"the quality budget over time (+{budget:.2%}) is below what level 0 already costs on this server "
            f"(+{math.expm1(ratios[0]):.2%}: its KV cache's own perplexity cost), so the policy holds level 0 "
            f"under any load; raise max_avg_ppl_increase in a policy file above it, or serve a bf16 KV cache")


def for_compiled_engine(cfg: PolicyConfig) -> tuple[PolicyConfig, str | None]:
    """The policy a compiled engine runs, and why it differs (None: it does not).

    `further_slack` stops a climb at a rung the kernel profile says is within the slack of the
    run's top. That profile times vLLM's kernels eager, one layer at a time; in a compiled
    engine the partial rungs it picks were not that close to the top: served on a Zen 4 EPYC
    at two requests at once, `default` resting at levels 23-25 gave 0.82x the output tokens/s
    of the same server held at all-W8A8 (two rounds, ranges apart; docs/RESULTS.md,
    "Compiled servers resting below the top"). So where the premise is not measured the climb
    goes to the run's top; an eager engine keeps the slack."""
    if not cfg.further_slack:
        return cfg, None
    return (cfg.model_copy(update={"further_slack": 0.0}),
            f"further_slack {cfg.further_slack:g} -> 0 on a compiled engine: the kernel profile that measures "
            f"the slack times eager kernels, and compiled servers resting inside the slack ran slower than it says")


def ppl_cap(quality: dict | None, max_increase: float) -> int:
    curve = quality_curve(quality)
    base = curve[0]
    cap = 0
    for k in sorted(curve):  # the levels the runtime passes through, in order
        if curve[k] * kv_factor(quality, k) > base * (1 + max_increase):
            break
        cap = k
    return cap


def _resolve(ref: str) -> Path:
    if ref in PRESETS:
        return PRESETS_DIR / f"{ref}.yaml"
    path = Path(ref)
    if not path.exists():
        raise PolicyError(f"policy {ref!r}: not a preset ({', '.join(PRESETS)}) and no such file")
    return path


def load_policy(ref: str) -> tuple[PolicyConfig, Path]:
    path = _resolve(ref)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return PolicyConfig.model_validate(raw), path
    except ValidationError as e:
        first = e.errors()[0]
        if not first["loc"]:  # a cross-field rule: its message names the keys
            raise PolicyError(f"{path}: {first['msg'].removeprefix('Value error, ')}") from None
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            known = ", ".join(PolicyConfig.model_fields)
            raise PolicyError(f"{path}: unknown key {key!r} (known keys: {known})") from None
        value = f" (got {json.dumps(first['input'], default=str)})" if first["type"] != "missing" else ""
        raise PolicyError(f"{path}: {key}: {first['msg']}{value}") from None
