"""Swappable linears inside vLLM's compiled CPU graph.

vLLM's CPU compile mode (DYNAMO_TRACE_ONCE with Inductor) traces the model once and runs
the trace without guards, so whatever `layer.cpu_linear` called at trace time (a oneDNN
handle, baked into the graph as a constant) is what the compiled model calls for good: a
swap that replaces the closure would never be seen. That is why MorphServe ran eager.

Here each swappable linear's `cpu_linear` becomes, once and before the trace, a call of one
opaque custom op, `morphserve::slot_linear(x, bias, slot, out_features)`. Dynamo and
Inductor treat the op as a black box (its fake implementation gives the output's shape),
so the compiled graph keeps everything around the linears (norms, residuals, rotary,
activation) fused and calls the op for each linear; the op reads the forward the layer has
*now* from a table, which a swap rewrites. This is the same pattern vLLM uses for
attention (`unified_attention`, an opaque op that finds its layer at run time).

The op is registered with vLLM's own `direct_register_custom_op` (the low-overhead path
torch.library's decorator lacks). Eager engines never go through it: there a swap still
replaces the closure directly, with no dispatcher hop per linear.
"""

from __future__ import annotations

from typing import Callable

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Call = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]

_FORWARDS: list[Forward] = []  # slot -> the forward its layer computes with now
_CALLS: list[Call] = []  # slot -> that forward as the op calls it, `(x, bias) -> out`
_NO_WEIGHT = torch.empty(0)  # MorphServe's forwards own their weights; vLLM's argument is unused
_library = None  # the op lives as long as its library object; None until registered


def _slot_linear(x: torch.Tensor, bias: torch.Tensor | None, slot: int, out_features: int) -> torch.Tensor:
    return _CALLS[slot](x, bias)


def _call_of(forward: Forward) -> Call:
    """The forward's own `(x, bias)` call where it offers one (`direct`: a W8A8 twin's bound
    int8 call, two Python frames fewer on every linear of every step), else the forward
    behind a lambda that passes vLLM's unused weight argument."""
    direct = getattr(forward, "direct", None)
    if direct is not None:
        return direct
    return lambda x, bias: forward(x, _NO_WEIGHT, bias)


def _slot_linear_fake(x: torch.Tensor, bias: torch.Tensor | None, slot: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def register() -> None:
    """Define `torch.ops.morphserve.slot_linear` in this process (idempotent). Must run
    before vLLM traces the model: in the worker, when its linears are adopted."""
    global _library
    if _library is not None:
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    library = Library("morphserve", "FRAGMENT")
    direct_register_custom_op("slot_linear", _slot_linear, fake_impl=_slot_linear_fake, target_lib=library)
    _library = library  # only once the op is defined


def route(layer: torch.nn.Module) -> None:
    """Make `layer` compute through its own slot from now on; its current forward fills it."""
    if is_routed(layer):
        return
    slot = new_slot(layer.cpu_linear)
    out_features = int(layer.output_size_per_partition)
    op = torch.ops.morphserve.slot_linear
    layer._morphserve_slot = slot
    layer.cpu_linear = lambda x, weight, bias: op(x, bias, slot, out_features)


def new_slot(forward: Forward) -> int:
    """A slot of its own holding `forward` (a routed layer's, or one a benchmark times the op with)."""
    register()
    _FORWARDS.append(forward)
    _CALLS.append(_call_of(forward))
    return len(_FORWARDS) - 1


def is_routed(layer: torch.nn.Module) -> bool:
    return getattr(layer, "_morphserve_slot", None) is not None


def install(layer: torch.nn.Module, forward: Forward) -> None:
    """The layer's next call, compiled or not, runs `forward`."""
    slot = layer._morphserve_slot
    _CALLS[slot] = _call_of(forward)  # the op reads this one: set first, with the forward it belongs to
    _FORWARDS[slot] = forward


def forward_of(layer: torch.nn.Module) -> Forward:
    return _FORWARDS[layer._morphserve_slot]
