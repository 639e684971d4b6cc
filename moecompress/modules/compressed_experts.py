"""The compressed-experts block (ALGORITHMS.md section 7): the runtime module, how it is rebuilt.

A :class:`CompressedExpertsBlock` replaces a layer's MoE block. It keeps the block's children under
their own names (router, experts, shared experts and their gate), so checkpoint names do not change,
and adds one parameter ``ces [E, 3, H]`` (ones at start): expert e's *compressed expert*, three scaling
vectors. Per token, with the k routed experts in descending weight order:

* the first ``m = k - n_ce`` are **main** experts and are computed;
* the last ``n_ce`` are **auxiliary**: not computed, only their scaling vectors are mixed,
  ``e_bar = sum_aux (w_a / sum w_aux) * ces[a]``  ([3, H] per token);
* main expert i: ``y_i = down(act(gate(x * e_bar_1)) * up(x * e_bar_3) * e_bar_2[:I])``;
* output ``= sum_main w_i y_i`` with the ORIGINAL routing weights (as the paper; not renormalised over
  the main experts: the fitted ``e_bar_2`` absorbs the missing mass) + the shared experts as the family
  adds them (Qwen2-MoE ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``, DeepSeek-V3 / GLM-4-MoE
  ``shared_experts(x)``).

``e_bar_2`` has H entries and scales the I intermediate channels: when ``I <= H`` the first I are used
(the paper's ``e_bar_2[:d_ff]``); when ``I > H`` the channels past H are left unscaled (factor 1).

Dynamic skipping (:mod:`moecompress.algorithms.dynamic_skip`) runs inside the same block: main experts
failing the ODP rule are simply not computed (the block evaluates experts itself, so no sentinel index
is needed).

The block computes experts from per-expert matrices: through :class:`ExpertsView` for the family's
fused experts, or dequantized with ``format.dequantize`` for a :class:`PackedExperts` (the reference
path), so it composes with quantized checkpoints. With ``ces = 1`` and ``n_ce = 0`` it equals the
original block.

This module is the runtime half: the block, its forward, how it is described in
``quantization_config.modules`` and rebuilt at load time (:mod:`moecompress.modules.hf_quantizer`), and
parameter counts. Fitting ``ces`` is the pass :mod:`moecompress.passes.compressed_experts`.

Shape legend: T tokens, E experts, H hidden size, I expert intermediate size, k top-k,
m = k - n_ce main experts, c = n_ce auxiliary experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moecompress.algorithms.dynamic_skip import SkipStats, protected_tokens, skip_keep_mask, sort_by_weight
from moecompress.errors import MoeCompressError, UnsupportedModelError
from moecompress.kernels.moe_gemm import MoeLayerDims, apply_expert_activation, canonical_activation
from moecompress.model.view import ExpertsView, MoEBlockView, describe_model, is_experts_module
from moecompress.modules.packed import UNQUANTIZED, PackedExperts, PackedLinear
from moecompress.quant import format as fmt

MODULE_TYPE = "compressed_experts_block"
DESCRIPTION_VERSION = 1

# --------------------------------------------------------------------------------------------------
# Per-expert matrices, whatever stores them
# --------------------------------------------------------------------------------------------------


@dataclass
class ExpertMatrices:
    """One expert in nn.Linear layout: gate/up [I, H] (gate None when gateless), down [H, I], biases or None."""

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


class DenseExpertSource:
    """A family's fused experts module read through :class:`ExpertsView` (views, no copies)."""

    def __init__(self, module: nn.Module):
        self.view = ExpertsView(module)

    @property
    def num_experts(self) -> int:
        return self.view.num_experts

    @property
    def intermediate_size(self) -> int:
        return self.view.intermediate_size

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return x_dtype  # as the family's eager experts: weights cast to the activations' dtype

    def matrices(self, e: int, dtype: torch.dtype) -> ExpertMatrices:
        v = self.view

        def cast(t):
            return None if t is None else t.to(dtype)

        return ExpertMatrices(
            gate=cast(v.get(e, "gate")) if v.has_gate else None,
            up=cast(v.get(e, "up")),
            down=cast(v.get(e, "down")),
            gate_bias=cast(v.get_bias(e, "gate")) if v.has_gate else None,
            up_bias=cast(v.get_bias(e, "up")),
            down_bias=cast(v.get_bias(e, "down")),
        )

    def activate(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        """gate, up [n, I] -> [n, I] with the family's own activation (GPT-OSS clamps included)."""
        if gate is None:
            return self.view.activation(up)
        if self.view.is_concatenated:
            native = torch.cat([gate, up], dim=-1)  # [n, 2I] rows gate then up
        else:
            native = torch.stack([gate, up], dim=-1).flatten(-2)  # [n, 2I] interleaved g0,u0,g1,u1..
        return self.view.activation(native)


class PackedExpertSource:
    """A :class:`PackedExperts` dequantized expert by expert with ``format.dequantize`` (cached per source)."""

    def __init__(self, module: PackedExperts):
        self.module = module
        spec = module.spec
        params = dict(spec.act_params)
        self.dims = MoeLayerDims(
            spec.hidden_size, spec.intermediate_size, spec.has_gate, canonical_activation(spec.activation),
            params.get("alpha", 1.702), params.get("limit", 7.0),
        )
        self._cache: dict[int, ExpertMatrices] = {}

    @property
    def num_experts(self) -> int:
        return self.module.spec.num_experts

    @property
    def intermediate_size(self) -> int:
        return self.module.spec.intermediate_size

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # as PackedExperts' reference path

    def _dequantized(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I or I, H], down [H, I]) of expert e in float32."""
        m, spec = self.module, self.module.spec
        bits = spec.bits[e]
        slot = getattr(m, f"w{bits}_expert_ids").tolist().index(e)
        if bits == UNQUANTIZED:
            return getattr(m, f"w{bits}_gate_up")[slot].float(), getattr(m, f"w{bits}_down")[slot].float()
        out = []
        for proj, k in (("gate_up", spec.hidden_size), ("down", spec.intermediate_size)):
            zeros = getattr(m, f"w{bits}_{proj}_zeros", None)
            out.append(
                fmt.dequantize(
                    getattr(m, f"w{bits}_{proj}_qweight")[slot], getattr(m, f"w{bits}_{proj}_scales")[slot],
                    None if zeros is None else zeros[slot], bits, spec.group_for(k), k=k,
                )
            )
        return out[0], out[1]

    def matrices(self, e: int, dtype: torch.dtype) -> ExpertMatrices:
        if e not in self._cache:
            gate_up, down = self._dequantized(e)
            i = self.intermediate_size
            gu_bias = self.module.gate_up_bias[e].float() if self.module.spec.has_bias else None
            d_bias = self.module.down_bias[e].float() if self.module.spec.has_bias else None
            if self.module.spec.has_gate:  # canonical layout: gate rows [0, I), up rows [I, 2I)
                mats = ExpertMatrices(gate_up[:i], gate_up[i:], down, gu_bias[:i] if gu_bias is not None else None,
                                      gu_bias[i:] if gu_bias is not None else None, d_bias)
            else:
                mats = ExpertMatrices(None, gate_up, down, None, gu_bias, d_bias)
            self._cache[e] = mats
        return self._cache[e]

    def activate(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        projected = up if gate is None else torch.cat([gate, up], dim=-1)  # canonical [n, 2I] or [n, I]
        return apply_expert_activation(projected, self.dims)


def expert_source(module: nn.Module) -> DenseExpertSource | PackedExpertSource:
    """Per-expert access to a layer's routed experts, dense or packed."""
    if isinstance(module, PackedExperts):
        return PackedExpertSource(module)
    if is_experts_module(module):
        return DenseExpertSource(module)
    raise UnsupportedModelError(
        f"{type(module).__name__} is neither a transformers experts module nor PackedExperts; compressed experts cannot read it"
    )


# --------------------------------------------------------------------------------------------------
# The math (tensor in, tensor out)
# --------------------------------------------------------------------------------------------------


def aux_scaling(aux_weights: torch.Tensor, aux_index: torch.Tensor, ces: torch.Tensor) -> torch.Tensor:
    """e_bar [T, 3, H] = sum_a (w_a / sum w_aux) * ces[a] over the auxiliary experts.

    aux_weights, aux_index [T, c]; ces [E, 3, H]. Tokens whose auxiliary weights sum to 0 mix uniformly
    (never a division by zero).
    """
    total = aux_weights.sum(dim=-1, keepdim=True)  # [T, 1]
    uniform = torch.full_like(aux_weights, 1.0 / aux_weights.shape[-1])
    coeff = torch.where(total > 0, aux_weights / total.clamp_min(1e-30), uniform)  # [T, c]
    return torch.einsum("tc,tcjh->tjh", coeff.to(ces.dtype), ces[aux_index])  # [T, 3, H]


def intermediate_scale(e2: torch.Tensor, intermediate: int) -> torch.Tensor:
    """e_bar_2 [n, H] -> the factor [n, I] applied before down_proj: ``e_bar_2[:I]``, padded with ones if I > H."""
    h = e2.shape[-1]
    if intermediate <= h:
        return e2[:, :intermediate]
    return torch.cat([e2, e2.new_ones(e2.shape[0], intermediate - h)], dim=-1)


def expert_output(source, e: int, x: torch.Tensor, e_bar: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Main expert e on its tokens x [n, H], modulated by e_bar [n, 3, H] (None: unmodulated) -> [n, H]."""
    mats = source.matrices(e, dtype)
    x_gate = x if e_bar is None else x * e_bar[:, 0]
    x_up = x if e_bar is None else x * e_bar[:, 2]
    up = F.linear(x_up, mats.up, mats.up_bias)  # [n, I]
    gate = None if mats.gate is None else F.linear(x_gate, mats.gate, mats.gate_bias)  # [n, I]
    a = source.activate(gate, up)  # [n, I]
    if e_bar is not None:
        a = a * intermediate_scale(e_bar[:, 1], a.shape[-1])
    return F.linear(a, mats.down, mats.down_bias)  # [n, H]


def compressed_experts_forward(
    x: torch.Tensor,
    sorted_weights: torch.Tensor,
    sorted_index: torch.Tensor,
    source,
    ces: torch.Tensor | None,
    n_ce: int,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed output [T, H] of the compressed-experts block.

    x [T, H]; sorted_weights, sorted_index [T, k] in descending weight order; ces [E, 3, H];
    keep bool [T, m] (dynamic skipping; None computes every main expert). Experts are visited in
    ascending id and accumulated with ``index_add_`` as transformers' eager experts do.
    """
    k = sorted_index.shape[-1]
    m = k - n_ce
    dtype = source.compute_dtype(x.dtype)
    xc = x.to(dtype)
    out = torch.zeros(x.shape[0], x.shape[-1], dtype=dtype, device=x.device)  # [T, H]
    main_index, main_weights = sorted_index[:, :m], sorted_weights[:, :m]  # [T, m]
    e_bar = aux_scaling(sorted_weights[:, m:], sorted_index[:, m:], ces).to(dtype) if n_ce else None  # [T, 3, H]
    computed = main_index if keep is None else torch.where(keep, main_index, torch.full_like(main_index, -1))
    for e in torch.unique(computed[computed >= 0]).tolist():
        tokens, slots = torch.where(computed == e)  # [n_e] each
        y = expert_output(source, e, xc[tokens], None if e_bar is None else e_bar[tokens], dtype)  # [n_e, H]
        out.index_add_(0, tokens, y * main_weights[tokens, slots, None].to(dtype))
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockLayout:
    """Where the wrapped block's parts live (names relative to the block) and what it returns."""

    router: str
    experts: str
    num_experts: int
    hidden_size: int
    top_k: int
    shared: str | None = None
    shared_gate: str | None = None
    returns_router_scores: bool = False  # GPT-OSS's block returns (hidden, router_scores)


class CompressedExpertsBlock(nn.Module):
    """An MoE block with ``n_ce`` of its k routed experts replaced by compressed experts (see module doc)."""

    def __init__(
        self,
        parts: dict[str, nn.Module],
        layout: BlockLayout,
        n_ce: int,
        dtype: torch.dtype = torch.float32,
        skip_beta: float | None = None,
        protect_threshold: float | None = None,
    ):
        super().__init__()
        if not 0 <= n_ce < layout.top_k:
            raise MoeCompressError(f"n_ce must be in [0, top_k={layout.top_k}), got {n_ce}")
        for name, module in parts.items():
            self.add_module(name, module)  # the family's own children, same names
        self.layout = layout
        self.n_ce = n_ce
        self.ces = nn.Parameter(torch.ones(layout.num_experts, 3, layout.hidden_size, dtype=dtype), requires_grad=False)
        self.skip_beta = skip_beta
        self.protect_threshold = protect_threshold
        self.stats = SkipStats()  # runtime counters, not saved

    # -- construction from / to the native config -------------------------------------------------

    def description(self) -> dict:
        """The entry of ``quantization_config.modules`` that rebuilds this block at load time."""
        lay = self.layout
        return {
            "type": MODULE_TYPE,
            "version": DESCRIPTION_VERSION,
            "n_ce": self.n_ce,
            "num_experts": lay.num_experts,
            "hidden_size": lay.hidden_size,
            "top_k": lay.top_k,
            "router": lay.router,
            "experts": lay.experts,
            "shared": lay.shared,
            "shared_gate": lay.shared_gate,
            "returns_router_scores": lay.returns_router_scores,
            "beta": self.skip_beta,
            "protect_threshold": self.protect_threshold,
        }

    @classmethod
    def from_description(cls, block: nn.Module, description: dict, dtype: torch.dtype) -> "CompressedExpertsBlock":
        """Wrap the skeleton's own block (``replace_modules`` at load time, on ``meta``)."""
        if int(description.get("version", 1)) > DESCRIPTION_VERSION:
            raise MoeCompressError(f"compressed_experts_block version {description['version']} is newer than this moecompress; upgrade it")
        layout = BlockLayout(
            router=description["router"],
            experts=description["experts"],
            num_experts=int(description["num_experts"]),
            hidden_size=int(description["hidden_size"]),
            top_k=int(description["top_k"]),
            shared=description.get("shared"),
            shared_gate=description.get("shared_gate"),
            returns_router_scores=bool(description.get("returns_router_scores", False)),
        )
        return cls(
            dict(block.named_children()), layout, int(description["n_ce"]), dtype,
            skip_beta=description.get("beta"), protect_threshold=description.get("protect_threshold"),
        )

    # -- parts ---------------------------------------------------------------------------------------

    @property
    def experts_module(self) -> nn.Module:
        return self.get_submodule(self.layout.experts)

    @property
    def main_experts(self) -> int:
        return self.layout.top_k - self.n_ce

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [T, H] -> (router weights as returned [T, k], sorted weights [T, k], sorted ids [T, k], keep [T, m] or None).

        The family's own router decides (as ``RouterView.route``); only the order is changed.
        """
        _logits, weights, index = self.get_submodule(self.layout.router)(x)[:3]
        sorted_w, sorted_i = sort_by_weight(weights, index)
        keep = None
        if self.skip_beta is not None:
            keep = skip_keep_mask(sorted_w[:, : self.main_experts], self.skip_beta, protected_tokens(x, self.protect_threshold))
        return weights, sorted_w, sorted_i, keep

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """Shared experts' contribution [T, H] as the family adds it (sigmoid-gated when it has a gate)."""
        if self.layout.shared is None:
            return None
        y = self.get_submodule(self.layout.shared)(x)
        if self.layout.shared_gate is not None:
            y = F.sigmoid(self.get_submodule(self.layout.shared_gate)(x)) * y
        return y

    def routed_output(self, x, sorted_w, sorted_i, keep, source=None) -> torch.Tensor:
        source = source if source is not None else expert_source(self.experts_module)
        return compressed_experts_forward(x, sorted_w, sorted_i, source, self.ces, self.n_ce, keep)

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        weights, sorted_w, sorted_i, keep = self.route(x)
        out = self.routed_output(x, sorted_w, sorted_i, keep)
        shared = self.shared_output(x)
        if shared is not None:
            out = out + shared
        if not torch.is_grad_enabled():
            self.stats.update(keep if keep is not None else torch.ones(x.shape[0], self.main_experts, dtype=torch.bool))
        out = out.reshape(shape)
        return (out, weights) if self.layout.returns_router_scores else out

    def extra_repr(self) -> str:
        return f"n_ce={self.n_ce}, top_k={self.layout.top_k}, beta={self.skip_beta}"


def _returns_tuple(block: nn.Module, hidden_size: int) -> bool:
    """Run a materialised block on one zero token to see whether it returns (hidden, scores)."""
    p = next(block.parameters())
    with torch.no_grad():
        out = block(torch.zeros(1, 1, hidden_size, dtype=p.dtype, device=p.device))
    return isinstance(out, tuple)


def wrap_block(
    view: MoEBlockView,
    n_ce: int,
    returns_router_scores: bool | None = None,
    dtype: torch.dtype = torch.float32,
    block: nn.Module | None = None,
) -> CompressedExpertsBlock:
    """A :class:`CompressedExpertsBlock` around a block found by ``describe_model`` (shares its modules).

    ``block``: the live block when ``view`` was read from another copy of the model (a meta skeleton);
    default ``view.block``. ``returns_router_scores`` None: detected by running the block once (it
    must be materialised).
    """
    if not view.block_name:
        raise UnsupportedModelError(f"layer {view.layer_index}: the experts are not inside a block module; cannot wrap it")
    block = view.block if block is None else block
    experts_rel = view.experts_name[len(view.block_name) + 1 :]
    experts = block.get_submodule(experts_rel)
    hidden = experts.spec.hidden_size if isinstance(experts, PackedExperts) else ExpertsView(experts).hidden_size
    if returns_router_scores is None:
        returns_router_scores = _returns_tuple(block, hidden)
    layout = BlockLayout(
        router=view.router_name,
        experts=experts_rel,
        num_experts=view.router.num_experts,
        hidden_size=hidden,
        top_k=view.top_k,
        shared=view.shared_name,
        shared_gate=view.shared_gate_name,
        returns_router_scores=returns_router_scores,
    )
    ce = CompressedExpertsBlock(dict(block.named_children()), layout, n_ce, dtype)
    for name, p in block.named_parameters(recurse=False):  # block-level tensors, if a family has any
        ce.register_parameter(name, p)
    for name, b in block.named_buffers(recurse=False):
        ce.register_buffer(name, b, persistent=name not in block._non_persistent_buffers_set)
    return ce


def wrap_model(model: nn.Module, n_ce: int, dtype: torch.dtype = torch.float32) -> dict[str, CompressedExpertsBlock]:
    """Wrap every MoE block of an in-memory model, dense or packed (ces = 1); returns {block path: block}.

    The MoE view is read from a meta skeleton of the same config (the view does not recognise packed
    experts), then applied to this model's live modules by path.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    view = describe_model(skeleton)
    wrapped = {}
    for i, block_view in view.blocks.items():
        layer = model.get_submodule(f"{view.layers_name}.{i}")
        live = layer.get_submodule(block_view.block_name)
        ce = wrap_block(block_view, n_ce, dtype=dtype, block=live)
        layer.set_submodule(block_view.block_name, ce)
        wrapped[f"{view.layers_name}.{i}.{block_view.block_name}"] = ce
    return wrapped


# --------------------------------------------------------------------------------------------------
# Active parameters
# --------------------------------------------------------------------------------------------------


def params_per_expert(experts: nn.Module) -> int:
    """Logical (unpacked) parameters of one routed expert."""
    if isinstance(experts, PackedExperts):
        s = experts.spec
        n = (3 if s.has_gate else 2) * s.hidden_size * s.intermediate_size
        return n + (((2 if s.has_gate else 1) * s.intermediate_size + s.hidden_size) if s.has_bias else 0)
    return ExpertsView(experts).params_per_expert()


def logical_params(module: nn.Module | None) -> int:
    """Parameters of a (possibly packed) module as dense weights would count them."""
    if module is None:
        return 0
    total = 0
    for sub in module.modules():
        if isinstance(sub, PackedLinear):
            total += sub.in_features * sub.out_features + (sub.out_features if sub.bias is not None else 0)
        elif not isinstance(sub, PackedExperts):
            total += sum(p.numel() for p in sub.parameters(recurse=False))
    return total


def active_expert_params(per_expert: int, experts_per_token: float, n_ce: int, hidden: int, shared: int = 0) -> float:
    """Expert parameters one token touches in one layer: computed experts, compressed experts (3H each), shared."""
    return experts_per_token * per_expert + n_ce * 3 * hidden + shared
