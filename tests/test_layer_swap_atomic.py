"""A layer changes precision whole or not at all (pure logic: stand-in kernels, twins and
file readers; the real kernels are exercised by the engine tests)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from morphserve.runtime.layer_set import LayerSet
from quant_layers.swappable import SwappableLinear

IN, OUT = 8, 4


class Kernels:
    def has_slot(self, layer) -> bool:
        return True

    def adopt(self, layer) -> None:
        pass

    def install(self, layer, forward) -> None:
        layer.forward_fn = forward

    def prepack_bf16(self, master):
        return lambda x, w, b: x[:, :OUT]

    def w8_bytes(self, out_features, in_features) -> int:
        return out_features * in_features


class Compute:
    nbytes = 10

    def __init__(self):
        self.released = False

    def __call__(self, x, weight, bias):
        return torch.zeros(x.shape[0], OUT, dtype=x.dtype)

    def release(self):
        self.released = True


class Twin:
    """Builds a W4 compute; `fail` names the (layer, linear) whose build raises."""

    def __init__(self, log: list, fail: tuple | None = None):
        self.log, self.fail = log, fail

    def build(self, keys, readers):
        if tuple(keys) == self.fail:
            raise OSError("twin read failed")
        compute = Compute()
        self.log.append(compute)
        return compute


class Reader:
    def __init__(self, broken: bool):
        self.broken = broken

    def get(self, key):
        if self.broken:
            raise OSError(f"read of {key} failed")
        return torch.ones(OUT, IN)


class Files:
    def __init__(self, broken: bool = False):
        self.broken = broken

    @contextlib.contextmanager
    def reading(self):
        yield Reader(self.broken)


def _layer_set(twin: Twin, masters_broken: bool) -> LayerSet:
    layers = {}
    for i in range(3):
        layers[i] = [SwappableLinear(torch.nn.Module(), [f"{i}.{j}"], {"w4a16": twin}, IN * OUT * 2, Kernels(),
                                     (IN, OUT), torch.bfloat16) for j in range(4)]
    return LayerSet(layers, Files(masters_broken), Files())


def test_a_failure_inside_a_layer_leaves_it_whole_without_reading_a_file():
    """Layer 1's third linear cannot be built, and the model file cannot be read either
    (the old rollback re-read it, and a failed read left a layer in two tiers)."""
    built: list[Compute] = []
    layers = _layer_set(Twin(built, fail=("1.2",)), masters_broken=True)
    with pytest.raises(OSError, match="twin read failed"):
        layers.apply([0, 1, 2], [])
    assert layers.split_layers() == []
    assert layers.tiers() == {"0": "w4a16"}  # layer 0 finished whole; 1 and 2 untouched
    assert all(s.tier == "bf16" and s.compute is None for s in layers.layers[1])
    assert [c.released for c in built] == [False] * 4 + [True, True]  # layer 1's two built, never installed


def test_every_layer_changes_whole_when_nothing_fails():
    layers = _layer_set(Twin([]), masters_broken=False)
    result = layers.apply([0, 1, 2], [])
    assert layers.split_layers() == [] and result["quantized"] == [0, 1, 2]
    layers.apply([], [2, 1])
    assert layers.split_layers() == [] and layers.quantized() == [0]
