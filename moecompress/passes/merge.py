"""Expert merging pass: M-SMoE over one MoE layer's view and its statistics.

Per MoE layer (``MergePass.process``):

1. group counts: the same ``N`` in every layer (``per_layer``), or MC-SMoE's global frequency
   threshold chosen so the layers hold about ``N`` groups on average
   (:func:`~moecompress.algorithms.merging.global_group_counts`, computed once for the model);
2. grouping (:func:`~moecompress.algorithms.merging.group_experts`): the most frequently selected
   experts dominate (``dominance="reap"``, our option: the highest REAP saliency instead), every other expert joins the dominant one whose router-logit column is most
   cosine-similar over the calibration tokens; super experts stay singleton groups. Our option
   ``grouping="output"``: a member joins the dominant expert whose OUTPUT is closest to its own on
   the calibration tokens routed to it (:func:`output_similarity`; relative squared error) — with
   an exact router the group's expert is what serves those tokens (``grouping="auto"`` picks this
   for the exact routers and router similarity for the standard one);
3. merging (:func:`~moecompress.algorithms.merging.merge_experts`): every member's neurons aligned to
   the dominant expert (Hungarian weight matching), then a frequency-weighted average (gate/up
   biases travel with their neuron, see :mod:`moecompress.passes.prune`; ``down_proj_bias`` is
   averaged with the same weights, or solved with the down weights under RegMean). Our option ``merge_weights="regmean"`` replaces the average by
   RegMean (:func:`~moecompress.algorithms.merging.regmean_combine`): gate/up are solved from each
   member's routed calibration inputs, down from each member's intermediate activations, so the
   merged expert keeps every member's map on the inputs that member receives (the frequency average
   is the special case of members with identically distributed inputs). Needs the calibration set
   to flow through the rewrite sweep, like the refit;
4. router:

   * ``standard`` — an ordinary E'-expert checkpoint: slot g holds group g's merged expert and the
     router row built by :func:`~moecompress.algorithms.merging.merged_router_rows` (``router_mode``:
     ``dominant``, ``weighted`` or ``logsumexp_approx``; the latter needs a router bias). Group-limited
     routing (``n_group``) groups experts within each routing group, the same number per group.
     An approximation: routing between merged experts changes.
   * ``exact`` — the paper's own form, in the native format: all E router rows stay, the experts
     module stores the E' merged experts, and the expert -> group map
     (:func:`~moecompress.algorithms.merging.expert_to_group`, installed by
     :mod:`moecompress.model.expert_groups`) sends every routed expert id to its group. Two selected
     experts of one group contribute ``(w_a + w_b) * merged(x)``. The checkpoint is smaller (E'
     experts); loading it needs ``import moecompress`` (the map lives in ``quantization_config``).
   * ``exact-slots`` — the same routing in a plain checkpoint any runtime loads: E expert slots stay
     and every member's slot holds a copy of its group's merged expert. Same outputs as ``exact``,
     but the file and memory are NOT smaller.

Shape legend: E experts, E' groups, I intermediate size, H hidden size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from dataclasses import dataclass, field

import torch

from moecompress.algorithms.merging import (
    ROUTER_MODES,
    PairSimilarity,
    expert_to_group,
    fit_group_router_rows,
    global_group_counts,
    group_experts,
    merge_experts,
    merged_router_rows,
    regmean_dtype,
)
from moecompress.calibration.collect import routing_call_args
from moecompress.calibration.stats_types import LayerStats, RouterStats
from moecompress.errors import MoeCompressError
from moecompress.export.standard import resize_experts, router_with_rows, routing_groups, set_router_rows
from moecompress.model.driver import LayerContext
from moecompress.model.expert_groups import install_expert_groups, keep_expert_rows
from moecompress.model.view import MoEBlockView
from moecompress.passes.prune import ExpertStack, layer_scores, protected_experts, read_experts, write_expert
from moecompress.validation import check_int

log = logging.getLogger(__name__)

METHODS = ("msmoe",)
ROUTERS = ("standard", "exact", "exact-slots")
EXACT_ROUTERS = ("exact", "exact-slots")
# Which experts dominate a group: M-SMoE's usage frequency, or REAP saliency (our option: the score
# that prunes best on the testbed). Merge weights are usage frequencies either way.
DOMINANCE = ("frequency", "reap")
# "fitted": rows fitted on calibration router inputs to the exact per-group routing mass
# (fit_group_router_rows); needs the calibration set to flow through the rewrite sweep.
STANDARD_ROUTER_MODES = ROUTER_MODES + ("fitted",)
# How the aligned members are averaged: M-SMoE's usage frequencies, or RegMean on calibration inputs.
MERGE_WEIGHTS = ("frequency", "regmean")
# Which dominant a member joins: M-SMoE's router-logit similarity, or the closest output on its tokens;
# "auto": output for the exact routers (the member's tokens ARE served by its group's expert), router
# for the standard router (its tokens are re-routed by the router, which router similarity predicts).
GROUPINGS = ("router", "output", "auto")
# Calibration tokens per member for the output similarity (the first ones routed to it): bounds the
# cost at members x dominants x this many expert evaluations per layer.
OUTPUT_SIMILARITY_TOKENS = 1024
FITTED_SCORINGS = ("softmax", "topk_softmax")
# Measured on the testbed at 8 of 16 experts (reports/experts.md, benchmarks/experts_quality.py):
# geometric-mean held-out perplexity 38.81 with the dominant member's row vs 39.27 with the
# frequency-weighted mean row (original 33.97); logsumexp_approx needs a router bias the testbed lacks.
DEFAULT_ROUTER_MODE = "dominant"


@dataclass(frozen=True)
class MergeConfig:
    """``num_experts``: groups per layer (``per_layer``) or their average over layers (global threshold).

    ``per_layer=None`` resolves to True for the standard router (a standard config has one expert
    count for every layer) and False (MC-SMoE's global threshold) for the exact router.
    """

    num_experts: int
    method: str = "msmoe"
    router: str = "standard"
    router_mode: str = DEFAULT_ROUTER_MODE
    per_layer: bool | None = None
    protect_super_experts: bool = True
    dominance: str = "frequency"
    merge_weights: str = "frequency"
    grouping: str = "router"

    @property
    def needs_activations(self) -> bool:
        """True when merging itself needs calibration activations (fitted router rows, RegMean, output grouping)."""
        return (self.router == "standard" and self.router_mode == "fitted") or self.records_expert_calls

    @property
    def grouping_used(self) -> str:
        """``router`` or ``output`` (``auto`` resolved by the router kind)."""
        if self.grouping != "auto":
            return self.grouping
        return "output" if self.router in EXACT_ROUTERS else "router"

    @property
    def records_expert_calls(self) -> bool:
        return self.merge_weights == "regmean" or self.grouping_used == "output"

    @property
    def uses_per_layer(self) -> bool:
        return self.router == "standard" if self.per_layer is None else bool(self.per_layer)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise MoeCompressError(f"unknown merging method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.router not in ROUTERS:
            raise MoeCompressError(f"unknown --router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.router_mode not in STANDARD_ROUTER_MODES:
            raise MoeCompressError(f"unknown --router-mode {self.router_mode!r}; choose one of {', '.join(STANDARD_ROUTER_MODES)}")
        if self.dominance not in DOMINANCE:
            raise MoeCompressError(f"unknown --dominance {self.dominance!r}; choose one of {', '.join(DOMINANCE)}")
        if self.merge_weights not in MERGE_WEIGHTS:
            raise MoeCompressError(f"unknown --merge-weights {self.merge_weights!r}; choose one of {', '.join(MERGE_WEIGHTS)}")
        if self.grouping not in GROUPINGS:
            raise MoeCompressError(f"unknown --grouping {self.grouping!r}; choose one of {', '.join(GROUPINGS)}")
        check_int("--num-experts", self.num_experts, 1, expected="at least 1 (an integer: merged experts per layer)")
        if self.router == "standard" and not self.uses_per_layer:
            raise MoeCompressError(
                "a standard checkpoint holds the same expert count in every layer; use --per-layer "
                "or --router exact / exact-slots for MC-SMoE's global threshold"
            )


def layer_group_counts(cfg: MergeConfig, stats: RouterStats, protected: Mapping[int, Sequence[int]]) -> dict[int, int]:
    """Groups per MoE layer: ``N`` everywhere, or from the global frequency threshold for ``N x L``
    groups in total. A layer never gets fewer groups than its super experts + 1 (raised if needed)."""
    layers = stats.moe_layers
    if cfg.uses_per_layer:
        counts = {i: cfg.num_experts for i in layers}
    else:
        freqs = [stats.layers[i].expert_counts for i in layers]
        total = cfg.num_experts * len(layers)
        counts = dict(zip(layers, global_group_counts(freqs, total_groups=total)))
    for i in layers:
        num = stats.layers[i].num_experts
        need = min(num, len(protected.get(i, [])) + (1 if len(protected.get(i, [])) < num else 0))
        if counts[i] < need:
            log.info("layer %d: raising %d groups to %d (super experts stay singletons)", i, counts[i], need)
            counts[i] = need
    return counts


def group_in_routing_groups(
    freq: torch.Tensor, sim: torch.Tensor, num_groups: int, protected: Sequence[int], n_group: int = 1,
    similarity: PairSimilarity | None = None,
) -> list[list[int]]:
    """:func:`group_experts` within each of ``n_group`` contiguous routing groups (``num_groups /
    n_group`` each), so a merged expert never mixes routing groups. Groups in routing-group order.
    ``similarity`` (expert ids of the whole layer) replaces the router similarity when given."""
    num = freq.shape[0]
    if n_group <= 1:
        return group_experts(freq, sim, num_groups, protected, similarity)
    if num % n_group or num_groups % n_group:
        raise MoeCompressError(f"{num_groups} groups of {num} experts do not split into {n_group} routing groups")
    size, per = num // n_group, num_groups // n_group
    out: list[list[int]] = []
    for g in range(n_group):
        lo = g * size
        mine = [e - lo for e in protected if lo <= e < lo + size]
        sub = group_experts(freq[lo : lo + size], sim[lo : lo + size, lo : lo + size], per, mine,
                            _offset(similarity, lo) if similarity is not None else None)
        out += [[lo + e for e in members] for members in sub]
    return out


def _offset(similarity: PairSimilarity, lo: int) -> PairSimilarity:
    """A routing group's view of a whole-layer similarity: local ids ``e`` are layer ids ``lo + e``."""
    return lambda members, dominants: similarity([lo + e for e in members], [lo + e for e in dominants])


def mean_group_similarity(groups: Sequence[Sequence[int]], sim: torch.Tensor) -> float | None:
    """Mean router-logit cosine between each non-dominant member and its dominant expert (None: all singletons)."""
    values = [float(sim[members[0], e]) for members in groups for e in members[1:]]
    return sum(values) / len(values) if values else None


@torch.no_grad()
def merge_block(
    block: MoEBlockView,
    groups: Sequence[Sequence[int]],
    freq: torch.Tensor,
    router: str = "standard",
    router_mode: str = DEFAULT_ROUTER_MODE,
    router_inputs: torch.Tensor | None = None,
    expert_calls: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[float, float] | None:
    """Merge ``block``'s experts by ``groups`` (first member dominant), ``freq [E]`` weighting members.

    ``standard``: the block gets E' = len(groups) experts and router rows; ``exact``: E' experts behind
    an expert -> group map (router untouched); ``exact-slots``: E slots stay and every member's slot
    holds its group's merged expert (router untouched). ``router_mode="fitted"``
    fits the rows on ``router_inputs [T, H]`` starting from the dominant rows and returns the KL
    (nats/token) from the exact group routing before/after the fit; otherwise returns None.
    ``expert_calls``: the calibration batches' ``(hidden [T, H], top_k_index [T, k])`` as the experts
    module received them before merging; given, members are merged by RegMean
    (:func:`~moecompress.algorithms.merging.merge_experts`) over the tokens each member served that
    still reach its group's expert after merging: all of them with an exact router, those the new
    router rows send to the group's slot with the standard router.
    """
    num = block.num_experts
    expert_to_group(groups, num)  # validates the partition
    if router == "standard" and router_mode == "logsumexp_approx" and block.router.bias is None:
        raise MoeCompressError(
            f"--router-mode logsumexp_approx needs a router bias, which {type(block.router.module).__name__} has not; "
            "use dominant or weighted"
        )
    rows = bias = fit = None
    if router == "standard":
        rows, bias, fit = standard_router_rows(block, groups, freq, router_mode, router_inputs)
    grams = None if expert_calls is None else regmean_statistics(block, groups, rows, bias, expert_calls)
    stack = read_experts(block.experts)
    gate, up, down, down_bias = merge_experts(stack.gate, stack.up, stack.down, groups, freq, grams, stack.down_bias)
    merged = ExpertStack(gate, up, down, down_bias, stack.hidden)
    if router == "exact-slots":
        for g, members in enumerate(groups):
            for e in members:
                write_expert(block.experts, e, merged, g)
        return None
    if router == "exact":
        keep_expert_rows(block.experts.module, [members[0] for members in groups])
        for g in range(len(groups)):
            write_expert(block.experts, g, merged, g)
        install_expert_groups(block.experts.module, expert_to_group(groups, num).tolist())
        return None
    resize_experts(block, [members[0] for members in groups])
    for g in range(len(groups)):
        write_expert(block.experts, g, merged, g)
    set_router_rows(block, rows, bias)
    return fit


def tokens_routed_to(e: int, calls: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     reach: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The recorded hidden states ``[T_e, H]`` whose original top-k held expert ``e`` (and, with
    ``reach`` — per batch ``[T]`` bool — that still reach e's merged slot), in calibration order."""
    rows = []
    for b, (hidden, index) in enumerate(calls):
        mask = (index == e).any(dim=-1)
        rows.append(hidden[mask if reach is None else mask & reach[b]])
    return torch.cat(rows)


@torch.no_grad()
def output_similarity(block: MoEBlockView, calls: Sequence[tuple[torch.Tensor, torch.Tensor]], members: Sequence[int],
                      dominants: Sequence[int], router_sim: torch.Tensor, max_tokens: int = OUTPUT_SIMILARITY_TOKENS) -> torch.Tensor:
    """``[len(members), len(dominants)]``: minus the relative squared error ``||f_d(x) - f_m(x)||^2 /
    ||f_m(x)||^2`` over (up to ``max_tokens`` of) the calibration tokens routed to member m — how well
    dominant d's output stands in for m's on the tokens m actually serves. A member no token reached
    keeps its router-similarity row (M-SMoE's criterion)."""
    experts = block.experts
    dtype = experts.get(members[0], "up").dtype
    out = torch.empty(len(members), len(dominants), dtype=torch.float64)
    for i, m in enumerate(members):
        x = tokens_routed_to(m, calls)[:max_tokens].to(dtype)
        if x.shape[0] == 0:
            out[i] = router_sim[m, list(dominants)].to(torch.float64)
            continue
        target = experts.forward_expert(m, x).double()
        scale = target.pow(2).sum().clamp_min(torch.finfo(torch.float64).tiny)
        for j, d in enumerate(dominants):
            out[i, j] = -(experts.forward_expert(d, x).double() - target).pow(2).sum() / scale
    return out


def standard_router_rows(block: MoEBlockView, groups, freq, router_mode: str, router_inputs: torch.Tensor | None):
    """(rows [E', H], bias [E'] or None, fit KL before/after or None) of a standard-router merge."""
    if router_mode == "fitted":
        check_fittable_router(block)
        if router_inputs is None or router_inputs.numel() == 0:
            raise MoeCompressError("--router-mode fitted needs calibration router inputs; none were recorded")
        rows, _ = merged_router_rows(block.router.weight.detach(), groups, freq, "dominant")
        rows, kl_before, kl_after = fit_group_router_rows(router_inputs, block.router.weight.detach(), groups, rows)
        return rows, None, (kl_before, kl_after)
    rows, bias = merged_router_rows(block.router.weight.detach(), groups, freq, router_mode, router_bias=block.router.bias)
    return rows, bias, None


def regmean_statistics(block: MoEBlockView, groups, rows: torch.Tensor | None, bias: torch.Tensor | None,
                       calls: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """``members -> (input Grams, activation Grams)`` for RegMean merging of ``groups``: over every
    token a member served (exact routers, ``rows`` None), or, for a standard router with ``rows``,
    over those the new rows still send to the member's merged slot."""
    reached = None if rows is None else reached_slots(block, groups, rows, bias, calls)
    group_of = {members[0]: g for g, members in enumerate(groups)}

    def grams(members: Sequence[int]):
        g = group_of[members[0]]
        reach = None if reached is None else [(index == g).any(dim=-1) for index in reached]
        return member_grams(block, calls, members, reach)

    return grams


@torch.no_grad()
def reached_slots(block: MoEBlockView, groups, rows: torch.Tensor, bias: torch.Tensor | None,
                  calls: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per calibration batch, the merged slots ``[T, k]`` (ids in ``[0, E')``) that the standard
    router with ``rows`` will select: a copy of the family's router resized like the merge will
    resize it, so every routing rule (softmax, sigmoid + groups, sparsemixer) is the family's own."""
    router = router_with_rows(block, [members[0] for members in groups], rows, bias)
    dtype = block.router.weight.dtype
    return [router(hidden.to(dtype))[2].reshape(hidden.shape[0], -1) for hidden, _ in calls]


@torch.no_grad()
def member_grams(block: MoEBlockView, calls: Sequence[tuple[torch.Tensor, torch.Tensor]], members: Sequence[int],
                 reach: Sequence[torch.Tensor] | None = None):
    """RegMean's statistics of one group: per member e, over the calibration tokens routed to e
    (top-k membership, original routing) — and, with ``reach`` (per batch ``[T]`` bool), only those
    that still reach the group's merged expert — the input Gram ``[H', H']`` and the Gram of e's own
    intermediate activations ``[I', I']`` (the input of its down projection). With biased experts
    both inputs get a ones column (``H' = H + 1``, ``I' = I + 1``): gate/up biases are folded in as
    a last input column (:class:`~moecompress.passes.prune.ExpertStack`) and the down bias is solved
    together with the down weights. Read from the block's current, unmerged weights; lists of m."""
    experts = block.experts
    dtype = experts.get(members[0], "up").dtype
    input_grams, activation_grams = [], []
    for e in members:
        x = tokens_routed_to(e, calls, reach).float()  # [T_e, H]
        a = experts.intermediate(e, x.to(dtype)).float()  # [T_e, I]
        if experts.has_bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        x, a = x.to(regmean_dtype(x.shape[1])), a.to(regmean_dtype(a.shape[1]))  # float32 for large models' Grams
        input_grams.append(x.T @ x)
        activation_grams.append(a.T @ a)
        del x, a
    return input_grams, activation_grams


def check_fittable_router(block: MoEBlockView) -> None:
    """Fitted rows model a bias-free softmax router; refuse others with one line."""
    router = block.router
    if router.scoring not in FITTED_SCORINGS or router.bias is not None or router.e_score_correction_bias is not None:
        raise MoeCompressError(
            f"--router-mode fitted needs a bias-free softmax router; {type(router.module).__name__} is not one "
            "(use dominant or weighted)"
        )


@dataclass
class LayerMergeReport:
    layer: int
    num_experts: int
    groups: list[list[int]]
    frequency: list[float]
    protected: list[int]
    mean_similarity: float | None
    router_fit: tuple[float, float] | None = None  # KL (nats/token) from exact group routing, before/after


@dataclass
class MergeReport:
    layers: list[LayerMergeReport] = field(default_factory=list)

    def groups_map(self) -> dict[int, list[list[int]]]:
        return {r.layer: r.groups for r in self.layers}


class MergePass:
    """LayerPass: M-SMoE merging of every MoE layer with per-layer statistics (see the module doc)."""

    def __init__(
        self,
        cfg: MergeConfig,
        layer_stats: Mapping[int, LayerStats],
        group_counts: Mapping[int, int],
        protected: Mapping[int, Sequence[int]] | None = None,
        n_group: int = 1,
    ):
        cfg.validate()
        self.cfg = cfg
        self.layer_stats = layer_stats
        self.group_counts = dict(group_counts)
        self.protected = protected or {}
        self.n_group = n_group if cfg.router == "standard" else 1  # exact routers keep every routing group intact
        self.report = MergeReport()
        self._router_inputs: list[torch.Tensor] = []
        self._expert_calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (hidden [T, H], top_k_index [T, k])

    @classmethod
    def from_stats(cls, cfg: MergeConfig, stats: RouterStats, config) -> "MergePass":
        cfg.validate()
        protected = {i: protected_experts(stats, i) for i in stats.moe_layers} if cfg.protect_super_experts else {}
        counts = layer_group_counts(cfg, stats, protected)
        return cls(cfg, stats.layers, counts, protected, routing_groups(config)[0])

    def attach(self, ctx: LayerContext) -> list:
        self._router_inputs = []
        self._expert_calls = []
        if ctx.block is None or not self.cfg.needs_activations:
            return []
        hidden_size = ctx.block.router.weight.shape[1]

        def record(_module, args, kwargs):
            hidden = args[0] if args else next(iter(kwargs.values()))
            self._router_inputs.append(hidden.detach().reshape(-1, hidden_size).float())

        def record_experts(module, args, kwargs):
            hidden, index, _ = routing_call_args(module, args, kwargs)
            self._expert_calls.append((hidden.detach().reshape(-1, hidden_size), index.detach().reshape(-1, index.shape[-1])))

        handles = []
        if self.cfg.router == "standard" and self.cfg.router_mode == "fitted":
            handles.append(ctx.block.router.module.register_forward_pre_hook(record, with_kwargs=True))
        if self.cfg.records_expert_calls:
            handles.append(ctx.block.experts.module.register_forward_pre_hook(record_experts, with_kwargs=True))
        return handles

    def observation_end(self, ctx: LayerContext):
        """Without activations to record, the statistics are all it reads: no observation forward."""
        return None if self.cfg.needs_activations else ctx.layer

    def groups_of(self, layer: int) -> list[list[int]] | None:
        """The groups this pass formed in ``layer`` (first member dominant), None before it ran there."""
        return next((r.groups for r in self.report.layers if r.layer == layer), None)

    def process(self, ctx: LayerContext) -> bool:
        block = ctx.block
        if block is None:
            return False
        if ctx.index not in self.layer_stats or ctx.index not in self.group_counts:
            raise MoeCompressError(f"no statistics for MoE layer {ctx.index}; collect statistics on this model")
        stats = self.layer_stats[ctx.index]
        if stats.num_experts != block.num_experts:
            raise MoeCompressError(
                f"layer {ctx.index}: statistics describe {stats.num_experts} experts, the model has {block.num_experts}; "
                "collect statistics on this model"
            )
        freq = stats.frequency.to(torch.float32)
        sim = stats.router_similarity
        protected = list(self.protected.get(ctx.index, []))
        dominance = freq if self.cfg.dominance == "frequency" else layer_scores("reap", stats).to(torch.float32)
        calls = None
        if self.cfg.records_expert_calls:
            if not self._expert_calls:
                raise MoeCompressError("--merge-weights regmean and --grouping output need calibration activations; none were recorded")
            calls, self._expert_calls = self._expert_calls, []
        similarity = None
        if self.cfg.grouping_used == "output":
            similarity = partial(output_similarity, block, calls, router_sim=sim)
        groups = group_in_routing_groups(dominance, sim, self.group_counts[ctx.index], protected, self.n_group, similarity)
        inputs = torch.cat(self._router_inputs) if self._router_inputs else None
        self._router_inputs = []
        fit = merge_block(block, groups, freq, self.cfg.router, self.cfg.router_mode, inputs,
                          calls if self.cfg.merge_weights == "regmean" else None)
        self.report.layers.append(
            LayerMergeReport(ctx.index, stats.num_experts, groups, freq.tolist(), protected,
                             mean_group_similarity(groups, sim), fit)
        )
        log.info("layer %d: %d experts -> %d groups", ctx.index, stats.num_experts, len(groups))
        return True
