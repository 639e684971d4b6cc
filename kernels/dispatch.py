"""Backend selection and dispatch for the dequant-GEMM kernels (re-exported by ``moecompress.kernels``).

Public API (every function has a pure-torch twin with the same signature)::

    get_backend(device=None) -> "triton" | "torch"
    dequant_gemm_dispatch(x, qweight, scales, zeros, bits, group_size, bias=None) -> [..., N]
    moe_experts_dispatch(x, topk_ids, topk_weights, groups, num_experts, activation="silu",
                         gate_up_bias=None, down_bias=None, act_params=None) -> [T, H]
    packed_linear_forward(x, weight: PackedWeight, bias=None) -> [..., N]

Routed experts go through ``moe_experts_dispatch`` (one call per MoE layer, all width classes);
shared experts and other packed dense linears go through ``dequant_gemm_dispatch`` /
``packed_linear_forward``.

Backend choice: ``$MOECOMPRESS_KERNEL`` = "triton" or "torch" forces one; otherwise Triton when CUDA
is available and the inputs are on a CUDA device, else torch. Importing this package needs neither a
GPU nor triton: the Triton modules are imported only when the Triton backend runs.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from moecompress.errors import MoeCompressError
from moecompress.kernels.dequant_gemm import dequant_gemm, dequant_gemm_reference
from moecompress.kernels.launch_utils import interpreting
from moecompress.kernels.moe_gemm import moe_align, moe_experts_forward, moe_experts_forward_reference
from moecompress.quant.format import PackedExpertGroup, PackedWeight

BACKEND_ENV = "MOECOMPRESS_KERNEL"
BACKENDS = ("triton", "torch")

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "dequant_gemm",
    "dequant_gemm_dispatch",
    "dequant_gemm_reference",
    "get_backend",
    "moe_align",
    "moe_experts_dispatch",
    "moe_experts_forward",
    "moe_experts_forward_reference",
    "packed_linear_forward",
]


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a module entry of None (blocked import) raises ValueError
        return False


def _forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise MoeCompressError(f"{BACKEND_ENV}={value!r} is not a kernel backend; set it to 'triton' or 'torch' or unset it")
    return value


def get_backend(device: torch.device | str | torch.Tensor | None = None) -> str:
    """"triton" or "torch" for inputs on ``device`` (a device, a tensor, or None for "any").

    ``$MOECOMPRESS_KERNEL`` forces a backend (an invalid value raises MoeCompressError). Forcing
    "triton" needs triton, and CUDA inputs unless TRITON_INTERPRET=1 (the CPU interpreter).
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device) if device is not None else None
    forced = _forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not _triton_installed():
            raise MoeCompressError(f"{BACKEND_ENV}=triton but triton is not installed; install it or set {BACKEND_ENV}=torch")
        if device is not None and device.type != "cuda" and not interpreting():
            raise MoeCompressError(
                f"{BACKEND_ENV}=triton but the inputs are on {device}; move them to a GPU, set TRITON_INTERPRET=1 "
                f"to run the kernels in the CPU interpreter, or set {BACKEND_ENV}=torch"
            )
        return "triton"
    on_cuda = device is None or device.type == "cuda"
    if torch.cuda.is_available() and on_cuda and _triton_installed():
        return "triton"
    return "torch"


def dequant_gemm_dispatch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K] @ dequantize(W)^T (+ bias) -> [..., N]`` on the selected backend."""
    impl = dequant_gemm if get_backend(x) == "triton" else dequant_gemm_reference
    return impl(x, qweight, scales, zeros, bits, group_size, bias)


def moe_experts_dispatch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    groups: list[PackedExpertGroup],
    num_experts: int,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    act_params: dict | None = None,
    dequantized: dict | None = None,
) -> torch.Tensor:
    """Routed experts of one MoE layer ``[T, H] -> [T, H]`` on the selected backend (see moe_gemm).
    ``dequantized``: the torch reference's cache of dequantized experts (the Triton kernel dequantizes
    inside the GEMM and ignores it)."""
    if get_backend(x) == "triton":
        return moe_experts_forward(x, topk_ids, topk_weights, groups, num_experts, activation, gate_up_bias, down_bias, act_params)
    return moe_experts_forward_reference(
        x, topk_ids, topk_weights, groups, num_experts, activation, gate_up_bias, down_bias, act_params, dequantized
    )


def packed_linear_forward(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``nn.Linear`` on a :class:`PackedWeight`: ``x [..., K] -> [..., N]`` (shared experts, dense MLPs)."""
    return dequant_gemm_dispatch(x, weight.qweight, weight.scales, weight.zeros, weight.bits, weight.group_size, bias)
