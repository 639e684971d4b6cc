"""M-SMoE alignment, grouping, merging and router rows (moecompress/algorithms/merging.py)."""

import pytest
import torch
import torch.nn.functional as F

from moecompress.algorithms.merging import (
    align_permutation,
    apply_permutation,
    expert_to_group,
    global_group_counts,
    group_counts_from_threshold,
    group_experts,
    merge_experts,
    merge_group,
    merged_router_rows,
    normalised_layer_frequencies,
    regmean_combine,
    threshold_for_average_groups,
    threshold_for_total_groups,
)
from moecompress.errors import MoeCompressError


def expert(width=16, hidden=24, seed=0, gated=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(width, hidden, generator=g).to(dtype) if gated else None
    return gate, torch.randn(width, hidden, generator=g).to(dtype), torch.randn(hidden, width, generator=g).to(dtype)


def expert_output(gate, up, down, x):
    act = F.silu(x @ gate.T) * (x @ up.T) if gate is not None else F.silu(x @ up.T)
    return act @ down.T


def permuted(gate, up, down, p):
    return (None if gate is None else gate[p]), up[p], down[:, p]


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("gated", [True, False])
def test_align_permutation_recovers_a_known_permutation(gated):
    ref = expert(gated=gated)
    p = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    target = permuted(*ref, p)
    perm = align_permutation(*ref, *target)
    assert perm.dtype == torch.long and torch.equal(perm, torch.argsort(p))
    aligned = apply_permutation(*target, perm)
    for a, r in zip(aligned, ref):
        assert (a is None and r is None) or torch.equal(a, r)


def test_align_permutation_with_noise_still_recovers_it():
    ref = expert(width=32, hidden=64, seed=2)
    p = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    target = tuple(w + 0.3 * torch.randn(w.shape, generator=g) for w in permuted(*ref, p))
    assert torch.equal(align_permutation(*ref, *target), torch.argsort(p))


def test_apply_permutation_preserves_the_function_and_rejects_non_permutations():
    gate, up, down = expert(seed=5)
    x = torch.randn(10, 24)
    p = torch.randperm(16, generator=torch.Generator().manual_seed(6))
    y_permuted = expert_output(*apply_permutation(gate, up, down, p), x)
    assert torch.allclose(y_permuted, expert_output(gate, up, down, x), atol=1e-4)
    with pytest.raises(MoeCompressError):
        apply_permutation(gate, up, down, torch.zeros(16, dtype=torch.long))


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_identical_experts_returns_the_expert_exactly(dtype):
    ref = expert(dtype=dtype)
    members = [ref] + [permuted(*ref, torch.randperm(16, generator=torch.Generator().manual_seed(s))) for s in (7, 8)]
    gate, up, down = (torch.stack(ws) for ws in zip(*members))
    merged = merge_group(gate, up, down, torch.tensor([0.2, 0.5, 0.3]))
    for m, r in zip(merged, ref):
        assert m.dtype == dtype and torch.equal(m, r)


def test_merge_group_is_the_frequency_weighted_average_after_alignment():
    a, b = expert(seed=9), expert(seed=10)
    p = torch.randperm(16, generator=torch.Generator().manual_seed(11))
    b_permuted = permuted(*b, p)
    perm = align_permutation(*a, *b_permuted)
    b_aligned = apply_permutation(*b_permuted, perm)
    gate, up, down = (torch.stack(ws) for ws in zip(a, b_permuted))
    merged = merge_group(gate, up, down, torch.tensor([3.0, 1.0]))
    for m, wa, wb in zip(merged, a, b_aligned):
        assert torch.allclose(m, 0.75 * wa + 0.25 * wb, atol=1e-6)
    # All-zero frequencies fall back to equal weights; a single member comes back untouched.
    merged = merge_group(gate, up, down, torch.zeros(2))
    assert torch.allclose(merged[1], 0.5 * a[1] + 0.5 * b_aligned[1], atol=1e-6)
    single = merge_group(gate[:1], up[:1], down[:1], torch.tensor([0.0]))
    assert all(torch.equal(m, w) for m, w in zip(single, a))


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.0])
def test_regmean_with_equally_distributed_inputs_is_the_frequency_weighted_average(alpha):
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    base = torch.randn(40, 6, generator=g, dtype=torch.float64)
    cov = base.T @ base
    counts = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    merged = regmean_combine(weights, counts[:, None, None] * cov, alpha)
    expected = (counts[:, None, None] * weights).sum(0) / counts.sum()
    assert torch.allclose(merged, expected, atol=1e-5)  # up to the tiny guard ridge


def test_regmean_keeps_each_member_exact_on_its_own_inputs():
    """Members whose inputs live in different subspaces are both reproduced (plain averaging is not)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    x1 = torch.cat([torch.randn(30, 4, generator=g, dtype=torch.float64), torch.zeros(30, 4, dtype=torch.float64)], 1)
    x2 = torch.cat([torch.zeros(20, 4, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64)], 1)
    merged = regmean_combine(w, torch.stack([x1.T @ x1, x2.T @ x2]), alpha=1.0)
    assert torch.allclose(x1 @ merged.T, x1 @ w[0].T, atol=1e-4)
    assert torch.allclose(x2 @ merged.T, x2 @ w[1].T, atol=1e-4)
    average = 0.6 * w[0] + 0.4 * w[1]
    assert not torch.allclose(x1 @ average.T, x1 @ w[0].T, atol=1e-2)


def test_regmean_merge_group_is_exact_for_identical_members_and_falls_back_without_inputs():
    ref = expert()
    other = permuted(*ref, torch.randperm(16, generator=torch.Generator().manual_seed(3)))
    gate, up, down = (torch.stack(ws) for ws in zip(ref, other))
    x = torch.randn(50, 24, generator=torch.Generator().manual_seed(4))
    grams = torch.stack([x.T @ x, 2 * x.T @ x]).double()
    act = torch.randn(2, 16, 16, dtype=torch.float64)
    act = act @ act.transpose(1, 2)
    merged = merge_group(gate, up, down, torch.tensor([0.5, 0.5]), grams, list(act))
    assert all(torch.equal(m, r) for m, r in zip(merged[:3], ref)) and merged.down_bias is None  # W_0 + 0
    a, b = expert(seed=20), expert(seed=21)
    gate, up, down = (torch.stack(ws) for ws in zip(a, b))
    zeros = torch.zeros(2, 24, 24, dtype=torch.float64)
    fallback = merge_group(gate, up, down, torch.tensor([1.0, 1.0]), zeros, [torch.zeros(16, 16, dtype=torch.float64)] * 2)
    plain = merge_group(gate, up, down, torch.tensor([1.0, 1.0]))
    assert all(torch.equal(f, p) for f, p in zip(fallback[:3], plain[:3]))
    assert regmean_combine(up, zeros) is None


def test_regmean_solves_the_down_bias_with_the_down_weights():
    """Folded-bias layout (ExpertStack): down [m, H + 1, I] with a zero last row, bias [m, H]; the
    activation Grams are over [a, 1]. Same weights, same activation distribution, different biases
    and token counts: RegMean keeps the weights and returns the count-weighted bias."""
    _, up, down = expert(gated=False)
    down = torch.cat([down, torch.zeros(1, 16)])  # [H + 1, I], the folded layout's zero row
    up = torch.cat([up, torch.ones(16, 1)], 1)  # [I, H + 1]: the up bias as a last input column
    ups, downs = torch.stack([up, up]), torch.stack([down, down])
    bias = torch.stack([torch.full((24,), 1.0), torch.full((24,), 4.0)])
    acts = torch.cat([torch.rand(40, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
                      torch.ones(40, 1, dtype=torch.float64)], 1)
    gram = acts.T @ acts
    inputs = torch.randn(30, 25, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    merged = merge_group(None, ups, downs, torch.tensor([0.5, 0.5]), [inputs.T @ inputs] * 2, [3 * gram, gram], bias)
    assert torch.allclose(merged.down, down, atol=1e-5) and torch.equal(merged.down[-1], torch.zeros(16))
    assert torch.allclose(merged.down_bias, torch.full((24,), 1.75), atol=1e-4)  # (3 * 1 + 1 * 4) / 4
    plain = merge_group(None, ups, downs, torch.tensor([0.5, 0.5]), down_bias=bias)
    assert torch.allclose(plain.down_bias, torch.full((24,), 2.5))  # frequency average


def test_merge_experts_stacks_groups_in_order():
    experts = [expert(width=8, hidden=12, seed=s, gated=False) for s in range(4)]
    _, up, down = (None, torch.stack([e[1] for e in experts]), torch.stack([e[2] for e in experts]))
    groups = [[1], [2, 0, 3]]
    new_gate, new_up, new_down, new_bias = merge_experts(None, up, down, groups, torch.tensor([0.1, 0.4, 0.3, 0.2]))
    assert new_bias is None
    assert new_gate is None and new_up.shape == (2, 8, 12) and new_down.shape == (2, 12, 8)
    assert torch.equal(new_up[0], up[1]) and torch.equal(new_down[0], down[1])


# ----------------------------------------------------------------------------- grouping


def test_group_experts_picks_dominants_and_joins_the_most_similar():
    freq = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
    sim = torch.eye(6)
    sim[1, 4] = sim[4, 1] = 0.9  # 1 joins 4
    sim[3, 0] = sim[0, 3] = 0.8  # 3 joins 0
    sim[5, 2] = sim[2, 5] = 0.7  # 5 joins 2
    groups = group_experts(freq, sim, num_groups=3)
    assert groups == [[0, 3], [2, 5], [4, 1]]  # sorted by dominant id; dominant first
    assert sorted(e for g in groups for e in g) == list(range(6))


def test_group_experts_asks_a_pair_similarity_only_for_members_and_dominants():
    freq = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
    asked = []

    def similarity(members, dominants):
        asked.append((list(members), list(dominants)))
        rows = torch.zeros(len(members), len(dominants))
        for i, m in enumerate(members):
            rows[i, dominants.index({1: 0, 3: 2, 5: 4}[m])] = 1.0  # the opposite of the router's choice below
        return rows

    sim = torch.eye(6)
    sim[1, 4] = sim[3, 0] = sim[5, 2] = 0.9
    groups = group_experts(freq, sim, num_groups=3, similarity=similarity)
    assert asked == [([1, 3, 5], [0, 2, 4])]
    assert groups == [[0, 1], [2, 3], [4, 5]]


def test_group_experts_keeps_protected_experts_singleton():
    freq = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
    sim = torch.full((6, 6), 0.1)
    sim[:, 1] = 0.99  # everyone loves expert 1, which is protected: nobody may join it
    sim[1, :] = 0.99  # and it would love to join anyone
    sim[3, 2] = sim[5, 2] = sim[4, 2] = 0.5
    groups = group_experts(freq, sim, num_groups=3, protected={1, 0})
    assert [0] in groups and [1] in groups
    assert groups == [[0], [1], [2, 3, 4, 5]]
    mapping = expert_to_group(groups, 6)
    assert mapping.tolist() == [0, 1, 2, 2, 2, 2]


def test_group_experts_ties_and_errors():
    freq = torch.tensor([0.2, 0.2, 0.2, 0.2])
    groups = group_experts(freq, torch.zeros(4, 4), num_groups=2)
    assert groups == [[0, 2, 3], [1]]  # dominants 0, 1 (ties by id); similarity ties go to 0
    assert group_experts(freq, torch.zeros(4, 4), num_groups=4) == [[0], [1], [2], [3]]
    with pytest.raises(MoeCompressError):
        group_experts(freq, torch.zeros(4, 4), num_groups=2, protected={0, 1})  # nowhere for 2, 3
    with pytest.raises(MoeCompressError):
        group_experts(freq, torch.zeros(4, 4), num_groups=5)
    with pytest.raises(MoeCompressError):
        group_experts(freq, torch.zeros(3, 3), num_groups=2)


def test_expert_to_group_rejects_bad_partitions():
    with pytest.raises(MoeCompressError):
        expert_to_group([[0, 1], [1, 2]], 3)
    with pytest.raises(MoeCompressError):
        expert_to_group([[0, 1]], 3)


# ----------------------------------------------------------------------------- global group counts


def layer_freqs(num_layers=5, num_experts=8, seed=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 1000, (num_experts,), generator=g).float() for _ in range(num_layers)]


def test_normalised_frequencies_force_each_layers_top_expert_to_one():
    norm = normalised_layer_frequencies([torch.tensor([2.0, 6.0, 2.0]), torch.tensor([5.0, 5.0, 0.0])])
    assert torch.allclose(norm[0], torch.tensor([0.2, 1.0, 0.2], dtype=torch.float64))
    assert torch.allclose(norm[1], torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))  # first max wins
    with pytest.raises(MoeCompressError):
        normalised_layer_frequencies([torch.zeros(3)])


@pytest.mark.parametrize("total", [5, 11, 20, 33, 39, 40])
def test_global_group_counts_add_up(total):
    freqs = layer_freqs()
    counts = global_group_counts(freqs, total_groups=total)
    assert sum(counts) == total and all(1 <= c <= 8 for c in counts)
    assert counts == group_counts_from_threshold(freqs, threshold_for_total_groups(freqs, total))


def test_threshold_helpers():
    freqs = layer_freqs()
    assert threshold_for_average_groups(freqs, 4.0) == threshold_for_total_groups(freqs, 20)
    assert sum(global_group_counts(freqs, threshold=threshold_for_average_groups(freqs, 4.0))) == 20
    assert global_group_counts(freqs, threshold=0.0) == [8] * 5
    with pytest.raises(MoeCompressError):
        threshold_for_total_groups(freqs, 4)  # fewer groups than layers
    with pytest.raises(MoeCompressError):
        group_counts_from_threshold(freqs, 1.0)
    with pytest.raises(MoeCompressError):
        global_group_counts(freqs, total_groups=10, threshold=0.1)


# ----------------------------------------------------------------------------- router rows


def test_router_rows_modes():
    g = torch.Generator().manual_seed(13)
    weight = torch.randn(4, 6, generator=g)
    bias = torch.randn(4, generator=g)
    freq = torch.tensor([0.1, 0.4, 0.3, 0.2])
    groups = [[1, 0], [2], [3]]

    rows, b = merged_router_rows(weight, groups, freq, "dominant")
    assert b is None and torch.equal(rows, weight[[1, 2, 3]])
    rows, b = merged_router_rows(weight, groups, freq, "dominant", router_bias=bias)
    assert torch.equal(b, bias[[1, 2, 3]])

    rows, b = merged_router_rows(weight, groups, freq, "weighted", router_bias=bias)
    assert torch.allclose(rows[0], 0.8 * weight[1] + 0.2 * weight[0])
    assert torch.allclose(b[0], 0.8 * bias[1] + 0.2 * bias[0])
    assert torch.equal(rows[1:], weight[2:]) and torch.equal(b[1:], bias[2:])

    rows, b = merged_router_rows(weight, groups, freq, "logsumexp_approx")
    entropy = -(0.8 * torch.log(torch.tensor(0.8)) + 0.2 * torch.log(torch.tensor(0.2)))
    assert torch.allclose(b, torch.stack([entropy, torch.tensor(0.0), torch.tensor(0.0)]))
    with pytest.raises(MoeCompressError):
        merged_router_rows(weight, groups, freq, "mean")


def test_logsumexp_router_is_exact_for_identical_rows():
    weight = torch.randn(3, 6, generator=torch.Generator().manual_seed(14))
    weight[2] = weight[0]
    x = torch.randn(20, 6)
    rows, b = merged_router_rows(weight, [[0, 2], [1]], torch.tensor([0.5, 0.2, 0.5]), "logsumexp_approx")
    group_logit = x @ rows.T + b
    exact = torch.stack([torch.logsumexp(x @ weight[[0, 2]].T, dim=1), x @ weight[1]], dim=1)
    assert torch.allclose(group_logit, exact, atol=1e-5)
    # The softmax mass of the merged group equals the summed mass of its members.
    assert torch.allclose(group_logit.softmax(1)[:, 0], (x @ weight.T).softmax(1)[:, [0, 2]].sum(1), atol=1e-5)


def test_fitted_group_router_rows_lower_the_kl_to_exact_group_routing():
    from moecompress.algorithms.merging import fit_group_router_rows, grouped_router_probabilities

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    weight = torch.randn(5, 6, generator=g)
    groups = [[0, 3], [1], [2, 4]]
    init, _ = merged_router_rows(weight, groups, torch.ones(5), "dominant")
    rows, before, after = fit_group_router_rows(x, weight, groups, init)
    assert rows.shape == (3, 6) and after < 0.5 * before
    probs = grouped_router_probabilities(x.double() @ weight.double().T, groups)
    torch.testing.assert_close(probs.sum(-1), torch.ones(400, dtype=torch.float64))
    # a singleton-only grouping is matched exactly by the original rows
    same, b0, a0 = fit_group_router_rows(x, weight, [[e] for e in range(5)], weight.clone())
    assert b0 < 1e-12 and a0 < 1e-12 and torch.allclose(same, weight)
