"""A native checkpoint never loads with random experts: the load guard.

Without moecompress registered (``import moecompress`` not run, or moecompress not installed),
transformers only warns "Unknown quantization type, got moecompress", skips the quantization and
builds the family's own modules; the packed tensors (``w4_gate_up_qweight``, ...) match none of them,
so the experts, and any packed attention projection, would be *newly initialised*: random weights
behind a warning most users never read. transformers has no plugin hook that a checkpoint can trigger
(no entry point for quantizers), so the checkpoint carries its own tripwire instead.

For every module the ``quantization_config`` replaces, each parameter the family's own module has and
the checkpoint does not fill (e.g. ``model.layers.0.mlp.experts.gate_up_proj``) is written as a
one-element int8 tensor into one small extra shard, :data:`GUARD_SHARD`. A plain transformers load
then finds that tensor at the parameter's own name with the wrong shape and stops with its size
mismatch error ("You set `ignore_mismatched_sizes` to `False`, thus raising an error"), listing the
moecompress tensors beside the "Unknown quantization type, got moecompress" warning. With moecompress
registered, the runtime modules have no parameter of that name: our quantizer tells transformers to
ignore the guard's keys, and our layer-by-layer loader never reads the guard shard.

Cost: one byte per replaced parameter (two per MoE layer), one shard file.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moecompress.quant.hf_integration import GUARD_SHARD


def _plain_skeleton(config) -> nn.Module:
    """The family's own model (no moecompress module) on ``meta``: the one plain transformers builds."""
    from transformers import AutoModelForCausalLM

    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(plain)


def _own_tensor_names(module: nn.Module, path: str) -> list[str]:
    names = [f"{path}.{n}" for n, p in module.named_parameters() if p is not None]
    names += [f"{path}.{n}" for n, b in module.named_buffers() if b is not None and _persistent(module, n)]
    return names


def _persistent(root: nn.Module, name: str) -> bool:
    owner_path, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return leaf not in owner._non_persistent_buffers_set


def guard_names(config, modules: dict, written_keys) -> list[str]:
    """The names a plain load would fill with random values: the family's own tensors under each
    replaced module path that no written tensor provides (renamed as transformers' loader renames)."""
    from moecompress.model.checks import present_names

    skeleton = _plain_skeleton(config)
    present = present_names(skeleton, written_keys)
    names: list[str] = []
    for path in modules:
        try:
            module = skeleton.get_submodule(path)
        except AttributeError:
            continue  # a path the family does not have (cannot be loaded plainly at all)
        names += [n for n in _own_tensor_names(module, path) if n not in present]
    return sorted(set(names))


def write_guard(folder: Path, names: list[str]) -> dict[str, str]:
    """Write the guard shard; returns its weight-map entries (name -> shard file)."""
    if not names:
        return {}
    save_file({n: torch.zeros(1, dtype=torch.int8) for n in names}, str(Path(folder) / GUARD_SHARD),
              metadata={"format": "pt"})
    return {n: GUARD_SHARD for n in names}


__all__ = ["GUARD_SHARD", "guard_names", "write_guard"]
