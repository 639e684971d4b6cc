"""Dynamic skipping (ODP rule): beta = 0 changes nothing, the rule, calibration, protection, counters.

Shape legend: T tokens, k top-k, H hidden size.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moecompress.model.tiny import build_tiny_model
from moecompress.model.view import describe_model
from moecompress.modules.compressed_experts import wrap_block, wrap_model
from moecompress.algorithms.dynamic_skip import (
    SkipStats,
    calibrate_beta,
    calibrate_protect_threshold,
    protected_tokens,
    skip_keep_mask,
    sort_by_weight,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_sort_by_weight_orders_ids_with_their_weights():
    w = torch.tensor([[0.1, 0.7, 0.2]])
    i = torch.tensor([[5, 3, 9]])
    ws, is_ = sort_by_weight(w, i)
    torch.testing.assert_close(ws, torch.tensor([[0.7, 0.2, 0.1]]))
    assert is_.tolist() == [[3, 9, 5]]


def test_skip_rule_relative_to_first_expert():
    w = torch.tensor([[0.6, 0.4, 0.0], [0.8, 0.2, 0.0], [0.5, 0.3, 0.2]])  # descending
    keep = skip_keep_mask(w, beta=0.5)
    assert keep.tolist() == [[True, True, False], [True, False, False], [True, True, False]]
    assert skip_keep_mask(w, beta=0.0).all()  # beta = 0 keeps every expert (even zero weights)
    protected = torch.tensor([False, True, False])
    assert skip_keep_mask(w, beta=0.5, protected=protected)[1].all()


def test_beta_is_median_ratio_and_protection_threshold_quantile():
    w = torch.tensor([[1.0, 0.1], [1.0, 0.5], [1.0, 0.9], [0.5, 0.25], [1.0, 0.3]])
    assert calibrate_beta(w) == pytest.approx(0.5)
    h = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 10.0], [0.5, 0.5]])  # ||h||_1 = 2, 3, 10, 1
    thr = calibrate_protect_threshold(h, 0.25)
    assert protected_tokens(h, thr).tolist() == [False, False, True, False]
    assert calibrate_protect_threshold(h, 0.0) is None and protected_tokens(h, None) is None


def test_stats_count_skipped_experts():
    stats = SkipStats()
    stats.update(torch.tensor([[True, True], [True, False], [True, False], [True, True]]))
    assert stats.skip_fraction == 0.5 and stats.experts_per_token == 1.5


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "mixtral"])
def test_beta_zero_changes_nothing(family):
    model = build_tiny_model(family, seed=0)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    skipping = copy.deepcopy(model)
    for block in wrap_model(skipping, n_ce=0).values():
        block.skip_beta = 0.0
    with torch.no_grad():
        out = skipping(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_skipping_drops_second_expert_below_beta():
    """beta above 1 skips every second expert: only the top expert remains, with its original weight."""
    model = build_tiny_model("qwen3_moe", seed=0)
    view = describe_model(model).blocks[0]
    x = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    block = wrap_block(view, n_ce=0)
    with torch.no_grad():
        _, w, idx = view.router.route(x)
        ws, is_ = sort_by_weight(w, idx)
        expected = view.experts.module(x, is_[:, :1], ws[:, :1])
        block.skip_beta = 1.01
        out = block(x[None])[0]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert block.stats.skip_fraction == 1.0 and block.stats.experts_per_token == 1.0
        # Protected tokens (all of them here) keep both experts: the original block again.
        block.protect_threshold = -1.0
        torch.testing.assert_close(block(x[None])[0], view.block(x[None])[0], rtol=1e-5, atol=1e-6)
