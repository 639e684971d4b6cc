"""Plain Hugging Face checkpoints with fewer experts: the same architecture, a smaller expert count.

A pruned or merged model is exported as the family's ordinary checkpoint: ``from_pretrained`` loads it
without moecompress. Per MoE layer the experts module's fused parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``, biases ``[E, ...]``) become ``[E', ...]`` tensors, the router's rows
(``weight [E, H]``, ``bias [E]``, ``e_score_correction_bias [E]``) are sliced the same way, and the
module attributes that forwards read (``num_experts``, ``out_features`` of an ``nn.Linear`` router)
follow, so the resized layer runs in memory exactly as the reloaded checkpoint will. The writer's
``revert_weight_conversion`` splits fused tensors along dim 0 by their actual size, so the new layer
is written as ``experts.0 .. experts.{E'-1}`` under the family's original names.

The config's expert count is stored under whichever of ``num_experts`` / ``num_local_experts`` /
``n_routed_experts`` the family serialises. Constraints checked before any work starts:

* ``E' >= top_k`` (a router cannot select more experts than exist);
* group-limited routing (DeepSeek-V3, GLM-4-MoE: ``n_group`` groups of contiguous experts, the
  ``topk_group`` best groups by the sum of their two best scores): ``E' % n_group == 0``, at least 2
  experts per group, and ``top_k <= topk_group * E' / n_group``. Passes keep the same number of
  experts in every routing group, so each surviving expert stays in its original group.

``kept_experts.json`` records, per decoder layer, the original expert ids behind each new expert
slot (pruning) or each group's members (merging).

Shape legend: E experts before, E' after, H hidden size, I expert intermediate size.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from moecompress.errors import MoeCompressError
from moecompress.model.expert_groups import resize_rows, set_count_attributes
from moecompress.model.families import EXPERT_COUNT_KEYS, config_top_k
from moecompress.model.view import MoEBlockView

KEPT_EXPERTS_FILE = "kept_experts.json"
KEPT_EXPERTS_FORMAT = "moecompress-kept-experts"
KEPT_EXPERTS_VERSION = 1


# ----------------------------------------------------------------------------- config


def expert_count_keys(config) -> list[str]:
    """The expert-count keys this config serialises (one of :data:`EXPERT_COUNT_KEYS` for every family)."""
    stored = config.to_dict()
    keys = [k for k in EXPERT_COUNT_KEYS if isinstance(stored.get(k), int)]
    if not keys:
        raise MoeCompressError(
            f"config of model type {getattr(config, 'model_type', '?')!r} stores none of {EXPERT_COUNT_KEYS}; "
            "cannot write a checkpoint with fewer experts for it"
        )
    return keys


def config_expert_count(config) -> int:
    return int(config.to_dict()[expert_count_keys(config)[0]])


def routing_groups(config) -> tuple[int, int]:
    """(n_group, topk_group) of group-limited routing; (1, 1) for families without it."""
    n_group = getattr(config, "n_group", None) or 1
    topk_group = getattr(config, "topk_group", None) or n_group
    return int(n_group), int(topk_group)


def check_expert_count(config, new_count: int) -> None:
    """Raise a one-line error unless a checkpoint of this family can have ``new_count`` experts per layer."""
    top_k = int(config_top_k(config) or 1)
    old = config_expert_count(config)
    if not 1 <= new_count <= old:
        raise MoeCompressError(f"{new_count} experts per layer is outside [1, {old}]; ask for between 1 and {old}")
    if new_count < top_k:
        raise MoeCompressError(
            f"{new_count} experts per layer is fewer than the {top_k} experts every token is routed to (top-k); "
            f"keep at least {top_k}"
        )
    n_group, topk_group = routing_groups(config)
    if n_group > 1:
        if new_count % n_group:
            raise MoeCompressError(
                f"{new_count} experts do not split into the model's {n_group} routing groups (n_group); "
                f"use a multiple of {n_group}"
            )
        per_group = new_count // n_group
        if per_group < 2:
            raise MoeCompressError(
                f"{new_count} experts leave {per_group} per routing group; group-limited routing scores each "
                f"group by its two best experts, so keep at least {2 * n_group}"
            )
        if top_k > topk_group * per_group:
            raise MoeCompressError(
                f"top-k {top_k} exceeds the {topk_group} selected groups x {per_group} experts per group; "
                f"keep at least {n_group * -(-top_k // topk_group)} experts"
            )


def with_expert_count(config, new_count: int):
    """A copy of ``config`` whose expert count is ``new_count`` (every key the family stores)."""
    out = copy.deepcopy(config)
    for key in expert_count_keys(config):
        setattr(out, key, int(new_count))
    return out


# ----------------------------------------------------------------------------- resizing a block


@torch.no_grad()
def resize_experts(block: MoEBlockView, slots: Sequence[int]) -> None:
    """Rebuild ``block`` with ``E' = len(slots)`` experts: new slot r starts as old expert ``slots[r]``.

    Fused expert parameters, router rows, router bias and ``e_score_correction_bias`` are sliced with
    one index; each is a NEW tensor of shape ``[E', ...]`` (so ``state_dict`` and the written checkpoint
    have the new shapes). Shared experts and ``shared_expert_gate`` are untouched. A slot may repeat an
    expert (callers then overwrite its weights).
    """
    old = block.num_experts
    slots = [int(e) for e in slots]
    if not slots or any(not 0 <= e < old for e in slots):
        raise MoeCompressError(f"layer {block.layer_index}: expert slots {slots} must be ids in [0, {old})")
    index = torch.as_tensor(slots, dtype=torch.long)
    new = len(slots)
    router = block.router.module
    if router.weight.shape[0] != old:
        raise MoeCompressError(
            f"layer {block.layer_index}: router has {router.weight.shape[0]} rows for {old} experts; cannot resize"
        )
    resize_rows(block.experts.module, old, index)
    resize_rows(router, old, index)
    for module in (block.experts.module, router, block.block):
        set_count_attributes(module, old, new)
    block.router.num_experts = new


@torch.no_grad()
def router_with_rows(block: MoEBlockView, slots: Sequence[int], weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A copy of ``block``'s router resized to ``slots`` (as :func:`resize_experts` would) holding
    rows ``weight [E', H]`` (and ``bias``): the routing a standard merge will apply, computed before
    the block itself is changed."""
    old = block.router.module.weight.shape[0]
    index = torch.as_tensor([int(e) for e in slots], dtype=torch.long)
    router = copy.deepcopy(block.router.module)
    resize_rows(router, old, index)
    set_count_attributes(router, old, len(index))
    router.weight.copy_(weight.to(router.weight.dtype))
    router_bias = getattr(router, "bias", None)
    if bias is not None and isinstance(router_bias, torch.Tensor):
        router_bias.copy_(bias.to(router_bias.dtype))
    return router


@torch.no_grad()
def set_router_rows(block: MoEBlockView, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Write router rows ``weight [E', H]`` (and ``bias [E']`` when the router has a bias) in place."""
    router = block.router.module
    router.weight.copy_(weight.to(router.weight.dtype))
    router_bias = getattr(router, "bias", None)
    if bias is not None and isinstance(router_bias, torch.Tensor):
        router_bias.copy_(bias.to(router_bias.dtype))


# ----------------------------------------------------------------------------- kept_experts.json


def kept_experts_record(
    method: str, num_experts_before: int, num_experts_after: int, layers: dict[int, list], **extra
) -> dict:
    """The JSON record: ``layers`` maps decoder layer -> original ids per new slot (pruning) or group
    members per new slot (merging, first member = dominant)."""
    return {
        "format": KEPT_EXPERTS_FORMAT,
        "version": KEPT_EXPERTS_VERSION,
        "method": method,
        "num_experts_before": int(num_experts_before),
        "num_experts_after": int(num_experts_after),
        **extra,
        "layers": {str(i): layers[i] for i in sorted(layers)},
    }


def write_kept_experts(folder: str | Path, record: dict) -> Path:
    """Write the record with one line per decoder layer (readable, still plain JSON)."""
    path = Path(folder) / KEPT_EXPERTS_FILE
    head = {k: v for k, v in record.items() if k != "layers"}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    layers = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in record["layers"].items()]
    text = "{\n" + "\n".join(lines) + '\n  "layers": {\n' + ",\n".join(layers) + "\n  }\n}\n"
    json.loads(text)  # the hand layout must stay valid JSON
    path.write_text(text)
    return path


def read_kept_experts(folder: str | Path) -> dict:
    path = Path(folder) / KEPT_EXPERTS_FILE
    if not path.is_file():
        raise MoeCompressError(f"{path} not found; the folder was not written by moecompress prune/merge")
    record = json.loads(path.read_text())
    if record.get("format") != KEPT_EXPERTS_FORMAT:
        raise MoeCompressError(f"{path} is not a moecompress kept-experts record")
    return record
