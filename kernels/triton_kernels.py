"""Triton kernels that dequantize kpack-v2 weights in registers and multiply (dense and grouped MoE).

This module imports triton at module level: the host code in ``dequant_gemm.py`` / ``moe_gemm.py``
imports it lazily, so ``import moecompress.kernels`` works without triton or a GPU.

Shape legend: M rows of activations, K input features, N output features; for MoE T tokens, k slots
per token, S = T * k (token, slot) pairs, E_b experts in one width class, H hidden, I intermediate.

Weight layout (``moecompress.quant.format``, kpack-v2): ``qweight [Kp*bits//32, N]`` int32 packed along
K with N contiguous, Kp = K padded up to a multiple of 32 (3-bit: a 2-bit plane of ``Kp // 16`` rows then
a 1-bit plane of ``Kp // 32`` rows), ``scales [ceil(K/G), N]`` fp16, ``zeros [ceil(K/G), N]`` uint8 or
absent (symmetric: z = 2**(bits-1)). K passed to the kernels is the TRUE K (x's width); Kp is derived.

Every kernel walks K in ``cdiv(K, BLOCK_K)`` steps with ``group_size % BLOCK_K == 0`` (or one group per
row), so one scale/zero row serves a whole step, and dequantizes in FMA form ``w = q * s + (-z * s)``
just before the product. Unless EVEN_K (``K % BLOCK_K == 0``, a constexpr: no masks at all), the last
step masks ``k >= K``: x is not read there (0) and neither are the codes, so padding rows and the
columns past a partial last group contribute exactly nothing (0 times a finite weight).
Interpreter limits (TRITON_INTERPRET=1) shape two choices: ``DOT_FP32`` casts both operands to fp32
because bf16 ``tl.dot`` is wrong there, and every shift is followed by a mask because int32 ``>>`` is
arithmetic.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Activation codes passed as constexpr ACT; the host maps names to these (moe_gemm.ACTIVATION_CODES).
ACT_SILU: tl.constexpr = tl.constexpr(0)
ACT_GELU: tl.constexpr = tl.constexpr(1)
ACT_GELU_TANH: tl.constexpr = tl.constexpr(2)
ACT_RELU: tl.constexpr = tl.constexpr(3)
ACT_GPT_OSS: tl.constexpr = tl.constexpr(4)


# ----------------------------------------------------------------------------------------------
# Shared tile helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_codes(qw_ptr, offs_k, offs_n, mask_n, row_stride, K, BITS: tl.constexpr, EVEN_K: tl.constexpr):
    """Integer codes ``[BLOCK_K, BLOCK_N]`` int32 for absolute rows ``offs_k`` and columns ``offs_n``.

    Each code row k reads packed row ``k // per_word`` (neighbouring k hit the same word: the cache
    serves the repeats, as in GemLite) and shifts by its bit offset inside the word. Rows ``k >= K``
    (true K) are not read unless EVEN_K: they load code 0.
    """
    col = offs_n[None, :]
    if EVEN_K:
        mask = mask_n[None, :]
    else:
        mask = mask_n[None, :] & (offs_k[:, None] < K)
    if BITS == 3:
        KP = (K + 31) // 32 * 32  # the padded K: the 1-bit plane starts after Kp // 16 rows
        low_word = tl.load(qw_ptr + (offs_k[:, None] // 16) * row_stride + col, mask=mask, other=0)
        high_word = tl.load(qw_ptr + (KP // 16 + offs_k[:, None] // 32) * row_stride + col, mask=mask, other=0)
        low = (low_word >> ((offs_k[:, None] % 16) * 2)) & 3
        high = (high_word >> (offs_k[:, None] % 32)) & 1
        codes = low | (high << 2)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        word = tl.load(qw_ptr + (offs_k[:, None] // PER_WORD) * row_stride + col, mask=mask, other=0)
        codes = (word >> ((offs_k[:, None] % PER_WORD) * BITS)) & MASK
    return codes


@triton.jit
def _load_dequant(
    qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_n, row_stride, K, group_size,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Dequantized weight tile ``W^T[k0:k0+BLOCK_K, offs_n]`` as fp32 ``[BLOCK_K, BLOCK_N]``.

    ``scales``/``zeros`` rows have the same row stride as ``qweight`` (N); ``k0 // group_size`` is the
    single group row of this K step (``k0 < K``, so the row exists: ceil(K / G) rows). Rows ``k >= K``
    hold the finite ``-z * s``; the activation is 0 there, so they add nothing.
    """
    codes = _load_codes(qw_ptr, offs_k, offs_n, mask_n, row_stride, K, BITS, EVEN_K)
    group_row = k0 // group_size
    scale = tl.load(s_ptr + group_row * row_stride + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(z_ptr + group_row * row_stride + offs_n, mask=mask_n, other=0).to(tl.float32)
    else:
        zero = tl.full(scale.shape, 2 ** (BITS - 1), tl.float32)
    neg_zero_scale = -zero * scale
    return codes.to(tl.float32) * scale[None, :] + neg_zero_scale[None, :]


@triton.jit
def _mma(acc, a, w, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc [BM, BN] fp32 += a [BM, BK] @ w [BK, BN]`` (w fp32, already dequantized).

    USE_DOT=False is the GEMV form (BM in 1..4): a broadcast product reduced with ``tl.sum``, which
    needs no tensor-core tile minimum and suits batch-1 decode.
    """
    if USE_DOT:
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
    else:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    return acc


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """Elementwise activation on fp32 (ACT_GPT_OSS is handled by :func:`_gated_activation`)."""
    if ACT == ACT_SILU:
        y = x * tl.sigmoid(x)
    elif ACT == ACT_GELU:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == ACT_GELU_TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(u) = 2 sigmoid(2u) - 1
    else:  # ACT_RELU
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _gated_activation(gate, up, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr):
    """fp32 ``[BM, BN]`` -> GLU output: act(gate) * up, GPT-OSS clamp-SwiGLU, or act(up) if gateless."""
    if not GATED:
        out = _activation(up, ACT)
    elif ACT == ACT_GPT_OSS:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = (up + 1.0) * (gate * tl.sigmoid(alpha * gate))
    else:
        out = _activation(gate, ACT) * up
    return out


# ----------------------------------------------------------------------------------------------
# Dense dequant-GEMM: out [M, N] = x [M, K] @ dequantize(W)^T
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dense_tile(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    pid_m, pid_n, pid_k, step_start, step_end,
    M, N, K, group_size, stride_xm, split_stride,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One output tile over K steps ``[step_start, step_end)``, stored into split plane ``pid_k``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    a_row_ptrs = x_ptr + rows * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(step_start, step_end):
        k0 = step * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a_mask = mask_m[:, None]
        else:
            a_mask = mask_m[:, None] & (offs_k[None, :] < K)
        a = tl.load(a_row_ptrs[:, None] + offs_k[None, :], mask=a_mask, other=0.0)
        w = _load_dequant(qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_n, N, K, group_size, BITS, HAS_ZEROS, EVEN_K)
        acc = _mma(acc, a, w, USE_DOT, DOT_FP32)
    if HAS_BIAS:
        # Only split 0 adds the bias, so the sum over split planes adds it once.
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    out_ptrs = out_ptr + pid_k.to(tl.int64) * split_stride + rows[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def dense_splitk_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, stride_xm, split_stride,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
):
    """GEMV / split-K path for small M. Grid ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``.

    Split ``pid_k`` writes fp32 partials to plane ``pid_k`` of ``out [SPLIT_K, M, N]``; the host sums
    the planes (deterministic, unlike fp32 atomics whose order varies run to run).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    num_steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_steps, SPLIT_K)
    step_start = pid_k * per_split
    step_end = tl.minimum(step_start + per_split, num_steps)
    _dense_tile(
        x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, pid_m, pid_n, pid_k, step_start, step_end,
        M, N, K, group_size, stride_xm, split_stride,
        BITS, HAS_ZEROS, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, DOT_FP32, EVEN_K,
    )


@triton.jit
def dense_tiled_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, stride_xm,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Tiled GEMM path for larger M. 1-D grid ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)`` in grouped
    order (GROUP_M row-tiles share each weight column tile while it is hot in L2)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    _dense_tile(
        x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, pid_m, pid_n, pid * 0, 0, tl.cdiv(K, BLOCK_K),
        M, N, K, group_size, stride_xm, 0,
        BITS, HAS_ZEROS, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, True, DOT_FP32, EVEN_K,
    )


# ----------------------------------------------------------------------------------------------
# Grouped MoE (one launch per width class): gate_up + activation, then down + routing weight
# ----------------------------------------------------------------------------------------------
@triton.jit
def _moe_rows(
    pid_m, sorted_ids_ptr, block_expert_ptr, num_post_ptr, topk_ids_ptr, local_of_ptr, num_experts, num_slots,
    BLOCK_M: tl.constexpr, DECODE: tl.constexpr,
):
    """Which (token, slot) rows this program serves and their local expert.

    Returns ``slots [BLOCK_M]`` (flat slot ids ``t * k + j``), ``mask_m`` and ``local_e`` (int64 scalar,
    -1 when there is nothing to do: a padding-only block, or in decode a slot routed to another class).
    DECODE: one program per slot (BLOCK_M == 1), expert looked up directly, no sorting.
    Sorted: block ``pid_m`` of ``moe_align``'s output; every row of a block has the same expert.
    """
    if DECODE:
        slots = pid_m + tl.arange(0, BLOCK_M)
        expert = tl.load(topk_ids_ptr + pid_m).to(tl.int64)
        in_range = (expert >= 0) & (expert < num_experts)  # out-of-range ids: another rank's experts
        local_e = tl.load(local_of_ptr + expert, mask=in_range, other=-1).to(tl.int64)
    else:
        num_post = tl.load(num_post_ptr)
        slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        local_e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        local_e = tl.where(pid_m * BLOCK_M < num_post, local_e, -1)
    mask_m = slots < num_slots
    return slots, mask_m, local_e


@triton.jit
def moe_gate_up_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, group_eids_ptr, inter_ptr,
    sorted_ids_ptr, block_expert_ptr, num_post_ptr, topk_ids_ptr, local_of_ptr, num_experts,
    num_slots, top_k, H, I, group_size, stride_xm, stride_qe, stride_se, stride_bias_e, alpha, limit,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    ACT: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
):
    """``inter[slot, :] = act(x[slot // k] @ gate_up[e]^T (+ bias))`` for one width class.

    Grid ``(row blocks, cdiv(I, BLOCK_N))``. Gated experts: one program computes the gate columns
    ``[n0, n0+BN)`` and the matching up columns ``I + [n0, n0+BN)`` from the same activation tile, so
    the activation is applied in registers and only ``[S, I]`` is written.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slots, mask_m, local_e = _moe_rows(
        pid_m, sorted_ids_ptr, block_expert_ptr, num_post_ptr, topk_ids_ptr, local_of_ptr, num_experts, num_slots,
        BLOCK_M, DECODE,
    )
    if local_e < 0:
        return
    width = 2 * I if GATED else I  # rows of gate_up == columns of its packed qweight
    qw_ptr += local_e * stride_qe
    s_ptr += local_e * stride_se
    z_ptr += local_e * stride_se
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    tokens = (slots // top_k).to(tl.int64)
    a_row_ptrs = x_ptr + tokens * stride_xm
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a_mask = mask_m[:, None]
        else:
            a_mask = mask_m[:, None] & (offs_k[None, :] < H)
        a = tl.load(a_row_ptrs[:, None] + offs_k[None, :], mask=a_mask, other=0.0)
        if GATED:
            w_gate = _load_dequant(qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_n, width, H, group_size, BITS, HAS_ZEROS, EVEN_K)
            acc_gate = _mma(acc_gate, a, w_gate, USE_DOT, DOT_FP32)
            w_up = _load_dequant(qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n + I, mask_n, width, H, group_size, BITS, HAS_ZEROS, EVEN_K)
        else:
            w_up = _load_dequant(qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_n, width, H, group_size, BITS, HAS_ZEROS, EVEN_K)
        acc_up = _mma(acc_up, a, w_up, USE_DOT, DOT_FP32)
    if HAS_BIAS:
        expert = tl.load(group_eids_ptr + local_e).to(tl.int64)  # biases are indexed by layer expert id
        bias_row = bias_ptr + expert * stride_bias_e
        if GATED:
            acc_gate += tl.load(bias_row + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            acc_up += tl.load(bias_row + I + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            acc_up += tl.load(bias_row + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    hidden = _gated_activation(acc_gate, acc_up, alpha, limit, ACT, GATED)
    out_ptrs = inter_ptr + slots.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(out_ptrs, hidden.to(inter_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def moe_down_kernel(
    inter_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, group_eids_ptr, topk_weights_ptr, out_ptr,
    sorted_ids_ptr, block_expert_ptr, num_post_ptr, topk_ids_ptr, local_of_ptr, num_experts,
    num_slots, H, I, group_size, stride_qe, stride_se, stride_bias_e,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
):
    """``out[slot, :] = topk_weight[slot] * (inter[slot] @ down[e]^T (+ bias))``.

    Grid ``(row blocks, cdiv(H, BLOCK_N))``. Each slot row is written exactly once (scatter to
    ``[S, H]``); the host sums the k slots of each token, so the result does not depend on the order
    programs run in (fp32 atomics would).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slots, mask_m, local_e = _moe_rows(
        pid_m, sorted_ids_ptr, block_expert_ptr, num_post_ptr, topk_ids_ptr, local_of_ptr, num_experts, num_slots,
        BLOCK_M, DECODE,
    )
    if local_e < 0:
        return
    qw_ptr += local_e * stride_qe
    s_ptr += local_e * stride_se
    z_ptr += local_e * stride_se
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    rows = slots.to(tl.int64)
    a_row_ptrs = inter_ptr + rows * I
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a_mask = mask_m[:, None]
        else:
            a_mask = mask_m[:, None] & (offs_k[None, :] < I)
        a = tl.load(a_row_ptrs[:, None] + offs_k[None, :], mask=a_mask, other=0.0)
        w = _load_dequant(qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_n, H, I, group_size, BITS, HAS_ZEROS, EVEN_K)
        acc = _mma(acc, a, w, USE_DOT, DOT_FP32)
    if HAS_BIAS:
        expert = tl.load(group_eids_ptr + local_e).to(tl.int64)
        acc += tl.load(bias_ptr + expert * stride_bias_e + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    route = tl.load(topk_weights_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
    acc = acc * route[:, None]
    out_ptrs = out_ptr + rows[:, None] * H + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
