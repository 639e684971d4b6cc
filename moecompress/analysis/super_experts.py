"""Super-expert detection (ZunhaiSu/Super-Experts-Profilling, ``_identify_super_experts``).

Shape legend: E routed experts of a layer, L decoder layers.

Statistic (collected by the caller): for each decoder layer, the max |down_proj output| of each
expert over all calibration tokens, ``output_max[layer]`` of shape ``[E]``. Shared experts are
passed separately (``shared_output_max[layer]``, a scalar) and reported with ``expert = -1``, as the
reference code does.

Criterion: pool the values of every (layer, expert) with ``layer < round(layer_fraction * L)``
(Python's ``round``: halves go to the even integer, so L = 6 keeps layers 0..3); an expert is super
iff its value is ``> P_percentile(pool)`` AND ``> max(pool) * ratio``. Layers past the cutoff are
ignored: the reference excludes the last quarter, whose large activations feed the output head and
are not the attention-sink kind.

The percentile interpolates linearly between order statistics (numpy.percentile's default,
torch.quantile's "linear"). On a tiny pool (say 2 layers x 4 experts) P99.5 lies between the two
largest values, so at most the single largest value can pass (and only if it is strictly larger
than the runner-up); in general more than one super expert needs a pool of at least 202 values
(the second largest must sit above position 0.995 * (n - 1)).

One difference from the reference: it compares with ``max(pool) // 10`` (floor division, an
artefact of Python's ``//``); we use ``max(pool) * ratio`` unrounded, which differs only for
maxima below a few units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moecompress.errors import MoeCompressError
from moecompress.validation import check_float

SHARED_EXPERT = -1  # expert index reported for a layer's shared expert


@dataclass
class SuperExpert:
    """One super expert: decoder layer index, expert index (-1 = shared expert), its max |output|."""

    layer: int
    expert: int
    max_abs: float


@dataclass(frozen=True)
class SuperExpertThresholds:
    """The thresholds the criterion used, for reports: an expert is super iff its value exceeds both
    ``percentile_value`` and ``ratio_value``. ``layer_cutoff``: layers ``< layer_cutoff`` were pooled."""

    layer_cutoff: int
    pool_size: int
    percentile_value: float
    pool_max: float
    ratio_value: float


def layer_cutoff(num_layers: int, layer_fraction: float) -> int:
    """Decoder layers with index below this are pooled: ``round(layer_fraction * num_layers)``."""
    if num_layers <= 0:
        raise MoeCompressError(f"num_layers must be positive, got {num_layers}")
    if not 0.0 < layer_fraction <= 1.0:
        raise MoeCompressError(f"layer_fraction must be in (0, 1], got {layer_fraction}")
    return round(layer_fraction * num_layers)


def _pooled_entries(
    output_max: Mapping[int, torch.Tensor],
    shared_output_max: Mapping[int, torch.Tensor | float] | None,
    cutoff: int,
) -> list[tuple[int, int, float]]:
    """(layer, expert, value) for every expert of every layer below the cutoff, in layer order."""
    entries: list[tuple[int, int, float]] = []
    for layer in sorted(output_max):
        if layer < cutoff:
            values = torch.as_tensor(output_max[layer], dtype=torch.float64).reshape(-1)  # [E]
            entries += [(layer, e, v) for e, v in enumerate(values.tolist())]
    for layer in sorted(shared_output_max or {}):
        if layer < cutoff:
            value = float(torch.as_tensor(shared_output_max[layer], dtype=torch.float64).reshape(()))
            entries.append((layer, SHARED_EXPERT, value))
    for layer, expert, value in entries:
        if not math.isfinite(value) or value < 0:
            raise MoeCompressError(
                f"layer {layer} expert {expert}: max |output| is {value}; it must be finite and >= 0"
            )
    return entries


def super_expert_thresholds(
    output_max: Mapping[int, torch.Tensor],
    num_layers: int,
    percentile: float = 99.5,
    ratio: float = 0.1,
    layer_fraction: float = 0.75,
    shared_output_max: Mapping[int, torch.Tensor | float] | None = None,
) -> SuperExpertThresholds:
    """The detection thresholds over the pooled layers (arguments as :func:`detect_super_experts`)."""
    cutoff = layer_cutoff(num_layers, layer_fraction)
    entries = _pooled_entries(output_max, shared_output_max, cutoff)
    return _thresholds(entries, cutoff, percentile, ratio)


def check_threshold_options(percentile: float, ratio: float) -> None:
    """One-line errors for the detection options (``stats --super-percentile / --super-ratio``), NaN included;
    callable before any statistics are collected."""
    check_float("--super-percentile", percentile, 0.0, 100.0)
    check_float("--super-ratio", ratio, 0.0)


def _thresholds(entries, cutoff: int, percentile: float, ratio: float) -> SuperExpertThresholds:
    check_threshold_options(percentile, ratio)
    if not entries:
        raise MoeCompressError(
            f"no expert statistics in decoder layers below {cutoff}; pass output_max for the MoE layers"
        )
    pool = torch.tensor([v for _, _, v in entries], dtype=torch.float64)  # [n]
    p_value = float(torch.quantile(pool, percentile / 100.0, interpolation="linear"))
    pool_max = float(pool.max())
    return SuperExpertThresholds(cutoff, len(entries), p_value, pool_max, pool_max * ratio)


def detect_super_experts(
    output_max: Mapping[int, torch.Tensor],
    num_layers: int,
    percentile: float = 99.5,
    ratio: float = 0.1,
    layer_fraction: float = 0.75,
    shared_output_max: Mapping[int, torch.Tensor | float] | None = None,
    median_factor: float = 10.0,
) -> list[SuperExpert]:
    """Super experts, largest first.

    Deviation from the reference criterion (documented in the README): a super expert must also
    exceed ``median_factor`` times the pool's median. The reference thresholds (P99.5 and max/10)
    were designed for pools of thousands of experts; in a small pool (< 200 values) P99.5 is the
    maximum itself and the largest ordinary expert would always be flagged. Real super experts are
    orders of magnitude above the median, so a factor of 10 keeps them and drops that artefact;
    ``median_factor=0`` restores the reference behaviour.

    ``output_max``: decoder layer index -> ``[E]`` per-expert max |down_proj output| over calibration
    (only MoE layers need be present). ``num_layers``: decoder layers in the model (sets the cutoff).
    ``shared_output_max``: decoder layer index -> scalar for the layer's shared expert, reported as
    expert -1. Ties in magnitude keep the pooled order (routed experts by layer, then shared ones).
    """
    cutoff = layer_cutoff(num_layers, layer_fraction)
    entries = _pooled_entries(output_max, shared_output_max, cutoff)
    limits = _thresholds(entries, cutoff, percentile, ratio)
    median = float(torch.tensor([v for _l, _e, v in entries], dtype=torch.float64).median()) if entries else 0.0
    found = [
        SuperExpert(layer, expert, value)
        for layer, expert, value in entries
        if value > limits.percentile_value and value > limits.ratio_value and value > median_factor * median
    ]
    return sorted(found, key=lambda s: -s.max_abs)  # stable sort: ties keep the pooled order
