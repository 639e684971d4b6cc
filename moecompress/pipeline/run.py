"""Running a validated pipeline: every pass is a library job, the whole run one output contract.

Passes run in order inside the pipeline's staging folder (``work/stepN_name``), each reading the
previous pass's output; statistics from a ``stats`` pass are handed to later passes (their
``stats`` field) until a pass changes the set of experts. Every pass's options are validated before
the first pass starts. When all passes succeeded, the last model, each pass's report
(``reports/stepN_name/``), the resolved ``pipeline.yaml`` and ``report.md`` are in the staging
folder, which is then swapped in for ``export.output`` (:mod:`moecompress.api.output`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from moecompress.api.job import JobResult, Progress, execute, labelled
from moecompress.errors import MoeCompressError
from moecompress.model.families import OUTPUT_COPY_FILES
from moecompress.parallel import current as current_ranks
from moecompress.pipeline.schema import CALIBRATION_FIELDS, CHANGES_EXPERTS, PASSES, Pipeline, PipelineError

# Files of a pass's output that are its report, copied to reports/stepN_name/ (not model files).
REPORT_SUFFIXES = (".md", ".png", ".json")
MODEL_JSON = ("config.json", "model.safetensors.index.json", *OUTPUT_COPY_FILES)


def step_options(p: Pipeline, index: int, stats_dir: Path | None):
    """The options dataclass of pass ``index``: the pipeline's calibration, its own fields, the statistics."""
    step = p.passes[index]
    schema = PASSES[step.name]
    names = {f.name for f in dataclasses.fields(schema.options)}
    values = {CALIBRATION_FIELDS[k]: v for k, v in p.calibration.items() if CALIBRATION_FIELDS[k] in names}
    values.update(step.fields)
    if step.name == "heal":
        values.setdefault("teacher", p.model)  # the original model: what the passes before compressed
    if stats_dir is not None and "stats" in names and "stats" not in step.fields:
        values["stats"] = str(stats_dir)
    if step.name == "quantize" and p.export["format"] == "compressed-tensors":
        values.setdefault("format", "compressed-tensors")
    try:
        return schema.options(**values)
    except TypeError as exc:  # a required field missing (merge num_experts ...)
        raise PipelineError(f"{p.path}:{step.line}: pass {step.name}: {exc}") from None


def _validate_options(p: Pipeline) -> None:
    """Every pass's options, before any work (model-dependent checks run when the pass starts)."""
    for i, step in enumerate(p.passes):
        options = step_options(p, i, None)
        try:
            if hasattr(options, "job"):
                options.job(p.model)  # builds (and so checks) the pass's configs
            options.validate() if hasattr(options, "validate") else None
        except PipelineError:
            raise
        except MoeCompressError as exc:
            raise PipelineError(f"{p.path}:{step.line}: pass {step.name}: {exc}") from None


def _validate_job(p: Pipeline, index: int, job) -> None:
    try:
        job.validate()
    except MoeCompressError as exc:
        raise PipelineError(f"{p.path}:{p.passes[index].line}: pass {p.passes[index].name}: {exc}") from None


# Passes whose checks of the model read only what no earlier pass changes (layer shapes, MoE layers,
# top-k, the tokenizer): they are checked on the original model before the first pass runs.
SHAPE_CHECKED = ("quantize", "stats", "compress_experts")


def _prevalidate_later_passes(p: Pipeline, model: Path) -> None:
    """Check passes 2.. against the original model before any work, where that check means the same as
    on the model the pass will read: always for :data:`SHAPE_CHECKED` passes (a statistics folder
    named for a model an earlier prune or merge changed is left to the pass's own start), and for
    prune and merge while no earlier pass changed the experts. Each pass is checked again when it starts."""
    experts_changed = False
    for i, step in enumerate(p.passes):
        if i > 0 and (step.name in SHAPE_CHECKED or not experts_changed):
            options = step_options(p, i, None)
            if experts_changed and getattr(options, "stats", None) is not None:
                options = dataclasses.replace(options, stats=None)
            _validate_job(p, i, PASSES[step.name].make_job(model, options))
        experts_changed = experts_changed or step.name in CHANGES_EXPERTS


def distributed_blocker(p: Pipeline) -> str | None:
    """Why ``p`` cannot run under torchrun (None: it can).

    Under torchrun every rank runs the pipeline; only the quantizer shares its work (each rank solves
    its share of the experts), and only rank 0 writes models. So every pass after which a model is
    read again must not be one: the pipeline may hold ``stats`` passes (each rank collects the same
    statistics into its own scratch folder), ``quantize``, and a ``prune`` or ``merge`` that runs in
    the sweep of the quantize pass after it (``fusion_blocker``)."""
    i = 0
    while i < len(p.passes):
        name = p.passes[i].name
        if name in CHANGES_EXPERTS:
            if i + 1 >= len(p.passes) or p.passes[i + 1].name != "quantize":
                return f"pass {i + 1} ({name}) is not followed by quantize, so it would write a model of its own"
            blocker = fusion_blocker(step_options(p, i, None), step_options(p, i + 1, None))
            if blocker is not None:
                return f"pass {i + 1} ({name}) cannot run in the quantizer's sweep: {blocker}"
            i += 2
            continue
        if name not in ("stats", "quantize"):
            return f"pass {i + 1} ({name}) runs in one process"
        i += 1
    return None


@dataclass
class StepRecord:
    name: str
    output_bytes: int | None  # None: not written on its own (fused with the next pass)
    seconds: float


CALIBRATION_MATCH = ("calib", "nsamples", "seqlen", "seed", "batch_size")


def fusion_blocker(rewrite_options, quantize_options) -> str | None:
    """Why a prune or merge cannot run in the sweep of the quantize pass after it (None: it can).

    Fused, each decoder layer is rewritten, observed again and quantized in one sweep, and only the
    quantized model is written: one read and one write of the model fewer, and no intermediate
    checkpoint on disk. Not fused: an evaluation of the rewrite's own output (it needs that output),
    an exact-router merge (its expert -> group map is a native config of its own), a bit budget (the
    allocation profiles the rewritten model in a sweep of its own), and a rewrite that reads
    activations (refit, fitted routers, RegMean) on another calibration set than the quantizer's."""
    if rewrite_options.eval_data is not None:
        return "it evaluates its own output"
    if getattr(rewrite_options, "router", None) == "exact":
        return "an exact-router merge writes its own expert -> group map"
    if quantize_options.mixed_precision_config() is not None:
        return "the bit allocation profiles the rewritten model first"
    needs = rewrite_options.refit or (hasattr(rewrite_options, "merge_config") and rewrite_options.merge_config().needs_activations)
    if needs and any(getattr(rewrite_options, k) != getattr(quantize_options, k) for k in CALIBRATION_MATCH):
        return "it reads activations of another calibration set or batch size than the quantizer"
    return None


class PipelineJob:
    command = "run"

    def __init__(self, p: Pipeline, echo=print, progress_factory=None, fuse: bool = True):
        from moecompress.model.hub import resolve_model

        self.p = p
        self.fuse = fuse  # prune / merge -> quantize in one sweep where fusion_blocker allows it
        self.model = resolve_model(p.model)  # a folder, or a Hub id fetched into the cache
        self.echo = echo
        self.progress_factory = progress_factory

    def inputs(self):
        p = self.p
        calib = p.calibration.get("source")
        paths = [("model", self.model), ("pipeline file", p.path)]
        if calib and Path(calib).exists():
            paths.append(("calibration source", calib))
        paths += [("evaluation data", d) for d in (p.eval or {}).get("data", [])]
        paths += [(f"pass {s.name} statistics folder", s.fields["stats"]) for s in p.passes if s.fields.get("stats")]
        paths += [(f"pass {s.name} teacher", s.fields["teacher"]) for s in p.passes if s.fields.get("teacher")]
        return paths

    def validate(self) -> None:
        from moecompress.model.loading import read_config

        from moecompress.evaluate import check_eval_options

        read_config(self.model)
        if self.p.eval:
            try:
                check_eval_options(self.p.eval.get("seqlen", 256), self.p.eval.get("max_tokens"), 8)
            except MoeCompressError as exc:
                raise PipelineError(f"{self.p.path}: eval: {exc}") from None
        for data in (self.p.eval or {}).get("data", []):
            if not Path(data).is_file():
                raise PipelineError(f"{self.p.path}: eval data {data} is not a file")
        _validate_options(self.p)
        _validate_job(self.p, 0, PASSES[self.p.passes[0].name].make_job(self.model, step_options(self.p, 0, None)))
        _prevalidate_later_passes(self.p, self.model)
        if current_ranks().distributed:
            blocker = distributed_blocker(self.p) if self.fuse else "pass fusion is off"
            if blocker is not None:
                raise PipelineError(f"{self.p.path}: cannot run under torchrun: {blocker}; launch it without torchrun")

    def _job(self, i: int, current: Path, stats_dir: Path | None):
        """Pass ``i``'s job reading ``current`` (checked again when it reads an earlier pass's output)."""
        p = self.p
        job = PASSES[p.passes[i].name].make_job(current, step_options(p, i, stats_dir))
        source = getattr(job, "source", None)
        if source is not None and stats_dir is not None and source.stats_dir == str(stats_dir):
            job.source = dataclasses.replace(source, stats_label=f"the statistics pass of this pipeline")
        if i > 0:
            job.model_label = f"the output of the pass before ({p.passes[i - 1].name})" if current != self.model else p.model
            _validate_job(p, i, job)
        return job

    def _fused(self, i: int, stats_dir: Path | None) -> bool:
        """Whether pass ``i`` (a prune or merge) runs in the sweep of the quantize pass after it."""
        p = self.p
        if not self.fuse or p.passes[i].name not in CHANGES_EXPERTS or i + 1 >= len(p.passes) or p.passes[i + 1].name != "quantize":
            return False
        blocker = fusion_blocker(step_options(p, i, stats_dir), step_options(p, i + 1, None))
        if blocker is not None:
            self.echo(f"[{i + 1}/{len(p.passes)}] {p.passes[i].name} writes its own checkpoint: {blocker}")
        return blocker is None

    def _profile_in_stats_sweep(self, i: int):
        """The mixed-precision profile of the quantize pass right after the statistics pass ``i``, to
        measure in the statistics sweep (None when there is none to share): that pass then reads the
        profile from the statistics folder instead of sweeping the model once more. It must profile on
        the statistics' calibration set and batch size, and take the statistics (no ``stats`` of its own)."""
        from moecompress.api.stats import ProfileRequest

        p = self.p
        if not self.fuse or i + 1 >= len(p.passes) or p.passes[i + 1].name != "quantize" or "stats" in p.passes[i + 1].fields:
            return None
        stats_options, quantize_options = step_options(p, i, None), step_options(p, i + 1, None)
        mp = quantize_options.mixed_precision_config()
        if mp is None or any(getattr(stats_options, k) != getattr(quantize_options, k) for k in CALIBRATION_MATCH):
            return None
        self.echo(f"[{i + 1}/{len(p.passes)}] stats also measures the bit-allocation profile of pass {i + 2} (quantize)")
        return ProfileRequest(quantize_options.quantize_config(), tuple(mp.bit_choices), mp.profile_method)

    def _run_fused(self, i: int, current: Path, stats_dir: Path | None, work: Path, reports: Path,
                   progress: Progress | None, records: list[StepRecord]) -> Path:
        """Passes ``i`` (prune or merge) and ``i + 1`` (quantize) in one sweep; the quantized model's folder."""
        from moecompress.evaluate import folder_bytes

        p, total = self.p, len(self.p.passes)
        rewrite_job = self._job(i, current, stats_dir)
        quantize_job = self._job(i + 1, current, None)  # checked on the model before the rewrite: shapes only
        quantize_job.model_label = f"the output of the pass before ({p.passes[i].name}, in the same sweep)"
        name = p.passes[i].name
        self.echo(f"[{i + 1}-{i + 2}/{total}] {name} + quantize in one sweep")
        t0 = time.perf_counter()
        quantize_job.rewrite = rewrite_job.plan(labelled(progress, f"[{i + 1}/{total}] {name} statistics"))
        plan_seconds = time.perf_counter() - t0
        target = work / f"step{i + 2}_quantize"
        target.mkdir()
        t0 = time.perf_counter()
        quantize_job.write(target, labelled(progress, f"[{i + 1}-{i + 2}/{total}] {name} + quantize"))
        sweep_seconds = time.perf_counter() - t0
        (reports / f"step{i + 1}_{name}").mkdir(parents=True)
        quantize_job.rewrite.report(reports / f"step{i + 1}_{name}", fused_with="quantize")
        records.append(StepRecord(name, None, round(plan_seconds, 2)))
        records.append(StepRecord("quantize", folder_bytes(target), round(sweep_seconds, 2)))
        _copy_report(target, reports / target.name)
        return target

    def write(self, stage: Path, progress: Progress | None) -> JobResult:
        from moecompress.evaluate import evaluate, folder_bytes

        p = self.p
        work = stage / "work"
        work.mkdir()
        current, stats_dir = self.model, None
        records: list[StepRecord] = []
        reports = stage / "reports"
        i = 0
        while i < len(p.passes):
            step = p.passes[i]
            if self._fused(i, stats_dir):
                current = self._run_fused(i, current, stats_dir, work, reports, progress, records)
                stats_dir = None
                i += 2
                continue
            target = work / f"step{i + 1}_{step.name}"
            target.mkdir()
            job = self._job(i, current, stats_dir)
            if step.name == "stats":
                job.profile = self._profile_in_stats_sweep(i)
            self.echo(f"[{i + 1}/{len(p.passes)}] {step.name}")
            t0 = time.perf_counter()
            job.write(target, labelled(progress, f"[{i + 1}/{len(p.passes)}] {step.name}"))
            records.append(StepRecord(step.name, folder_bytes(target), round(time.perf_counter() - t0, 2)))
            _copy_report(target, reports / target.name)
            i += 1
            if step.name == "stats":
                stats_dir = target
                continue
            if step.name in CHANGES_EXPERTS:
                stats_dir = None
            current = target
        for item in current.iterdir():
            if item.name != "report.md" and not (item.suffix == ".png" and item.is_file()):
                shutil.move(str(item), stage / item.name)
        shutil.rmtree(work)
        evals = []
        for data in (p.eval or {}).get("data", []) if current_ranks().is_writer else []:  # only rank 0 holds the model
            kw = {"seqlen": p.eval.get("seqlen", 256), "max_tokens": p.eval.get("max_tokens")}
            before = evaluate(self.model, data, **kw)
            after = evaluate(stage, data, **kw)
            evals.append({"data": str(data), "ppl_before": before.ppl, "ppl_after": after.ppl, "tokens": after.tokens})
        summary = {
            "command": "run",
            "model": p.model,
            "output": p.export["output"],
            "format": p.export["format"],
            "input_bytes": folder_bytes(self.model),
            "output_bytes": folder_bytes(stage),
            "passes": [{"name": r.name, "output_bytes": r.output_bytes} for r in records],
            "eval": evals,
        }
        (stage / "pipeline.yaml").write_text(yaml.safe_dump(p.resolved(), sort_keys=False))
        write_pipeline_report(stage / "report.md", p, summary)
        result = JobResult(None, summary)
        result.run["pass_seconds"] = {f"{i + 1}_{r.name}": r.seconds for i, r in enumerate(records)}
        return result


def _copy_report(src: Path, dest: Path) -> None:
    """Keep a pass's own report (and its figures) beside the model."""
    files = [f for f in sorted(src.glob("*")) if f.is_file() and f.suffix in REPORT_SUFFIXES and f.name not in MODEL_JSON]
    if files:
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / f.name)


def write_pipeline_report(path: Path, p: Pipeline, summary: dict) -> None:
    """OUT/report.md: passes, sizes, perplexity before/after (no timings: the file is deterministic)."""
    lines = ["# moecompress pipeline report", "", f"- **pipeline**: `{p.path.name}` (resolved copy: `pipeline.yaml`)",
             f"- **model**: `{p.model}`", f"- **format**: {p.export['format']}",
             f"- **size**: {summary['input_bytes'] / 2**20:.2f} MiB -> {summary['output_bytes'] / 2**20:.2f} MiB", "",
             "## Passes", "", "| # | pass | fields | output size (MiB) | report |", "|---|---|---|---|---|"]
    for i, (step, rec) in enumerate(zip(p.passes, summary["passes"]), 1):
        folder = Path(path).parent / "reports" / f"step{i}_{step.name}"
        report = f"`reports/step{i}_{step.name}/report.md`" if (folder / "report.md").is_file() else "-"
        size = "- (in the next pass's sweep)" if rec["output_bytes"] is None else f"{rec['output_bytes'] / 2**20:.2f}"
        lines.append(f"| {i} | {step.name} | `{json.dumps(step.fields, sort_keys=True)}` | {size} | {report} |")
    if summary["eval"]:
        lines += ["", "## Perplexity", "", "| data | before | after | change |", "|---|---|---|---|"]
        for e in summary["eval"]:
            lines.append(f"| `{e['data']}` | {e['ppl_before']:.4f} | {e['ppl_after']:.4f} | {100 * (e['ppl_after'] / e['ppl_before'] - 1):+.2f}% |")
    path.write_text("\n".join(lines) + "\n")


def run_pipeline(p: Pipeline, dry_run: bool = False, echo=print, progress: Progress | None = None) -> JobResult:
    """Run every pass of ``p`` and export the result under the output contract."""
    job = PipelineJob(p, echo)
    if dry_run:
        result = execute(job, p.export["output"], p.export["overwrite"], dry_run=True)
        for i, step in enumerate(p.passes, 1):
            echo(f"{i}. {step.name} {json.dumps(step.fields)}")
        echo(f"export -> {p.export['output']} ({p.export['format']})")
        result.summary["passes"] = [s.name for s in p.passes]
        return result
    return execute(job, p.export["output"], p.export["overwrite"], progress=progress)
