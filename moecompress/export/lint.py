"""Lint a compressed-tensors checkpoint for what vLLM and transformers need to load its MoE layers.

Reads only config.json and the safetensors headers (plus the tiny ``weight_shape`` tensors), so it
runs in seconds on any size of checkpoint. Findings are split per target (``vllm``, ``hf``; the
capability tables are :mod:`moecompress.export.targets`): ``error`` = will not load, or loads wrong,
in that target; ``warning`` = loads, but slow. Format rules (target ``all``) break every target.
Every rule has a stable id:

======  ===================================  ======  ======== ======================================================
id      name                                 target  severity what it checks
======  ===================================  ======  ======== ======================================================
CT100   compressed-tensors-config            all     error    config.json holds a valid compressed-tensors quantization_config
CT101   one-scheme-per-moe-layer             vllm    error    all experts of a MoE layer, gate/up/down alike, share one scheme
CT102   expert-quantized                     all     error    no routed expert is left dense in a layer whose other experts are
                                             hf      error    quantized (all); a MoE layer left wholly dense (hf only: vLLM
                                                              loads it)
CT103   group-size-divides                   all     error    the scheme's group size divides every quantized input dimension
CT104   router-ignored                       all     error    routers, shared_expert_gate and lm_head are in ``ignore`` and stored dense
CT105   targets-disjoint                     all     error    no module is targeted by two config groups
CT106   packed-tensors-consistent            all     error    weight_packed / weight_scale / zero point shapes agree with the scheme
HF201   transformers-one-experts-scheme      hf      error    transformers resolves ONE experts scheme (``get_experts_scheme``): it
                                                              must be the scheme of every routed expert
HF202   transformers-symmetric-experts       hf      error    transformers does not load asymmetric experts correctly
HF203   transformers-dense-matches-experts   hf      error    quantized attention / shared-expert linears use the scheme transformers
                                                              dequantizes them with: the experts' (5.24); one for all dense modules,
                                                              the group ``get_dense_scheme`` resolves (5.25)
VL301   vllm-moe-widths                      vllm    error    vLLM's WNA16 MoE backends run 4- and 8-bit experts only (``humming``:
                                                              also 2-bit symmetric)
VL302   vllm-moe-symmetry                    vllm    error    8-bit experts must be symmetric (vLLM runs 4-bit sym/asym, 8-bit sym)
VL303   vllm-marlin-eligible                 vllm    warning  group size in {-1,32,64,128}, hidden % 128 == 0, intermediate %
                                                              max(64, group) == 0, else a slower MoE backend
VL304   vllm-moe-scheme-lookup               vllm    error    vLLM looks a MoE layer's scheme up under ``<experts>.0.gate_proj``,
                                                              ``.0.up_proj``, ``.0.down_proj`` (whatever the checkpoint calls them):
                                                              that lookup must give expert 0's stored scheme (or none for a dense layer)
VL305   vllm-dense-widths                    vllm    error    quantized attention / shared-expert linears at a width vLLM's dense
                                                              path runs (0.33: 4, 8; ``humming``: 2-8)
VL306   vllm-moe-pack-factor                 vllm    error    the experts' hidden and intermediate sizes are multiples of 32 // bits
                                                              (vLLM allocates MoE weights as [E, K // (32 // bits), N] int32)
======  ===================================  ======  ======== ======================================================

Which release each target rule describes: ``vllm_version`` ("0.33", the default, or "humming") and
``transformers_version`` ("5.24", the default, or "5.25"); the tables are
:data:`moecompress.export.targets.VERSIONS`.

Exit codes of ``moecompress lint``: 0 no errors for the chosen targets (warnings allowed), 1 findings
with errors, 2 input that cannot be read or is no compressed-tensors checkpoint at all
(:func:`require_compressed_tensors`).
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
from moecompress.export import targets as tg
from moecompress.model.families import OUTPUT_HEAD, UNQUANTIZED_BLOCK_MODULES
from moecompress.quant import format as fmt

# id -> (name, severity); the target of each finding is on the finding (RULE_TARGETS: the targets a rule
# can name)
RULES: dict[str, tuple[str, str]] = {
    "CT100": ("compressed-tensors-config", tg.ERROR),
    "CT101": ("one-scheme-per-moe-layer", tg.ERROR),
    "CT102": ("expert-quantized", tg.ERROR),
    "CT103": ("group-size-divides", tg.ERROR),
    "CT104": ("router-ignored", tg.ERROR),
    "CT105": ("targets-disjoint", tg.ERROR),
    "CT106": ("packed-tensors-consistent", tg.ERROR),
    "HF201": ("transformers-one-experts-scheme", tg.ERROR),
    "HF202": ("transformers-symmetric-experts", tg.ERROR),
    "HF203": ("transformers-dense-matches-experts", tg.ERROR),
    "VL301": ("vllm-moe-widths", tg.ERROR),
    "VL302": ("vllm-moe-symmetry", tg.ERROR),
    "VL303": ("vllm-marlin-eligible", tg.WARNING),
    "VL304": ("vllm-moe-scheme-lookup", tg.ERROR),
    "VL305": ("vllm-dense-widths", tg.ERROR),
    "VL306": ("vllm-moe-pack-factor", tg.ERROR),
}
RULE_TARGETS: dict[str, tuple[str, ...]] = {
    "CT100": (tg.ALL,), "CT101": ("vllm",), "CT102": (tg.ALL, "hf"), "CT103": (tg.ALL,), "CT104": (tg.ALL,),
    "CT105": (tg.ALL,), "CT106": (tg.ALL,), "HF201": ("hf",), "HF202": ("hf",), "HF203": ("hf",),
    "VL301": ("vllm",), "VL302": ("vllm",), "VL303": ("vllm",), "VL304": ("vllm",), "VL305": ("vllm",),
    "VL306": ("vllm",),
}
_VLLM_PROBES = ("gate_proj", "up_proj", "down_proj")  # get_moe_method's unfused names for expert 0
TARGET_NAMES: tuple[str, ...] = tuple(tg.TARGETS)
VLLM_MOE_BITS = tuple(sorted({s.bits for s in tg.VLLM.moe_schemes}))  # kept for importers
_EXPERT_MODULE = re.compile(r"^(?P<path>.*experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)$")


@dataclass
class Finding:
    rule: str
    where: str
    message: str
    target: str = tg.ALL  # "vllm", "hf", or "all" (the format itself: every target)

    @property
    def name(self) -> str:
        return RULES[self.rule][0]

    @property
    def severity(self) -> str:
        return RULES[self.rule][1]

    def applies_to(self, targets) -> bool:
        return self.target == tg.ALL or self.target in targets

    def as_json(self) -> dict:
        return {"rule": self.rule, "name": self.name, "severity": self.severity, "target": self.target,
                "where": self.where, "message": self.message}


@dataclass
class LintReport:
    folder: str
    findings: list[Finding] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    targets: tuple[str, ...] = TARGET_NAMES
    tables: dict = field(default_factory=dict)  # target -> TargetCapabilities the findings were judged by

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == tg.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == tg.WARNING]

    @property
    def clean(self) -> bool:
        return not self.errors

    def clean_for(self, target: str) -> bool:
        return not any(f.applies_to((target,)) for f in self.errors)

    def rules_hit(self, target: str | None = None) -> set[str]:
        return {f.rule for f in self.findings if target is None or f.applies_to((target,))}

    def as_json(self) -> dict:
        return {"folder": self.folder, "clean": self.clean, "targets": list(self.targets),
                "versions": {t: table.version for t, table in self.tables.items()},
                "clean_for": {t: self.clean_for(t) for t in self.targets},
                "findings": [f.as_json() for f in self.findings], "summary": self.summary}

    def add(self, rule: str, where: str, message: str, target: str = tg.ALL) -> None:
        if target == tg.ALL or target in self.targets:
            self.findings.append(Finding(rule, where, message, target))


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass
class _Tensors:
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    weight_shapes: dict[str, tuple[int, int]]  # module -> (N, K) from its weight_shape tensor


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoeCompressError(f"{path} not found; pass a checkpoint folder") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoeCompressError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise MoeCompressError(f"{path} is not a JSON object")
    return data


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MoeCompressError(f"{index} has no weight_map")
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise MoeCompressError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def _read_tensors(folder: Path) -> _Tensors:
    shapes, dtypes, weight_shapes = {}, {}, {}
    for file in shard_files(folder):
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


def groups_matching(name: str, groups: dict, is_linear: bool) -> list[str]:
    return [g for g, scheme in groups.items() if any(_matches(name, t, is_linear) for t in scheme.targets)]


def is_ignored(name: str, ignore: list[str], is_linear: bool) -> bool:
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
    qc = read_json(folder / "config.json").get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "compressed-tensors":
        what = "has no quantization_config" if qc is None else f"is quantized with {method!r}"
        raise MoeCompressError(
            f"{folder} is not a compressed-tensors checkpoint (its config.json {what}); lint checks the output of "
            "moecompress quantize --format compressed-tensors"
        )


def _resolve_targets(target) -> tuple[str, ...]:
    if target is None:
        return TARGET_NAMES
    names = (target,) if isinstance(target, str) else tuple(target)
    for name in names:
        if name not in tg.TARGETS:
            raise MoeCompressError(f"unknown lint target {name!r}; choose from {', '.join(TARGET_NAMES)}")
    return tuple(dict.fromkeys(names)) or TARGET_NAMES


def _resolve_tables(vllm_version: str | None, transformers_version: str | None) -> dict:
    try:
        return {"vllm": tg.get_target("vllm", vllm_version), "hf": tg.get_target("hf", transformers_version)}
    except ValueError as exc:
        raise MoeCompressError(str(exc)) from None


def lint_checkpoint(folder: str | Path, target: str | list[str] | tuple[str, ...] | None = None,
                    vllm_version: str | None = None, transformers_version: str | None = None) -> LintReport:
    """Lint the checkpoint at ``folder`` for ``target`` ("vllm", "hf", a list of them, or None: both), each
    judged by its table at the given release (None: the oldest supported); raises MoeCompressError when
    it cannot be read or a version is unknown."""
    folder = Path(folder)
    chosen = _resolve_targets(target)
    tables = _resolve_tables(vllm_version, transformers_version)
    if not folder.is_dir():
        raise MoeCompressError(f"{folder} is not a folder; pass a checkpoint folder")
    config = read_json(folder / "config.json")
    tensors = _read_tensors(folder)
    report = LintReport(str(folder), targets=chosen, tables={t: tables[t] for t in chosen})
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
        hits = groups_matching(m, groups, True)
        if len(hits) > 1:
            report.add("CT105", m, f"targeted by {len(hits)} config groups ({', '.join(hits)}); targets must be disjoint")
        scheme_of[m] = None if (not hits or is_ignored(m, ignore, True)) else hits[0]

    experts = _expert_modules(modules)
    _check_moe_layers(report, tables, experts, modules, scheme_of, groups, ignore, tensors)
    _check_quantized_tensors(report, modules, scheme_of, groups, tensors)
    _check_routers(report, experts, modules, ignore)
    _check_vllm_dense(report, tables["vllm"], experts, modules, scheme_of, groups)
    if "hf" in chosen:
        _check_transformers(report, tables["hf"], qc, experts, modules, scheme_of)
    report.summary = {
        "moe_layers": len(experts),
        "experts": sum(len({e for e, _ in v}) for v in experts.values()),
        "config_groups": {g: {"bits": s.weights.num_bits if s.weights else None, "targets": len(s.targets)} for g, s in groups.items()},
        "errors": len(report.errors),
        "warnings": len(report.findings) - len(report.errors),
        "targets": {t: {"clean": report.clean_for(t),
                        "errors": sum(1 for f in report.errors if f.applies_to((t,))),
                        "warnings": sum(1 for f in report.warnings if f.applies_to((t,)))} for t in chosen},
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


_DOWN_PROJECTIONS = ("down_proj", "w2")  # (N, K) = (hidden, intermediate); other projections (intermediate, hidden)


def _layer_dims(members, tensors: _Tensors) -> tuple[int, int] | None:
    """(hidden, intermediate) of a MoE layer from its experts' weight_shape tensors."""
    for _, m in members:
        shape = tensors.weight_shapes.get(m)
        if shape is None or len(shape) != 2:
            continue
        n, k = shape
        return (n, k) if m.rsplit(".", 1)[-1] in _DOWN_PROJECTIONS else (k, n)
    return None


def _check_moe_layers(report: LintReport, tables: dict, experts, modules, scheme_of, groups, ignore: list[str],
                      tensors: _Tensors) -> None:
    vllm = tables["vllm"]
    for path, members in experts.items():
        schemes = defaultdict(list)
        dense = []
        for e, m in members:
            scheme = scheme_of.get(m)
            if scheme is None or "weight_packed" not in modules[m]:
                dense.append((e, m, "stored dense" if "weight_packed" not in modules[m] else "matched by no config group (or ignored)"))
                continue
            schemes[scheme].append(m)
        _check_vllm_lookup(report, vllm, path, members, scheme_of, groups, ignore)
        if dense and not schemes:
            # a MoE layer left wholly dense: vLLM loads it (no scheme for the layer); transformers does not
            for t in tables.values():
                problem = tg.dense_layer_problem(t)
                if problem:
                    report.add("CT102", path, f"every routed expert is left dense: {problem}", t.name)
            continue
        for e, m, why in dense:
            report.add("CT102", m, f"routed expert {e} projection is {why} while the layer's other experts are "
                       "quantized; runtimes quantize all experts of a layer alike")
        problem = tg.layer_schemes_problem(vllm, len(schemes))
        if problem:
            desc = ", ".join(f"{g} ({groups[g].weights.num_bits} bits): {len(ms)} projections" for g, ms in sorted(schemes.items()))
            report.add("CT101", path, f"experts use {len(schemes)} schemes ({desc}); {problem}", vllm.name)
        runs = True
        for g in schemes:
            w = groups[g].weights
            bits, sym = (w.num_bits, bool(w.symmetric)) if w else (None, True)
            problem = tg.moe_width_problem(vllm, bits)
            if problem:
                report.add("VL301", path, f"experts at {bits} bits ({g}): {problem}; they fail at load", vllm.name)
                runs = False
            problem = tg.moe_symmetry_problem(vllm, bits, sym)
            if problem:
                report.add("VL302", path, f"experts {g}: {problem}; they fail at load", vllm.name)
                runs = False
        # vLLM takes the layer's scheme from expert 0: the fast-kernel question is about that scheme
        first = scheme_of.get(members[0][1]) if members else None
        dims = _layer_dims(members, tensors)
        if runs and first in schemes and dims is not None and groups[first].weights:
            problem = tg.pack_factor_problem(vllm, groups[first].weights.num_bits, *dims)
            if problem:
                report.add("VL306", path, f"{problem}; the load fails", vllm.name)
        if runs and len(schemes) == 1 and first in schemes and dims is not None and groups[first].weights:
            w = groups[first].weights
            strategy = getattr(w.strategy, "value", w.strategy)
            group = -1 if str(strategy) == "channel" or not w.group_size else int(w.group_size)
            divides = group <= 0 or not (dims[0] % group or dims[1] % group)  # else CT103 reports it
            problem = tg.marlin_problem(vllm, group, *dims) if divides else None
            if problem:
                report.add("VL303", path, problem, vllm.name)


def _vllm_scheme_of(name: str, groups: dict, ignore: list[str]) -> str | None:
    """The group vLLM resolves for a module name: ignored -> None, else the first group with a matching
    target (``find_matched_target``: exact name or ``re:`` match; a ``Linear`` class target covers MoE
    layers too, ``_add_fused_moe_to_target_scheme_map``), else None (unquantized)."""
    if is_ignored(name, ignore, False):
        return None
    hits = groups_matching(name, groups, True)
    return hits[0] if hits else None


def _check_vllm_lookup(report: LintReport, vllm, path: str, members, scheme_of, groups, ignore: list[str]) -> None:
    """VL304: the scheme vLLM reads for the layer (from expert 0's gate/up/down lookup names) is the one
    expert 0 is stored with."""
    looked_up = {_vllm_scheme_of(f"{path}.0.{p}", groups, ignore) for p in _VLLM_PROBES}
    stored = {scheme_of.get(m) for e, m in members if e == 0}
    if len(looked_up) > 1:
        report.add("VL304", path, f"vLLM looks the layer's scheme up under {path}.0.{{gate,up,down}}_proj and finds "
                   f"{len(looked_up)} different ones ({', '.join(sorted(map(str, looked_up)))}); it refuses the layer", vllm.name)
        return
    found = next(iter(looked_up))
    if len(stored) == 1 and found not in stored:
        want = next(iter(stored))
        report.add("VL304", path, f"vLLM looks the layer's scheme up under {path}.0.{{gate,up,down}}_proj and finds "
                   f"{found or 'none (unquantized)'}, but expert 0 is stored {'dense' if want is None else f'with {want}'}; "
                   "the targets must also match vLLM's gate_proj / up_proj / down_proj names", vllm.name)


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


def _check_vllm_dense(report: LintReport, vllm, experts, modules, scheme_of, groups) -> None:
    """VL305: every packed linear outside the routed experts runs on vLLM's dense WNA16 path."""
    expert_modules = {m for members in experts.values() for _, m in members}
    by_group: dict[str, list[str]] = defaultdict(list)
    for m, g in sorted(scheme_of.items()):
        if g is not None and m not in expert_modules and "weight_packed" in modules[m]:
            by_group[g].append(m)
    for g, ms in sorted(by_group.items()):
        w = groups[g].weights
        problem = tg.dense_bits_problem(vllm, w.num_bits if w else None)
        if problem:
            report.add("VL305", g, f"{len(ms)} attention / shared-expert linears (e.g. {ms[0]}): {problem}; they fail at load", vllm.name)


def _check_routers(report: LintReport, experts, modules, ignore: list[str]) -> None:
    names = [OUTPUT_HEAD] if OUTPUT_HEAD in modules else []
    for path in experts:
        block = path.rsplit(".", 1)[0]
        names += [f"{block}.{r}" for r in UNQUANTIZED_BLOCK_MODULES if f"{block}.{r}" in modules]
    for name in names:
        if "weight_packed" in modules[name]:
            report.add("CT104", name, "is stored quantized; routers and lm_head must stay dense")
        elif not is_ignored(name, ignore, True):
            report.add("CT104", name, "is not in quantization_config.ignore; vLLM and llm-compressor expect routers and lm_head there")


def _check_transformers(report: LintReport, hf: tg.TargetCapabilities, qc, experts, modules, scheme_of) -> None:
    """transformers resolves one experts scheme for the whole model and dequantizes every expert with it."""
    from transformers.integrations.compressed_tensors import get_experts_scheme

    expert_modules = {m for members in experts.values() for _, m in members}
    used = {scheme_of.get(m) for m in expert_modules} - {None}
    if not used:
        return
    chosen = get_experts_scheme(qc)
    chosen_name = next((g for g, s in qc.config_groups.items() if s is chosen), None)
    if tg.model_experts_schemes_problem(hf, len(used)):
        report.add("HF201", "config.json", f"routed experts use {len(used)} schemes ({', '.join(sorted(used))}); transformers "
                   f"dequantizes every expert with one ({chosen_name}), so it would load wrong weights", hf.name)
    elif chosen_name not in used:
        report.add("HF201", "config.json", f"transformers would pick {chosen_name} as the experts' scheme, but the experts "
                   f"use {next(iter(used))}: put the experts group first or give it an 're:' target naming 'experts'", hf.name)
    for g in sorted(used):
        w = qc.config_groups[g].weights
        if w is None:
            continue
        problem = tg.moe_symmetry_problem(hf, w.num_bits, bool(w.symmetric))
        if problem:
            report.add("HF202", g, f"experts {g}: {problem}", hf.name)
    if len(used) != 1:
        return  # HF201 already: no single experts scheme to compare the dense modules with
    experts_key = tg.scheme_key(qc.config_groups[next(iter(used))].weights)
    dense_group = tg.dense_scheme_group(qc.config_groups)
    dense_key = tg.scheme_key(qc.config_groups[dense_group].weights) if dense_group is not None else None
    others: dict[str, list[str]] = defaultdict(list)
    for m, g in sorted(scheme_of.items()):
        if g is None or m in expert_modules or "weight_packed" not in modules[m]:
            continue
        others[g].append(m)
    for g, ms in sorted(others.items()):
        problem = tg.dense_width_problem(hf, tg.scheme_key(qc.config_groups[g].weights), experts_key, dense_key)
        if problem:
            report.add("HF203", g, f"{len(ms)} attention / shared-expert linears (e.g. {ms[0]}): {problem}", hf.name)


def format_findings(report: LintReport) -> list[str]:
    """One line per finding: ``ID name [severity target] where: message``."""
    return [f"{f.rule} {f.name} [{f.severity} {f.target}] {f.where}: {f.message}" for f in report.findings]


def report_json(report: LintReport) -> str:
    return json.dumps(report.as_json())


__all__ = ["RULES", "RULE_TARGETS", "TARGET_NAMES", "Finding", "LintReport", "format_findings", "lint_checkpoint", "report_json"]


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
    config = read_json(folder / "config.json")
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
            hits = groups_matching(m, qc.config_groups, True)
            packed = "weight_packed" in modules[m] and hits and not is_ignored(m, qc.ignore or [], True)
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
