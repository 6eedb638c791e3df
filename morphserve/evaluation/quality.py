"""The precision every token was computed at, and the token-weighted perplexity that
follows from the pack's quality curve.

Two sources. The exact one is the server's own count: at every step boundary MorphServe
adds the tokens it served to the level that computed them (`served_tokens` in
/morphserve/state); two readings, after the warm-up and after the replay, give the
replay's tokens by level (`served_between`). The other needs no server: the transition
log records the CLOCK_MONOTONIC time of every change of the level in force and vLLM's load
generator the arrival of each streamed token on the same clock, so a token can be charged
at the level in force when it *arrived*. Under load the two part: a token computed at
level 4 and delivered after a move to 12 is charged 12 by the client's clock. The
evaluation reports the server's figure where both readings exist and keeps the client's
beside it. Plain Python.
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path


def level_changes(transition_log: Path) -> list[tuple[float, int]]:
    """(monotonic time, level) of every change, in time order, from the JSONL log."""
    out = []
    if not transition_log.exists():
        return out
    for line in transition_log.read_text().splitlines():
        if line.strip():
            out += [(float(t), int(level)) for t, _wall, level in json.loads(line).get("levels", [])]
    return sorted(out)


class LevelAt:
    def __init__(self, changes: list[tuple[float, int]], initial: int = 0):
        self.times = [t for t, _ in changes]
        self.levels = [k for _, k in changes]
        self.initial = initial

    def __call__(self, t: float) -> int:
        i = bisect.bisect_right(self.times, t)
        return self.levels[i - 1] if i else self.initial


def tokens_by_level(rows: list[dict], level_at: LevelAt) -> dict[str, dict[int, int]]:
    """Prompt and output tokens of every request that got its first token, completed or cut
    (a request cut at the deadline was often served at a deep level, so leaving it out would
    flatter the quality), by the level they were computed at."""
    prompt: dict[int, int] = {}
    output: dict[int, int] = {}
    for r in rows:
        if r.get("start_mono") is None or not (r["ok"] or r.get("token_offsets_s")):
            continue
        offsets = r.get("token_offsets_s") or [r["ttft_s"]]
        served = r["output_len"] if r["ok"] else r.get("served_tokens", len(offsets))
        k = level_at(r["start_mono"] + offsets[0])
        prompt[k] = prompt.get(k, 0) + r["input_len"]
        for off in offsets[:served]:
            k = level_at(r["start_mono"] + off)
            output[k] = output.get(k, 0) + 1
        # a server that streams several tokens in one chunk reports fewer offsets than tokens
        missing = served - min(len(offsets), served)
        if missing:
            k = level_at(r["start_mono"] + offsets[-1])
            output[k] = output.get(k, 0) + missing
    return {"prompt": prompt, "output": output}


def weighted_ppl(counts: dict[int, int], curve: dict[int, float]) -> float | None:
    """exp of the token-weighted mean log-perplexity over the levels."""
    total = sum(counts.values())
    if not total:
        return None
    if len([n for n in counts.values() if n]) == 1:  # exp(log(p)) is not always p to the last bit
        return curve[next(k for k, n in counts.items() if n)]
    return math.exp(sum(n * math.log(curve[k]) for k, n in counts.items()) / total)


def ppl_increase(counts: dict[int, int], curve: dict[int, float]) -> float | None:
    """Token-weighted perplexity over level 0's, minus 1, from log-ratios to level 0: a run
    served wholly at level 0 then reads exactly 0.0 (dividing exp(mean log p) by p left
    4.4e-16 on one CPU, and a static FP16 row must not show a quality cost)."""
    total = sum(counts.values())
    if not total:
        return None
    base = math.log(curve[0])
    return math.expm1(sum(n * (math.log(curve[k]) - base) for k, n in counts.items() if k != 0) / total)


def served_between(before: dict | None, after: dict | None) -> dict[int, int] | None:
    """Tokens the server computed at each level between two readings of its `served_tokens`
    (None at the start: since it started). None where the later reading is missing, so the
    caller falls back to the client's clock."""
    if not after or not isinstance(after.get("by_level"), dict):
        return None
    start = (before or {}).get("by_level") or {}
    out = {int(k): n - start.get(k, 0) for k, n in after["by_level"].items()}
    return {k: n for k, n in sorted(out.items()) if n > 0}


def quality_of_run(rows: list[dict], curve: dict[int, float], changes: list[tuple[float, int]] | None,
                   static_level: int, charge_floor: int = 0, twin_share: dict[int, float] | None = None,
                   served: dict[int, int] | None = None) -> dict:
    """`changes` None: a static system, every token at `static_level`. `charge_floor`: a
    server holding prompt twins for that many layers computes the steps of prompt size
    through them, so those steps' tokens are charged at no lower a level than this
    (policies.config.charged_level, the ledger's rule). `twin_share`: of the tokens served
    at each level, the share in such steps, from the server's own count
    (`twin_share_between`); without it every token is charged as one of them, an upper
    bound (`ppl_increase_upper_bound` keeps that figure beside the exact one).
    `served`: the server's own tokens by level over the replay (`served_between`); with it
    `ppl`/`ppl_increase` charge each token at the level that computed it, and
    `ppl_increase_client_clock` keeps the figure by arrival. `tokens_by_level` (prompt and
    output apart, by arrival) keeps the levels in force either way."""
    level_at = LevelAt(changes or [], initial=static_level)
    counts = tokens_by_level(rows, level_at)
    out = {"tokens_by_level": {part: {str(k): n for k, n in sorted(c.items())} for part, c in counts.items()}}
    charged = {part: _charged(c, charge_floor, twin_share) for part, c in counts.items()}
    both = _both(charged)
    by_server = _charged(served, charge_floor, twin_share) if served else None
    if by_server:
        out.update(levels_from="server steps", server_tokens_by_level={str(k): n for k, n in served.items()},
                   ppl_increase_client_clock=ppl_increase(both, curve))
        both = by_server
    else:
        out["levels_from"] = "client arrival" if changes is not None else "static"
    if charge_floor:
        if twin_share is None:
            upper = both
        elif by_server:
            upper = _charged(served, charge_floor, None)
        else:
            upper = _both({part: _charged(c, charge_floor, None) for part, c in counts.items()})
        out["ppl_increase_upper_bound"] = ppl_increase(upper, curve)
        if twin_share is not None:
            out["twin_share_by_level"] = {str(k): round(v, 4) for k, v in sorted(twin_share.items())}
    return {"ppl": weighted_ppl(both, curve), "ppl_increase": ppl_increase(both, curve),
            "ppl_output_tokens": weighted_ppl(charged["output"], curve), **out}


def twin_share_between(before: dict | None, after: dict | None) -> dict[int, float] | None:
    """Of the tokens the server served at each level between two readings of its
    `served_tokens` (/morphserve/state), the share its prompt twins computed. None where a
    reading is missing or the server counts no twin steps (a server before this count)."""
    if not before or not after or after.get("twin_min_tokens") is None:
        return None
    share = {}
    for k, n in after["by_level"].items():
        served = n - before["by_level"].get(k, 0)
        twins = after["through_twins"].get(k, 0) - before["through_twins"].get(k, 0)
        if served > 0:
            share[int(k)] = min(1.0, max(0.0, twins / served))
    return share


def _both(parts: dict[str, dict[int, float]]) -> dict[int, float]:
    both: dict[int, float] = {}
    for part in parts.values():
        for k, n in part.items():
            both[k] = both.get(k, 0) + n
    return both


def _charged(counts: dict[int, int], floor: int, twin_share: dict[int, float] | None) -> dict[int, float]:
    """Tokens by the level they are charged at: a level below `floor` keeps the share of its
    tokens the twins did not compute (all of them are charged at `floor` without a share,
    and so are a level's the server counted nothing at: the safe side)."""
    out: dict[int, float] = {}
    for k, n in counts.items():
        if k >= floor:
            out[k] = out.get(k, 0) + n
            continue
        through = n if twin_share is None else n * twin_share.get(k, 1.0)
        out[floor] = out.get(floor, 0) + through
        if n - through:
            out[k] = out.get(k, 0) + (n - through)
    return out
