"""One view of an MoE model that every pass uses.

transformers 5.x stores a layer's routed experts as ONE module with fused 3-D parameters, decorated
with ``@use_experts_implementation`` whose flags give the layout (``integrations/moe.py``):

* ``is_concatenated`` - ``gate_up_proj`` rows are ``[gate; up]`` (True) or interleaved ``g0,u0,g1,u1..``
  (False, GPT-OSS);
* ``is_transposed``   - weights stored ``[E, in, out]`` instead of ``[E, out, in]`` (GPT-OSS);
* ``has_bias``        - ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]``;
* ``has_gate``        - False means an ``up_proj [E, I, H]`` with no gate (NemotronH).

:class:`ExpertsView` turns any of these into per-expert ``gate [I, H]``, ``up [I, H]``, ``down [H, I]``
matrices in ``nn.Linear`` layout. Reads return views where the layout allows; writes copy into the
fused parameter's slice in place, never materialising a second copy of the fused tensor.

The routing decision reaches the experts module as arguments ``(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])``, and every family's router returns ``(logits [T, E], top_k_weights,
top_k_index)``, so statistics need no per-family routing code: :class:`RouterView` only describes
the router (for reports, pruning and exporters) and calls the module itself.

Shape legend: T tokens, E experts, H hidden size, I expert intermediate size, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moecompress.errors import UnsupportedModelError
from moecompress.model.expert_groups import expert_groups_of
from moecompress.model.families import ROUTER_NAMES, SHARED_EXPERT_NAMES, SHARED_GATE_NAMES, config_top_k

# Families with tests (tests/model/test_view.py). Anything else with a standard experts module goes
# through the same generic code path, flagged as such in `inspect`.
SUPPORTED_FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "phimoe",
    "gpt_oss",
    "granitemoe",
    "glm4_moe",
)

PROJECTIONS = ("gate", "up", "down")


def is_experts_module(module: nn.Module) -> bool:
    """True for a module decorated with transformers' ``@use_experts_implementation``."""
    return hasattr(module, "is_concatenated") and hasattr(module, "has_gate") and hasattr(module, "down_proj")


# --------------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------------


@dataclass
class RouterView:
    """A layer's router: its parameters and how it scores and selects experts.

    ``scoring`` is one of ``softmax`` (softmax over all experts, then top-k), ``topk_softmax`` (top-k
    logits, softmax over the k; equal to ``softmax`` + renormalisation), ``sigmoid`` (DeepSeek-V3 /
    GLM-4-MoE: sigmoid scores, ``e_score_correction_bias`` for selection only, group-limited top-k)
    or ``sparsemixer`` (PhiMoE).
    """

    module: nn.Module
    num_experts: int
    top_k: int
    scoring: str
    norm_topk_prob: bool
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def e_score_correction_bias(self) -> torch.Tensor | None:
        return getattr(self.module, "e_score_correction_bias", None)

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> (logits [T, E], top_k_weights [T, k], top_k_index [T, k]) as the model routes."""
        logits, weights, index = self.module(hidden)[:3]
        return logits, weights, index

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Router probabilities over all experts [T, E] (before top-k), for statistics."""
        if self.scoring == "sigmoid":
            return logits.float().sigmoid()
        return logits.float().softmax(dim=-1)


def _router_scoring(router: nn.Module) -> str:
    if hasattr(router, "e_score_correction_bias"):
        return "sigmoid"
    name = type(router).__name__.lower()
    if "phimoe" in name:
        return "sparsemixer"
    if "gptoss" in name or "granite" in name:
        return "topk_softmax"
    return "softmax"


def _make_router_view(router: nn.Module, config, num_experts: int) -> RouterView:
    top_k = getattr(router, "top_k", None) or config_top_k(config)
    weight = getattr(router, "weight", None)
    rows = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else num_experts
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= rows:
        raise UnsupportedModelError(
            f"{type(router).__name__}: experts per token (top-k, num_experts_per_tok) must be an integer in [1, {rows}] "
            f"(the router's experts), got {top_k!r}; the model config is broken; fix it"
        )
    scoring = _router_scoring(router)
    norm = getattr(router, "norm_topk_prob", getattr(config, "norm_topk_prob", scoring != "softmax"))
    if type(router).__name__.startswith("Mixtral"):
        norm = True  # Mixtral always renormalises the top-k weights
    return RouterView(
        module=router,
        num_experts=num_experts,
        top_k=int(top_k),
        scoring=scoring,
        norm_topk_prob=bool(norm),
        n_group=getattr(router, "num_group", None),
        topk_group=getattr(router, "topk_group", None),
        routed_scaling_factor=getattr(router, "routed_scaling_factor", None),
    )


# --------------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------------


@dataclass
class ExpertsView:
    """Per-expert access to a fused experts module, whatever its layout."""

    module: nn.Module

    @property
    def num_experts(self) -> int:
        return self.module.down_proj.shape[0]

    @property
    def has_gate(self) -> bool:
        return bool(self.module.has_gate)

    @property
    def has_bias(self) -> bool:
        return bool(self.module.has_bias)

    @property
    def is_transposed(self) -> bool:
        return bool(self.module.is_transposed)

    @property
    def is_concatenated(self) -> bool:
        return bool(self.module.is_concatenated)

    @property
    def hidden_size(self) -> int:
        d = self.module.down_proj
        return d.shape[2] if self.is_transposed else d.shape[1]

    @property
    def intermediate_size(self) -> int:
        d = self.module.down_proj
        return d.shape[1] if self.is_transposed else d.shape[2]

    @property
    def layout(self) -> str:
        parts = ["concatenated" if self.is_concatenated else "interleaved"]
        parts.append("transposed" if self.is_transposed else "out-in")
        if self.has_bias:
            parts.append("bias")
        if not self.has_gate:
            parts.append("gateless")
        return ", ".join(parts)

    def params_per_expert(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        n = (3 if self.has_gate else 2) * h * i
        if self.has_bias:
            n += (2 * i if self.has_gate else i) + h
        return n

    # -- raw slices of the fused parameters, in [out, in] orientation (views, no copies) --

    def _fused_in(self) -> torch.Tensor:
        """The input-side fused parameter: gate_up_proj, or up_proj for gateless experts."""
        return self.module.gate_up_proj if self.has_gate else self.module.up_proj

    def _rows(self, param: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e of a fused parameter as [out, in] (a view).

        ``param[e]``, not ``param.data[e]``: a forward through these slices (``forward_expert``, the
        compressed-experts block) must keep the autograd graph, so that training the expert weights (or
        LoRA adapters substituted for them with ``functional_call``) gets a gradient. Writes go through
        :meth:`set` / :meth:`set_bias`, under ``no_grad``."""
        w = param[e]
        return w.t() if self.is_transposed else w

    def _proj_rows(self, e: int, proj: str) -> torch.Tensor:
        if proj == "down":
            return self._rows(self.module.down_proj, e)
        fused = self._rows(self._fused_in(), e)  # [2I or I, H]
        if not self.has_gate:
            if proj == "gate":
                raise KeyError("gateless experts have no gate projection")
            return fused
        i = self.intermediate_size
        if self.is_concatenated:
            return fused[:i] if proj == "gate" else fused[i:]
        return fused[0::2] if proj == "gate" else fused[1::2]

    def get(self, e: int, proj: str) -> torch.Tensor:
        """Expert e's ``proj`` weight in nn.Linear layout: gate/up [I, H], down [H, I] (a view)."""
        if proj not in PROJECTIONS:
            raise KeyError(f"unknown projection {proj!r}; expected one of {PROJECTIONS}")
        return self._proj_rows(e, proj)

    @torch.no_grad()
    def set(self, e: int, proj: str, weight: torch.Tensor) -> None:
        """Write expert e's ``proj`` weight (nn.Linear layout) into the fused parameter in place."""
        target = self.get(e, proj)
        if target.shape != weight.shape:
            raise ValueError(f"expert {e} {proj}: expected shape {tuple(target.shape)}, got {tuple(weight.shape)}")
        target.copy_(weight.to(target.dtype))

    def get_bias(self, e: int, proj: str) -> torch.Tensor | None:
        """Bias of expert e's projection ([I] for gate/up, [H] for down), or None."""
        if not self.has_bias:
            return None
        if proj == "down":
            return self.module.down_proj_bias[e]
        b = (self.module.gate_up_proj_bias if self.has_gate else self.module.up_proj_bias)[e]
        if not self.has_gate:
            return b
        i = self.intermediate_size
        if self.is_concatenated:
            return b[:i] if proj == "gate" else b[i:]
        return b[0::2] if proj == "gate" else b[1::2]

    @torch.no_grad()
    def set_bias(self, e: int, proj: str, bias: torch.Tensor) -> None:
        target = self.get_bias(e, proj)
        if target is None:
            raise KeyError("these experts have no biases")
        target.copy_(bias.to(target.dtype))

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """{'gate': [I,H], 'up': [I,H], 'down': [H,I]} (gate absent for gateless experts), as views."""
        return {p: self.get(e, p) for p in PROJECTIONS if self.has_gate or p != "gate"}

    def stacked(self, proj: str) -> torch.Tensor:
        """All experts' ``proj`` as one [E, out, in] tensor (a copy: only for math that needs a stack)."""
        return torch.stack([self.get(e, proj) for e in range(self.num_experts)])

    def gate_up_raw(self, e: int) -> torch.Tensor:
        """Expert e's fused input projection in its native row order, [2I (or I), H]."""
        return self._rows(self._fused_in(), e)

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Apply the family's activation to a native-order gate_up output [T, 2I] -> [T, I]."""
        if not self.has_gate:
            return self.module.act_fn(gate_up)
        return self.module._apply_gate(gate_up)

    def intermediate(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's activation before down_proj: x [T, H] -> [T, I] (the input of down_proj)."""
        w = self.gate_up_raw(e)
        h = x @ w.t().to(x.dtype)
        if self.has_bias:
            fused_bias = (self.module.gate_up_proj_bias if self.has_gate else self.module.up_proj_bias)[e]
            h = h + fused_bias.to(x.dtype)
        return self.activation(h)

    def down(self, e: int, a: torch.Tensor) -> torch.Tensor:
        """Expert e's down projection: a [T, I] -> [T, H] (bias included, routing weight not)."""
        y = a @ self.get(e, "down").t().to(a.dtype)
        if self.has_bias:
            y = y + self.module.down_proj_bias[e].to(a.dtype)
        return y

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's output for tokens x [T, H] -> [T, H] (without the routing weight)."""
        return self.down(e, self.intermediate(e, x))


# --------------------------------------------------------------------------------------------------
# Block and model
# --------------------------------------------------------------------------------------------------


@dataclass
class MoEBlockView:
    """One decoder layer's MoE block: router, routed experts, shared experts (+ their gate)."""

    layer_index: int
    block_name: str  # module path of the block inside the decoder layer, e.g. "mlp"
    block: nn.Module
    router: RouterView
    router_name: str
    experts: ExpertsView
    experts_name: str
    shared: nn.Module | None = None
    shared_name: str | None = None
    shared_gate: nn.Module | None = None
    shared_gate_name: str | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def referenced_modules(self) -> list[nn.Module]:
        """Every module this view holds a reference to (a pass may have swapped some out of the layer)."""
        mods = [self.block, self.router.module, self.experts.module, self.shared, self.shared_gate]
        return [m for m in mods if m is not None]

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def expert_to_group(self) -> tuple[int, ...] | None:
        """The expert -> group map when the stored experts are merged groups (exact-router merge)."""
        return expert_groups_of(self.experts.module)

    def stored_expert_scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router output -> (logits [T, E'], probabilities [T, E']) per STORED expert, float32.

        Without an expert -> group map E' = E and these are the router's own. With one, a group's
        probability is the sum of its members' (the routing mass it receives) and its logit the log of
        that sum, so statistics and quantization index everything by the experts the module stores.
        """
        logits = logits.detach().float().reshape(-1, logits.shape[-1])  # [T, E]
        probs = self.router.probabilities(logits)
        groups = self.expert_to_group
        if groups is None:
            return logits, probs
        index = torch.tensor(groups, dtype=torch.long, device=probs.device)
        grouped = probs.new_zeros(probs.shape[0], max(groups) + 1).index_add_(1, index, probs)
        return grouped.clamp_min(torch.finfo(torch.float32).tiny).log(), grouped


def find_moe_block(layer: nn.Module, layer_index: int, config) -> MoEBlockView | None:
    """The MoE block of one decoder layer, or None for a dense layer."""
    experts_name, experts = next(((n, m) for n, m in layer.named_modules() if is_experts_module(m)), (None, None))
    if experts is None:
        return None
    block_name = experts_name.rsplit(".", 1)[0] if "." in experts_name else ""
    block = layer.get_submodule(block_name) if block_name else layer
    router_name, router = None, None
    for name in ROUTER_NAMES:
        cand = getattr(block, name, None)
        if isinstance(cand, nn.Module) and hasattr(cand, "weight"):
            router_name, router = name, cand
            break
    if router is None:
        raise UnsupportedModelError(
            f"layer {layer_index}: found experts module {experts_name!r} but no router ('gate' or 'router') beside it"
        )
    num_experts = experts.down_proj.shape[0]
    view = MoEBlockView(
        layer_index=layer_index,
        block_name=block_name,
        block=block,
        router=_make_router_view(router, config, num_experts),
        router_name=router_name,
        experts=ExpertsView(experts),
        experts_name=experts_name,
    )
    for name in SHARED_EXPERT_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            view.shared, view.shared_name = getattr(block, name), name
    for name in SHARED_GATE_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            view.shared_gate, view.shared_gate_name = getattr(block, name), name
    return view


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers and its path (e.g. ``model.layers``)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) == n_layers:
            return name, module
    raise UnsupportedModelError("could not find the decoder layers (a ModuleList named 'layers') in this model")


def model_family(config) -> str:
    return getattr(config, "model_type", "unknown")


@dataclass
class MoEModelView:
    """Which decoder layers are MoE, and a :class:`MoEBlockView` for each."""

    model: nn.Module
    family: str
    layers_name: str
    num_layers: int
    blocks: dict[int, MoEBlockView] = field(default_factory=dict)

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.blocks)

    @property
    def generic(self) -> bool:
        """True when the family is not one of the tested ones (the generic path)."""
        return self.family not in SUPPORTED_FAMILIES


def describe_model(model: nn.Module) -> MoEModelView:
    """Build the MoE view of a loaded (possibly meta-device) model; error for non-MoE models."""
    family = model_family(model.config)
    layers_name, layers = find_decoder_layers(model)
    view = MoEModelView(model=model, family=family, layers_name=layers_name, num_layers=len(layers))
    for i, layer in enumerate(layers):
        block = find_moe_block(layer, i, model.config)
        if block is not None:
            view.blocks[i] = block
    if not view.blocks:
        raise UnsupportedModelError(
            f"model type {family!r} has no mixture-of-experts layers moecompress can read; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)} (and other transformers MoE models "
            "whose experts use @use_experts_implementation)"
        )
    return view
