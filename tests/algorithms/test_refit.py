"""Output refit math: planted down projections are recovered, a perfect start stays put, routing edge cases."""

from __future__ import annotations

import pytest
import torch

from moecompress.algorithms.refit import dense_routing_weights, refit_down_projections, ridge_solve
from moecompress.errors import MoeCompressError

T, H, I, E = 600, 12, 8, 3


def _layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    gate = torch.randn(E, I, H, generator=g) / H**0.5
    up = torch.randn(E, I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    index = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])  # [T, 2] distinct
    weights = torch.rand(T, 2, generator=g).softmax(-1)
    return x, gate, up, down, dense_routing_weights(index, weights, E)


def _activations(gate, up):
    def act(g: int, xs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(xs @ gate[g].T) * (xs @ up[g].T)

    return act


def _output(x, w, act, down):
    return sum(w[:, g, None] * (act(g, x) @ down[g].T) for g in range(down.shape[0]))


def test_refit_recovers_planted_down_projections():
    x, gate, up, true_down, w = _layer()
    act = _activations(gate, up)
    target = _output(x, w, act, true_down)
    start = true_down + 0.3 * torch.randn(true_down.shape, generator=torch.Generator().manual_seed(5))
    result = refit_down_projections(x, target, w, act, start, damp=1e-6, sweeps=6)
    assert result.error_after < 1e-3 * result.error_before
    torch.testing.assert_close(result.down, true_down, atol=2e-3, rtol=0)


def test_a_start_that_already_matches_stays():
    x, gate, up, down, w = _layer(1)
    act = _activations(gate, up)
    target = _output(x, w, act, down)
    result = refit_down_projections(x, target, w, act, down, damp=0.1)
    torch.testing.assert_close(result.down, down, atol=1e-5, rtol=0)
    assert result.error_after < 1e-9


def test_expert_without_tokens_keeps_its_weights_and_bias_is_respected():
    x, gate, up, down, w = _layer(2)
    w[:, 2] = 0.0  # nobody routes to expert 2
    bias = torch.randn(E, H, generator=torch.Generator().manual_seed(3))
    act = _activations(gate, up)
    target = _output(x, w, act, down) + w @ bias
    start = down.clone()
    start[:2] += 0.2
    result = refit_down_projections(x, target, w, act, start, bias=bias, damp=1e-6, sweeps=4)
    assert torch.equal(result.down[2], start[2])
    assert result.tokens_per_expert[2] == 0
    torch.testing.assert_close(result.down[:2], down[:2], atol=2e-3, rtol=0)


def test_ridge_pulls_towards_the_prior():
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    r = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    prior = torch.full((3, 4), 7.0)
    free = ridge_solve(z.T @ z, z.T @ r, prior, 1e-9)
    strong = ridge_solve(z.T @ z, z.T @ r, prior, 1e6)
    torch.testing.assert_close(free, torch.linalg.lstsq(z.double(), r.double()).solution.T.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(strong, prior, atol=1e-3, rtol=0)


def test_dense_routing_adds_shared_slots_and_ignores_sentinels():
    index = torch.tensor([[0, 2], [1, 1], [3, -1]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.25], [0.7, 0.3]])
    dense = dense_routing_weights(index, weights, 3)
    assert torch.equal(dense, torch.tensor([[0.6, 0.0, 0.4], [0.0, 0.75, 0.0], [0.0, 0.0, 0.0]]))


def test_bad_shapes_and_options_are_refused():
    x, gate, up, down, w = _layer()
    act = _activations(gate, up)
    with pytest.raises(MoeCompressError, match="shapes"):
        refit_down_projections(x, x[:, :5], w, act, down)
    with pytest.raises(MoeCompressError, match="sweeps"):
        refit_down_projections(x, torch.zeros(T, H), w, act, down, sweeps=0)
