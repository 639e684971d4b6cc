from __future__ import annotations

import torch

from moecompress.model.driver import LayerContext
from moecompress.passes.storage_rounding import StorageRounding


def _ctx(layer: torch.nn.Module) -> LayerContext:
    return LayerContext(0, layer, None, [], [])


def test_rounds_float32_weights_as_a_bfloat16_checkpoint_would_hold_them():
    layer = torch.nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    expected = layer.weight.detach().to(torch.bfloat16).float()
    assert not torch.equal(layer.weight.detach(), expected)
    rounding = StorageRounding(torch.bfloat16)
    assert rounding.observation_end(_ctx(layer)) is layer  # it reads no activations
    assert rounding.process(_ctx(layer)) is True
    assert torch.equal(layer.weight.detach(), expected) and layer.weight.dtype == torch.float32
    assert rounding.process(_ctx(layer)) is False  # already representable: nothing changed


def test_a_float32_checkpoint_changes_nothing():
    layer = torch.nn.Linear(8, 4)
    before = layer.weight.detach().clone()
    assert StorageRounding(torch.float32).process(_ctx(layer)) is False
    assert torch.equal(layer.weight.detach(), before)
