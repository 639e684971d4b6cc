"""Expert pruning pass: frequency, REAP and DERN over one MoE layer's view and its statistics.

Per MoE layer (``PrunePass.process``, called by the layer-by-layer driver):

1. scores from the layer's :class:`~moecompress.calibration.stats_types.LayerStats` — ``frequency``: share
   of top-k selections; ``reap``: REAP saliency ``mean_{t in X_e} g_e(t) ||f_e(t)||``; ``dern``:
   DERN importance ``(1/T) sum_t 1[e in topk(t)] g_e(t)`` with g the routing weight the model applies
   (normalised top-k weights where the family normalises; DeepSeek's ``routed_scaling_factor`` scales
   every expert alike and does not change the ranking);
2. the kept experts: super experts (from the statistics) always, then the best scores
   (:func:`~moecompress.algorithms.pruning.select_experts`); with group-limited routing (``n_group``)
   the same number is kept in every routing group so each survivor stays in its group;
3. the block is rebuilt with E' experts (:func:`~moecompress.export.standard.resize_experts`); for
   ``dern`` the dropped experts' neurons are first recombined into the kept ones
   (:func:`~moecompress.algorithms.pruning.dern_recombine`), every kept expert keeping its width I.

Expert biases (GPT-OSS): a neuron's gate/up biases travel with its segment — they are folded in as
an extra input column ``[W | b]`` (down gets a zero row), so DERN's similarity, k-means and merging
treat a neuron's bias as part of it, and are unfolded afterwards. ``down_proj_bias [H]`` belongs to
the whole expert, not to a neuron: a kept expert keeps its own.

Shape legend: E experts, E' kept, I intermediate size, H hidden size (H+1 with folded biases).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from moecompress.algorithms.pruning import (
    dern_importance,
    dern_recombine,
    frequency_scores,
    reap_scores,
    select_experts,
)
from moecompress.calibration.stats_types import LayerStats, RouterStats
from moecompress.errors import MoeCompressError
from moecompress.export.standard import resize_experts, routing_groups
from moecompress.model.driver import LayerContext
from moecompress.model.view import ExpertsView, MoEBlockView
from moecompress.validation import check_int

log = logging.getLogger(__name__)

METHODS = ("frequency", "reap", "dern")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class PruneConfig:
    """What to prune: ``method``, and exactly one of ``keep_ratio`` (in (0, 1]) or ``num_experts``."""

    method: str = "reap"
    keep_ratio: float | None = None
    num_experts: int | None = None
    similarity_threshold: float = 0.6  # DERN: a donor neuron joins a kept expert above this cosine
    use_gate_in_similarity: bool = False  # DERN: the paper found leaving the gate row out slightly better
    kmeans_iters: int = 20
    protect_super_experts: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise MoeCompressError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if (self.keep_ratio is None) == (self.num_experts is None):
            raise MoeCompressError("give exactly one of --keep-ratio or --num-experts")
        if self.keep_ratio is not None and not (
            isinstance(self.keep_ratio, (int, float)) and not isinstance(self.keep_ratio, bool) and 0.0 < self.keep_ratio <= 1.0
        ):  # also refuses NaN: every comparison with it is False
            raise MoeCompressError(f"--keep-ratio {self.keep_ratio!r} is outside (0, 1]; e.g. 0.5 keeps half the experts")
        if self.num_experts is not None:
            check_int("--num-experts", self.num_experts, 1, expected="at least 1 (an integer: experts kept per layer)")
        if not (isinstance(self.similarity_threshold, (int, float)) and -1.0 <= self.similarity_threshold <= 1.0):
            raise MoeCompressError(f"--similarity-threshold {self.similarity_threshold!r} is a cosine; use a value in [-1, 1]")
        check_int("k-means iterations (kmeans_iters)", self.kmeans_iters, 1)

    def target(self, num_experts: int) -> int:
        """Experts kept per layer out of ``num_experts``: ``round(keep_ratio * E)`` (at least 1) or N."""
        if self.num_experts is not None:
            return self.num_experts
        return max(1, math.floor(self.keep_ratio * num_experts + 0.5))


# ----------------------------------------------------------------------------- expert stacks


@dataclass
class ExpertStack:
    """A layer's experts in nn.Linear layout, gate/up biases folded in as a last input column.

    gate ``[E, I, H']`` or None, up ``[E, I, H']``, down ``[E, H', I]`` with ``H' = H + 1`` when the
    experts have biases (down's extra row is zero) else H; down_bias ``[E, H]`` or None.
    """

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor | None
    hidden: int

    @property
    def biased(self) -> bool:
        return self.down.shape[1] != self.hidden


def read_experts(view: ExpertsView) -> ExpertStack:
    """Every expert of ``view`` as float32 stacks (copies), biases folded (see :class:`ExpertStack`)."""
    gate = view.stacked("gate").float() if view.has_gate else None  # [E, I, H]
    up = view.stacked("up").float()  # [E, I, H]
    down = view.stacked("down").float()  # [E, H, I]
    down_bias = None
    if view.has_bias:
        num = view.num_experts

        def bias(proj: str) -> torch.Tensor:
            return torch.stack([view.get_bias(e, proj) for e in range(num)]).float()  # [E, I]

        up = torch.cat([up, bias("up").unsqueeze(-1)], dim=-1)  # [E, I, H+1]
        if gate is not None:
            gate = torch.cat([gate, bias("gate").unsqueeze(-1)], dim=-1)
        down = torch.cat([down, down.new_zeros(num, 1, down.shape[-1])], dim=1)  # [E, H+1, I]
        down_bias = torch.stack([view.get_bias(e, "down") for e in range(num)]).float()  # [E, H]
    return ExpertStack(gate, up, down, down_bias, view.hidden_size)


def write_expert(view: ExpertsView, slot: int, stack: ExpertStack, row: int, write_down_bias: bool = True) -> None:
    """Write row ``row`` of ``stack`` into expert slot ``slot`` of ``view`` (unfolding the biases)."""
    h = stack.hidden
    if stack.gate is not None:
        view.set(slot, "gate", stack.gate[row, :, :h])
    view.set(slot, "up", stack.up[row, :, :h])
    view.set(slot, "down", stack.down[row, :h, :])
    if stack.biased:
        if stack.gate is not None:
            view.set_bias(slot, "gate", stack.gate[row, :, h])
        view.set_bias(slot, "up", stack.up[row, :, h])
        if write_down_bias and stack.down_bias is not None:
            view.set_bias(slot, "down", stack.down_bias[row])


# ----------------------------------------------------------------------------- choosing experts


def layer_scores(method: str, stats: LayerStats) -> torch.Tensor:
    """Keep-worthiness ``[E]`` of one layer's experts for ``method`` (higher = keep)."""
    if method == "frequency":
        return frequency_scores(stats.expert_counts)
    if method == "reap":
        return reap_scores(stats.reap_scores)
    if method == "dern":
        return dern_importance(stats.weight_sums, stats.tokens)
    raise MoeCompressError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")


def select_in_routing_groups(scores: torch.Tensor, keep: int, protected: Sequence[int], n_group: int = 1) -> list[int]:
    """:func:`select_experts` applied within each of ``n_group`` contiguous routing groups
    (``keep / n_group`` per group), so group-limited routing keeps its groups. ``n_group = 1``: global."""
    num_experts = scores.shape[0]
    if n_group <= 1:
        return select_experts(scores, keep, protected)
    if num_experts % n_group or keep % n_group:
        raise MoeCompressError(f"{keep} of {num_experts} experts do not split into {n_group} routing groups")
    size, per = num_experts // n_group, keep // n_group
    kept: list[int] = []
    for g in range(n_group):
        lo = g * size
        mine = [e - lo for e in protected if lo <= e < lo + size]
        if len(mine) > per:
            raise MoeCompressError(
                f"routing group {g} holds {len(mine)} super experts but keeps only {per}; keep more experts"
            )
        kept += [lo + e for e in select_experts(scores[lo : lo + size], per, mine)]
    return kept


def protected_experts(stats: RouterStats, layer: int) -> list[int]:
    """Routed super experts of decoder layer ``layer`` (shared experts, id -1, are never pruned anyway)."""
    return sorted({s.expert for s in stats.super_experts if s.layer == layer and s.expert >= 0})


# ----------------------------------------------------------------------------- the pass


@dataclass
class LayerPruneReport:
    layer: int
    num_experts: int
    kept: list[int]
    scores: list[float]
    protected: list[int]
    dern: dict | None = None

    @property
    def dropped(self) -> list[int]:
        return [e for e in range(self.num_experts) if e not in self.kept]


@dataclass
class PruneReport:
    layers: list[LayerPruneReport] = field(default_factory=list)

    def kept_map(self) -> dict[int, list[int]]:
        return {r.layer: r.kept for r in self.layers}


def _dern_summary(info: dict) -> dict:
    return {
        "donor_segments": info["donor_segments"],
        "received": {int(k): v for k, v in info["received"].items()},
        "discarded": {int(k): v for k, v in info["discarded"].items()},
        "mean_similarity": info["mean_similarity"],
        "mean_received_similarity": info["mean_received_similarity"],
        "merged_clusters": {int(k): v for k, v in info["merged_clusters"].items()},
    }


@torch.no_grad()
def prune_block(
    block: MoEBlockView,
    kept: Sequence[int],
    method: str,
    importance: torch.Tensor | None = None,
    cfg: PruneConfig | None = None,
) -> dict | None:
    """Rebuild ``block`` with the experts ``kept`` (new slot r = old expert ``kept[r]``).

    ``dern`` recombines the dropped experts' neurons into the kept ones first (``importance [E]``
    weights them); returns DERN's info summary (None for other methods).
    """
    cfg = cfg or PruneConfig(method=method, keep_ratio=1.0)
    kept = list(kept)
    info = None
    if method == "dern":
        if importance is None:
            raise MoeCompressError("DERN needs the experts' importance")
        stack = read_experts(block.experts)
        gate, up, down, raw = dern_recombine(
            stack.gate, stack.up, stack.down, kept, importance,
            similarity_threshold=cfg.similarity_threshold,
            use_gate_in_similarity=cfg.use_gate_in_similarity,
            kmeans_iters=cfg.kmeans_iters,
        )
        resize_experts(block, kept)
        new = ExpertStack(gate, up, down, None, stack.hidden)
        for r, expert in enumerate(kept):
            if raw["received"].get(expert, 0):  # untouched experts are already exact copies
                write_expert(block.experts, r, new, r, write_down_bias=False)
        info = _dern_summary(raw)
    else:
        resize_experts(block, kept)
    return info


class PrunePass:
    """LayerPass: prune every MoE layer to ``cfg.target(E)`` experts using per-layer statistics.

    ``layer_stats`` maps decoder layer -> :class:`LayerStats` (a :class:`RouterStats`' ``layers``, or a
    :class:`StatsCollector`'s ``layers`` filled during the same sweep — it is read in ``process``);
    ``protected`` maps decoder layer -> super experts never pruned.
    """

    def __init__(
        self,
        cfg: PruneConfig,
        layer_stats: Mapping[int, LayerStats],
        protected: Mapping[int, Sequence[int]] | None = None,
        n_group: int = 1,
    ):
        cfg.validate()
        self.cfg = cfg
        self.layer_stats = layer_stats
        self.protected = protected or {}
        self.n_group = n_group
        self.report = PruneReport()

    @classmethod
    def from_stats(cls, cfg: PruneConfig, stats: RouterStats, config) -> "PrunePass":
        protected = {i: protected_experts(stats, i) for i in stats.moe_layers} if cfg.protect_super_experts else {}
        return cls(cfg, stats.layers, protected, routing_groups(config)[0])

    def attach(self, ctx: LayerContext) -> list:
        return []

    def observation_end(self, ctx: LayerContext):
        """The statistics are all it reads: no observation forward (see the driver's observation_stop)."""
        return ctx.layer

    def process(self, ctx: LayerContext) -> bool:
        block = ctx.block
        if block is None:
            return False
        if ctx.index not in self.layer_stats:
            raise MoeCompressError(f"no statistics for MoE layer {ctx.index}; collect statistics on this model")
        stats = self.layer_stats[ctx.index]
        if stats.num_experts != block.num_experts:
            raise MoeCompressError(
                f"layer {ctx.index}: statistics describe {stats.num_experts} experts, the model has {block.num_experts}; "
                "collect statistics on this model"
            )
        keep = self.cfg.target(block.num_experts)
        scores = layer_scores(self.cfg.method, stats)
        protected = list(self.protected.get(ctx.index, []))
        kept = select_in_routing_groups(scores, keep, protected, self.n_group)
        importance = dern_importance(stats.weight_sums, stats.tokens) if self.cfg.method == "dern" else None
        info = prune_block(block, kept, self.cfg.method, importance, self.cfg)
        self.report.layers.append(
            LayerPruneReport(ctx.index, stats.num_experts, kept, [float(s) for s in scores], protected, info)
        )
        log.info("layer %d: kept experts %s of %d (%s)", ctx.index, kept, stats.num_experts, self.cfg.method)
        return True
