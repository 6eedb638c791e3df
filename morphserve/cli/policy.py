"""`morphserve policy check FILE|PRESET`: validate a policy without starting anything."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from morphserve.errors import MorphServeError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="work with policy YAML files (check) and transition logs (explain)",
                       description="Policy files tune when MorphServe quantizes and restores layers.")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    c = psub.add_parser("check", help="validate a policy YAML or preset; exit 0 if valid, 2 otherwise",
                        description="Validate a policy (schema, types, ranges, hysteresis bands) and print the "
                                    "effective settings, defaults filled in. Starts nothing.")
    c.add_argument("policy", metavar="FILE|PRESET", help="a YAML file, or accuracy / default / performance")
    c.add_argument("--pack", type=Path, default=None, metavar="PACK_DIR",
                   help="also resolve max_ppl_increase and max_avg_ppl_increase against this pack's "
                        "quality.json and print the level cap")
    c.set_defaults(func=_check)
    x = psub.add_parser("explain", help="summarise a transition log: time per level, reasons, bursts, tokens",
                        description="Summarise what the controller did, from the transition log that "
                                    "`morphserve serve --transition-log` writes: time at each level, transitions "
                                    "by direction and reason, and each burst's response time (from the oldest "
                                    "waiting request to the capacity in place). With --requests (a replay's "
                                    "requests.jsonl), also tokens per level; with --pack as well, the "
                                    "token-weighted perplexity increase.")
    x.add_argument("log", type=Path, metavar="LOG.jsonl", help="the transition log")
    x.add_argument("--requests", type=Path, default=None, metavar="REQUESTS.jsonl",
                   help="the replay's per-request records (morphserve replay / evaluate write requests.jsonl)")
    x.add_argument("--pack", type=Path, default=None, metavar="PACK_DIR",
                   help="read the quality curve from this pack's quality.json (needs --requests)")
    x.add_argument("--prompt-twin-layers", type=int, default=None, metavar="N",
                   help="the server held prompt twins for N layers: every token is charged at least level N, as "
                        "its ledger and `morphserve evaluate` charge it (default: read from the log, where such a "
                        "server stamps every record; 0 for none)")
    x.add_argument("--served-tokens", type=Path, default=None, metavar="FILE.json",
                   help="with prompt twins, charge exactly instead of the upper bound: the server's own count of "
                        "the tokens its twins computed, as a saved GET /morphserve/state (or its `served_tokens`; "
                        "counted since the server started) or an evaluation's run.json (counted from the end of "
                        "its warm-up to the end of the replay)")
    x.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    x.set_defaults(func=_explain)


def _check(args: argparse.Namespace) -> int:
    from morphserve.offline.pack import load_manifest
    from policies.config import PolicyError, load_policy, log_ppl_ratios, resolve_budget

    try:
        cfg, path = load_policy(args.policy)
        cap_line = ""
        if args.pack is not None:
            from morphserve.offline.ladder import Ladder

            manifest = load_manifest(args.pack)
            ladder = Ladder.from_manifest(manifest)
            top = ladder.top  # levels: layers, or twice that with tiers
            quality_file = args.pack / "quality.json"
            quality = json.loads(quality_file.read_text()) if quality_file.exists() else None
            unit = "levels (W8A8 then W4A16 rungs)" if manifest.tiers else "layers"
            cfg = resolve_budget(cfg, quality, [ladder.counts(k) for k in range(top + 1)])
            cap_line = f"level cap with {args.pack}: {cfg.level_cap(top, quality)} of {top} {unit}"
            if cfg.max_avg_ppl_increase is not None:
                log_ppl_ratios(quality, top)  # the pack must have a curve for the budget
                cap_line += f"; quality budget over time: {cfg.max_avg_ppl_increase:.1%} over {cfg.quality_window_s:.0f} s"
        elif cfg.max_ppl_increase is not None:
            cap_line = "max_ppl_increase is resolved against a pack's quality.json at start-up (--pack to see it now)"
    except PolicyError as e:
        raise MorphServeError(str(e)) from None
    print(f"{path}: valid {cfg.policy} policy")
    for key, value in cfg.model_dump().items():
        print(f"  {key}: {value}")
    if cap_line:
        print(cap_line)
    return 0


def served_counts(path: Path) -> tuple[dict | None, dict]:
    """(the count at the start, the count at the end) of a server's `served_tokens`, from
    a saved state (None at the start: counted since the server started), the object
    itself, or an evaluation's run.json (from its warm-up's reading)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MorphServeError(f"{path}: cannot read the served-token count: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("served_by_level"), dict):
        return (data.get("warmup") or {}).get("served_by_level"), data["served_by_level"]
    if isinstance(data, dict) and isinstance(data.get("served_tokens"), dict):
        data = data["served_tokens"]
    if not (isinstance(data, dict) and isinstance(data.get("by_level"), dict)
            and isinstance(data.get("through_twins"), dict)):
        raise MorphServeError(f"{path}: no served-token count (`served_tokens` with `by_level` and `through_twins`, "
                              "as GET /morphserve/state has it, or an evaluation's run.json)")
    return None, data


def _explain(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from morphserve.evaluation.explain import explain, render
    from policies.config import PolicyError, quality_curve

    if not args.log.is_file():
        raise MorphServeError(f"{args.log}: no such transition log")
    if args.pack is not None and args.requests is None:
        raise MorphServeError("--pack needs --requests: perplexity is weighted by the tokens served at each level")
    curve = None
    if args.pack is not None:
        quality_file = args.pack / "quality.json"
        try:
            curve = quality_curve(json.loads(quality_file.read_text()), "--pack")
        except (OSError, json.JSONDecodeError) as e:
            raise MorphServeError(f"{quality_file}: cannot read the quality curve: {e}") from None
        except PolicyError as e:
            raise MorphServeError(str(e)) from None
    if args.prompt_twin_layers is not None and args.prompt_twin_layers < 0:
        raise MorphServeError(f"--prompt-twin-layers must be 0 or more, got {args.prompt_twin_layers}")
    if args.served_tokens is not None and curve is None:
        raise MorphServeError("--served-tokens needs --pack and --requests: it refines the perplexity charge")
    served = served_counts(args.served_tokens) if args.served_tokens is not None else None
    e = explain(args.log, args.requests, curve, args.prompt_twin_layers, served)
    if args.json:
        out = {"records": e.records, "failed": e.failed, "by_direction": dict(e.by_direction),
               "reasons": dict(e.reasons), "seconds_at_level": {str(k): v for k, v in e.seconds_at_level.items()},
               "bursts": [{**asdict(b), "response_s": b.response_s} for b in e.bursts],
               "tokens_at_level": ({str(k): v for k, v in e.tokens_at_level.items()}
                                   if e.tokens_at_level is not None else None),
               "ppl_increase": e.ppl_increase, "ppl_exact": e.ppl_exact, "charge_floor": e.charge_floor, "restore_commits": e.restore_commits,
               "service_waits": e.service_waits}
        print(json.dumps(out, indent=1))
    else:
        print(render(e))
    return 0
