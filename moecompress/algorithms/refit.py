"""Output refit: re-solve the down projections of a rebuilt MoE layer so it reproduces the original.

After pruning or merging, a layer's routed output changes in two ways: tokens are routed to other
experts (or to a merged one), and merged experts compute a blend of their members. Both are errors in
the layer's output, measured on calibration tokens. With the router and the gate/up projections
fixed, the routed output is LINEAR in the down projections::

    y_hat(t) = sum_g W[t, g] * (D_g a_g(t) + b_g),    a_g(t) = act(gate_g x_t) * up_g x_t

so the down projections that best reproduce the original routed output ``y(t)`` are a ridge
least-squares problem (MergeMoE, arXiv 2510.14436, and output-preserving compression in general take
the same view). :func:`refit_down_projections` solves it by block coordinate descent: one expert at a
time, holding the others fixed, with the ridge pulling towards the starting weights ``D0`` so experts
seen by few tokens stay where pruning/merging put them. Experts that share no token are independent,
so one sweep is exact for them; more sweeps resolve the coupling through tokens routed to two
rebuilt experts.

This is moecompress's extension, applied after (and separate from) the papers' methods; the pruning
and merging passes expose it as ``refit`` and the reports measure it.

Shape legend: T calibration tokens, E' experts after pruning/merging, H hidden size, I intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moecompress.errors import MoeCompressError

# activations(g, x [n, H]) -> a [n, I]: expert g's input of down_proj (after gate/up and activation)
Activations = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class RefitResult:
    down: torch.Tensor  # [E', H, I] float32
    error_before: float  # mean squared error of the routed output per token, starting weights
    error_after: float  # the same with the refitted down projections
    target_power: float  # mean squared norm of the target per token (for relative errors)
    tokens_per_expert: list[int]

    @property
    def relative_before(self) -> float:
        return self.error_before / self.target_power if self.target_power > 0 else 0.0

    @property
    def relative_after(self) -> float:
        return self.error_after / self.target_power if self.target_power > 0 else 0.0


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, damp: float) -> torch.Tensor:
    """``argmin_D ||Z D^T - R||^2 + lam ||D - prior||^2`` from ``gram = Z^T Z [I, I]``, ``cross = Z^T R [I, H]``.

    ``lam = damp * mean(diag(gram))`` (GPTQ-style relative damping, scale-free). Returns D ``[H, I]``.
    Solved in float64: the Gram matrix of correlated activations is badly conditioned.
    """
    gram = gram.double()
    lam = damp * float(gram.diagonal().mean()) if gram.numel() else 0.0
    if lam <= 0.0:
        lam = 1e-8
    lhs = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64)
    rhs = cross.double() + lam * prior.double().T  # [I, H]
    return torch.linalg.solve(lhs, rhs).T.float()  # [H, I]


def routed_prediction(
    x: torch.Tensor, weights: torch.Tensor, activations: Activations, down: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``y_hat [T, H]`` for dense routing ``weights [T, E']`` (0 = not selected)."""
    pred = x.new_zeros(x.shape[0], down.shape[1], dtype=torch.float32)
    for g in range(down.shape[0]):
        rows = weights[:, g].nonzero().squeeze(-1)
        if rows.numel():
            pred.index_add_(0, rows, _contribution(g, rows, x, weights, activations, down, bias))
    return pred


def _contribution(g, rows, x, weights, activations, down, bias) -> torch.Tensor:
    """Expert g's weighted output on tokens ``rows``: ``w * (D_g a + b_g)`` [n, H]."""
    return _weighted_output(activations(g, x[rows]).float(), weights[rows, g, None], down[g], None if bias is None else bias[g])


def _weighted_output(a: torch.Tensor, w: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``w * (D a + b)`` [n, H] from an expert's activations ``a [n, I]`` and weights ``w [n, 1]``."""
    y = a @ down.T
    if bias is not None:
        y = y + bias
    return w * y


def refit_down_projections(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    activations: Activations,
    down: torch.Tensor,
    bias: torch.Tensor | None = None,
    damp: float = 0.1,
    sweeps: int = 2,
) -> RefitResult:
    """Down projections ``[E', H, I]`` minimising ``sum_t ||y(t) - y_hat(t)||^2`` (+ ridge to ``down``).

    x ``[T, H]`` the experts' input; target ``[T, H]`` the ORIGINAL layer's routed output (no shared
    experts); weights ``[T, E']`` the rebuilt layer's routing weights as it applies them (0 = not
    selected; an exact merge's summed member weights); down ``[E', H, I]`` the starting down
    projections (also the ridge prior); bias ``[E', H]`` the down biases (kept fixed) or None.
    """
    if x.ndim != 2 or target.shape != x.shape[:1] + (down.shape[1],) or weights.shape != (x.shape[0], down.shape[0]):
        raise MoeCompressError(
            f"refit: shapes do not match: x {tuple(x.shape)}, target {tuple(target.shape)}, "
            f"weights {tuple(weights.shape)}, down {tuple(down.shape)}"
        )
    if sweeps < 1 or damp <= 0:
        raise MoeCompressError(f"refit needs sweeps >= 1 and damp > 0, got {sweeps} and {damp}")
    target = target.float()
    weights = weights.float()
    prior = down.float()
    current = prior.clone()
    pred = routed_prediction(x, weights, activations, current, bias)
    tokens = max(x.shape[0], 1)
    error_before = float((target - pred).pow(2).sum()) / tokens
    counts = [int((weights[:, g] != 0).sum()) for g in range(down.shape[0])]
    for _ in range(sweeps):
        for g in range(down.shape[0]):
            rows = weights[:, g].nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue  # an expert no calibration token reaches keeps its weights
            # The expert's activations once per sweep (gate/up over its tokens: the costly part),
            # for its old output, the least-squares problem and its new output alike.
            a = activations(g, x[rows]).float()  # [n, I]
            w = weights[rows, g, None]
            b = None if bias is None else bias[g]
            old = _weighted_output(a, w, current[g], b)
            z = w * a  # [n, I]
            residual = target[rows] - (pred[rows] - old)  # what expert g should add
            if bias is not None:
                residual = residual - w * bias[g]
            current[g] = ridge_solve(z.T @ z, z.T @ residual, prior[g], damp)
            pred[rows] += _weighted_output(a, w, current[g], b) - old
    error_after = float((target - pred).pow(2).sum()) / tokens
    power = float(target.pow(2).sum()) / tokens
    return RefitResult(current, error_before, error_after, power, counts)


def dense_routing_weights(index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Top-k ``index [T, k]`` and ``weights [T, k]`` as a dense ``[T, num_experts]`` matrix.

    Two selected experts mapped to one slot (an exact merge's group) add up, as the model applies them;
    ids outside ``[0, num_experts)`` (expert-parallel sentinels) select nothing.
    """
    index = index.long()
    valid = (index >= 0) & (index < num_experts)
    dense = torch.zeros(index.shape[0], num_experts + 1, dtype=torch.float32)
    dense.scatter_add_(1, torch.where(valid, index, num_experts), torch.where(valid, weights.float(), 0.0))
    return dense[:, :num_experts]
