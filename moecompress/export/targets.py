"""What each runtime loads from a compressed-tensors MoE checkpoint: one written capability table per
target AND runtime version, as data, and one small function per rule that :mod:`moecompress.export.lint`
applies (and ``quantize --target`` checks before any work).

Versions. Each target has a default version, the OLDEST release we support, and a flag for newer ones
(``--vllm-version``, ``--transformers-version`` on ``quantize`` and ``lint``). Every newer table accepts
everything its default accepts, so a checkpoint that is clean for the default loads on the newer releases.

* ``vllm`` ``0.33`` (default; read from vLLM 0.33 source, docs/ARCHITECTURE.md, DESIGN.md section 6,
  issue 17): ``CompressedTensorsMoEMethod.get_moe_method`` reads ONE scheme per MoE layer, from expert 0
  (``<layer>.0.gate_proj/up_proj/down_proj``, which must agree), and the WNA16 MoE path runs 4-bit
  (symmetric or asymmetric) and 8-bit symmetric experts only (``WNA16_SUPPORTED_BITS = [4, 8]``, format
  ``pack-quantized``); 2/3/5-7-bit and 8-bit asymmetric experts fail at load. Layers may differ from each
  other (layer A 4-bit, layer B 8-bit) and a MoE layer may be left dense (no scheme: the unquantized MoE
  method). Marlin MoE needs group size in {-1, 32, 64, 128}, hidden % 128 == 0 and intermediate %
  max(64, group) == 0; otherwise a slower backend runs (a warning, not an error).
* ``vllm`` ``humming`` (releases with vllm-project/vllm PR #48918 "[CT] Support Humming for WNA16 MoE",
  merged 2026-07-17): ``get_moe_method`` sends pack-quantized INT experts whose width is not in
  ``WNA16_SUPPORTED_BITS`` to ``CompressedTensorsHummingMoEMethod``
  (``compressed_tensors_moe/compressed_tensors_moe_humming.py``: "built for bit widths that Marlin / WNA16
  does not support (e.g. 2-bit GSQ checkpoints)"); the PR's regression coverage is the W2A16 route. Its
  MoE weight layout still packs ``32 // num_bits`` codes per int32, which is exact for 2 bits only: 3, 5, 6
  and 7 bits need vllm-project/vllm PR #52799 ("Generalize CompressedTensorsWNA16MoEMethod to support
  arbitrary integer bit widths (2-8)", open, in review). So this table adds 2-bit SYMMETRIC experts
  (the tested route; asymmetric 2-bit is not claimed) and nothing else. Humming needs compute
  capability >= 7.5. Found with the ``search`` tool (issues + code corpora, query "vllm humming moe
  compressed-tensors 2-bit"): PRs #46389 (dense 2/3/5/6/7-bit Linear, merged), #48918, #52799, and
  ``compressed_tensors_moe.py`` / ``compressed_tensors_moe_humming.py`` at vllm commit db7a6bcb.
* ``hf`` ``5.24`` (default; measured on transformers 5.24 + compressed-tensors): uniform symmetric experts
  load exactly; transformers dequantizes every routed expert of the model with ONE scheme
  (``get_experts_scheme``), so per-layer mixed exports load silently wrong; asymmetric experts do not load
  correctly; attention or shared experts at a width other than the experts' load wrong. A MoE layer left
  dense in an otherwise quantized checkpoint fails at load.
* ``hf`` ``5.25`` (read from ``transformers/integrations/compressed_tensors.py`` and
  ``quantizers/quantizer_compressed_tensors.py`` 5.25.0, and measured, issue 17): experts are still
  dequantized with ONE scheme (``get_experts_scheme``, no zero point: asymmetric experts fail at load with
  a conversion error), but dense modules are no longer forced onto the experts' scheme. The default load
  (``dequantize=False``) gives every dense module its own compressed-tensors scheme; with
  ``CompressedTensorsConfig(dequantize=True)`` every dense module is decompressed with the ONE group
  ``get_dense_scheme`` resolves (the first group none of whose ``re:`` targets mention ``experts``).
  Measured on a tiny qwen2_moe (experts 4-bit): attention and shared experts at 8 bits load exactly both
  ways; attention 8 + shared experts 2 (or 4) load exactly by default but wrong with ``dequantize=True``
  (max logit error 0.58 / 0.89). The rule therefore is: all quantized dense modules share one scheme,
  the one ``get_dense_scheme`` resolves, which may differ from the experts'.

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


# How quantized dense modules (attention, shared experts) must relate to the experts' scheme
DENSE_AS_EXPERTS = "experts"  # the experts' scheme (transformers 5.24)
DENSE_ONE_SCHEME = "one"  # one scheme for all dense modules, the one get_dense_scheme resolves (5.25)
DENSE_ANY = "any"  # each module its own (vLLM)


@dataclass(frozen=True)
class TargetCapabilities:
    name: str
    version: str  # the key of this table among the target's versions ("0.33", "humming", "5.24", ...)
    runtime: str
    versions: str  # the release range the table holds for, in words
    moe_schemes: tuple[MoeScheme, ...] | None  # None: any width / symmetry the format can store
    one_scheme_per_moe_layer: bool  # all experts (gate/up/down alike) of a layer share one scheme
    one_experts_scheme_per_model: bool  # every routed expert of the model shares one scheme
    dense_moe_layer_ok: bool  # a MoE layer whose experts are all left dense loads
    dense_schemes: str  # DENSE_AS_EXPERTS, DENSE_ONE_SCHEME or DENSE_ANY
    dense_bits: tuple[int, ...] | None  # widths a quantized attention / shared-expert linear may have (None: any)
    marlin: MarlinRule | None  # fast-kernel eligibility (warnings only)
    note: str = ""
    # The MoE weights are allocated as [E, K // (32 // bits), N] int32 (vLLM's WNA16 create_weights), so
    # every input dimension K must be a multiple of the values one int32 holds; else the load fails.
    moe_k_multiple_of_pack_factor: bool = False

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.version}"

    def widths(self, symmetric: bool | None = None) -> tuple[int, ...]:
        """The expert widths the MoE path runs (at this symmetry; None: either)."""
        if self.moe_schemes is None:
            return ()
        return tuple(sorted({s.bits for s in self.moe_schemes if symmetric is None or s.symmetric == symmetric}))


_WNA16 = (MoeScheme(4, True), MoeScheme(4, False), MoeScheme(8, True))

VLLM = TargetCapabilities(
    name="vllm",
    version="0.33",
    runtime="vLLM",
    versions="vLLM 0.33 line (oldest supported)",
    moe_schemes=_WNA16,
    one_scheme_per_moe_layer=True,
    one_experts_scheme_per_model=False,
    dense_moe_layer_ok=True,
    dense_schemes=DENSE_ANY,
    dense_bits=(4, 8),  # schemes/compressed_tensors_wNa16.py: WNA16_SUPPORTED_BITS = [4, 8]
    marlin=MarlinRule(),
    note="scheme read per MoE layer from expert 0; WNA16 MoE backends",
    moe_k_multiple_of_pack_factor=True,
)

VLLM_HUMMING = TargetCapabilities(
    name="vllm",
    version="humming",
    runtime="vLLM",
    versions="vLLM with the Humming compressed-tensors MoE path (vllm PR #48918); 3/5-7-bit MoE is still in review (PR #52799)",
    moe_schemes=(MoeScheme(2, True), *_WNA16),
    one_scheme_per_moe_layer=True,
    one_experts_scheme_per_model=False,
    dense_moe_layer_ok=True,
    dense_schemes=DENSE_ANY,
    dense_bits=(2, 3, 4, 5, 6, 7, 8),  # dense Humming Linear: vllm PR #46389 (2/3/5/6/7-bit), merged
    marlin=MarlinRule(),  # 4/8-bit layers still take the Marlin / WNA16 route
    note="2-bit experts run on the JIT Humming MoE kernel (compute capability >= 7.5)",
    moe_k_multiple_of_pack_factor=True,
)

_HF_SYMMETRIC = tuple(MoeScheme(b, True) for b in (2, 3, 4, 5, 6, 7, 8))

HF = TargetCapabilities(
    name="hf",
    version="5.24",
    runtime="transformers",
    versions="transformers 5.24 + compressed-tensors (oldest supported)",
    moe_schemes=_HF_SYMMETRIC,
    one_scheme_per_moe_layer=True,
    one_experts_scheme_per_model=True,
    dense_moe_layer_ok=False,  # measured on transformers 5.25: "Concatenate on tensors destined for ...experts.gate_up_proj"
    dense_schemes=DENSE_AS_EXPERTS,
    dense_bits=None,
    marlin=None,
    note="experts dequantized at load with one scheme (get_experts_scheme)",
)

HF_525 = TargetCapabilities(
    name="hf",
    version="5.25",
    runtime="transformers",
    versions="transformers 5.25 + compressed-tensors",
    moe_schemes=_HF_SYMMETRIC,  # asymmetric experts still fail at load (no zero point in the experts' dequantize)
    one_scheme_per_moe_layer=True,
    one_experts_scheme_per_model=True,
    dense_moe_layer_ok=False,
    dense_schemes=DENSE_ONE_SCHEME,
    dense_bits=None,
    marlin=None,
    note="experts dequantized with one scheme (get_experts_scheme); dense modules with one (get_dense_scheme)",
)

VERSIONS: dict[str, dict[str, TargetCapabilities]] = {
    "vllm": {VLLM.version: VLLM, VLLM_HUMMING.version: VLLM_HUMMING},
    "hf": {HF.version: HF, HF_525.version: HF_525},
}
DEFAULT_VERSIONS: dict[str, str] = {"vllm": VLLM.version, "hf": HF.version}  # the oldest supported
TARGETS: dict[str, TargetCapabilities] = {name: VERSIONS[name][v] for name, v in DEFAULT_VERSIONS.items()}


def get_target(name: str, version: str | None = None) -> TargetCapabilities:
    """The capability table of target ``name`` at ``version`` (None: the default, oldest supported)."""
    if name not in VERSIONS:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    tables = VERSIONS[name]
    key = DEFAULT_VERSIONS[name] if version is None else str(version).strip().lower()
    if key not in tables:
        flag = "--vllm-version" if name == "vllm" else "--transformers-version"
        raise ValueError(f"unknown {flag} {version!r} for target {name}; choose from {', '.join(tables)}")
    return tables[key]


def dense_scheme_group(config_groups: dict) -> str | None:
    """The config group name transformers 5.25 dequantizes every dense module with (``dequantize=True``):
    ``get_dense_scheme`` takes the first group none of whose ``re:`` targets mention ``experts``, else
    the first group. Written out here (not imported) so the rule holds whatever transformers is installed."""
    names = list(config_groups)
    for name in names:
        targets = getattr(config_groups[name], "targets", None) or config_groups[name].get("targets", [])
        if not any(t.startswith("re:") and "experts" in t for t in targets):
            return name
    return names[0] if names else None


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
    return f"{target.label} ({target.versions}) runs MoE experts at {widths} bits only, not {bits}"


def moe_symmetry_problem(target: TargetCapabilities, bits: int | None, symmetric: bool) -> str | None:
    """VL302 / HF202: the width is supported, but not with this symmetry."""
    if target.moe_schemes is None or bits not in {s.bits for s in target.moe_schemes}:
        return None  # unsupported width: moe_width_problem's finding
    if MoeScheme(bits, symmetric) in target.moe_schemes:
        return None
    kind = "asymmetric" if not symmetric else "symmetric"
    runs = ", ".join(f"{s.bits}-bit {'sym' if s.symmetric else 'asym'}" for s in target.moe_schemes)
    return f"{target.label} ({target.versions}) does not run {bits}-bit {kind} experts (runs: {runs})"


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


def dense_width_problem(target: TargetCapabilities, module_scheme: tuple, experts_scheme: tuple,
                        dense_scheme: tuple | None = None) -> str | None:
    """HF203: a quantized attention / shared-expert linear uses the scheme the runtime dequantizes it with:
    the experts' (transformers 5.24) or the one dense scheme (5.25, ``dense_scheme``: the resolved group's)."""
    if target.dense_schemes == DENSE_AS_EXPERTS and module_scheme != experts_scheme:
        return (f"{target.label} dequantizes it with the experts' scheme "
                f"{_describe(experts_scheme)}, not its own {_describe(module_scheme)}")
    if target.dense_schemes == DENSE_ONE_SCHEME and dense_scheme is not None and module_scheme != dense_scheme:
        return (f"{target.label} (with dequantize=True) dequantizes every dense module with one scheme "
                f"{_describe(dense_scheme)} (get_dense_scheme), not its own {_describe(module_scheme)}; "
                "give all quantized attention / shared-expert linears one width")
    return None


def dense_bits_problem(target: TargetCapabilities, bits: int | None) -> str | None:
    """VL305: a quantized attention / shared-expert linear has a width the runtime's dense path runs."""
    if target.dense_bits is None or bits is None or bits in target.dense_bits:
        return None
    return f"{target.label} ({target.versions}) runs quantized linears at {list(target.dense_bits)} bits only, not {bits}"


def pack_factor_problem(target: TargetCapabilities, bits: int | None, hidden: int, intermediate: int) -> str | None:
    """VL306: the experts' input dimensions (hidden for gate/up, intermediate for down) are multiples of
    32 // bits, the codes one int32 of vLLM's MoE weight holds."""
    if not target.moe_k_multiple_of_pack_factor or not bits or 32 % bits:
        return None
    pack = 32 // bits
    bad = [f"{what} {k}" for what, k in (("hidden size", hidden), ("intermediate size", intermediate)) if k % pack]
    if not bad:
        return None
    return (f"{target.label} allocates MoE weights as K // {pack} int32 rows at {bits} bits: "
            f"{' and '.join(bad)} not a multiple of {pack}")


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
    "ALL", "DEFAULT_VERSIONS", "DENSE_ANY", "DENSE_AS_EXPERTS", "DENSE_ONE_SCHEME", "ERROR", "HF", "HF_525",
    "TARGETS", "VERSIONS", "VLLM", "VLLM_HUMMING", "WARNING", "MarlinRule", "MoeScheme", "TargetCapabilities",
    "dense_bits_problem", "dense_layer_problem", "dense_scheme_group", "dense_width_problem", "get_target", "layer_schemes_problem",
    "marlin_problem", "model_experts_schemes_problem", "moe_symmetry_problem", "moe_width_problem", "pack_factor_problem", "scheme_key",
]
