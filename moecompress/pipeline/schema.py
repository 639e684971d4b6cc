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

Every pass is a library job (:mod:`moecompress.api`) and its fields are the fields of that job's
options dataclass -- the command line's options with underscores (``bits_budget`` for
``--bits-budget``). The CLI builds the same dataclasses, so YAML, CLI and Python cannot drift apart
(a test compares the CLI signatures with the dataclasses). The whole file is validated before any
work starts: unknown keys, wrong types, bad values, missing model, duplicate keys and impossible
orders are reported with file, line and the allowed values.

Execution is :mod:`moecompress.pipeline.run`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from moecompress.api.compress_experts import CompressExpertsJob, CompressExpertsOptions
from moecompress.api.heal import HealJob, HealOptions
from moecompress.api.merge import MergeOptions
from moecompress.api.prune import PruneOptions
from moecompress.api.quantize import QuantizeJob, QuantizeOptions
from moecompress.api.stats import StatsJob, StatsOptions
from moecompress.errors import MoeCompressError

TOP_KEYS = ("model", "calibration", "passes", "export", "eval")
CALIBRATION_KEYS = {"source": str, "nsamples": int, "seqlen": int, "seed": int}
EXPORT_KEYS = {"format": str, "output": str, "overwrite": bool}
EVAL_KEYS = {"data": list, "seqlen": int, "max_tokens": int}
EXPORT_FORMATS = ("native", "compressed-tensors", "hf")
CALIBRATION_FIELDS = {"source": "calib", "nsamples": "nsamples", "seqlen": "seqlen", "seed": "seed"}
# Passes whose output has a different set of experts than their input: statistics gathered before
# them no longer describe the model, and nothing may prune a quantized (packed) model.
CHANGES_EXPERTS = ("prune", "merge")
PACKS_WEIGHTS = ("quantize",)
# Passes whose output is a native moecompress checkpoint (packed or wrapped modules), which
# export.format hf (a plain transformers checkpoint) cannot hold.
WRITES_NATIVE = ("quantize", "compress_experts")
# String fields that hold a comma-separated list: YAML may give them as a list ([2, 3, 4]). Any other
# string field given as a list or mapping is refused.
COMMA_LIST_FIELDS = ("bit_choices", "train")
# Section keys whose null means "not given" (their default is None); any other null is refused.
NULLABLE_KEYS = {"eval": ("max_tokens",)}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}


class PipelineError(MoeCompressError):
    pass


# --------------------------------------------------------------------------------------------------
# The pass registry: YAML pass name -> options dataclass and job
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassSchema:
    name: str  # YAML name (underscores)
    command: str  # CLI name
    options: type  # the options dataclass
    make_job: Callable  # (model folder, options) -> a Job (moecompress.api.job)
    produces_model: bool = True

    @property
    def fields(self) -> dict[str, tuple[type, object]]:
        """field -> (YAML scalar type, default)."""
        hints = typing.get_type_hints(self.options)
        return {f.name: (_base_type(hints[f.name]), f.default) for f in dataclasses.fields(self.options)}


def _base_type(annotation) -> type:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if args else str
    if annotation is Path:
        return str
    return annotation if isinstance(annotation, type) else str


PASSES: dict[str, PassSchema] = {
    "stats": PassSchema("stats", "stats", StatsOptions, StatsJob, produces_model=False),
    "quantize": PassSchema("quantize", "quantize", QuantizeOptions, QuantizeJob),
    "prune": PassSchema("prune", "prune", PruneOptions, lambda model, o: o.job(model)),
    "merge": PassSchema("merge", "merge", MergeOptions, lambda model, o: o.job(model)),
    "compress_experts": PassSchema("compress_experts", "compress-experts", CompressExpertsOptions, CompressExpertsJob),
    # The teacher defaults to the pipeline's model (run.step_options): heal after prune/merge/compress.
    "heal": PassSchema("heal", "heal", HealOptions, lambda model, o: HealJob(model, o)),
}


def pass_schemas(_app=None) -> dict[str, PassSchema]:
    return dict(PASSES)


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


def _kind(node) -> str:
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping" if isinstance(node, yaml.MappingNode) else "a scalar"


def _scalar(path: Path, node, expected: type, where: str, comma_list: bool = False):
    """The value of ``node`` as ``expected``; None for null. ``comma_list``: a string field holding a
    comma-separated list, which may also be given as a YAML list of scalars."""
    if expected is list:
        if isinstance(node, yaml.SequenceNode):
            return [_scalar(path, n, str, f"{where} item") for n in node.value]
        if isinstance(node, yaml.ScalarNode):
            value = yaml.safe_load(yaml.serialize(node)) if node.value != "" else None
            return [] if value is None else [str(value)]
        raise _err(path, node, f"{where} must be a list, got {_kind(node)}")
    if not isinstance(node, yaml.ScalarNode):
        if isinstance(node, yaml.SequenceNode) and expected is str and comma_list:
            return ",".join(str(_scalar(path, n, str, f"{where} item")) for n in node.value)
        name = _TYPE_NAMES.get(expected, f"a {expected.__name__}")
        hint = " (a comma-separated string or a list)" if comma_list else ""
        raise _err(path, node, f"{where} must be {name}{hint}, got {_kind(node)}")
    value = yaml.safe_load(yaml.serialize(node)) if node.value != "" or node.style is not None else None  # '' is a string
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
        value = _scalar(path, v, schema[k.value], f"{where}.{k.value}")
        if value is None and k.value not in NULLABLE_KEYS.get(where, ()):
            raise _err(path, v, f"{where}.{k.value} must be {_TYPE_NAMES[schema[k.value]]}, got null; leave the key out for its default")
        out[k.value] = value
    return out


def load_pipeline(path: str | Path, schemas: dict[str, PassSchema]) -> Pipeline:
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"pipeline file {path} is a folder; pass the pipeline's YAML file")
    if not path.is_file():
        raise PipelineError(f"pipeline file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); save the pipeline as UTF-8 YAML") from None
    try:
        root = yaml.compose(text)
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
    if not export.get("output"):
        raise _err(path, export_node, "export needs 'output': the folder to write")
    export.setdefault("format", "native")
    export.setdefault("overwrite", False)
    if export["format"] not in EXPORT_FORMATS:
        raise _err(path, export_node, f"export.format {export['format']!r} unknown; allowed: {', '.join(EXPORT_FORMATS)}")
    eval_cfg = _typed_section(path, top["eval"][1], EVAL_KEYS, "eval") if "eval" in top else None
    if eval_cfg is not None:
        _check_eval(path, top["eval"][1], eval_cfg)
    passes = _load_passes(path, top.get("passes", (None, None))[1], schemas)
    pipeline = Pipeline(path, model, calibration, passes, export, eval_cfg)
    _check_order(pipeline, top.get("passes", (None, None))[1])
    return pipeline


def _check_eval(path: Path, node, eval_cfg: dict) -> None:
    """The eval section's values (types were checked): data to measure, a chunk length, a token limit."""
    if not eval_cfg.get("data"):
        raise _err(path, node, "eval needs 'data': a list of text files to measure perplexity on")
    seqlen = eval_cfg.get("seqlen", 256)
    if seqlen < 2:
        raise _err(path, node, f"eval.seqlen must be an integer >= 2 (tokens per chunk), got {seqlen}")
    max_tokens = eval_cfg.get("max_tokens")
    if max_tokens is not None and max_tokens < seqlen:
        raise _err(path, node, f"eval.max_tokens must hold at least one chunk of eval.seqlen ({seqlen}), got {max_tokens}")


def _load_passes(path: Path, node, schemas: dict[str, PassSchema]) -> list[PassStep]:
    if node is None:
        raise PipelineError(f"{path}:1: missing 'passes' (an ordered list such as '- quantize: {{bits: 4}}')")
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise _err(path, node, "'passes' must be a non-empty list of '- pass_name: {fields}' items")
    steps = []
    for item in node.value:
        if isinstance(item, yaml.ScalarNode) and item.value:
            raise _err(path, item, f"pass {item.value!r} needs a colon and its fields, e.g. '- {item.value}: {{}}'")
        entries = _mapping(path, item, "a pass")
        if len(entries) != 1:
            raise _err(path, item, "each pass item must have exactly one pass name, e.g. '- quantize: {bits: 4}'")
        k, v = entries[0]
        if k.value not in schemas:
            raise _err(path, k, f"unknown pass {k.value!r}; allowed: {', '.join(sorted(schemas))}")
        schema = schemas[k.value]
        fields = {}
        for fk, fv in _mapping(path, v, f"pass {k.value}"):
            if fk.value not in schema.fields:
                raise _err(path, fk, f"unknown field {fk.value!r} for pass {k.value}; allowed: {', '.join(schema.fields)}")
            kind, default = schema.fields[fk.value]
            value = _scalar(path, fv, kind, f"{k.value}.{fk.value}", comma_list=fk.value in COMMA_LIST_FIELDS)
            if value is None and default is not None:
                raise _err(path, fv, f"{k.value}.{fk.value} must be {_TYPE_NAMES.get(kind, kind.__name__)}, got null; "
                                     f"leave the field out for its default ({default!r})")
            fields[fk.value] = value
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
    native = next((s for s in p.passes if s.name in WRITES_NATIVE), None)
    if p.export["format"] == "hf" and native is not None:
        raise PipelineError(
            f"{p.path}:{native.line}: export.format hf writes a plain transformers checkpoint, but pass {native.name} writes "
            "packed or wrapped modules (a native checkpoint); use format: native"
            + (" or compressed-tensors" if native.name == "quantize" else "")
        )
    _check_expert_groups(p)
    if not any(PASSES[s.name].produces_model for s in p.passes):
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


def single_pass_pipeline(command: str, options, model: Path, out: Path, overwrite: bool) -> dict:
    """The one-pass pipeline a single command ran (``--save-pipeline``): its non-default options."""
    name = command.replace("-", "_")
    inverse = {v: k for k, v in CALIBRATION_FIELDS.items()}
    fields, calibration = {}, {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if value == f.default:
            continue
        value = str(value) if isinstance(value, Path) else value
        if f.name in inverse:
            calibration[inverse[f.name]] = value
        else:
            fields[f.name] = value
    doc: dict = {"model": str(model)}
    if calibration:
        doc["calibration"] = calibration
    doc["passes"] = [{name: fields}]
    export_format = getattr(options, "format", "native")
    if name in ("prune", "merge") and getattr(options, "router", "standard") != "exact":
        export_format = "hf"
    doc["export"] = {"format": export_format, "output": str(out), "overwrite": bool(overwrite)}
    return doc
