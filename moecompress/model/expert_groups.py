"""Expert -> group maps: E router outputs served by E' stored experts (the exact-router merge format).

M-SMoE's exact router keeps all E router rows and routes every expert id to its group's merged
expert. The experts module then holds only the E' merged experts, and a forward pre-hook rewrites
the routing it receives, ``top_k_index [T, k]`` with ids in ``[0, E)``, into group ids in
``[0, E')`` before the family's own forward (or :class:`~moecompress.modules.packed.PackedExperts`)
runs. Two selected experts of one group then both reach that group's expert, each with its own
routing weight: ``(w_a + w_b) * merged(x)``, which is exactly the paper's form.

The map is part of the checkpoint's structure, not of its tensors: ``quantization_config`` (quant
method ``moecompress``) lists it under ``expert_groups`` as ``{experts module path: [group of expert
0, group of expert 1, ...]}``; :func:`apply_expert_groups` rebuilds it when the skeleton is built
(``from_pretrained`` after ``import moecompress``, or the layer-wise loader), before any weight loads.

The hook is registered first among the module's pre-hooks (``prepend=True``), so every later hook
(statistics, calibration capture, refit) sees the group ids the stored experts are indexed by. The
map is a plain attribute (a tuple), not a buffer: the layer-wise loader moves layers to ``meta`` and
back, which would lose a non-persistent buffer's values.

Shape legend: T tokens, k top-k, E router outputs (original experts), E' stored (merged) experts.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moecompress.errors import MoeCompressError
from moecompress.model.families import EXPERT_COUNT_KEYS

MAP_ATTRIBUTE = "moecompress_expert_to_group"
_HOOK_ATTRIBUTE = "_moecompress_expert_group_hook"


def check_expert_to_group(expert_to_group: Sequence[int]) -> int:
    """Validate a map (every group id used, ids ``0 .. E'-1``); return E'."""
    ids = [int(g) for g in expert_to_group]
    if not ids:
        raise MoeCompressError("an expert -> group map needs at least one expert")
    num_groups = max(ids) + 1
    if min(ids) < 0 or sorted(set(ids)) != list(range(num_groups)):
        raise MoeCompressError(f"expert -> group map {ids} must use every group id 0..{num_groups - 1}; the checkpoint is corrupt")
    return num_groups


def expert_groups_of(module: nn.Module) -> tuple[int, ...] | None:
    """The expert -> group map installed on an experts module, or None."""
    return getattr(module, MAP_ATTRIBUTE, None)


def _index_position(module: nn.Module, args: tuple, kwargs: dict) -> tuple[str, int | str]:
    """Where ``top_k_index`` sits in this call: ("args", i) or ("kwargs", name). Families name it
    differently (GPT-OSS: ``router_indices``): the forward's second parameter, by name."""
    if len(args) >= 2:
        return "args", 1
    names = list(inspect.signature(module.forward).parameters)
    if len(names) < 2 or names[1] not in kwargs:
        raise MoeCompressError(f"{type(module).__name__} was called without the routing indices; cannot map experts to groups")
    return "kwargs", names[1]


def _group_table(module: nn.Module, device: torch.device) -> torch.Tensor:
    """``[E + 1]`` long on ``device``: expert id -> group id, and a last entry E' for ids outside
    ``[0, E)`` (expert-parallel sentinels), which the family's forward treats as 'no expert' as before.
    Cached per device; always rebuilt from the map itself (a meta-device call cannot poison it)."""
    cache = module.__dict__.setdefault("_moecompress_group_tables", {})
    key = str(device)
    if key not in cache:
        ids = expert_groups_of(module)
        cache[key] = torch.tensor([*ids, max(ids) + 1], dtype=torch.long, device=device)
    return cache[key]


def _map_routing_to_groups(module: nn.Module, args: tuple, kwargs: dict):
    where, key = _index_position(module, args, kwargs)
    index = args[key] if where == "args" else kwargs[key]
    table = _group_table(module, index.device)
    num = table.shape[0] - 1
    safe = torch.where((index >= 0) & (index < num), index.long(), num)
    mapped = table[safe].to(index.dtype)
    if where == "args":
        args = (*args[:key], mapped, *args[key + 1 :])
    else:
        kwargs = {**kwargs, key: mapped}
    return args, kwargs


def install_expert_groups(module: nn.Module, expert_to_group: Sequence[int]) -> None:
    """Make ``module`` (E' stored experts) accept expert ids ``[0, E)`` routed through the map.

    Idempotent: installing again replaces the map (a module never carries two hooks).
    """
    num_groups = check_expert_to_group(expert_to_group)
    stored = stored_expert_count(module)
    if stored is not None and stored != num_groups:
        raise MoeCompressError(f"the expert -> group map has {num_groups} groups but the module stores {stored} experts")
    ids = tuple(int(g) for g in expert_to_group)
    setattr(module, MAP_ATTRIBUTE, ids)
    module.__dict__.pop("_moecompress_group_tables", None)
    old = getattr(module, _HOOK_ATTRIBUTE, None)
    if old is not None:
        old.remove()
    handle = module.register_forward_pre_hook(_map_routing_to_groups, with_kwargs=True, prepend=True)
    setattr(module, _HOOK_ATTRIBUTE, handle)


def stored_expert_count(module: nn.Module) -> int | None:
    """Experts a module stores: rows of ``down_proj`` (family modules) or its spec (packed modules)."""
    spec = getattr(module, "spec", None)
    if spec is not None and hasattr(spec, "num_experts"):
        return int(spec.num_experts)
    down = getattr(module, "down_proj", None)
    return int(down.shape[0]) if isinstance(down, torch.Tensor) else None


@torch.no_grad()
def resize_rows(module: nn.Module, old_count: int, index: torch.Tensor) -> None:
    """Replace every direct parameter/buffer with ``old_count`` rows by its rows ``index`` (NEW tensors,
    so ``state_dict`` and written checkpoints get the new shapes; works on ``meta`` too)."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.ndim >= 1 and param.shape[0] == old_count:
            rows = param.detach().index_select(0, index.to(param.device)).clone()
            setattr(module, name, nn.Parameter(rows, requires_grad=param.requires_grad))
    for name, buf in list(module.named_buffers(recurse=False)):
        if buf is not None and buf.ndim >= 1 and buf.shape[0] == old_count:
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, buf.index_select(0, index.to(buf.device)).clone(), persistent=persistent)


def set_count_attributes(module: nn.Module, old_count: int, new_count: int) -> None:
    """The integer attributes a family's forward reads the expert count from (and an ``nn.Linear``
    router's ``out_features``) follow a resize."""
    for attr in EXPERT_COUNT_KEYS:
        if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == old_count:
            setattr(module, attr, new_count)
    if isinstance(module, nn.Linear) and module.out_features == old_count:
        module.out_features = new_count


def keep_expert_rows(module: nn.Module, slots: Sequence[int]) -> None:
    """Rebuild a family experts module to hold ``E' = len(slots)`` experts, row r = old expert ``slots[r]``."""
    old = stored_expert_count(module)
    if old is None:
        raise MoeCompressError(f"{type(module).__name__} is not an experts module; cannot resize it")
    ids = [int(e) for e in slots]
    if not ids or min(ids) < 0 or max(ids) >= old:
        raise MoeCompressError(f"expert slots {ids} must be ids in [0, {old})")
    # Explicit device: transformers builds skeletons under a default-device context (meta).
    resize_rows(module, old, torch.tensor(ids, dtype=torch.long, device="cpu"))
    set_count_attributes(module, old, len(ids))


def apply_expert_groups(model: nn.Module, expert_groups: Mapping[str, Sequence[int]]) -> None:
    """Rebuild the grouped experts modules of a freshly built skeleton (before weights load).

    Family experts modules still have E rows: they are shrunk to E' (on ``meta``: shapes only).
    Packed modules already hold E' experts (their spec says so). Then the map is installed.
    """
    for path, expert_to_group in expert_groups.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise MoeCompressError(f"the checkpoint groups the experts of {path!r}, which this model does not have") from None
        num_groups = check_expert_to_group(expert_to_group)
        if stored_expert_count(module) != num_groups and getattr(module, "spec", None) is None:
            keep_expert_rows(module, range(num_groups))
        install_expert_groups(module, expert_to_group)

