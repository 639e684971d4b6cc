"""``moecompress.merge``: M-SMoE expert merging (alignment, grouping, RegMean), then the output refit.

    from moecompress.api import merge, MergeOptions
    result = merge("model", "model-8of16", MergeOptions(num_experts=8, router="exact"))

``router="standard"`` / ``"exact-slots"`` write plain checkpoints; ``"exact"`` writes a native one
(E' stored experts behind the expert -> group map) that loads after ``import moecompress``. The
work itself is :class:`moecompress.api.experts.MergeJob`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moecompress.api.experts import MergeJob
from moecompress.api.job import JobResult, Progress, execute
from moecompress.api.prune import ExpertsCommonOptions
from moecompress.errors import MoeCompressError
from moecompress.model.hub import resolve_model
from moecompress.passes.merge import DEFAULT_ROUTER_MODE, MergeConfig


@dataclass
class MergeOptions(ExpertsCommonOptions):
    num_experts: int | None = None  # required
    method: str = "msmoe"
    router: str = "standard"
    router_mode: str | None = None
    per_layer: bool | None = None
    dominance: str = "frequency"
    grouping: str = "auto"
    merge_weights: str = "regmean"

    def merge_config(self) -> MergeConfig:
        if self.num_experts is None:
            raise MoeCompressError("merge needs --num-experts (merged experts per layer)")
        return MergeConfig(
            num_experts=self.num_experts, method=self.method, router=self.router,
            router_mode=self.router_mode or DEFAULT_ROUTER_MODE, per_layer=self.per_layer,
            protect_super_experts=self.protect_super_experts, dominance=self.dominance,
            merge_weights=self.merge_weights, grouping=self.grouping,
        )

    def validate(self) -> None:
        """Everything that does not need the model (the job checks the rest)."""
        self.validate_common()
        self.merge_config().validate()

    def job(self, model: str | Path, announce=None) -> MergeJob:
        return MergeJob(model, self.merge_config(), self.source(), self.eval_request(), self.refit_config(), announce)


def merge(model: str | Path, out: str | Path, options: MergeOptions, *, overwrite: bool = False, dry_run: bool = False,
          progress: Progress | None = None, announce=None, side_files=()) -> JobResult:
    """Merge ``model``'s experts into ``out`` (with kept_experts.json and report.md)."""
    model = resolve_model(model)
    return execute(options.job(model, announce), out, overwrite, dry_run, progress, side_files)
