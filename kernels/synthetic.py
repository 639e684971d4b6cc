"""Random packed weights and routings for kernel tests, tuning and benchmarks (no quantizer needed).

Shape legend: E experts, H hidden, I intermediate, T tokens, k experts per token.
Weights are built the way a quantizer would hand them over: integer codes ``[N, K]``, scales and
zeros ``[N, ceil(K / G)]``, then ``format.pack_weight``. Any K (padded to 32 by the format).
"""

from __future__ import annotations

import torch

from moecompress.quant import format as fmt


def random_packed(
    shape: tuple[int, ...],
    bits: int,
    group_size: int,
    with_zeros: bool,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    scale: float = 0.02,
) -> fmt.PackedWeight:
    """Random ``PackedWeight`` for a dense ``[..., N, K]`` weight; values about ``+-scale * 2**(bits-1)``.

    ``generator`` (CPU) seeds a generator on ``device`` and the codes are drawn and packed there, so
    big GPU weights (benchmarks) never pass through host memory; same seed, same device -> same weight.
    """
    *lead, n, k = shape
    device = torch.device(device)
    local = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    codes = torch.randint(0, 2**bits, (*lead, n, k), generator=local, device=device, dtype=torch.int32)
    groups = fmt.num_groups(k, group_size)
    scales = (torch.rand(*lead, n, groups, generator=local, device=device) + 0.5) * scale  # [..., N, ceil(K/G)]
    zeros = None
    if with_zeros:
        zeros = torch.randint(0, 2**bits, (*lead, n, groups), generator=local, device=device).float()
    packed = fmt.pack_weight(codes, scales, zeros, bits, group_size)
    del codes
    return packed


def random_expert_group(
    expert_ids: list[int],
    hidden: int,
    intermediate: int,
    bits: int,
    group_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    with_zeros: bool = False,
    gated: bool = True,
) -> fmt.PackedExpertGroup:
    """One width class: ``gate_up [E_b, 2I (or I), H]`` and ``down [E_b, H, I]`` packed at ``bits``.

    Packed one expert at a time (packing holds int64 temporaries ~16x the packed size).
    """
    width = 2 * intermediate if gated else intermediate

    def stacked(n: int, k: int) -> fmt.PackedProjection:
        parts = [random_packed((n, k), bits, group_size, with_zeros, generator, device) for _ in expert_ids]
        zeros = None if not with_zeros else torch.stack([p.zeros for p in parts])
        return fmt.PackedProjection(torch.stack([p.qweight for p in parts]), torch.stack([p.scales for p in parts]), zeros, k)

    gate_up = stacked(width, hidden)
    down = stacked(hidden, intermediate)
    return fmt.PackedExpertGroup(
        bits=bits,
        group_size=group_size,
        expert_ids=torch.tensor(expert_ids, dtype=torch.int32, device=device),
        gate_up=gate_up,
        down=down,
    )


def random_routing(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    generator: torch.Generator,
    zipf: float = 0.0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_ids [T, k]`` (distinct experts per token) and softmax-normalised ``topk_weights [T, k]``.

    ``zipf > 0`` skews expert popularity as ``rank**-zipf`` (a few hot experts), sampled without
    replacement per token; 0 is uniform.
    """
    popularity = torch.arange(1, num_experts + 1, dtype=torch.float64) ** (-zipf)  # [E]
    popularity = popularity[torch.randperm(num_experts, generator=generator)]  # hot experts anywhere
    probs = popularity.expand(num_tokens, num_experts)
    topk_ids = torch.multinomial(probs, top_k, replacement=False, generator=generator)  # [T, k]
    logits = torch.randn(num_tokens, top_k, generator=generator)
    topk_weights = torch.softmax(logits, dim=-1)
    return topk_ids.to(device), topk_weights.to(device)
