"""The statistics collector: one pass of the layer-by-layer driver that records router and expert
statistics of every MoE layer (:func:`collect_stats`).

:func:`collect_stats` runs :class:`StatsCollector` through
:func:`moecompress.model.driver.run_layerwise`, then finds super experts and coverage
(:mod:`moecompress.calibration.stats_analysis`); the result is a
:class:`~moecompress.calibration.stats_types.RouterStats` (what each statistic means is listed there).

Hooks: the router module's forward output ``(logits [T, E], weights, index)`` gives the logit
statistics; a forward pre-hook on the experts module sees ``(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])`` - exactly the routing the model applies - and re-runs each expert on its
routed tokens with :meth:`ExpertsView.forward_expert` to get f_e(t). Only one layer is materialised at
a time; the statistics themselves are O(E^2) per layer. The sums live in
:class:`~moecompress.calibration.stats_accumulator.LayerAccumulator`.

:func:`routing_call_args` (read the routing of an experts-module call) is shared with the passes that
hook the experts module the same way.

Shape legend: T tokens of a batch, E experts, H hidden size, k top-k, D domains, n calibration rows,
Lq positions per row, Te tokens routed to expert e.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from moecompress.calibration.stats_accumulator import LayerAccumulator
from moecompress.calibration.stats_analysis import compute_coverage, find_super_experts
from moecompress.calibration.stats_types import LayerStats, RouterStats
from moecompress.calibration.types import CalibrationSet
from moecompress.errors import MoeCompressError
from moecompress.model.driver import LayerContext, run_layerwise
from moecompress.model.loading import LayerwiseModel
from moecompress.model.view import MoEBlockView

log = logging.getLogger(__name__)


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
    also: list = (),
) -> RouterStats:
    """Router/expert statistics of every MoE layer over ``calib.input_ids [n, Lq]``, layer by layer.

    Peak memory is about one decoder layer plus the calibration activations. ``progress(done, total)``
    is called after each decoder layer. Also detects super experts and expert coverage. ``also``:
    other observing passes (that change no weight) sharing the sweep's layer forwards, e.g. the
    mixed-precision profile of a pipeline's later quantize pass.
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
    run_layerwise(lm, input_ids, passes=[collector, *also], batch_size=batch_size, progress=progress)
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
    find_super_experts(stats, super_expert_percentile, super_expert_ratio)
    compute_coverage(stats, coverage_threshold)
    log.info("collected router statistics of %d MoE layers in %.1f s", len(stats.layers), seconds)
    return stats
