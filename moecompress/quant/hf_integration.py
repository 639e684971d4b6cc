"""`quant_method: "moecompress"` for transformers: the quantization config a native checkpoint holds.

:class:`MoeCompressConfig` is registered with transformers on import; the quantizer that rebuilds the
runtime modules it lists is :mod:`moecompress.modules.hf_quantizer` (registered on ``import moecompress``
too). This half is format metadata only (no runtime module), so the model layer's loader can read it,
and the registration point through which the loader rebuilds the runtime modules without importing them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers.quantizers.auto import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from moecompress.errors import MoeCompressError
from moecompress.quant.format import CURRENT_FORMAT

QUANT_METHOD = "moecompress"
# The shard holding a native checkpoint's load guard (moecompress.export.load_guard): tripwires for a
# plain transformers load, never read by moecompress.
GUARD_SHARD = "moecompress-guard.safetensors"
CONFIG_VERSION = 1

# How a native checkpoint's structure (packed and wrapped modules, expert -> group maps) is rebuilt on a
# meta skeleton: ``apply(model, quantization_config: dict, dtype)``. The runtime modules sit above the
# model layer whose loader needs it, so moecompress.modules.hf_quantizer registers it here on import
# (``import moecompress`` imports it), next to the quantizer it registers with transformers.
_native_structure: Callable[[Any, dict, Any], None] | None = None


def register_native_structure(apply: Callable[[Any, dict, Any], None]) -> None:
    """Set the function that rebuilds a native checkpoint's structure (called once, by the runtime modules)."""
    global _native_structure
    _native_structure = apply


def rebuild_native_structure(model, quantization_config: dict, dtype) -> None:
    """Apply the registered function to a freshly built (``meta``) skeleton, as our quantizer does in
    ``from_pretrained``."""
    if _native_structure is None:  # cannot happen once `import moecompress` has run
        raise MoeCompressError("moecompress.modules.hf_quantizer is not imported; import moecompress first")
    _native_structure(model, quantization_config, dtype)


@register_quantization_config(QUANT_METHOD)
class MoeCompressConfig(QuantizationConfigMixin):
    """What the native checkpoint holds.

    ``modules`` maps a module path to its packed description: ``{"type": "experts", <ExpertsSpec
    fields>}`` (each expert's width in ``bits``) or ``{"type": "linear", "in_features", "out_features",
    "bits", "group_size", "symmetric", "bias"}``. ``provenance`` records tool version, calibration and
    method; ``format`` names the packing format (:mod:`moecompress.quant.format`: ``kpack-v2``, or
    ``kpack-v1`` in checkpoints written before it, read the same); ``extra`` is free-form metadata
    (pruning, protection, allocation) carried for reports.
    ``expert_groups`` maps an experts module path to its expert -> group map (an exact-router merge:
    E router outputs, E' stored experts; :mod:`moecompress.model.expert_groups`).
    """

    def __init__(
        self,
        modules: dict[str, dict] | None = None,
        group_size: int = 128,
        symmetric: bool = True,
        format: str = CURRENT_FORMAT,  # the packing format (quant.format); kpack-v1 checkpoints say "kpack-v1"
        version: int = CONFIG_VERSION,
        provenance: dict | None = None,
        extra: dict | None = None,
        expert_groups: dict[str, list[int]] | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.modules = modules or {}
        self.group_size = group_size
        self.symmetric = symmetric
        self.format = format
        self.version = version
        self.provenance = provenance or {}
        self.extra = extra or {}
        self.expert_groups = expert_groups or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format": self.format,
            "version": self.version,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "modules": self.modules,
            "provenance": self.provenance,
            "extra": self.extra,
            **({"expert_groups": self.expert_groups} if self.expert_groups else {}),
        }

    def expert_bits(self) -> dict[str, list[int]]:
        """Module path -> per-expert widths, for reports and budget checks."""
        return {k: v["bits"] for k, v in self.modules.items() if v["type"] == "experts"}


def native_config(config) -> dict | None:
    """A config's moecompress ``quantization_config`` as a dict; None when it has none (or another method's)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc if qc.get("quant_method") == QUANT_METHOD else None
