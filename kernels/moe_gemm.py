"""Grouped MoE experts forward on packed (kpack-v2) experts of mixed bit widths, for ONE layer.

Shape legend: T tokens, k experts per token (top-k), S = T * k (token, slot) pairs, E experts in the
layer, E_b experts in one width class, H hidden, I intermediate (per expert).

Inputs: ``x [T, H]``, ``topk_ids [T, k]`` (layer expert ids), ``topk_weights [T, k]``, ``groups`` (one
:class:`~moecompress.quant.format.PackedExpertGroup` per bit width, canonical layout: ``gate_up
[2I, H]`` gate rows then up rows, ``down [H, I]``; ``gate_up.k`` = H and ``down.k`` = I give the true
input dimensions, which the packed rows only bound when H or I is not a multiple of 32), optional
unquantized biases ``gate_up_bias [E, 2I]`` (same gate-then-up order) and ``down_bias [E, H]``,
indexed by layer expert id. Output ``[T, H]``:
``sum_j w[t, j] * expert_{ids[t, j]}(x[t])``. A slot routed to an expert that is in no group
contributes zero (an expert held elsewhere, e.g. on another rank).

Experts without a gate have ``gate_up [I, H]`` (up rows only) and compute ``down(act(up x))``; this is
detected from the shapes. Activations: "silu" (SwiGLU), "gelu" (erf GeGLU), "gelu_tanh", "relu", and
"gpt_oss" (clamp-SwiGLU: ``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)``,
``out = (up + 1) * gate * sigmoid(alpha * gate)``; ``act_params`` = {"alpha", "limit"}).

Triton path (vLLM fused_moe design, one launch pair per width class):

1. ``moe_align``: slots sorted by expert and padded to BLOCK_M so each M-block has one expert
   (skipped in the decode path: one program per (token, slot) x N-tile, no sorting).
2. gate_up GEMM with the activation fused in the epilogue -> ``inter [S, I]``.
3. down GEMM, bias and routing weight in the epilogue, scattered to ``out_slots [S, H]`` (each row
   written once), then summed over the k slots of each token (deterministic; no atomics).

Shared experts are ordinary linears: run them with ``dequant_gemm`` (``moecompress.kernels.
packed_linear_forward``), not here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from moecompress.errors import MoeCompressError
from moecompress.kernels import config_table
from moecompress.kernels.launch_utils import (
    cdiv,
    dot_in_fp32,
    fit_block_k,
    launch_options,
    packed_shape,
    require_kernel_device,
    triton_kernels,
)
from moecompress.quant import format as fmt

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "gpt_oss": 4}
# transformers' activation names (a config's ``hidden_act``, the keys of ``transformers.activations.
# ACT2FN``) -> the kernel activation that computes the same function; tests/kernels/test_activations.py
# compares each against ACT2FN[name]. A name missing here has no kernel (e.g. quick_gelu, gelu_10).
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",  # erf GELU
    "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",  # tanh approximation: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_fast": "gelu_tanh",  # the same formula, sqrt(2/pi) rounded to 10 digits
    "relu": "relu",
}
ACTIVATION_ALIASES = {"swiglu": "silu", **{k: v for k, v in HF_ACTIVATIONS.items() if k not in ACTIVATION_CODES}}
GPT_OSS_DEFAULTS = {"alpha": 1.702, "limit": 7.0}


# ----------------------------------------------------------------------------------------------
# Layer metadata and validation (shared by the Triton path and the reference)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoeLayerDims:
    hidden: int  # H
    intermediate: int  # I
    gated: bool  # gate_up holds gate rows then up rows (2I); False: up rows only (I)
    activation: str  # canonical activation name
    alpha: float
    limit: float


def hf_activation(hidden_act: str) -> str:
    """The kernels' activation computing transformers' ``ACT2FN[hidden_act]`` exactly (a config's name)."""
    if hidden_act not in HF_ACTIVATIONS:
        raise MoeCompressError(
            f"expert activation {hidden_act!r} is not supported by the packed kernels; supported: {', '.join(sorted(HF_ACTIVATIONS))}"
        )
    return HF_ACTIVATIONS[hidden_act]


def canonical_activation(activation: str) -> str:
    """The kernels' name for a stored activation: one of :data:`ACTIVATION_CODES`, ``swiglu``, or a
    transformers name (mapped by :data:`HF_ACTIVATIONS`, the one table)."""
    name = ACTIVATION_ALIASES.get(activation, activation)
    if name not in ACTIVATION_CODES:
        raise MoeCompressError(
            f"unknown MoE activation {activation!r}; use one of {sorted(ACTIVATION_CODES) + sorted(ACTIVATION_ALIASES)}"
        )
    return name


def group_dims(group: fmt.PackedExpertGroup) -> tuple[int, int, bool]:
    """(H, I, gated) of one width class, checked for consistency between gate_up and down.

    H and I are the projections' ``k`` (true input dimensions), else read from the packed rows."""
    gu, dn = group.gate_up, group.down
    hidden, width = packed_shape(gu.qweight, gu.scales, gu.zeros, group.bits, group.group_size, k=gu.k)
    inter, down_out = packed_shape(dn.qweight, dn.scales, dn.zeros, group.bits, group.down_group, k=dn.k)
    if down_out != hidden:
        raise MoeCompressError(f"{group.bits}-bit group: down projects to {down_out} features, gate_up reads H={hidden}")
    if width not in (inter, 2 * inter):
        raise MoeCompressError(
            f"{group.bits}-bit group: gate_up has {width} rows; expected 2*I={2 * inter} (gated) or I={inter} (no gate)"
        )
    experts = group.gate_up.qweight.shape[0]
    if group.gate_up.qweight.dim() != 3 or group.down.qweight.shape[0] != experts or group.expert_ids.numel() != experts:
        raise MoeCompressError(f"{group.bits}-bit group: expert_ids, gate_up and down disagree on the number of experts")
    return hidden, inter, width == 2 * inter


def layer_dims(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    groups: list[fmt.PackedExpertGroup],
    num_experts: int,
    activation: str,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    act_params: dict | None,
) -> MoeLayerDims:
    """Validate one layer call and return its dimensions."""
    if not groups:
        raise MoeCompressError("moe_experts_forward needs at least one PackedExpertGroup")
    dims = {group_dims(group) for group in groups}
    if len(dims) != 1:
        raise MoeCompressError(f"all width classes of one layer must share (H, I, gated); got {sorted(dims)}")
    hidden, inter, gated = dims.pop()
    if x.dim() != 2 or x.shape[1] != hidden:
        raise MoeCompressError(f"x must be [T, {hidden}], got {tuple(x.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_weights.shape != topk_ids.shape:
        raise MoeCompressError(
            f"topk_ids and topk_weights must both be [T={x.shape[0]}, k]; got {tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
        )
    name = canonical_activation(activation)
    if name == "gpt_oss" and not gated:
        raise MoeCompressError("the gpt_oss activation needs gated experts (gate_up with 2I rows)")
    width = 2 * inter if gated else inter
    if gate_up_bias is not None and tuple(gate_up_bias.shape) != (num_experts, width):
        raise MoeCompressError(f"gate_up_bias must be [E={num_experts}, {width}], got {tuple(gate_up_bias.shape)}")
    if down_bias is not None and tuple(down_bias.shape) != (num_experts, hidden):
        raise MoeCompressError(f"down_bias must be [E={num_experts}, {hidden}], got {tuple(down_bias.shape)}")
    params = {**GPT_OSS_DEFAULTS, **(act_params or {})}
    return MoeLayerDims(hidden, inter, gated, name, float(params["alpha"]), float(params["limit"]))


# id(expert_ids) -> (weak ref to it, (version counter, E, device), local index). An entry is used
# only while the ref still points at the same live tensor with the same in-place version counter, and
# is dropped when the tensor dies (tensors compare elementwise, so a WeakKeyDictionary cannot be used).
_LOCAL_INDEX_CACHE: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def local_expert_index(group: fmt.PackedExpertGroup, num_experts: int, device: torch.device) -> torch.Tensor:
    """int32 ``[E]``: position of each layer expert inside ``group`` (-1 if not in it).

    Cached per ``group.expert_ids`` tensor (a few tiny launches saved per layer call, which matter at
    batch-1 decode). Checks ids (range, duplicates) when they live on the CPU, where that costs no
    device sync.
    """
    ids = group.expert_ids
    key = (ids._version, num_experts, torch.device(device))
    cached = _LOCAL_INDEX_CACHE.get(id(ids))
    if cached is not None and cached[0]() is ids and cached[1] == key:
        return cached[2]
    if ids.device.type == "cpu" and ids.numel():
        if int(ids.min()) < 0 or int(ids.max()) >= num_experts:
            raise MoeCompressError(f"{group.bits}-bit group has expert ids outside [0, {num_experts})")
        if torch.unique(ids).numel() != ids.numel():
            raise MoeCompressError(f"{group.bits}-bit group lists an expert id twice")
    positions = ids.to(device=device, dtype=torch.int64)
    local = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    local[positions] = torch.arange(positions.numel(), dtype=torch.int32, device=device)
    if cached is None or cached[0]() is not ids:
        weakref.finalize(ids, _LOCAL_INDEX_CACHE.pop, id(ids), None)
    _LOCAL_INDEX_CACHE[id(ids)] = (weakref.ref(ids), key, local)
    return local


def slot_local_ids(flat_ids: torch.Tensor, local_of: torch.Tensor) -> torch.Tensor:
    """int32 ``[S]``: each slot's expert position inside one group, -1 for other groups or bad ids."""
    num_experts = local_of.numel()
    ids = flat_ids.long()
    in_range = (ids >= 0) & (ids < num_experts)
    return torch.where(in_range, local_of[ids.clamp(0, num_experts - 1)], -1)


# ----------------------------------------------------------------------------------------------
# Activations in torch (the reference; the kernels implement the same formulas)
# ----------------------------------------------------------------------------------------------
def _activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    return torch.relu(x)


def apply_expert_activation(projected: torch.Tensor, dims: MoeLayerDims) -> torch.Tensor:
    """fp32 ``[rows, 2I]`` (gated) or ``[rows, I]`` -> ``[rows, I]``."""
    if not dims.gated:
        return _activation(projected, dims.activation)
    gate, up = projected[:, : dims.intermediate], projected[:, dims.intermediate :]
    if dims.activation == "gpt_oss":
        gate = gate.clamp(max=dims.limit)
        up = up.clamp(min=-dims.limit, max=dims.limit)
        return (up + 1) * (gate * torch.sigmoid(dims.alpha * gate))
    return _activation(gate, dims.activation) * up


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def moe_experts_forward_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    groups: list[fmt.PackedExpertGroup],
    num_experts: int,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    act_params: dict | None = None,
    dequantized: dict | None = None,
) -> torch.Tensor:
    """Pure-torch twin of :func:`moe_experts_forward`: a loop over experts that received tokens,
    each dequantized with ``format.dequantize``, fp32 throughout. ``[T, H] -> [T, H]``.

    ``dequantized``: a dict the caller owns, filled with each expert's dequantized weights on first use
    and read on later calls, for a caller that runs the same weights on many batches (calibration:
    one dequantization per expert instead of one per batch; the values are the same)."""
    dims = layer_dims(x, topk_ids, topk_weights, groups, num_experts, activation, gate_up_bias, down_bias, act_params)
    out = torch.zeros(x.shape[0], dims.hidden, dtype=torch.float32, device=x.device)  # [T, H]
    x32 = x.to(torch.float32)
    for group in groups:
        local_expert_index(group, num_experts, x.device)  # validates the ids
        for local, expert in enumerate(group.expert_ids.tolist()):
            tokens, slots = torch.where(topk_ids == expert)  # [n_e] each
            if tokens.numel() == 0:
                continue
            key = (group.bits, local)
            if dequantized is not None and key in dequantized:
                gate_up, down = dequantized[key]
            else:
                gate_up, down = _dequantize_expert(group, local, dims)
                if dequantized is not None:
                    dequantized[key] = (gate_up, down)
            projected = x32[tokens] @ gate_up.t()  # [n_e, 2I]
            if gate_up_bias is not None:
                projected = projected + gate_up_bias[expert].to(torch.float32)
            hidden = apply_expert_activation(projected, dims) @ down.t()  # [n_e, H]
            if down_bias is not None:
                hidden = hidden + down_bias[expert].to(torch.float32)
            out.index_add_(0, tokens, hidden * topk_weights[tokens, slots].to(torch.float32)[:, None])
    return out.to(x.dtype)


def _dequantize_expert(group: fmt.PackedExpertGroup, local: int, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up ``[2I or I, H]``, down ``[H, I]``) of the group's ``local``-th expert, float32."""
    gate_up = fmt.dequantize(
        group.gate_up.qweight[local], group.gate_up.scales[local],
        None if group.gate_up.zeros is None else group.gate_up.zeros[local], group.bits, group.group_size,
        k=dims.hidden,
    )
    down = fmt.dequantize(
        group.down.qweight[local], group.down.scales[local],
        None if group.down.zeros is None else group.down.zeros[local], group.bits, group.down_group,
        k=dims.intermediate,
    )
    return gate_up, down


# ----------------------------------------------------------------------------------------------
# Align (vLLM moe_align_block_size, in torch ops without host syncs)
# ----------------------------------------------------------------------------------------------
def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert and pad each expert's run to a multiple of ``block_m``.

    ``topk_ids [T, k]`` (or flat ``[S]``) holds expert ids; ids outside ``[0, num_experts)`` are
    skipped (slots owned by another width class). Returns, all int32:

    * ``sorted_token_ids [num_blocks * block_m]``: flat slot ids ``t * k + j`` grouped by expert in slot
      order, padding entries = S (out of range, masked by the kernels);
    * ``expert_ids [num_blocks]``: the expert of each block, -1 for blocks past the used ones;
    * ``num_tokens_post_padded [1]``: used length of ``sorted_token_ids``.

    ``num_blocks = cdiv(S, block_m) + min(num_experts, S)`` bounds the padded length without reading
    the counts back to the host (keeps the launch graph-capturable).
    """
    flat = topk_ids.reshape(-1).to(torch.int64)  # [S]
    device = flat.device
    num_slots = flat.numel()
    valid = (flat >= 0) & (flat < num_experts)
    keyed = torch.where(valid, flat, torch.full_like(flat, num_experts))  # invalid ids sort last
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, keyed, torch.ones_like(keyed))
    counts = counts[:num_experts]  # [E]
    blocks_per_expert = (counts + block_m - 1) // block_m  # [E]
    padded = blocks_per_expert * block_m
    padded_start = torch.cumsum(padded, 0) - padded  # [E] first padded position of each expert
    count_start = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert

    order = torch.argsort(keyed, stable=True)  # [S] slots grouped by expert, slot order inside
    sorted_keys = keyed[order]
    expert_of_sorted = sorted_keys.clamp(max=max(num_experts - 1, 0))
    rank = torch.arange(num_slots, device=device) - count_start[expert_of_sorted]
    num_blocks = cdiv(num_slots, block_m) + min(num_experts, num_slots)
    dump = num_blocks * block_m  # one extra cell receives the skipped slots
    dest = torch.where(sorted_keys < num_experts, padded_start[expert_of_sorted] + rank, dump)
    sorted_token_ids = torch.full((dump + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_token_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_token_ids = sorted_token_ids[:dump]

    block_ends = torch.cumsum(blocks_per_expert, 0)  # [E]
    blocks = torch.arange(num_blocks, device=device)
    block_expert = torch.searchsorted(block_ends, blocks, right=True)  # [num_blocks], E past the end
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    num_tokens_post_padded = padded.sum().reshape(1).to(torch.int32)
    return sorted_token_ids, block_expert, num_tokens_post_padded


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------
def moe_experts_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    groups: list[fmt.PackedExpertGroup],
    num_experts: int,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    act_params: dict | None = None,
) -> torch.Tensor:
    """Triton grouped MoE for one layer ``[T, H] -> [T, H]`` (config from the table by T)."""
    config = config_table.select_config("moe", x.shape[0], x.device)
    return moe_experts_forward_with_config(
        x, topk_ids, topk_weights, groups, num_experts, activation, gate_up_bias, down_bias, act_params, config=config
    )


def moe_experts_forward_with_config(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    groups: list[fmt.PackedExpertGroup],
    num_experts: int,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    act_params: dict | None = None,
    *,
    config: dict,
) -> torch.Tensor:
    """:func:`moe_experts_forward` with an explicit config (what tests and ``tune`` call).

    ``config``: ``decode`` (bool: per-slot programs, no sort), and per projection ``gate_up`` /
    ``down`` dicts with ``BLOCK_M`` (sorted path, >= 16), ``BLOCK_N``, ``BLOCK_K``, ``num_warps``,
    ``num_stages``.
    """
    dims = layer_dims(x, topk_ids, topk_weights, groups, num_experts, activation, gate_up_bias, down_bias, act_params)
    require_kernel_device(x, topk_ids, *(g.gate_up.qweight for g in groups))
    num_tokens, top_k = topk_ids.shape
    num_slots = num_tokens * top_k
    if num_slots == 0:
        return x.new_zeros(num_tokens, dims.hidden)
    x = x.contiguous()
    gate_up_bias = gate_up_bias.contiguous() if gate_up_bias is not None else None
    down_bias = down_bias.contiguous() if down_bias is not None else None
    flat_ids = topk_ids.reshape(-1).to(torch.int32).contiguous()  # [S]
    flat_weights = topk_weights.reshape(-1).contiguous()  # [S]
    # Zero-filled: slots routed to an expert in no group contribute nothing.
    out_slots = torch.zeros(num_slots, dims.hidden, dtype=x.dtype, device=x.device)  # [S, H]
    for group in groups:
        _run_group(x, flat_ids, flat_weights, top_k, group, num_experts, dims, gate_up_bias, down_bias, out_slots, config)
    # Deterministic reduction over the k slots of each token, in fp32.
    return out_slots.view(num_tokens, top_k, dims.hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


@dataclass
class _Rows:
    """How programs find their rows: decode (per slot) or the aligned blocks of one BLOCK_M."""

    decode: bool
    block_m: int
    num_row_programs: int
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_post: torch.Tensor


def _contiguous(projection: fmt.PackedProjection) -> fmt.PackedProjection:
    """The kernels derive per-expert strides from ``tensor[0].numel()``: packed tensors must be dense."""
    zeros = projection.zeros.contiguous() if projection.zeros is not None else None
    return fmt.PackedProjection(projection.qweight.contiguous(), projection.scales.contiguous(), zeros, projection.k)


def _rows_for(
    decode: bool, block_m: int, local_ids: torch.Tensor | None, num_slots: int, num_local: int, dummy: torch.Tensor
) -> _Rows:
    if decode:
        return _Rows(True, 1, num_slots, dummy, dummy, dummy)
    if block_m < 16:
        raise MoeCompressError(f"the sorted MoE path needs BLOCK_M >= 16 (tl.dot), got {block_m}")
    sorted_ids, block_expert, num_post = moe_align(local_ids, num_local, block_m)
    return _Rows(False, block_m, block_expert.numel(), sorted_ids, block_expert, num_post)


def _run_group(
    x: torch.Tensor,
    flat_ids: torch.Tensor,
    flat_weights: torch.Tensor,
    top_k: int,
    group: fmt.PackedExpertGroup,
    num_experts: int,
    dims: MoeLayerDims,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    out_slots: torch.Tensor,
    config: dict,
) -> None:
    """gate_up + activation, then down + routing weight, for the experts of one width class."""
    tk = triton_kernels()
    device = x.device
    num_slots = flat_ids.numel()
    hidden, inter = dims.hidden, dims.intermediate
    decode = bool(config.get("decode", False))
    gu_cfg, down_cfg = config["gate_up"], config["down"]
    local_of = local_expert_index(group, num_experts, device)  # [E]
    group_eids = group.expert_ids.to(device=device, dtype=torch.int32)  # [E_b]
    if group_eids.numel() == 0:
        return
    local_ids = None if decode else slot_local_ids(flat_ids, local_of)  # [S], -1 outside this class
    rows_by_block_m: dict[int, _Rows] = {}

    def rows(block_m: int) -> _Rows:
        if block_m not in rows_by_block_m:
            rows_by_block_m[block_m] = _rows_for(decode, block_m, local_ids, num_slots, group_eids.numel(), local_of)
        return rows_by_block_m[block_m]

    gu, dn = _contiguous(group.gate_up), _contiguous(group.down)
    dot_fp32 = dot_in_fp32(x.dtype)

    # gate_up: [S, H] x [E_b, 2I, H] -> act -> inter [S, I]
    inter_buf = torch.empty(num_slots, inter, dtype=x.dtype, device=device)
    r = rows(gu_cfg.get("BLOCK_M", 16))
    block_n = gu_cfg["BLOCK_N"]
    block_k = fit_block_k(gu_cfg["BLOCK_K"], group.group_size, hidden)
    tk.moe_gate_up_kernel[(r.num_row_programs, cdiv(inter, block_n))](
        x, gu.qweight, gu.scales, gu.zeros if gu.zeros is not None else gu.scales,
        gate_up_bias if gate_up_bias is not None else gu.scales, group_eids, inter_buf,
        r.sorted_ids, r.block_expert, r.num_post, flat_ids, local_of, num_experts,
        num_slots, top_k, hidden, inter, group.group_size, x.stride(0),
        gu.qweight[0].numel(), gu.scales[0].numel(), gate_up_bias.stride(0) if gate_up_bias is not None else 0,
        dims.alpha, dims.limit,
        BITS=group.bits, HAS_ZEROS=gu.zeros is not None, HAS_BIAS=gate_up_bias is not None, GATED=dims.gated,
        ACT=ACTIVATION_CODES[dims.activation], DECODE=r.decode,
        BLOCK_M=r.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        USE_DOT=not r.decode, DOT_FP32=dot_fp32, EVEN_K=hidden % block_k == 0,
        **launch_options(gu_cfg),
    )

    # down: inter [S, I] x [E_b, H, I] -> * routing weight -> out_slots [S, H]
    r = rows(down_cfg.get("BLOCK_M", 16))
    block_n = down_cfg["BLOCK_N"]
    block_k = fit_block_k(down_cfg["BLOCK_K"], group.down_group, inter)
    tk.moe_down_kernel[(r.num_row_programs, cdiv(hidden, block_n))](
        inter_buf, dn.qweight, dn.scales, dn.zeros if dn.zeros is not None else dn.scales,
        down_bias if down_bias is not None else dn.scales, group_eids, flat_weights, out_slots,
        r.sorted_ids, r.block_expert, r.num_post, flat_ids, local_of, num_experts,
        num_slots, hidden, inter, group.down_group,
        dn.qweight[0].numel(), dn.scales[0].numel(), down_bias.stride(0) if down_bias is not None else 0,
        BITS=group.bits, HAS_ZEROS=dn.zeros is not None, HAS_BIAS=down_bias is not None, DECODE=r.decode,
        BLOCK_M=r.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        USE_DOT=not r.decode, DOT_FP32=dot_fp32, EVEN_K=inter % block_k == 0,
        **launch_options(down_cfg),
    )
