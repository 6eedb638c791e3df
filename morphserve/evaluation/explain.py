"""`morphserve policy explain`: what a transition log says the controller did.

From the JSONL log alone: time at each level, transitions by direction and by reason, and
how fast each burst got its capacity. With the replay's requests.jsonl as well: tokens
computed at each level, and the token-weighted perplexity increase when a pack's curve
is given. Plain Python over files; it never starts an engine.

A burst is a run of policy-driven quantize transitions with no restore between them. Its
climb runs from the arrival of the oldest request waiting when the first of them was
decided (the decision's `queue_delay_s` before it; the decision itself when nothing
waited yet, i.e. the policy acted on projected demand) to the end of the last of them.
Under load that keeps growing, the climb also follows new arrivals, so the figure that
measures responsiveness is the wait for service: for every quantize decision taken while
requests waited, the time from the oldest waiting request's arrival to the end of the
first transition whose capacity covers the blocks then in use plus those waiting.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from morphserve.errors import MorphServeError
from morphserve.evaluation.quality import (LevelAt, level_changes, quality_of_run, served_between, tokens_by_level,
                                          twin_share_between)

NOTHING_SERVED = {"by_level": {}, "through_twins": {}}  # a server's count as it starts


@dataclass
class Burst:
    start: float  # wall time the oldest waiting request arrived (or the decision, if none waited)
    served: float  # wall time the last quantize transition of the climb finished
    transitions: int
    from_level: int
    to_level: int
    why: list[str] = field(default_factory=list)  # each transition's deciding term: capacity, speed, quality
    tiers: dict | None = None  # layers per tier at the rung reached (a tiered ladder)

    @property
    def response_s(self) -> float:
        return self.served - self.start


@dataclass
class Explanation:
    records: int = 0
    failed: int = 0
    by_direction: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    seconds_at_level: dict[int, float] = field(default_factory=dict)
    bursts: list[Burst] = field(default_factory=list)
    tokens_at_level: dict[int, int] | None = None
    ppl_increase: float | None = None
    # prompt twins: every token charged at least this level (as the ledger and `evaluate` charge it)
    charge_floor: int = 0
    ppl_exact: bool = False  # True: charged from the server's own count (levels computed, twins' steps), not by arrival
    # background moves (restores, compressions): seconds inside step boundaries installing prepared layers
    restore_commits: list[dict] = field(default_factory=list)
    # waits for service (see the module docstring), seconds
    service_waits: list[float] = field(default_factory=list)


def read_log(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MorphServeError(f"{path}: cannot read the transition log: {e}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MorphServeError(f"{path}:{n}: not a JSON line ({e.msg}); is this a MorphServe transition log?") \
                from None
        if not isinstance(record, dict) or "time" not in record:
            raise MorphServeError(f"{path}:{n}: not a transition record (no 'time')")
        records.append(record)
    return records


def reason_kind(reason: str) -> str:
    """The reason without its numbers, so that like decisions count together."""
    head = reason.split(";")[0].split(":")[0]
    return re.sub(r"[-+]?\d+(\.\d+)?%?s?", "N", head).strip()


def bursts_of(records: list[dict]) -> list[Burst]:
    bursts: list[Burst] = []
    current: Burst | None = None
    for r in records:
        if r.get("outcome") == "failed" or "from" not in r:
            continue
        up = r["to"] > r["from"]
        policy_driven = r.get("signals") is not None and r.get("reason") not in ("manual", "pending")
        if up and policy_driven:
            end = r["time"] + r.get("seconds", 0.0)
            if current is None:
                wait = (r.get("signals") or {}).get("queue_delay_s", 0.0) or 0.0
                current = Burst(r["time"] - wait, end, 1, r["from"], r["to"])
            else:
                current.served, current.transitions, current.to_level = end, current.transitions + 1, r["to"]
            current.why.append(reason_kind(str(r.get("reason", ""))))
            current.tiers = r.get("tiers_to")
        elif not up and current is not None:
            bursts.append(current)
            current = None
    if current is not None:
        bursts.append(current)
    return bursts


def service_waits(records: list[dict]) -> list[float]:
    ups = [r for r in records if r.get("outcome") != "failed" and "from" in r and r["to"] > r["from"]
           and r.get("signals") is not None and r.get("reason") not in ("manual", "pending")]
    waits = []
    for i, r in enumerate(ups):
        sig = r["signals"]
        if not sig.get("queue_delay_s"):
            continue
        wanted = sig.get("used_blocks", 0) + sig.get("waiting_blocks", 0)
        arrival = r["time"] - sig["queue_delay_s"]
        served = next((u for u in ups[i:] if u.get("kv_blocks_after", 0) >= wanted), None)
        if served is not None:
            waits.append(served["time"] + served.get("seconds", 0.0) - arrival)
    return waits


def seconds_at_level(records: list[dict]) -> dict[int, float]:
    changes = [(t, k) for r in records for t, _wall, k in r.get("levels", [])]
    changes.sort()
    out: dict[int, float] = {}
    for (t0, k), (t1, _) in zip(changes, changes[1:]):
        out[k] = out.get(k, 0.0) + (t1 - t0)
    return out


def explain(log: Path, requests: Path | None = None, curve: dict[int, float] | None = None,
            prompt_twin_layers: int | None = None, served: tuple[dict | None, dict] | None = None) -> Explanation:
    """`prompt_twin_layers`: the server's (the steps its twins computed charged at least that
    level); None reads it from the log, where a server holding prompt twins stamps every
    record. `served`: the server's `served_tokens` at the start and the end of the requests
    (None at the start: since it started); with it every token is charged at the level that
    computed it and the twins' steps exactly, as `morphserve evaluate` does; without it at
    the level in force when it arrived, and every token as one of the twins' (an upper
    bound)."""
    records = read_log(log)
    e = Explanation(records=len(records))
    e.charge_floor = prompt_twin_layers if prompt_twin_layers is not None else max(
        (int(r.get("prompt_twin_layers") or 0) for r in records), default=0)
    for r in records:
        if r.get("outcome") == "failed":
            e.failed += 1
            continue
        if "from" in r and r["to"] != r["from"]:
            e.by_direction["quantize" if r["to"] > r["from"] else "restore"] += 1
            e.reasons[reason_kind(str(r.get("reason", "")))] += 1
        if r.get("mode") == "background" and "commit_seconds" in r:
            e.restore_commits.append({"from": r["from"], "to": r["to"], "steps": r.get("steps", 0),
                                      "commit_seconds": r["commit_seconds"], "seconds": r.get("seconds")})
    e.seconds_at_level = seconds_at_level(records)
    e.bursts = bursts_of(records)
    e.service_waits = service_waits(records)
    if requests is not None:
        try:
            rows = [json.loads(line) for line in requests.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MorphServeError(f"{requests}: cannot read the replay's requests: {err}") from None
        changes = level_changes(log)
        counts = tokens_by_level(rows, LevelAt(changes))
        both: dict[int, int] = {}
        for part in counts.values():
            for k, n in part.items():
                both[k] = both.get(k, 0) + n
        e.tokens_at_level = dict(sorted(both.items()))
        if curve is not None and both:
            missing = sorted({max(k, e.charge_floor) for k in both} - set(curve))
            if missing:
                raise MorphServeError(f"the pack's quality curve has no perplexity for levels {missing}")
            # the evaluation's own figure, so the two cannot drift apart
            share = twin_share_between(served[0] or NOTHING_SERVED, served[1]) if served and e.charge_floor else None
            by_server = served_between(*served) if served else None
            e.ppl_increase = quality_of_run(rows, curve, changes, 0, e.charge_floor, share, by_server)["ppl_increase"]
            e.ppl_exact = by_server is not None
    return e


def render(e: Explanation) -> str:
    lines = [f"{e.records} records: {e.by_direction['quantize']} quantize, {e.by_direction['restore']} restore, "
             f"{e.failed} failed"]
    total = sum(e.seconds_at_level.values())
    if total:
        lines.append("time at each level (between the first and the last change):")
        for k, s in sorted(e.seconds_at_level.items()):
            lines.append(f"  {k:>3} layers  {s:8.1f} s  {s / total:6.1%}")
    if e.reasons:
        lines.append("reasons:")
        for reason, n in e.reasons.most_common():
            lines.append(f"  {n:>4}  {reason}")
    if e.bursts:
        lines.append("bursts (the rung reached, how long from the oldest waiting request to the rung in place, "
                     "and what decided: capacity, speed or quality):")
        for b in e.bursts:
            rung = f" ({', '.join(f'{t} {n}' for t, n in sorted(b.tiers.items()))})" if b.tiers else ""
            why = ", ".join(dict.fromkeys(b.why))
            lines.append(f"  {b.from_level:>2} -> {b.to_level:>2} layers{rung} in {b.transitions} transition(s), "
                         f"{b.response_s:.2f} s; for {why}")
    if e.service_waits:
        w = sorted(e.service_waits)
        lines.append(f"waits for service ({len(w)} quantize decisions with requests waiting): median "
                     f"{w[len(w) // 2]:.2f} s, max {w[-1]:.2f} s")
    if e.restore_commits:
        lines.append("background moves (time inside step boundaries, i.e. what decoding paid):")
        for c in e.restore_commits:
            lines.append(f"  {c['from']:>2} -> {c['to']:>2} layers: {c['commit_seconds'] * 1000:.1f} ms over "
                         f"{c['steps']} boundaries")
    if e.tokens_at_level is not None:
        n = sum(e.tokens_at_level.values())
        lines.append(f"tokens at each level ({n} in all):")
        for k, c in e.tokens_at_level.items():
            lines.append(f"  {k:>3} layers  {c:8d}  {c / n:6.1%}" if n else f"  {k:>3} layers  {c}")
    if e.ppl_increase is not None:
        if not e.charge_floor:
            floor = " (each token at the level that computed it, by the server's own count)" if e.ppl_exact else ""
        elif e.ppl_exact:
            floor = (f" (the steps the server's {e.charge_floor} prompt twins computed charged at least level "
                     f"{e.charge_floor}, by its own count)")
        else:
            floor = (f" (every token charged at least level {e.charge_floor}: the server held prompt twins for "
                     f"{e.charge_floor} layers; an upper bound, --served-tokens charges exactly)")
        lines.append(f"token-weighted perplexity increase: {e.ppl_increase:+.2%}{floor}")
    return "\n".join(lines)
