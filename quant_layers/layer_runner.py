"""An offline model whose decoder layers switch between full precision and the W4 twin.

This is the measuring instrument for `prepare` (importance scores and perplexity), not the
serving path. It runs transformers' own Llama modules on the CPU, with each quantized
layer's linears holding the twin's dequantized weights: the same numbers vLLM's W4A16
kernel multiplies by. Weights always hold bf16 values; the arithmetic is bf16 by default,
or fp32 (`compute_dtype`) on CPUs that only emulate bf16, where it is about 10x faster. Swapping a layer here is a pointer swap of
seven `weight` tensors.

A second tier (W8A8) adds its own dequantized weights and quantizes each of its linears'
inputs per token to int8 and back, as vLLM's int8 kernel does before its GEMM; a layer is
then in one tier at a time (`set_config`).

Layer-by-layer execution (`run_layers`) lets the greedy MDS search restart the forward
from the first changed layer instead of from the embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch

from quant_layers.eval_windows import Windows
from quant_layers.model_info import LINEAR_NAMES

LoadTwinLayer = Callable[[int], dict[str, torch.Tensor]]
BASE = "base"


def fake_quant_per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """Symmetric dynamic per-token int8 round trip (scale = max|x| / 127 per row, in fp32).

    Written here rather than taken from compressed-tensors: its fake_quantize needs a scale
    computed by an observer attached to the module, and this is three tensor ops."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / 127.0
    return (torch.clamp(torch.round(xf / scale), -128, 127) * scale).to(x.dtype)


class SwitchableModel:
    def __init__(self, model_dir: Path, load_twin_layer: LoadTwinLayer, num_layers: int,
                 threads: int | None = None, tiers: dict[str, LoadTwinLayer] | None = None,
                 act_quant_tiers: frozenset[str] = frozenset(), compute_dtype: torch.dtype = torch.bfloat16):
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval()
        if compute_dtype != torch.bfloat16:
            self.model.to(compute_dtype)  # bf16 -> fp32 is exact: the same weights, wider arithmetic
        self.layers = self.model.model.layers
        self.num_layers = num_layers
        self._fp: dict[int, dict[str, torch.Tensor]] = {}
        loaders = {BASE: load_twin_layer, **(tiers or {})}
        self._q: dict[str, dict[int, dict[str, torch.Tensor]]] = {t: {} for t in loaders}
        for i in range(num_layers):
            mods = self._linears(i)
            self._fp[i] = {n: m.weight.data for n, m in mods.items()}
            for tier, load in loaders.items():
                self._q[tier][i] = {n: w.to(torch.bfloat16).to(compute_dtype).contiguous()
                                    for n, w in load(i).items()}
        self.act_quant_tiers = act_quant_tiers
        self.config: dict[int, str] = {}
        self._hooks: dict[int, list] = {}
        self._last_fake_quant: tuple[torch.Tensor, torch.Tensor] | None = None
        self._states: list[list[torch.Tensor]] | None = None  # nll's layer inputs, see there
        self._states_key: tuple[Windows, dict[int, str]] | None = None

    @property
    def quantized(self) -> set[int]:
        return {i for i, t in self.config.items() if t == BASE}

    def _linears(self, layer: int) -> dict[str, torch.nn.Linear]:
        block = self.layers[layer]
        return {name: block.get_submodule(name) for name in LINEAR_NAMES}

    def set_quantized(self, layers: Iterable[int]) -> None:
        """These layers in the base (W4) tier, every other one in full precision."""
        self.set_config({i: BASE for i in layers})

    def set_config(self, config: dict[int, str]) -> None:
        """layer -> tier for every layer not in full precision."""
        for i in set(config) | set(self.config):
            tier = config.get(i)
            if tier == self.config.get(i):
                continue
            source = self._fp[i] if tier is None else self._q[tier][i]
            for name, mod in self._linears(i).items():
                mod.weight.data = source[name]
            for h in self._hooks.pop(i, []):
                h.remove()
            if tier in self.act_quant_tiers:
                self._hooks[i] = [mod.register_forward_pre_hook(lambda _m, args: (self._fake_quant_once(args[0]),))
                                  for mod in self._linears(i).values()]
        self.config = dict(config)

    def _fake_quant_once(self, x: torch.Tensor) -> torch.Tensor:
        """q/k/v read one tensor and gate/up another: quantize each once, not three and two
        times. The last input is held, so no other tensor can reuse its identity."""
        if self._last_fake_quant is not None and self._last_fake_quant[0] is x:
            return self._last_fake_quant[1]
        out = fake_quant_per_token_int8(x)
        self._last_fake_quant = (x, out)
        return out

    # -- forward pieces -------------------------------------------------------------
    def _rope(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(hidden.shape[1]).unsqueeze(0)
        return self.model.model.rotary_emb(hidden, position_ids=pos)

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)

    @torch.inference_mode()
    def run_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        # attention_mask=None with SDPA means causal attention over the whole window.
        return self.layers[layer](hidden, attention_mask=None, position_embeddings=self._rope(hidden))

    @torch.inference_mode()
    def layer_inputs(self, ids: torch.Tensor, known: list[torch.Tensor] | None = None,
                     start: int = 0) -> list[torch.Tensor]:
        """Input of every layer plus the last layer's output: num_layers + 1 tensors.

        `known`: these lists under a configuration that differs from the current one only
        at layers >= `start`; their first `start + 1` entries are still exact, so only the
        layers from `start` on run (the greedy search adds one layer per round)."""
        if known is None:
            known, start = [self.embed(ids)], 0
        out = list(known[:start + 1])
        h = out[-1]
        rope = self._rope(h)
        for layer in self.layers[start:]:
            h = layer(h, attention_mask=None, position_embeddings=rope)
            out.append(h)
        return out

    @torch.inference_mode()
    def run_from(self, start: int, hidden: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden state, starting at layer `start` with its input."""
        rope = self._rope(hidden)
        for layer in self.layers[start:]:
            hidden = layer(hidden, attention_mask=None, position_embeddings=rope)
        return self.model.model.norm(hidden)

    @torch.inference_mode()
    def final(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.norm(last_hidden)

    @torch.inference_mode()
    def nll(self, windows: Windows, batch: int = 4) -> tuple[float, int]:
        """Summed negative log-likelihood of tokens 1..W-1 of every window, and their count.

        Perplexity curves move one layer at a time, so the inputs of every layer under the
        last configuration are kept (while they fit `STATE_CACHE_BYTES`) and the forward
        restarts at the first layer whose tier changed: about half the layers per point on
        a ladder. The layer-by-layer forward is exactly transformers' (tested)."""
        chunks = [torch.tensor(windows.windows[i : i + batch]) for i in range(0, len(windows.windows), batch)]
        start = self._first_changed(windows)
        if start is None:  # nothing cached for these windows: run every layer, keep their inputs if they fit
            states = [self.layer_inputs(ids) for ids in chunks]
            start = len(self.layers)
        else:
            states = self._states
        total, count = 0.0, 0
        for ids, inputs in zip(chunks, states):
            rope = self._rope(inputs[0])
            h = inputs[start]
            for i in range(start, len(self.layers)):
                h = self.layers[i](h, attention_mask=None, position_embeddings=rope)
                inputs[i + 1] = h
            total += self._token_nll(self.model.model.norm(h)[:, :-1], ids[:, 1:])
            count += ids[:, 1:].numel()
        fits = sum(t.numel() * t.element_size() for inputs in states for t in inputs) <= self.STATE_CACHE_BYTES
        self._states, self._states_key = (states, (windows, dict(self.config))) if fits else (None, None)
        return total, count

    STATE_CACHE_BYTES = 2 << 30
    LOSS_ROWS = 1024  # positions per LM-head chunk: 1,024 x 49,152 fp32 logits = 192 MiB

    def _token_nll(self, hidden: torch.Tensor, target: torch.Tensor) -> float:
        """Summed cross-entropy of `target` under the LM head, a chunk of positions at a
        time. The same sum as one cross_entropy over all logits, but the whole batch's
        logits (4 x 1,023 x 49,152 in fp32, 800 MB) are never held, and each chunk is
        contiguous: measured on 2 cores, one call over the sliced logits spent 2.9 s of an
        11.2 s perplexity point in log_softmax and 0.9 s copying."""
        rows, labels = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        total = 0.0
        for start in range(0, rows.shape[0], self.LOSS_ROWS):
            logits = self.model.lm_head(rows[start:start + self.LOSS_ROWS]).float()
            total += torch.nn.functional.cross_entropy(logits, labels[start:start + self.LOSS_ROWS],
                                                       reduction="sum").item()
        return total

    def _first_changed(self, windows: Windows) -> int | None:
        """The first layer whose tier differs from the cached states' configuration (the
        number of layers if none does), or None when nothing is cached for `windows`."""
        key = self._states_key
        if key is None or key[0] is not windows:
            return None
        cached = key[1]
        changed = [i for i in set(cached) | set(self.config) if cached.get(i) != self.config.get(i)]
        return min(changed, default=len(self.layers))


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Per-token cosine along the hidden dimension, averaged, in float32."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()
