"""The evaluation suite file: every window, budget, SLO, system and repetition count,
written down before anything runs. YAML is parsed with yaml.safe_load and validated
with pydantic; a mistake is one line naming the file and the key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from morphserve.errors import MorphServeError, first_field_error

SYSTEM_KINDS = ("fp16", "fp16-compiled", "w4", "w8a8", "morphserve")
# MorphServe-only system fields passed to `morphserve serve` as they are, and their flags: one
# list for the check that no other kind takes them, the fingerprint and the server's command.
SERVE_FLAGS = {
    "heap_trim_interval_s": "--heap-trim-interval",
    "heap_trim_mode": "--heap-trim-mode",
    "heap_trim_min_growth_mb": "--heap-trim-min-growth-mb",
    "frontend_heap_trim_interval_s": "--frontend-heap-trim-interval",
    "frontend_heap_trim_mode": "--frontend-heap-trim-mode",
    "kv_cold_cache_grace_s": "--kv-cold-cache-grace",
    "kv_cold_tail": "--kv-cold-tail",
    "kv_huge_pages": "--kv-huge-pages",
}


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="folder-safe label")
    trace: str = Field(description="azure-code, azure-conv or a CSV/JSONL path")
    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    rate_scale: float = Field(gt=0, le=1, description="keep this fraction of requests, evenly")
    length_scale: float = Field(gt=0, description="input lengths are multiplied by this")
    output_scale: float = Field(gt=0, description="output lengths are multiplied by this")
    max_input: int | None = Field(None, ge=1)
    timestamp_unit: Literal["s", "ms"] = "s"
    hash_block_size: int | None = Field(None, ge=1)
    regime: Literal["capacity", "capacity-beyond", "compute", "light"] = Field(
        description="what the window is meant to bind on: light (every static system meets the SLO), capacity "
                    "(FP16 runs out of KV, static W8A8 does not), capacity-beyond (static W8A8 runs out too), "
                    "compute (the CPU, not KV, runs out for FP16)")
    why: str = Field(description="the reason for the choice, written before the run")
    budgets: list[str] | None = Field(None, description="run this window only at these budgets (default: all)")


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # weights + KV in 10^6 bytes; or the full-precision weights (at the suite's dtype) plus kv_gib of KV
    total_mb: float | None = Field(None, gt=0)
    kv_gib: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one(self):
        if (self.total_mb is None) == (self.kv_gib is None):
            raise ValueError(f"budget {self.name!r}: give exactly one of total_mb and kv_gib")
        return self

    def total_bytes(self, full_weight_bytes: int) -> int:
        if self.total_mb is not None:
            return int(self.total_mb * 10**6)
        return full_weight_bytes + int(self.kv_gib * 2**30)


class System(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["fp16", "fp16-compiled", "w4", "w8a8", "morphserve"] = Field(
        description="w4 / w8a8: plain vLLM serving the pack's W4A16 / W8A8 checkpoint statically")
    policy: str | None = Field(None, description="MorphServe only: a preset or policy YAML (may be left out with a "
                                                 "hold_level: then no policy is loaded at all)")
    compress_mode: Literal["background", "sync"] | None = Field(
        None, description="MorphServe only: `morphserve serve --compress-mode` (default: serve's default)")
    tiers: list[Literal["w8a8", "w4a16"]] | None = Field(
        None, description="MorphServe only: the pack tiers to serve (`morphserve serve --tiers`), e.g. the "
                          "ladder `prepare --tiers auto` builds on this CPU (default: every tier that runs here)")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="fp8: vLLM's FP8 KV cache (twice the tokens in the same bytes; x86 with AVX-512 "
                            "or AMX only), for any kind")
    hold_level: int | None = Field(
        None, ge=0, description="MorphServe only: after the warm-up, hold this level for the whole replay (a "
                                "diagnostic: the runtime at one rung, without its policy's moves)")
    heap_trim_interval_s: float | None = Field(
        None, ge=0, description="MorphServe only: `morphserve serve --heap-trim-interval` (0: off; default: "
                                "serve's default)")
    heap_trim_min_growth_mb: float | None = Field(
        None, ge=0, description="MorphServe only: `morphserve serve --heap-trim-min-growth-mb` (0: trim every "
                                "interval; default: serve's default)")
    heap_trim_mode: Literal["boundary", "thread", "idle"] | None = Field(
        None, description="MorphServe only: `morphserve serve --heap-trim-mode` (default: serve's default)")
    frontend_heap_trim_interval_s: float | None = Field(
        None, ge=0, description="MorphServe only: `morphserve serve --frontend-heap-trim-interval` (default: serve's "
                                "default)")
    frontend_heap_trim_mode: Literal["thread", "idle"] | None = Field(
        None, description="MorphServe only: `morphserve serve --frontend-heap-trim-mode` (default: serve's default)")
    kv_cold_cache_grace_s: float | None = Field(
        None, ge=0, description="MorphServe only: `morphserve serve --kv-cold-cache-grace` (default: serve's "
                                "default)")
    kv_cold_tail: Literal["on", "off"] | None = Field(
        None, description="MorphServe only: `morphserve serve --kv-cold-tail` (default: serve's default)")
    kv_huge_pages: Literal["on", "off"] | None = Field(
        None, description="MorphServe only: `morphserve serve --kv-huge-pages` (default: serve's default)")
    prompt_twin_layers: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description="MorphServe only: `morphserve serve --prompt-twin-layers` (W8A8 twins of this many "
                          "layers held for prompt-sized steps, the steps they compute charged at least that level; "
                          "auto: the server decides from its kernel profile, and the run is charged by the count "
                          "it reports)")
    huge_pages: Literal["auto", "off"] | None = Field(
        None, description="any system: its server's processes ask for transparent huge pages (auto) or not (off), "
                          "`morphserve serve --huge-pages` (morphserve.runtime.huge_pages); default: a plain vLLM "
                          "server as it starts, MorphServe at serve's default")
    large_buffers: Literal["heap", "mapped"] | None = Field(
        None, description="any system: where glibc puts its server's buffers of 4 MiB or more, `morphserve serve "
                          "--large-buffers` (morphserve.runtime.large_buffers): heap = glibc's own choice, mapped = "
                          "mappings of their own, advised huge; default: a plain vLLM server as it starts, MorphServe "
                          "at serve's default")
    compute_cpus: Literal["all", "vllm"] | None = Field(
        None, description="any system: which CPUs run the model's threads, `morphserve serve --compute-cpus` "
                          "(morphserve.runtime.compute_cpus): all = every CPU (vLLM's VLLM_CPU_NUM_OF_RESERVED_CPU=0), "
                          "vllm = vLLM's automatic binding, one CPU per rank kept for the engine core; default: "
                          "vLLM's binding for a plain server, serve's default for MorphServe")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="any system: vLLM's `--max-num-batched-tokens`, the tokens one step may schedule "
                                "(default: vLLM's, 2048 for a CPU server); a fixed chunk for long prompts, the "
                                "static counterpart of MorphServe's `step_token_budget`")
    extra_memory_mb: float | None = Field(
        None, description="any system: its weights+KV budget is the cell's plus this many 10^6 bytes (negative: "
                          "less), for a comparison at the same measured memory rather than the same nominal "
                          "budget; set before the run, from an earlier run's measured peak RSS")
    compiled: bool = Field(
        False, description="any system: vLLM's compiled CPU graph (plain vLLM's own default, what a user of a "
                           "static checkpoint runs; MorphServe: `morphserve serve --compile`) instead of "
                           "--enforce-eager; fp16-compiled is fp16 with this on")
    budgets: list[str] | None = Field(None, description="run only at these budgets (default: all)")
    windows: list[str] | None = Field(None, description="run only in these windows (default: all)")

    @model_validator(mode="after")
    def _policy(self):
        if self.kind == "morphserve" and not self.policy and self.hold_level is None:
            raise ValueError(f"system {self.name!r}: a morphserve system needs a policy (or a hold_level: "
                             f"the runtime held at one rung, with no policy loaded)")
        if self.kind != "morphserve" and (self.policy or self.compress_mode or self.tiers
                                          or self.hold_level is not None or self.prompt_twin_layers is not None
                                          or any(getattr(self, f) is not None for f in SERVE_FLAGS)):
            raise ValueError(f"system {self.name!r}: only a morphserve system takes a policy, a compress_mode, "
                             f"tiers, a hold_level, heap-trim or cold-cache settings or prompt twins")
        return self


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    windows: list[Window] = Field(min_length=1)
    budgets: list[Budget] = Field(min_length=1)
    systems: list[System] = Field(min_length=1)
    baseline: str = Field("fp16", description="the system every ratio is taken against")
    static_quantized: str | None = Field("w4", description="the static W4 system the quality target refers to")
    repetitions: int = Field(3, ge=1, le=20)
    slo_ttft_s: float = Field(2.0, gt=0)
    slo_tpot_s: float = Field(0.2, gt=0)
    drain_s: float = Field(60.0, gt=0, description="after the window ends, how long unfinished requests may run "
                                                    "before the server is stopped and they count as failed")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="every server's --dtype (auto: the model's, bf16). float32 where the CPU has no bf16 "
                            "arithmetic (AVX2: torch emulates bf16, several times slower); weights then count "
                            "at fp32 width in every system's KV sizing, so budgets must cover fp32 weights")
    max_model_len: int = Field(2048, ge=128)
    max_num_seqs: int = Field(64, ge=1)
    shrink_strategy: Literal["wait", "preempt", "migrate"] = "wait"
    seed: int = 0
    warmup_requests: int = Field(4, ge=1, le=64)

    @model_validator(mode="after")
    def _names(self):
        for what, items in (("window", self.windows), ("budget", self.budgets), ("system", self.systems)):
            names = [x.name for x in items]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{what} names must be unique, repeated: {', '.join(sorted(dup))}")
        systems = {s.name: s for s in self.systems}
        budgets = {b.name for b in self.budgets}
        if self.baseline not in systems:
            raise ValueError(f"baseline {self.baseline!r} is not one of the systems")
        if self.static_quantized is not None and self.static_quantized not in systems:
            raise ValueError(f"static_quantized {self.static_quantized!r} is not one of the systems")
        windows = {w.name for w in self.windows}
        for w in self.windows:
            unknown = set(w.budgets or ()) - budgets
            if unknown:
                raise ValueError(f"window {w.name!r}: unknown budget(s) {', '.join(sorted(unknown))}")
        for s in self.systems:
            for what, given, known in (("budget", s.budgets, budgets), ("window", s.windows, windows)):
                unknown = set(given or ()) - known
                if unknown:
                    raise ValueError(f"system {s.name!r}: unknown {what}(s) {', '.join(sorted(unknown))}")
        if systems[self.baseline].budgets is not None or systems[self.baseline].windows is not None:
            raise ValueError("the baseline must run in every cell")
        return self

    def cells(self) -> list[tuple[Window, Budget]]:
        return [(w, b) for w in self.windows for b in self.budgets if w.budgets is None or b.name in w.budgets]

    def systems_at(self, window: Window, budget: Budget) -> list[System]:
        return [s for s in self.systems if (s.budgets is None or budget.name in s.budgets)
                and (s.windows is None or window.name in s.windows)]

    def fingerprint(self) -> str:
        """What a resumed run must match: the suite's content, not its file's layout."""
        dump = self.model_dump()
        if dump["dtype"] == "auto":  # a field added later: suites that do not use it keep their fingerprint
            del dump["dtype"]
        for w in dump["windows"]:  # a field added later: suites that do not use it keep their fingerprint
            if w["budgets"] is None:
                del w["budgets"]
        for s in dump["systems"]:
            if s["kv_cache_dtype"] == "auto":
                del s["kv_cache_dtype"]
            for later in ("compress_mode", "tiers", "hold_level", *SERVE_FLAGS, "prompt_twin_layers", "huge_pages",
                          "max_num_batched_tokens", "extra_memory_mb", "compute_cpus", "large_buffers"):
                if s[later] is None:
                    del s[later]
            if not s["compiled"]:
                del s["compiled"]
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def load_suite(path: Path) -> Suite:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise MorphServeError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MorphServeError(f"{path}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        raise MorphServeError(f"{path}: expected a mapping, got {type(raw).__name__}")
    try:
        return Suite.model_validate(raw)
    except ValidationError as e:
        raise MorphServeError(f"{path}: {first_error(e)}") from None


def first_error(e: ValidationError) -> str:
    key, msg, kind, given = first_field_error(e)
    if not key:
        return msg
    if kind == "extra_forbidden":
        return f"unknown key {key!r}"
    return f"{key}: {msg}" + (f" (got {given})" if given is not None else "")
