"""One layer's running sums (moecompress/calibration/stats_accumulator.py), fed by hand."""

from __future__ import annotations

import pytest
import torch

from moecompress.calibration.stats_accumulator import LayerAccumulator
from moecompress.errors import MoeCompressError


def test_sums_become_layer_stats():
    acc = LayerAccumulator(layer=3, num_experts=3, top_k=2, num_domains=2)
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])                  # [T=2, E=3]
    acc.add_router(logits, logits.softmax(-1))
    index = torch.tensor([[0, 1], [1, 2]])                                      # [T, k]
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5]])                          # [T, k]
    acc.add_routing(index, weights, torch.tensor([1, 0]))
    acc.add_expert_output(1, torch.tensor([0.25, 0.5]), torch.tensor([[3.0, 4.0], [0.0, -8.0]]), lambda t: (10 + t, 7))
    s = acc.finish()
    assert (s.layer, s.tokens, s.top_k) == (3, 2, 2)
    assert s.expert_counts.tolist() == [1, 2, 1] and s.expert_counts.dtype == torch.int64
    assert s.coactivation.tolist() == [[1, 1, 0], [1, 2, 1], [0, 1, 1]]
    assert s.domain_counts.tolist() == [[0, 1, 1], [1, 1, 0]]                   # token 1 is domain 0
    assert s.reap_sum.tolist() == [0.0, 0.25 * 5.0 + 0.5 * 8.0, 0.0]
    assert s.output_max.tolist() == [0.0, 8.0, 0.0]
    assert s.output_max_where[1].tolist() == [11, 7, 1] and s.output_max_where[0].tolist() == [-1, -1, -1]
    torch.testing.assert_close(s.router_gram, (logits.t() @ logits).double())


def test_router_and_experts_must_see_the_same_tokens():
    acc = LayerAccumulator(layer=0, num_experts=2, top_k=1)
    acc.add_router(torch.zeros(3, 2), torch.full((3, 2), 0.5))
    acc.add_routing(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), None)
    with pytest.raises(MoeCompressError, match="router saw 3 tokens but the experts 2"):
        acc.finish()
