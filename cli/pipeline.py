"""Pipelines: a YAML file naming a model, calibration, an ordered list of passes, an export and an eval.

```yaml
model: path/to/model
calibration: {source: mixed, nsamples: 128, seqlen: 256, seed: 0}
passes:
  - stats: {}
  - prune: {method: reap, num_experts: 12}
  - quantize: {bits_budget: 2.5, bit_choices: "2,3,4,8"}
export: {format: native, output: out/model, overwrite: false}
eval: {data: [held_out.txt], seqlen: 256, max_tokens: 40000}
```

Every pass is a CLI command and its fields are that command's options with underscores
(``bits_budget`` for ``--bits-budget``): the schema is read from the command's own signature, so the
YAML and the CLI cannot drift apart, and each single command is a one-pass pipeline (``--save-pipeline``
writes it). The whole file is validated before any work starts: unknown keys, wrong types, missing
model, duplicate keys and impossible orders are reported with file, line and the allowed values.

Execution: passes run in order, each reading the previous pass's output checkpoint from a staging
folder beside the export path; statistics from a ``stats`` pass are handed to later passes (their
``stats`` option) until a pass changes the set of experts. Each pass is itself a layer-by-layer sweep.
The finished model is renamed to ``export.output`` only when every pass succeeded.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import typer
import yaml

from moecompress.errors import MoeCompressError

TOP_KEYS = ("model", "calibration", "passes", "export", "eval")
CALIBRATION_KEYS = {"source": str, "nsamples": int, "seqlen": int, "seed": int}
EXPORT_KEYS = {"format": str, "output": str, "overwrite": bool}
EVAL_KEYS = {"data": list, "seqlen": int, "max_tokens": int}
EXPORT_FORMATS = ("native", "compressed-tensors", "hf")
# Options that the pipeline itself supplies to every pass.
RUNNER_OWNED = ("model", "out", "overwrite", "as_json", "save_pipeline")
CALIBRATION_FIELDS = {"source": "calib", "nsamples": "nsamples", "seqlen": "seqlen", "seed": "seed"}
# Passes whose output has a different set of experts than their input: statistics gathered before
# them no longer describe the model, and nothing may prune a quantized (packed) model.
CHANGES_EXPERTS = ("prune", "merge")
PACKS_WEIGHTS = ("quantize",)


class PipelineError(MoeCompressError):
    pass


# --------------------------------------------------------------------------------------------------
# The pass registry: CLI commands -> YAML pass names and field schemas
# --------------------------------------------------------------------------------------------------


@dataclass
class PassSchema:
    name: str  # YAML name (underscores)
    command: str  # CLI name
    func: typing.Callable
    fields: dict[str, tuple[type, object]]  # field -> (type, default); default ... = required
    produces_model: bool


def _option_default(param: inspect.Parameter):
    d = param.default
    if isinstance(d, (typer.models.OptionInfo, typer.models.ArgumentInfo)):
        return d.default
    return d


def _base_type(annotation) -> type:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if args else str
    if annotation is Path:
        return str
    return annotation if isinstance(annotation, type) else str


def pass_schemas(app: typer.Typer) -> dict[str, PassSchema]:
    schemas = {}
    for info in app.registered_commands:
        name = info.name or info.callback.__name__
        if name in ("run", "inspect", "eval", "demo", "lint"):
            continue
        func = inspect.unwrap(info.callback)
        hints = typing.get_type_hints(func)
        fields = {}
        for pname, param in inspect.signature(func).parameters.items():
            if pname in RUNNER_OWNED:
                continue
            fields[pname] = (_base_type(hints.get(pname, str)), _option_default(param))
        produces = "out" in inspect.signature(func).parameters
        schemas[name.replace("-", "_")] = PassSchema(name.replace("-", "_"), name, info.callback, fields, produces)
    return schemas


# --------------------------------------------------------------------------------------------------
# Loading and validation (with line numbers)
# --------------------------------------------------------------------------------------------------


@dataclass
class PassStep:
    name: str
    fields: dict
    line: int


@dataclass
class Pipeline:
    path: Path
    model: str
    calibration: dict
    passes: list[PassStep]
    export: dict
    eval: dict | None
    raw: dict = field(default_factory=dict)

    def resolved(self) -> dict:
        return {
            "model": self.model,
            "calibration": self.calibration,
            "passes": [{p.name: p.fields} for p in self.passes],
            "export": self.export,
            **({"eval": self.eval} if self.eval else {}),
        }


def _err(path: Path, node, message: str) -> PipelineError:
    line = node.start_mark.line + 1 if node is not None else 1
    return PipelineError(f"{path}:{line}: {message}")


def _scalar(path: Path, node, expected: type, where: str):
    if expected is list:
        if isinstance(node, yaml.SequenceNode):
            return [_scalar(path, n, str, where) for n in node.value]
        if isinstance(node, yaml.ScalarNode):
            return [yaml.safe_load(node.value)] if node.value else []
        raise _err(path, node, f"{where} must be a list")
    if not isinstance(node, yaml.ScalarNode):
        if isinstance(node, yaml.SequenceNode) and expected is str:
            return ",".join(str(_scalar(path, n, str, where)) for n in node.value)
        raise _err(path, node, f"{where} must be a {expected.__name__}")
    value = yaml.safe_load(yaml.serialize(node)) if node.value != "" else None
    if value is None:
        return None
    if expected is bool and not isinstance(value, bool):
        raise _err(path, node, f"{where} must be true or false, got {node.value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _err(path, node, f"{where} must be an integer, got {node.value!r}")
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(path, node, f"{where} must be a number, got {node.value!r}")
        return float(value)
    if expected is str:
        return str(value)
    return value


def _mapping(path: Path, node, where: str) -> list[tuple[yaml.Node, yaml.Node]]:
    if isinstance(node, yaml.ScalarNode) and node.value in ("", "null", "~"):
        return []
    if not isinstance(node, yaml.MappingNode):
        raise _err(path, node, f"{where} must be a mapping")
    seen = {}
    for k, _v in node.value:
        if k.value in seen:
            raise _err(path, k, f"{where}: key {k.value!r} given twice (first on line {seen[k.value] + 1})")
        seen[k.value] = k.start_mark.line
    return node.value


def _typed_section(path: Path, node, schema: dict[str, type], where: str) -> dict:
    out = {}
    for k, v in _mapping(path, node, where):
        if k.value not in schema:
            raise _err(path, k, f"unknown key {k.value!r} in {where}; allowed: {', '.join(schema)}")
        out[k.value] = _scalar(path, v, schema[k.value], f"{where}.{k.value}")
    return out


def load_pipeline(path: str | Path, schemas: dict[str, PassSchema]) -> Pipeline:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline file {path} does not exist")
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise PipelineError(f"{path}:{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if root is None:
        raise PipelineError(f"{path}: the pipeline file is empty")
    top = {}
    for k, v in _mapping(path, root, "the pipeline"):
        if k.value not in TOP_KEYS:
            raise _err(path, k, f"unknown key {k.value!r}; allowed: {', '.join(TOP_KEYS)}")
        top[k.value] = (k, v)
    if "model" not in top:
        raise PipelineError(f"{path}:1: missing 'model' (the model folder to compress)")
    model = _scalar(path, top["model"][1], str, "model")
    if not model:
        raise _err(path, top["model"][1], "'model' is empty")
    calibration = _typed_section(path, top["calibration"][1], CALIBRATION_KEYS, "calibration") if "calibration" in top else {}
    if "export" not in top:
        raise PipelineError(f"{path}:1: missing 'export' (with 'output': where to write the model)")
    export_node = top["export"][1]
    if isinstance(export_node, yaml.SequenceNode):
        raise _err(path, export_node, "only one export is allowed; 'export' must be a single mapping")
    export = _typed_section(path, export_node, EXPORT_KEYS, "export")
    if "output" not in export:
        raise _err(path, export_node, "export needs 'output': the folder to write")
    export.setdefault("format", "native")
    export.setdefault("overwrite", False)
    if export["format"] not in EXPORT_FORMATS:
        raise _err(path, export_node, f"export.format {export['format']!r} unknown; allowed: {', '.join(EXPORT_FORMATS)}")
    eval_cfg = _typed_section(path, top["eval"][1], EVAL_KEYS, "eval") if "eval" in top else None
    passes = _load_passes(path, top.get("passes", (None, None))[1], schemas)
    pipeline = Pipeline(path, model, calibration, passes, export, eval_cfg)
    _check_order(pipeline, top.get("passes", (None, None))[1])
    return pipeline


def _load_passes(path: Path, node, schemas: dict[str, PassSchema]) -> list[PassStep]:
    if node is None:
        raise PipelineError(f"{path}:1: missing 'passes' (an ordered list such as '- quantize: {{bits: 4}}')")
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise _err(path, node, "'passes' must be a non-empty list of '- pass_name: {fields}' items")
    steps = []
    for item in node.value:
        entries = _mapping(path, item, "a pass")
        if len(entries) != 1:
            raise _err(path, item, "each pass item must have exactly one pass name, e.g. '- quantize: {bits: 4}'")
        k, v = entries[0]
        if k.value not in schemas:
            raise _err(path, k, f"unknown pass {k.value!r}; allowed: {', '.join(sorted(schemas))}")
        schema = schemas[k.value]
        fields = {}
        for fk, fv in _mapping(path, v, f"pass {k.value}"):
            if fk.value in RUNNER_OWNED or fk.value not in schema.fields:
                raise _err(path, fk, f"unknown field {fk.value!r} for pass {k.value}; allowed: {', '.join(schema.fields)}")
            fields[fk.value] = _scalar(path, fv, schema.fields[fk.value][0], f"{k.value}.{fk.value}")
        steps.append(PassStep(k.value, fields, k.start_mark.line + 1))
    return steps


def _check_order(p: Pipeline, node) -> None:
    packed_at = None
    for step in p.passes:
        if step.name in PACKS_WEIGHTS and packed_at is None:
            packed_at = step
        elif packed_at is not None and step.name in CHANGES_EXPERTS:
            raise PipelineError(
                f"{p.path}:{step.line}: pass {step.name} cannot run after {packed_at.name} (line {packed_at.line}): "
                "the experts are packed by then; put pruning and merging before quantization"
            )
        elif packed_at is not None and step.name in PACKS_WEIGHTS:
            raise PipelineError(f"{p.path}:{step.line}: quantize appears twice (first on line {packed_at.line})")
    if p.export["format"] == "compressed-tensors" and packed_at is None:
        raise PipelineError(f"{p.path}: export.format compressed-tensors needs a quantize pass")
    _check_expert_groups(p)
    if not any(PASSES_PRODUCING_MODELS.get(s.name, True) for s in p.passes):
        raise PipelineError(f"{p.path}: no pass writes a model to export")


# Passes that cannot read experts behind an expert -> group map (merge --router exact).
READS_UNGROUPED_ONLY = ("prune", "merge", "compress_experts")


def _check_expert_groups(p: Pipeline) -> None:
    """An exact-router merge writes a native checkpoint (E' experts + map): only quantize may follow,
    and it exports natively."""
    grouped = next((s for s in p.passes if s.name == "merge" and s.fields.get("router") == "exact"), None)
    if grouped is None:
        return
    later = next((s for s in p.passes if s.line > grouped.line and s.name in READS_UNGROUPED_ONLY), None)
    if later is not None:
        raise PipelineError(
            f"{p.path}:{later.line}: pass {later.name} cannot read the expert -> group map that merge (line {grouped.line}) "
            "writes with router: exact; use router: standard or exact-slots, or drop this pass"
        )
    if p.export["format"] != "native":
        raise PipelineError(
            f"{p.path}:{grouped.line}: merge with router: exact writes a native checkpoint (an expert -> group map), which "
            f"export.format {p.export['format']} cannot hold; use format: native, or router: standard or exact-slots"
        )


PASSES_PRODUCING_MODELS = {"stats": False}


# --------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    name: str
    seconds: float
    output: str
    output_bytes: int


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0


def _call_pass(schema: PassSchema, fields: dict, model: str, out: Path | None, extra: dict) -> None:
    func = inspect.unwrap(schema.func)
    params = inspect.signature(func).parameters
    kwargs = {}
    for name, param in params.items():
        if name == "model":
            kwargs[name] = Path(model)
        elif name == "out":
            kwargs[name] = out
        elif name == "overwrite":
            kwargs[name] = True
        elif name in ("as_json", "save_pipeline"):
            kwargs[name] = False if name == "as_json" else None
        elif name in fields:
            kwargs[name] = fields[name]
        elif name in extra:
            kwargs[name] = extra[name]
        else:
            default = _option_default(param)
            if default is ...:
                raise PipelineError(f"pass {schema.name} needs field {name!r}")
            kwargs[name] = default
    for name, (typ, _d) in schema.fields.items():
        if typ is str and isinstance(kwargs.get(name), str) and name in ("stats",) and kwargs[name]:
            kwargs[name] = Path(kwargs[name])
    func(**kwargs)


class _quiet_console:
    """Silence a pass command's own console lines (paths inside the staging folder mean nothing
    to the user); the pipeline prints its own progress and copies each pass's report."""

    def __enter__(self):
        from moecompress.cli.common import console

        self.console, self.was = console, console.quiet
        console.quiet = True

    def __exit__(self, *exc):
        self.console.quiet = self.was


def run_pipeline(p: Pipeline, schemas: dict[str, PassSchema], dry_run: bool = False, echo=print) -> dict:
    """Run every pass; returns a summary (also written to OUT/report.md)."""
    from moecompress.evaluate import evaluate
    from moecompress.export.writer import StagingFolder, prepare_output
    from moecompress.model.loading import read_config

    read_config(p.model)
    out = prepare_output(p.export["output"], p.export["overwrite"])
    calib_extra = {CALIBRATION_FIELDS[k]: v for k, v in p.calibration.items()}
    if p.export["format"] == "compressed-tensors":
        for step in p.passes:
            if step.name == "quantize":
                step.fields.setdefault("format", "compressed-tensors")
    if dry_run:
        for i, step in enumerate(p.passes, 1):
            echo(f"{i}. {step.name} {json.dumps(step.fields)}")
        echo(f"export -> {out} ({p.export['format']})")
        return {"dry_run": True, "passes": [s.name for s in p.passes]}
    records: list[StepRecord] = []
    start = time.time()
    with StagingFolder(out, p.export["overwrite"]) as stage:
        work = stage.path / "work"
        work.mkdir()
        current, stats_dir = p.model, None
        for i, step in enumerate(p.passes, 1):
            schema = schemas[step.name]
            target = work / f"step{i}_{step.name}"
            extra = dict(calib_extra)
            if stats_dir is not None and "stats" in schema.fields and "stats" not in step.fields:
                extra["stats"] = Path(stats_dir)
            echo(f"[{i}/{len(p.passes)}] {step.name}")
            t0 = time.time()
            with _quiet_console():
                _call_pass(schema, step.fields, current, target, extra)
            records.append(StepRecord(step.name, time.time() - t0, str(target), _folder_bytes(target)))
            if step.name == "stats":
                stats_dir = target
                continue
            if step.name in CHANGES_EXPERTS:
                stats_dir = None
            current = str(target)
        final = Path(current)
        model_dir = stage.path / "model"
        shutil.move(str(final), model_dir)
        for r in records:  # keep each pass's own report (and its figures) beside the model
            src = Path(r.output)
            files = [f for f in src.glob("*") if f.suffix in (".md", ".png", ".json") and f.name not in ("config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json", "tokenizer.json", "special_tokens_map.json")]
            if files:
                dest = stage.path / "reports" / src.name
                dest.mkdir(parents=True, exist_ok=True)
                for f in files:
                    shutil.copy2(f, dest / f.name)
        for item in model_dir.iterdir():
            shutil.move(str(item), stage.path / item.name)
        model_dir.rmdir()
        shutil.rmtree(work)
        evals = []
        if p.eval:
            for data in p.eval.get("data", []):
                kw = {"seqlen": p.eval.get("seqlen", 256), "max_tokens": p.eval.get("max_tokens")}
                before = evaluate(p.model, data, **kw)
                after = evaluate(stage.path, data, **kw)
                evals.append({"data": str(data), "ppl_before": before.ppl, "ppl_after": after.ppl, "tokens": after.tokens})
        summary = {
            "model": p.model,
            "output": str(out),
            "seconds": round(time.time() - start, 2),
            "input_bytes": _folder_bytes(Path(p.model)),
            "output_bytes": _folder_bytes(stage.path),
            "passes": [r.__dict__ | {"output": None} for r in records],
            "eval": evals,
        }
        (stage.path / "pipeline.yaml").write_text(yaml.safe_dump(p.resolved(), sort_keys=False))
        write_pipeline_report(stage.path / "report.md", p, summary)
        stage.commit()
    return summary


def write_pipeline_report(path: Path, p: Pipeline, summary: dict) -> None:
    lines = ["# moecompress pipeline report", "", f"- **pipeline**: `{p.path}` (resolved copy: `pipeline.yaml`)", f"- **model**: `{p.model}`",
             f"- **output**: `{summary['output']}` ({p.export['format']})",
             f"- **size**: {summary['input_bytes'] / 2**20:.2f} MiB -> {summary['output_bytes'] / 2**20:.2f} MiB", f"- **time**: {summary['seconds']} s", "",
             "## Passes", "", "| # | pass | fields | seconds | output size (MiB) | report |", "|---|---|---|---|---|---|"]
    for i, (step, rec) in enumerate(zip(p.passes, summary["passes"]), 1):
        lines.append(f"| {i} | {step.name} | `{json.dumps(step.fields)}` | {rec['seconds']:.1f} | {rec['output_bytes'] / 2**20:.2f} | `reports/step{i}_{step.name}/report.md` |")
    if summary["eval"]:
        lines += ["", "## Perplexity", "", "| data | before | after | change |", "|---|---|---|---|"]
        for e in summary["eval"]:
            lines.append(f"| `{e['data']}` | {e['ppl_before']:.4f} | {e['ppl_after']:.4f} | {100 * (e['ppl_after'] / e['ppl_before'] - 1):+.2f}% |")
    path.write_text("\n".join(lines) + "\n")


def single_pass_pipeline(command: str, params: dict, model: str, out: str, overwrite: bool, schemas: dict[str, PassSchema]) -> dict:
    """The one-pass pipeline a single command ran (for --save-pipeline)."""
    name = command.replace("-", "_")
    schema = schemas[name]
    fields = {}
    calibration = {}
    inverse = {v: k for k, v in CALIBRATION_FIELDS.items()}
    for k, v in params.items():
        if k in RUNNER_OWNED or k not in schema.fields or v == schema.fields[k][1]:
            continue
        if k in inverse:
            calibration[inverse[k]] = v
            continue
        fields[k] = str(v) if isinstance(v, Path) else v
    doc = {"model": str(model)}
    if calibration:
        doc["calibration"] = calibration
    doc["passes"] = [{name: fields}]
    doc["export"] = {"format": "native", "output": str(out), "overwrite": bool(overwrite)}
    return doc
