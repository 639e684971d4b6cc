"""Lint a compressed-tensors checkpoint for what vLLM and transformers need to load its MoE layers.

Reads only config.json and the safetensors headers (plus the tiny ``weight_shape`` tensors), so it
runs in seconds on any size of checkpoint. Every rule has a stable id:

======  ===============================  ======== ==========================================================
id      name                             severity what it checks
======  ===============================  ======== ==========================================================
CT100   compressed-tensors-config        error    config.json holds a valid compressed-tensors quantization_config
CT101   one-scheme-per-moe-layer         error    vLLM: all experts of a MoE layer, gate/up/down alike, share one scheme
CT102   expert-quantized                 error    vLLM: no routed expert projection is left unquantized or ignored
CT103   group-size-divides               error    the scheme's group size divides every quantized input dimension
CT104   router-ignored                   error    routers, shared_expert_gate and lm_head are in ``ignore`` and stored dense
CT105   targets-disjoint                 error    no module is targeted by two config groups
CT106   packed-tensors-consistent        error    weight_packed / weight_scale / zero point shapes agree with the scheme
HF201   transformers-one-experts-scheme  error    transformers resolves ONE experts scheme (``get_experts_scheme``): it must be
                                                  the scheme of every routed expert
VL301   vllm-moe-widths                  warning  vLLM's WNA16 MoE kernels take 4 and 8 bits; other widths need a vLLM that
                                                  supports them
======  ===============================  ======== ==========================================================

Exit codes of ``moecompress lint``: 0 no errors (warnings allowed), 1 findings with errors, 2 input
that cannot be read or is no compressed-tensors checkpoint at all (:func:`require_compressed_tensors`).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from moecompress.errors import MoeCompressError
from moecompress.model.families import OUTPUT_HEAD, UNQUANTIZED_BLOCK_MODULES
from moecompress.quant import format as fmt

RULES: dict[str, tuple[str, str]] = {
    "CT100": ("compressed-tensors-config", "error"),
    "CT101": ("one-scheme-per-moe-layer", "error"),
    "CT102": ("expert-quantized", "error"),
    "CT103": ("group-size-divides", "error"),
    "CT104": ("router-ignored", "error"),
    "CT105": ("targets-disjoint", "error"),
    "CT106": ("packed-tensors-consistent", "error"),
    "HF201": ("transformers-one-experts-scheme", "error"),
    "VL301": ("vllm-moe-widths", "warning"),
}
VLLM_MOE_BITS = (4, 8)
_EXPERT_MODULE = re.compile(r"^(?P<path>.*experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)$")


@dataclass
class Finding:
    rule: str
    where: str
    message: str

    @property
    def name(self) -> str:
        return RULES[self.rule][0]

    @property
    def severity(self) -> str:
        return RULES[self.rule][1]

    def as_json(self) -> dict:
        return {"rule": self.rule, "name": self.name, "severity": self.severity, "where": self.where, "message": self.message}


@dataclass
class LintReport:
    folder: str
    findings: list[Finding] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def clean(self) -> bool:
        return not self.errors

    def rules_hit(self) -> set[str]:
        return {f.rule for f in self.findings}

    def as_json(self) -> dict:
        return {"folder": self.folder, "clean": self.clean, "findings": [f.as_json() for f in self.findings], "summary": self.summary}

    def add(self, rule: str, where: str, message: str) -> None:
        self.findings.append(Finding(rule, where, message))


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass
class _Tensors:
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    weight_shapes: dict[str, tuple[int, int]]  # module -> (N, K) from its weight_shape tensor


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoeCompressError(f"{path} not found; pass a checkpoint folder") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoeCompressError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise MoeCompressError(f"{path} is not a JSON object")
    return data


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MoeCompressError(f"{index} has no weight_map")
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise MoeCompressError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def _read_tensors(folder: Path) -> _Tensors:
    shapes, dtypes, weight_shapes = {}, {}, {}
    for file in _shard_files(folder):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    shapes[key], dtypes[key] = tuple(sl.get_shape()), sl.get_dtype()
                    if key.endswith(".weight_shape"):
                        weight_shapes[key[: -len(".weight_shape")]] = tuple(int(v) for v in f.get_tensor(key).tolist())
        except MoeCompressError:
            raise
        except Exception as exc:  # safetensors raises several types for missing or corrupt files
            raise MoeCompressError(f"cannot read {file}: {exc}") from None
    return _Tensors(shapes, dtypes, weight_shapes)


# --------------------------------------------------------------------------------------------------
# Matching (compressed-tensors' rules: "re:" = re.match, else exact name or class name)
# --------------------------------------------------------------------------------------------------


def _matches(name: str, target: str, is_linear: bool) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if target == name:
        return True
    return target == "Linear" and is_linear  # class-name target: every 2-D weight is a Linear here


def _groups_matching(name: str, groups: dict, is_linear: bool) -> list[str]:
    return [g for g, scheme in groups.items() if any(_matches(name, t, is_linear) for t in scheme.targets)]


def _ignored(name: str, ignore: list[str], is_linear: bool) -> bool:
    return any(_matches(name, t, is_linear) for t in ignore)


# --------------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------------


def require_compressed_tensors(folder: str | Path) -> None:
    """Refuse (one line, exit 2 in the CLI) a folder that is no compressed-tensors checkpoint at all: no
    ``quantization_config``, or another method's (a dense model, a native moecompress checkpoint). A
    config that claims compressed-tensors but is invalid is a CT100 finding instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MoeCompressError(f"{folder} is not a folder; pass a checkpoint folder")
    qc = _read_json(folder / "config.json").get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "compressed-tensors":
        what = "has no quantization_config" if qc is None else f"is quantized with {method!r}"
        raise MoeCompressError(
            f"{folder} is not a compressed-tensors checkpoint (its config.json {what}); lint checks the output of "
            "moecompress quantize --format compressed-tensors"
        )


def lint_checkpoint(folder: str | Path) -> LintReport:
    """Lint the checkpoint at ``folder``; raises MoeCompressError when it cannot be read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MoeCompressError(f"{folder} is not a folder; pass a checkpoint folder")
    config = _read_json(folder / "config.json")
    tensors = _read_tensors(folder)
    report = LintReport(str(folder))
    qc_raw = config.get("quantization_config")
    if not isinstance(qc_raw, dict) or qc_raw.get("quant_method") != "compressed-tensors":
        method = qc_raw.get("quant_method") if isinstance(qc_raw, dict) else None
        report.add("CT100", "config.json", f"quantization_config.quant_method is {method!r}, not 'compressed-tensors'; "
                   "vLLM reads this checkpoint only as compressed-tensors (export with --format compressed-tensors)")
        return report
    try:
        from compressed_tensors.quantization import QuantizationConfig

        qc = QuantizationConfig.model_validate(qc_raw)
    except Exception as exc:  # pydantic ValidationError and the library's ValueErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report.add("CT100", "config.json", f"quantization_config is not a valid compressed-tensors config: {first}")
        return report

    groups = dict(qc.config_groups)
    ignore = list(qc.ignore or [])
    modules: dict[str, set[str]] = defaultdict(set)
    for key in tensors.shapes:
        module, _, suffix = key.rpartition(".")
        modules[module].add(suffix)

    def is_linear(m: str) -> bool:
        return "weight_packed" in modules[m] or len(tensors.shapes.get(f"{m}.weight", ())) == 2

    scheme_of: dict[str, str | None] = {}
    for m in sorted(modules):
        if not is_linear(m):
            continue
        hits = _groups_matching(m, groups, True)
        if len(hits) > 1:
            report.add("CT105", m, f"targeted by {len(hits)} config groups ({', '.join(hits)}); targets must be disjoint")
        scheme_of[m] = None if (not hits or _ignored(m, ignore, True)) else hits[0]

    experts = _expert_modules(modules)
    _check_moe_layers(report, experts, modules, scheme_of, groups)
    _check_quantized_tensors(report, modules, scheme_of, groups, tensors)
    _check_routers(report, experts, modules, ignore)
    _check_transformers(report, qc, experts, scheme_of)
    report.summary = {
        "moe_layers": len(experts),
        "experts": sum(len({e for e, _ in v}) for v in experts.values()),
        "config_groups": {g: {"bits": s.weights.num_bits if s.weights else None, "targets": len(s.targets)} for g, s in groups.items()},
        "errors": len(report.errors),
        "warnings": len(report.findings) - len(report.errors),
    }
    return report


def _expert_modules(modules: dict[str, set[str]]) -> dict[str, list[tuple[int, str]]]:
    """experts path -> [(expert, module name)] for every per-expert projection in the checkpoint."""
    out: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for m in modules:
        found = _EXPERT_MODULE.match(m)
        if found and ("weight_packed" in modules[m] or "weight" in modules[m]):
            out[found["path"]].append((int(found["expert"]), m))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _check_moe_layers(report: LintReport, experts, modules, scheme_of, groups) -> None:
    for path, members in experts.items():
        schemes = defaultdict(list)
        for e, m in members:
            scheme = scheme_of.get(m)
            if scheme is None or "weight_packed" not in modules[m]:
                why = "stored dense" if "weight_packed" not in modules[m] else "matched by no config group (or ignored)"
                report.add("CT102", m, f"routed expert {e} projection is {why}; vLLM quantizes all experts of a layer alike")
                continue
            schemes[scheme].append(m)
        if len(schemes) > 1:
            desc = ", ".join(f"{g} ({groups[g].weights.num_bits} bits): {len(ms)} projections" for g, ms in sorted(schemes.items()))
            report.add("CT101", path, f"experts use {len(schemes)} schemes ({desc}); vLLM needs one per MoE layer")
        for g in schemes:
            bits = groups[g].weights.num_bits if groups[g].weights else None
            if bits not in VLLM_MOE_BITS:
                report.add("VL301", path, f"experts at {bits} bits ({g}); vLLM's WNA16 MoE kernels take {VLLM_MOE_BITS}")


def _check_quantized_tensors(report: LintReport, modules, scheme_of, groups, tensors: _Tensors) -> None:
    for m, scheme_name in sorted(scheme_of.items()):
        packed = "weight_packed" in modules[m]
        if scheme_name is None:
            if packed:
                report.add("CT106", m, "holds packed weights but no config group covers it (or it is ignored)")
            continue
        if not packed:
            continue  # a dense module a group targets: reported for experts by CT102
        args = groups[scheme_name].weights
        shape = tensors.weight_shapes.get(m)
        if shape is None or len(shape) != 2:
            report.add("CT106", m, "has weight_packed but no 2-element weight_shape")
            continue
        n, k = shape
        # compressed-tensors' group quantization needs whole groups (no partial last group; any K packs)
        problem = fmt.group_size_problem(k, args.group_size, whole_groups=True) if args.strategy == "group" and args.group_size else None
        if problem is not None:
            report.add("CT103", m, f"{problem} ({scheme_name})")
            continue
        groups_k = 1 if args.strategy == "channel" else (k // args.group_size if args.group_size else 1)
        want = {
            "weight_packed": (n, math.ceil(k * args.num_bits / 32)),
            "weight_scale": (n, groups_k),
        }
        if not args.symmetric:
            want["weight_zero_point"] = (math.ceil(n * args.num_bits / 32), groups_k)
        for suffix, expected in want.items():
            got = tensors.shapes.get(f"{m}.{suffix}")
            if got != expected:
                report.add("CT106", m, f"{suffix} has shape {list(got) if got else 'missing'}, expected {list(expected)} "
                           f"for {args.num_bits} bits ({scheme_name})")
        if tensors.dtypes.get(f"{m}.weight_packed") != "I32":
            report.add("CT106", m, f"weight_packed is {tensors.dtypes.get(f'{m}.weight_packed')}, expected int32")
        if args.symmetric and "weight_zero_point" in modules[m]:
            report.add("CT106", m, f"symmetric scheme ({scheme_name}) but a weight_zero_point is stored")


def _check_routers(report: LintReport, experts, modules, ignore: list[str]) -> None:
    names = [OUTPUT_HEAD] if OUTPUT_HEAD in modules else []
    for path in experts:
        block = path.rsplit(".", 1)[0]
        names += [f"{block}.{r}" for r in UNQUANTIZED_BLOCK_MODULES if f"{block}.{r}" in modules]
    for name in names:
        if "weight_packed" in modules[name]:
            report.add("CT104", name, "is stored quantized; routers and lm_head must stay dense")
        elif not _ignored(name, ignore, True):
            report.add("CT104", name, "is not in quantization_config.ignore; vLLM and llm-compressor expect routers and lm_head there")


def _check_transformers(report: LintReport, qc, experts, scheme_of) -> None:
    """transformers resolves one experts scheme for the whole model and dequantizes every expert with it."""
    from transformers.integrations.compressed_tensors import get_experts_scheme

    used = {scheme_of.get(m) for members in experts.values() for _, m in members} - {None}
    if not used:
        return
    chosen = get_experts_scheme(qc)
    chosen_name = next((g for g, s in qc.config_groups.items() if s is chosen), None)
    if len(used) > 1:
        report.add("HF201", "config.json", f"routed experts use {len(used)} schemes ({', '.join(sorted(used))}); transformers "
                   f"dequantizes every expert with one ({chosen_name}), so it would load wrong weights")
    elif chosen_name not in used:
        report.add("HF201", "config.json", f"transformers would pick {chosen_name} as the experts' scheme, but the experts "
                   f"use {next(iter(used))}: put the experts group first or give it an 're:' target naming 'experts'")


def format_findings(report: LintReport) -> list[str]:
    """One line per finding: ``ID name [severity] where: message``."""
    return [f"{f.rule} {f.name} [{f.severity}] {f.where}: {f.message}" for f in report.findings]


def report_json(report: LintReport) -> str:
    return json.dumps(report.as_json())


__all__ = ["RULES", "Finding", "LintReport", "format_findings", "lint_checkpoint", "report_json"]


@dataclass
class ExpertWidth:
    """One routed expert as a compressed-tensors checkpoint stores it (16 bits: dense or unmatched)."""

    bits: int
    params: int  # weights of its projections (sum of N * K)
    group_size: int
    symmetric: bool


def expert_widths(folder: str | Path) -> dict[str, list[ExpertWidth]]:
    """experts path -> per-expert widths read back from a compressed-tensors checkpoint's config and
    tensors (an expert's width is its gate/up/down scheme's; mixed projections count the widest)."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(config["quantization_config"])
    tensors = _read_tensors(folder)
    modules: dict[str, set[str]] = defaultdict(set)
    for key in tensors.shapes:
        module, _, suffix = key.rpartition(".")
        modules[module].add(suffix)
    out: dict[str, list[ExpertWidth]] = {}
    for path, members in _expert_modules(modules).items():
        per_expert: dict[int, ExpertWidth] = {}
        for e, m in members:
            hits = _groups_matching(m, qc.config_groups, True)
            packed = "weight_packed" in modules[m] and hits and not _ignored(m, qc.ignore or [], True)
            if packed:
                args = qc.config_groups[hits[0]].weights
                n, k = tensors.weight_shapes[m]
                g = k if args.strategy == "channel" else int(args.group_size)
                width = ExpertWidth(int(args.num_bits), n * k, g, bool(args.symmetric))
            else:
                shape = tensors.shapes.get(f"{m}.weight", (0, 0))
                width = ExpertWidth(16, int(shape[0]) * int(shape[1]), 128, True)
            prev = per_expert.get(e)
            per_expert[e] = width if prev is None else ExpertWidth(
                max(prev.bits, width.bits), prev.params + width.params, width.group_size, width.symmetric
            )
        out[path] = [per_expert[e] for e in sorted(per_expert)]
    return out
