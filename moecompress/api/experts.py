"""The jobs behind ``moecompress prune`` and ``moecompress merge``: statistics, one sweep, a standard checkpoint.

Order of work (everything that can be refused is refused before calibration starts):

1. the request is checked against the model's config (expert count vs top-k, routing groups);
2. statistics: read from ``--stats DIR`` (written by ``moecompress stats``) or collected in a first
   layer-by-layer sweep over the calibration set on the ORIGINAL model. A separate first sweep, not
   statistics gathered sequentially while pruning, because two decisions need every layer at once:
   super-expert detection pools ``output_max`` over the first 3/4 of the layers, and M-SMoE's global
   threshold compares frequencies across layers. It also makes ``--stats DIR`` and on-the-fly
   calibration give the same output for the same calibration set;
3. the rewrite sweep: the driver materialises one decoder layer at a time, the pass rebuilds its MoE
   block with fewer experts (the layer is re-run, so a wrong shape fails here, not at load time),
   and the :class:`~moecompress.export.writer.CheckpointWriter` writes it under the family's original
   per-expert names; then the outer weights, the config with the new expert count, the tokenizer,
   ``kept_experts.json`` and ``report.md``, all in a staging folder renamed into place at the end.

Without ``refit`` the rewrite sweep needs no calibration data (the statistics hold everything), so
it is driven by a single 8-token dummy batch. With ``refit`` (:mod:`moecompress.passes.refit`) the
calibration set (``StatsSource``'s calib / nsamples / seqlen / seed, also when statistics come from
``--stats``) flows through the rewrite sweep: each rebuilt layer's down projections are re-solved
against the original layer's routed output on the tokens it sees, which come from the already
rebuilt layers before it (sequential, as GPTQ).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import moecompress
from moecompress.calibration.collect import collect_stats
from moecompress.calibration.stats_types import RouterStats
from moecompress.errors import MoeCompressError
from moecompress.export.standard import (
    check_expert_count,
    config_expert_count,
    kept_experts_record,
    with_expert_count,
    write_kept_experts,
)
from moecompress.api.calibration import CalibrationSpec, dummy_batch, load_for_model, require_tokenizer
from moecompress.api.job import JobResult, require_int
from moecompress.evaluate import folder_bytes
from moecompress.export.writer import CheckpointWriter, outer_state
from moecompress.model.driver import LayerContext, run_layerwise
from moecompress.model.loading import LayerwiseModel
from moecompress.algorithms.merging import expert_to_group
from moecompress.quant.hf_integration import MoeCompressConfig
from moecompress.passes.merge import EXACT_ROUTERS, MergeConfig, MergePass, check_fittable_router
from moecompress.passes.prune import PruneConfig, PrunePass
from moecompress.passes.refit import RefitConfig, RefitPass

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class StatsSource:
    """Where the statistics come from: a ``moecompress stats`` folder, or a calibration set."""

    stats_dir: str | Path | None = None
    calib: str = "mixed"
    nsamples: int = 64
    seqlen: int = 256
    seed: int = 0
    batch_size: int = 8
    stats_label: str | None = field(default=None, compare=False)  # how reports name stats_dir (a pipeline's stats pass)

    def validate(self) -> None:
        self.spec().validate()
        require_int("batch_size", self.batch_size, 1)
        if self.stats_dir is not None and not Path(self.stats_dir).is_dir():
            what = "is a file, not a folder" if Path(self.stats_dir).exists() else "does not exist"
            raise MoeCompressError(
                f"--stats {self.stats_dir} holds no stats.json: it {what}; write it with `moecompress stats` or drop --stats"
            )
        if self.stats_dir is not None and not (Path(self.stats_dir) / "stats.json").is_file():
            raise MoeCompressError(f"--stats {self.stats_dir} holds no stats.json; write it with `moecompress stats` or drop --stats")

    def spec(self) -> CalibrationSpec:
        return CalibrationSpec(self.calib, self.nsamples, self.seqlen, self.seed)


class CalibrationCache:
    """The calibration set of one job, loaded at most once (statistics, refit and RegMean share it)."""

    def __init__(self, model_folder: Path, source: StatsSource, announce=None):
        self.model_folder, self.source, self.announce = model_folder, source, announce
        self._loaded = None

    def get(self):
        if self._loaded is None:
            self._loaded = load_for_model(self.model_folder, self.source.spec(), self.announce)
        return self._loaded


@dataclass
class EvalRequest:
    """Perplexity before and after on a text file (``moecompress.evaluate.evaluate``'s protocol)."""

    data: str | Path
    seqlen: int = 256
    max_tokens: int | None = 40000

    def validate(self) -> None:
        if not Path(self.data).is_file():
            raise MoeCompressError(f"--eval-data {self.data} is not a file")
        require_int("eval_seqlen", self.seqlen, 2)
        require_int("eval_max_tokens", self.max_tokens, 1)
        if self.seqlen < 2 or (self.max_tokens is not None and self.max_tokens < self.seqlen):
            raise MoeCompressError(
                f"--eval-max-tokens {self.max_tokens} must hold at least one chunk of --eval-seqlen {self.seqlen} (>= 2)"
            )


# ----------------------------------------------------------------------------- helpers


def load_or_collect_stats(lm: LayerwiseModel, source: StatsSource, calibration: CalibrationCache,
                          progress: Progress | None = None) -> RouterStats:
    """Statistics for ``lm``: read ``source.stats_dir`` or run the collector over a calibration set."""
    if source.stats_dir is not None:
        stats = RouterStats.load(source.stats_dir)
    else:
        calib, description = calibration.get()
        stats = collect_stats(lm, calib, batch_size=source.batch_size, progress=progress)
        stats.calibration.update(description)
    check_stats_match(stats, lm)
    return stats


def check_stats_match(stats: RouterStats, lm: LayerwiseModel) -> None:
    """The statistics must describe this model's MoE layers and expert counts."""
    if stats.moe_layers != lm.view.moe_layers:
        raise MoeCompressError(
            f"the statistics cover MoE layers {stats.moe_layers}, the model has {lm.view.moe_layers}; "
            "collect statistics on this model (moecompress stats)"
        )
    for i in stats.moe_layers:
        if stats.layers[i].num_experts != lm.view.blocks[i].num_experts:
            raise MoeCompressError(
                f"layer {i}: the statistics describe {stats.layers[i].num_experts} experts, the model has "
                f"{lm.view.blocks[i].num_experts}; collect statistics on this model"
            )
        if stats.layers[i].tokens == 0:
            raise MoeCompressError(f"layer {i}: the statistics saw no calibration token; collect them again")


def _rewrite(lm: LayerwiseModel, model_folder: Path, stage_path: Path, passes: list, config, progress: Progress | None,
             calibration: torch.Tensor | None = None, batch_size: int = 8,
             native: Callable[[], dict | None] | None = None) -> CheckpointWriter:
    """The rewrite sweep: each decoder layer through ``passes``, written as it finishes.

    ``calibration [n, L]`` token ids drive the sweep when a pass needs activations (refit); otherwise
    an 8-token dummy batch does (the statistics carry the calibration). ``native()``, asked after the
    sweep, gives the ``quantization_config`` of a native checkpoint (an exact-router merge), or None.
    """
    writer = CheckpointWriter(stage_path, lm.model, lm.checkpoint_dtype)

    def write_layer(ctx: LayerContext) -> None:
        writer.write_module(f"{lm.view.layers_name}.{ctx.index}", ctx.layer, f"layer-{ctx.index:05d}.safetensors")

    if calibration is None:
        calibration, batch_size = dummy_batch(), 1
    run_layerwise(lm, calibration, passes, batch_size=batch_size, on_layer_done=write_layer, progress=progress)
    lm.load_outer()
    writer.write_tensors(outer_state(lm.model, lm.view.layers_name), "outer.safetensors")
    lm.release_outer()
    config.dtype = lm.checkpoint_dtype
    quantization_config = native() if native is not None else None
    if quantization_config is not None:
        config.quantization_config = quantization_config
    writer.finish(config, model_folder)
    return writer


def _evaluate_pair(model_folder: Path, out: Path, request: EvalRequest | None) -> dict | None:
    if request is None:
        return None
    from moecompress.evaluate import evaluate

    before = evaluate(model_folder, request.data, seqlen=request.seqlen, max_tokens=request.max_tokens)
    after = evaluate(out, request.data, seqlen=request.seqlen, max_tokens=request.max_tokens)
    return {
        "data": str(request.data),
        "seqlen": request.seqlen,
        "max_tokens": request.max_tokens,
        "tokens": after.tokens,
        "ppl_before": before.ppl,
        "ppl_after": after.ppl,
        "change": after.ppl / before.ppl - 1.0,
    }


def _refit_passes(refit: RefitConfig | None, calibration_cache: CalibrationCache, shared_slots=None,
                  need_calibration: bool = False):
    """(extra passes, calibration ids) for the rewrite sweep: none without refit, and calibration ids
    only when a pass needs activations (refit, fitted router rows)."""
    calibration = None
    if refit is not None or need_calibration:
        calibration = calibration_cache.get()[0].input_ids
    return ([RefitPass(refit, shared_slots)] if refit is not None else []), calibration


def _refit_details(refit: RefitConfig | None, passes: list, source: StatsSource) -> dict | None:
    if refit is None:
        return None
    records = passes[0].records
    return {
        "damp": refit.damp,
        "sweeps": refit.sweeps,
        "calibration": {"source": source.calib, "nsamples": source.nsamples, "seqlen": source.seqlen, "seed": source.seed},
        "layers": {str(r.layer): {"before": r.relative_error_before, "after": r.relative_error_after} for r in records},
    }


def _stats_description(stats: RouterStats, source: StatsSource) -> dict:
    if source.stats_dir is not None:
        return {"stats_dir": source.stats_label or str(source.stats_dir), **stats.calibration}
    return dict(stats.calibration)


# ----------------------------------------------------------------------------- prune


def check_prune_request(lm: LayerwiseModel, cfg: PruneConfig) -> int:
    """Validate ``cfg`` against the model; the expert count every MoE layer will have."""
    cfg.validate()
    num = config_expert_count(lm.config)
    if cfg.num_experts is not None and cfg.num_experts > num:
        raise MoeCompressError(f"--num-experts {cfg.num_experts} exceeds the model's {num} experts per layer")
    target = cfg.target(num)
    check_expert_count(lm.config, target)
    return target


def _prepare(command: str, model_folder: Path, source: StatsSource, eval_request: EvalRequest | None, check):
    """What prune and merge check before any work: options, the model, the request against it."""
    source.validate()
    if eval_request is not None:
        eval_request.validate()
    lm = LayerwiseModel(model_folder)
    lm.require_dense(command)
    lm.require_ungrouped(command)
    count = check(lm)
    if source.stats_dir is None:
        require_tokenizer(model_folder, source.spec())
    return lm, count


def _common_details(command: str, model_folder: Path, stage: Path, method: str, before: int, after: int,
                    stats, source: StatsSource, label: str | None = None) -> dict:
    """The summary fields prune and merge share (their own fields are added by each job)."""
    return {
        "command": command,
        "model": label or str(model_folder),
        "method": method,
        "experts_before": before,
        "experts_after": after,
        "statistics": _stats_description(stats, source),
        "super_experts": [{"layer": s.layer, "expert": s.expert, "max_abs": s.max_abs} for s in stats.super_experts],
        "input_bytes": folder_bytes(model_folder),
        "output_bytes": folder_bytes(stage),
    }


@dataclass
class ExpertRewrite:
    """What a prune or merge job does to each decoder layer, apart from where the layers are written.

    :meth:`PruneJob.plan` / :meth:`MergeJob.plan` build it (statistics read or collected, the passes
    made); the job's own :meth:`write` sweeps it into a standard checkpoint, and a pipeline may run its
    passes in front of the quantizer's in one sweep instead (:mod:`moecompress.pipeline.run`).
    """

    lm: LayerwiseModel
    passes: list  # the pruner or merger, then the refit
    calibration: torch.Tensor | None  # token ids the passes need activations of; None: the statistics suffice
    batch_size: int
    expert_count: int  # experts per MoE layer in the written config
    details: Callable[[Path], dict]  # the job's summary; writes kept_experts.json into the folder given
    write_report: Callable[[Path, dict], Path]
    eval_request: EvalRequest | None
    native: Callable[[], dict | None] | None  # the quantization_config of an exact-router merge
    stats_seconds: float

    def config(self):
        """The model's config as the rewrite leaves it (the new expert count)."""
        return with_expert_count(self.lm.config, self.expert_count)

    def report(self, folder: Path, fused_with: str) -> dict:
        """Write kept_experts.json and report.md into ``folder`` when the rewritten model was not written
        on its own but went on through ``fused_with`` in the same sweep; the summary."""
        summary = self.details(folder)
        summary["output_bytes"] = None
        summary["fused_with"] = fused_with
        self.write_report(folder / "report.md", summary)
        return summary


def _write_checkpoint(plan: ExpertRewrite, model_folder: Path, stage: Path, progress: Progress | None) -> JobResult:
    """What prune and merge do after planning: the rewrite sweep into the staging folder, the job's own
    files and summary (``details``), the optional evaluation and the report."""
    _rewrite(plan.lm, model_folder, stage, plan.passes, plan.config(), progress, plan.calibration, plan.batch_size, plan.native)
    summary = plan.details(stage)
    summary["eval"] = _evaluate_pair(model_folder, stage, plan.eval_request)
    plan.write_report(stage / "report.md", summary)
    result = JobResult(None, summary)
    result.run["stats_seconds"] = round(plan.stats_seconds, 2)
    return result


# ----------------------------------------------------------------------------- prune


class PruneJob:
    """Prune a model folder into a standard checkpoint (plus kept_experts.json, report.md).

    ``refit``: re-solve the kept experts' down projections on calibration data (see the module doc).
    """

    command = "prune"
    model_label: str | None = None  # how reports name the model (a pipeline's pass names its input)

    def __init__(self, model: str | Path, cfg: PruneConfig, source: StatsSource = StatsSource(),
                 eval_request: EvalRequest | None = None, refit: RefitConfig | None = None, announce=None):
        self.model, self.cfg, self.source = Path(model), cfg, source
        self.eval_request, self.refit, self.announce = eval_request, refit, announce

    def inputs(self):
        return [("model", self.model), ("statistics folder", self.source.stats_dir),
                ("calibration source", self.source.spec().input_path()),
                ("evaluation data", None if self.eval_request is None else self.eval_request.data)]

    def validate(self) -> None:
        self.cfg.validate()
        if self.refit is not None:
            self.refit.validate()
        _prepare("prune", self.model, self.source, self.eval_request, lambda lm: check_prune_request(lm, self.cfg))

    def plan(self, progress: Progress | None = None) -> ExpertRewrite:
        """Statistics (read or collected) and the passes of the rewrite sweep."""
        cfg, source, refit, model_folder = self.cfg, self.source, self.refit, self.model
        lm, target = _prepare("prune", model_folder, source, self.eval_request, lambda lm: check_prune_request(lm, cfg))
        calibration_cache = CalibrationCache(model_folder, source, self.announce)
        t0 = time.perf_counter()
        stats = load_or_collect_stats(lm, source, calibration_cache, progress)
        stats_seconds = time.perf_counter() - t0
        pruner = PrunePass.from_stats(cfg, stats, lm.config)
        refitters, calibration = _refit_passes(refit, calibration_cache)
        before = config_expert_count(lm.config)
        self.pass_ = pruner

        def details(stage_path: Path) -> dict:
            write_kept_experts(stage_path, kept_experts_record(
                cfg.method, before, target, pruner.report.kept_map(),
                protected={str(i): p for i, p in pruner.protected.items() if p},
            ))
            return {
                **_common_details("prune", model_folder, stage_path, cfg.method, before, target, stats, source, self.model_label),
                "options": {
                    "keep_ratio": cfg.keep_ratio,
                    "num_experts": cfg.num_experts,
                    **(
                        {"similarity_threshold": cfg.similarity_threshold, "use_gate_in_similarity": cfg.use_gate_in_similarity}
                        if cfg.method == "dern" else {}
                    ),
                },
                "layers": {str(r.layer): r.kept for r in pruner.report.layers},
                "refit": _refit_details(refit, refitters, source),
            }

        return ExpertRewrite(lm, [pruner, *refitters], calibration, source.batch_size, target, details,
                             lambda path, d: write_prune_report(path, d, pruner), self.eval_request, None, stats_seconds)

    def write(self, stage: Path, progress: Progress | None) -> JobResult:
        return _write_checkpoint(self.plan(progress), self.model, stage, progress)


def check_merge_request(lm: LayerwiseModel, cfg: MergeConfig) -> int:
    """Validate ``cfg`` against the model; the expert count of the written config."""
    cfg.validate()
    num = config_expert_count(lm.config)
    if cfg.num_experts > num:
        raise MoeCompressError(f"--num-experts {cfg.num_experts} exceeds the model's {num} experts per layer")
    if cfg.router in EXACT_ROUTERS:
        return num  # the router keeps its E rows (exact-slots: E slots too, members sharing their group's weights)
    check_expert_count(lm.config, cfg.num_experts)
    block = next(iter(lm.view.blocks.values()))
    router = block.router
    if cfg.router_mode == "fitted":
        check_fittable_router(block)
    if cfg.router_mode == "logsumexp_approx" and router.bias is None:
        raise MoeCompressError(
            f"--router-mode logsumexp_approx needs a router bias, which {type(router.module).__name__} has not; "
            "use dominant or weighted"
        )
    return cfg.num_experts


class MergeJob:
    """Merge a model folder's experts (M-SMoE) into a standard checkpoint, or a native one with the
    exact router's expert -> group map.

    ``refit``: re-solve the merged experts' down projections on calibration data (see the module doc).
    """

    command = "merge"
    model_label: str | None = None

    def __init__(self, model: str | Path, cfg: MergeConfig, source: StatsSource = StatsSource(),
                 eval_request: EvalRequest | None = None, refit: RefitConfig | None = None, announce=None):
        self.model, self.cfg, self.source = Path(model), cfg, source
        self.eval_request, self.refit, self.announce = eval_request, refit, announce

    inputs = PruneJob.inputs

    def validate(self) -> None:
        self.cfg.validate()
        if self.refit is not None:
            self.refit.validate()
        _prepare("merge", self.model, self.source, self.eval_request, lambda lm: check_merge_request(lm, self.cfg))

    def plan(self, progress: Progress | None = None) -> ExpertRewrite:
        """Statistics (read or collected) and the passes of the rewrite sweep."""
        cfg, source, refit, model_folder = self.cfg, self.source, self.refit, self.model
        lm, slots = _prepare("merge", model_folder, source, self.eval_request, lambda lm: check_merge_request(lm, cfg))
        calibration_cache = CalibrationCache(model_folder, source, self.announce)
        t0 = time.perf_counter()
        stats = load_or_collect_stats(lm, source, calibration_cache, progress)
        stats_seconds = time.perf_counter() - t0
        merger = MergePass.from_stats(cfg, stats, lm.config)
        shared = merger.groups_of if cfg.router == "exact-slots" else None  # a group's slots share one expert
        refitters, calibration = _refit_passes(refit, calibration_cache, shared, cfg.needs_activations)
        before = config_expert_count(lm.config)
        self.pass_ = merger

        def details(stage_path: Path) -> dict:
            write_kept_experts(stage_path, kept_experts_record(
                cfg.method, before, slots, merger.report.groups_map(),
                router=cfg.router,
                router_mode=cfg.router_mode if cfg.router == "standard" else None,
                group_counts={str(i): n for i, n in merger.group_counts.items()},
                protected={str(i): p for i, p in merger.protected.items() if p},
            ))
            return {
                **_common_details("merge", model_folder, stage_path, cfg.method, before, slots, stats, source, self.model_label),
                "router": cfg.router,
                # What each layer stores (exact-slots: distinct weights), against the router's outputs in experts_after.
                "distinct_experts_after": round(sum(merger.group_counts.values()) / max(len(merger.group_counts), 1), 2),
                "dominance": cfg.dominance,
                "merge_weights": cfg.merge_weights,
                "grouping": cfg.grouping_used,
                "router_mode": cfg.router_mode if cfg.router == "standard" else None,
                "group_counts": "per-layer" if cfg.uses_per_layer else "global threshold",
                "groups_per_layer": {str(i): n for i, n in merger.group_counts.items()},
                "layers": {str(r.layer): r.groups for r in merger.report.layers},
                "refit": _refit_details(refit, refitters, source),
            }

        def native() -> dict:
            return MoeCompressConfig(
                expert_groups=expert_groups_map(lm, merger),
                provenance={"tool": f"moecompress {moecompress.__version__}", "method": f"merge-{cfg.method}",
                            "router": cfg.router, "source_model": model_folder.resolve().name},
            ).to_dict()

        return ExpertRewrite(lm, [merger, *refitters], calibration, source.batch_size, slots, details,
                             lambda path, d: write_merge_report(path, d, merger), self.eval_request,
                             native if cfg.router == "exact" else None, stats_seconds)

    def write(self, stage: Path, progress: Progress | None) -> JobResult:
        return _write_checkpoint(self.plan(progress), self.model, stage, progress)


def expert_groups_map(lm: LayerwiseModel, merger: MergePass) -> dict[str, list[int]]:
    """Experts module path -> expert -> group map of every merged layer (for ``quantization_config``)."""
    out = {}
    for r in merger.report.layers:
        path = f"{lm.view.layers_name}.{r.layer}.{lm.view.blocks[r.layer].experts_name}"
        out[path] = expert_to_group(r.groups, r.num_experts).tolist()
    return out


# ----------------------------------------------------------------------------- reports


def _summary_rows(d: dict) -> list[tuple[str, str]]:
    stats = d["statistics"]
    if "stats_dir" in stats:
        source = f"{stats['stats_dir']} ({stats.get('source', '?')}, {stats.get('nsamples', '?')} x {stats.get('seqlen', '?')})"
    else:
        source = f"{stats.get('source', '?')}, {stats.get('nsamples', '?')} x {stats.get('seqlen', '?')} tokens, seed {stats.get('seed', 0)}"
    rows = [
        ("model", d["model"]),
        ("method", d["method"]),
        ("experts per MoE layer", f"{d['experts_before']} -> {d['experts_after']}"
                                  + (f" router outputs, {d['distinct_experts_after']:g} distinct experts (mean)"
                                     if d.get("distinct_experts_after") not in (None, d["experts_after"]) else "")),
        ("statistics", source + " (first sweep over the original model)"),
        ("super experts (protected)", ", ".join(f"layer {s['layer']} expert {s['expert']}" for s in d["super_experts"]) or "none"),
        ("output refit", "on (see the section below)" if d.get("refit") else "off (the method alone)"),
        ("checkpoint size", f"{d['input_bytes'] / 2**20:.2f} MiB -> {d['output_bytes'] / 2**20:.2f} MiB "
                            f"({100 * (d['output_bytes'] / d['input_bytes'] - 1):+.1f}%)" if d["output_bytes"] is not None
                            else f"{d['input_bytes'] / 2**20:.2f} MiB -> not written: each rewritten layer went on "
                                 f"through {d['fused_with']} in the same sweep"),
        ("written by", f"moecompress {moecompress.__version__}"),
    ]
    ev = d.get("eval")
    if ev:
        rows.append(("perplexity", f"{ev['ppl_before']:.4f} -> {ev['ppl_after']:.4f} ({100 * ev['change']:+.2f}%) on "
                                   f"{ev['data']} ({ev['tokens']} tokens, {ev['seqlen']}-token chunks)"))
    return rows


def _refit_section(details: dict) -> tuple[str, str] | None:
    """Report section for the output refit (None when it was off)."""
    from moecompress.report import markdown_table

    refit = details.get("refit")
    if not refit:
        return None
    c = refit["calibration"]
    rows = [[layer, v["before"], v["after"]] for layer, v in refit["layers"].items()]
    body = (f"Down projections re-solved to reproduce each original layer's routed output on {c['source']} "
            f"{c['nsamples']} x {c['seqlen']} tokens (seed {c['seed']}); ridge damp {refit['damp']}, {refit['sweeps']} sweeps. "
            "Error: ||y - y_hat||^2 / ||y||^2 of the routed output on those tokens, before and after.\n\n"
            + markdown_table(["layer", "relative error before", "after"], rows))
    return ("Output refit", body)


def _ids(ids) -> str:
    return " ".join(str(e) for e in ids) or "-"


def write_prune_report(path: Path, details: dict, pruner: PrunePass) -> Path:
    from moecompress.report import markdown_table, write_markdown

    summary = markdown_table(["", ""], _summary_rows(details))
    rows = []
    for r in pruner.report.layers:
        kept_scores = [r.scores[e] for e in r.kept]
        dropped_scores = [r.scores[e] for e in r.dropped]
        row = [r.layer, _ids(r.kept), _ids(r.dropped), min(kept_scores), max(dropped_scores) if dropped_scores else "-", _ids(r.protected)]
        if r.dern is not None:
            received = sum(r.dern["received"].values())
            row += [f"{received} of {r.dern['donor_segments']}", r.dern["mean_similarity"] if r.dern["mean_similarity"] is not None else "-"]
        rows.append(row)
    headers = ["layer", "kept (original ids)", "dropped", "lowest kept score", "highest dropped score", "protected"]
    if pruner.cfg.method == "dern":
        headers += ["donor neurons merged", "mean best cosine"]
    score_name = {"frequency": "share of top-k selections", "reap": "REAP saliency", "dern": "DERN importance"}[pruner.cfg.method]
    per_layer = f"Scores: {score_name} (higher = kept)."
    if pruner.n_group > 1:
        per_layer += (f" The model routes within {pruner.n_group} groups of experts (n_group), so the same number "
                      "is kept in every group: a kept score can be below a dropped one from another group.")
    per_layer += "\n\n" + markdown_table(headers, rows)
    scores = markdown_table(
        ["layer"] + [str(e) for e in range(max((r.num_experts for r in pruner.report.layers), default=0))],
        [[r.layer] + r.scores for r in pruner.report.layers],
    )
    sections = [("Summary", summary), ("Experts kept per layer", per_layer), ("All scores", scores)]
    if (refit := _refit_section(details)) is not None:
        sections.append(refit)
    sections.append(("Files", "`kept_experts.json` maps each decoder layer to the original expert id behind each new "
                              "expert slot (slot r = list entry r). The checkpoint loads with plain transformers."))
    return write_markdown(path, sections, title=f"moecompress prune ({details['method']})")


def write_merge_report(path: Path, details: dict, merger: MergePass) -> Path:
    from moecompress.report import markdown_table, write_markdown

    summary_rows = _summary_rows(details)
    summary_rows.insert(3, ("router", f"{details['router']}" + (f" ({details['router_mode']} rows)" if details["router_mode"] else "")))
    summary_rows.insert(4, ("dominant experts", "most used (M-SMoE)" if details.get("dominance", "frequency") == "frequency"
                            else "highest REAP saliency"))
    summary_rows.insert(5, ("merge weights", "usage frequency (M-SMoE)" if details.get("merge_weights", "frequency") == "frequency"
                            else "RegMean on each member's calibration inputs"))
    summary_rows.insert(6, ("grouping", "router-logit similarity (M-SMoE)" if details.get("grouping", "router") == "router"
                            else "closest output on each member's calibration tokens"))
    summary_rows.insert(7, ("group counts", f"{details['group_counts']}: " + ", ".join(
        f"layer {i}: {n}" for i, n in details["groups_per_layer"].items())))
    rows = []
    for r in merger.report.layers:
        groups = "; ".join(f"{g[0]}" + (f" <- {_ids(g[1:])}" if len(g) > 1 else "") for g in r.groups)
        row = [r.layer, len(r.groups), groups, r.mean_similarity if r.mean_similarity is not None else "-", _ids(r.protected)]
        if r.router_fit is not None:
            row.append(f"{r.router_fit[0]:.4f} -> {r.router_fit[1]:.4f}")
        rows.append(row)
    headers = ["layer", "groups", "groups (original ids)", "mean similarity", "protected"]
    fitted = any(r.router_fit is not None for r in merger.report.layers)
    if fitted:
        headers.append("router KL to exact grouping (nats/token)")
    per_layer = ("Groups as `dominant <- merged members`; similarity: mean cosine of the members' router-logit columns "
                 "to their dominant expert's over the calibration tokens."
                 + (" Fitted router rows: KL from the exact per-group routing mass, dominant rows -> fitted rows."
                    if fitted else "") + "\n\n" + markdown_table(headers, rows))
    note = ("`kept_experts.json` lists each layer's groups (first member dominant). "
            + {"standard": "Standard router: new expert slot g is group g; a plain checkpoint.",
               "exact": "Exact router: the router keeps every original row and the experts module stores group g's merged "
                        "expert in slot g; `config.json`'s `quantization_config.expert_groups` maps each original expert to its "
                        "group (MC-SMoE's exact form). Load with `import moecompress` before `from_pretrained`.",
               "exact-slots": "Exact router, plain checkpoint: every original expert slot stays and holds its group's merged "
                              "expert, so the routing is exactly MC-SMoE's expert -> group map; distinct weights are reduced "
                              "but the file is not smaller."}[details["router"]])
    sections = [("Summary", markdown_table(["", ""], summary_rows)), ("Groups per layer", per_layer)]
    if (refit := _refit_section(details)) is not None:
        sections.append(refit)
    sections.append(("Files", note))
    return write_markdown(path, sections, title=f"moecompress merge ({details['method']}, {details['router']} router)")


# ----------------------------------------------------------------------------- config-level entry points


def prune_job(model_folder: str | Path, out: str | Path, cfg: PruneConfig, source: StatsSource = StatsSource(),
              overwrite: bool = False, eval_request: EvalRequest | None = None, progress: Progress | None = None,
              refit: RefitConfig | None = None) -> tuple[JobResult, PrunePass]:
    """Prune into ``out`` from ready-made configs -> (JobResult, PrunePass). Same contract as ``prune()``."""
    from moecompress.api.job import execute

    job = PruneJob(model_folder, cfg, source, eval_request, refit)
    return execute(job, out, overwrite, progress=progress), job.pass_


def merge_job(model_folder: str | Path, out: str | Path, cfg: MergeConfig, source: StatsSource = StatsSource(),
              overwrite: bool = False, eval_request: EvalRequest | None = None, progress: Progress | None = None,
              refit: RefitConfig | None = None) -> tuple[JobResult, MergePass]:
    """Merge into ``out`` from ready-made configs -> (JobResult, MergePass). Same contract as ``merge()``."""
    from moecompress.api.job import execute

    job = MergeJob(model_folder, cfg, source, eval_request, refit)
    return execute(job, out, overwrite, progress=progress), job.pass_
