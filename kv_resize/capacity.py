"""KV capacity by level for a model under a memory budget: the numbers behind the
capacity table in docs/RESULTS.md (scripts/capacity_table.py prints it).

Layer sizes come either from a pack's manifest (measured bytes) or from the architecture
(Llama-family shapes; W4A16 = 4-bit weights plus one bf16 scale per group).
"""

from __future__ import annotations

from dataclasses import dataclass

from kv_resize.budget import KVBudget

GIB = 2**30


@dataclass(frozen=True)
class LlamaShape:
    name: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def layer_linear_params(self) -> int:
        kv = self.num_kv_heads * self.head_dim
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * kv  # q, o; k, v
        return attn + 3 * self.hidden * self.intermediate  # gate, up, down

    @property
    def total_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = (2 * self.num_layers + 1) * self.hidden
        return embeddings + norms + self.num_layers * self.layer_linear_params

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


LLAMA_2_7B = LlamaShape("Llama-2-7B", 32, 4096, 11008, 32, 32, 32000)
LLAMA_3_8B = LlamaShape("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256)


def w4_bytes(params: int, group_size: int = 128) -> int:
    return params // 2 + params // group_size * 2


def gpu_budget(total_gib: float, utilization: float = 0.9, reserved_gib: float = 1.5) -> int:
    """vLLM's default budget on a GPU: gpu_memory_utilization of the card, less what
    activations and the CUDA context take (`reserved_gib`, an assumption, stated)."""
    return int((total_gib * utilization - reserved_gib) * GIB)


def budget_for_shape(shape: LlamaShape, budget_bytes: int, block_tokens: int, group_size: int = 128) -> KVBudget:
    per_layer = shape.layer_linear_params
    saving = 2 * per_layer - w4_bytes(per_layer, group_size)
    return KVBudget(budget_bytes, 2 * shape.total_params, (saving,) * shape.num_layers,
                    block_tokens * shape.kv_bytes_per_token())


def levels(num_layers: int) -> list[int]:
    """0, L/4, L/2, 3L/4, L."""
    return sorted({round(num_layers * f) for f in (0, 0.25, 0.5, 0.75, 1)})


def capacity_rows(name: str, budget: KVBudget, block_tokens: int) -> list[dict]:
    base = budget.usable_blocks(0)
    return [{"model": name, "budget_gib": budget.budget_bytes / GIB, "level": k,
             "weights_gib": budget.weight_bytes(k) / GIB, "kv_blocks": budget.usable_blocks(k),
             "kv_tokens": budget.usable_blocks(k) * block_tokens,
             "vs_fp16": budget.usable_blocks(k) / base - 1 if base else float("inf")}
            for k in levels(budget.max_level)]
