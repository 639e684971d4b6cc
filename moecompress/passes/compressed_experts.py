"""Compressed experts (ALGORITHMS.md section 7), fitted without retraining, plus dynamic skipping.

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

Dynamic skipping (``dynamic_skip.py``) runs inside the same block: main experts failing the ODP rule are
simply not computed (the block evaluates experts itself, so no sentinel index is needed).

The block computes experts from per-expert matrices: through :class:`ExpertsView` for the family's
fused experts, or dequantized with ``format.dequantize`` for a :class:`PackedExperts` (the reference
path), so it composes with quantized checkpoints. With ``ces = 1`` and ``n_ce = 0`` it equals the
original block.

Fitting (retraining-free): everything frozen but ``ces``; per layer, through the driver, the block input
and the ORIGINAL block output are recorded in the observation forward, then Adam fits ``ces`` to the
MSE between the original and the compressed block outputs; 10% of the tokens are held back to report the
error before and after. The layers are fitted in order and each layer's input comes from the already
compressed previous layers (the driver feeds a finished layer's outputs to the next), so a layer's fit
sees the drift of the earlier ones; its target is the original block applied to that same input.

Optional end-to-end distillation (``distill_steps > 0``, ``distill_ces.py``): after the layer-wise fit,
all layers' ``ces`` are trained jointly on KL(original model || compressed model) over the calibration
tokens. Unlike the layer-wise pass it holds the whole model in float32 (see that module for the memory
figure); the job refuses up front when the estimate exceeds the available memory.

Shape legend: T tokens, E experts, H hidden size, I expert intermediate size, k top-k,
m = k - n_ce main experts, c = n_ce auxiliary experts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moecompress.errors import MoeCompressError, UnsupportedModelError
from moecompress.model.driver import LayerContext
from moecompress.model.view import ExpertsView, MoEBlockView, is_experts_module
from moecompress.passes.dynamic_skip import (
    SkipStats,
    calibrate_beta,
    calibrate_protect_threshold,
    protected_tokens,
    skip_keep_mask,
    sort_by_weight,
)
from moecompress.quant import format as fmt
from moecompress.quant.packed_modules import UNQUANTIZED, PackedExperts, PackedLinear

log = logging.getLogger(__name__)

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
        from moecompress.kernels.moe_gemm import MoeLayerDims, canonical_activation

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
                    None if zeros is None else zeros[slot], bits, spec.group_for(k),
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
        from moecompress.kernels.moe_gemm import apply_expert_activation

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

    from moecompress.model.view import describe_model

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


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressExpertsConfig:
    n_ce: int = 1
    fit_steps: int = 200
    lr: float = 1e-2
    fit_batch_tokens: int = 4096
    holdout_fraction: float = 0.1
    dynamic_skip: bool = False
    protect_tokens: float = 0.0  # fraction of tokens (largest ||h||_1) never skipped
    seed: int = 0
    distill_steps: int = 0  # end-to-end Adam steps on all layers' ces after the layer-wise fit (0: none)
    distill_lr: float = 1e-2
    distill_batch_size: int = 8  # calibration sequences per distillation step
    distill_top_k: int = 1024  # teacher tokens kept per position (the rest is one tail bucket)

    def validate(self) -> None:
        if self.n_ce < 0:
            raise MoeCompressError(f"--n-ce must be >= 0, got {self.n_ce}")
        if self.fit_steps < 0:
            raise MoeCompressError(f"--fit-steps must be >= 0, got {self.fit_steps}")
        if not self.lr > 0:
            raise MoeCompressError(f"--lr must be > 0, got {self.lr}")
        if self.fit_batch_tokens < 1:
            raise MoeCompressError(f"--fit-batch-tokens must be >= 1, got {self.fit_batch_tokens}")
        if not 0 <= self.holdout_fraction < 1:
            raise MoeCompressError(f"the held-back fraction must be in [0, 1), got {self.holdout_fraction}")
        if not 0 <= self.protect_tokens < 1:
            raise MoeCompressError(f"--protect-tokens must be in [0, 1), got {self.protect_tokens}")
        if self.distill_steps < 0:
            raise MoeCompressError(f"--distill-steps must be >= 0, got {self.distill_steps}")
        if not self.distill_lr > 0:
            raise MoeCompressError(f"--distill-lr must be > 0, got {self.distill_lr}")
        if self.distill_batch_size < 1:
            raise MoeCompressError(f"--distill-batch-size must be >= 1, got {self.distill_batch_size}")
        if self.distill_top_k < 1:
            raise MoeCompressError(f"--distill-top-k must be >= 1, got {self.distill_top_k}")
        if self.distill_steps > 0 and self.n_ce == 0:
            raise MoeCompressError("--distill-steps needs compressed experts (--n-ce >= 1): with n_ce = 0 there is nothing to train")

    def check_top_k(self, top_k: int, where: str = "the model") -> None:
        if self.n_ce >= top_k:
            raise MoeCompressError(
                f"--n-ce {self.n_ce} must be smaller than top-k ({top_k} in {where}): at least one expert per token must be computed"
            )


@dataclass
class LayerFitRecord:
    """One row of the report."""

    layer: int
    fit_tokens: int
    heldout_tokens: int
    mse_fit_before: float
    mse_fit_after: float
    mse_heldout_before: float
    mse_heldout_after: float
    rel_heldout_before: float  # ||Y - Y_hat|| / ||Y|| on held-back tokens
    rel_heldout_after: float
    beta: float | None
    protect_threshold: float | None
    skip_fraction: float  # calibration tokens that skip at least one expert (0 without --dynamic-skip)
    experts_per_token: float  # computed routed experts per token on calibration
    params_per_expert: int
    shared_params: int
    top_k: int
    hidden_size: int
    seconds: float


@torch.no_grad()
def _prepare(block: CompressedExpertsBlock, x: torch.Tensor, chunk: int = 8192):
    """Routing and shared outputs for tokens x [T, H] (frozen parts, computed once)."""
    sw, si, keep, base = [], [], [], []
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        _, w, i, k = block.route(xs)
        sw.append(w)
        si.append(i)
        keep.append(k if k is not None else torch.ones(xs.shape[0], block.main_experts, dtype=torch.bool))
        shared = block.shared_output(xs)
        base.append(shared.float() if shared is not None else torch.zeros_like(xs, dtype=torch.float32))
    return torch.cat(sw), torch.cat(si), torch.cat(keep), torch.cat(base)


@torch.no_grad()
def block_error(block, x, target, routes, source, chunk: int = 8192) -> tuple[float, float]:
    """(MSE, relative Frobenius error) of the compressed block against target [T, H]."""
    sw, si, keep, base = routes
    se, ref = 0.0, 0.0
    for s in range(0, x.shape[0], chunk):
        sl = slice(s, s + chunk)
        pred = block.routed_output(x[sl], sw[sl], si[sl], keep[sl], source).float() + base[sl]
        se += float((pred - target[sl]).pow(2).sum())
        ref += float(target[sl].pow(2).sum())
    n = max(1, target.numel())
    return se / n, (se / ref) ** 0.5 if ref > 0 else 0.0


def fit_ces(block: CompressedExpertsBlock, x: torch.Tensor, target: torch.Tensor, routes, source, steps: int, lr: float, batch_tokens: int, seed: int) -> list[float]:
    """Adam on ``block.ces`` alone: minimise MSE(compressed block(x), target) over minibatches of tokens.

    x, target [T, H] float32; routes from :func:`_prepare`. Returns the loss per step.
    """
    sw, si, keep, base = routes
    gen = torch.Generator().manual_seed(seed)
    master = block.ces.detach().float().clone().requires_grad_(True)  # fp32 copy whatever the block dtype
    opt = torch.optim.Adam([master], lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            sel = torch.randperm(x.shape[0], generator=gen)[:batch_tokens] if x.shape[0] > batch_tokens else torch.arange(x.shape[0])
            pred = compressed_experts_forward(x[sel], sw[sel], si[sel], source, master, block.n_ce, keep[sel]).float() + base[sel]
            loss = F.mse_loss(pred, target[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    with torch.no_grad():
        block.ces.copy_(master.to(block.ces.dtype))
    return losses


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit ids, held-back ids) of n tokens, a seeded random split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = int(round(n * fraction))
    return perm[held:], perm[:held]


class CompressExpertsPass:
    """LayerPass: wrap each MoE block as a :class:`CompressedExpertsBlock`, calibrate skipping, fit ``ces``."""

    def __init__(self, cfg: CompressExpertsConfig, layers_name: str, storage_dtype: torch.dtype = torch.float32):
        cfg.validate()
        self.cfg = cfg
        self.layers_name = layers_name
        self.storage_dtype = storage_dtype
        self.records: list[LayerFitRecord] = []
        self.distill = None  # DistillRecord of the end-to-end step, when it ran
        self.modules: dict[str, dict] = {}
        self._x: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self._tuple = False

    def attach(self, ctx: LayerContext) -> list:
        if ctx.block is None:
            return []
        self._x, self._y = [], []

        def record(_module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            self._tuple = isinstance(output, tuple)
            self._x.append(hidden.detach().reshape(-1, hidden.shape[-1]).float())
            self._y.append(out.detach().reshape(-1, out.shape[-1]).float())

        return [ctx.block.block.register_forward_hook(record, with_kwargs=True)]

    def process(self, ctx: LayerContext) -> bool:
        if ctx.block is None:
            return False
        start = time.time()
        cfg = self.cfg
        cfg.check_top_k(ctx.block.top_k, f"layer {ctx.index}")
        x, y = torch.cat(self._x), torch.cat(self._y)
        self._x, self._y = [], []
        ce = wrap_block(ctx.block, cfg.n_ce, returns_router_scores=self._tuple, dtype=torch.float32)
        ctx.layer.set_submodule(ctx.block.block_name, ce)
        if cfg.dynamic_skip:
            with torch.no_grad():
                _, sorted_w, _, _ = ce.route(x)
            ce.skip_beta = calibrate_beta(sorted_w)
            ce.protect_threshold = calibrate_protect_threshold(x, cfg.protect_tokens)
        fit_ids, held_ids = _split(x.shape[0], cfg.holdout_fraction, cfg.seed + ctx.index)
        routes = _prepare(ce, x)
        source = expert_source(ce.experts_module)
        fit_routes = tuple(r[fit_ids] for r in routes)
        held_routes = tuple(r[held_ids] for r in routes)
        before_fit = block_error(ce, x[fit_ids], y[fit_ids], fit_routes, source)
        before_held = block_error(ce, x[held_ids], y[held_ids], held_routes, source)
        if cfg.n_ce > 0 and cfg.fit_steps > 0:
            fit_ces(ce, x[fit_ids], y[fit_ids], fit_routes, source, cfg.fit_steps, cfg.lr, cfg.fit_batch_tokens, cfg.seed + ctx.index)
            # What the checkpoint stores (e.g. bf16) is what the next layer must see.
            with torch.no_grad():
                ce.ces.copy_(ce.ces.to(self.storage_dtype).float())
        after_fit = block_error(ce, x[fit_ids], y[fit_ids], fit_routes, source)
        after_held = block_error(ce, x[held_ids], y[held_ids], held_routes, source)
        keep = routes[2]
        rec = LayerFitRecord(
            layer=ctx.index,
            fit_tokens=int(fit_ids.numel()),
            heldout_tokens=int(held_ids.numel()),
            mse_fit_before=before_fit[0],
            mse_fit_after=after_fit[0],
            mse_heldout_before=before_held[0],
            mse_heldout_after=after_held[0],
            rel_heldout_before=before_held[1],
            rel_heldout_after=after_held[1],
            beta=ce.skip_beta,
            protect_threshold=ce.protect_threshold,
            skip_fraction=float((~keep).any(dim=-1).float().mean()) if keep.numel() else 0.0,
            experts_per_token=float(keep.sum(dim=-1).float().mean()) if keep.numel() else 0.0,
            params_per_expert=params_per_expert(ce.experts_module),
            shared_params=logical_params(ce.get_submodule(ce.layout.shared) if ce.layout.shared else None)
            + logical_params(ce.get_submodule(ce.layout.shared_gate) if ce.layout.shared_gate else None),
            top_k=ce.layout.top_k,
            hidden_size=ce.layout.hidden_size,
            seconds=time.time() - start,
        )
        self.records.append(rec)
        prefix = f"{self.layers_name}.{ctx.index}.{ctx.block.block_name}"
        self.modules[prefix] = ce.description()
        log.info("layer %d: held-back MSE %.4g -> %.4g", ctx.index, rec.mse_heldout_before, rec.mse_heldout_after)
        return True

    def active_params(self, after: bool) -> float:
        """Expert parameters per token over all MoE layers, before (top-k) or after compression."""
        total = 0.0
        for r in self.records:
            if after:
                total += active_expert_params(r.params_per_expert, r.experts_per_token, self.cfg.n_ce, r.hidden_size, r.shared_params)
            else:
                total += active_expert_params(r.params_per_expert, r.top_k, 0, 0, r.shared_params)
        return total


# --------------------------------------------------------------------------------------------------
# Job
# --------------------------------------------------------------------------------------------------


def source_quantization(config) -> dict | None:
    """The source checkpoint's moecompress quantization config as a dict, or None for a dense model."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "moecompress":
        raise MoeCompressError(
            f"the model is quantized with {qc.get('quant_method')!r}; compress-experts reads dense or moecompress checkpoints only"
        )
    if any(d.get("type") == MODULE_TYPE for d in qc.get("modules", {}).values()):
        raise MoeCompressError("the model already has compressed experts; run compress-experts on the original checkpoint")
    return qc


def model_top_k(model_folder: str | Path) -> int:
    """The smallest top-k over the model's MoE layers (read from the meta skeleton; nothing loaded)."""
    from moecompress.model.loading import LayerwiseModel

    lm = LayerwiseModel(model_folder)
    return min(b.top_k for b in lm.view.blocks.values())


def check_distill_memory(lm, cfg: CompressExpertsConfig, seqlen: int) -> None:
    """Refuse (before any work) an end-to-end distillation whose rough peak exceeds the available memory."""
    from moecompress.passes.distill_ces import available_memory_bytes, estimate_distill_bytes

    if cfg.distill_steps == 0:
        return
    available = available_memory_bytes()
    if available is None:
        return
    c = lm.config
    blocks = list(lm.view.blocks.values())
    model_bytes = sum(p.numel() * 4 for p in lm.model.parameters()) + sum(b.numel() * b.element_size() for b in lm.model.buffers())
    need = estimate_distill_bytes(
        model_bytes, cfg.distill_batch_size * seqlen, len(blocks), c.hidden_size,
        max(b.experts.intermediate_size for b in blocks), max(b.top_k for b in blocks),
        getattr(c, "num_attention_heads", 1), seqlen, c.vocab_size,
    )
    if need > available:
        raise MoeCompressError(
            f"--distill-steps holds the whole model in float32 plus one batch's activations (~{need / 2**30:.1f} GiB) but only "
            f"{available / 2**30:.1f} GiB is available; lower --distill-batch-size or run without --distill-steps"
        )


def _distill_staged(model_folder, staged: Path, writer, input_ids: torch.Tensor, cfg: CompressExpertsConfig, storage: torch.dtype, batch_size: int):
    """End-to-end distillation of the staged checkpoint's ``ces``; rewrites the shards holding them. Returns the record."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from moecompress.passes.distill_ces import compute_teacher_targets, distill_ces

    # Teacher first, released before the student loads: one full model in memory at a time.
    teacher = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32)
    targets = compute_teacher_targets(teacher, input_ids, cfg.distill_top_k, batch_size)
    del teacher
    student = AutoModelForCausalLM.from_pretrained(str(staged), dtype=torch.float32)
    record = distill_ces(
        student, input_ids, targets, cfg.distill_steps, cfg.distill_lr, cfg.distill_batch_size, cfg.seed,
        cfg.holdout_fraction, storage,
    )
    trained = {name: p.detach() for name, p in student.named_parameters() if name.endswith(".ces")}
    by_shard: dict[str, list[str]] = {}
    for name in trained:
        if name not in writer.weight_map:
            raise MoeCompressError(f"tensor {name} is not in the staged checkpoint; this is a bug in moecompress")
        by_shard.setdefault(writer.weight_map[name], []).append(name)
    for shard, names in by_shard.items():
        tensors = load_file(str(staged / shard))
        for name in names:
            tensors[name] = trained[name].to(tensors[name].dtype).contiguous()
        save_file(tensors, str(staged / shard), metadata={"format": "pt"})
    return record


def compress_experts_job(
    model_folder: str | Path,
    out: str | Path,
    cfg: CompressExpertsConfig,
    input_ids: torch.Tensor,
    calibration: dict,
    overwrite: bool = False,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
):
    """Compressed experts (and/or dynamic skipping) for a dense or moecompress-quantized model folder.

    Writes a native checkpoint at ``out``: the source's tensors unchanged plus ``<block>.ces``, and
    ``quantization_config.modules`` = the source's packed modules + one ``compressed_experts_block``
    entry per MoE block. Returns (JobResult, the pass with its per-layer records and, when
    ``cfg.distill_steps > 0``, ``cpass.distill``).

    The layer-wise pass holds one decoder layer at a time. ``cfg.distill_steps > 0`` adds the end-to-end
    distillation of ``ces`` (``distill_ces.py``), which loads the WHOLE model in float32 (the source as
    teacher once, then the compressed model as student) plus one batch of activations; refused up
    front (one-line error) when that rough estimate exceeds the available memory.
    """
    import moecompress
    from moecompress.export.writer import CheckpointWriter, StagingFolder, outer_state, prepare_output
    from moecompress.jobs import JobResult
    from moecompress.model.driver import run_layerwise
    from moecompress.model.loading import LayerwiseModel, read_config
    from moecompress.quant.hf_integration import MoeCompressConfig

    cfg.validate()
    if input_ids is None or input_ids.numel() == 0:
        raise MoeCompressError("compress-experts needs calibration data to fit and calibrate; pass --calib")
    prepare_output(out, overwrite)
    start = time.time()
    source_q = source_quantization(read_config(model_folder))
    lm = LayerwiseModel(model_folder)  # a quantized source's packed modules are swapped in here
    lm.require_ungrouped("compress-experts")
    for block in lm.view.blocks.values():
        cfg.check_top_k(block.top_k, f"layer {block.layer_index}")
    check_distill_memory(lm, cfg, input_ids.shape[-1])
    storage = lm.checkpoint_dtype
    cpass = CompressExpertsPass(cfg, lm.view.layers_name, storage)
    with StagingFolder(out, overwrite) as stage:
        writer = CheckpointWriter(stage.path, lm.model, storage)

        def write_layer(ctx: LayerContext) -> None:
            writer.write_module(f"{lm.view.layers_name}.{ctx.index}", ctx.layer, f"layer-{ctx.index:05d}.safetensors")

        run_layerwise(lm, input_ids, [cpass], batch_size=batch_size, on_layer_done=write_layer, progress=progress)
        lm.load_outer()
        writer.write_tensors(outer_state(lm.model, lm.view.layers_name), "outer.safetensors")
        lm.release_outer()
        run = {
            "tool": f"moecompress {moecompress.__version__}",
            "method": "compressed-experts" if cfg.n_ce else "dynamic-skip",
            **asdict(cfg),
            "calibration": calibration,
            "source_model": str(Path(model_folder).resolve().name),
        }
        if source_q is not None:
            qconfig = MoeCompressConfig(
                modules={**source_q.get("modules", {}), **cpass.modules},
                group_size=source_q.get("group_size", 128),
                symmetric=source_q.get("symmetric", True),
                format=source_q.get("format", "kpack-v1"),
                provenance={**source_q.get("provenance", {}), "compress_experts": run},
                extra=source_q.get("extra", {}),
            )
        else:
            qconfig = MoeCompressConfig(modules=cpass.modules, provenance=run)
        config = lm.config
        config.quantization_config = qconfig.to_dict()
        config.dtype = storage
        writer.finish(config, Path(model_folder))
        if cfg.distill_steps > 0:
            cpass.distill = _distill_staged(model_folder, stage.path, writer, input_ids, cfg, storage, batch_size)
        final = stage.commit()
    return JobResult(final, time.time() - start, writer.total_bytes, lm.checkpoint.total_bytes()), cpass


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def write_compress_report(path: str | Path, summary: dict, records: list[LayerFitRecord]) -> None:
    """OUT/report.md: active parameters, per-layer fitting losses (fit and held-back), skipping."""
    s = summary
    lines = [
        "# moecompress compress-experts",
        "",
        f"- model: `{s['model']}` -> `{s['out']}`",
        f"- compressed experts per token (n_ce): {s['n_ce']} of top-{s['top_k']}; fit steps {s['fit_steps']}, lr {s['lr']}",
        f"- dynamic skipping: {'on' if s['dynamic_skip'] else 'off'}" + (f" (protect {s['protect_tokens']:.1%} of tokens by ||h||_1)" if s["dynamic_skip"] else ""),
        f"- calibration: {s['calibration']}",
        f"- active routed+shared expert parameters per token (all MoE layers): {s['active_params_before']:,.0f} -> "
        f"{s['active_params_after']:,.0f} ({100 * (1 - s['active_params_after'] / max(1.0, s['active_params_before'])):.1f}% fewer)",
        f"- tokens skipping an expert (calibration, mean over layers): {s['skip_fraction']:.1%}",
        f"- time: {s['seconds']:.1f}s",
        "",
    ]
    if s.get("eval"):
        lines += ["## Perplexity", "", "| model | ppl | tokens |", "|---|---|---|"]
        for name, r in s["eval"].items():
            lines.append(f"| {name} | {r['ppl']:.4f} | {r['tokens']} |")
        lines.append("")
    d = s.get("distill")
    if d:
        lines += [
            "## End-to-end distillation of ces",
            "",
            f"{d['steps']} Adam steps, lr {d['lr']}, {d['batch_sequences']} sequences per step, all layers' `ces` trained jointly "
            f"(everything else frozen) on KL(original || compressed) over the teacher's top-{d['top_k']} tokens + tail; "
            f"{d['train_sequences']} calibration sequences trained, {d['heldout_sequences']} held back; {d['seconds']:.1f}s.",
            "",
            "| mean KL per token | before | after |",
            "|---|---|---|",
            f"| trained sequences | {d['kl_train_before']:.5f} | {d['kl_train_after']:.5f} |",
            f"| held-back sequences | {d['kl_heldout_before']:.5f} | {d['kl_heldout_after']:.5f} |",
            "",
        ]
    lines += [
        "## Per layer (block output MSE against the original block; held-back = 10% of calibration tokens never fitted)",
        "",
        "| layer | fit MSE before | fit MSE after | held-back MSE before | held-back MSE after | held-back rel. err before | after | beta | skip fraction | experts/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        beta = "—" if r.beta is None else f"{r.beta:.3f}"
        lines.append(
            f"| {r.layer} | {r.mse_fit_before:.4g} | {r.mse_fit_after:.4g} | {r.mse_heldout_before:.4g} | {r.mse_heldout_after:.4g} "
            f"| {r.rel_heldout_before:.4f} | {r.rel_heldout_after:.4f} | {beta} | {r.skip_fraction:.1%} | {r.experts_per_token:.3f} |"
        )
    Path(path).write_text("\n".join(lines) + "\n")
