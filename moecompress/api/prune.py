"""``moecompress.prune``: fewer experts per layer (frequency, REAP, DERN), then the output refit.

    from moecompress.api import prune, PruneOptions
    result = prune("model", "model-12of16", PruneOptions(method="reap", num_experts=12))

OUT loads with plain ``AutoModelForCausalLM.from_pretrained(OUT)`` and holds ``kept_experts.json``
and ``report.md``. The work itself is :class:`moecompress.api.experts.PruneJob`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moecompress.api.experts import EvalRequest, PruneJob, StatsSource
from moecompress.model.hub import resolve_model
from moecompress.api.job import JobResult, Progress, execute
from moecompress.passes.prune import PruneConfig
from moecompress.passes.refit import RefitConfig


@dataclass
class ExpertsCommonOptions:
    """Options prune and merge share: statistics / calibration, the output refit, the evaluation."""

    stats: str | None = None
    calib: str = "mixed"
    nsamples: int = 64
    seqlen: int = 256
    seed: int = 0
    batch_size: int = 8
    refit: bool = True
    refit_damp: float = 0.1
    refit_sweeps: int = 2
    protect_super_experts: bool = True
    eval_data: str | None = None
    eval_seqlen: int = 256
    eval_max_tokens: int | None = 40000

    def source(self) -> StatsSource:
        return StatsSource(stats_dir=self.stats, calib=self.calib, nsamples=self.nsamples, seqlen=self.seqlen,
                           seed=self.seed, batch_size=self.batch_size)

    def refit_config(self) -> RefitConfig | None:
        return RefitConfig(damp=self.refit_damp, sweeps=self.refit_sweeps) if self.refit else None

    def eval_request(self) -> EvalRequest | None:
        return None if self.eval_data is None else EvalRequest(self.eval_data, self.eval_seqlen, self.eval_max_tokens)

    def validate_common(self) -> None:
        self.source().validate()
        refit = self.refit_config()
        if refit is not None:
            refit.validate()
        if self.eval_request() is not None:
            self.eval_request().validate()


@dataclass
class PruneOptions(ExpertsCommonOptions):
    method: str = "reap"
    keep_ratio: float | None = None
    num_experts: int | None = None
    similarity_threshold: float = 0.6
    use_gate_in_similarity: bool = False

    def prune_config(self) -> PruneConfig:
        return PruneConfig(
            method=self.method, keep_ratio=self.keep_ratio, num_experts=self.num_experts,
            similarity_threshold=self.similarity_threshold, use_gate_in_similarity=self.use_gate_in_similarity,
            protect_super_experts=self.protect_super_experts,
        )

    def validate(self) -> None:
        """Everything that does not need the model (the job checks the rest)."""
        self.validate_common()
        self.prune_config().validate()

    def job(self, model: str | Path, announce=None) -> PruneJob:
        return PruneJob(model, self.prune_config(), self.source(), self.eval_request(), self.refit_config(), announce)


def prune(model: str | Path, out: str | Path, options: PruneOptions, *, overwrite: bool = False, dry_run: bool = False,
          progress: Progress | None = None, announce=None, side_files=()) -> JobResult:
    """Prune ``model``'s experts into ``out`` (a standard checkpoint with kept_experts.json and report.md)."""
    model = resolve_model(model)
    return execute(options.job(model, announce), out, overwrite, dry_run, progress, side_files)
