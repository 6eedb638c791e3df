"""Engine-core side of MorphServe: owns the morph level and executes transitions.

It lives in the engine-core process, next to the scheduler and the executor. Transitions
run only at step boundaries: from the post_step hook, or from a utility call (which vLLM
handles between steps on the same thread). Layers are quantized in the pack's swap order
and restored last-in-first-out.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from morphserve import pack as packfmt
from morphserve import vllm_patches as vp
from morphserve.errors import MorphServeError

log = logging.getLogger("morphserve")


@dataclass(frozen=True)
class TransitionPlan:
    quantize: list[int]
    restore: list[int]


def plan_transition(order: list[int], current: list[int], level: int) -> TransitionPlan:
    """Layers to quantize (in swap order) and restore (LIFO) to reach `level` quantized layers."""
    target = order[:level]
    quantize = [i for i in target if i not in current]
    restore = [i for i in reversed(order) if i in current and i not in target]
    return TransitionPlan(quantize, restore)


class MorphController:
    def __init__(self, cfg: dict, engine_core, manifest: packfmt.Manifest):
        self.cfg = cfg
        self.core = engine_core
        self.manifest = manifest
        self.order = list(manifest.swap_order)
        self.quantized: list[int] = []
        self.forced_level: int | None = None
        self.pending_level: int | None = None
        self.transitions = 0
        self.recent: deque[dict] = deque(maxlen=50)
        self.log_path = Path(cfg["transition_log"]) if cfg.get("transition_log") else None

    @classmethod
    def start(cls, cfg: dict, engine_core) -> "MorphController":
        manifest = packfmt.load_manifest(Path(cfg["pack"]))
        results = engine_core.model_executor.collective_rpc("morphserve_init", args=(cfg,))
        log.info("MorphServe: %d swappable layers loaded on %d worker(s) in %.1f s",
                 results[0]["layers"], len(results), results[0]["seconds"])
        return cls(cfg, engine_core, manifest)

    @property
    def num_layers(self) -> int:
        return len(self.order)

    # -- step boundary -------------------------------------------------------------
    def on_step_boundary(self) -> None:
        if self.pending_level is not None and self.pending_level != len(self.quantized):
            level, self.pending_level = self.pending_level, None
            self.transition(level, reason="pending plan")

    def transition(self, level: int, reason: str) -> dict:
        plan = plan_transition(self.order, self.quantized, level)
        if not plan.quantize and not plan.restore:
            return {"ok": True, "quantized_layers": len(self.quantized), "changed": False}
        t0 = time.monotonic()
        before = list(self.quantized)
        try:
            results = self.core.model_executor.collective_rpc(
                "morphserve_apply", args=(plan.quantize, plan.restore))
        except Exception as e:  # the worker rolled its own swaps back; resync to be sure
            self.quantized = self._worker_quantized()
            log.error("MorphServe: transition to %d failed (%s); serving at %d", level, e, len(self.quantized))
            raise MorphServeError(f"transition to {level} quantized layers failed: {e}") from e
        self.quantized = [i for i in self.order if i in results[0]["quantized"]]
        record = {
            "time": time.time(), "from": len(before), "to": len(self.quantized),
            "quantized_layer_ids": plan.quantize, "restored_layer_ids": plan.restore,
            "fp_bytes_freed": results[0]["fp_bytes_freed"], "rss_delta": results[0]["rss_delta"],
            "worker_seconds": results[0]["seconds"], "seconds": time.monotonic() - t0, "reason": reason,
        }
        self.transitions += 1
        self.recent.append(record)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return {"ok": True, "quantized_layers": len(self.quantized), "changed": True, "transition": record}

    def _worker_quantized(self) -> list[int]:
        ids = self.core.model_executor.collective_rpc("morphserve_quantized")[0]
        return [i for i in self.order if i in ids]

    # -- control surface -------------------------------------------------------------
    def set_level_request(self, level) -> dict:
        """POST /morphserve/level: an int forces a level (policy paused); None hands control back."""
        if level is None:
            self.forced_level = None
            return {"ok": True, **self.state()}
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= self.num_layers:
            return {"ok": False, "error": f"quantized_layers must be an integer in 0..{self.num_layers}, got {level!r}"}
        self.forced_level = level
        try:
            result = self.transition(level, reason="manual")
        except MorphServeError as e:
            return {"ok": False, "error": str(e), **self.state()}
        return {**result, **self.state()}

    def state(self) -> dict:
        blocks, tokens = vp.kv_capacity(self.core.scheduler)
        return {
            "active": True,
            "pack": self.cfg["pack"],
            "twin": self.cfg.get("twin", "pack"),
            "quantized_layers": len(self.quantized),
            "swappable_layers": self.num_layers,
            "quantized_layer_ids": list(self.quantized),
            "swap_order": self.order,
            "forced_level": self.forced_level,
            "kv_capacity_blocks": blocks,
            "kv_capacity_tokens": tokens,
            "policy": self.cfg.get("policy") or ("manual" if self.forced_level is not None else "none"),
            "transitions": self.transitions,
            "recent_transitions": list(self.recent)[-10:],
        }
