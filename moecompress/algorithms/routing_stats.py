"""Router-statistics math as plain tensor functions (no hooks, no model).

What the statistics collector (:mod:`moecompress.calibration.collect`) accumulates per batch, and
what :mod:`moecompress.calibration.stats_types` derives from the sums: top-k selections, applied
routing weights, co-activation, the router-logit Gram matrix and its cosine similarity, safe means,
the expert-load coefficient of variation, the uniform share and starved experts.

Shape legend: T tokens of a batch, E experts, H hidden size, k top-k.
"""

from __future__ import annotations

import torch


def selection_matrix(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """One row per token, 1.0 where the expert is in the token's top-k: [T, k] -> [T, E] float64.

    Ids outside [0, E) (expert-parallel sentinels) select nothing.
    """
    idx = top_k_index.reshape(-1, top_k_index.shape[-1]).long()          # [T, k]
    valid = (idx >= 0) & (idx < num_experts)
    mask = torch.zeros(idx.shape[0], num_experts + 1, dtype=torch.float64)
    mask.scatter_add_(1, torch.where(valid, idx, num_experts), valid.double())  # sentinel column E
    return mask[:, :num_experts]                                          # [T, E]


def routing_weight_sums(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Sum of the applied routing weight per expert: [T, k], [T, k] -> [E] float64."""
    idx = top_k_index.reshape(-1).long()                                  # [T*k]
    w = top_k_weights.reshape(-1).double()                                # [T*k]
    valid = (idx >= 0) & (idx < num_experts)
    return torch.zeros(num_experts, dtype=torch.float64).index_add_(0, idx[valid], w[valid])


def coactivation_counts(selection: torch.Tensor) -> torch.Tensor:
    """Pairs of experts in the same token's top-k: selection [T, E] -> [E, E] (diagonal = counts)."""
    return selection.t() @ selection                                      # [E, E]


def logit_gram(logits: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the router-logit columns: logits [T, E] -> [E, E] float64 (sums over tokens)."""
    x = logits.reshape(-1, logits.shape[-1]).double()
    return x.t() @ x


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the columns behind a Gram matrix: [E, E] -> [E, E]; 0 for a zero column."""
    norms = gram.diagonal().clamp_min(0).sqrt()                           # [E]
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))


def safe_mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sums / counts elementwise, 0 where counts is 0 (never NaN): [E], [E] -> [E] float64."""
    counts = counts.double()
    return torch.where(counts > 0, sums.double() / counts.clamp_min(1), torch.zeros_like(counts))


def load_cv(counts: torch.Tensor) -> float:
    """Coefficient of variation (population std / mean) of per-expert counts [E]; 0 with no tokens."""
    c = counts.double()
    mean = c.mean()
    return float(c.std(unbiased=False) / mean) if mean > 0 else 0.0


def uniform_share(tokens: int, top_k: int, num_experts: int) -> float:
    """Selections an expert gets under perfectly even routing: tokens * k / E."""
    return tokens * top_k / num_experts


def starved_mask(counts: torch.Tensor, tokens: int, top_k: int, threshold: float) -> torch.Tensor:
    """Experts selected fewer than ``threshold`` x the uniform share times: counts [E] -> [E] bool."""
    return counts.double() < threshold * uniform_share(tokens, top_k, counts.numel())


def locate_max_abs(values: torch.Tensor) -> tuple[float, int, int]:
    """Largest |value| of a [T, H] matrix and its (token, channel)."""
    flat = values.abs().reshape(-1)
    pos = int(flat.argmax())
    return float(flat[pos]), pos // values.shape[1], pos % values.shape[1]
