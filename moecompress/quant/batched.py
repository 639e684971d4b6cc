"""All experts of a layer at once: routed-token gather, Hessians and GPTQ as batched tensor math.

Shape legend: T tokens of the layer (all calibration batches), E experts (of a chunk), k top-k,
H hidden size, K in features, N out features, G group size, B columns per lazy-update block,
T_e the tokens feeding expert e.

The per-expert reference is :func:`moecompress.quant.gptq.gptq_quantize` (and the quantize pass's
``expert_tokens`` / ``_hessian``); tests/quant/test_gptq_batched.py compares the two. The functions
here repeat the reference's floating-point operations in the same order, only over a leading expert
dimension, so on CPU the results are bit-identical (codes, scales, zeros; GPTQ's loss estimate,
a diagnostic reduced over a different shape, agrees to 1e-9 relative). Where an operation could
change its summation order when batched (a GEMM through ``bmm``), it runs per expert instead: those
are a handful of large GEMMs per layer, not the per-column Python work that batching removes. Even
operand layout matters to MKL (a row-major copy of a column-major Cholesky factor changed the last
bits of the block updates), so the factors keep LAPACK's layout. On CUDA the same code runs with one
``bmm`` per block update; results then match the CPU's within float32 rounding, not bit for bit.

Memory: the batched solver holds, per expert, W ``[N, K]``, H and its inverse factor ``[K, K]`` and the
int64 codes ``[N, K]``; :func:`experts_per_chunk` sizes expert chunks to a byte budget (256 experts of
K = 7168 would need 256 x 7168^2 x 4 B = 52 GB for the Hessians alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from moecompress.errors import MoeCompressError
from moecompress.quant.gptq import CHOLESKY_RETRIES, accumulate_hessian
from moecompress.quant.grid import QuantResult, QuantSpec, check_finite_weight, compute_qparams

HESSIAN_METHODS = ("segment", "padded")


# --------------------------------------------------------------------------------------------------
# Routing: one gather per layer
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerRouting:
    """A layer's calibration tokens and routing, concatenated over batches (batch order kept).

    x ``[T, H]`` the experts' inputs as recorded (float32, or the 16-bit storage dtype of the run: the
    Hessians convert token blocks to float32); applied ``[T, E]`` the routing weight the model applies to (t, e), 0 when e
    is not in t's top-k (a token routed to e twice gets the sum, as the experts module adds it
    twice); routed ``[T, E]`` bool; probs ``[T, E]`` router probabilities (affinity of the tokens an
    expert was not routed, used with calibrate-all-experts).
    """

    x: torch.Tensor
    applied: torch.Tensor
    routed: torch.Tensor
    probs: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.x.shape[0])

    def routed_counts(self) -> list[int]:
        """Tokens routed to each expert, ``[E]`` as Python ints."""
        return self.routed.sum(dim=0).tolist()

    def to(self, device: torch.device | str) -> LayerRouting:
        """On ``device``; tensors in pinned host memory (``gather_routing(pin=True)``) are copied
        asynchronously (the caching host allocator keeps them alive until their copy is done)."""
        return LayerRouting(*(t.to(device, non_blocking=t.is_pinned()) for t in (self.x, self.applied, self.routed, self.probs)))


def gather_routing(
    xs: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    probs: Sequence[torch.Tensor],
    num_experts: int,
    release_inputs: bool = False,
    pin: bool = False,
) -> LayerRouting:
    """Concatenate per-batch experts-module inputs into one :class:`LayerRouting`.

    xs[b] ``[T_b, H]``, indices[b] / weights[b] ``[T_b, k]``, probs[b] ``[T_b, E]``. The applied weight
    is a scatter-add of the top-k weights into ``[T, E]``: for a token routed once, ``0 + w == w``
    exactly, the value the per-expert reference ``(w * hit).sum(-1)`` gives. ``release_inputs``:
    ``xs`` (a list) is emptied as its batches are copied, so the per-batch inputs and the
    concatenation never both exist in full (T x H x 4 B each: 7.5 GB at 128 x 2048 tokens, H = 7168).
    ``pin``: the concatenated tokens (the one large tensor) are written straight into pinned host
    memory, so their copy to a CUDA solver is a DMA that needs no staging copy (CUDA only).
    """
    if not xs:
        raise MoeCompressError("no calibration batches reached the experts module")
    if not len(xs) == len(indices) == len(weights) == len(probs):
        raise MoeCompressError(
            f"routing was recorded for {len(indices)}/{len(weights)}/{len(probs)} of {len(xs)} batches "
            "(indices/weights/router probabilities); the router and the experts must see every batch"
        )
    x = _concat_rows(xs, release_inputs, pin)  # [T, H]
    idx = torch.cat([t.reshape(-1, t.shape[-1]) for t in indices]).long()  # [T, k]
    w = torch.cat([t.reshape(-1, t.shape[-1]) for t in weights]).float()  # [T, k]
    p = torch.cat([t.reshape(-1, t.shape[-1]) for t in probs]).float()  # [T, E]
    valid = (idx >= 0) & (idx < num_experts)  # ids outside [0, E) never reach an expert
    sentinel = torch.where(valid, idx, num_experts)  # column E collects them and is dropped
    applied = torch.zeros(idx.shape[0], num_experts + 1, dtype=torch.float32, device=x.device)
    applied.scatter_add_(1, sentinel, w)
    hits = torch.zeros(idx.shape[0], num_experts + 1, dtype=torch.int32, device=x.device)
    hits.scatter_add_(1, sentinel, torch.ones_like(sentinel, dtype=torch.int32))
    return LayerRouting(x, applied[:, :num_experts], hits[:, :num_experts] > 0, p)


def _concat_rows(parts: Sequence[torch.Tensor], release: bool, pin: bool = False) -> torch.Tensor:
    """``torch.cat`` of the parts' rows, in their (floating) dtype; with ``release`` (a list) each part
    is dropped from the list once copied; with ``pin`` into pinned host memory."""
    rows = [t.reshape(-1, t.shape[-1]) for t in parts]
    if not release and not pin:
        return torch.cat(rows)
    del rows  # views would keep every part alive
    total = sum(int(t.numel() // t.shape[-1]) for t in parts)
    out = torch.empty(total, parts[0].shape[-1], dtype=parts[0].dtype, device=parts[0].device, pin_memory=pin)
    start = 0
    for i in range(len(parts)):
        part = (parts.pop(0) if release else parts[i]).reshape(-1, out.shape[-1])
        out[start : start + part.shape[0]].copy_(part)
        start += part.shape[0]
    return out


def expert_segments(
    routing: LayerRouting, experts: Sequence[int], all_tokens: bool, agq: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each listed expert's calibration tokens and affinities: ``[(x_e [T_e, H], c_e [T_e])]``.

    Routed only: the (expert, token) pairs sorted by expert then token (``nonzero`` of the
    transposed mask is that order), ONE gather for all listed experts, then views per segment.
    Calibrate-all: every expert shares ``x`` (no copy); its affinities are the applied routing
    weight where routed and the router probability elsewhere (MoEQuant AGQ). Without AGQ all ones.
    """
    cols = torch.tensor(list(experts), dtype=torch.long, device=routing.x.device)
    routed = routing.routed[:, cols]  # [T, E_c]
    affinity = torch.where(routed, routing.applied[:, cols], routing.probs[:, cols])  # [T, E_c]
    if all_tokens:
        out = []
        for j in range(len(experts)):
            c = affinity[:, j].contiguous()
            out.append((routing.x, c if agq else torch.ones_like(c)))
        return out
    pairs = routed.t().nonzero()  # [sum T_e, 2] (chunk column, token), sorted by column then token
    x_sorted = routing.x[pairs[:, 1]]  # [sum T_e, H]: the one gather
    c_sorted = affinity[pairs[:, 1], pairs[:, 0]]
    if not agq:
        c_sorted = torch.ones_like(c_sorted)
    counts = routed.sum(dim=0).tolist()
    return list(zip(x_sorted.split(counts), c_sorted.split(counts)))


# --------------------------------------------------------------------------------------------------
# Hessians
# --------------------------------------------------------------------------------------------------


def expert_hessians(
    segments: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int, method: str = "segment"
) -> torch.Tensor:
    """GPTQ Hessians ``[E, K, K]`` float32 of every segment ``(x_e [T_e, K], c_e [T_e])``.

    ``H_e = (2 / T_e) sum_t c_t x_t x_t^T`` as :func:`accumulate_hessian` builds it (zeros when
    T_e == 0). ``segment``: one GEMM per expert on its contiguous rows, exactly the reference's call
    (bit-identical); the work is sum_e T_e K^2, so skewed routing costs nothing extra. ``padded``:
    segments zero-padded to the longest, one ``bmm`` (E * T_max * K^2 work plus an ``[E, T_max, K]``
    copy); equal within float32 rounding (max 1e-6 relative), not bit-identical. On CPU (1 thread,
    benchmarks/expert_solving.py, skewed top-2/top-8 routing, 16-128 experts, K 256-2048) padded was
    3-18x slower on routed tokens (it pays for the longest segment E times) and 0.8-1.3x segment's time
    with calibrate-all (equal segments), so the pass uses segment; padded stays for accelerators, where
    one ``bmm`` beats E launches.
    """
    if method not in HESSIAN_METHODS:
        raise MoeCompressError(f"unknown Hessian method {method!r}; choose one of {', '.join(HESSIAN_METHODS)}")
    device = segments[0][0].device if segments else None
    hs = torch.zeros(len(segments), k, k, dtype=torch.float32, device=device)
    if method == "segment":
        for e, (x, c) in enumerate(segments):
            if x.shape[0]:
                accumulate_hessian(hs[e], x, 0, c)  # in place into the view
        return hs
    return _padded_hessians(segments, hs)


def _padded_hessians(segments: Sequence[tuple[torch.Tensor, torch.Tensor]], hs: torch.Tensor) -> torch.Tensor:
    k = hs.shape[-1]
    counts = [int(x.shape[0]) for x, _ in segments]
    t_max = max(counts, default=0)
    if t_max == 0:
        return hs
    xs = hs.new_zeros(len(segments), t_max, k)  # [E, T_max, K], zero rows add nothing
    for e, (x, c) in enumerate(segments):
        if counts[e]:
            _check_affinities(c, counts[e])
            torch.mul(x.reshape(-1, k).float(), c.float().sqrt().unsqueeze(1), out=xs[e, : counts[e]])
    scale = torch.tensor([2.0 / n if n else 0.0 for n in counts], dtype=torch.float32, device=hs.device)
    torch.bmm(xs.transpose(1, 2), xs, out=hs)
    return hs.mul_(scale.view(-1, 1, 1))


def _check_affinities(c: torch.Tensor, t: int) -> None:
    """The checks :func:`accumulate_hessian` makes on token weights."""
    if c.shape[0] != t:
        raise MoeCompressError(f"got {c.shape[0]} token weights for {t} tokens; pass one weight per token")
    if not torch.isfinite(c).all() or (c < 0).any():
        raise MoeCompressError("token weights must be finite and non-negative (routing weights)")


# --------------------------------------------------------------------------------------------------
# GPTQ over a stack of experts
# --------------------------------------------------------------------------------------------------


def experts_per_chunk(k_in: int, n_out: int, budget_bytes: int) -> int:
    """How many experts' solver state fits in ``budget_bytes`` (at least 1).

    Per expert: H, its damped copy and the inverse factor (3 K^2 float32), the weight, its working
    copy, per-column scales/zeros and the int64 codes (about 6 N K x 4 B).
    """
    per_expert = 4 * (3 * k_in * k_in + 6 * n_out * k_in)
    return max(1, budget_bytes // per_expert)


def _prepare_hessians(h: torch.Tensor, k: int) -> torch.Tensor:
    """Batched ``gptq._prepare_hessian``: validated float32 copy, dead inputs' diagonal set to 1."""
    if h.dim() != 3 or h.shape[1:] != (k, k):
        raise MoeCompressError(f"Hessian stack shape {tuple(h.shape)} does not match the weights' {k} inputs")
    h = h.to(torch.float32).clone()
    if not torch.isfinite(h).all():
        raise MoeCompressError("Hessian contains NaN or Inf; check the calibration activations")
    diag = h.diagonal(dim1=-2, dim2=-1)  # [E, K] view
    diag.masked_fill_(diag == 0, 1.0)
    return h


def damped_inverse_cholesky_batched(h: torch.Tensor, damp: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factors of ``(H_e + damp_e * mean(diag H_e) I)^-1``, ``[E, K, K]``.

    As the single path, an expert whose damped H is not positive definite in float32 retries with
    10x its damping; only the experts that failed are retried, the others keep their first factor.
    damp: ``[E]`` float64 on CPU (per-expert, for the damped-GPTQ fallback).
    """
    e_count, k = h.shape[0], h.shape[-1]
    mean_diag = torch.stack([torch.diag(h[e]).mean() for e in range(e_count)])  # [E], same reduction as the reference
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    # LAPACK returns each factor column-major; keep that layout: the block updates' GEMMs then see the
    # same operand layout as the reference's, and MKL picks the same kernel (same bits).
    upper = torch.empty_like(h).transpose(-2, -1)
    todo = torch.arange(e_count, device=h.device)
    for attempt in range(CHOLESKY_RETRIES):
        # python-float damping times a float32 scalar, as the reference computes it per expert
        factor = torch.stack([(float(damp[e]) * 10**attempt) * mean_diag[e] for e in todo.tolist()])
        damped = (h if attempt == 0 else h[todo]) + factor.view(-1, 1, 1) * eye
        low, info = torch.linalg.cholesky_ex(damped)
        hinv = torch.cholesky_inverse(low)
        up, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
        ok = (info == 0) & (info2 == 0) & torch.isfinite(up).flatten(1).all(dim=1)
        if attempt == 0 and bool(ok.all()):
            return up  # the usual case: no copy (LAPACK's column-major layout, as the reference's)
        upper[todo[ok]] = up[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            return upper
    raise MoeCompressError(
        f"GPTQ Hessian of expert(s) {todo.tolist()} of this batch is not positive definite even with damping "
        f"{float(damp.max()) * 10 ** (CHOLESKY_RETRIES - 1):g}; use more calibration tokens or a larger damp"
    )


def _sub_matmul_per_expert(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``target[e] -= a[e] @ b[e]`` for every expert.

    A loop of 2-D GEMMs rather than ``bmm``: on CPU, ATen's ``bmm`` can take other kernels than ``mm``
    (a naive loop for tiny products, oneDNN for some shapes) with another summation order, and then
    the result would drift from the per-expert reference in the last bits (with MKL, ``bmm`` matched
    ``mm`` on the shapes we tried, but nothing promises it). These are the block
    updates (K / B of them per matrix), so the loop costs E * K / B calls, not E * K. On an accelerator
    the launches would dominate, and results differ from the CPU's in the last bits anyway: one ``bmm``.
    """
    if target.device.type != "cpu":  # accelerators: one batched GEMM (CPU bit-identity is the CPU's concern)
        target.sub_(torch.bmm(a, b))
        return
    for e in range(target.shape[0]):
        target[e] -= a[e] @ b[e]


def _per_expert_damping(damp: float | Sequence[float] | torch.Tensor, e_count: int) -> torch.Tensor:
    """``[E]`` float64 on CPU from one damping value or one per expert."""
    damps = torch.as_tensor(damp, dtype=torch.float64).detach().cpu().reshape(-1)
    if damps.numel() == 1:
        damps = damps.expand(e_count)
    if damps.numel() != e_count:
        raise MoeCompressError(f"damp: give one value or one per expert ({e_count}), got {damps.numel()}")
    if not torch.isfinite(damps).all() or (damps < 0).any():
        raise MoeCompressError("damp must be finite and non-negative (a fraction of the mean Hessian diagonal)")
    return damps


def _permute_stack(w: torch.Tensor, h: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert column permutation: ``w[e][:, perm[e]]`` and ``h[e][perm[e]][:, perm[e]]``."""
    e_count, n, k = w.shape
    w = w.gather(2, perm.unsqueeze(1).expand(e_count, n, k))
    h = h.gather(1, perm.unsqueeze(2).expand(e_count, k, k)).gather(2, perm.unsqueeze(1).expand(e_count, k, k))
    return w, h


def gptq_quantize_batched(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    damp: float | Sequence[float] | torch.Tensor = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
) -> tuple[QuantResult, list[float]]:
    """:func:`gptq_quantize` for a stack of experts: ``w [E, N, K]``, ``h [E, K, K]``.

    The column loop runs once for all experts (each step is one op over ``[E, N, 1]``), so Python and
    dispatch overhead is paid once per column instead of E times. damp: one value or one per expert.
    act_order: each expert visits its columns by its own decreasing H diagonal (per-expert gather).
    Returns the stacked result (codes ``[E, N, K]``, scales/zeros ``[E, N, ng]``, on ``h``'s device)
    and each expert's loss estimate.
    """
    if w.dim() != 3 or h.dim() != 3 or w.shape[0] != h.shape[0]:
        raise MoeCompressError(f"gptq_quantize_batched takes w [E, N, K] and h [E, K, K], got {tuple(w.shape)} and {tuple(h.shape)}")
    e_count, n, k = w.shape
    spec.validate(k)
    check_finite_weight(w)
    g = spec.resolved_group(k)
    if act_order and not static_groups and g != k:
        raise MoeCompressError("act_order with groups needs static_groups=True (groups must stay contiguous); or use per-channel")
    if block_size < 1:
        raise MoeCompressError(f"block_size must be a positive number of columns, got {block_size}")
    damps = _per_expert_damping(damp, e_count)
    h = _prepare_hessians(h, k)
    w = w.to(device=h.device, dtype=torch.float32).clone()
    static = compute_qparams(w, spec) if static_groups or g == k else None
    if act_order:
        perm = torch.stack([torch.argsort(torch.diag(h[e]), descending=True, stable=True) for e in range(e_count)])
        w, h = _permute_stack(w, h, perm)
    else:
        perm = torch.arange(k, device=h.device).expand(e_count, k)
    u = damped_inverse_cholesky_batched(h, damps)  # [E, K, K] upper

    codes = torch.empty(e_count, n, k, dtype=torch.int64, device=w.device)  # permuted order
    if static is not None:
        scales, zeros = static
        # every permuted column's own scale/zero, [E, N, K]: a gather per expert permutation
        col_group = (perm // g).unsqueeze(1).expand(e_count, n, k)
        col_scales = scales.gather(2, col_group)
        col_zeros = None if zeros is None else zeros.gather(2, col_group)
    else:  # dynamic groups (never with act_order): filled group by group as the solver enters each one
        scales = torch.empty(e_count, n, -(-k // g), dtype=torch.float32, device=w.device)
        zeros = None if spec.symmetric else torch.empty_like(scales)
    mid = torch.full((e_count, n, 1), float(2 ** (spec.bits - 1)), device=w.device)  # symmetric grids' implicit zero
    group_spec = QuantSpec(spec.bits, g, spec.symmetric, spec.clip_search)
    last_spec = QuantSpec(spec.bits, -1, spec.symmetric, spec.clip_search)
    losses = torch.zeros(e_count, dtype=torch.float64, device=w.device)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        # u_blk row-major: the in-block outer products read its rows, which are strided in the
        # column-major factor (an unvectorised broadcast, 2-3x slower); the values are the same
        w_blk, u_blk = w[..., b0:b1].clone(), u[:, b0:b1, b0:b1].contiguous()  # [E, N, B], [E, B, B]
        err_blk = torch.zeros_like(w_blk)
        d_blk = u_blk.diagonal(dim1=-2, dim2=-1)  # [E, B]
        for i in range(b1 - b0):
            j = b0 + i
            if static is None:
                grp = j // g
                if j % g == 0:
                    current = _updated_columns_batched(w, w_blk, err_blk, u, b0, i, g)
                    s_new, z_new = compute_qparams(current, group_spec if current.shape[-1] == g else last_spec)
                    scales[..., grp] = s_new[..., 0]
                    if zeros is not None:
                        zeros[..., grp] = z_new[..., 0]
                s_col = scales[..., grp : grp + 1]
                z_col = None if zeros is None else zeros[..., grp : grp + 1]
            else:
                s_col = col_scales[..., j : j + 1]
                z_col = None if col_zeros is None else col_zeros[..., j : j + 1]
            col = w_blk[..., i : i + 1]  # [E, N, 1]
            q, q_hat = _round_column(col, s_col, mid if z_col is None else z_col, spec.maxq)
            codes[..., j] = q[..., 0]
            err = (col - q_hat) / d_blk[:, i].view(-1, 1, 1)  # [E, N, 1]
            # an outer product (inner dimension 1): the reference's mm computes exactly these products
            w_blk[..., i:] -= err * u_blk[:, i : i + 1, i:]
            err_blk[..., i : i + 1] = err
        losses += err_blk.double().pow(2).sum(dim=(1, 2)) / 2
        _sub_matmul_per_expert(w[..., b1:], err_blk, u[:, b0:b1, b1:])  # lazy update after the block

    inverse = torch.argsort(perm, dim=1)  # back to original column order
    codes = codes.gather(2, inverse.unsqueeze(1).expand(e_count, n, k))
    return QuantResult(codes, scales, zeros, spec), losses.tolist()


def _round_column(col: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One column of every expert on its grid: ``(codes as float, dequantized)``, each ``[E, N, 1]``.

    The arithmetic of ``grid.quantize_to_codes`` / ``grid.dequantize_codes`` (``clamp(round(w / s) + z)``
    then ``(q - z) * s``, float32) without their group reshapes and int64 round trip, which cost more
    than the math on one column; the values are the same bits."""
    q = torch.clamp(torch.round(col / s) + z, 0, maxq)
    return q, (q - z) * s


def _updated_columns_batched(
    w: torch.Tensor, w_blk: torch.Tensor, err_blk: torch.Tensor, u: torch.Tensor, b0: int, i: int, g: int
) -> torch.Tensor:
    """Batched ``gptq._updated_columns``: the G columns from block offset i with every error so far
    propagated, ``[E, N, G]`` (fewer for a partial last group)."""
    inside = w_blk[..., i : i + g]
    j_end = b0 + i + g
    b1 = b0 + w_blk.shape[-1]
    if j_end <= b1:
        return inside
    outside = w[..., b1:j_end].clone()
    _sub_matmul_per_expert(outside, err_blk[..., :i], u[:, b0 : b0 + i, b1:j_end])
    return torch.cat([inside, outside], dim=-1)


__all__ = [
    "HESSIAN_METHODS",
    "LayerRouting",
    "damped_inverse_cholesky_batched",
    "expert_hessians",
    "expert_segments",
    "experts_per_chunk",
    "gather_routing",
    "gptq_quantize_batched",
]
