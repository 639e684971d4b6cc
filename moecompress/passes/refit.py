"""Output refit pass: after pruning or merging a layer, re-solve its experts' down projections.

Runs in the same layer-by-layer sweep as :class:`~moecompress.passes.prune.PrunePass` /
:class:`~moecompress.passes.merge.MergePass`, listed AFTER them:

1. ``attach``: during the observation forward (original weights) it records, for every calibration
   batch, the MoE block's input and the routed experts' output — the target;
2. ``process`` (after the pruning/merging pass rebuilt the block): re-runs the rebuilt block on the
   recorded inputs to read the routing it now applies (whatever the family's router does: softmax,
   sigmoid with correction bias, group-limited, scaling factor), then
   :func:`~moecompress.algorithms.refit.refit_down_projections` solves the down projections, which
   are written back. The driver then re-runs the layer, so the next layer sees the refitted one.

Weight-sharing slots (an exact-router merge writes a group's merged expert into every member's slot)
are refitted as one expert with the members' routing weights added and written to every slot, so
the exact form stays exact.

The math is moecompress's extension (see :mod:`moecompress.algorithms.refit`); the papers' methods
are what runs before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moecompress.algorithms.refit import dense_routing_weights, refit_down_projections
from moecompress.calibration.collect import routing_call_args
from moecompress.errors import MoeCompressError
from moecompress.model.driver import LayerContext
from moecompress.model.view import MoEBlockView
from moecompress.validation import check_float, check_int

log = logging.getLogger(__name__)

# layer index -> lists of expert slots holding one shared expert (None: every slot its own)
SharedSlots = Callable[[int], Sequence[Sequence[int]] | None]


@dataclass(frozen=True)
class RefitConfig:
    damp: float = 0.1  # ridge strength relative to the mean diagonal of each expert's Gram matrix
    sweeps: int = 2  # block-coordinate-descent sweeps over the layer's experts

    def validate(self) -> None:
        check_float("--refit-damp", self.damp, 0.0, low_open=True,
                    expected="positive and finite (ridge strength relative to the mean Gram diagonal, e.g. 0.1)")
        check_int("--refit-sweeps", self.sweeps, 1, expected="at least 1 (an integer)")


@dataclass
class LayerRefitRecord:
    layer: int
    relative_error_before: float  # ||y - y_hat||^2 / ||y||^2 on the calibration tokens
    relative_error_after: float
    tokens: int


@dataclass
class _Recording:
    block_inputs: list = field(default_factory=list)  # (args, kwargs) of the block per batch
    expert_inputs: list[torch.Tensor] = field(default_factory=list)  # [T_b, H]
    targets: list[torch.Tensor] = field(default_factory=list)  # [T_b, H] routed output


class RefitPass:
    """LayerPass: refit each rebuilt MoE layer's down projections to its original routed output."""

    def __init__(self, cfg: RefitConfig = RefitConfig(), shared_slots: SharedSlots | None = None):
        self.cfg = cfg
        self.shared_slots = shared_slots
        self.records: list[LayerRefitRecord] = []
        self._rec: _Recording | None = None

    def attach(self, ctx: LayerContext) -> list:
        block = ctx.block
        self._rec = None
        if block is None:
            return []
        rec = self._rec = _Recording()

        def on_block(_module, args, kwargs):
            rec.block_inputs.append((args, kwargs))

        def on_experts(module, args, kwargs, output):
            hidden, _, _ = routing_call_args(module, args, kwargs)
            rec.expert_inputs.append(hidden.detach().reshape(-1, hidden.shape[-1]).float())
            out = output[0] if isinstance(output, tuple) else output
            rec.targets.append(out.detach().reshape(-1, out.shape[-1]).float())

        return [
            block.block.register_forward_pre_hook(on_block, with_kwargs=True),
            block.experts.module.register_forward_hook(on_experts, with_kwargs=True),
        ]

    @torch.no_grad()
    def process(self, ctx: LayerContext) -> bool:
        block, rec = ctx.block, self._rec
        self._rec = None
        if block is None or rec is None or not rec.targets:
            return False
        x = torch.cat(rec.expert_inputs)
        target = torch.cat(rec.targets)
        weights = self._rebuilt_routing(block, rec)  # [T, E']
        slots = self._slot_groups(ctx.index, block.num_experts)
        merged = torch.stack([weights[:, list(s)].sum(dim=1) for s in slots], dim=1)  # [T, G]
        experts = block.experts
        first = [s[0] for s in slots]
        down = torch.stack([experts.get(e, "down").float() for e in first])  # [G, H, I]
        bias = None
        if experts.has_bias:
            bias = torch.stack([experts.get_bias(e, "down").float() for e in first])

        def activations(g: int, xs: torch.Tensor) -> torch.Tensor:
            return experts.intermediate(first[g], xs.to(experts.get(first[g], "up").dtype)).float()

        result = refit_down_projections(x, target, merged, activations, down, bias, self.cfg.damp, self.cfg.sweeps)
        for g, members in enumerate(slots):
            for e in members:
                experts.set(e, "down", result.down[g])
        self.records.append(
            LayerRefitRecord(ctx.index, result.relative_before, result.relative_after, int(x.shape[0]))
        )
        log.info(
            "layer %d: refit routed-output error %.4f -> %.4f (relative)", ctx.index, result.relative_before, result.relative_after
        )
        return True

    def _slot_groups(self, layer: int, num_slots: int) -> list[list[int]]:
        groups = self.shared_slots(layer) if self.shared_slots is not None else None
        return [list(g) for g in groups] if groups else [[e] for e in range(num_slots)]

    @staticmethod
    def _rebuilt_routing(block: MoEBlockView, rec: _Recording) -> torch.Tensor:
        """Dense routing weights [T, E'] the rebuilt block applies to the recorded inputs."""
        seen: list[torch.Tensor] = []

        def on_experts(module, args, kwargs):
            _, index, weights = routing_call_args(module, args, kwargs)
            seen.append(dense_routing_weights(index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1]), block.num_experts))
            raise _RoutingSeen  # the routing is all we need: the experts' compute is skipped

        handle = block.experts.module.register_forward_pre_hook(on_experts, with_kwargs=True)
        try:
            for args, kwargs in rec.block_inputs:
                try:
                    block.block(*args, **kwargs)
                except _RoutingSeen:
                    continue
                raise MoeCompressError(f"{type(block.block).__name__} never called its experts; cannot read its routing for the refit")
        finally:
            handle.remove()
        return torch.cat(seen)


class _RoutingSeen(Exception):
    """Ends a block's forward once the experts module has been handed its routing."""
