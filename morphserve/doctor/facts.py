"""Readings for `morphserve doctor`: the CPU, vLLM, its kernels here, the pack, kernel speed.

Glue only: each reading comes from the code that acts on it at serve time (the tier probe
`morphserve serve` runs, the pack check it runs, vLLM's own dispatch functions), so the
doctor cannot disagree with the server.
"""

from __future__ import annotations

import os
from pathlib import Path

from morphserve.doctor.advice import TIERS, KvCost, Machine, Pack, Speed
from morphserve.errors import USER_ERRORS
from morphserve.evaluation.machine import describe
from morphserve.runtime import compute_cpus, huge_pages, onednn_cache
from morphserve.runtime.allocator import find_library
from morphserve.runtime.tier_speed import FEATURES, vllm_version
from quant_layers.cpu_kind import this_cpu



def _quant_env() -> bool:
    from quant_layers.twin import quant_python

    try:
        quant_python()
    except USER_ERRORS:
        return False
    return True


def machine(linear_shapes: dict[str, tuple[int, int]] | None, head_size: int | None) -> Machine:
    from morphserve.vllm.patches import SUPPORTED_VLLM

    cpu = this_cpu()
    version = vllm_version()
    m = Machine(
        cpu_model=cpu.model, isa=cpu.isa,
        features={("amx" if f == "amx_tile" else f): f in cpu.flags for f in FEATURES},
        cores=len(os.sched_getaffinity(0)), memory_gib=describe()["mem_gib"],
        vllm_version=version, supported_vllm=SUPPORTED_VLLM, patch_problem=None,
        kernels={}, tier_problems={t: "vLLM is not installed" for t in TIERS}, fp8_kv_problem=None,
        tcmalloc=str(find_library("tcmalloc") or "") or None, quant_env=_quant_env(),
        onednn_cache=onednn_cache.capacity(onednn_cache.bounded(dict(os.environ))),
        thp_mode=huge_pages.kernel_mode(), cpu_binding_set=compute_cpus.operator_chose(dict(os.environ)),
    )
    if version is None:
        return m
    from morphserve.vllm.kernel_speed import fused_shapes
    from morphserve.vllm.kernels import probe_tiers
    from morphserve.vllm.patches import patch_target_problem
    from morphserve.vllm.platform_facts import fp8_kv_problem, kernel_paths

    m.patch_problem = patch_target_problem()
    _, n, k = fused_shapes(linear_shapes)[0] if linear_shapes else ("", 576, 576)
    paths = kernel_paths(n, k)
    m.kernels = {"bf16": paths.bf16, "w8a8": paths.w8a8, "w4a16": paths.w4a16}
    m.tier_problems = probe_tiers(TIERS)
    m.fp8_kv_problem = fp8_kv_problem(head_size)
    return m


def pack(pack_dir: Path, model: str | None) -> tuple[Pack, object | None]:
    """The pack's reading and, when it matches, the model's info (for shapes)."""
    from morphserve.offline import pack as packfmt
    from morphserve.runtime import config as runtime_config
    from quant_layers.model_info import read_model_info

    try:
        manifest = packfmt.load_manifest(pack_dir)
    except USER_ERRORS as e:
        return Pack(str(pack_dir), model or "MODEL", [], str(e)), None
    model = model or manifest.model_path
    reading = Pack(str(pack_dir), model, list(manifest.tier_names), None)
    if not Path(model).is_dir():
        reading.problem = f"the pack's model {model} is not here"
        return reading, None
    try:
        cfg = runtime_config.parse({"pack": str(Path(pack_dir).resolve())})
        runtime_config.check_pack_matches(cfg, model)
        return reading, read_model_info(Path(model))
    except USER_ERRORS as e:
        reading.problem = str(e)
        return reading, None


def fp8_kv_cost(pack_dir: Path, tiers: list[str]) -> KvCost | None:
    """The FP8 cache's cost for this pack and the tiers served here, as `serve` and `evaluate`
    charge it: the measurement `morphserve pack kv-cost` keeps (None where none was taken; the
    doctor measures nothing that takes minutes) beside the pack's weights-only curve."""
    import json

    from morphserve.offline import kv_cost
    from morphserve.offline import pack as packfmt
    from morphserve.offline.ladder import Ladder, served_quality
    from policies.config import PolicyError, dearer_fill, quality_curve, static_tier_level

    manifest = packfmt.load_manifest(pack_dir)
    ladder = Ladder.from_manifest(manifest, tiers)
    entry = kv_cost.load(Path(pack_dir), "fp8", ladder.tier_names, ladder.top)
    all_w8a8 = static_tier_level([ladder.counts(k) for k in range(ladder.top + 1)], "w8a8")
    path = Path(pack_dir) / packfmt.QUALITY
    if entry is None or all_w8a8 is None or not path.exists():
        return None
    try:
        quality = served_quality(json.loads(path.read_text()), manifest.tier_names, ladder.tier_names)
        ppl = dearer_fill(quality_curve(quality))
    except (ValueError, PolicyError):  # an unreadable curve: `pack check` names it; no figure here
        return None
    return KvCost(kv_cost.entry_factors(entry), ppl, all_w8a8)


def model_info(model: str):
    from quant_layers.model_info import read_model_info

    return read_model_info(Path(model))


def serving_dtype(m: Machine, asked: str) -> str:
    """`--dtype auto`: the dtype the doctor recommends serving in, fp32 where torch emulates
    bf16 (no AVX512_BF16, no AMX), so the speed table is the one the server will time."""
    if asked != "auto":
        return asked
    return "bfloat16" if m.features.get("avx512_bf16") or m.features.get("amx") else "float32"


def speed(info, tiers: list[str], group_size: int, remeasure: bool = False, dtype: str = "bfloat16") -> Speed:
    """Cached when this CPU, vLLM, shapes and dtype were measured before (by a doctor run or
    a server's start, which times its own engine dtype); else measured (seconds)."""
    from morphserve.runtime.tier_speed import measure

    reading = measure(info.linear_shapes, tiers, group_size, info.num_layers, remeasure, dtype=dtype)
    return Speed(reading.seconds, reading.source, reading.load, dtype, reading.others)
