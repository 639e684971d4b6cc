"""What each runtime loads from a compressed-tensors MoE checkpoint: one written capability table per
target, as data, and one small function per rule that :mod:`moecompress.export.lint` applies.

The facts were read from the runtimes' source (docs/ARCHITECTURE.md, DESIGN.md section 6, issue 17):

* ``vllm`` (vLLM 0.33 line, the oldest release we support): the MoE weight-only path (WNA16) reads ONE
  scheme per MoE layer, from expert 0, and runs 4-bit (symmetric or asymmetric) and 8-bit symmetric
  experts only; 2/3/5-7-bit and 8-bit asymmetric experts fail at load ("No WNA16 MoE backend supports
  the deployment configuration"). Layers may differ from each other (layer A 4-bit, layer B 8-bit) and
  a MoE layer may be left dense. Marlin MoE needs group size in {-1, 32, 64, 128}, hidden % 128 == 0
  and intermediate % max(64, group) == 0; otherwise a slower backend runs (a warning, not an error).
  Newer vLLM adds a JIT path ("Humming") that runs 2-bit compressed-tensors MoE, 2-8-bit in review:
  those widths are errors here because the table describes the oldest supported release.
* ``hf`` (transformers 5.24 + compressed-tensors): uniform symmetric experts load exactly; transformers
  dequantizes every routed expert of the model with ONE scheme (``get_experts_scheme``), so per-layer
  mixed exports load silently wrong; asymmetric experts do not load correctly; attention or shared
  experts at a width other than the experts' load wrong. (transformers 5.25 resolves a separate dense
  scheme, ``get_dense_scheme``, but still only one for all dense modules.) A MoE layer left dense in an
  otherwise quantized checkpoint fails at load (measured on 5.25: the experts' merge finds no tensors).

Severity: ``error`` = will not load, or loads wrong, in that target; ``warning`` = loads, but slow.
"""

from __future__ import annotations

from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"
ALL = "all"  # a finding about the compressed-tensors format itself: every target fails on it


@dataclass(frozen=True)
class MoeScheme:
    """One expert weight scheme a runtime's MoE path runs."""

    bits: int
    symmetric: bool


@dataclass(frozen=True)
class MarlinRule:
    """When vLLM's fast Marlin MoE kernel runs (else a slower backend)."""

    group_sizes: tuple[int, ...] = (-1, 32, 64, 128)  # -1: per channel
    hidden_multiple: int = 128
    intermediate_min_multiple: int = 64  # intermediate % max(this, group) == 0


@dataclass(frozen=True)
class TargetCapabilities:
    name: str
    runtime: str
    versions: str  # the release range the table holds for
    moe_schemes: tuple[MoeScheme, ...] | None  # None: any width / symmetry the format can store
    one_scheme_per_moe_layer: bool  # all experts (gate/up/down alike) of a layer share one scheme
    one_experts_scheme_per_model: bool  # every routed expert of the model shares one scheme
    dense_moe_layer_ok: bool  # a MoE layer whose experts are all left dense loads
    dense_width_must_match_experts: bool  # quantized attention / shared experts must use the experts' scheme
    marlin: MarlinRule | None  # fast-kernel eligibility (warnings only)
    note: str = ""


VLLM = TargetCapabilities(
    name="vllm",
    runtime="vLLM",
    versions="vLLM 0.33 line (oldest supported); newer releases add a JIT 'Humming' path for 2-bit (2-8-bit in review)",
    moe_schemes=(MoeScheme(4, True), MoeScheme(4, False), MoeScheme(8, True)),
    one_scheme_per_moe_layer=True,
    one_experts_scheme_per_model=False,
    dense_moe_layer_ok=True,
    dense_width_must_match_experts=False,
    marlin=MarlinRule(),
    note="scheme read per MoE layer from expert 0; WNA16 MoE backends",
)

HF = TargetCapabilities(
    name="hf",
    runtime="transformers + compressed-tensors",
    versions="transformers 5.24 (oldest supported); 5.25 resolves one separate scheme for all dense modules",
    moe_schemes=(MoeScheme(2, True), MoeScheme(3, True), MoeScheme(4, True), MoeScheme(5, True),
                 MoeScheme(6, True), MoeScheme(7, True), MoeScheme(8, True)),
    one_scheme_per_moe_layer=True,
    one_experts_scheme_per_model=True,
    dense_moe_layer_ok=False,  # measured on transformers 5.25: "Concatenate on tensors destined for ...experts.gate_up_proj"
    dense_width_must_match_experts=True,
    marlin=None,
    note="experts dequantized at load with one scheme (get_experts_scheme)",
)

TARGETS: dict[str, TargetCapabilities] = {t.name: t for t in (VLLM, HF)}


def get_target(name: str) -> TargetCapabilities:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}") from None


# --------------------------------------------------------------------------------------------------
# One function per rule the lint applies (None: fine; else a one-line reason)
# --------------------------------------------------------------------------------------------------


def moe_width_problem(target: TargetCapabilities, bits: int | None) -> str | None:
    """VL301: the experts' width is one the target's MoE path runs at all."""
    if target.moe_schemes is None:
        return None
    widths = sorted({s.bits for s in target.moe_schemes})
    if bits in widths:
        return None
    return f"{target.runtime} ({target.versions}) runs MoE experts at {widths} bits only, not {bits}"


def moe_symmetry_problem(target: TargetCapabilities, bits: int | None, symmetric: bool) -> str | None:
    """VL302 / HF202: the width is supported, but not with this symmetry."""
    if target.moe_schemes is None or bits not in {s.bits for s in target.moe_schemes}:
        return None  # unsupported width: moe_width_problem's finding
    if MoeScheme(bits, symmetric) in target.moe_schemes:
        return None
    kind = "asymmetric" if not symmetric else "symmetric"
    runs = ", ".join(f"{s.bits}-bit {'sym' if s.symmetric else 'asym'}" for s in target.moe_schemes)
    return f"{target.runtime} ({target.versions}) does not run {bits}-bit {kind} experts (runs: {runs})"


def layer_schemes_problem(target: TargetCapabilities, n_schemes: int) -> str | None:
    """CT101: all experts of one MoE layer share a scheme."""
    if target.one_scheme_per_moe_layer and n_schemes > 1:
        return f"{target.runtime} needs one scheme per MoE layer, found {n_schemes}"
    return None


def model_experts_schemes_problem(target: TargetCapabilities, n_schemes: int) -> str | None:
    """HF201: every routed expert of the model shares one scheme."""
    if target.one_experts_scheme_per_model and n_schemes > 1:
        return f"{target.runtime} dequantizes every routed expert with one scheme, found {n_schemes}"
    return None


def dense_layer_problem(target: TargetCapabilities) -> str | None:
    """CT102 (whole layer): a MoE layer with every expert left dense."""
    return None if target.dense_moe_layer_ok else f"{target.runtime} cannot load a MoE layer left dense"


def dense_width_problem(target: TargetCapabilities, module_scheme: tuple, experts_scheme: tuple) -> str | None:
    """HF203: a quantized attention / shared-expert linear uses the experts' scheme."""
    if target.dense_width_must_match_experts and module_scheme != experts_scheme:
        return (f"{target.runtime} ({target.versions}) dequantizes it with the experts' scheme "
                f"{_describe(experts_scheme)}, not its own {_describe(module_scheme)}")
    return None


def marlin_problem(target: TargetCapabilities, group_size: int, hidden: int, intermediate: int) -> str | None:
    """VL303: the layer runs on the fast Marlin MoE kernel."""
    rule = target.marlin
    if rule is None:
        return None
    why = []
    if group_size not in rule.group_sizes:
        why.append(f"group size {group_size} not in {list(rule.group_sizes)}")
    if hidden % rule.hidden_multiple:
        why.append(f"hidden size {hidden} % {rule.hidden_multiple} != 0")
    step = max(rule.intermediate_min_multiple, group_size)
    if intermediate % step:
        why.append(f"intermediate size {intermediate} % {step} != 0")
    if not why:
        return None
    return f"not Marlin-eligible ({'; '.join(why)}): {target.runtime} falls back to a slower MoE backend"


def scheme_key(weights) -> tuple:
    """What must agree between two schemes for one decompression to serve both (bits, symmetry, strategy,
    group size, type) from compressed-tensors QuantizationArgs."""
    if weights is None:
        return (None,)
    strategy = getattr(weights.strategy, "value", weights.strategy)
    kind = getattr(weights.type, "value", weights.type)
    return (weights.num_bits, bool(weights.symmetric), str(strategy), weights.group_size, str(kind))


def _describe(key: tuple) -> str:
    if len(key) < 5:
        return "(none)"
    bits, sym, strategy, group, _ = key
    return f"({bits}-bit {'sym' if sym else 'asym'}, {strategy}{'' if group is None else f' {group}'})"


__all__ = [
    "ALL", "ERROR", "HF", "TARGETS", "VLLM", "WARNING", "MarlinRule", "MoeScheme", "TargetCapabilities",
    "dense_layer_problem", "dense_width_problem", "get_target", "layer_schemes_problem", "marlin_problem",
    "model_experts_schemes_problem", "moe_symmetry_problem", "moe_width_problem", "scheme_key",
]
