"""Router and expert statistics over a calibration set, collected layer by layer.

One pass of the layer-by-layer driver (:func:`moecompress.model.driver.run_layerwise`) records, for
every MoE layer, what the methods of ALGORITHMS.md need from the router and the experts:

* ``expert_counts [E]``   top-k selections per expert (MC-MoE phi, frequency pruning, M-SMoE f_e);
* ``weight_sums [E]``     sum of the routing weight the model applies to each selected expert (MC-MoE w);
* ``prob_sums [E]``       sum of the router probabilities over ALL tokens (mean router probability);
* ``coactivation [E, E]`` tokens whose top-k holds both experts (diagonal = ``expert_counts``);
* ``router_gram [E, E]``  Gram matrix of the router-logit columns, so the cosine similarity of two
  experts' logit columns (M-SMoE grouping) streams over batches: cos = G_ij / sqrt(G_ii G_jj);
* ``reap_sum [E]``        sum over routed tokens of g_e(t) * ||f_e(t)||_2 (REAP saliency numerator;
  ``reap_scores`` = reap_sum / expert_counts);
* ``output_max [E]``      max |f_e(t)| over routed tokens, the expert's down_proj output before the
  routing weight, and where it occurred (calibration row, position, channel); the shared expert's max
  separately (super experts, reported as expert -1);
* ``domain_counts [D, E]`` top-k selections per calibration domain, when the rows carry domains.

Hooks: the router module's forward output ``(logits [T, E], weights, index)`` gives the logit
statistics; a forward pre-hook on the experts module sees ``(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])`` - exactly the routing the model applies - and re-runs each expert on its
routed tokens with :meth:`ExpertsView.forward_expert` to get f_e(t). Only one layer is materialised at
a time; the statistics themselves are O(E^2) per layer.

Files: :meth:`RouterStats.save` writes ``stats.safetensors`` (tensors ``layer{i}.{name}``) and
``stats.json`` (version 1: model, calibration, per-layer summaries, super experts, coverage).

Shape legend: T tokens of a batch, E experts, H hidden size, k top-k, D domains, n calibration rows,
Lq positions per row.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moecompress.analysis.super_experts import (
    SuperExpert,
    detect_super_experts,
    layer_cutoff,
    super_expert_thresholds,
)
from moecompress.calibration.types import CalibrationSet
from moecompress.errors import MoeCompressError
from moecompress.model.driver import LayerContext, run_layerwise
from moecompress.model.loading import LayerwiseModel
from moecompress.model.view import MoEBlockView

log = logging.getLogger(__name__)

STATS_VERSION = 1
STATS_JSON = "stats.json"
STATS_TENSORS = "stats.safetensors"
SUPER_EXPERT_LAYER_FRACTION = 0.75

# Per-layer tensors written to stats.safetensors, in this order.
_TENSOR_FIELDS = (
    "expert_counts",
    "weight_sums",
    "prob_sums",
    "coactivation",
    "router_gram",
    "router_similarity",
    "reap_sum",
    "reap_scores",
    "output_max",
    "output_max_where",
)


# --------------------------------------------------------------------------------------------------
# Plain tensor math (no hooks, no model)
# --------------------------------------------------------------------------------------------------


def selection_matrix(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """One row per token, 1.0 where the expert is in the token's top-k: [T, k] -> [T, E] float64.

    Ids outside [0, E) (expert-parallel sentinels) select nothing.
    """
    idx = top_k_index.reshape(-1, top_k_index.shape[-1]).long()          # [T, k]
    valid = (idx >= 0) & (idx < num_experts)
    mask = torch.zeros(idx.shape[0], num_experts + 1, dtype=torch.float64)
    mask.scatter_add_(1, torch.where(valid, idx, num_experts), valid.double())  # sentinel column E
    return mask[:, :num_experts]                                          # [T, E]


def routing_weight_sums(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Sum of the applied routing weight per expert: [T, k], [T, k] -> [E] float64."""
    idx = top_k_index.reshape(-1).long()                                  # [T*k]
    w = top_k_weights.reshape(-1).double()                                # [T*k]
    valid = (idx >= 0) & (idx < num_experts)
    return torch.zeros(num_experts, dtype=torch.float64).index_add_(0, idx[valid], w[valid])


def coactivation_counts(selection: torch.Tensor) -> torch.Tensor:
    """Pairs of experts in the same token's top-k: selection [T, E] -> [E, E] (diagonal = counts)."""
    return selection.t() @ selection                                      # [E, E]


def logit_gram(logits: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the router-logit columns: logits [T, E] -> [E, E] float64 (sums over tokens)."""
    x = logits.reshape(-1, logits.shape[-1]).double()
    return x.t() @ x


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the columns behind a Gram matrix: [E, E] -> [E, E]; 0 for a zero column."""
    norms = gram.diagonal().clamp_min(0).sqrt()                           # [E]
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))


def safe_mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sums / counts elementwise, 0 where counts is 0 (never NaN): [E], [E] -> [E] float64."""
    counts = counts.double()
    return torch.where(counts > 0, sums.double() / counts.clamp_min(1), torch.zeros_like(counts))


def load_cv(counts: torch.Tensor) -> float:
    """Coefficient of variation (population std / mean) of per-expert counts [E]; 0 with no tokens."""
    c = counts.double()
    mean = c.mean()
    return float(c.std(unbiased=False) / mean) if mean > 0 else 0.0


def uniform_share(tokens: int, top_k: int, num_experts: int) -> float:
    """Selections an expert gets under perfectly even routing: tokens * k / E."""
    return tokens * top_k / num_experts


def starved_mask(counts: torch.Tensor, tokens: int, top_k: int, threshold: float) -> torch.Tensor:
    """Experts selected fewer than ``threshold`` x the uniform share times: counts [E] -> [E] bool."""
    return counts.double() < threshold * uniform_share(tokens, top_k, counts.numel())


def locate_max_abs(values: torch.Tensor) -> tuple[float, int, int]:
    """Largest |value| of a [T, H] matrix and its (token, channel)."""
    flat = values.abs().reshape(-1)
    pos = int(flat.argmax())
    return float(flat[pos]), pos // values.shape[1], pos % values.shape[1]


# --------------------------------------------------------------------------------------------------
# Per-layer container
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerStats:
    """Statistics of one MoE layer (decoder layer index ``layer``); tensors on CPU.

    output_max_where [E, 3] int64: (calibration row, position, channel) of each expert's max |output|,
    -1 for an expert that received no token. domain_counts [D, E] (None without domains; rows follow
    ``RouterStats.domain_names``). shared_output_max: the shared expert's max |output| (None: no shared expert).
    """

    layer: int
    num_experts: int
    top_k: int
    tokens: int
    expert_counts: torch.Tensor  # [E] int64
    weight_sums: torch.Tensor  # [E] float64
    prob_sums: torch.Tensor  # [E] float64
    coactivation: torch.Tensor  # [E, E] int64
    router_gram: torch.Tensor  # [E, E] float64
    reap_sum: torch.Tensor  # [E] float64
    output_max: torch.Tensor  # [E] float64
    output_max_where: torch.Tensor  # [E, 3] int64
    shared_output_max: float | None = None
    domain_counts: torch.Tensor | None = None  # [D, E] int64

    @property
    def reap_scores(self) -> torch.Tensor:
        """REAP saliency [E]: mean over routed tokens of g_e(t) * ||f_e(t)||_2 (0 for unrouted experts)."""
        return safe_mean(self.reap_sum, self.expert_counts)

    @property
    def mean_probs(self) -> torch.Tensor:
        """Mean router probability of each expert over all tokens [E]."""
        return self.prob_sums / max(self.tokens, 1)

    @property
    def mean_weights(self) -> torch.Tensor:
        """Mean applied routing weight of each expert over the tokens routed to it [E]."""
        return safe_mean(self.weight_sums, self.expert_counts)

    @property
    def frequency(self) -> torch.Tensor:
        """Share of all top-k selections [E] (sums to 1; M-SMoE's usage frequency)."""
        total = self.expert_counts.sum().double()
        return self.expert_counts.double() / total if total > 0 else torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def load_ratio(self) -> torch.Tensor:
        """Selections relative to the uniform share tokens*k/E [E] (1 = exactly even load)."""
        share = uniform_share(self.tokens, self.top_k, self.num_experts)
        return self.expert_counts.double() / share if share > 0 else torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def router_similarity(self) -> torch.Tensor:
        """Cosine similarity of experts' router-logit columns over the calibration tokens [E, E]."""
        return cosine_from_gram(self.router_gram)

    @property
    def load_cv(self) -> float:
        return load_cv(self.expert_counts)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything tensor-valued, as written to stats.safetensors (without the layer prefix)."""
        out = {name: getattr(self, name) for name in _TENSOR_FIELDS}
        if self.shared_output_max is not None:
            out["shared_output_max"] = torch.tensor([self.shared_output_max], dtype=torch.float64)
        if self.domain_counts is not None:
            out["domain_counts"] = self.domain_counts
        return out

    def summary(self) -> dict:
        """The per-layer entry of stats.json."""
        return {
            "layer": self.layer,
            "tokens": self.tokens,
            "top_k": self.top_k,
            "num_experts": self.num_experts,
            "load_cv": self.load_cv,
            "expert_counts": self.expert_counts.tolist(),
            "weight_sums": self.weight_sums.tolist(),
            "mean_probs": self.mean_probs.tolist(),
            "reap_scores": self.reap_scores.tolist(),
            "output_max": self.output_max.tolist(),
            "output_max_where": self.output_max_where.tolist(),
            "shared_output_max": self.shared_output_max,
        }


# --------------------------------------------------------------------------------------------------
# Streaming accumulator of one layer (tensor math only; fed by the hooks)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The collector: a LayerPass wiring hooks to the accumulator
# --------------------------------------------------------------------------------------------------


def routing_call_args(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, top_k_index, top_k_weights) of an experts-module call, positional or keyword.

    Parameter names differ by family (GPT-OSS: ``router_indices, routing_weights``), so keyword calls
    are bound to the forward's signature and read by position.
    """
    if len(args) >= 3 and not kwargs:
        return args[0], args[1], args[2]
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    values = list(bound.arguments.values())
    if len(values) < 3:
        raise MoeCompressError(
            f"{type(module).__name__} was called without (hidden, top_k_index, top_k_weights); "
            "cannot read the routing for statistics"
        )
    return values[0], values[1], values[2]


class StatsCollector:
    """LayerPass collecting :class:`LayerStats` for every MoE layer; never changes the model.

    row_domains: domain index of each calibration row [n] (None without domains). Rows reach the layer
    in batches in order, so batch b holds rows ``offsets[b] : offsets[b] + B_b``.
    """

    def __init__(self, row_domains: torch.Tensor | None = None, num_domains: int = 0):
        self.row_domains = row_domains
        self.num_domains = num_domains
        self.layers: dict[int, LayerStats] = {}
        self._acc: LayerAccumulator | None = None
        self._batch = 0
        self._row_offsets: list[int] = []
        self._seq_lens: list[int] = []

    def attach(self, ctx: LayerContext) -> list:
        block = ctx.block
        if block is None:
            return []
        self._acc = LayerAccumulator(ctx.index, block.num_experts, block.top_k, self.num_domains)
        self._batch = 0
        sizes = [h.shape[0] for h in ctx.inputs]
        self._row_offsets = [sum(sizes[:b]) for b in range(len(sizes))]
        self._seq_lens = [h.shape[1] for h in ctx.inputs]
        handles = [
            block.router.module.register_forward_hook(self._router_hook(block)),
            block.experts.module.register_forward_pre_hook(self._experts_hook(block), with_kwargs=True),
        ]
        if block.shared is not None:
            handles.append(block.shared.register_forward_hook(lambda _m, _a, out: self._acc.add_shared_output(out)))
        return handles

    def process(self, ctx: LayerContext) -> bool:
        if ctx.block is None or self._acc is None:
            return False
        if self._batch != len(ctx.inputs):
            raise MoeCompressError(
                f"layer {ctx.index}: the experts module ran {self._batch} times for {len(ctx.inputs)} batches; "
                "statistics need exactly one experts call per layer forward"
            )
        self.layers[ctx.index] = self._acc.finish()
        self._acc = None
        return False

    # -- hooks ----------------------------------------------------------------------------------------

    def _router_hook(self, block: MoEBlockView):
        def hook(_module, _args, output):
            logits = output[0] if isinstance(output, (tuple, list)) else output
            self._acc.add_router(*block.stored_expert_scores(logits))              # [T, E] each

        return hook

    def _experts_hook(self, block: MoEBlockView):
        def pre_hook(module, args, kwargs):
            hidden, index, weights = routing_call_args(module, args, kwargs)
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])                 # [T, H]
            index = index.detach().reshape(hidden.shape[0], -1)                    # [T, k]
            weights = weights.detach().reshape(hidden.shape[0], -1)                # [T, k]
            b = self._batch
            self._batch += 1
            self._acc.add_routing(index, weights, self._token_domains(b, hidden.shape[0]))
            self._expert_outputs(block, b, hidden, index, weights)
            return None

        return pre_hook

    def _token_domains(self, b: int, num_tokens: int) -> torch.Tensor | None:
        """Domain index of each token of batch b [T] (tokens are rows x positions, row-major)."""
        if self.row_domains is None or b >= len(self._row_offsets):
            return None
        rows = self.row_domains[self._row_offsets[b] : self._row_offsets[b] + num_tokens // self._seq_lens[b]]
        return rows.repeat_interleave(self._seq_lens[b])

    def _expert_outputs(self, block: MoEBlockView, b: int, hidden, index, weights) -> None:
        """Run each expert on its routed tokens (grouped by a stable sort of the flat selections)."""
        num_tokens, k = index.shape
        flat_e = index.reshape(-1).long()                                          # [T*k]
        flat_w = weights.reshape(-1)                                               # [T*k]
        flat_t = torch.arange(num_tokens).repeat_interleave(k)                     # [T*k] token of each slot
        valid = (flat_e >= 0) & (flat_e < block.num_experts)
        flat_e, flat_w, flat_t = flat_e[valid], flat_w[valid], flat_t[valid]
        order = torch.argsort(flat_e, stable=True)
        per_expert = torch.bincount(flat_e, minlength=block.num_experts).tolist()
        seq_len = self._seq_lens[b] if b < len(self._seq_lens) else num_tokens
        offset = self._row_offsets[b] if b < len(self._row_offsets) else 0
        start = 0
        for e, n in enumerate(per_expert):
            if n == 0:
                continue
            slots = order[start : start + n]
            start += n
            tokens = flat_t[slots]                                                 # [Te]
            out = block.experts.forward_expert(e, hidden[tokens])                  # [Te, H]

            def where(i: int, tokens=tokens) -> tuple[int, int]:
                t = int(tokens[i])
                return offset + t // seq_len, t % seq_len

            self._acc.add_expert_output(e, flat_w[slots], out, where)


# --------------------------------------------------------------------------------------------------
# All layers: container, coverage, super experts, files
# --------------------------------------------------------------------------------------------------


@dataclass
class RouterStats:
    """Statistics of every MoE layer of a model over one calibration set.

    ``stats.layer(i).expert_counts`` etc. for decoder layer i (see :class:`LayerStats`).
    """

    model: str
    family: str
    num_layers: int  # decoder layers in the model (MoE or not)
    calibration: dict
    layers: dict[int, LayerStats]
    domain_names: list[str] | None = None
    super_experts: list[SuperExpert] = field(default_factory=list)
    super_expert_criterion: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)
    seconds: float | None = None  # collection wall time (not saved: the files stay deterministic)

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.layers)

    def layer(self, index: int) -> LayerStats:
        if index not in self.layers:
            raise MoeCompressError(f"layer {index} has no MoE statistics; MoE layers: {self.moe_layers}")
        return self.layers[index]

    @property
    def output_max(self) -> dict[int, torch.Tensor]:
        return {i: s.output_max for i, s in self.layers.items()}

    @property
    def shared_output_max(self) -> dict[int, float]:
        return {i: s.shared_output_max for i, s in self.layers.items() if s.shared_output_max is not None}

    @property
    def load_cv(self) -> float:
        """Mean over MoE layers of the per-layer expert-load coefficient of variation."""
        cvs = [s.load_cv for s in self.layers.values() if s.tokens > 0]
        return sum(cvs) / len(cvs) if cvs else 0.0

    def is_super_expert(self, layer: int, expert: int) -> bool:
        return any(s.layer == layer and s.expert == expert for s in self.super_experts)

    # -- derived results ------------------------------------------------------------------------------

    def find_super_experts(self, percentile: float = 99.5, ratio: float = 0.1) -> list[SuperExpert]:
        """Detect super experts from output_max (ALGORITHMS.md section 4) and remember the criterion."""
        cutoff = layer_cutoff(self.num_layers, SUPER_EXPERT_LAYER_FRACTION)
        pooled = {i: v for i, v in self.output_max.items() if i < cutoff}
        shared = {i: v for i, v in self.shared_output_max.items() if i < cutoff}
        self.super_expert_criterion = {
            "percentile": percentile,
            "ratio": ratio,
            "layer_fraction": SUPER_EXPERT_LAYER_FRACTION,
            "layer_cutoff": cutoff,
        }
        if not pooled:  # no MoE layer in the pooled range: nothing can qualify
            self.super_experts = []
            return self.super_experts
        args = dict(percentile=percentile, ratio=ratio, layer_fraction=SUPER_EXPERT_LAYER_FRACTION, shared_output_max=shared)
        limits = super_expert_thresholds(pooled, self.num_layers, **args)
        self.super_expert_criterion.update(percentile_value=limits.percentile_value, ratio_value=limits.ratio_value)
        self.super_experts = detect_super_experts(pooled, self.num_layers, **args)
        return self.super_experts

    def compute_coverage(self, threshold: float = 0.1) -> dict:
        """Experts selected fewer than ``threshold`` x their uniform share (tokens * k / E) per layer."""
        if threshold < 0:
            raise MoeCompressError(f"coverage threshold must be >= 0, got {threshold}")
        starved, per_layer = [], []
        for i in self.moe_layers:
            s = self.layers[i]
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
        self.coverage = {"threshold": threshold, "num_starved": len(starved), "starved": starved, "layers": per_layer}
        return self.coverage

    # -- files ----------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "version": STATS_VERSION,
            "model": self.model,
            "family": self.family,
            "num_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "calibration": self.calibration,
            "domains": self.domain_names,
            "load_cv": self.load_cv,
            "layers": [self.layers[i].summary() for i in self.moe_layers],
            "super_experts": [{"layer": s.layer, "expert": s.expert, "max_abs": s.max_abs} for s in self.super_experts],
            "super_expert_criterion": self.super_expert_criterion,
            "coverage": self.coverage,
        }

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``stats.safetensors`` and ``stats.json`` into ``folder`` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"layer{i}.{name}": t.contiguous() for i in self.moe_layers for name, t in self.layers[i].tensors().items()
        }
        save_file(tensors, str(folder / STATS_TENSORS), metadata={"format": f"moecompress-stats-v{STATS_VERSION}"})  # one key: safetensors writes a multi-key metadata map in random order
        (folder / STATS_JSON).write_text(json.dumps(self.to_json(), indent=1))
        return folder / STATS_JSON, folder / STATS_TENSORS

    @classmethod
    def load(cls, folder: str | Path) -> RouterStats:
        """Read a folder written by :meth:`save`; one-line MoeCompressError for anything missing or invalid."""
        folder = Path(folder)
        meta = _read_stats_json(folder)
        tensors = _read_stats_tensors(folder)
        layers = {}
        for entry in meta["layers"]:
            i = int(entry["layer"])
            layers[i] = _layer_from_tensors(i, entry, tensors, folder)
        stats = cls(
            model=meta.get("model", ""),
            family=meta.get("family", "unknown"),
            num_layers=int(meta.get("num_layers", max(layers, default=-1) + 1)),
            calibration=meta.get("calibration", {}),
            layers=layers,
            domain_names=meta.get("domains"),
            super_experts=[SuperExpert(int(s["layer"]), int(s["expert"]), float(s["max_abs"])) for s in meta.get("super_experts", [])],
            super_expert_criterion=meta.get("super_expert_criterion", {}),
            coverage=meta.get("coverage", {}),
        )
        return stats


def _read_stats_json(folder: Path) -> dict:
    path = folder / STATS_JSON
    if not path.is_file():
        raise MoeCompressError(f"{path} not found; run `moecompress stats MODEL --out {folder}` first")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoeCompressError(f"{path} is not valid JSON ({exc}); re-run `moecompress stats`") from None
    if not isinstance(meta, dict) or "version" not in meta:
        raise MoeCompressError(f"{path} is not a moecompress stats file (no version); re-run `moecompress stats`")
    if meta["version"] != STATS_VERSION:
        raise MoeCompressError(
            f"{path} has stats version {meta['version']}, this moecompress reads version {STATS_VERSION}; "
            "re-run `moecompress stats`"
        )
    if not isinstance(meta.get("layers"), list):
        raise MoeCompressError(f"{path} has no 'layers' list; re-run `moecompress stats`")
    return meta


def _read_stats_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / STATS_TENSORS
    if not path.is_file():
        raise MoeCompressError(f"{path} not found; re-run `moecompress stats` (stats.json alone is not enough)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MoeCompressError(f"cannot read {path}: {exc}; re-run `moecompress stats`") from None


def _layer_from_tensors(i: int, entry: dict, tensors: dict[str, torch.Tensor], folder: Path) -> LayerStats:
    def get(name: str, required: bool = True) -> torch.Tensor | None:
        key = f"layer{i}.{name}"
        if key not in tensors:
            if required:
                raise MoeCompressError(f"{folder / STATS_TENSORS} lacks {key}; the stats folder is incomplete, re-run")
            return None
        return tensors[key]

    counts = get("expert_counts")
    shared = get("shared_output_max", required=False)
    return LayerStats(
        layer=i,
        num_experts=int(counts.numel()),
        top_k=int(entry["top_k"]),
        tokens=int(entry["tokens"]),
        expert_counts=counts,
        weight_sums=get("weight_sums"),
        prob_sums=get("prob_sums"),
        coactivation=get("coactivation"),
        router_gram=get("router_gram"),
        reap_sum=get("reap_sum"),
        output_max=get("output_max"),
        output_max_where=get("output_max_where"),
        shared_output_max=None if shared is None else float(shared.reshape(-1)[0]),
        domain_counts=get("domain_counts", required=False),
    )


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _row_domains(calib: CalibrationSet) -> tuple[torch.Tensor | None, list[str] | None]:
    """Domain index of each calibration row [n] and the sorted domain names (None without domains)."""
    if not calib.domains:
        return None, None
    if len(calib.domains) != len(calib):
        raise MoeCompressError(f"calibration set has {len(calib)} rows but {len(calib.domains)} domain labels")
    names = sorted(set(calib.domains))
    lookup = {d: j for j, d in enumerate(names)}
    return torch.tensor([lookup[d] for d in calib.domains], dtype=torch.long), names


def collect_stats(
    model_folder: str | Path | LayerwiseModel,
    calib: CalibrationSet,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    super_expert_percentile: float = 99.5,
    super_expert_ratio: float = 0.1,
    coverage_threshold: float = 0.1,
) -> RouterStats:
    """Router/expert statistics of every MoE layer over ``calib.input_ids [n, Lq]``, layer by layer.

    Peak memory is about one decoder layer plus the calibration activations. ``progress(done, total)``
    is called after each decoder layer. Also detects super experts and expert coverage.
    """
    if batch_size < 1:
        raise MoeCompressError(f"batch size must be at least 1, got {batch_size}")
    input_ids = calib.input_ids
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise MoeCompressError(f"calibration input_ids must be a non-empty [n, seqlen] tensor, got shape {tuple(input_ids.shape)}")
    lm = model_folder if isinstance(model_folder, LayerwiseModel) else LayerwiseModel(model_folder)
    lm.require_dense("stats")
    vocab = getattr(lm.config, "vocab_size", None)
    if isinstance(vocab, int) and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
        raise MoeCompressError(
            f"calibration token ids span [{int(input_ids.min())}, {int(input_ids.max())}] but the model's vocabulary "
            f"has {vocab} entries; use the model's own tokenizer"
        )
    row_domains, domain_names = _row_domains(calib)
    collector = StatsCollector(row_domains, len(domain_names or []))
    start = time.perf_counter()
    run_layerwise(lm, input_ids, passes=[collector], batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    n, seqlen = input_ids.shape
    stats = RouterStats(
        model=str(lm.folder),
        family=lm.view.family,
        num_layers=lm.view.num_layers,
        calibration={
            "source": calib.source,
            "nsamples": int(n),
            "seqlen": int(seqlen),
            "tokens": int(n * seqlen),
            "batch_size": batch_size,
        },
        layers=collector.layers,
        domain_names=domain_names,
        seconds=seconds,
    )
    stats.find_super_experts(super_expert_percentile, super_expert_ratio)
    stats.compute_coverage(coverage_threshold)
    log.info("collected router statistics of %d MoE layers in %.1f s", len(stats.layers), seconds)
    return stats


# --------------------------------------------------------------------------------------------------
# Report: markdown + figures
# --------------------------------------------------------------------------------------------------


def default_report_layer(stats: RouterStats) -> int:
    """The MoE layer whose least-used expert is furthest below its uniform share (first on ties)."""
    return min(stats.moe_layers, key=lambda i: (float(stats.layers[i].load_ratio.min()), i))


def write_stats_report(stats: RouterStats, folder: str | Path, layer: int | None = None) -> Path:
    """Write ``report.md`` and its PNG figures into ``folder``; ``layer`` picks the per-layer figures."""
    from moecompress import report

    folder = Path(folder)
    layer = default_report_layer(stats) if layer is None else layer
    chosen = stats.layer(layer)
    path = folder / "report.md"
    layers = stats.moe_layers
    ylabels = [str(i) for i in layers]

    def img(file: Path, alt: str) -> str:
        return report.image_markdown(file, path, alt)

    # Expert load, layer x expert, as a multiple of the uniform share (1 = even routing).
    width = max(stats.layers[i].num_experts for i in layers)
    load = torch.full((len(layers), width), float("nan"), dtype=torch.float64)
    for r, i in enumerate(layers):
        load[r, : stats.layers[i].num_experts] = stats.layers[i].load_ratio
    load_png = report.heatmap(
        load, folder / "expert_load.png", "Expert load (selections / uniform share)", "expert", "layer",
        yticklabels=ylabels, colorbar_label="x uniform share",
    )
    coact_png = report.heatmap(
        chosen.coactivation, folder / f"coactivation_layer{layer}.png", f"Co-activation, layer {layer}",
        "expert", "expert", colorbar_label="tokens",
    )
    # Super-expert magnitudes: output_max per layer x expert (+ a 'shared' column), log colour scale.
    has_shared = bool(stats.shared_output_max)
    mags = torch.zeros(len(layers), width + int(has_shared), dtype=torch.float64)
    for r, i in enumerate(layers):
        mags[r, : stats.layers[i].num_experts] = stats.layers[i].output_max
        if has_shared and stats.layers[i].shared_output_max is not None:
            mags[r, width] = stats.layers[i].shared_output_max
    xlabels = [str(e) for e in range(width)] + (["shared"] if has_shared else [])
    super_png = report.heatmap(
        mags, folder / "super_experts.png", "Max |expert output| (log scale)", "expert", "layer",
        xticklabels=xlabels, yticklabels=ylabels, log=True, cmap="magma", colorbar_label="max |down_proj output|",
    )
    threshold = float(stats.coverage.get("threshold", 0.1))
    starved_here = [s["expert"] for s in stats.coverage.get("starved", []) if s["layer"] == layer]
    coverage_png = report.bar(
        chosen.load_ratio, folder / f"coverage_layer{layer}.png", f"Expert coverage, layer {layer}", "expert",
        "selections / uniform share", threshold=threshold, threshold_label=f"starved below {threshold:g}",
        highlight=starved_here,
    )

    sections = [("Summary", _summary_markdown(stats))]
    sections.append(("Expert load", img(load_png, "expert load") + "\n\n" + _load_table(stats)))
    sections.append(("Coverage", _coverage_markdown(stats, layer) + "\n\n" + img(coverage_png, "coverage")))
    sections.append(("Super experts", _super_markdown(stats) + "\n\n" + img(super_png, "super experts")))
    sections.append(
        (f"Co-activation (layer {layer})", "Tokens whose top-k holds both experts; the diagonal is each expert's "
         "count.\n\n" + img(coact_png, "co-activation"))
    )
    if chosen.domain_counts is not None and stats.domain_names:
        share = chosen.domain_counts.double() / chosen.domain_counts.sum(1, keepdim=True).clamp_min(1)
        dom_png = report.heatmap(
            share, folder / f"domains_layer{layer}.png", f"Expert share per domain, layer {layer}", "expert", "domain",
            yticklabels=stats.domain_names, colorbar_label="share of the domain's selections",
        )
        sections.append((f"Domains (layer {layer})", img(dom_png, "domains")))
    return report.write_markdown(path, sections, title=f"Router statistics: {stats.model}")


def _summary_markdown(stats: RouterStats) -> str:
    from moecompress.report import markdown_table

    cal = stats.calibration
    rows = [
        ("model", f"{stats.model} ({stats.family})"),
        ("MoE layers", f"{len(stats.moe_layers)} of {stats.num_layers}"),
        ("calibration", cal.get("source", "?")),
        ("samples x seqlen", f"{cal.get('nsamples', '?')} x {cal.get('seqlen', '?')} = {cal.get('tokens', '?')} tokens"),
        ("domains", ", ".join(stats.domain_names) if stats.domain_names else "none"),
        ("expert-load CV (mean over layers)", f"{stats.load_cv:.4f}"),
        ("super experts", str(len(stats.super_experts))),
        ("starved experts", str(stats.coverage.get("num_starved", 0))),
    ]
    return markdown_table(["", ""], rows)


def _load_table(stats: RouterStats) -> str:
    from moecompress.report import markdown_table

    rows = []
    for i in stats.moe_layers:
        s = stats.layers[i]
        ratio = s.load_ratio
        top = int(s.expert_counts.argmax())
        rows.append((i, s.tokens, s.load_cv, float(ratio.min()), float(ratio.max()), top, float(s.reap_scores.max())))
    return markdown_table(["layer", "tokens", "load CV", "min load", "max load", "busiest expert", "max REAP"], rows)


def _coverage_markdown(stats: RouterStats, layer: int) -> str:
    from moecompress.report import markdown_table

    cov = stats.coverage
    head = (
        f"An expert is starved when it is selected fewer than {cov.get('threshold', 0.1):g} x its uniform share "
        "(tokens x k / E) times: its calibration statistics rest on few tokens."
    )
    starved = cov.get("starved", [])
    if not starved:
        return head + "\n\nNo starved expert."
    rows = [(s["layer"], s["expert"], s["count"], s["count"] / s["uniform_share"] if s["uniform_share"] else 0.0) for s in starved]
    return (
        head + f"\n\n**{len(starved)} starved experts:**\n\n"
        + markdown_table(["layer", "expert", "selections", "x uniform share"], rows)
        + f"\n\nBar chart: layer {layer}."
    )


def _super_markdown(stats: RouterStats) -> str:
    from moecompress.report import markdown_table

    crit = stats.super_expert_criterion
    text = (
        f"Max |down_proj output| per expert; super iff above P{crit.get('percentile', 99.5):g} of the pooled values "
        f"of layers < {crit.get('layer_cutoff', '?')} and above {crit.get('ratio', 0.1):g} x their maximum"
    )
    if "percentile_value" in crit:
        text += f" (thresholds {crit['percentile_value']:.4g} and {crit['ratio_value']:.4g})"
    text += ". Expert -1 is a shared expert."
    if not stats.super_experts:
        return text + "\n\nNo super expert found."
    rows = []
    for s in stats.super_experts:
        where = ""
        if s.expert >= 0:
            row, pos, ch = stats.layers[s.layer].output_max_where[s.expert].tolist()
            where = f"row {row}, position {pos}, channel {ch}"
        rows.append((s.layer, s.expert, s.max_abs, where))
    return text + "\n\n" + markdown_table(["layer", "expert", "max abs", "where"], rows)
