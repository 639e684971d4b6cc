"""Rebuilding a moecompress native checkpoint's runtime modules, and the HfQuantizer that does it.

Registered on ``import moecompress`` (the package imports this module). ``AutoModelForCausalLM.
from_pretrained(OUT)`` then builds the skeleton, our quantizer swaps every module listed in
``quantization_config.modules`` for its runtime twin (:class:`PackedExperts` / :class:`PackedLinear` /
:class:`CompressedExpertsBlock`) while the model is still on ``meta``, and the loader fills the packed
buffers straight from the checkpoint: memory held is the packed size.

The layer-by-layer loader (:class:`moecompress.model.loading.LayerwiseModel`) sits below the runtime
modules, so it does not import this module: the same :func:`apply_native_structure` is registered here
(``quant.hf_integration.register_native_structure``), as the quantizer is registered with transformers.

The config half (:class:`~moecompress.quant.hf_integration.MoeCompressConfig`, what the checkpoint's
``quantization_config`` holds) is format metadata and lives in :mod:`moecompress.quant.hf_integration`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.base import HfQuantizer

from moecompress.errors import MoeCompressError
from moecompress.model.expert_groups import apply_expert_groups
from moecompress.modules.compressed_experts import MODULE_TYPE, CompressedExpertsBlock
from moecompress.modules.packed import ExpertsSpec, PackedExperts, PackedLinear
from moecompress.quant.format import check_readable_format
from moecompress.quant.hf_integration import GUARD_SHARD, QUANT_METHOD, register_native_structure

__all__ = ["MoeCompressHfQuantizer", "apply_native_structure", "build_packed_module", "replace_modules"]


def build_packed_module(description: dict, dtype: torch.dtype, existing: torch.nn.Module | None = None) -> torch.nn.Module:
    """An empty packed module from its description in ``MoeCompressConfig.modules``.

    ``existing`` is the module currently at that path; wrapper types (``compressed_experts_block``)
    keep it inside themselves (its children under their own names) instead of replacing it.
    """
    kind = description["type"]
    if kind == MODULE_TYPE:
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
    and wrapped modules first, then expert -> group maps (which may sit on a packed module).

    Refuses a packing format this version cannot read (``quant.format.READABLE_FORMATS``)."""
    try:
        check_readable_format(quantization_config.get("format"))
    except ValueError as error:
        raise MoeCompressError(str(error)) from None
    replace_modules(model, quantization_config.get("modules", {}), dtype)
    apply_expert_groups(model, quantization_config.get("expert_groups", {}))


register_native_structure(apply_native_structure)


def guard_keys(files) -> list[str]:
    """The tensor names in a checkpoint's load-guard shard (none for one written before the guard)."""
    from moecompress.model.checks import checkpoint_keys

    return checkpoint_keys([f for f in files if Path(f).name == GUARD_SHARD])


@register_quantizer(QUANT_METHOD)
class MoeCompressHfQuantizer(HfQuantizer):
    """Loads moecompress native checkpoints packed (never dequantized to dense)."""

    requires_calibration = True  # only pre-quantized checkpoints can be loaded

    def _process_model_before_weight_loading(self, model, **kwargs):
        dtype = getattr(model.config, "dtype", None) or torch.get_default_dtype()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        apply_native_structure(model, self.quantization_config.to_dict(), dtype)
        files = kwargs.get("checkpoint_files")
        guards = guard_keys(files or [])
        if guards:  # the load guard's tripwires (export.load_guard) name no tensor of the runtime modules
            ignore = set(model._keys_to_ignore_on_load_unexpected or [])
            model._keys_to_ignore_on_load_unexpected = ignore | {f"^{re.escape(k)}$" for k in guards}
            files = [f for f in files if Path(f).name != GUARD_SHARD]
        if files:  # refuse an incomplete checkpoint before transformers fills a missing buffer with garbage
            from moecompress.model.checks import check_native_tensors, checkpoint_keys

            check_native_tensors(model, self.quantization_config.to_dict(), checkpoint_keys(files), Path(files[0]).parent)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self) -> bool:
        return False  # moecompress writes its own checkpoints (moecompress.export.writer)

    @property
    def is_trainable(self) -> bool:
        return False
