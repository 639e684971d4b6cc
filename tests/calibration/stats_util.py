"""Shared helpers of the router-statistics tests: a synthetic calibration set and the routing of a plain
full forward (what the layer-by-layer statistics are checked against)."""

from __future__ import annotations

import torch

from moecompress.calibration.collect import routing_call_args
from moecompress.calibration.types import CalibrationSet
from moecompress.model.view import describe_model

N_ROWS, SEQLEN = 5, 16
FAMILIES = ("qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe")  # distinct routers and expert layouts


def calib_set(seed: int = 0, domains=("prose", "code", "prose", "math", "code")) -> CalibrationSet:
    ids = torch.randint(3, 256, (N_ROWS, SEQLEN), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, list(domains) if domains else None, "synthetic")


def full_forward_routing(model, input_ids):
    """Router outputs and experts-module inputs of a plain full forward, per MoE layer."""
    view = describe_model(model)
    routed, experts_in, handles = {}, {}, []
    for i, block in view.blocks.items():
        def router_hook(_m, _a, out, i=i):
            routed.setdefault(i, []).append(tuple(t.detach().reshape(-1, t.shape[-1]) for t in out[:3]))

        def experts_hook(m, args, kwargs, i=i):
            experts_in.setdefault(i, []).append(tuple(t.detach() for t in routing_call_args(m, args, kwargs)))

        handles.append(block.router.module.register_forward_hook(router_hook))
        handles.append(block.experts.module.register_forward_pre_hook(experts_hook, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for h in handles:
        h.remove()
    return view, {i: [torch.cat(parts) for parts in zip(*v)] for i, v in routed.items()}, experts_in
