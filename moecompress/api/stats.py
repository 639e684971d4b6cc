"""``moecompress.stats``: router statistics over a calibration set, with a report.

    from moecompress.api import stats, StatsOptions
    result = stats("model", "model-stats", StatsOptions(calib="mixed"))

OUT holds stats.json, stats.safetensors, report.md and figures; later passes reuse it (``--stats``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moecompress.api.calibration import CalibrationSpec, load_for_model, require_tokenizer
from moecompress.api.job import JobResult, Progress, execute, require_float, require_int
from moecompress.errors import MoeCompressError
from moecompress.model.hub import resolve_model
from moecompress.model.loading import LayerwiseModel


@dataclass
class StatsOptions:
    calib: str = "mixed"
    nsamples: int = 64
    seqlen: int = 256
    seed: int = 0
    batch_size: int = 8
    coverage_threshold: float = 0.1
    super_percentile: float = 99.5
    super_ratio: float = 0.1
    coverage_layer: int | None = None

    def calibration(self) -> CalibrationSpec:
        return CalibrationSpec(self.calib, self.nsamples, self.seqlen, self.seed)

    def validate(self) -> None:
        self.calibration().validate()
        require_int("batch_size", self.batch_size, 1)
        require_float("coverage_threshold", self.coverage_threshold, 0.0)
        require_float("super_percentile", self.super_percentile, 0.0, 100.0)
        require_float("super_ratio", self.super_ratio, 0.0, 1.0)
        require_int("coverage_layer", self.coverage_layer, 0)


class StatsJob:
    command = "stats"

    def __init__(self, model: str | Path, options: StatsOptions, announce=None):
        self.model, self.options, self.announce = Path(model), options, announce
        self.stats = None

    def inputs(self):
        return [("model", self.model), ("calibration source", self.options.calibration().input_path())]

    def validate(self) -> None:
        o = self.options
        o.validate()
        lm = LayerwiseModel(self.model)  # meta skeleton: validates the folder and the architecture cheaply
        if o.coverage_layer is not None and o.coverage_layer not in lm.view.blocks:
            raise MoeCompressError(f"--coverage-layer {o.coverage_layer} is not an MoE layer; MoE layers: {lm.view.moe_layers}")
        require_tokenizer(self.model, o.calibration())

    def write(self, stage: Path, progress: Progress | None) -> JobResult:
        from moecompress.calibration.collect import collect_stats
        from moecompress.calibration.stats_report import write_stats_report

        o = self.options
        lm = LayerwiseModel(self.model)
        calib, _ = load_for_model(self.model, o.calibration(), self.announce)
        result = collect_stats(
            lm, calib, batch_size=o.batch_size, progress=progress, super_expert_percentile=o.super_percentile,
            super_expert_ratio=o.super_ratio, coverage_threshold=o.coverage_threshold,
        )
        result.calibration["seed"] = o.seed
        result.save(stage)
        write_stats_report(result, stage, o.coverage_layer)
        self.stats = result
        job_result = JobResult(None, result.to_json())
        if result.seconds:
            job_result.run["tokens_per_second"] = round(result.calibration.get("tokens", 0) / result.seconds, 1)
        return job_result


def stats(model: str | Path, out: str | Path, options: StatsOptions | None = None, *, overwrite: bool = False,
          dry_run: bool = False, progress: Progress | None = None, announce=None, side_files=()) -> JobResult:
    """Router statistics of ``model`` into the folder ``out``."""
    model = resolve_model(model)
    return execute(StatsJob(model, options or StatsOptions(), announce), out, overwrite, dry_run, progress, side_files)
