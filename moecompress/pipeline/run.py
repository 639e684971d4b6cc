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


@dataclass
class StepRecord:
    name: str
    output_bytes: int
    seconds: float


class PipelineJob:
    command = "run"

    def __init__(self, p: Pipeline, echo=print, progress_factory=None):
        from moecompress.model.hub import resolve_model

        self.p = p
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

    def write(self, stage: Path, progress: Progress | None) -> JobResult:
        from moecompress.evaluate import evaluate, folder_bytes

        p = self.p
        work = stage / "work"
        work.mkdir()
        current, stats_dir = self.model, None
        records: list[StepRecord] = []
        reports = stage / "reports"
        for i, step in enumerate(p.passes):
            schema = PASSES[step.name]
            target = work / f"step{i + 1}_{step.name}"
            target.mkdir()
            job = schema.make_job(current, step_options(p, i, stats_dir))
            source = getattr(job, "source", None)
            if source is not None and stats_dir is not None and source.stats_dir == str(stats_dir):
                job.source = dataclasses.replace(source, stats_label=f"the statistics pass of this pipeline")
            if i > 0:
                job.model_label = f"the output of the pass before ({p.passes[i - 1].name})" if current != self.model else p.model
            if i > 0:
                _validate_job(p, i, job)
            self.echo(f"[{i + 1}/{len(p.passes)}] {step.name}")
            t0 = time.perf_counter()
            job.write(target, labelled(progress, f"[{i + 1}/{len(p.passes)}] {step.name}"))
            records.append(StepRecord(step.name, folder_bytes(target), round(time.perf_counter() - t0, 2)))
            _copy_report(target, reports / target.name)
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
        for data in (p.eval or {}).get("data", []):
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
        lines.append(f"| {i} | {step.name} | `{json.dumps(step.fields, sort_keys=True)}` | {rec['output_bytes'] / 2**20:.2f} | {report} |")
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
