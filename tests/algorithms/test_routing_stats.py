"""Router-statistics tensor math (moecompress/algorithms/routing_stats.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecompress.algorithms.routing_stats import (
    coactivation_counts,
    cosine_from_gram,
    load_cv,
    locate_max_abs,
    routing_weight_sums,
    safe_mean,
    selection_matrix,
    starved_mask,
)


def test_selection_and_coactivation():
    index = torch.tensor([[0, 2], [1, 2], [3, -1]])            # -1: an expert-parallel sentinel
    sel = selection_matrix(index, 3)
    assert sel.tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    assert coactivation_counts(sel).tolist() == [[1, 0, 1], [0, 1, 1], [1, 1, 2]]
    weights = torch.tensor([[0.5, 0.25], [0.125, 1.0], [2.0, 4.0]])
    assert routing_weight_sums(index, weights, 3).tolist() == [0.5, 0.125, 1.25]   # ids 3 and -1 dropped


def test_cosine_from_gram():
    cols = torch.randn(50, 4, dtype=torch.float64)
    cols[:, 3] = 0
    cos = cosine_from_gram(cols.t() @ cols)
    expected = F.cosine_similarity(cols.t()[:, None], cols.t()[None], dim=-1)
    torch.testing.assert_close(cos[:3, :3], expected[:3, :3])
    assert torch.equal(cos[3], torch.zeros(4)) and not cos.isnan().any()


def test_means_load_and_starved_experts():
    assert safe_mean(torch.tensor([3.0, 5.0]), torch.tensor([2, 0])).tolist() == [1.5, 0.0]
    assert load_cv(torch.tensor([4, 4, 4])) == 0.0 and load_cv(torch.zeros(3)) == 0.0
    counts = torch.tensor([0, 4, 20, 100])                    # uniform share: 62 tokens * 2 / 4 = 31
    assert starved_mask(counts, 62, 2, 0.2).tolist() == [True, True, False, False]   # below 6.2
    assert starved_mask(counts, 62, 2, 0.0).tolist() == [False] * 4
    assert locate_max_abs(torch.tensor([[1.0, -7.0, 2.0], [6.0, 0.0, 3.0]])) == (7.0, 0, 1)
