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


@dataclass(frozen=True)
class ProfileRequest:
    """A mixed-precision profile to measure in the statistics sweep (a pipeline's later ``quantize``
    with a bit budget on the same calibration set): saved beside the statistics, where that quantize
    pass finds and reuses it instead of sweeping the model again."""

    cfg: object  # QuantizeConfig
    bit_choices: tuple[int, ...]
    method: str


class StatsJob:
    command = "stats"
    profile: ProfileRequest | None = None

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
        calib, description = load_for_model(self.model, o.calibration(), self.announce)
        profiler = None
        if self.profile is not None:
            from moecompress.passes.profile import ProfilePass

            profiler = ProfilePass(self.profile.cfg, self.profile.bit_choices, self.profile.method)
        result = collect_stats(
            lm, calib, batch_size=o.batch_size, progress=progress, super_expert_percentile=o.super_percentile,
            super_expert_ratio=o.super_ratio, coverage_threshold=o.coverage_threshold,
            also=[profiler] if profiler is not None else [],
        )
        result.calibration["seed"] = o.seed
        result.save(stage)
        if profiler is not None:
            self._save_profile(stage, lm, profiler, description, result.seconds)
        write_stats_report(result, stage, o.coverage_layer)
        self.stats = result
        job_result = JobResult(None, result.to_json())
        if result.seconds:
            job_result.run["tokens_per_second"] = round(result.calibration.get("tokens", 0) / result.seconds, 1)
        return job_result


    def _save_profile(self, stage: Path, lm: LayerwiseModel, profiler, description: dict, seconds: float | None) -> None:
        from moecompress.passes.profile import ExpertProfile

        r = self.profile
        ExpertProfile(
            model=Path(lm.folder).resolve().name, num_layers=lm.view.num_layers, bit_choices=r.bit_choices,
            method=r.method, group_size=r.cfg.group_size, symmetric=r.cfg.symmetric, calibration=description,
            layers=profiler.layers, seconds=seconds,
        ).save(stage)


def stats(model: str | Path, out: str | Path, options: StatsOptions | None = None, *, overwrite: bool = False,
          dry_run: bool = False, progress: Progress | None = None, announce=None, side_files=()) -> JobResult:
    """Router statistics of ``model`` into the folder ``out``."""
    model = resolve_model(model)
    return execute(StatsJob(model, options or StatsOptions(), announce), out, overwrite, dry_run, progress, side_files)
