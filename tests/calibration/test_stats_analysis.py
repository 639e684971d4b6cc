"""Super experts and coverage from collected statistics (moecompress/calibration/stats_analysis.py)."""

from __future__ import annotations

import pytest
import torch

from moecompress.calibration.collect import collect_stats
from moecompress.calibration.stats_analysis import compute_coverage
from moecompress.errors import MoeCompressError
from moecompress.model.tiny import build_tiny_model
from moecompress.model.view import describe_model
from stats_util import calib_set


def test_planted_super_expert_is_found_and_nothing_else(tmp_path):
    model = build_tiny_model("qwen3_moe", num_hidden_layers=4)
    experts = describe_model(model).blocks[1].experts
    experts.set(2, "down", experts.get(2, "down") * 1000.0)
    model.save_pretrained(str(tmp_path))
    stats = collect_stats(tmp_path, calib_set(domains=None), batch_size=8)
    assert stats.layer(1).expert_counts[2] > 0, "the planted expert must receive tokens"
    found = [(s.layer, s.expert) for s in stats.super_experts]
    assert found == [(1, 2)]
    assert stats.is_super_expert(1, 2) and not stats.is_super_expert(1, 1)
    assert stats.super_expert_criterion["layer_cutoff"] == 3
    others = torch.cat([stats.layer(i).output_max for i in stats.moe_layers])
    assert stats.super_experts[0].max_abs == pytest.approx(float(others.max()))
    assert stats.domain_names is None and stats.layer(1).domain_counts is None


def test_coverage_flags_experts_below_the_threshold(tiny_stats):
    _, stats = tiny_stats["qwen3_moe"]
    layer = stats.moe_layers[0]
    s = stats.layer(layer)
    # a threshold just above the least-used expert's ratio flags exactly that expert (and equals)
    ratio = s.load_ratio
    cov = compute_coverage(stats, float(ratio.min()) + 1e-9)
    flagged = {(x["layer"], x["expert"]) for x in cov["starved"]}
    assert (layer, int(ratio.argmin())) in flagged
    assert all(stats.layer(l).load_ratio[e] <= ratio.min() + 1e-9 for l, e in flagged)
    assert compute_coverage(stats, 0.0)["num_starved"] == 0
    with pytest.raises(MoeCompressError):
        compute_coverage(stats, -1.0)
    compute_coverage(stats, 0.1)
