"""The memory model: one budget covers weights plus KV.

KV capacity at a level (number of quantized layers) is whatever the budget leaves after
the weights at that level, rounded down to whole blocks. Quantizing a layer frees
(fp16 - quantized) bytes of weights; those bytes, and only those, become KV blocks.
"""

from __future__ import annotations

from dataclasses import dataclass


class BudgetError(ValueError):
    pass


@dataclass(frozen=True)
class KVBudget:
    budget_bytes: int
    fp_weight_bytes: int  # all weights at level 0 (nothing quantized)
    layer_savings: tuple[int, ...]  # bytes freed by quantizing each layer, in swap order
    block_bytes: int  # one KV block across every attention layer
    # The lowest level served. 0 but for a server whose resident prompt twins leave too
    # little KV at full precision: it rests at the first level whose quantized layers pay
    # for them (morphserve.runtime.kv_sizing.rest_floor), and levels below are never served.
    floor: int = 0

    def __post_init__(self) -> None:
        if self.block_bytes <= 0:
            raise BudgetError("block_bytes must be positive")
        if any(s < 0 for s in self.layer_savings):
            raise BudgetError("a quantized layer cannot be larger than its fp16 original")
        self._check(self.floor)
        if self.total_blocks(self.floor) < 2:
            raise BudgetError(
                f"memory budget {self.budget_bytes / 2**20:.1f} MiB leaves no KV block after "
                f"{self.weight_bytes(self.floor) / 2**20:.1f} MiB of weights at level {self.floor} (a block is "
                f"{self.block_bytes / 2**20:.2f} MiB)")

    @classmethod
    def from_fp16_kv(cls, fp16_kv_bytes: int, fp_weight_bytes: int, layer_savings, block_bytes: int) -> "KVBudget":
        """The default: the budget is what vLLM computed at start-up (weights + its KV)."""
        return cls(fp16_kv_bytes + fp_weight_bytes, fp_weight_bytes, tuple(layer_savings), block_bytes)

    @property
    def max_level(self) -> int:
        return len(self.layer_savings)

    def weight_bytes(self, level: int) -> int:
        self._check(level)
        return self.fp_weight_bytes - sum(self.layer_savings[:level])

    def kv_bytes(self, level: int) -> int:
        return self.budget_bytes - self.weight_bytes(level)

    def total_blocks(self, level: int) -> int:
        """Blocks the KV bytes hold, vLLM's null block included."""
        return max(0, self.kv_bytes(level)) // self.block_bytes

    def usable_blocks(self, level: int) -> int:
        return max(0, self.total_blocks(level) - 1)

    def reserve_bytes(self) -> int:
        """Address space to reserve up front: the KV of the most quantized level."""
        return self.total_blocks(self.max_level) * self.block_bytes

    def _check(self, level: int) -> None:
        if not 0 <= level <= self.max_level:
            raise BudgetError(f"level {level} outside 0..{self.max_level}")
