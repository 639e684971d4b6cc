"""Super-expert detection: planted outliers, the layer cutoff, both thresholds, shared experts."""

import pytest
import torch

from moecompress.analysis.super_experts import (
    SuperExpert,
    detect_super_experts,
    layer_cutoff,
    super_expert_thresholds,
)
from moecompress.errors import MoeCompressError


def background(num_layers=8, experts=64, seed=0):
    """Ordinary experts: max |output| between 1 and 10."""
    g = torch.Generator().manual_seed(seed)
    return {l: 1 + 9 * torch.rand(experts, generator=g) for l in range(num_layers)}


def test_planted_outliers_are_found_and_nothing_else():
    stats = background()
    stats[1][7] = 500.0
    stats[4][3] = 300.0
    stats[2][2] = 40.0  # third largest: above max/10? no (40 < 50); above P99.5? no
    found = detect_super_experts(stats, num_layers=8)
    assert found == [SuperExpert(1, 7, 500.0), SuperExpert(4, 3, 300.0)]


def test_layers_past_the_cutoff_are_ignored():
    stats = background()
    stats[1][7] = 500.0
    stats[6][0] = 5000.0  # layer 6 >= round(0.75 * 8): not pooled, and must not raise max(pool)
    stats[7][9] = 9000.0
    found = detect_super_experts(stats, num_layers=8)
    assert found == [SuperExpert(1, 7, 500.0)]
    assert super_expert_thresholds(stats, num_layers=8).pool_max == 500.0
    # With every layer pooled, the late outliers dominate and 500 falls below max/10.
    everything = detect_super_experts(stats, num_layers=8, layer_fraction=1.0)
    assert [(s.layer, s.expert) for s in everything] == [(7, 9), (6, 0)]


def test_both_thresholds_must_be_exceeded():
    stats = background()
    stats[0][0] = 1000.0
    stats[3][5] = 60.0  # above the percentile (second largest) but below max * ratio = 100
    stats[5][1] = 50.0
    limits = super_expert_thresholds(stats, num_layers=8)
    assert limits.percentile_value < 60.0 < limits.ratio_value
    assert detect_super_experts(stats, num_layers=8) == [SuperExpert(0, 0, 1000.0)]
    # Lowering the ratio admits it: the ratio threshold was the one that excluded it.
    assert [s.max_abs for s in detect_super_experts(stats, num_layers=8, ratio=0.05)] == [1000.0, 60.0]


def test_thresholds_on_a_tiny_pool_interpolate_linearly():
    # 2 layers x 4 experts; round(0.75 * 2) = 2 keeps both. Sorted pool 1..8: P99.5 = 7 + 0.965 * (8 - 7).
    stats = {0: torch.tensor([1.0, 2.0, 3.0, 4.0]), 1: torch.tensor([8.0, 7.0, 6.0, 5.0])}
    limits = super_expert_thresholds(stats, num_layers=2)
    assert limits.layer_cutoff == 2 and limits.pool_size == 8
    assert limits.percentile_value == pytest.approx(7.965)
    assert limits.pool_max == 8.0 and limits.ratio_value == pytest.approx(0.8)
    # The reference criterion alone flags the pool's maximum, an artefact of tiny pools ...
    assert detect_super_experts(stats, num_layers=2, median_factor=0.0) == [SuperExpert(1, 0, 8.0)]
    # ... which the median guard (8 is not 10x the median 4.5) removes by default.
    assert detect_super_experts(stats, num_layers=2) == []
    # Agrees with torch.quantile on the pooled values for another percentile.
    pool = torch.cat([stats[0], stats[1]]).double()
    assert super_expert_thresholds(stats, 2, percentile=90.0).percentile_value == pytest.approx(
        float(torch.quantile(pool, 0.9))
    )


def test_tiny_pool_with_tied_maxima_has_no_super_expert():
    stats = {0: torch.tensor([1.0, 8.0, 3.0, 4.0]), 1: torch.tensor([8.0, 7.0, 6.0, 5.0])}
    assert detect_super_experts(stats, num_layers=2) == []


def test_shared_experts_are_reported_as_minus_one():
    stats = background()
    shared = {l: 5.0 for l in range(8)}
    shared[2] = 800.0
    found = detect_super_experts(stats, num_layers=8, shared_output_max=shared)
    assert found == [SuperExpert(2, -1, 800.0)]
    assert super_expert_thresholds(stats, 8, shared_output_max=shared).pool_size == 6 * 64 + 6


def test_layer_cutoff_rounds_like_python():
    assert layer_cutoff(48, 0.75) == 36
    assert layer_cutoff(2, 0.75) == 2  # round(1.5) = 2
    assert layer_cutoff(6, 0.75) == 4  # round(4.5) = 4 (halves to even)
    with pytest.raises(MoeCompressError):
        layer_cutoff(0, 0.75)


def test_bad_statistics_are_errors():
    with pytest.raises(MoeCompressError, match="no expert statistics"):
        detect_super_experts({7: torch.ones(4)}, num_layers=8)
    with pytest.raises(MoeCompressError, match="finite"):
        detect_super_experts({0: torch.tensor([1.0, float("nan")])}, num_layers=2)
    with pytest.raises(MoeCompressError, match="percentile"):
        detect_super_experts({0: torch.ones(4)}, num_layers=2, percentile=150.0)
