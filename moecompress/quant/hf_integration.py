"""`quant_method: "moecompress"` for transformers: the quantization config and the HfQuantizer.

Registered on ``import moecompress``. ``AutoModelForCausalLM.from_pretrained(OUT)`` then builds the
skeleton, our quantizer swaps every module listed in ``quantization_config.modules`` for its packed
twin (:class:`PackedExperts` / :class:`PackedLinear`) while the model is still on ``meta``, and the
loader fills the packed buffers straight from the checkpoint: memory held is the packed size.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from moecompress.model.expert_groups import apply_expert_groups
from moecompress.quant.packed_modules import ExpertsSpec, PackedExperts, PackedLinear

QUANT_METHOD = "moecompress"
CONFIG_VERSION = 1


@register_quantization_config(QUANT_METHOD)
class MoeCompressConfig(QuantizationConfigMixin):
    """What the native checkpoint holds.

    ``modules`` maps a module path to its packed description: ``{"type": "experts", <ExpertsSpec
    fields>}`` (each expert's width in ``bits``) or ``{"type": "linear", "in_features", "out_features",
    "bits", "group_size", "symmetric", "bias"}``. ``provenance`` records tool version, calibration and
    method; ``extra`` is free-form metadata (pruning, protection, allocation) carried for reports.
    ``expert_groups`` maps an experts module path to its expert -> group map (an exact-router merge:
    E router outputs, E' stored experts; :mod:`moecompress.model.expert_groups`).
    """

    def __init__(
        self,
        modules: dict[str, dict] | None = None,
        group_size: int = 128,
        symmetric: bool = True,
        format: str = "kpack-v1",
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


def build_packed_module(description: dict, dtype: torch.dtype, existing: torch.nn.Module | None = None) -> torch.nn.Module:
    """An empty packed module from its description in ``MoeCompressConfig.modules``.

    ``existing`` is the module currently at that path; wrapper types (``compressed_experts_block``)
    keep it inside themselves (its children under their own names) instead of replacing it.
    """
    kind = description["type"]
    if kind == "compressed_experts_block":
        from moecompress.passes.compressed_experts import CompressedExpertsBlock  # lazy: passes import this module

        if existing is None:
            raise ValueError("a compressed_experts_block needs the model's own MoE block to wrap")
        return CompressedExpertsBlock.from_description(existing, description, dtype)
    if kind == "experts":
        spec = ExpertsSpec.from_json({k: v for k, v in description.items() if k != "type"})
        return PackedExperts(spec, dtype=dtype)
    if kind == "linear":
        return PackedLinear(
            description["in_features"],
            description["out_features"],
            description["bits"],
            description["group_size"],
            description["symmetric"],
            description["bias"],
            dtype=dtype,
        )
    raise ValueError(f"unknown packed module type {kind!r}")


def replace_modules(model: torch.nn.Module, modules: dict[str, dict], dtype: torch.dtype) -> None:
    for path, description in modules.items():
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        existing = getattr(parent, attr, None)
        with torch.device("meta"):
            setattr(parent, attr, build_packed_module(description, dtype, existing))


def apply_native_structure(model: torch.nn.Module, quantization_config: dict, dtype: torch.dtype) -> None:
    """Turn a freshly built (``meta``) skeleton into the structure a native checkpoint holds: packed
    and wrapped modules first, then expert -> group maps (which may sit on a packed module)."""
    replace_modules(model, quantization_config.get("modules", {}), dtype)
    apply_expert_groups(model, quantization_config.get("expert_groups", {}))


def native_config(config) -> dict | None:
    """A config's moecompress ``quantization_config`` as a dict; None when it has none (or another method's)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc if qc.get("quant_method") == QUANT_METHOD else None


@register_quantizer(QUANT_METHOD)
class MoeCompressHfQuantizer(HfQuantizer):
    """Loads moecompress native checkpoints packed (never dequantized to dense)."""

    requires_calibration = True  # only pre-quantized checkpoints can be loaded

    def _process_model_before_weight_loading(self, model, **kwargs):
        dtype = getattr(model.config, "dtype", None) or torch.get_default_dtype()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        apply_native_structure(model, self.quantization_config.to_dict(), dtype)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self) -> bool:
        return False  # moecompress writes its own checkpoints (moecompress.export.native)

    @property
    def is_trainable(self) -> bool:
        return False
