"""Refusing broken models at load, before any work starts: one line saying what is wrong and what to do.

* :func:`check_config_dtype` — ``dtype`` / ``torch_dtype`` in config.json that is not a floating torch
  dtype (transformers itself fails with a traceback on an unknown name);
* :func:`check_routing_config` — top-k of 0 or above the expert count, group-limited routing that
  cannot select top-k experts;
* :func:`check_finite` — NaN/Inf in a materialised module's weights (a corrupt checkpoint);
* :func:`check_native_tensors` — a native (``quant_method: "moecompress"``) checkpoint lacking a tensor
  its ``quantization_config`` promises (the loader would leave it as uninitialised memory: NaN or
  garbage far from the cause). Used by the layer-wise loader and by the HfQuantizer;
* :func:`check_checkpoint_complete` — any checkpoint lacking a parameter the model has (the layer-wise
  loader would find out only when it reaches that layer, after the work before it).

Nothing here imports the runtime modules: the checks read configs, key lists and tensors only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from moecompress.errors import MoeCompressError, UnsupportedModelError
from moecompress.model.families import EXPERT_COUNT_KEYS, TOP_K_KEYS  # config keys, defined once

# Weight dtypes a config.json may name (``dtype`` / ``torch_dtype``): what layers can be computed in.
CONFIG_DTYPES = ("float32", "bfloat16", "float16", "float64")
# Elements per isfinite() call: bounds the temporary bool tensor (16 MiB) whatever the tensor's size.
FINITE_CHUNK = 1 << 24

_BROKEN = "the model config is broken: fix it or re-save the model"


# ----------------------------------------------------------------------------- config.json


def check_config_dtype(raw: dict, where) -> None:
    """``raw``: config.json as parsed JSON. Refuses a ``dtype`` / ``torch_dtype`` that is not one of
    :data:`CONFIG_DTYPES` (spelled as transformers reads it: ``bfloat16``, not ``torch.bfloat16``)."""
    for key in ("dtype", "torch_dtype"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or value not in CONFIG_DTYPES:
            raise UnsupportedModelError(
                f"{where}: {key} must be one of {', '.join(CONFIG_DTYPES)} (the dtype the weights are stored in), "
                f"got {value!r}; {_BROKEN}"
            )


def _first_stored(stored: dict, keys: Sequence[str]) -> tuple[str | None, object]:
    """(key, value) of the first of ``keys`` present (not None) in a config dict; (None, None) when none is."""
    for key in keys:
        if stored.get(key) is not None:
            return key, stored[key]
    return None, None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_routing_config(config, where: str = "config.json") -> None:
    """Refuse a broken MoE config: top-k (``num_experts_per_tok`` or a family equivalent) of 0 or above
    the routed expert count, a non-positive expert count, or group-limited routing (``n_group`` /
    ``topk_group``) whose selected groups hold fewer than top-k experts. Silent for configs storing
    neither key (dense or unknown families: the MoE view refuses those itself)."""
    try:
        stored = config.to_dict()
    except Exception:  # not a PretrainedConfig: nothing to read here
        return
    e_key, num = _first_stored(stored, EXPERT_COUNT_KEYS)
    k_key, top_k = _first_stored(stored, TOP_K_KEYS)
    if e_key is not None and (not _is_int(num) or num < 1):
        raise UnsupportedModelError(f"{where}: {e_key} (routed experts per layer) must be an integer >= 1, got {num!r}; {_BROKEN}")
    if k_key is None:
        return
    if not _is_int(top_k) or top_k < 1 or (e_key is not None and top_k > num):
        upper = f" and at most {e_key} ({num})" if e_key is not None else ""
        raise UnsupportedModelError(
            f"{where}: {k_key} (experts per token, top-k) must be an integer >= 1{upper}, got {top_k!r}; {_BROKEN}"
        )
    n_group, topk_group = stored.get("n_group"), stored.get("topk_group")
    if e_key is None or not _is_int(n_group) or n_group <= 1:
        return
    if num % n_group:
        raise UnsupportedModelError(f"{where}: {e_key} ({num}) must split evenly into n_group ({n_group}) routing groups; {_BROKEN}")
    if topk_group is not None and (not _is_int(topk_group) or not 1 <= topk_group <= n_group):
        raise UnsupportedModelError(f"{where}: topk_group must be an integer in [1, n_group ({n_group})], got {topk_group!r}; {_BROKEN}")
    reachable = (topk_group or n_group) * (num // n_group)
    if top_k > reachable:
        raise UnsupportedModelError(
            f"{where}: {k_key} must be at most {reachable} (topk_group {topk_group} selected routing groups of "
            f"{num // n_group} experts), got {top_k}; {_BROKEN}"
        )


# ----------------------------------------------------------------------------- weights


def all_finite(t: torch.Tensor) -> bool:
    """True when a tensor holds no NaN/Inf (non-floating and meta tensors: True). Checked in chunks of
    :data:`FINITE_CHUNK` elements, so no temporary as large as the tensor is made."""
    if not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta":
        return True
    flat = t.detach().reshape(-1)
    if flat.numel() <= FINITE_CHUNK:
        return bool(torch.isfinite(flat).all())
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(FINITE_CHUNK))


def _checkpoint_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) of the parameters and persistent buffers (what a checkpoint holds), each once."""
    seen: set[int] = set()
    for sub_name, sub in module.named_modules(remove_duplicate=False):
        own = [(n, t) for n, t in sub._parameters.items()]
        own += [(n, t) for n, t in sub._buffers.items() if n not in sub._non_persistent_buffers_set]
        for name, t in own:
            if t is None or id(t) in seen:  # tied weights are checked once
                continue
            seen.add(id(t))
            yield (f"{sub_name}.{name}" if sub_name else name), t


@torch.no_grad()
def check_finite(module: nn.Module, prefix: str, folder, skip_prefix: str | None = None) -> None:
    """Refuse a materialised module whose parameters or persistent buffers hold NaN/Inf.

    ``prefix``: the module's path in the model (for the message); ``skip_prefix``: tensors whose full
    name lies under it are not checked (the decoder layers, when checking the outer weights)."""
    for name, t in _checkpoint_tensors(module):
        full = f"{prefix}.{name}" if prefix else name
        if skip_prefix is not None and full.startswith(skip_prefix + "."):
            continue
        if not all_finite(t):
            raise MoeCompressError(
                f"{folder}: tensor {full} holds NaN/Inf values; the checkpoint is corrupt: re-download the model "
                "or re-run the command that wrote it"
            )


# ----------------------------------------------------------------------------- native checkpoints


def promised_tensors(model: nn.Module, quantization_config: dict) -> list[str]:
    """Model-side names of the tensors a native checkpoint's ``quantization_config`` promises: the own
    parameters and persistent buffers of every module listed in ``modules`` (a packed module's are all
    its tensors; a wrapper's children are the family's own modules, or listed themselves).

    ``model``: the skeleton after the native structure was applied (meta is fine)."""
    names: list[str] = []
    for path in quantization_config.get("modules", {}) or {}:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise MoeCompressError(
                f"quantization_config lists module {path!r}, which this model does not have; the checkpoint is "
                "corrupt or its config.json belongs to another model: re-run the command that wrote it"
            ) from None
        for name, t in module._parameters.items():
            if t is not None:
                names.append(f"{path}.{name}")
        for name, t in module._buffers.items():
            if t is not None and name not in module._non_persistent_buffers_set:
                names.append(f"{path}.{name}")
    return names


def checkpoint_keys(files: Iterable[str | Path]) -> list[str]:
    """The tensor names in safetensors files (headers only)."""
    from safetensors import safe_open

    keys: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                keys += list(f.keys())
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise MoeCompressError(f"cannot read {file}: {exc}; the file is corrupt or not safetensors") from exc
    return keys


# Per-expert checkpoint names (``experts.7.w1.weight``) of one layer all rename to the same fused tensor:
# renaming one of them per layer is enough (a checkpoint may hold tens of thousands).
_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def present_names(model: nn.Module, keys: Iterable[str], mapping=None) -> set[str]:
    """The model-side names the checkpoint ``keys`` fill: each key as it is and as the loader renames
    it (``mapping``: the model's weight conversion mapping, e.g. Mixtral's ``block_sparse_moe`` ->
    ``mlp``, per-expert names -> fused experts)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    if mapping is None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    present = set(keys)
    by_template: dict[str, list[str]] = {}
    for key in sorted(present):
        by_template.setdefault(_EXPERT_INDEX.sub(".experts.0.", key), []).append(key)
    for first, *others in by_template.values():
        renamed = rename_source_key(first, renamings, converters)[0]
        present.add(renamed)
        if others and _EXPERT_INDEX.search(renamed):  # renamed per expert, not fused: rename each
            present.update(rename_source_key(k, renamings, converters)[0] for k in others)
    return present


def check_checkpoint_complete(model: nn.Module, keys: Iterable[str], folder, mapping=None, optional: Iterable[str] = ()) -> None:
    """Refuse a checkpoint whose safetensors ``keys`` fill no tensor for one of the model's parameters
    (``model``: the skeleton, meta is fine; ``optional``: names that may be absent, e.g. a tied output
    head). One expert missing from a fused stack is found when its layer is loaded."""
    present = present_names(model, keys, mapping)
    skip = set(optional)
    missing = [name for name, _ in model.named_parameters() if name not in present and name not in skip]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MoeCompressError(
            f"checkpoint {folder} lacks {missing[0]}{more}: the checkpoint is incomplete (in none of its safetensors "
            "files); re-download the model or re-run the command that wrote it"
        )


def check_native_tensors(model: nn.Module, quantization_config: dict, keys: Iterable[str], folder, mapping=None) -> None:
    """Refuse a native checkpoint whose safetensors ``keys`` lack a tensor its config promises.

    Checkpoint keys are renamed as the loader renames them (:func:`present_names`) before they are compared."""
    promised = promised_tensors(model, quantization_config)
    if not promised:
        return
    present = present_names(model, keys, mapping)
    missing = [name for name in promised if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MoeCompressError(
            f"{folder}: the checkpoint is incomplete: tensor {missing[0]}{more}, promised by its quantization_config, "
            "is in none of its safetensors files; re-run the moecompress command that wrote it"
        )
