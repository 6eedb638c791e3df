"""`morphserve policy check FILE|PRESET`: validate a policy without starting anything."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from morphserve.errors import MorphServeError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="work with policy YAML files (check)",
                       description="Policy files tune when MorphServe quantizes and restores layers.")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    c = psub.add_parser("check", help="validate a policy YAML or preset; exit 0 if valid, 2 otherwise",
                        description="Validate a policy (schema, types, ranges, hysteresis bands) and print the "
                                    "effective settings, defaults filled in. Starts nothing.")
    c.add_argument("policy", metavar="FILE|PRESET", help="a YAML file, or accuracy / default / performance")
    c.add_argument("--pack", type=Path, default=None, metavar="PACK_DIR",
                   help="also resolve max_ppl_increase against this pack's quality.json and print the level cap")
    c.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from morphserve.offline.pack import load_manifest
    from policies.config import PolicyError, load_policy

    try:
        cfg, path = load_policy(args.policy)
        cap_line = ""
        if args.pack is not None:
            manifest = load_manifest(args.pack)
            quality_file = args.pack / "quality.json"
            quality = json.loads(quality_file.read_text()) if quality_file.exists() else None
            cap_line = f"level cap with {args.pack}: {cfg.level_cap(manifest.num_layers, quality)} of {manifest.num_layers} layers"
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
