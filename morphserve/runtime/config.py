"""The `additional_config["morphserve"]` block: schema, validation, pack check.

Validated once in the frontend (before the engine starts), so a bad config or a pack
that does not twin the served model stops startup with one clear error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from morphserve.offline import pack as packfmt
from morphserve.errors import MorphServeError, first_field_error
from morphserve.runtime.heap_trimmer import (DEFAULT_INTERVAL_S, DEFAULT_MIN_GROWTH_BYTES, DEFAULT_MODE,
                                              FRONTEND_DEFAULT_MODE, FRONTEND_INTERVAL_S)
from morphserve.runtime.frontend_cpus import DEFAULT_MODE as FRONTEND_DEFAULT
from morphserve.runtime.prompt_twin_choice import choose_prompt_twins

# The config accepted in this process, if MorphServe was activated here (the API server
# mounts /morphserve/* only then).
ACTIVE: "MorphConfig | None" = None
log = logging.getLogger("morphserve")


class MorphConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pack: str = Field(description="pack folder written by `morphserve prepare`")
    policy: str | None = Field(default=None, description="policy preset name or YAML path (policy issue)")
    twin: Literal["pack", "identity"] = Field(
        default="pack", description="'identity' swaps in an exact bf16 copy instead of W4 (testing aid)")
    verify_hash: bool = Field(default=True, description="check the served weights' sha256 against the pack")
    transition_log: str | None = Field(default=None, description="append every transition here as JSONL")
    memory_budget_gb: float | None = Field(
        default=None, gt=0, description="weights + KV budget in GiB; default: what vLLM computed at start-up")
    shrink_strategy: Literal["wait", "preempt", "migrate"] = Field(
        default="wait", description="when a restore finds KV blocks in use above the new capacity: wait for "
        "them to free (the paper), preempt their requests (recompute), or migrate them to free low blocks")
    manual_min_interval_s: float = Field(
        default=1.0, ge=0, le=3600, description="POST /morphserve/level may change the level at most once per this "
        "many seconds (429 otherwise); 0 turns the limit off")
    tiers: list[Literal["w8a8", "w4a16"]] | None = Field(
        default=None, description="the pack tiers to serve (default: every tier of the pack this CPU's vLLM build "
        "runs, probed at start-up); the ladder climbs only these")
    restore_mode: Literal["background", "sync"] = Field(
        default="background", description="policy-driven restores: prepare the bf16 layers in a worker thread "
        "and install them at step boundaries (background), or all inside one step boundary (sync). "
        "Manual POST /morphserve/level transitions are always sync")
    compress_mode: Literal["background", "sync"] = Field(
        default="sync", description="policy-driven compressions while requests are decoding: prepare the new "
        "tier's layers in a worker thread and install them at step boundaries, the KV growing once the last is "
        "in (background; their tokens keep coming at the old rung meanwhile), or all inside one step boundary "
        "(sync; every decoding request waits for the whole move). With nothing decoding a compression is always "
        "sync: the prompts about to be computed are the only ones waiting, and they are computed on the new rung. "
        "Manual transitions are always sync")
    heap_trim_interval_s: float = Field(
        default=DEFAULT_INTERVAL_S, ge=0, le=60,
        description="every this many seconds each worker hands its freed heap back to the OS (glibc malloc_trim; "
        "morphserve.runtime.heap_trimmer), so measured memory follows what the layers and the KV cache hold; 0 "
        "turns it off")
    frontend_heap_trim_interval_s: float = Field(
        default=FRONTEND_INTERVAL_S, ge=0, le=600,
        description="every this many seconds the engine core and the API server hand their own freed heap back to "
        "the OS (glibc malloc_trim from a thread in each, on whatever core they run): about 30 MiB each after "
        "start-up on SmolLM2-135M, which a server otherwise keeps resident for its whole life (the memory that "
        "lets the workers trim every 5 s, not 0.5 s); 0 turns it off")
    frontend_heap_trim_mode: Literal["thread", "idle"] = Field(
        default=FRONTEND_DEFAULT_MODE, description="when the engine core and the API server trim their own heap: "
        "from a thread every interval, also while they serve (thread), or only at an idle moment at least an "
        "interval after the last trim (idle: the engine core when it has no step to run and has run one since, "
        "the API server when no request is in flight), so a trim never shares a core with serving")
    heap_trim_mode: Literal["boundary", "thread", "idle"] = Field(
        default=DEFAULT_MODE, description="when the workers trim: at a step boundary once the interval has passed, "
        "asked by the engine core (boundary: a step pays at most one refault of its buffers), or from a thread in "
        "each worker every interval, also in the middle of a step (thread: a long prompt's step then refaults its "
        "buffers after every trim inside it), or at an idle moment once the interval has passed and, while requests "
        "run, only once a worker's heap has grown 64 MiB past its high-water mark (idle: a steady server under load "
        "refaults nothing)")
    frontend_cpus: Literal["auto", "off"] = Field(
        default=FRONTEND_DEFAULT, description="auto: once vLLM has bound its workers to cores, the engine core and the API "
        "server move to the CPUs no worker is bound to, where any are left, so they never take a worker's core "
        "(morphserve.runtime.frontend_cpus); off (the default): they run wherever the OS puts them, as in plain "
        "vLLM")
    kv_cold_cache_grace_s: float = Field(
        default=0.0, ge=0, le=3600,
        description="a free KV block above the rest capacity (the cold tail, kv_resize.cold_tail) keeps its cached "
        "prefix for this many seconds before its pages are handed back, so a preempted request that resumes "
        "within it computes again only what no cached block holds; 0 (the default) drops the prefix at the "
        "next step boundary")
    compile: bool = Field(
        default=False, description="true: the engine runs vLLM's compiled CPU graph (Inductor; its own default "
        "without --enforce-eager), each swappable linear called through a slot a swap rewrites "
        "(morphserve.vllm.compiled_slots); start-up takes a compile (minutes on a small CPU, cached after). "
        "false (the default): eager, as every MorphServe figure before it was measured")
    kv_huge_pages: Literal["on", "off"] = Field(
        default="off", description="on: each CPU worker advises its KV reserve huge (madvise(MADV_HUGEPAGE)), as "
        "torch advises plain vLLM's KV tensor under --huge-pages auto, so attention reads the cache through 2 MiB "
        "pages; resident KV then rounds up to 2 MiB per layer's run of blocks, above what the budget equation "
        "counts (GET /morphserve/state's kv_resident_bytes measures it); off (the default): 4 KiB pages, resident "
        "KV exactly the blocks written")
    kv_cold_tail: Literal["on", "off"] = Field(
        default="off", description="on: KV blocks above the rest capacity are used last, keep no cached prefix, and "
        "their pages are handed back once free (kv_resize.cold_tail), so resident KV follows what the load held at "
        "once, not what it cycled through; off (the default since dev-zen4-step-times met its rule): every block "
        "behaves as in plain vLLM (cached prefixes kept, pages kept once written), so no block is faulted in again "
        "and no resumed request computes its prefix again, at the price of the rung's whole KV staying resident "
        "once the load has cycled through it (until a restore shrinks the pool)")
    heap_trim_min_growth_mb: float = Field(
        default=DEFAULT_MIN_GROWTH_BYTES / 2**20, ge=0, le=65536,
        description="a worker trims only once its resident set has grown this many MiB since its last trim "
        "(each trim makes the next steps fault their reused pages back in); 0 (the default) trims every interval")
    prompt_twin_layers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        default=0, description="keep the W8A8 twins of this many layers (the first the ladder quantizes) "
        "resident beside full precision and compute every step of at least prompt_twin_min_tokens tokens (a "
        "prompt's) through them: int8's prompt speed with full precision's decode speed where vLLM's int8 kernel "
        "is slower for a few rows and faster for many (an AVX2-only CPU). The twins are held inside the memory "
        "budget (fewer KV blocks below that level; where level 0 is left short of max_model_len, the server "
        "rests at the first level that holds it, its floor) and every token is charged the quality of at least that "
        "level. W8A8-only ladders; 0 (the default) holds none; auto: every layer's where this machine's kernel "
        "profile has int8 slower than full precision for a decode step and faster for a prompt's call, else none "
        "(morphserve.runtime.prompt_twin_choice; resolved as the engine starts)")
    prompt_twin_min_tokens: int = Field(
        default=128, ge=1, le=1 << 20, description="steps of at least this many tokens use the prompt twins")


def parse(raw) -> MorphConfig:
    if isinstance(raw, str):
        raw = {"pack": raw}
    try:
        return MorphConfig.model_validate(raw)
    except ValidationError as e:
        where, msg, _, _ = first_field_error(e)
        raise MorphServeError(f"invalid --additional-config morphserve.{where or 'morphserve'}: {msg}") from None


Probe = Callable[[list[str]], dict[str, "str | None"]]  # tier -> None (runs here) or why not


def serve_tiers(manifest: packfmt.Manifest, requested: list[str] | None, probe: Probe | None) -> list[str]:
    """The tiers to serve: those asked for (default: all of the pack's) that this CPU runs.

    A requested tier the pack lacks, or a pack none of whose tiers this CPU runs, is refused
    in one line naming what is missing; a tier dropped while another remains is served
    without, with one warning (the ladder is then that tier's rungs only)."""
    have = manifest.tier_names
    wanted = have if requested is None else [t for t in packfmt.TIER_NAMES if t in requested]
    absent = [t for t in wanted if t not in have]
    if absent:
        raise MorphServeError(f"tiers: the pack has no {', '.join(absent)} tier (it has {', '.join(have)})")
    verdict = probe(wanted) if probe is not None else {}
    usable = [t for t in wanted if verdict.get(t) is None]
    if not usable:
        t = wanted[-1]
        hint = "; prepare a W8A8-only pack with `morphserve prepare --tiers w8a8`" if "w8a8" not in have else ""
        raise MorphServeError(f"this CPU cannot serve the pack's {' or '.join(wanted)} tier: {verdict[t]}{hint}")
    for t in wanted:
        if t not in usable:
            log.warning("MorphServe: serving the pack without its %s tier: %s; the ladder is %s only",
                        t, verdict[t], "+".join(usable))
    return usable


def check_servable(manifest: packfmt.Manifest, tw) -> None:
    """The pack must be what the runtime's single W4 kernel computes, and its manifest must
    describe the twin it ships (a hand-edited or mixed-up pack is caught here)."""
    from quant_layers.twin import SERVED, SERVED_BITS, check_servable_twin

    check_servable_twin(tw)
    if manifest.bits != SERVED_BITS:
        raise MorphServeError(f"pack {tw.path.parent}: manifest says {manifest.bits}-bit; {SERVED}")
    if manifest.group_size != tw.group_size:
        raise MorphServeError(
            f"pack {tw.path.parent}: manifest says group size {manifest.group_size}, the twin's "
            f"quantization_config says {tw.group_size}; re-run `morphserve prepare`")


def check_tiers(manifest: packfmt.Manifest, pack_dir: Path, info) -> None:
    """Every further tier is checked like the base one: its scheme is the one its kernel
    serves, its shapes are the model's, and the manifest's bytes are the checkpoint's."""
    from quant_layers.w8_twin import open_w8_twin

    tier = manifest.tier("w8a8")
    if tier is None:
        return
    if manifest.base_tier == "w8a8" and manifest.bits != 8:
        raise MorphServeError(f"pack {pack_dir}: a W8A8-only manifest says {manifest.bits}-bit; re-run `morphserve prepare`")
    w8 = open_w8_twin(pack_dir / tier.quantized_dir, info)
    if tier.layer_bytes[0] != w8.layer_bytes(0):
        raise MorphServeError(f"pack {pack_dir}: manifest says {tier.layer_bytes[0]} bytes for layer 0's W8A8 twin, "
                              f"the checkpoint holds {w8.layer_bytes(0)}; re-run `morphserve prepare`")


def check_pack_files(manifest: packfmt.Manifest, pack_dir: Path, info=None) -> None:
    """Every tier's checkpoint is the scheme its kernel serves and what the manifest says;
    with `info` (the model), its shapes are the model's too."""
    from quant_layers.twin import open_twin

    if manifest.base_tier == packfmt.BASE_TIER:
        check_servable(manifest, open_twin(Path(pack_dir) / manifest.quantized_dir, info))
    check_tiers(manifest, Path(pack_dir), info)


def check_pack_matches(cfg: MorphConfig, model_path: str) -> packfmt.Manifest:
    """Servable format, architecture, layer count, every tensor shape, and (optionally) the weight hash."""
    from quant_layers.model_info import read_model_info
    from quant_layers.twin import open_twin

    pack_dir = Path(cfg.pack)
    manifest = packfmt.load_manifest(pack_dir)
    model_dir = Path(model_path)
    if not model_dir.is_dir():
        raise MorphServeError(f"MorphServe needs a local model folder to check the pack against; got {model_path}")
    info = read_model_info(model_dir)
    if manifest.architecture not in info.config.get("architectures", []) or manifest.num_layers != info.num_layers:
        raise MorphServeError(
            f"pack {pack_dir} does not match the served model {model_path}: pack is {manifest.architecture} with "
            f"{manifest.num_layers} layers, model is {info.config.get('architectures')} with {info.num_layers}")
    check_pack_files(manifest, pack_dir, info)
    if cfg.memory_budget_gb is not None:
        from morphserve.runtime.kv_sizing import model_weight_bytes

        weights = model_weight_bytes(model_dir)
        if cfg.memory_budget_gb * 2**30 <= weights:
            raise MorphServeError(
                f"memory_budget_gb {cfg.memory_budget_gb} is below the fp16 weights of {model_path} "
                f"({weights / 2**30:.3f} GiB); the budget covers weights plus KV cache")
    if cfg.verify_hash and info.weights_sha256() != manifest.model_sha256:
        raise MorphServeError(
            f"pack {pack_dir} was prepared from different weights than {model_path} (sha256 mismatch); "
            "re-run `morphserve prepare` or set verify_hash: false")
    return manifest


def check_policy(cfg: MorphConfig) -> None:
    """A bad policy stops start-up here, with the file and the key named."""
    import json

    from policies.config import PRESETS, PolicyError, load_policy

    if cfg.policy is None:
        return
    try:
        pcfg, path = load_policy(cfg.policy)
        quality = Path(cfg.pack) / "quality.json"
        pcfg.level_cap(1, json.loads(quality.read_text()) if quality.exists() else None)
    except PolicyError as e:
        raise MorphServeError(f"policy: {e}") from None
    if cfg.policy not in PRESETS:
        cfg.policy = str(path.resolve())  # the engine core may not share our working directory


def activate(raw, model_path: str, probe: Probe | None = None) -> MorphConfig:
    """Validate the config and the pack; fix the tiers served (`probe` runs each tier's
    kernel on this CPU)."""
    global ACTIVE
    cfg = parse(raw)
    cfg.pack = str(Path(cfg.pack).resolve())
    manifest = check_pack_matches(cfg, model_path)
    cfg.tiers = serve_tiers(manifest, cfg.tiers, probe)
    check_prompt_twins(cfg, manifest)
    check_policy(cfg)
    ACTIVE = cfg
    return cfg


def check_prompt_twins(cfg: MorphConfig, manifest: packfmt.Manifest) -> None:
    """Prompt twins are W8A8 and stay resident: on a ladder that goes on to W4A16 a layer
    there would hold both, so only a W8A8-only ladder takes them; at most one per layer."""
    if not cfg.prompt_twin_layers:
        return
    if cfg.prompt_twin_layers == "auto":
        if cfg.tiers != ["w8a8"] or cfg.twin != "pack":  # no twins here: settled now, no profile needed
            log.info("MorphServe: prompt twins auto: %s", choose_prompt_twins(None, manifest.num_layers, cfg.tiers,
                                                                               cfg.twin).why)
            cfg.prompt_twin_layers = 0
        return
    if cfg.tiers != ["w8a8"]:
        raise MorphServeError(f"prompt_twin_layers needs a W8A8-only ladder; this server's is {' + '.join(cfg.tiers)} "
                              "(serve `--tiers w8a8`, or leave prompt twins off)")
    if cfg.twin != "pack":
        raise MorphServeError("prompt_twin_layers needs the pack's twins (twin: pack)")
    if cfg.prompt_twin_layers > manifest.num_layers:
        raise MorphServeError(f"prompt_twin_layers {cfg.prompt_twin_layers} is more than the model's "
                              f"{manifest.num_layers} layers")
