"""Host-side helpers shared by the Triton launchers (no triton import at module level)."""

from __future__ import annotations

import os
from types import ModuleType

import torch

from moecompress.errors import MoeCompressError
from moecompress.quant import format as fmt

MIN_DOT_BLOCK = 16  # tl.dot needs every tile dimension >= 16 on GPU


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_kernels() -> ModuleType:
    """Import the jit kernels lazily, so the torch path never needs triton."""
    try:
        from moecompress.kernels import triton_kernels as module
    except ImportError as error:
        raise MoeCompressError(
            f"the triton kernel backend needs triton ({error}); install triton or set MOECOMPRESS_KERNEL=torch"
        ) from error
    return module


def require_kernel_device(*tensors: torch.Tensor | None) -> None:
    """Triton launches need CUDA tensors, or CPU tensors under the interpreter."""
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type != "cuda" and not interpreting():
            raise MoeCompressError(
                f"the triton kernels need CUDA tensors, got a tensor on {tensor.device}; "
                "move the inputs to a GPU or set MOECOMPRESS_KERNEL=torch"
            )


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Run tl.dot on fp32 operands: for fp32 activations, and always under the interpreter (bf16 dot
    is wrong there)."""
    return interpreting() or dtype == torch.float32


def fit_block_k(block_k: int, group_size: int, k: int | None = None) -> int:
    """Largest power of two <= ``block_k`` dividing ``group_size``, so one K step reads one scale row.

    With ``k`` (the true K) and one group per row (``group_size >= k``: per-channel) every step reads
    scale row 0, so ``block_k`` only has to be a power of two >= 16; it is not grown past K's power of
    two (masked columns are wasted work)."""
    if k is not None and group_size >= k:
        cap = max(MIN_DOT_BLOCK, 1 << max(k - 1, 1).bit_length())
        return max(MIN_DOT_BLOCK, 1 << (min(block_k, cap).bit_length() - 1))
    fitted = 1 << (min(block_k, group_size).bit_length() - 1)
    while group_size % fitted:
        fitted //= 2
    if fitted < MIN_DOT_BLOCK:
        raise MoeCompressError(
            f"group size {group_size} is not a multiple of {MIN_DOT_BLOCK}, which the triton kernels need; "
            "use MOECOMPRESS_KERNEL=torch for this weight"
        )
    return fitted


def packed_shape(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int | None = None,
) -> tuple[int, int]:
    """(K, N) of a packed weight ``qweight [..., Kp*bits//32, N]``; raises on inconsistent tensors.

    ``k``: the true K (format.py: qweight holds K padded to a multiple of 32, so its rows only bound
    K); None reads K = Kp from the rows (kpack-v1 data)."""
    if bits not in fmt.SUPPORTED_BITS:
        raise MoeCompressError(f"bits must be one of {fmt.SUPPORTED_BITS}, got {bits}")
    if qweight.dtype != torch.int32:
        raise MoeCompressError(f"qweight must be int32 (kpack), got {qweight.dtype}")
    rows, n = qweight.shape[-2:]
    if k is None:
        k = rows * 32 // bits
        if fmt.packed_rows(k, bits) != rows:
            raise MoeCompressError(f"qweight has {rows} rows, which no K packs to at {bits} bits")
    elif k < 1 or fmt.packed_rows(k, bits) != rows:
        held = rows * 32 // bits
        raise MoeCompressError(
            f"the input has {k} input features but the packed weight has {rows} qweight rows at {bits} bits "
            f"(K in {max(held - fmt.PACK_ALIGN + 1, 1)}..{held})"
        )
    if group_size == fmt.PER_CHANNEL:
        raise MoeCompressError(f"the kernels take the group length itself: pass K={k} for per-channel, not -1")
    problem = fmt.group_size_problem(k, group_size)
    if problem is not None:
        raise MoeCompressError(problem)
    expected = (*qweight.shape[:-2], fmt.num_groups(k, group_size), n)
    if tuple(scales.shape) != expected:
        raise MoeCompressError(f"scales shape {tuple(scales.shape)} does not match qweight: expected {expected}")
    if zeros is not None and tuple(zeros.shape) != expected:
        raise MoeCompressError(f"zeros shape {tuple(zeros.shape)} does not match qweight: expected {expected}")
    return k, n


def launch_options(config: dict) -> dict:
    """num_warps / num_stages of a config (the interpreter ignores them)."""
    return {key: config[key] for key in ("num_warps", "num_stages") if key in config}
