"""The mixed-precision bit allocator: exact against brute force, budget, pins, errors, determinism."""

import itertools
import math

import pytest
import torch

from moecompress.errors import MoeCompressError
from moecompress.quant.allocate import (
    AllocationConfig,
    allocate_bits,
    budget_bits_used,
    effective_bits,
    expert_costs,
)

WIDTHS = (2, 3, 4)
PARAMS = [[100, 200, 300], [150, 150, 600]]


def small_problem(seed: int):
    """2 MoE layers x 3 experts x widths {2,3,4}; errors fall with width, with random spread."""
    g = torch.Generator().manual_seed(seed)
    freq = [torch.rand(3, generator=g) + 0.05 for _ in range(2)]
    mass = [f * (0.3 + torch.rand(3, generator=g)) for f in freq]
    errors = [
        torch.rand(3, 1, generator=g) * torch.tensor([6.0, 2.0, 1.0]) * (1 + torch.rand(3, 3, generator=g))
        for _ in range(2)
    ]
    return freq, mass, errors


def hand_costs(freq, mass, errors, alpha=1.0, beta=1.5):
    """c[l][e][j] computed independently of the module (phi, w normalised per layer)."""
    out = []
    for f, w, err in zip(freq, mass, errors):
        phi = [v / sum(f.tolist()) for v in f.tolist()]
        ww = [v / sum(w.tolist()) for v in w.tolist()]
        out.append([[phi[i] ** alpha * ww[i] ** beta * err[i, j].item() ** alpha for j in range(3)] for i in range(3)])
    return out


def average(bits, params, cfg, layers=None):
    layers = range(len(bits)) if layers is None else layers
    used = sum(p * effective_bits(b, cfg.group_size, cfg.symmetric) for l in layers for b, p in zip(bits[l], params[l]))
    return used / sum(p for l in layers for p in params[l])


def has_top_widths(row, widths):
    return widths[-1] in row and widths[-2] in row


def top_widths_fit(params, cfg, layer):
    """Does any assignment of this layer meet its budget with one expert at each of the top two widths?"""
    widths = cfg.allowed_widths()
    return any(
        has_top_widths(row, widths) and average([list(row)], [params[layer]], cfg) <= cfg.budget + 1e-9
        for row in itertools.product(widths, repeat=3)
    )


def brute_force(costs, params, cfg):
    """All feasible assignments -> (best objective, list of optimal bit tables)."""
    widths = cfg.allowed_widths()
    tol = 1e-9
    if cfg.granularity == "expert":
        tables = ([list(a[0:3]), list(a[3:6])] for a in itertools.product(widths, repeat=6))
    else:
        tables = ([[a] * 3, [b] * 3] for a, b in itertools.product(widths, repeat=2))
    feasible = []
    for bits in tables:
        if cfg.scope == "global":
            ok = average(bits, params, cfg) <= cfg.budget + tol
        else:
            ok = all(average(bits, params, cfg, [l]) <= cfg.budget + tol for l in range(2))
        if ok and cfg.scope == "layer" and cfg.granularity == "expert" and cfg.require_top_widths:
            ok = all(has_top_widths(bits[l], widths) for l in range(2) if top_widths_fit(params, cfg, l))
        if ok:
            obj = sum(costs[l][e][widths.index(bits[l][e])] for l in range(2) for e in range(3))
            feasible.append((obj, bits))
    best = min(obj for obj, _ in feasible)
    return best, [bits for obj, bits in feasible if obj <= best + 1e-12]


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("granularity", ["expert", "layer"])
@pytest.mark.parametrize("budget", [2.6, 3.125, 3.4, 3.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(scope, granularity, budget, seed):
    freq, mass, errors = small_problem(seed)
    cfg = AllocationConfig(budget=budget, bit_choices=WIDTHS, scope=scope, granularity=granularity)
    best, optimal = brute_force(hand_costs(freq, mass, errors), PARAMS, cfg)
    alloc = allocate_bits(freq, mass, errors, PARAMS, cfg)
    assert alloc.status == "Optimal"
    assert alloc.bits in optimal
    assert alloc.objective == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_top_width_constraint_binds_in_layer_scope():
    # Width 3 is the sweet spot: without the constraint every expert takes 3 bits.
    freq = [torch.ones(4)]
    mass = [torch.ones(4)]
    errors = [torch.tensor([[10.0, 1.0, 0.9]] * 4)]
    params = [[1, 1, 1, 1]]
    free = AllocationConfig(budget=3.125, bit_choices=WIDTHS, scope="layer", require_top_widths=False)
    assert allocate_bits(freq, mass, errors, params, free).bits == [[3, 3, 3, 3]]
    paper = AllocationConfig(budget=3.125, bit_choices=WIDTHS, scope="layer")
    forced = allocate_bits(freq, mass, errors, params, paper)
    assert sorted(forced.bits[0]) == [2, 3, 3, 4]
    # The paper's constraint is for scope="layer" only; the global program ignores it.
    glob = allocate_bits(freq, mass, errors, params, AllocationConfig(budget=3.125, bit_choices=WIDTHS))
    assert glob.bits == [[3, 3, 3, 3]]


def test_top_width_constraint_fits_when_the_small_experts_take_the_top_widths():
    # Two tiny experts and a big one: the constraint fits only with the tiny ones at 4 and 3 bits.
    freq, mass = [torch.tensor([0.01, 0.01, 1.0])], [torch.tensor([0.01, 0.01, 1.0])]
    errors = [torch.tensor([[4.0, 2.0, 1.0]] * 3)]
    params = [[1, 1, 10]]
    free = AllocationConfig(budget=3.0, bit_choices=WIDTHS, scope="layer", require_top_widths=False)
    assert allocate_bits(freq, mass, errors, params, free).bits == [[2, 2, 3]]
    paper = AllocationConfig(budget=3.0, bit_choices=WIDTHS, scope="layer")
    forced = allocate_bits(freq, mass, errors, params, paper).bits[0]
    assert sorted(forced[:2]) == [3, 4] and forced[2] == 2


def test_top_width_constraint_dropped_when_it_cannot_fit():
    # Widths (2,3,4,8): one at 8 and one at 4 averages above 3.125 with 4 equal experts.
    freq, mass = [torch.ones(4)], [torch.ones(4)]
    errors = [torch.tensor([[10.0, 1.0, 0.9, 0.8]] * 4)]
    cfg = AllocationConfig(budget=3.125, scope="layer")
    assert allocate_bits(freq, mass, errors, [[1, 1, 1, 1]], cfg).bits == [[3, 3, 3, 3]]


def random_problem(layers=6, experts=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    freq = [torch.rand(experts, generator=g) for _ in range(layers)]
    mass = [f * (0.5 + torch.rand(experts, generator=g)) for f in freq]
    base = torch.rand(layers, experts, 1, generator=g) + 0.1
    ladder = torch.tensor([8.0, 4.0, 2.0, 0.1])  # error per width (2, 3, 4, 8)
    errors = [base[l] * ladder * (1 + 0.2 * torch.rand(experts, 4, generator=g)) for l in range(layers)]
    params = [torch.randint(1000, 5000, (experts,), generator=g) * 96 for _ in range(layers)]
    return freq, mass, errors, params


@pytest.mark.parametrize("symmetric,group_size", [(True, 128), (False, 64), (True, 2048)])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_budget_holds_and_budget_bits_used_agrees(symmetric, group_size, scope):
    freq, mass, errors, params = random_problem()
    budget = 3.3
    cfg = AllocationConfig(budget=budget, scope=scope, group_size=group_size, symmetric=symmetric)
    alloc = allocate_bits(freq, mass, errors, params, cfg)
    assert alloc.average_bits <= budget + 1e-9
    assert budget_bits_used(alloc.bits, params, group_size, symmetric) == pytest.approx(alloc.average_bits, rel=1e-12)
    if scope == "layer":
        for l in range(len(params)):
            assert budget_bits_used([alloc.bits[l]], [params[l]], group_size, symmetric) <= budget + 1e-9
    # A real mixture: the budget sits between the widths, so both sides are used, and it is nearly spent.
    used = {b for row in alloc.bits for b in row}
    assert len(used) >= 2
    assert alloc.average_bits > budget - 0.1


def test_more_budget_never_costs_more():
    freq, mass, errors, params = random_problem(seed=3)
    budgets = (2.5, 3.0, 3.5, 4.5)
    objectives = [allocate_bits(freq, mass, errors, params, AllocationConfig(budget=b)).objective for b in budgets]
    assert objectives == sorted(objectives, reverse=True)
    assert objectives[0] > objectives[-1]


def test_layer_granularity_gives_uniform_widths():
    freq, mass, errors, params = random_problem(seed=1)
    alloc = allocate_bits(freq, mass, errors, params, AllocationConfig(budget=3.5, granularity="layer"))
    assert all(len(set(row)) == 1 for row in alloc.bits)
    assert len({row[0] for row in alloc.bits}) >= 2  # layers differ: the budget is traded across them
    assert alloc.average_bits <= 3.5 + 1e-9


def test_pinned_experts_keep_width_and_leave_the_budget():
    freq, mass, errors, params = random_problem(layers=3, experts=8, seed=2)
    pinned = {(0, 1): 8, (2, 5): None}
    budget = effective_bits(2, 128, True)  # only feasible if the pinned 8- and 16-bit experts are not counted
    alloc = allocate_bits(freq, mass, errors, params, AllocationConfig(budget=budget), pinned=pinned)
    assert alloc.bits[0][1] == 8 and alloc.bits[2][5] == 16
    assert alloc.budgeted[0][1] is False and alloc.budgeted[2][5] is False
    assert sum(not f for row in alloc.budgeted for f in row) == 2
    assert all(b == 2 for l, row in enumerate(alloc.bits) for e, b in enumerate(row) if (l, e) not in pinned)
    assert alloc.average_bits == pytest.approx(budget)
    assert budget_bits_used(alloc.bits, params, 128, True, alloc.budgeted) == pytest.approx(alloc.average_bits)
    # Counting the pinned experts would break the budget: the exclusion is what made it feasible.
    assert budget_bits_used(alloc.bits, params, 128, True) > budget
    # Layer granularity: pins hold, the rest of the layer is uniform.
    lay = allocate_bits(freq, mass, errors, params, AllocationConfig(budget=3.2, granularity="layer"), pinned=pinned)
    assert lay.bits[0][1] == 8 and lay.bits[2][5] == 16
    assert len({b for e, b in enumerate(lay.bits[0]) if e != 1}) == 1


def test_all_pinned_needs_no_solver():
    cfg = AllocationConfig(budget=3)
    alloc = allocate_bits([[1.0]], [[1.0]], [[[1.0, 0.5, 0.2, 0.1]]], [[10]], cfg, pinned={(0, 0): 4})
    assert alloc.bits == [[4]] and alloc.status == "no budgeted experts"
    assert alloc.as_json()["bits"] == [[4]]


def test_infeasible_budget_names_the_achievable_range():
    freq, mass, errors, params = random_problem(layers=2, experts=4)
    with pytest.raises(MoeCompressError, match=r"2\.1250.*8\.1250"):
        allocate_bits(freq, mass, errors, params, AllocationConfig(budget=2.0))
    with pytest.raises(MoeCompressError, match=r"3\.1250.*4\.1250"):
        allocate_bits(freq, mass, errors, params, AllocationConfig(budget=2.5, min_bits=3, max_bits=4, scope="layer"))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bit_choices=(2, 5)),
        dict(bit_choices=(2, 2, 4)),
        dict(bit_choices=()),
        dict(min_bits=4, max_bits=3),
        dict(min_bits=5, max_bits=7),
        dict(scope="model"),
        dict(granularity="tensor"),
        dict(group_size=0),
        dict(alpha=-1.0),
    ],
)
def test_bad_config_is_a_one_line_error(kwargs):
    with pytest.raises(MoeCompressError) as info:
        AllocationConfig(budget=3.0, **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(MoeCompressError):
        AllocationConfig(budget=-1.0)


def test_bad_inputs_are_errors():
    freq, mass, errors, params = random_problem(layers=2, experts=4)
    cfg = AllocationConfig(budget=3.0)
    with pytest.raises(MoeCompressError, match="errors must be"):
        allocate_bits(freq, mass, [e[:, :3] for e in errors], params, cfg)
    with pytest.raises(MoeCompressError, match="covers"):
        allocate_bits(freq, mass, errors[:1], params, cfg)
    with pytest.raises(MoeCompressError, match="no routed tokens"):
        allocate_bits([torch.zeros(4), freq[1]], mass, errors, params, cfg)
    with pytest.raises(MoeCompressError, match="does not exist"):
        allocate_bits(freq, mass, errors, params, cfg, pinned={(2, 0): 8})
    with pytest.raises(MoeCompressError, match="width 5"):
        allocate_bits(freq, mass, errors, params, cfg, pinned={(0, 0): 5})


def test_deterministic():
    freq, mass, errors, params = random_problem(layers=8, experts=32, seed=5)
    cfg = AllocationConfig(budget=3.4)
    first = allocate_bits(freq, mass, errors, params, cfg).as_json()
    second = allocate_bits(freq, mass, errors, params, cfg).as_json()
    assert first == second


def test_ties_break_towards_spending_the_budget():
    # No error anywhere: every assignment costs 0; the tie-break uses the budget rather than wasting it.
    params = [[64, 64, 64], [64, 64, 64]]
    zeros = [torch.zeros(3, 4), torch.zeros(3, 4)]
    ones = [torch.ones(3), torch.ones(3)]
    top = allocate_bits(ones, ones, zeros, params, AllocationConfig(budget=9.0))
    assert top.bits == [[8] * 3] * 2
    exact = allocate_bits(ones, ones, zeros, params, AllocationConfig(budget=effective_bits(3, 128, True)))
    assert exact.average_bits == pytest.approx(effective_bits(3, 128, True))


def test_costs_follow_the_formula():
    freq, mass, errors = small_problem(0)
    cfg = AllocationConfig(budget=3.0, bit_choices=(4, 2, 3), alpha=0.5, beta=2.0)  # columns in given order
    got = expert_costs(freq, mass, errors, cfg)  # [l][e][j] over allowed widths, ascending (2, 3, 4)
    want = hand_costs(freq, mass, [e[:, [1, 2, 0]] for e in errors], alpha=0.5, beta=2.0)
    for l in range(2):
        for e in range(3):
            assert got[l][e] == pytest.approx(want[l][e], rel=1e-12)


def test_effective_bits():
    assert effective_bits(4, 128, True) == 4.125
    assert effective_bits(4, 128, False) == 4.1875
    assert effective_bits(3, 4096, True) == 3 + 16 / 4096
    assert effective_bits(16, 128, False) == 16.0


def knapsack_optimum(costs, widths, group_size, budget, n_experts):
    """Exact optimum of the global expert-level program when all experts have equal params, by dynamic
    programming over integer capacity (effective bits * group_size / 16 are integers for group 128)."""
    weight = [(b * group_size + 16) // 16 for b in widths]  # effective bits in units of 16 / group_size
    capacity = math.floor(budget * group_size / 16 * n_experts + 1e-9)
    best = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    for row in costs:
        new = torch.full_like(best, math.inf)
        for w, c in zip(weight, row):
            new[w:] = torch.minimum(new[w:], best[:-w] + c)
        best = new
    return float(best.min())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_exact_knapsack_on_skewed_costs(seed):
    # Skewed routing spreads the costs over many orders of magnitude: the solver must still be exact.
    g = torch.Generator().manual_seed(seed)
    layers, experts = 3, 24
    freq = [torch.rand(experts, generator=g) ** 4 for _ in range(layers)]
    mass = [f * torch.rand(experts, generator=g) ** 2 for f in freq]
    ladder = torch.tensor([8.0, 4.0, 2.0, 0.1])  # error per width (2, 3, 4, 8)
    spread = [torch.rand(experts, 1, generator=g) for _ in range(layers)]
    errors = [s * ladder * (1 + torch.rand(experts, 4, generator=g)) for s in spread]
    params = [[4096] * experts for _ in range(layers)]
    cfg = AllocationConfig(budget=3.3)
    costs = [row for layer in expert_costs(freq, mass, errors, cfg) for row in layer]
    want = knapsack_optimum(costs, cfg.allowed_widths(), cfg.group_size, cfg.budget, layers * experts)
    got = allocate_bits(freq, mass, errors, params, cfg)
    assert got.objective == pytest.approx(want, rel=1e-9)
    assert got.objective >= want - 1e-15  # never better than the optimum: the budget really holds


def test_min_and_max_bits_restrict_the_widths():
    freq, mass, errors, params = random_problem(layers=2, experts=8, seed=4)
    alloc = allocate_bits(freq, mass, errors, params, AllocationConfig(budget=7.0, min_bits=3, max_bits=4))
    assert {b for row in alloc.bits for b in row} == {4}  # 8 is excluded; 4 everywhere fits
    alloc = allocate_bits(freq, mass, errors, params, AllocationConfig(budget=3.5, min_bits=3))
    assert min(b for row in alloc.bits for b in row) >= 3
