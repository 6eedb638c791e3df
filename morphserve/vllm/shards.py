"""This rank's part of a linear's weights, cut by vLLM's own weight loader (vLLM 0.32.0).

Under tensor parallelism each worker computes with a shard of every linear: q/k/v and
gate/up rows (column-parallel) or o_proj and down_proj columns (row-parallel). A twin or a
restored master must be exactly the shard vLLM loaded, in vLLM's fused row order. Rather
than re-deriving vLLM's slicing (head counts, KV-head replication, packed columns), the
full HF tensors are handed to the live layer's `weight_loader`, which narrows them for
its own rank and copies them into a parameter of the rank's shape. With one rank the same
call is the plain q/k/v (gate/up) concatenation.
"""

from __future__ import annotations

import torch


def shard_ids(layer: torch.nn.Module, parts: int) -> list:
    """The ids vLLM's loader takes for each HF part of this layer, in fused order."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"][:parts]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(parts))
    if parts != 1:
        raise ValueError(f"{type(layer).__name__} fuses no parts, got {parts}")
    return [None]


class RankCutter:
    """Cuts one fused linear's HF tensors down to what this rank holds."""

    def __init__(self, layer: torch.nn.Module, parts: int):
        self.layer = layer
        self.ids = shard_ids(layer, parts)
        self.out_features = int(layer.output_size_per_partition)
        self.in_features = int(layer.input_size_per_partition)
        self.widths = [int(w) for w in layer.output_partition_sizes]  # this rank's rows per fused part

    def cut(self, parts: list[torch.Tensor], in_divisor: int | None = 1,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new [out_per_rank, in] tensor holding this rank's rows (or columns) of `parts`.

        `in_divisor`: how many input features one column of the tensor stands for (1 for a
        weight, 8 for int4 values packed in int32, the group size for group scales); None
        for a tensor whose columns are not input features (per-channel scales), which every
        rank holds whole."""
        cols = parts[0].shape[1] if in_divisor is None else self.in_features // in_divisor
        param = torch.nn.Parameter(torch.empty(self.out_features, cols, dtype=dtype or parts[0].dtype),
                                   requires_grad=False)
        param.output_dim = 0
        if in_divisor is not None:
            param.input_dim = 1
        for shard_id, part in zip(self.ids, parts):
            if shard_id is None:
                self.layer.weight_loader(param, part)
            else:
                self.layer.weight_loader(param, part, shard_id)
        return param.data


def tensor_parallel(layer: torch.nn.Module) -> tuple[int, int]:
    """(rank, world size) of this worker's tensor-parallel group, as the layer was built."""
    return int(getattr(layer, "tp_rank", 0)), int(getattr(layer, "tp_size", 1))
