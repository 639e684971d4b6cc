"""M-SMoE expert merging (UNITES-Lab/MC-SMoE) as plain tensor functions.

Shape legend: E experts in a layer, E' groups (merged experts), m members of one group, L layers,
I intermediate size, H hidden size.

Pipeline for one layer: :func:`group_experts` (dominant experts by usage frequency, the rest join
their most router-similar dominant) -> :func:`merge_group` per group (align every member's neurons to
the dominant with :func:`align_permutation`, then frequency-weighted average) -> router rows for a
standard E'-expert checkpoint (:func:`merged_router_rows`) or the exact expert -> group map
(:func:`expert_to_group`). Per-layer group counts come from one global frequency threshold
(:func:`group_counts_from_threshold`, :func:`threshold_for_total_groups`, :func:`global_group_counts`).

Our extension, not in M-SMoE: :func:`regmean_combine` (RegMean, Jin et al. 2023) replaces the
frequency-weighted average by the least-squares combination given each member's calibration inputs
(``merge_group``'s ``input_grams`` / ``activation_grams``); the average is its special case of
identically distributed inputs.

Deviations from the reference code (each documented where it happens): ties are broken by the lower
expert id everywhere (the reference uses unstable ``argsort``); a group whose members all have
frequency 0 is averaged with equal weights (the reference divides by ``sum f + eps`` and zeroes it);
alignment is run before averaging for GLU experts too (the Mixtral script merges unaligned).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from scipy.optimize import linear_sum_assignment

from moecompress.errors import MoeCompressError

ROUTER_MODES = ("dominant", "weighted", "logsumexp_approx")


# ----------------------------------------------------------------------------- permutation alignment


def align_permutation(
    ref_gate: torch.Tensor | None,
    ref_up: torch.Tensor,
    ref_down: torch.Tensor,
    gate: torch.Tensor | None,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """The neuron permutation ``perm [I]`` (long) that best matches a target expert to a reference.

    Per expert: gate/up ``[I, H]`` (gate may be None for both), down ``[H, I]``. ``perm[i]`` is the
    target neuron placed at position i, so ``apply_permutation(gate, up, down, perm)`` lines the
    target up with the reference. Weight matching as in MC-SMoE ``permutation.py``: maximise
    ``sum_i <v_ref_i, v_tgt_perm[i]>`` over permutations, where ``v`` concatenates a neuron's gate row,
    up row and down column — equivalently, minimise the squared L2 distance between the experts
    after permutation. Solved exactly with ``scipy.optimize.linear_sum_assignment``.
    """
    if (ref_gate is None) != (gate is None):
        raise MoeCompressError("align_permutation needs a gate for both experts or for neither")
    if ref_up.shape != up.shape or ref_down.shape != down.shape:
        raise MoeCompressError(
            f"experts differ in shape: up {tuple(ref_up.shape)} vs {tuple(up.shape)}, "
            f"down {tuple(ref_down.shape)} vs {tuple(down.shape)}"
        )
    ref_up, ref_down, up, down = (w.to(torch.float32) for w in (ref_up, ref_down, up, down))
    cost = ref_up @ up.T  # [I, I]: <up_ref_i, up_tgt_j>
    cost += ref_down.T @ down  # <down_ref[:, i], down_tgt[:, j]>
    if gate is not None:
        cost += ref_gate.to(torch.float32) @ gate.to(torch.float32).T
    _, cols = linear_sum_assignment(cost.cpu().double().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long, device=up.device)


def apply_permutation(
    gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Reorder an expert's neurons: rows of gate/up ``[I, H]``, columns of down ``[H, I]``.

    The expert computes the same function afterwards (its output is a sum over neurons).
    """
    perm = perm.to(device=up.device, dtype=torch.long)
    if perm.shape != (up.shape[0],) or not torch.equal(perm.sort().values, torch.arange(up.shape[0], device=up.device)):
        raise MoeCompressError(f"perm must be a permutation of range({up.shape[0]})")
    return (None if gate is None else gate[perm], up[perm], down[:, perm])


# ----------------------------------------------------------------------------- grouping


# members, dominants -> similarity [len(members), len(dominants)] (higher = more alike)
PairSimilarity = Callable[[list[int], list[int]], torch.Tensor]


def group_experts(
    freq: torch.Tensor,
    router_sim: torch.Tensor,
    num_groups: int,
    protected: Iterable[int] = (),
    similarity: PairSimilarity | None = None,
) -> list[list[int]]:
    """M-SMoE grouping of one layer's E experts into ``num_groups`` groups.

    freq: ``[E]`` usage frequency; router_sim: ``[E, E]`` similarity between experts' router-logit
    columns (cosine, or MC-SMoE's ``(cos + 1) / 2`` — only the order matters). Dominant experts are
    the protected ones (singleton groups: they never absorb others and are never absorbed) plus the
    ``num_groups - len(protected)`` most frequent others (ties to the lower id). Every remaining
    expert joins the non-protected dominant expert it is most similar to (ties to the lower id).
    Returns groups sorted by their dominant expert's id, each ``[dominant, *others ascending]`` — the
    first member is the dominant one (:func:`merge_group` aligns to it).

    ``similarity(members, dominants)``, when given, replaces the router similarity for the joining
    step (our ``--grouping output``: it is asked only for the pairs the step compares).
    """
    freq = torch.as_tensor(freq).to(torch.float64)
    num_experts = freq.shape[0]
    if freq.ndim != 1 or not torch.isfinite(freq).all():
        raise MoeCompressError(f"freq must be a finite 1-D tensor [E]; got shape {tuple(freq.shape)}")
    if router_sim.shape != (num_experts, num_experts):
        raise MoeCompressError(
            f"router_sim must be [E, E] = {(num_experts, num_experts)}; got {tuple(router_sim.shape)}"
        )
    protected_ids = {int(e) for e in protected}
    if any(not 0 <= e < num_experts for e in protected_ids):
        raise MoeCompressError(f"protected expert ids {sorted(protected_ids)} are outside [0, {num_experts})")
    if not len(protected_ids) <= num_groups <= num_experts:
        raise MoeCompressError(
            f"num_groups={num_groups} must lie in [{len(protected_ids)} protected, {num_experts} experts]"
        )
    free = [e for e in range(num_experts) if e not in protected_ids]
    free_dominants = sorted(free, key=lambda e: (-float(freq[e]), e))[: num_groups - len(protected_ids)]
    if free and not free_dominants:
        raise MoeCompressError(
            f"num_groups={num_groups} leaves no group for the {len(free)} unprotected experts; "
            "raise num_groups above the number of protected experts"
        )
    groups: dict[int, list[int]] = {e: [e] for e in sorted(protected_ids) + free_dominants}
    dominant_set = set(groups)
    ordered_dominants = sorted(free_dominants)  # ascending ids: argmax ties go to the lower id
    members = [e for e in free if e not in dominant_set]
    if similarity is not None and members:
        rows = similarity(members, ordered_dominants).to(torch.float64)
    else:
        dominant_index = torch.as_tensor(ordered_dominants, dtype=torch.long, device=router_sim.device)
        rows = router_sim.to(torch.float64)[members].index_select(1, dominant_index) if members else None
    for i, e in enumerate(members):
        if not torch.isfinite(rows[i]).all():
            raise MoeCompressError(f"similarity of expert {e} to the dominant experts is not finite; recollect router statistics")
        groups[ordered_dominants[int(rows[i].argmax())]].append(e)
    return [[d] + sorted(groups[d][1:]) for d in sorted(groups)]


def expert_to_group(groups: Sequence[Sequence[int]], num_experts: int) -> torch.Tensor:
    """The exact map ``[E]`` long: expert id -> index of its group in ``groups``.

    With it a router keeps all E rows and the routing weights of selected experts that fall in the
    same group are summed (MC-SMoE's shared-module semantics, exact).
    """
    mapping = torch.full((num_experts,), -1, dtype=torch.long)
    for g, members in enumerate(groups):
        for e in members:
            if not 0 <= e < num_experts:
                raise MoeCompressError(f"group {g} holds expert {e}, outside [0, {num_experts})")
            if mapping[e] >= 0:
                raise MoeCompressError(f"expert {e} is in two groups ({int(mapping[e])} and {g})")
            mapping[e] = g
    missing = (mapping < 0).nonzero().flatten().tolist()
    if missing:
        raise MoeCompressError(f"experts {missing} are in no group; groups must cover every expert once")
    return mapping


# ----------------------------------------------------------------------------- global group counts


def normalised_layer_frequencies(freqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """MC-SMoE's per-layer frequencies for the global threshold: each layer's counts ``[E]`` divided by
    their sum, then the layer's most used expert forced to 1.0 so every layer keeps >= 1 group.
    The most used expert is the lowest id among ties."""
    out = []
    for layer, f in enumerate(freqs):
        f = torch.as_tensor(f).to(torch.float64).flatten()
        if not torch.isfinite(f).all() or (f < 0).any():
            raise MoeCompressError(f"layer {layer}: frequencies must be finite and non-negative")
        total = f.sum()
        if total <= 0:
            raise MoeCompressError(f"layer {layer}: no expert was ever selected; calibrate on more tokens")
        f = f / total
        f[int(f.argmax())] = 1.0  # argmax returns the first maximum
        out.append(f)
    return out


def group_counts_from_threshold(freqs: Sequence[torch.Tensor], threshold: float) -> list[int]:
    """Groups per layer: the number of experts whose normalised frequency exceeds ``threshold``.

    freqs: L tensors ``[E_l]`` (counts or frequencies; see :func:`normalised_layer_frequencies`).
    A threshold below 1.0 guarantees every layer at least one group.
    """
    if threshold >= 1.0:
        raise MoeCompressError(f"threshold={threshold} leaves some layer without a group; use a value below 1.0")
    return [int((f > threshold).sum()) for f in normalised_layer_frequencies(freqs)]


def threshold_for_total_groups(freqs: Sequence[torch.Tensor], total_groups: int) -> float:
    """The global threshold for about ``total_groups`` groups over all layers (MC-SMoE's rule).

    The threshold is the ``(total_groups + 1)``-th largest normalised frequency over all layers, so
    exactly ``total_groups`` frequencies lie above it when there are no ties at the threshold (ties
    give fewer groups). Asking for every expert returns -1.0 (everything stays).
    """
    norm = normalised_layer_frequencies(freqs)
    all_freq = torch.sort(torch.cat(norm), descending=True).values
    if not len(norm) <= total_groups <= all_freq.numel():
        raise MoeCompressError(
            f"total_groups={total_groups} must lie in [{len(norm)} (one per layer), {all_freq.numel()} experts]"
        )
    if total_groups == all_freq.numel():
        return -1.0
    return float(all_freq[total_groups])


def threshold_for_average_groups(freqs: Sequence[torch.Tensor], average_groups: float) -> float:
    """:func:`threshold_for_total_groups` for ``round(average_groups * L)`` groups."""
    return threshold_for_total_groups(freqs, int(round(average_groups * len(freqs))))


def global_group_counts(
    freqs: Sequence[torch.Tensor], *, total_groups: int | None = None, threshold: float | None = None
) -> list[int]:
    """Groups per layer ``[L]`` from one global frequency threshold: give ``total_groups`` (the
    threshold is found with :func:`threshold_for_total_groups`) or the ``threshold`` itself."""
    if (total_groups is None) == (threshold is None):
        raise MoeCompressError("give exactly one of total_groups or threshold")
    if threshold is None:
        threshold = threshold_for_total_groups(freqs, total_groups)
    return group_counts_from_threshold(freqs, threshold)


# ----------------------------------------------------------------------------- merging


# RegMean's shrinkage of the Gram matrices' off-diagonal entries (Jin et al. 2023 use 0.9 for LMs):
# G~ = a G + (1 - a) diag(G) keeps the solve well conditioned when a member saw few tokens.
REGMEAN_ALPHA = 0.9
REGMEAN_RIDGE = 1e-6  # relative to the mean diagonal: only guards exactly singular sums
# Solve in float64 while one [in, in] matrix stays under this size (Mixtral's I = 14336: float32).
REGMEAN_FLOAT64_BYTES = 512 * 2**20


def regmean_dtype(n: int) -> torch.dtype:
    """float64 for RegMean's ``[n, n]`` matrices while one stays under REGMEAN_FLOAT64_BYTES, else float32."""
    return torch.float64 if n * n * 8 <= REGMEAN_FLOAT64_BYTES else torch.float32


def regmean_combine(weights: torch.Tensor, grams: torch.Tensor | Sequence[torch.Tensor],
                    alpha: float = REGMEAN_ALPHA) -> torch.Tensor | None:
    """RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", 2023).

    weights ``[m, out, in]`` (each member's linear map, nn.Linear layout), grams ``[m, in, in]`` (or m
    ``[in, in]`` tensors: large Grams need not be stacked) with
    ``G_e = X_e^T X_e`` over the inputs member e sees -> the ``W [out, in]`` minimising
    ``sum_e ||X_e W^T - X_e W_e^T||^2``: ``W = (sum_e W_e G~_e)(sum_e G~_e)^-1``, with
    ``G~ = alpha G + (1 - alpha) diag(G)``. When every member's inputs share one covariance,
    ``G_e ~ n_e C`` and this is exactly the token-count (frequency) weighted average M-SMoE uses; when
    they differ, each member's map is kept on the inputs it actually receives. Computed as
    ``W_0 + sum_e (W_e - W_0) G~_e S^-1`` (the same value), so identical members give ``W_0`` exactly.
    Returns None when no member saw any input (all Grams zero): the caller falls back.
    """
    m, out, n_in = weights.shape
    if len(grams) != m or any(tuple(g.shape) != (n_in, n_in) for g in grams):
        raise MoeCompressError(f"grams must be {m} matrices [in, in] = {(n_in, n_in)}; got {[tuple(g.shape) for g in grams]}")
    dtype = regmean_dtype(n_in)
    # One member at a time: memory is the members' Grams plus two [in, in] matrices.
    total = torch.zeros(n_in, n_in, dtype=dtype, device=weights.device)
    delta = torch.zeros(out, n_in, dtype=dtype, device=weights.device)  # sum_e (W_e - W_0) G~_e
    base = weights[0].to(dtype)
    for e in range(m):
        g = grams[e].to(dtype)
        shrunk = alpha * g
        shrunk.diagonal().add_((1 - alpha) * g.diagonal())
        total += shrunk
        if e:
            delta += (weights[e].to(dtype) - base) @ shrunk
        del g, shrunk
    scale = float(total.diagonal().mean())
    if not scale > 0:
        return None
    # Relative to each diagonal entry (scale-free: a neuron with huge activations is not pulled
    # towards W_0), plus a tiny absolute part for inputs no member ever saw (zero rows and columns).
    total.diagonal().add_(REGMEAN_RIDGE * (total.diagonal() + 1e-3 * scale))
    # X S = delta with S symmetric  <=>  S X^T = delta^T
    update = torch.linalg.solve(total, delta.T).T
    return (base + update).to(weights.dtype)


class MergedExperts(NamedTuple):
    """Merged expert(s): gate/up ``[..., I, H]`` (gate None for gateless experts), down ``[..., H, I]``
    and the down projection's bias ``[..., H]`` (None for bias-free experts)."""

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor | None = None


def _with_bias_column(down: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """down ``[H', I]`` and its bias ``[H]`` (H <= H') -> ``[H', I + 1]``: the bias as the map of a
    constant-1 input, so RegMean solves weights and bias together (rows beyond H get 0)."""
    column = down.new_zeros(down.shape[0], 1)
    column[: bias.shape[0], 0] = bias.to(down.dtype)
    return torch.cat([down, column], dim=1)


def merge_group(
    gate: torch.Tensor | None,
    up: torch.Tensor,
    down: torch.Tensor,
    freq: torch.Tensor,
    input_grams: Sequence[torch.Tensor] | None = None,
    activation_grams: list[torch.Tensor] | None = None,
    down_bias: torch.Tensor | None = None,
) -> MergedExperts:
    """Merge m experts into one: align each to the first (dominant), then average.

    gate/up ``[m, I, H]`` (gate may be None), down ``[m, H, I]``, freq ``[m]``, down_bias ``[m, H]``
    or None -> gate/up ``[I, H]``, down ``[H, I]``, down_bias ``[H]``. M-SMoE's merge is the
    frequency-weighted average ``W = sum_e f_e W_e / sum_e f_e`` (the down bias too), computed as
    ``W_0 + sum_e (f_e / F)(W_e - W_0)`` (same value) so that merging identical experts returns the
    dominant one bit-exactly. All-zero frequencies use equal weights.

    Our option (``--merge-weights regmean``): with ``input_grams`` (m matrices ``[H, H]``, each
    member's routed inputs) gate and up are merged by :func:`regmean_combine` instead, and with
    ``activation_grams`` (m matrices over each member's intermediate activations, in the member's
    own neuron order: ``[I, I]``, or ``[I + 1, I + 1]`` over ``[a, 1]`` when there is a down bias,
    which is then solved together with the down weights) down too. ``activation_grams`` is consumed:
    its entries are replaced by their aligned versions (the ``[I, I]`` Grams of large models are
    big; no second copy is kept).
    """
    if up.ndim != 3 or down.shape != (up.shape[0], up.shape[2], up.shape[1]):
        raise MoeCompressError(
            f"merge_group needs up [m, I, H] and down [m, H, I]; got {tuple(up.shape)}, {tuple(down.shape)}"
        )
    if gate is not None and gate.shape != up.shape:
        raise MoeCompressError(f"gate shape {tuple(gate.shape)} differs from up {tuple(up.shape)}")
    m, width = up.shape[0], up.shape[1]
    freq = torch.as_tensor(freq).to(device=up.device, dtype=torch.float32).flatten()
    if freq.shape[0] != m or not torch.isfinite(freq).all() or (freq < 0).any():
        raise MoeCompressError(f"freq must hold {m} finite non-negative frequencies, one per member")
    weights = freq / freq.sum() if freq.sum() > 0 else torch.full_like(freq, 1.0 / m)

    ref = (None if gate is None else gate[0], up[0], down[0])
    merged = [None if w is None else w.to(torch.float32).clone() for w in ref]
    aligned_members = [ref]
    for e in range(1, m):
        member = (None if gate is None else gate[e], up[e], down[e])
        perm = align_permutation(*ref, *member)
        aligned = apply_permutation(*member, perm)
        aligned_members.append(aligned)
        if activation_grams is not None:  # the Gram follows its neurons; a bias input stays last
            full = torch.cat([perm, torch.arange(width, activation_grams[e].shape[0], device=perm.device)])
            activation_grams[e] = activation_grams[e][full][:, full]
        for acc, base, w in zip(merged, ref, aligned):
            if acc is not None:
                acc += weights[e] * (w.to(torch.float32) - base.to(torch.float32))
    # W_0 + sum_{e>0} (f_e/F)(W_e - W_0) == sum_e (f_e/F) W_e since the weights sum to 1.
    result = [None if acc is None else acc.to(base.dtype) for acc, base in zip(merged, ref)]
    bias = None
    if down_bias is not None:
        b = down_bias.to(torch.float32)
        bias = (b[0] + (weights[1:, None] * (b[1:] - b[0])).sum(0)).to(down_bias.dtype)
    if m > 1 and input_grams is not None:
        for p in (0, 1):  # gate, up: linear maps of the routed input
            if result[p] is not None:
                fitted = regmean_combine(torch.stack([a[p].float() for a in aligned_members]), input_grams)
                result[p] = result[p] if fitted is None else fitted.to(ref[p].dtype)
    if m > 1 and activation_grams is not None:
        downs = [a[2].float() for a in aligned_members]
        joint = down_bias is not None and activation_grams[0].shape[0] == width + 1
        if joint:
            downs = [_with_bias_column(d, down_bias[e].float()) for e, d in enumerate(downs)]
        fitted = regmean_combine(torch.stack(downs), activation_grams)
        if fitted is not None:
            result[2] = fitted[:, :width].to(ref[2].dtype)
            if joint:
                bias = fitted[: down_bias.shape[1], width].to(down_bias.dtype)
    return MergedExperts(result[0], result[1], result[2], bias)


def merge_experts(
    gate: torch.Tensor | None,
    up: torch.Tensor,
    down: torch.Tensor,
    groups: Sequence[Sequence[int]],
    freq: torch.Tensor,
    grams: Callable[[Sequence[int]], tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None,
    down_bias: torch.Tensor | None = None,
) -> MergedExperts:
    """Merge a layer's experts by ``groups`` (first member dominant): gate/up ``[E, I, H]``, down
    ``[E, H, I]``, freq ``[E]``, down_bias ``[E, H]`` or None -> gate/up ``[E', I, H]``, down
    ``[E', H, I]``, down_bias ``[E', H]`` in group order.

    ``grams(members)`` -> (input Grams, activation Grams) of one group's members, lists of m
    matrices, selects RegMean merging (see :func:`merge_group`); asked only for groups of 2 or more."""
    expert_to_group(groups, up.shape[0])  # validates the partition
    freq = torch.as_tensor(freq)
    outs = []
    for members in groups:
        idx = torch.as_tensor(list(members), dtype=torch.long, device=up.device)
        input_grams, activation_grams = grams(members) if grams is not None and len(members) > 1 else (None, None)
        outs.append(
            merge_group(
                None if gate is None else gate.index_select(0, idx),
                up.index_select(0, idx),
                down.index_select(0, idx),
                freq[idx.cpu()],
                input_grams,
                activation_grams,
                None if down_bias is None else down_bias.index_select(0, idx),
            )
        )
        del input_grams, activation_grams
    gates, ups, downs, biases = zip(*outs)
    return MergedExperts(
        None if gate is None else torch.stack(gates),
        torch.stack(ups),
        torch.stack(downs),
        None if down_bias is None else torch.stack(biases),
    )


# ----------------------------------------------------------------------------- router rows


def merged_router_rows(
    router_weight: torch.Tensor,
    groups: Sequence[Sequence[int]],
    freq: torch.Tensor,
    mode: str = "dominant",
    router_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Router rows for a standard E'-expert checkpoint (an approximation; the exact alternative is
    :func:`expert_to_group`). router_weight ``[E, H]``, router_bias ``[E]`` or None, freq ``[E]`` ->
    (rows ``[E', H]``, bias ``[E']`` or None).

    Modes, for a group g with members e and within-group frequency shares ``p_e = f_e / sum_g f``:

    * ``"dominant"``: the dominant (first) member's row and bias — the group is routed like the
      expert it was built around.
    * ``"weighted"``: ``sum_e p_e W_e`` (and bias) — the frequency-weighted average, mirroring how the
      expert weights were merged.
    * ``"logsumexp_approx"``: softmax routers give the group the mass ``sum_e exp(l_e)``, i.e. logit
      ``logsumexp_e l_e(x)``. Gibbs' inequality gives the linear lower bound ``sum_e p_e l_e(x) +
      H(p)`` (``H(p) = -sum_e p_e log p_e``), tight when the members' posterior equals ``p`` and exact
      for identical rows (``l + log m``). Rows as in "weighted", bias + ``H(p)``; a bias is returned
      even when the router has none (without one, this mode equals "weighted"). Meant for softmax
      routers; for sigmoid routers the offset has no such meaning.

    Zero total frequency in a group uses equal shares.
    """
    if mode not in ROUTER_MODES:
        raise MoeCompressError(f"router mode {mode!r} is not one of {ROUTER_MODES}")
    num_experts = router_weight.shape[0]
    expert_to_group(groups, num_experts)  # validates the partition
    freq = torch.as_tensor(freq).detach().cpu().to(torch.float64).flatten()
    if freq.shape[0] != num_experts:
        raise MoeCompressError(f"freq has {freq.shape[0]} entries for {num_experts} router rows")
    if router_bias is not None and router_bias.shape != (num_experts,):
        raise MoeCompressError(f"router_bias must be [E] = ({num_experts},); got {tuple(router_bias.shape)}")
    weight64 = router_weight.detach().cpu().to(torch.float64)
    bias64 = None if router_bias is None else router_bias.detach().cpu().to(torch.float64)
    rows, biases = [], []
    for members in groups:
        idx = torch.as_tensor(list(members), dtype=torch.long)
        if mode == "dominant":
            share = torch.zeros(len(members), dtype=torch.float64)
            share[0] = 1.0
        else:
            share = freq[idx]
            share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1.0 / len(members))
        rows.append(share @ weight64[idx])  # [H]
        bias = torch.zeros((), dtype=torch.float64) if bias64 is None else share @ bias64[idx]
        if mode == "logsumexp_approx":
            positive = share[share > 0]
            bias = bias - (positive * positive.log()).sum()  # + H(p)
        biases.append(bias)
    new_rows = torch.stack(rows).to(device=router_weight.device, dtype=router_weight.dtype)
    if router_bias is None and mode != "logsumexp_approx":
        return new_rows, None
    like = router_weight if router_bias is None else router_bias
    return new_rows, torch.stack(biases).to(device=like.device, dtype=like.dtype)


def grouped_router_probabilities(logits: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Softmax router probabilities summed per group: logits ``[T, E]`` -> ``[T, E']``.

    The probability mass the exact expert -> group map gives each group before top-k.
    """
    probs = logits.to(torch.float64).softmax(dim=-1)
    return torch.stack([probs[:, list(members)].sum(dim=-1) for members in groups], dim=-1)


def fit_group_router_rows(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    groups: Sequence[Sequence[int]],
    init_rows: torch.Tensor,
    iterations: int = 100,
) -> tuple[torch.Tensor, float, float]:
    """E' router rows whose softmax best matches the original router's per-group mass on ``x``.

    x ``[T, H]`` router inputs from calibration; router_weight ``[E, H]`` (a bias-free softmax
    router); init_rows ``[E', H]`` the starting rows (e.g. the dominant members'). Minimises the
    cross-entropy ``- sum_t sum_g P_g(t) log softmax(x W'^T)_g(t)`` with ``P = grouped_router_probabilities``,
    i.e. the KL from the exact group routing, by full-batch L-BFGS (deterministic; float64).
    The logsumexp bound of ``merged_router_rows`` is the closed-form approximation of the same target;
    this fits it on the tokens the model actually sees. Returns (rows ``[E', H]`` in the router's
    dtype, KL before, KL after) — KL in nats per token.
    """
    if x.ndim != 2 or x.shape[1] != router_weight.shape[1] or init_rows.shape != (len(groups), router_weight.shape[1]):
        raise MoeCompressError(
            f"fit_group_router_rows: x {tuple(x.shape)}, router {tuple(router_weight.shape)}, "
            f"init rows {tuple(init_rows.shape)} for {len(groups)} groups do not match"
        )
    xs = x.detach().to(torch.float64)
    target = grouped_router_probabilities(xs @ router_weight.detach().to(torch.float64).T, groups)  # [T, E']
    entropy = -(target * target.clamp_min(1e-300).log()).sum(dim=-1).mean()
    rows = init_rows.detach().to(torch.float64).clone().requires_grad_(True)

    def kl() -> torch.Tensor:
        return -(target * (xs @ rows.T).log_softmax(dim=-1)).sum(dim=-1).mean() - entropy

    with torch.no_grad():
        before = float(kl())
    opt = torch.optim.LBFGS([rows], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = kl()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        after = float(kl())
    return rows.detach().to(device=router_weight.device, dtype=router_weight.dtype), before, after
