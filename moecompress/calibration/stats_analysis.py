"""What collected router statistics say about the experts: super experts and coverage.

* :func:`find_super_experts` - experts whose max |down_proj output| stands out (ALGORITHMS.md
  section 4), pooled over the first :data:`SUPER_EXPERT_LAYER_FRACTION` of the decoder layers;
* :func:`compute_coverage` - *starved* experts, selected fewer than a threshold x their uniform share
  (tokens * k / E): their calibration statistics rest on few tokens.

Both fill in the matching fields of a :class:`~moecompress.calibration.stats_types.RouterStats`
(saved with it in stats.json) and return them.
"""

from __future__ import annotations

from moecompress.algorithms.routing_stats import starved_mask, uniform_share
from moecompress.analysis.super_experts import (
    SuperExpert,
    detect_super_experts,
    layer_cutoff,
    super_expert_thresholds,
)
from moecompress.calibration.stats_types import RouterStats
from moecompress.errors import MoeCompressError

SUPER_EXPERT_LAYER_FRACTION = 0.75


def find_super_experts(stats: RouterStats, percentile: float = 99.5, ratio: float = 0.1) -> list[SuperExpert]:
    """Detect super experts from output_max (ALGORITHMS.md section 4); sets ``stats.super_experts`` and
    ``stats.super_expert_criterion``."""
    cutoff = layer_cutoff(stats.num_layers, SUPER_EXPERT_LAYER_FRACTION)
    pooled = {i: v for i, v in stats.output_max.items() if i < cutoff}
    shared = {i: v for i, v in stats.shared_output_max.items() if i < cutoff}
    stats.super_expert_criterion = {
        "percentile": percentile,
        "ratio": ratio,
        "layer_fraction": SUPER_EXPERT_LAYER_FRACTION,
        "layer_cutoff": cutoff,
    }
    if not pooled:  # no MoE layer in the pooled range: nothing can qualify
        stats.super_experts = []
        return stats.super_experts
    args = dict(percentile=percentile, ratio=ratio, layer_fraction=SUPER_EXPERT_LAYER_FRACTION, shared_output_max=shared)
    limits = super_expert_thresholds(pooled, stats.num_layers, **args)
    stats.super_expert_criterion.update(percentile_value=limits.percentile_value, ratio_value=limits.ratio_value)
    stats.super_experts = detect_super_experts(pooled, stats.num_layers, **args)
    return stats.super_experts


def compute_coverage(stats: RouterStats, threshold: float = 0.1) -> dict:
    """Experts selected fewer than ``threshold`` x their uniform share (tokens * k / E) per layer; sets
    ``stats.coverage``."""
    if threshold < 0:
        raise MoeCompressError(f"coverage threshold must be >= 0, got {threshold}")
    starved, per_layer = [], []
    for i in stats.moe_layers:
        s = stats.layers[i]
        share = uniform_share(s.tokens, s.top_k, s.num_experts)
        mask = starved_mask(s.expert_counts, s.tokens, s.top_k, threshold)
        for e in mask.nonzero().flatten().tolist():
            starved.append({"layer": i, "expert": e, "count": int(s.expert_counts[e]), "uniform_share": share})
        ratio = s.load_ratio
        per_layer.append(
            {
                "layer": i,
                "starved": int(mask.sum()),
                "unused": int((s.expert_counts == 0).sum()),
                "min_load_ratio": float(ratio.min()) if ratio.numel() else 0.0,
                "max_load_ratio": float(ratio.max()) if ratio.numel() else 0.0,
            }
        )
    stats.coverage = {"threshold": threshold, "num_starved": len(starved), "starved": starved, "layers": per_layer}
    return stats.coverage
