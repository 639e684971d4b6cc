"""Mixed-precision bit allocation for routed experts (MC-MoE PMQ, generalised).

Shape legend: L MoE layers (only MoE layers, in order), E_l routed experts of layer l, B candidate
widths (``AllocationConfig.bit_choices``, in the order the ``errors`` columns are measured).

Inputs per MoE layer l (lists over layers; tensors or plain sequences):

* ``freq[l]``        ``[E_l]``    phi: how often each expert is in the top-k (any scale; normalised here)
* ``weight_mass[l]`` ``[E_l]``    w: sum of router probabilities over the tokens selecting it (normalised here)
* ``errors[l]``      ``[E_l, B]`` eps_{i,b}: ``||Y - Y_hat||_F`` of layer l's output when only expert i is
  quantized at width ``bit_choices[b]`` (Frobenius, not squared)
* ``params[l]``      ``[E_l]``    number of weights of each expert (gate + up + down)

The program (a multiple-choice knapsack solved exactly by CBC through PuLP):

    minimise    sum_{i,b} c_{i,b} x_{i,b}        c_{i,b} = phi_i^alpha * w_i^beta * eps_{i,b}^alpha
    subject to  sum_b x_{i,b} = 1                (one width per expert)
                sum_{i,b} p_i e_b x_{i,b} <= budget * sum_i p_i     (per budget group)

with ``e_b = effective_bits(b)`` (the width plus the scale/zero overhead per weight) and p_i the
expert's weight count. ``scope="global"`` (ours, the default) has one budget group over every layer;
``scope="layer"`` (the paper) one per layer. ``granularity="layer"`` ties every expert of a layer to
one width (one binary per layer and width; the result vLLM can load; pinned experts keep their
pin, so a layer with a pin is uniform only over its other experts).

Why summing costs across layers is well-posed: eps_{i,b} is measured on layer l's block output, a
perturbation of the residual stream, which has the same hidden size, the same calibration tokens
and the same units in every layer; phi and w are normalised to sum 1 per layer, so every layer
brings the same total routing weight. The costs are therefore added across layers unscaled (an
absolute perturbation counts the same wherever it enters, even though the residual stream's norm
grows with depth: later layers are not discounted for being louder). The solver sees the costs
multiplied by one positive factor (largest cost -> SOLVER_COST_MAX): the argmin is unchanged and
CBC's absolute tolerances resolve costs over many orders of magnitude.

Pinned experts (``pinned[(l, e)] = width``, or ``None`` = kept unquantized, reported as 16) are
EXCLUDED from the budget: the budget is the average over the unpinned ("budgeted") weights only, so
protecting a super expert does not starve the others of bits. ``Allocation.budgeted`` records which
experts the budget covers, so :func:`budget_bits_used` can recompute it from a written checkpoint.

Ties (choices whose costs differ by less than ~1e-7 of the largest cost, e.g. experts no
calibration token reached) are broken towards spending more of the budget, through a small
deterministic reward for stored bits in the objective; CBC runs single-threaded, so the same inputs
always give the same allocation. The reported objective is the exact cost, without that reward.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulp
import torch

from moecompress.errors import MoeCompressError
from moecompress.quant.format import SUPPORTED_BITS, UNQUANTIZED_BITS

logger = logging.getLogger(__name__)

SCALE_BITS = 16  # one float16 scale per group and output column (format.py)
ZERO_BITS = 8  # one uint8 zero point per group and output column when asymmetric (format.py)
BUDGET_TOL = 1e-9  # average bits: the budget holds when used <= budget + BUDGET_TOL
# CBC's optimality tolerances are absolute (~1e-7 on reduced costs), so the solver sees the costs
# scaled to a largest value of SOLVER_COST_MAX: differences down to ~1e-11 of the largest cost count.
SOLVER_COST_MAX = 1e4
TIE_WEIGHT = 1e-7  # the tie-break per decision, relative to the largest cost (see the module docstring)
_MAX_RESOLVES = 3  # re-solves with a tightened right-hand side if CBC's tolerance overshoots

ArrayLike = torch.Tensor | Sequence[float]


@dataclass(frozen=True)
class AllocationConfig:
    """How bits are allocated; ``budget`` is the average bits per budgeted routed-expert weight,
    scale/zero overhead included (e.g. 3.125 = every expert at 3 bits with group 128, symmetric)."""

    budget: float
    bit_choices: tuple[int, ...] = (2, 3, 4, 8)
    scope: str = "global"  # "global": one budget over all layers | "layer": one per layer (paper)
    granularity: str = "expert"  # "expert": a width per expert | "layer": one width per layer
    alpha: float = 1.0
    beta: float = 1.5
    min_bits: int | None = None
    max_bits: int | None = None
    group_size: int = 128  # per-channel: pass the input dimension K (overhead 16/K per weight)
    symmetric: bool = True
    # MC-MoE: at least one expert at each of the two top widths per layer; applied only with
    # scope="layer" and granularity="expert", and dropped (logged) in a layer where it cannot fit.
    require_top_widths: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.budget, (int, float)) or not math.isfinite(self.budget) or self.budget <= 0:
            raise MoeCompressError(f"allocation budget must be a positive number of bits, got {self.budget!r}")
        if not self.bit_choices:
            raise MoeCompressError(f"bit_choices is empty; give at least one width from {SUPPORTED_BITS}")
        bad = [b for b in self.bit_choices if b not in SUPPORTED_BITS]
        if bad:
            raise MoeCompressError(f"bit_choices {bad} are not supported widths; choose from {SUPPORTED_BITS}")
        if len(set(self.bit_choices)) != len(self.bit_choices):
            raise MoeCompressError(f"bit_choices {self.bit_choices} repeat a width; list each width once")
        if self.scope not in ("global", "layer"):
            raise MoeCompressError(f"allocation scope must be 'global' or 'layer', got {self.scope!r}")
        if self.granularity not in ("expert", "layer"):
            raise MoeCompressError(f"allocation granularity must be 'expert' or 'layer', got {self.granularity!r}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in (self.alpha, self.beta)):
            raise MoeCompressError(f"alpha and beta must be finite numbers >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.min_bits is not None and self.max_bits is not None and self.min_bits > self.max_bits:
            raise MoeCompressError(f"min_bits={self.min_bits} is above max_bits={self.max_bits}; swap or drop one")
        if self.group_size <= 0:
            raise MoeCompressError(f"group_size must be positive, got {self.group_size}")
        if not self.allowed_widths():
            raise MoeCompressError(
                f"no width in {self.bit_choices} lies within min_bits={self.min_bits}, max_bits={self.max_bits}"
            )

    def allowed_widths(self) -> tuple[int, ...]:
        """The candidate widths within [min_bits, max_bits], ascending."""
        lo = -math.inf if self.min_bits is None else self.min_bits
        hi = math.inf if self.max_bits is None else self.max_bits
        return tuple(sorted(b for b in self.bit_choices if lo <= b <= hi))


@dataclass
class Allocation:
    """The chosen width of every routed expert.

    ``bits[l][e]``: width of expert e of MoE layer l (16 = kept unquantized). ``objective``: the
    total cost sum c_{i,b} of the budgeted experts' widths (unscaled). ``average_bits``: params-weighted
    effective bits (overhead included) over the budgeted experts (0.0 when every expert is pinned).
    ``budgeted[l][e]``: False for pinned experts, which the budget does not cover.
    """

    bits: list[list[int]]
    objective: float
    average_bits: float
    status: str
    budgeted: list[list[bool]] = field(default_factory=list)

    def as_json(self) -> dict:
        return {
            "bits": [list(map(int, row)) for row in self.bits],
            "objective": float(self.objective),
            "average_bits": float(self.average_bits),
            "status": self.status,
            "budgeted": [list(map(bool, row)) for row in self.budgeted],
        }


def effective_bits(bits: int, group_size: int, symmetric: bool) -> float:
    """Stored bits per weight: ``bits`` plus the float16 scale (and uint8 zero when asymmetric) shared
    by ``group_size`` weights. ``bits >= 16`` means an unquantized expert: 16 bits, no overhead."""
    if bits >= UNQUANTIZED_BITS:
        return float(UNQUANTIZED_BITS)
    if group_size <= 0:
        raise MoeCompressError(f"group_size must be positive, got {group_size}")
    overhead = (SCALE_BITS + (0 if symmetric else ZERO_BITS)) / group_size
    return bits + overhead


def budget_bits_used(
    bits_per_expert: Sequence[Sequence[int]],
    params: Sequence[ArrayLike],
    group_size: int,
    symmetric: bool,
    budgeted: Sequence[Sequence[bool]] | None = None,
) -> float:
    """Params-weighted average effective bits over the budgeted experts (all experts when
    ``budgeted`` is None): the number the allocation budget constrains. ``bits_per_expert[l][e]``
    as in :class:`Allocation` (16 = unquantized)."""
    param_rows = [_as_floats(p) for p in params]
    if len(bits_per_expert) != len(param_rows):
        raise MoeCompressError(f"bits cover {len(bits_per_expert)} layers but params cover {len(param_rows)}")
    used = total = 0.0
    for layer, (widths, counts) in enumerate(zip(bits_per_expert, param_rows)):
        if len(widths) != len(counts):
            raise MoeCompressError(f"layer {layer}: {len(widths)} widths for {len(counts)} experts' params")
        mask = [True] * len(widths) if budgeted is None else list(budgeted[layer])
        for width, count, counted in zip(widths, counts, mask):
            if counted:
                used += count * effective_bits(int(width), group_size, symmetric)
                total += count
    if total <= 0:
        raise MoeCompressError("no budgeted expert weights to average over; check params and the pinned experts")
    return used / total


def allocate_bits(
    freq: Sequence[ArrayLike],
    weight_mass: Sequence[ArrayLike],
    errors: Sequence[ArrayLike],
    params: Sequence[ArrayLike],
    config: AllocationConfig,
    pinned: Mapping[tuple[int, int], int | None] | None = None,
) -> Allocation:
    """Choose a width per routed expert minimising the routing-weighted quantization error under the
    average-bits budget (see the module docstring for the program and its normalisation).

    ``freq[l]``, ``weight_mass[l]``, ``params[l]``: ``[E_l]``; ``errors[l]``: ``[E_l, B]`` with columns in
    ``config.bit_choices`` order. ``pinned[(l, e)]``: a fixed width, or None = unquantized (16 bits);
    pinned experts are left out of the budget. Raises MoeCompressError on bad inputs, an infeasible
    budget or a solver failure.
    """
    widths = config.allowed_widths()
    sizes = _check_shapes(freq, weight_mass, errors, params, len(config.bit_choices))
    param_rows = [_as_floats(p) for p in params]
    costs = expert_costs(freq, weight_mass, errors, config)  # [l][e][j] over `widths`
    pins = _resolve_pins(pinned, sizes)
    free = [[pins[l][e] is None for e in range(n)] for l, n in enumerate(sizes)]
    eff = [effective_bits(b, config.group_size, config.symmetric) for b in widths]

    units = _decision_units(free, config.granularity)
    bits = [[0 if pin is None else pin for pin in row] for row in pins]  # 0: filled in from the solution
    if not units:  # everything pinned: nothing to trade off
        return Allocation(bits, 0.0, 0.0, "no budgeted experts", free)

    _check_feasible(eff, config)
    choice, status = _solve(units, free, costs, param_rows, eff, widths, config)

    objective = 0.0
    for unit, j in zip(units, choice):
        for l, e in unit:
            bits[l][e] = widths[j]
            objective += costs[l][e][j]
    average = budget_bits_used(bits, param_rows, config.group_size, config.symmetric, free)
    return Allocation(bits, objective, average, status, free)


def expert_costs(
    freq: Sequence[ArrayLike],
    weight_mass: Sequence[ArrayLike],
    errors: Sequence[ArrayLike],
    config: AllocationConfig,
) -> list[list[list[float]]]:
    """c_{i,b} = phi_i^alpha * w_i^beta * eps_{i,b}^alpha per layer, expert and allowed width
    (``config.allowed_widths()`` order), with phi and w normalised to sum 1 per layer."""
    columns = [config.bit_choices.index(b) for b in config.allowed_widths()]
    out = []
    for layer, (f, w, err) in enumerate(zip(freq, weight_mass, errors)):
        phi = _normalised(f, "freq", layer)
        mass = _normalised(w, "weight_mass", layer)
        eps = torch.as_tensor(err, dtype=torch.float64)
        if not torch.isfinite(eps).all() or (eps < 0).any():
            raise MoeCompressError(f"layer {layer}: errors must be finite and >= 0; re-run the error measurement")
        rows = eps.tolist()
        out.append(
            [
                [phi[i] ** config.alpha * mass[i] ** config.beta * rows[i][c] ** config.alpha for c in columns]
                for i in range(len(phi))
            ]
        )
    return out


# ---------------------------------------------------------------------------------------------
# Internals


def _as_floats(values: ArrayLike) -> list[float]:
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist()


def _normalised(values: ArrayLike, name: str, layer: int) -> list[float]:
    """A per-layer statistic scaled to sum 1 (phi and w are distributions over the layer's experts)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if not torch.isfinite(v).all() or (v < 0).any():
        raise MoeCompressError(f"layer {layer}: {name} must be finite and >= 0")
    total = float(v.sum())
    if total <= 0:
        raise MoeCompressError(f"layer {layer}: {name} is all zero (no routed tokens); calibrate with more data")
    return (v / total).tolist()


def _check_shapes(freq, weight_mass, errors, params, n_widths: int) -> list[int]:
    """Experts per layer; every input must agree on layers and experts."""
    n_layers = len(freq)
    for name, seq in (("weight_mass", weight_mass), ("errors", errors), ("params", params)):
        if len(seq) != n_layers:
            raise MoeCompressError(f"freq covers {n_layers} MoE layers but {name} covers {len(seq)}")
    sizes = []
    for layer in range(n_layers):
        n = torch.as_tensor(freq[layer]).numel()
        if torch.as_tensor(weight_mass[layer]).numel() != n or torch.as_tensor(params[layer]).numel() != n:
            raise MoeCompressError(f"layer {layer}: freq, weight_mass and params disagree on the expert count")
        if tuple(torch.as_tensor(errors[layer]).shape) != (n, n_widths):
            raise MoeCompressError(
                f"layer {layer}: errors must be [{n}, {n_widths}] (experts x bit_choices), "
                f"got {list(torch.as_tensor(errors[layer]).shape)}"
            )
        p = torch.as_tensor(params[layer], dtype=torch.float64)
        if not torch.isfinite(p).all() or (p <= 0).any():
            raise MoeCompressError(f"layer {layer}: params must be positive weight counts")
        sizes.append(n)
    return sizes


def _resolve_pins(pinned, sizes: list[int]) -> list[list[int | None]]:
    """[l][e] -> None for a free (budgeted) expert, else its fixed width (a pin to None becomes 16)."""
    pins: list[list[int | None]] = [[None] * n for n in sizes]
    for key, width in (pinned or {}).items():
        layer, expert = key
        if not (0 <= layer < len(sizes) and 0 <= expert < sizes[layer]):
            raise MoeCompressError(f"pinned expert {key} does not exist (layers 0..{len(sizes) - 1})")
        if width is not None and width not in SUPPORTED_BITS and width != UNQUANTIZED_BITS:
            raise MoeCompressError(f"pinned expert {key}: width {width} not in {SUPPORTED_BITS} or None")
        pins[layer][expert] = UNQUANTIZED_BITS if width is None else int(width)
    return pins


def _decision_units(free: list[list[bool]], granularity: str) -> list[list[tuple[int, int]]]:
    """Groups of experts sharing one width choice: one per free expert, or one per layer."""
    if granularity == "expert":
        return [[(l, e)] for l, row in enumerate(free) for e, f in enumerate(row) if f]
    units = [[(l, e) for e, f in enumerate(row) if f] for l, row in enumerate(free)]
    return [u for u in units if u]


def _budget_groups(free: list[list[bool]], scope: str) -> list[list[int]]:
    """Layer indices sharing one budget constraint."""
    layers = [l for l, row in enumerate(free) if any(row)]
    return [layers] if scope == "global" else [[l] for l in layers]


def _check_feasible(eff: list[float], config: AllocationConfig) -> None:
    """Every budgeted expert at the narrowest width must fit; say what averages are achievable if not.

    Widths are uniform across experts, so in every budget group (global or per layer) the achievable
    averages run from eff[0] to eff[-1] whatever the params are."""
    if eff[0] > config.budget + BUDGET_TOL:
        widths = config.allowed_widths()
        raise MoeCompressError(
            f"budget {config.budget:g} bits is infeasible: achievable averages are {eff[0]:.4f} "
            f"(all at {widths[0]} bits) to {eff[-1]:.4f} (all at {widths[-1]} bits) with group "
            f"{config.group_size}; raise the budget or allow narrower widths"
        )


def _top_width_layers(param_rows, free, eff: list[float], config: AllocationConfig) -> list[int]:
    """Layers where MC-MoE's "one expert at each of the two top widths" constraint applies and fits."""
    if not (config.require_top_widths and config.scope == "layer" and config.granularity == "expert"):
        return []
    if len(eff) < 2:
        return []
    layers = []
    for l, row in enumerate(free):
        counts = sorted(p for p, f in zip(param_rows[l], row) if f)
        if len(counts) < 2:
            continue
        # Cheapest way to satisfy it: the smallest expert at the top width, the next at the second.
        least = sum(counts) * eff[0] + counts[0] * (eff[-1] - eff[0]) + counts[1] * (eff[-2] - eff[0])
        if least <= config.budget * sum(counts) + BUDGET_TOL * sum(counts):
            layers.append(l)
        else:
            logger.info("MoE layer %d: two-top-widths constraint cannot fit the budget; dropped", l)
    return layers


def _solve(units, free, costs, param_rows, eff, widths, config: AllocationConfig) -> tuple[list[int], str]:
    """Build and solve the multiple-choice knapsack; -> chosen width index per unit, solver status."""
    n_widths = len(widths)
    unit_cost = [[sum(costs[l][e][j] for l, e in unit) for j in range(n_widths)] for unit in units]
    unit_params = [sum(param_rows[l][e] for l, e in unit) for unit in units]
    unit_layer = [unit[0][0] for unit in units]
    scale = SOLVER_COST_MAX / (max(c for row in unit_cost for c in row) or 1.0)
    # Tie-break: a reward for stored bits, at most TIE_WEIGHT of the largest cost per decision, so
    # among equal-cost choices the one spending more budget wins (and the result is unique).
    largest_unit = max(unit_params)
    tie = [
        [TIE_WEIGHT * SOLVER_COST_MAX * unit_params[u] / largest_unit * eff[j] / eff[-1] for j in range(n_widths)]
        for u in range(len(units))
    ]
    group_of_layer = {l: g for g, layers in enumerate(_budget_groups(free, config.scope)) for l in layers}
    groups: list[list[int]] = [[] for _ in set(group_of_layer.values())]
    for u, l in enumerate(unit_layer):
        groups[group_of_layer[l]].append(u)
    top_layers = _top_width_layers(param_rows, free, eff, config)
    slack = [0.0] * len(groups)  # tightening of each group's right-hand side after an overshoot

    for _ in range(_MAX_RESOLVES + 1):
        with warnings.catch_warnings():  # PuLP 3.x deprecation notices for the 2.x API we use
            warnings.simplefilter("ignore", DeprecationWarning)
            prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
            x = [
                [pulp.LpVariable(f"x_{u:06d}_{j:02d}", cat=pulp.LpBinary) for j in range(n_widths)]
                for u in range(len(units))
            ]
            prob += pulp.lpSum(
                (unit_cost[u][j] * scale - tie[u][j]) * x[u][j] for u in range(len(units)) for j in range(n_widths)
            )
            for u in range(len(units)):
                prob += pulp.lpSum(x[u]) == 1, f"one_width_{u:06d}"
            for g, members in enumerate(groups):
                group_params = sum(unit_params[u] for u in members)
                # Divided by the group's weight count, the left side is the group's average bits.
                average = pulp.lpSum(
                    unit_params[u] / group_params * eff[j] * x[u][j] for u in members for j in range(n_widths)
                )
                prob += average <= config.budget - slack[g], f"budget_{g:04d}"
            for l in top_layers:
                members = [u for u in range(len(units)) if unit_layer[u] == l]
                for j in (n_widths - 1, n_widths - 2):
                    prob += pulp.lpSum(x[u][j] for u in members) >= 1, f"top_width_{l:04d}_{j:02d}"
            prob.solve(pulp.PULP_CBC_CMD(msg=False, threads=1))
        status = pulp.LpStatus[prob.status]
        if status != "Optimal":
            raise MoeCompressError(f"bit allocation solver ended with status {status!r}; check the budget and inputs")
        choice = [_chosen(x[u], u) for u in range(len(units))]

        # CBC accepts constraint violations within its tolerance; check the budget exactly, re-solve if over.
        overshoot = False
        for g, members in enumerate(groups):
            used = sum(unit_params[u] * eff[choice[u]] for u in members) / sum(unit_params[u] for u in members)
            if used > config.budget + BUDGET_TOL:
                slack[g] += 2 * (used - config.budget)
                overshoot = True
        if not overshoot:
            return choice, status
    raise MoeCompressError("bit allocation solver could not meet the budget exactly; raise the budget slightly")


def _chosen(row: list[pulp.LpVariable], unit: int) -> int:
    picked = [j for j, var in enumerate(row) if (var.value() or 0.0) > 0.5]
    if len(picked) != 1:
        raise MoeCompressError(f"bit allocation solver returned no single width for decision {unit}; report this")
    return picked[0]
