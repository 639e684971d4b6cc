"""`moecompress inspect`: what an MoE checkpoint is made of, read from its config (nothing loaded)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from moecompress.model.loading import LayerwiseModel

SIZE_BITS = (16, 8, 4, 3, 2)


@dataclass
class ModelSummary:
    model_type: str
    generic_path: bool
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    router_kind: str
    has_shared_experts: bool
    expert_layout: str
    expert_hidden_size: int
    expert_intermediate_size: int
    params_total: int
    params_routed_experts: int
    params_active: int
    checkpoint_bytes: int
    estimated_bytes: dict[str, int] = field(default_factory=dict)
    # Expert ids the router emits when they differ from the stored experts (an exact-router merge).
    router_outputs: int | None = None

    def as_json(self) -> dict:
        return asdict(self)


def summarize(folder: str | Path, group_size: int = 128) -> ModelSummary:
    """Summary of a model folder; the skeleton is built on the meta device, so this is instant."""
    from moecompress.quant.format import PER_CHANNEL, group_size_problem
    from moecompress.validation import fail

    if group_size_problem(None, group_size) is not None:
        fail("--group-size", f"a positive group length or {PER_CHANNEL} (per-channel)", group_size)
    lm = LayerwiseModel(folder)
    view = lm.view
    first = view.blocks[view.moe_layers[0]]
    routed = sum(b.experts.num_experts * b.experts.params_per_expert() for b in view.blocks.values())
    # Logical weights, also for a native checkpoint, whose packed experts and linears hold int32 codes in
    # buffers instead of parameters: routed experts from the view, packed linears from their description.
    in_experts = {id(p) for b in view.blocks.values() for p in b.experts.module.parameters()}
    packed_linears = sum(d["in_features"] * d["out_features"] + (d["out_features"] if d.get("bias") else 0)
                         for d in lm.packed_modules.values() if d.get("type") == "linear")
    total = sum(p.numel() for p in lm.model.parameters() if id(p) not in in_experts) + routed + packed_linears
    # A token computes at most top-k stored experts (fewer when an exact-router merge stores fewer than k).
    inactive = sum((b.num_experts - min(b.top_k, b.num_experts)) * b.experts.params_per_expert() for b in view.blocks.values())
    estimated = {}
    if group_size == PER_CHANNEL:  # one scale per row: a group is the whole input dimension
        group_size = first.experts.hidden_size
    for bits in SIZE_BITS:
        # Routed experts at `bits` (+ fp16 scale per group when quantized); everything else stays 16-bit.
        per_weight = 16 if bits == 16 else bits + 16 / group_size
        estimated[f"{bits}bit"] = int(((total - routed) * 16 + routed * per_weight) / 8)
    return ModelSummary(
        model_type=view.family,
        generic_path=view.generic,
        num_layers=view.num_layers,
        moe_layers=view.moe_layers,
        num_experts=first.num_experts,
        top_k=first.top_k,
        router_kind=first.router.scoring,
        has_shared_experts=any(b.shared is not None for b in view.blocks.values()),
        expert_layout=first.experts.layout,
        expert_hidden_size=first.experts.hidden_size,
        expert_intermediate_size=first.experts.intermediate_size,
        params_total=total,
        params_routed_experts=routed,
        params_active=total - inactive,
        checkpoint_bytes=lm.checkpoint.total_bytes(),
        estimated_bytes=estimated,
        router_outputs=len(first.expert_to_group) if first.expert_to_group is not None else None,
    )
