"""Running sums of one MoE layer over the batches of the observation forward (tensor math only).

:class:`LayerAccumulator` is fed by the hooks of :class:`~moecompress.calibration.collect.StatsCollector`
with what one batch's router and experts saw, and turns the sums into a
:class:`~moecompress.calibration.stats_types.LayerStats` when the layer is done.

Shape legend: T tokens of a batch, E experts, H hidden size, k top-k, D domains, Te tokens routed to
expert e.
"""

from __future__ import annotations

from typing import Callable

import torch

from moecompress.algorithms.routing_stats import (
    coactivation_counts,
    locate_max_abs,
    logit_gram,
    routing_weight_sums,
    selection_matrix,
)
from moecompress.calibration.stats_types import LayerStats
from moecompress.errors import MoeCompressError


class LayerAccumulator:
    """Running sums of one MoE layer over the batches of the observation forward."""

    def __init__(self, layer: int, num_experts: int, top_k: int, num_domains: int = 0):
        e = num_experts
        self.layer, self.num_experts, self.top_k = layer, e, top_k
        self.tokens = 0
        self.router_tokens = 0
        self.counts = torch.zeros(e, dtype=torch.float64)
        self.weight_sums = torch.zeros(e, dtype=torch.float64)
        self.prob_sums = torch.zeros(e, dtype=torch.float64)
        self.coactivation = torch.zeros(e, e, dtype=torch.float64)
        self.gram = torch.zeros(e, e, dtype=torch.float64)
        self.reap_sum = torch.zeros(e, dtype=torch.float64)
        self.output_max = torch.zeros(e, dtype=torch.float64)
        self.output_max_where = torch.full((e, 3), -1, dtype=torch.int64)
        self.shared_output_max: float | None = None
        self.domain_counts = torch.zeros(num_domains, e, dtype=torch.float64) if num_domains else None

    def add_router(self, logits: torch.Tensor, probs: torch.Tensor) -> None:
        """logits [T, E] and router probabilities [T, E] of one batch."""
        self.router_tokens += logits.shape[0]
        self.prob_sums += probs.double().sum(0)
        self.gram += logit_gram(logits)

    def add_routing(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, token_domain: torch.Tensor | None) -> None:
        """The routing one batch applied: top_k_index [T, k], top_k_weights [T, k], token_domain [T] (or None)."""
        sel = selection_matrix(top_k_index, self.num_experts)              # [T, E]
        self.tokens += sel.shape[0]
        self.counts += sel.sum(0)
        self.weight_sums += routing_weight_sums(top_k_index, top_k_weights, self.num_experts)
        self.coactivation += coactivation_counts(sel)
        if self.domain_counts is not None and token_domain is not None:
            self.domain_counts.index_add_(0, token_domain, sel)            # [D, E]

    def add_expert_output(self, e: int, weights: torch.Tensor, out: torch.Tensor, where: Callable[[int], tuple[int, int]]) -> None:
        """Expert e's outputs on its routed tokens: weights [Te] (applied g), out [Te, H] (before g).

        ``where(token)`` maps a token of the batch (row of ``out``'s source) to (calibration row,
        position); it is called with the index into ``out``'s rows.
        """
        self.reap_sum[e] += (weights.double() * out.double().norm(dim=-1)).sum()
        value, token, channel = locate_max_abs(out)
        if value > self.output_max[e] or self.output_max_where[e, 0] < 0:
            row, pos = where(token)
            self.output_max[e] = value
            self.output_max_where[e] = torch.tensor([row, pos, channel])

    def add_shared_output(self, out: torch.Tensor) -> None:
        """The shared expert's output of one batch [..., H] (before its sigmoid gate, where it has one)."""
        value = float(out.detach().abs().max())
        self.shared_output_max = value if self.shared_output_max is None else max(self.shared_output_max, value)

    def finish(self) -> LayerStats:
        if self.router_tokens != self.tokens:
            raise MoeCompressError(
                f"layer {self.layer}: the router saw {self.router_tokens} tokens but the experts {self.tokens}; "
                "this MoE block calls its router and experts in a way the statistics collector does not know"
            )
        return LayerStats(
            layer=self.layer,
            num_experts=self.num_experts,
            top_k=self.top_k,
            tokens=self.tokens,
            expert_counts=self.counts.round().long(),
            weight_sums=self.weight_sums,
            prob_sums=self.prob_sums,
            coactivation=self.coactivation.round().long(),
            router_gram=self.gram,
            reap_sum=self.reap_sum,
            output_max=self.output_max,
            output_max_where=self.output_max_where,
            shared_output_max=self.shared_output_max,
            domain_counts=None if self.domain_counts is None else self.domain_counts.round().long(),
        )
