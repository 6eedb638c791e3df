"""One screen of text from the doctor's readings and advice."""

from __future__ import annotations

from morphserve.doctor.advice import BATCHES, PROMPT_BATCH, Advice, Machine, Pack, Speed
from morphserve.runtime.huge_pages import usable
from morphserve.runtime.onednn_cache import ONEDNN_CACHE_ENV, ONEDNN_DEFAULT


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render(m: Machine, pack: Pack | None, speed: Speed | None, advice: Advice) -> str:
    f = m.features
    lines = [
        f"CPU        {m.cpu_model} ({m.isa}), {m.cores} cores, {m.memory_gib:.0f} GiB",
        f"           AMX {_yes(f.get('amx', False))} | AVX-512 {_yes(f.get('avx512f', False))} | "
        f"VNNI {_yes(f.get('avx512_vnni', False))} | AVX512_BF16 {_yes(f.get('avx512_bf16', False))} | "
        f"AVX2 {_yes(f.get('avx2', False))}",
        f"vLLM       {m.vllm_version or 'not installed'} (MorphServe supports {m.supported_vllm}); patches "
        + ("apply" if m.vllm_version == m.supported_vllm and not m.patch_problem else "do NOT apply"),
    ]
    if m.kernels:
        lines.append("kernels    " + " | ".join(f"{t}: {k}" for t, k in m.kernels.items()))
    lines.append("tiers      " + " | ".join(f"{t}: {'runs' if p is None else 'no'}" for t, p in m.tier_problems.items()))
    lines.append(f"FP8 KV     {'available' if m.fp8_kv_problem is None else 'no'}")
    lines.append(f"oneDNN     global kernel cache of {m.onednn_cache} per server process ({ONEDNN_CACHE_ENV}; "
                 f"oneDNN's own {ONEDNN_DEFAULT} lets a server grow with every new batch shape)")
    given = "morphserve serve asks for them (--huge-pages auto)" if usable(m.thp_mode) else "none to ask for"
    lines.append(f"huge pages kernel THP mode {m.thp_mode or 'unknown'}: {given}")
    lines.append(f"tcmalloc   {m.tcmalloc + ' (optional: --allocator tcmalloc)' if m.tcmalloc else 'not installed (optional)'}")
    if pack is not None:
        state = "matches its model" if pack.problem is None else "does NOT serve"
        lines.append(f"pack       {pack.path}: tiers {', '.join(pack.tiers) or '?'}; {state} ({pack.model})")
    if speed is not None:
        article = "an" if speed.full == "fp32" else "a"
        lines.append(f"speed      one decoder layer's linears, vLLM's kernels, in {article} {speed.full} engine "
                     f"(--dtype {speed.dtype}), {speed.source}")
        # a prompt-sized step beside the decode sizes, where the reading has it (a cached
        # profile from before it was timed has not)
        shown = BATCHES + ((PROMPT_BATCH,) if any(PROMPT_BATCH in b for b in speed.seconds.values()) else ())
        header = "           " + f"{'tier':<7}" + "".join(f"{'batch ' + str(b):>22}" for b in shown)
        lines.append(header)
        for tier, by_batch in speed.seconds.items():
            cells = []
            for b in shown:
                s, r = by_batch.get(b), speed.relative(tier, b)
                cells.append(f"{s * 1e6:9.0f} us ({r:.2f}x {speed.full})" if s and r else f"{'-':>22}")
            name = speed.full if tier == "bf16" else tier  # level 0 is keyed "bf16" whatever its dtype
            lines.append("           " + f"{name:<7}" + "".join(f"{c:>22}" for c in cells))
    lines.append("")
    if advice.prepare:
        lines.append(f"recommend  {advice.prepare}; then `morphserve doctor --pack PACK_DIR` times its tiers here")
        lines.append(f"           {advice.reasons[-1]}")
    elif advice.tiers:
        lines.append(f"recommend  --tiers {','.join(advice.tiers)}; {advice.reasons[-1]}")
    else:
        lines.append("recommend  nothing to serve with MorphServe here (see the problems)")
    lines += [f"  - {r}" for r in advice.reasons[:-1]]
    if advice.problems:
        lines.append("")
        for p in advice.problems:
            lines.append(f"{'PROBLEM' if p.blocks_serving else 'note':<10} {p.what}; fix: {p.fix}")
    lines.append("")
    lines.append("ready to serve" if advice.exit_status == 0 else "NOT ready to serve: fix each PROBLEM above")
    return "\n".join(lines)
