"""Dynamic expert skipping (MC-MoE ODP, after NAEE): drop weakly weighted experts token by token.

Rule (ALGORITHMS.md section 1): with a token's routing weights sorted in descending order
``g_(1) >= g_(2) >= ...``, expert ``j >= 2`` is skipped when ``g_(j) < beta_l * g_(1)``. ``beta_l`` is
calibrated per layer as the median of ``g_(2) / g_(1)`` over calibration tokens, so about half of the
tokens skip their second expert. For top-k > 2 the same ``beta_l`` is applied to every non-first expert
relative to ``g_(1)`` (the weights are sorted, so a skipped ``j`` implies every later one is skipped too).
Ratios do not depend on top-k renormalisation or on a routed scaling factor, so the rule reads the
routing weights the model applies.

Protection (MC-MoE protects the 2% most important tokens): the block only sees its input ``h``, not
the attention scores, so importance here is ``||h||_1`` alone. The threshold is calibrated once per
layer (the ``1 - fraction`` quantile of ``||h||_1`` over calibration tokens) rather than taken per
batch, so whether a token is protected does not depend on what else is in the batch (a single decode
token would otherwise always be "the top 2%").

Shape legend: T tokens, k top-k (or the computed experts), H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sort_by_weight(weights: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] and expert ids [T, k] reordered by descending weight (stable for ties)."""
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices  # [T, k]
    return weights.gather(-1, order), index.gather(-1, order)


def second_to_first_ratio(sorted_weights: torch.Tensor) -> torch.Tensor:
    """g_(2) / g_(1) per token [T] from descending weights [T, k] (k >= 2); 0 where g_(1) is 0."""
    first = sorted_weights[:, 0].float()
    return torch.where(first > 0, sorted_weights[:, 1].float() / first.clamp_min(1e-30), torch.zeros_like(first))


def calibrate_beta(sorted_weights: torch.Tensor) -> float:
    """Per-layer beta: the median of g_(2)/g_(1) over calibration tokens [T, k]."""
    if sorted_weights.shape[-1] < 2 or sorted_weights.shape[0] == 0:
        return 0.0
    return float(second_to_first_ratio(sorted_weights).median())


def calibrate_protect_threshold(hidden: torch.Tensor, fraction: float) -> float | None:
    """||h||_1 above which a token is never skipped: the (1 - fraction) quantile over hidden [T, H].

    None when ``fraction`` is 0 (no protection).
    """
    if fraction <= 0 or hidden.shape[0] == 0:
        return None
    l1 = hidden.float().abs().sum(dim=-1)  # [T]
    return float(torch.quantile(l1, 1.0 - fraction))


def protected_tokens(hidden: torch.Tensor, threshold: float | None) -> torch.Tensor | None:
    """bool [T]: tokens whose ||h||_1 exceeds the calibrated threshold (None: nobody protected)."""
    if threshold is None:
        return None
    return hidden.float().abs().sum(dim=-1) > threshold


def skip_keep_mask(sorted_weights: torch.Tensor, beta: float, protected: torch.Tensor | None = None) -> torch.Tensor:
    """bool [T, k]: which of the (descending) experts are computed.

    The first expert is always kept; expert j >= 2 is dropped when ``g_(j) < beta * g_(1)``; protected
    tokens keep all of theirs. ``beta = 0`` keeps everything.
    """
    first = sorted_weights[:, :1].float()  # [T, 1]
    keep = sorted_weights.float() >= beta * first  # [T, k]
    keep[:, 0] = True
    if protected is not None:
        keep |= protected[:, None]
    return keep


@dataclass
class SkipStats:
    """Counters a block keeps while it runs (not saved): how much compute skipping saved."""

    tokens: int = 0
    computed: int = 0  # expert evaluations actually done
    possible: int = 0  # expert evaluations without skipping
    tokens_skipping: int = 0  # tokens that dropped at least one expert

    def update(self, keep: torch.Tensor) -> None:
        """keep: bool [T, k_main] as returned by :func:`skip_keep_mask`."""
        self.tokens += int(keep.shape[0])
        self.computed += int(keep.sum())
        self.possible += int(keep.numel())
        self.tokens_skipping += int((~keep).any(dim=-1).sum())

    @property
    def skip_fraction(self) -> float:
        """Fraction of tokens that skipped at least one expert."""
        return self.tokens_skipping / self.tokens if self.tokens else 0.0

    @property
    def experts_per_token(self) -> float:
        return self.computed / self.tokens if self.tokens else 0.0

    def reset(self) -> None:
        self.tokens = self.computed = self.possible = self.tokens_skipping = 0
