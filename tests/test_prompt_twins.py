"""Prompt twins, pure logic: a twinned layer sends prompt-sized calls through its resident
W8A8 twin and smaller ones through full precision, installs that twin when quantized
(nothing built, nothing released), keeps it through restores and failed moves, and the
budget, the ladder and both quality figures count it. Stand-in kernels; the real ones are
exercised in tests/test_prompt_twins_engine.py."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from morphserve.evaluation import quality
from morphserve.runtime import layer_set as layer_set_module
from morphserve.runtime.kv_sizing import plan_budget
from morphserve.runtime.layer_set import LayerSet
from policies.config import charged_level, log_ppl_ratios
from quant_layers.errors import QuantLayersError
from quant_layers.swappable import HeldTwin, SplitForward, SwappableLinear

IN, OUT = 8, 4
FP_BYTES = IN * OUT * 4
TWIN_BYTES = 10


class Kernels:
    def has_slot(self, layer) -> bool:
        return True

    def adopt(self, layer) -> None:
        pass

    def install(self, layer, forward) -> None:
        layer.forward_fn = forward

    def forward_of(self, layer):
        return layer.forward_fn

    def prepack_bf16(self, master):
        return Full()

    def w8_bytes(self, out_features, in_features) -> int:
        return TWIN_BYTES


class Full:
    """Full precision: fills its output with 1."""

    def __call__(self, x, weight, bias):
        return torch.ones(x.shape[0], OUT)


class Compute:
    """A W8A8 compute: fills its output with 2."""

    nbytes = TWIN_BYTES

    def __init__(self):
        self.released = False

    def __call__(self, x, weight, bias):
        return torch.full((x.shape[0], OUT), 2.0)

    def release(self):
        self.released = True


class Twin:
    def __init__(self):
        self.built: list[Compute] = []

    def build(self, keys, readers):
        self.built.append(Compute())
        return self.built[-1]


class Reader:
    def get(self, key):
        return torch.ones(OUT, IN)


class Files:
    @contextlib.contextmanager
    def reading(self):
        yield Reader()


def _layers(twin: Twin, count: int = 3, twinned: int = 2, min_tokens: int = 16) -> LayerSet:
    layers = {}
    for i in range(count):
        layers[i] = []
        for j in range(2):
            layer = torch.nn.Module()
            layer.forward_fn = Full()  # the engine's loaded full-precision forward
            s = SwappableLinear(layer, [f"{i}.{j}"], {"w8a8": twin}, FP_BYTES, Kernels(), (IN, OUT), torch.float32)
            s.tier_bytes["w8a8"] = TWIN_BYTES
            layers[i].append(s)
    built = LayerSet(layers, Files(), Files())
    built.hold_prompt_twins([2, 0, 1], twinned, min_tokens)  # layers 2 and 0, the first the ladder quantizes
    return built


def _out(s: SwappableLinear, tokens: int) -> float:
    return float(s.layer.forward_fn(torch.zeros(tokens, IN), None, None)[0, 0])


def test_prompt_sized_calls_go_through_the_twin_and_decode_sized_ones_through_full_precision():
    layers = _layers(Twin())
    for i in (0, 2):
        assert all(isinstance(s.layer.forward_fn, SplitForward) for s in layers.layers[i])
        assert [_out(s, 15) for s in layers.layers[i]] == [1.0, 1.0]  # a decode step: full precision
        assert [_out(s, 16) for s in layers.layers[i]] == [2.0, 2.0]  # a prompt: the twin
    assert all(isinstance(s.layer.forward_fn, Full) for s in layers.layers[1])  # not twinned
    assert _out(layers.layers[1][0], 500) == 1.0


def test_a_twinned_layer_quantizes_to_its_twin_without_building_and_keeps_it_through_restores():
    twin = Twin()
    layers = _layers(twin)
    held = [s.prompt_twin[1] for s in layers.layers[2]]
    assert len(twin.built) == 4  # two layers' twins, built once at start
    result = layers.apply([2, 1], [])
    assert len(twin.built) == 6  # layer 1 built its own; layer 2 built nothing
    assert [s.compute.twin for s in layers.layers[2]] == held
    # quantizing a twinned layer frees its full precision only; an untwinned one, the difference
    assert result["bytes_freed"] == 2 * FP_BYTES + 2 * (FP_BYTES - TWIN_BYTES)
    assert [_out(s, 1) for s in layers.layers[2]] == [2.0, 2.0]  # every call through the twin now
    layers.apply([], [2, 1])
    assert not any(c.released for c in held)
    assert [s.prompt_twin[1] for s in layers.layers[2]] == held
    assert [_out(s, 1) for s in layers.layers[2]] == [1.0, 1.0] and [_out(s, 99) for s in layers.layers[2]] == [2.0, 2.0]
    assert all(c.released for c in twin.built[4:])  # layer 1's own W8A8 computes went with its restore


def test_the_held_twin_survives_a_failed_move_and_a_background_round_trip(monkeypatch):
    layers = _layers(Twin())
    held = [s.prompt_twin[1] for s in layers.layers[0]]
    calls = []

    def fail_on_second(point):
        calls.append(point)
        if len(calls) == 2:
            raise OSError("injected")

    monkeypatch.setattr(layer_set_module, "maybe_fail", fail_on_second)
    with pytest.raises(OSError):
        layers.apply([0], [])  # the first linear's HeldTwin was handed out, then the move failed
    monkeypatch.setattr(layer_set_module, "maybe_fail", lambda point: None)
    assert layers.tiers() == {} and not any(c.released for c in held)
    assert [_out(s, 99) for s in layers.layers[0]] == [2.0, 2.0]
    layers.restore_begin([[0, "w8a8"]])
    while layers.restore_ready() < 1:
        pass
    assert layers.prepared_bytes() == 0  # the held twins: nothing allocated
    assert layers.restore_commit()["committed"] == [0]
    layers.restore_begin([0])
    while layers.restore_ready() < 1:
        pass
    assert layers.prepared_bytes() == 2 * FP_BYTES  # full precision only: the twins stay where they are
    assert layers.restore_commit()["committed"] == [0]
    assert not any(c.released for c in held) and [s.prompt_twin[1] for s in layers.layers[0]] == held
    assert [_out(s, 1) for s in layers.layers[0]] == [1.0, 1.0]


def test_full_precision_holds_the_twin_too_so_the_ladder_saves_full_precision_only():
    layers = _layers(Twin())
    assert layers.prompt_twin_bytes() == 4 * TWIN_BYTES
    held = layers.held_tier_bytes(every_tier=True)
    assert held["bf16"] == [2 * FP_BYTES + 2 * TWIN_BYTES, 2 * FP_BYTES, 2 * FP_BYTES + 2 * TWIN_BYTES]
    assert held["w8a8"] == [2 * TWIN_BYTES] * 3
    assert layers.live_bytes() == 6 * FP_BYTES + 4 * TWIN_BYTES
    layers.apply([0, 1, 2], [])
    assert layers.live_bytes() == 6 * TWIN_BYTES  # at the top: the same as without prompt twins


def test_a_twin_is_held_once_and_only_by_a_full_precision_layer():
    layers = _layers(Twin(), twinned=1)
    s = layers.layers[2][0]
    with pytest.raises(QuantLayersError, match="held once"):
        s.hold_prompt_twin("w8a8", Compute(), 16)
    layers.apply([0], [])
    with pytest.raises(QuantLayersError, match="held once"):
        layers.layers[0][0].hold_prompt_twin("w8a8", Compute(), 16)
    with pytest.raises(RuntimeError, match="more than the model's 3 layers"):
        _layers(Twin(), twinned=4)


def test_the_twins_take_kv_bytes_below_their_level_and_none_at_the_top(tmp_path):
    block = 1 << 20
    savings = [100 * block, 100 * block, 40 * block]  # twinned rungs save all of full precision
    plain = plan_budget(savings, None, tmp_path, 500 * block, block, rank_weights=300 * block)
    twinned = plan_budget(savings, None, tmp_path, 500 * block, block, rank_weights=300 * block,
                          resident_twin_bytes=120 * block)
    assert twinned.budget_bytes == plain.budget_bytes  # the default budget is still plain vLLM's
    assert plain.total_blocks(0) - twinned.total_blocks(0) == 120
    assert twinned.total_blocks(3) == plain.total_blocks(3) - 120  # (this ladder's savings are the same)
    fixed = plan_budget(savings, 1.0, tmp_path, 0, block, rank_weights=300 * block, resident_twin_bytes=120 * block)
    assert fixed.budget_bytes == 1 << 30 and fixed.weight_bytes(0) == 420 * block


CURVE = {0: 10.0, 1: 10.1, 2: 10.3, 3: 10.6, 4: 11.0}


def _quality(twins: int | None) -> dict:
    q = {"orders": {"lis": {"ppl": {str(k): v for k, v in CURVE.items()}}}}
    return {**q, "prompt_twins": {"layers": twins}} if twins else q


def test_every_token_is_charged_at_least_the_twins_level_by_the_ledger_and_the_evaluation_alike():
    assert [charged_level(_quality(2), k) for k in range(5)] == [2, 2, 2, 3, 4]
    ratios = log_ppl_ratios(_quality(2), 4)
    assert ratios[0] == ratios[2] == pytest.approx(math.log(10.3 / 10.0)) and ratios[3] == pytest.approx(math.log(1.06))
    assert log_ppl_ratios(_quality(None), 4)[0] == 0.0
    # a run served at level 0, then level 3: 10 prompt + 2 output tokens at each
    rows = [{"start_mono": 100.0, "ok": True, "input_len": 10, "output_len": 2, "token_offsets_s": [0.5, 0.6]},
            {"start_mono": 200.0, "ok": True, "input_len": 10, "output_len": 2, "token_offsets_s": [0.5, 0.6]}]
    changes = [(150.0, 3)]
    run = quality.quality_of_run(rows, CURVE, changes, 0, charge_floor=2)
    ledger = math.expm1((12 * ratios[0] + 12 * ratios[3]) / 24)
    assert run["ppl_increase"] == pytest.approx(ledger)
    assert run["tokens_by_level"]["prompt"] == {"0": 10, "3": 10}  # the levels in force, as logged
    assert quality.quality_of_run(rows, CURVE, changes, 0)["ppl_increase"] < run["ppl_increase"]


def test_held_twin_has_no_release():
    """Whoever drops a HeldTwin (a failed move's cleanup, a commit replacing it) frees nothing."""
    assert not hasattr(HeldTwin(Compute()), "release")


def test_a_suite_system_asks_serve_for_prompt_twins_and_serve_puts_them_in_the_config(tmp_path, capsys):
    from pydantic import ValidationError

    from morphserve.cli import serve
    from morphserve.evaluation import systems
    from morphserve.evaluation.suite import Budget, Suite, System, Window
    from tests.test_hardening_fakes import make_model, make_tiered_pack

    model = make_model(tmp_path / "model")
    pack = make_tiered_pack(tmp_path / "tiered", model)
    suite = Suite(name="s", windows=[Window(name="w", trace="azure-conv", start_s=0, duration_s=5, rate_scale=1,
                                            length_scale=1, output_scale=1, regime="light", why="test")],
                  budgets=[Budget(name="b", total_mb=400)], systems=[System(name="fp16", kind="fp16")],
                  static_quantized=None)
    ours = System(name="m", kind="morphserve", policy="default", tiers=["w8a8"], prompt_twin_layers=20)
    cmd, _ = systems.server_command(ours, suite.budgets[0], suite, model, pack, 1, tmp_path)
    assert cmd[cmd.index("--prompt-twin-layers") + 1] == "20"
    with pytest.raises(ValidationError, match="only a morphserve system"):
        System(name="w8", kind="w8a8", prompt_twin_layers=20)
    args, extra = serve_parser().parse_known_args(cmd[cmd.index("serve"):])
    config = _config_of(serve.build_command(args, extra))
    assert config["morphserve"]["prompt_twin_layers"] == 20 and config["morphserve"]["prompt_twin_min_tokens"] == 128
    args, extra = serve_parser().parse_known_args(["serve", str(model), "--pack", str(pack)])
    assert "prompt_twin_layers" not in _config_of(serve.build_command(args, extra))["morphserve"]


def serve_parser():
    from morphserve.cli import commands

    return commands.build_parser()


def _config_of(cmd: list[str]) -> dict:
    import json as jsonlib

    return jsonlib.loads(cmd[cmd.index("--additional-config") + 1])


@pytest.mark.parametrize("settings, message", [
    ({"tiers": ["w8a8", "w4a16"]}, "needs a W8A8-only ladder; this server's is w8a8 \\+ w4a16"),
    ({"tiers": ["w8a8"], "twin": "identity"}, "needs the pack's twins"),
    ({"tiers": ["w8a8"], "prompt_twin_layers": 31}, "31 is more than the model's 30 layers"),
])
def test_start_up_refuses_prompt_twins_it_cannot_hold_in_one_line(settings, message):
    from types import SimpleNamespace

    from morphserve.errors import MorphServeError
    from morphserve.runtime.config import MorphConfig, check_prompt_twins

    cfg = MorphConfig.model_validate({"pack": "p", "prompt_twin_layers": 20, **settings})
    with pytest.raises(MorphServeError, match=message):
        check_prompt_twins(cfg, SimpleNamespace(num_layers=30))
    check_prompt_twins(cfg.model_copy(update={"tiers": ["w8a8"], "twin": "pack", "prompt_twin_layers": 30}),
                       SimpleNamespace(num_layers=30))
