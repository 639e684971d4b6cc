"""Dense dequant-GEMM: ``out = x @ dequantize(W)^T`` for one kpack-v2 packed weight.

Shape legend: M rows (tokens), K input features, N output features, G group size, Kp = K padded to a
multiple of 32, ng = ceil(K / G) (format.py). ``x [..., K]`` (leading dims flattened to M; x carries
the true K, which the packed weight only bounds), ``qweight [Kp*bits//32, N]`` int32, ``scales [ng, N]``,
``zeros [ng, N]`` uint8 or None, ``bias [N]`` or None -> ``out [..., N]`` in ``x.dtype``. The kernels
walk ``cdiv(K, BLOCK_K)`` steps and mask ``k >= K`` on x and on the weight tile, so padding rows and a
partial last group never contribute.

Two Triton paths, chosen per M bucket from the config table (``config_table.py``):

* ``splitk`` (small M): grid over N tiles x K splits x M tiles; BLOCK_M == 1 is a GEMV (broadcast
  product + ``tl.sum``), BLOCK_M >= 16 uses ``tl.dot``. fp32 partial planes summed on the host.
* ``tiled`` (larger M): classic tiled GEMM in grouped tile order, whole K per program.

``dequant_gemm_reference`` has the same signature in pure torch (dequantize, then matmul in fp32).
Shared experts and every other packed dense linear go through this function.
"""

from __future__ import annotations

import torch

from moecompress.errors import MoeCompressError
from moecompress.kernels import config_table
from moecompress.kernels.launch_utils import (
    MIN_DOT_BLOCK,
    cdiv,
    dot_in_fp32,
    fit_block_k,
    launch_options,
    packed_shape,
    require_kernel_device,
    triton_kernels,
)
from moecompress.quant import format as fmt


def dequant_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch twin of :func:`dequant_gemm`: ``x [..., K] -> [..., N]`` via ``format.dequantize``."""
    k, _n = packed_shape(qweight, scales, zeros, bits, group_size, k=x.shape[-1])
    weight = fmt.dequantize(qweight, scales, zeros, bits, group_size, torch.float32, k=k)  # [N, K]
    out = x.to(torch.float32) @ weight.t()  # [..., N], fp32 accumulation like the kernels
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def dequant_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton dequant-GEMM ``x [..., K] @ dequantize(W)^T (+ bias) -> [..., N]`` (config from the table)."""
    rows = x.numel() // max(x.shape[-1], 1)
    config = config_table.select_config("dequant_gemm", rows, x.device)
    return dequant_gemm_with_config(x, qweight, scales, zeros, bits, group_size, bias, config=config)


def dequant_gemm_with_config(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    config: dict,
) -> torch.Tensor:
    """:func:`dequant_gemm` with an explicit launch config (what tests and ``tune`` call).

    ``config``: ``kernel`` ("splitk" | "tiled"), ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` (clipped to a
    divisor of the group size), ``SPLIT_K`` (splitk), ``GROUP_M`` (tiled), ``num_warps``, ``num_stages``.
    """
    if qweight.dim() != 2:
        raise MoeCompressError(f"dequant_gemm takes one weight (qweight [Kp*bits//32, N]); got {tuple(qweight.shape)}")
    k, n = packed_shape(qweight, scales, zeros, bits, group_size, k=x.shape[-1])
    if bias is not None and bias.shape != (n,):
        raise MoeCompressError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    require_kernel_device(x, qweight)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    block_k = fit_block_k(config["BLOCK_K"], group_size, k)
    kernel = config.get("kernel", "splitk")
    if kernel == "splitk":
        out = _launch_splitk(x2, qweight, scales, zeros, bias, bits, group_size, k, n, block_k, config)
    elif kernel == "tiled":
        out = _launch_tiled(x2, qweight, scales, zeros, bias, bits, group_size, k, n, block_k, config)
    else:
        raise MoeCompressError(f"unknown dequant_gemm kernel {kernel!r} in the config; use 'splitk' or 'tiled'")
    return out.reshape(*lead, n)


def _launch_splitk(x2, qweight, scales, zeros, bias, bits, group_size, k, n, block_k, config) -> torch.Tensor:
    """GEMV / split-K launch -> ``[M, N]`` in ``x.dtype``."""
    tk = triton_kernels()
    m = x2.shape[0]
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    split_k = max(1, min(config.get("SPLIT_K", 1), cdiv(k, block_k)))
    # One split writes the final dtype directly; several write fp32 planes summed below.
    plane_dtype = x2.dtype if split_k == 1 else torch.float32
    planes = torch.empty(split_k, m, n, device=x2.device, dtype=plane_dtype)
    grid = (cdiv(n, block_n), split_k, cdiv(m, block_m))
    tk.dense_splitk_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, planes,
        m, n, k, group_size, x2.stride(0), m * n,
        BITS=bits, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        USE_DOT=block_m >= MIN_DOT_BLOCK, DOT_FP32=dot_in_fp32(x2.dtype), EVEN_K=k % block_k == 0,
        **launch_options(config),
    )
    return planes[0] if split_k == 1 else planes.sum(dim=0).to(x2.dtype)


def _launch_tiled(x2, qweight, scales, zeros, bias, bits, group_size, k, n, block_k, config) -> torch.Tensor:
    """Tiled GEMM launch -> ``[M, N]`` in ``x.dtype``."""
    tk = triton_kernels()
    m = x2.shape[0]
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    if block_m < MIN_DOT_BLOCK:
        raise MoeCompressError(f"the tiled kernel needs BLOCK_M >= {MIN_DOT_BLOCK}, got {block_m}")
    out = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    grid = (cdiv(m, block_m) * cdiv(n, block_n),)
    tk.dense_tiled_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        m, n, k, group_size, x2.stride(0),
        BITS=bits, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config.get("GROUP_M", 8),
        DOT_FP32=dot_in_fp32(x2.dtype), EVEN_K=k % block_k == 0,
        **launch_options(config),
    )
    return out
