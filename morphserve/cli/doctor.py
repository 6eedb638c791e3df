"""`morphserve doctor`: is this machine ready to serve, and which tiers suit its CPU."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="check this machine (CPU, vLLM, kernels) and a pack; recommend tiers",
        description=(
            "One screen: the CPU features that decide vLLM's kernels (AMX, AVX-512, VNNI, AVX512_BF16), "
            "the vLLM version and whether MorphServe's patches apply, the kernel each tier runs here, "
            "FP8 KV, and with --pack whether the pack serves here plus each tier's kernel speed against "
            "the full-precision rung at batch 1 and 32, in the dtype you would serve (measured in seconds on first use, then cached). Ends with the "
            "recommended --tiers and every problem with its fix. Exit status 0 when everything needed "
            "to serve is in place, 1 otherwise."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, metavar="MODEL_DIR",
                   help="the full-precision model to serve (default: the pack's model; without --pack, "
                        "only its shapes are read)")
    p.add_argument("--pack", type=Path, default=None, metavar="PACK_DIR",
                   help="a pack written by `morphserve prepare`: checked against the model and this CPU, "
                        "and its tiers' kernels timed")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="the engine dtype the kernels are timed in, as `morphserve serve --dtype` would serve: "
                        "'auto' is float32 where this CPU has neither AVX512_BF16 nor AMX (torch emulates bf16 "
                        "there, and the two dtypes rank the tiers in opposite order), else bfloat16")
    p.add_argument("--remeasure", action="store_true", help="time the kernels again instead of using the cache")
    p.add_argument("--json", action="store_true", help="print the readings and advice as JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from morphserve.doctor import facts
    from morphserve.doctor.advice import advise
    from morphserve.doctor.render import render
    from morphserve.errors import USER_ERRORS, MorphServeError

    pack, info = (facts.pack(args.pack, args.model) if args.pack is not None else (None, None))
    if info is None and args.model is not None and pack is None:
        try:
            info = facts.model_info(args.model)
        except USER_ERRORS as e:
            raise MorphServeError(f"--model: {e}") from None
    head = None
    if info is not None:
        cfg = info.config
        head = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    machine = facts.machine(info.linear_shapes if info is not None else None, head)
    speed = fp8_cost = None
    if pack is not None and pack.problem is None and info is not None and machine.vllm_version:
        runnable = [t for t in pack.tiers if machine.tier_problems.get(t) is None]
        if runnable:
            from morphserve.offline import pack as packfmt

            group = packfmt.load_manifest(args.pack).group_size or 32  # W8A8-only packs have none
            speed = facts.speed(info, runnable, group, remeasure=args.remeasure,
                                dtype=facts.serving_dtype(machine, args.dtype))
            if machine.fp8_kv_problem is None:
                fp8_cost = facts.fp8_kv_cost(args.pack, runnable)
    advice = advise(machine, pack, speed, fp8_cost)
    if args.json:
        print(json.dumps({"machine": asdict(machine), "pack": asdict(pack) if pack else None,
                          "speed": asdict(speed) if speed else None,
                          "advice": {**asdict(advice), "exit_status": advice.exit_status}}, indent=1))
    else:
        print(render(machine, pack, speed, advice))
    return advice.exit_status
