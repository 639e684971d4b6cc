"""Expert selection scores and DERN recombination (moecompress/algorithms/pruning.py)."""

import pytest
import torch
import torch.nn.functional as F

from moecompress.algorithms.pruning import (
    _fill_empty_clusters,
    dern_importance,
    dern_recombine,
    frequency_scores,
    reap_scores,
    select_experts,
)
from moecompress.errors import MoeCompressError


def expert_output(gate, up, down, x):
    """SwiGLU expert: x [T, H] -> [T, H]; gateless experts use SiLU(up x)."""
    act = F.silu(x @ gate.T) * (x @ up.T) if gate is not None else F.silu(x @ up.T)
    return act @ down.T


def random_layer(num_experts=4, width=16, hidden=24, seed=0, gated=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(num_experts, width, hidden, generator=g).to(dtype) if gated else None
    up = torch.randn(num_experts, width, hidden, generator=g).to(dtype)
    down = torch.randn(num_experts, hidden, width, generator=g).to(dtype)
    return gate, up, down


def rel_err(y, target):
    return float((y - target).norm() / target.norm())


# ----------------------------------------------------------------------------- selection


def test_select_experts_keeps_protected_and_breaks_ties_by_lower_id():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.5])
    assert select_experts(scores, keep=2) == [0, 1]  # 0, 2, 4 tie at 0.5: the lower id wins
    assert select_experts(scores, keep=3) == [0, 1, 2]
    assert select_experts(scores, keep=2, protected={3}) == [1, 3]  # lowest score, still kept
    assert select_experts(scores, keep=3, protected=[3, 4]) == [1, 3, 4]
    assert select_experts(scores, keep=5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "keep, protected",
    [(0, ()), (6, ()), (1, (0, 1)), (2, (7,))],
)
def test_select_experts_rejects_impossible_requests(keep, protected):
    with pytest.raises(MoeCompressError):
        select_experts(torch.arange(5.0), keep=keep, protected=protected)


def test_scores():
    freq = frequency_scores(torch.tensor([3, 1, 0, 4]))
    assert torch.allclose(freq, torch.tensor([0.375, 0.125, 0.0, 0.5]))
    assert torch.equal(frequency_scores(torch.zeros(3)), torch.zeros(3))
    assert torch.allclose(dern_importance(torch.tensor([2.0, 0.5, 0.0]), tokens=10), torch.tensor([0.2, 0.05, 0.0]))
    assert torch.equal(reap_scores(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))
    with pytest.raises(MoeCompressError):
        reap_scores(torch.tensor([1.0, float("nan")]))
    with pytest.raises(MoeCompressError):
        dern_importance(torch.ones(3), tokens=0)


# ----------------------------------------------------------------------------- DERN


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dern_keep_all_is_bit_exact(gated, dtype):
    gate, up, down = random_layer(gated=gated, dtype=dtype)
    new_gate, new_up, new_down, info = dern_recombine(gate, up, down, [0, 1, 2, 3], torch.rand(4))
    assert torch.equal(new_up, up) and torch.equal(new_down, down)
    assert (new_gate is None) if not gated else torch.equal(new_gate, gate)
    assert info["donor_segments"] == 0 and info["mean_similarity"] is None


def test_dern_keeps_width_and_copies_experts_without_donors_bit_exactly():
    gate, up, down = random_layer(num_experts=6, width=16, hidden=24, seed=1)
    kept = [4, 1, 2]  # output follows this order
    importance = torch.tensor([0.1, 0.3, 0.2, 0.05, 0.25, 0.1])
    new_gate, new_up, new_down, info = dern_recombine(gate, up, down, kept, importance, similarity_threshold=0.2)
    assert new_gate.shape == (3, 16, 24) and new_up.shape == (3, 16, 24) and new_down.shape == (3, 24, 16)
    assert sum(info["received"].values()) + sum(info["discarded"].values()) == info["donor_segments"] == 48
    for r, e in enumerate(kept):
        if info["received"][e] == 0:
            assert torch.equal(new_up[r], up[e]) and torch.equal(new_down[r], down[e])
    assert any(info["received"][e] > 0 for e in kept)  # the threshold is low enough that k-means ran

    # A threshold no cosine can exceed: every donor is discarded and every expert is untouched.
    new_gate, new_up, new_down, info = dern_recombine(gate, up, down, kept, importance, similarity_threshold=1.0)
    assert torch.equal(new_gate, gate[kept]) and torch.equal(new_up, up[kept]) and torch.equal(new_down, down[kept])
    assert sum(info["discarded"].values()) == 48 and info["mean_received_similarity"] is None


def test_dern_merges_identical_donor_into_its_twin_and_leaves_singletons_exact():
    gate, up, down = random_layer(num_experts=2, width=16, hidden=32, seed=2)
    # Expert 1 (dropped) holds an exact copy of expert 0's neuron 5 at position 3; its other neurons
    # are expert 0's negated, so their cosine to anything in expert 0 is far below the threshold.
    gate[1], up[1], down[1] = -gate[0], -up[0], -down[0]
    gate[1, 3], up[1, 3], down[1, :, 3] = gate[0, 5], up[0, 5], down[0, :, 5]
    importance = torch.tensor([0.7, 0.3])
    new_gate, new_up, new_down, info = dern_recombine(gate, up, down, [0], importance)
    assert info["received"] == {0: 1} and info["discarded"] == {0: 15}
    assert info["merged_clusters"] == {0: 1}
    assert info["mean_received_similarity"] == pytest.approx(1.0)
    # The twin pair collapses to the same neuron; all other neurons are singletons, copied exactly.
    out = torch.cat([new_gate[0], new_up[0], new_down[0].T], dim=1)
    ref = torch.cat([gate[0], up[0], down[0].T], dim=1)
    # Neuron order may change; match each output row to the reference row it equals.
    matches = [(out[i] == ref).all(dim=1).nonzero().flatten().tolist() for i in range(16)]
    exact = sorted(m[0] for m in matches if m)
    assert exact == [i for i in range(16) if i != 5]
    twin = [i for i, m in enumerate(matches) if not m]
    assert len(twin) == 1 and torch.allclose(out[twin[0]], ref[5], rtol=1e-5, atol=1e-6)


def make_host_and_noisy_copy(seed, width=32, hidden=64, noise=0.5):
    """Expert 0 and expert 1 = expert 0 with neurons permuted and noise added (cosine ~0.9)."""
    g = torch.Generator().manual_seed(seed)
    gate, up, down = (torch.randn(1, width, hidden, generator=g) for _ in range(3))
    down = down.transpose(1, 2).contiguous()  # [1, H, I]
    perm = torch.randperm(width, generator=g)
    gate_b = gate[0, perm] + noise * torch.randn(width, hidden, generator=g)
    up_b = up[0, perm] + noise * torch.randn(width, hidden, generator=g)
    down_b = down[0][:, perm] + noise * torch.randn(hidden, width, generator=g)
    return torch.cat([gate, gate_b[None]]), torch.cat([up, up_b[None]]), torch.cat([down, down_b[None]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dern_recombined_expert_beats_discarding_donors_that_carry_signal(seed):
    gate, up, down = make_host_and_noisy_copy(seed)
    importance = torch.tensor([0.6, 0.4])
    new_gate, new_up, new_down, info = dern_recombine(gate, up, down, [0], importance)
    assert info["received"] == {0: 32} and new_up.shape == (1, 32, 64)

    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(seed + 100)) / 8.0
    y_host = expert_output(gate[0], up[0], down[0], x)  # = discarding the donors
    y_donor = expert_output(gate[1], up[1], down[1], x)
    y_new = expert_output(new_gate[0], new_up[0], new_down[0], x)
    # What a token split between the two experts saw: the importance-weighted blend. Weighted-mean
    # merging targets it, and must beat discarding by a wide margin.
    blend = 0.6 * y_host + 0.4 * y_donor
    assert rel_err(y_new, blend) < 0.5 * rel_err(y_host, blend)
    # Against the sum of all pool segments' outputs it still beats discarding.
    union = y_host + y_donor
    assert rel_err(y_new, union) < rel_err(y_host, union) - 0.05


def test_dern_paper_init_runs_and_keeps_width():
    gate, up, down = make_host_and_noisy_copy(0)
    importance = torch.tensor([0.6, 0.4])
    new_gate, new_up, new_down, info = dern_recombine(gate, up, down, [0], importance, distinct_init=False)
    assert new_gate.shape == (1, 32, 64) and new_down.shape == (1, 64, 32)
    assert torch.isfinite(new_gate).all() and torch.isfinite(new_up).all() and torch.isfinite(new_down).all()
    assert info["merged_clusters"][0] >= 1


def test_dern_gate_in_similarity_changes_the_match():
    gate, up, down = random_layer(num_experts=2, width=8, hidden=32, seed=3)
    gate[1], up[1], down[1] = -gate[0], -up[0], -down[0]  # nothing similar
    # Donor neuron 0 shares up row and down column with host neuron 2, but has the opposite gate.
    gate[1, 0], up[1, 0], down[1, :, 0] = -gate[0, 2], up[0, 2], down[0, :, 2]
    importance = torch.tensor([0.5, 0.5])
    _, _, _, without_gate = dern_recombine(gate, up, down, [0], importance)
    _, _, _, with_gate = dern_recombine(gate, up, down, [0], importance, use_gate_in_similarity=True)
    assert without_gate["received"] == {0: 1}  # cosine 1 on [up, down]
    assert with_gate["received"] == {0: 0}  # cosine ~1/3 on [gate, up, down]


def test_dern_gateless_and_deterministic():
    _, up, down = random_layer(num_experts=4, width=12, hidden=16, seed=4, gated=False)
    importance = torch.tensor([0.4, 0.3, 0.2, 0.1])
    first = dern_recombine(None, up, down, [0, 1], importance, similarity_threshold=0.2)
    second = dern_recombine(None, up, down, [0, 1], importance, similarity_threshold=0.2)
    assert first[0] is None and first[1].shape == (2, 12, 16) and first[2].shape == (2, 16, 12)
    assert sum(first[3]["received"].values()) > 0
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2]) and first[3] == second[3]


def test_dern_rejects_bad_input():
    gate, up, down = random_layer()
    with pytest.raises(MoeCompressError):
        dern_recombine(gate, up, down, [0, 0], torch.rand(4))
    with pytest.raises(MoeCompressError):
        dern_recombine(gate, up, down, [5], torch.rand(4))
    with pytest.raises(MoeCompressError):
        dern_recombine(gate, up, down, [0], torch.rand(3))
    with pytest.raises(MoeCompressError):
        dern_recombine(gate, up, down.transpose(1, 2), [0], torch.rand(4))


def test_fill_empty_clusters_moves_the_worst_fitting_point():
    assign = torch.tensor([0, 0, 0, 1])
    sim = torch.tensor([0.9, 0.2, 0.8, 1.0])
    filled = _fill_empty_clusters(assign, sim, 3)
    assert filled.tolist() == [0, 2, 0, 1]  # point 1 fits its cluster worst; singleton 3 never moves
