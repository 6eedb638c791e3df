"""`prompt_twin_layers: auto`: whether this machine gains from prompt twins, read from its
kernel profile (morphserve.runtime.tier_speed), not from a per-CPU constant.

Prompt twins pay where vLLM's int8 linears are faster than full precision for a prompt's
call and slower for a decode step's: there no single rung is best for both, and twins give
each phase its faster kernel. Where int8 is faster for decodes too (AMX, most AVX-512
servers in bf16) the ladder's own W8A8 rungs already serve both phases faster, and twins
would only take KV memory; where int8 is no faster for a prompt, twins would slow prompts.

When they pay, every layer gets one: a twin speeds every prompt through its layer by the
same measured margin, and its memory is paid for by the floor (kv_sizing.rest_floor) where
the budget needs it. Plain Python over the profile, so tested in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL = "bf16"  # the full-precision rung's name in a profile (whatever the engine's dtype)
TWIN = "w8a8"


@dataclass(frozen=True)
class TwinChoice:
    layers: int
    why: str


def choose_prompt_twins(seconds: dict[str, dict[int, float]] | None, num_layers: int, tiers: list[str],
                        twin: str = "pack") -> TwinChoice:
    """How many prompt twins `auto` holds: every layer's, or none, and why in one line.
    `seconds`: the kernel profile (tier -> rows -> seconds of one layer's linears), None
    where it could not be taken; `tiers`: the ladder served here.
    The profile's smallest batch stands for a decode step and its largest for a prompt's
    call; the threshold a twin computes from (prompt_twin_min_tokens) is left as set: where
    the two kernels cross depends on more than the linears (served on an AVX2-only EPYC in
    fp32, int8 prompts were faster from about 128 tokens, the linears alone from about 226)."""
    if list(tiers) != [TWIN] or twin != "pack":
        return TwinChoice(0, f"none: prompt twins need a W8A8-only ladder of pack twins (serving "
                             f"{' + '.join(tiers)}, twin: {twin})")
    full, int8 = (seconds or {}).get(FULL, {}), (seconds or {}).get(TWIN, {})
    if len(full) < 2 or not set(full) <= set(int8):
        return TwinChoice(0, "none: no kernel profile to compare int8 with full precision")
    decode, prompt = min(full), max(full)  # the profile's decode batch and its prompt-sized call
    at_decode, at_prompt = int8[decode] / full[decode], int8[prompt] / full[prompt]
    ratios = f"int8 takes {at_decode:.2f}x full precision's time at {decode} row(s) and {at_prompt:.2f}x at {prompt}"
    if at_decode <= 1.0:
        return TwinChoice(0, f"none: {ratios}; int8 decodes as fast, so the ladder's own rungs serve prompts and "
                             "decodes alike")
    if at_prompt >= 1.0:
        return TwinChoice(0, f"none: {ratios}; int8 is no faster for a prompt's call")
    return TwinChoice(num_layers, f"every layer ({num_layers}): {ratios}; int8 for prompts, full precision for "
                                  "decodes")
