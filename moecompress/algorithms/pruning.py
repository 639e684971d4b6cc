"""Expert pruning: which experts to keep, and DERN's recombination of the dropped ones.

Shape legend: T calibration tokens, E experts in the layer, R retained experts, I intermediate size
(neurons per expert), H hidden size, D length of one segment vector, N segments in a k-means pool.

Scores (higher = keep): :func:`frequency_scores` (the simplest baseline), :func:`reap_scores`
(REAP saliency, computed by the calibration hooks), :func:`dern_importance` (DERN's router-weighted
frequency). :func:`select_experts` turns any of them into the kept ids.

DERN (arXiv 2509.10377, no public code; implemented from the paper and ALGORITHMS.md section 5).
A *segment* is one neuron i of an expert: ``(gate[i, :], up[i, :], down[:, i])``. An expert computes
``y = sum_i down[:, i] * act(gate[i] . x) * (up[i] . x)``, i.e. the sum of its segments' outputs, so
segments are the unit that can move between experts. :func:`dern_recombine`:

1. every segment of every dropped expert (a *donor*) finds the single most cosine-similar segment
   among all retained experts (vectors: ``[up row, down column]``, gate row optional);
2. if that similarity exceeds ``similarity_threshold`` the donor goes to the expert holding that
   segment, otherwise it is discarded;
3. each retained expert that received donors is recombined back to its original width I with
   spherical weighted k-means over its pool (own I segments + received donors):

   * vectors clustered: the full segment ``[gate row, up row, down column]`` (the centroid must be
     unpacked into all three), compared by cosine similarity of the unit vectors;
   * weights: each segment's source-expert importance (own segments: the host's importance);
   * init: pool segments ranked by ``max |gate row|`` (``max |up row|`` for gateless experts), ties
     by pool position (own segments first, then donors by expert id and neuron); the paper takes the
     top I (``distinct_init=False``); by default we take them greedily in that order but skip one
     whose cosine to an already chosen centroid exceeds ``similarity_threshold`` (see below);
   * update: centroid direction ``c_k = normalize(sum_j w_j u_j)`` over the members' unit vectors;
   * output (norms equalised): a cluster's segment is ``nbar_k * c_k`` with
     ``nbar_k = sum_j w_j ||v_j|| / sum_j w_j`` — every member rescaled to the cluster's weighted mean
     norm, i.e. the weighted spherical mean placed at the weighted mean radius;
   * a cluster with exactly one member returns that member bit-exactly; an expert with no donors is
     returned bit-exactly (no k-means is run).

Choices the paper leaves open, and deviations (documented here because there is no reference code):

* Centroid norm: the paper says "norms equalised within a cluster"; we read it as above. The
  alternative reading (average of the rescaled members without re-normalising, ``nbar_k * sum_j w_j
  u_j / sum_j w_j``) shrinks merged segments whenever members disagree in direction.
* A cluster whose members all have zero weight (importance 0) uses equal weights, so it is never
  empty of signal; an empty cluster during k-means takes the pool segment least similar to its own
  centroid from a cluster with more than one member (deterministic; plain k-means would leave it
  empty and the expert would lose a neuron).
* Distinct initialisation (default, a deviation): donors are by construction similar to a host
  segment, often with a gate of the same magnitude, so the paper's top-I rule tends to make *both*
  a donor and its host segment centroids; k-means cannot undo that, and two unrelated segments must
  then share a cluster. On a host + noisy-copy donor pair (tests/algorithms/test_pruning.py) the
  top-I rule ends further from the importance-weighted blend of the two experts than simply
  discarding the donor (relative error ~0.65 vs 0.36); the distinct rule gets ~0.14.
  ``distinct_init=False`` gives the paper's rule, to measure on real models.
* Everything is deterministic: the paper's initialisation is deterministic, and empty-cluster repair
  is too, so there is no random seed.
* Merged segments average (weighted) rather than add their members' outputs: that is the paper's
  "weighted mean updates". A donor identical to a host segment therefore changes nothing, and a
  cluster's output approximates the weighted mean of its members' outputs, not their sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moecompress.errors import MoeCompressError

# Largest similarity block materialised at once (elements): keeps Mixtral-size layers in memory.
SIMILARITY_BLOCK_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------- expert selection


def select_experts(scores: torch.Tensor, keep: int, protected: Iterable[int] = ()) -> list[int]:
    """The ids of the experts to keep, sorted ascending.

    scores: ``[E]``, higher = more worth keeping. Protected ids are always kept; the remaining
    ``keep - len(protected)`` slots go to the highest-scoring other experts, ties to the lower id.
    """
    scores = _check_vector(scores, "scores")
    num_experts = scores.shape[0]
    protected_ids = _check_ids(protected, num_experts, "protected")
    if not 1 <= keep <= num_experts:
        raise MoeCompressError(f"keep={keep} is outside [1, {num_experts}]; keep at least one expert and at most all")
    if len(protected_ids) > keep:
        raise MoeCompressError(
            f"{len(protected_ids)} protected experts do not fit in keep={keep}; raise keep or protect fewer"
        )
    # Stable sort by descending score on ids in ascending order: ties go to the lower id.
    order = sorted(range(num_experts), key=lambda e: (-float(scores[e]), e))
    kept = set(protected_ids)
    for e in order:
        if len(kept) == keep:
            break
        kept.add(e)
    return sorted(kept)


def frequency_scores(counts: torch.Tensor) -> torch.Tensor:
    """Usage frequency ``[E]``: each expert's share of all top-k selections (zeros if none were seen)."""
    counts = _check_vector(counts, "counts").to(torch.float32)
    if (counts < 0).any():
        raise MoeCompressError("selection counts must be non-negative")
    total = counts.sum()
    return counts / total if total > 0 else torch.zeros_like(counts)


def reap_scores(scores: torch.Tensor) -> torch.Tensor:
    """REAP saliency ``[E]``, as accumulated by calibration (``mean_{t in X_e} g_e(t) ||f_e(t)||``).

    Passthrough with validation, so every criterion enters :func:`select_experts` the same way.
    """
    return _check_vector(scores, "REAP scores").to(torch.float32).clone()


def dern_importance(weight_sums: torch.Tensor, tokens: int) -> torch.Tensor:
    """DERN importance ``I_e = (1/T) sum_t 1[e in topk(t)] g_hat_e(t)`` ``[E]``.

    weight_sums: ``[E]``, the sum of the normalised top-k routing weights over the tokens that
    selected e; tokens: T, all calibration tokens (not only those routed to e).
    """
    weight_sums = _check_vector(weight_sums, "weight sums").to(torch.float32)
    if tokens <= 0:
        raise MoeCompressError(f"tokens={tokens}: DERN importance needs at least one calibration token")
    if (weight_sums < 0).any():
        raise MoeCompressError("routing weight sums must be non-negative")
    return weight_sums / tokens


# ----------------------------------------------------------------------------- DERN recombination


@dataclass(frozen=True)
class _Segments:
    """Segments of some experts, one per row: gate rows, up rows and down columns, each ``[n, H]``."""

    gate: torch.Tensor | None
    up: torch.Tensor
    down_cols: torch.Tensor

    def vectors(self, include_gate: bool) -> torch.Tensor:
        """``[n, D]`` float32: concatenated ``[gate row,] up row, down column``."""
        parts = ([self.gate] if include_gate and self.gate is not None else []) + [self.up, self.down_cols]
        return torch.cat([p.to(torch.float32) for p in parts], dim=1)


def _expert_segments(gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor, ids: Sequence[int]) -> _Segments:
    """Segments of experts ``ids`` in that order, ``len(ids) * I`` rows (expert-major, neuron-minor)."""
    index = torch.as_tensor(list(ids), dtype=torch.long, device=up.device)
    hidden = up.shape[-1]
    return _Segments(
        gate=None if gate is None else gate.index_select(0, index).reshape(-1, hidden),
        up=up.index_select(0, index).reshape(-1, hidden),
        down_cols=down.index_select(0, index).transpose(1, 2).reshape(-1, hidden),  # [n*I, H]
    )


def _nearest_segments(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row the best cosine similarity to any key row and that key's index.

    queries ``[Q, D]``, keys ``[K, D]`` -> (``[Q]`` float32, ``[Q]`` long). Blocked over queries so the
    ``[Q, K]`` matrix is never held at once; ties go to the lower key index (``argmax``).
    """
    q_unit = F.normalize(queries, dim=1)
    k_unit = F.normalize(keys, dim=1)
    block = max(1, SIMILARITY_BLOCK_ELEMENTS // max(1, k_unit.shape[0]))
    best_sim, best_idx = [], []
    for start in range(0, q_unit.shape[0], block):
        sim = q_unit[start : start + block] @ k_unit.T  # [block, K]
        values, indices = sim.max(dim=1)
        best_sim.append(values)
        best_idx.append(indices)
    return torch.cat(best_sim), torch.cat(best_idx)


def _assign_to_centroids(units: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means assignment: (cluster ``[N]`` long, cosine to it ``[N]``); ties to lower cluster."""
    sim, cluster = _nearest_segments(units, centroids)
    return cluster, sim


def _fill_empty_clusters(assign: torch.Tensor, sim: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Give every empty cluster the worst-fitting point of a cluster that has more than one member.

    assign ``[N]``, sim ``[N]`` (cosine of each point to its centroid); N >= num_clusters. Returns a new
    assignment in which every cluster is non-empty (the recombined expert keeps all I neurons).
    """
    assign, sim = assign.clone(), sim.clone()
    counts = torch.bincount(assign, minlength=num_clusters)
    for cluster in (counts == 0).nonzero().flatten().tolist():
        movable = counts[assign] > 1
        candidate = int(torch.where(movable, sim, torch.full_like(sim, float("inf"))).argmin())
        counts[assign[candidate]] -= 1
        counts[cluster] += 1
        assign[candidate] = cluster
        sim[candidate] = 1.0  # it now defines its cluster; do not move it again
    return assign


def _cluster_weights(assign: torch.Tensor, weights: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Per-point weights ``[N]`` for the centroid update: the given ones, or 1.0 in a cluster whose
    members all weigh 0 (a retained expert with importance 0 must still average its members)."""
    totals = torch.zeros(num_clusters, dtype=weights.dtype, device=weights.device).index_add_(0, assign, weights)
    return torch.where(totals[assign] > 0, weights, torch.ones_like(weights))


def _update_directions(
    units: torch.Tensor, weights: torch.Tensor, assign: torch.Tensor, previous: torch.Tensor
) -> torch.Tensor:
    """New centroid directions ``[k, D]``: ``normalize(sum_j w_j u_j)`` per cluster (weighted spherical
    mean); a cluster whose weighted sum vanishes keeps its previous direction."""
    k = previous.shape[0]
    w = _cluster_weights(assign, weights, k)
    sums = torch.zeros_like(previous).index_add_(0, assign, units * w.unsqueeze(1))
    norms = sums.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, sums / norms.clamp_min(torch.finfo(sums.dtype).tiny), previous)


def spherical_weighted_kmeans(
    vectors: torch.Tensor, weights: torch.Tensor, init_index: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cluster ``vectors [N, D]`` (weights ``[N]``) into ``k = len(init_index)`` groups by cosine.

    Centroids start at the unit vectors of ``vectors[init_index]``. Returns (assignment ``[N]`` long,
    centroid directions ``[k, D]`` unit, iterations run). The returned directions are the weighted
    spherical means of the returned assignment, so the two are consistent.
    """
    k = init_index.shape[0]
    units = F.normalize(vectors, dim=1)
    directions = units[init_index]
    assign = None
    iterations = 0
    for _ in range(max(1, iters)):
        new_assign, sim = _assign_to_centroids(units, directions)
        new_assign = _fill_empty_clusters(new_assign, sim, k)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        directions = _update_directions(units, weights, assign, directions)
        iterations += 1
    return assign, directions, iterations


def _init_centroids(pool: _Segments, width: int, distinct_threshold: float | None) -> torch.Tensor:
    """Indices ``[I]`` (ascending) of the pool segments that start as k-means centroids.

    Candidates are ranked by ``max |gate row|`` (``max |up row|`` without a gate), ties to the earlier
    pool position. ``distinct_threshold=None`` takes the top I (the paper's rule). Otherwise a
    candidate whose full-vector cosine to an already chosen centroid exceeds the threshold is
    skipped (greedy, in rank order), and slots still open at the end take the skipped ones in rank
    order — so a donor and the host segment it copies never both become centroids.
    """
    source = pool.gate if pool.gate is not None else pool.up
    key = source.to(torch.float32).abs().amax(dim=1)
    order = torch.sort(-key, stable=True).indices
    if distinct_threshold is None:
        return torch.sort(order[:width]).values
    units = F.normalize(pool.vectors(include_gate=True), dim=1)  # [N, D]
    chosen: list[int] = []
    skipped: list[int] = []
    block = max(1, min(1024, SIMILARITY_BLOCK_ELEMENTS // max(1, width)))
    for start in range(0, order.shape[0], block):
        candidates = order[start : start + block]
        cand_units = units[candidates]  # [b, D]
        fresh = torch.ones(candidates.shape[0], dtype=torch.bool, device=units.device)
        if chosen:  # suppression by centroids chosen in earlier blocks, in one matmul
            chosen_units = units[torch.as_tensor(chosen, device=units.device)]
            fresh = (cand_units @ chosen_units.T).amax(dim=1) <= distinct_threshold
        inner = (cand_units @ cand_units.T).cpu()  # [b, b]: suppression within the block
        fresh = fresh.cpu().tolist()
        picked_here: list[int] = []
        for a, candidate in enumerate(candidates.tolist()):
            if fresh[a] and not (picked_here and inner[a, picked_here].amax() > distinct_threshold):
                picked_here.append(a)
                chosen.append(candidate)
                if len(chosen) == width:
                    return torch.sort(torch.as_tensor(chosen, dtype=torch.long, device=units.device)).values
            else:
                skipped.append(candidate)
    chosen += skipped[: width - len(chosen)]  # too few distinct segments: fill in rank order
    return torch.sort(torch.as_tensor(chosen, dtype=torch.long, device=units.device)).values


def _recombine_expert(
    own: _Segments,
    donors: _Segments,
    own_weight: float,
    donor_weights: torch.Tensor,
    iters: int,
    distinct_threshold: float | None,
):
    """Recombine one retained expert (``own``: I segments) with its received ``donors`` back to I.

    Returns (gate ``[I, H]`` or None, up ``[I, H]``, down ``[H, I]``, k-means iterations, clusters with
    more than one member). Singleton clusters copy their segment bit-exactly.
    """
    width, hidden = own.up.shape
    pool = _Segments(
        gate=None if own.gate is None else torch.cat([own.gate, donors.gate]),
        up=torch.cat([own.up, donors.up]),
        down_cols=torch.cat([own.down_cols, donors.down_cols]),
    )
    vectors = pool.vectors(include_gate=True)  # [N, D]
    weights = torch.cat(
        [torch.full((width,), float(own_weight), device=vectors.device), donor_weights.to(vectors)]
    )  # [N]
    init = _init_centroids(pool, width, distinct_threshold)  # [I]
    assign, directions, iterations = spherical_weighted_kmeans(vectors, weights, init, iters)

    # Norm equalisation: each cluster's segment sits at its members' weighted mean norm.
    w = _cluster_weights(assign, weights, width)
    radius = torch.zeros(width, device=vectors.device).index_add_(0, assign, w * vectors.norm(dim=1))
    radius = radius / torch.zeros(width, device=vectors.device).index_add_(0, assign, w)
    centroids = directions * radius.unsqueeze(1)  # [I, D]

    # Unpack [gate | up | down] and copy singletons exactly (no normalise/rescale round trip).
    parts = centroids.split(hidden, dim=1)
    out = _Segments(
        gate=None if pool.gate is None else parts[0].to(pool.gate.dtype),
        up=parts[-2].to(pool.up.dtype),
        down_cols=parts[-1].to(pool.down_cols.dtype),
    )
    counts = torch.bincount(assign, minlength=width)
    members = torch.full((width,), -1, dtype=torch.long, device=assign.device)
    members[assign] = torch.arange(assign.shape[0], device=assign.device)  # any member; exact for singletons
    single = (counts == 1).nonzero().flatten()
    src = members[single]
    if out.gate is not None:
        out.gate[single] = pool.gate[src]
    out.up[single] = pool.up[src]
    out.down_cols[single] = pool.down_cols[src]
    merged = int((counts > 1).sum())
    return out.gate, out.up, out.down_cols.T.contiguous(), iterations, merged


def dern_recombine(
    gate: torch.Tensor | None,
    up: torch.Tensor,
    down: torch.Tensor,
    kept: Sequence[int],
    importance: torch.Tensor,
    similarity_threshold: float = 0.6,
    use_gate_in_similarity: bool = False,
    kmeans_iters: int = 20,
    distinct_init: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, dict]:
    """DERN: drop the experts not in ``kept`` and recombine their neurons into the kept ones.

    gate ``[E, I, H]`` or None, up ``[E, I, H]``, down ``[E, H, I]``; kept: R expert ids (output order);
    importance ``[E]`` (e.g. :func:`dern_importance`). Returns ``(gate' [R, I, H] or None,
    up' [R, I, H], down' [R, H, I], info)``; every retained expert keeps width I, and one that
    received no donor segment is returned bit-exactly.

    info: ``received`` {kept id: donor segments merged in}, ``discarded`` {kept id: donor segments
    whose best match was in this expert but at or below the threshold}, ``donor_segments`` (total),
    ``mean_similarity`` (mean best-match cosine over all donor segments, None without donors),
    ``mean_received_similarity`` (over accepted donors, None if none), ``kmeans_iterations`` and
    ``merged_clusters`` {kept id: int} for the recombined experts. ``distinct_init`` picks the
    centroid initialisation (module docstring); False is the paper's top-I rule.
    """
    num_experts, width, _ = _check_expert_stack(gate, up, down)
    importance = _check_vector(importance, "importance").to(device=up.device, dtype=torch.float32)
    if importance.shape[0] != num_experts:
        raise MoeCompressError(f"importance has {importance.shape[0]} entries for {num_experts} experts")
    if (importance < 0).any():
        raise MoeCompressError("importance must be non-negative (it weights k-means members)")
    kept = list(kept)
    if not kept or len(set(kept)) != len(kept) or any(not 0 <= e < num_experts for e in kept):
        raise MoeCompressError(f"kept must be distinct expert ids in [0, {num_experts}); got {kept}")
    if kmeans_iters < 1:
        raise MoeCompressError(f"kmeans_iters={kmeans_iters}; run at least one k-means iteration")

    kept_set = set(kept)
    dropped = [e for e in range(num_experts) if e not in kept_set]
    kept_index = torch.as_tensor(kept, dtype=torch.long, device=up.device)
    new_gate = None if gate is None else gate.index_select(0, kept_index)  # copies: bit-exact default
    new_up = up.index_select(0, kept_index)
    new_down = down.index_select(0, kept_index)
    info: dict = {
        "received": {e: 0 for e in kept},
        "discarded": {e: 0 for e in kept},
        "donor_segments": len(dropped) * width,
        "mean_similarity": None,
        "mean_received_similarity": None,
        "kmeans_iterations": {},
        "merged_clusters": {},
    }
    if not dropped:
        return new_gate, new_up, new_down, info

    include_gate = use_gate_in_similarity and gate is not None
    retained = _expert_segments(gate, up, down, kept)  # [R*I, H] each
    donors = _expert_segments(gate, up, down, dropped)  # [(E-R)*I, H] each
    best_sim, best_key = _nearest_segments(donors.vectors(include_gate), retained.vectors(include_gate))
    host = best_key // width  # position in `kept` of the expert holding the best match
    accepted = best_sim > similarity_threshold
    donor_expert = torch.as_tensor(dropped, dtype=torch.long, device=up.device).repeat_interleave(width)
    info["mean_similarity"] = float(best_sim.mean())
    if accepted.any():
        info["mean_received_similarity"] = float(best_sim[accepted].mean())

    for r, expert in enumerate(kept):
        mine = host == r
        info["received"][expert] = int((mine & accepted).sum())
        info["discarded"][expert] = int((mine & ~accepted).sum())
        take = (mine & accepted).nonzero().flatten()
        if take.numel() == 0:
            continue
        own = _Segments(
            gate=None if new_gate is None else new_gate[r],
            up=new_up[r],
            down_cols=new_down[r].T,
        )
        received = _Segments(
            gate=None if donors.gate is None else donors.gate[take],
            up=donors.up[take],
            down_cols=donors.down_cols[take],
        )
        g, u, d, iterations, merged = _recombine_expert(
            own, received, float(importance[expert]), importance[donor_expert[take]],
            kmeans_iters,
            similarity_threshold if distinct_init else None,
        )
        if new_gate is not None:
            new_gate[r] = g
        new_up[r] = u
        new_down[r] = d
        info["kmeans_iterations"][expert] = iterations
        info["merged_clusters"][expert] = merged
    return new_gate, new_up, new_down, info


# ----------------------------------------------------------------------------- validation helpers


def _check_vector(values: torch.Tensor, name: str) -> torch.Tensor:
    values = torch.as_tensor(values)
    if values.ndim != 1:
        raise MoeCompressError(f"{name} must be a 1-D tensor [E]; got shape {tuple(values.shape)}")
    if values.is_floating_point() and not torch.isfinite(values).all():
        raise MoeCompressError(f"{name} contain NaN or inf; recollect the calibration statistics")
    return values


def _check_ids(ids: Iterable[int], num_experts: int, name: str) -> set[int]:
    ids = {int(e) for e in ids}
    bad = sorted(e for e in ids if not 0 <= e < num_experts)
    if bad:
        raise MoeCompressError(f"{name} expert ids {bad} are outside [0, {num_experts})")
    return ids


def _check_expert_stack(gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor) -> tuple[int, int, int]:
    """Validate ``gate [E, I, H]`` (or None), ``up [E, I, H]``, ``down [E, H, I]``; return (E, I, H)."""
    if up.ndim != 3:
        raise MoeCompressError(f"up must be stacked [E, I, H]; got shape {tuple(up.shape)}")
    e, i, h = up.shape
    if gate is not None and gate.shape != up.shape:
        raise MoeCompressError(f"gate shape {tuple(gate.shape)} differs from up {tuple(up.shape)}; both are [E, I, H]")
    if down.shape != (e, h, i):
        raise MoeCompressError(f"down must be [E, H, I] = {(e, h, i)}; got {tuple(down.shape)}")
    return e, i, h
