"""MorphServe's linears inside a compiled graph (morphserve.vllm.compiled_slots): a swap is
seen by a graph traced before it, with no second trace; and a real engine on vLLM's compiled
CPU path serves every level as the matching checkpoint does."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from morphserve.harness.servers import run_in_group
from morphserve.vllm import compiled_slots
from tests.engine_utils import PROMPTS, REPO, plain_vllm

MAX_TOKENS = 24


class _Linear(torch.nn.Module):
    """The two attributes vLLM's CPU linear gives a routed layer: its forward slot and width."""

    def __init__(self, forward, out_features: int):
        super().__init__()
        self.cpu_linear = forward
        self.output_size_per_partition = out_features


def test_a_graph_traced_once_calls_whatever_forward_the_slot_holds_now():
    w1, w2 = torch.randn(6, 4), torch.randn(6, 4)
    layer = _Linear(lambda x, weight, bias: x @ w1.t(), 6)
    compiled_slots.route(layer)
    traces = []

    def counting_backend(gm, example_inputs):
        traces.append(gm)
        return gm.forward

    @torch.compile(backend=counting_backend, fullgraph=True)
    def model(x):
        return torch.relu(layer.cpu_linear(x, None, None)) + 1

    x = torch.randn(3, 4)
    assert torch.allclose(model(x), torch.relu(x @ w1.t()) + 1)
    compiled_slots.install(layer, lambda x, weight, bias: x @ w2.t())  # what a swap does
    assert torch.allclose(model(x), torch.relu(x @ w2.t()) + 1)
    assert len(traces) == 1  # the same graph: vLLM traces once and never checks guards
    assert "slot_linear" in str(traces[0].graph)  # the op is opaque: the forward is looked up at run time
    assert compiled_slots.forward_of(layer)(x, None, None).shape == (3, 6)


def test_routing_twice_keeps_one_slot():
    layer = _Linear(lambda x, weight, bias: x, 4)
    compiled_slots.route(layer)
    slot = layer._morphserve_slot
    compiled_slots.route(layer)
    assert layer._morphserve_slot == slot


def test_a_compiled_engine_serves_every_level_as_the_matching_checkpoint(model_dir, pack_dir, tmp_path, monkeypatch,
                                                                        fast_dtype):
    """Dynamo's trace-once without Inductor (VLLM_CPU_CI_ENV, vLLM's own CI setting) is the
    part that would keep a swapped-out layer; Inductor only generates code for that graph."""
    monkeypatch.setenv("VLLM_CPU_CI_ENV", "1")  # for this test's child processes
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    out = tmp_path / "compiled.json"
    cmd = [sys.executable, str(REPO / "tests" / "compiled_morph.py"), str(model_dir), str(pack_dir), str(out),
           "--levels", "0,30,0", "--max-tokens", str(MAX_TOKENS), "--dtype", fast_dtype]
    assert run_in_group(cmd, tmp_path / "compiled.log", timeout=600) == 0 and out.exists(), \
        (tmp_path / "compiled.log").read_text()[-3000:]
    result = json.loads(out.read_text())
    assert result["compilation_mode"] != 0  # vLLM compiled (CompilationMode.NONE is 0)
    first, top, back = result["runs"]
    assert (first["level"], top["level"], back["level"]) == (0, 30, 0)
    full = plain_vllm(model_dir, PROMPTS, MAX_TOKENS, tmp_path / "full", dtype=fast_dtype, enforce_eager=False)
    static = plain_vllm(pack_dir / manifest["quantized_dir"], PROMPTS, MAX_TOKENS, tmp_path / "static",
                        dtype=fast_dtype, enforce_eager=False)
    assert first["tokens"] == full["token_ids"]
    assert top["tokens"] == static["token_ids"]  # the swap was seen by the graph traced at level 0
    assert top["tokens"] != first["tokens"]  # the two checkpoints answer differently: the check can fail
    assert back["tokens"] == first["tokens"]
