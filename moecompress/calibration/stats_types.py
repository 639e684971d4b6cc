"""Router and expert statistics as data: one MoE layer (:class:`LayerStats`), every MoE layer of a model
(:class:`RouterStats`), and their files.

Per MoE layer the statistics hold what the methods of ALGORITHMS.md need from the router and the
experts (collected by :func:`moecompress.calibration.collect.collect_stats`):

* ``expert_counts [E]``   top-k selections per expert (MC-MoE phi, frequency pruning, M-SMoE f_e);
* ``weight_sums [E]``     sum of the routing weight the model applies to each selected expert (MC-MoE w);
* ``prob_sums [E]``       sum of the router probabilities over ALL tokens (mean router probability);
* ``coactivation [E, E]`` tokens whose top-k holds both experts (diagonal = ``expert_counts``);
* ``router_gram [E, E]``  Gram matrix of the router-logit columns, so the cosine similarity of two
  experts' logit columns (M-SMoE grouping) streams over batches: cos = G_ij / sqrt(G_ii G_jj);
* ``reap_sum [E]``        sum over routed tokens of g_e(t) * ||f_e(t)||_2 (REAP saliency numerator;
  ``reap_scores`` = reap_sum / expert_counts);
* ``output_max [E]``      max |f_e(t)| over routed tokens, the expert's down_proj output before the
  routing weight, and where it occurred (calibration row, position, channel); the shared expert's max
  separately (super experts, reported as expert -1);
* ``domain_counts [D, E]`` top-k selections per calibration domain, when the rows carry domains.

Super experts and coverage are filled in by :mod:`moecompress.calibration.stats_analysis`.

Files: :meth:`RouterStats.save` writes ``stats.safetensors`` (tensors ``layer{i}.{name}``) and
``stats.json`` (version 1: model, calibration, per-layer summaries, super experts, coverage);
:meth:`RouterStats.load` reads them back.

Shape legend: E experts, D domains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moecompress.algorithms.routing_stats import cosine_from_gram, load_cv, safe_mean, uniform_share
from moecompress.analysis.super_experts import SuperExpert
from moecompress.errors import MoeCompressError

STATS_VERSION = 1
STATS_JSON = "stats.json"
STATS_TENSORS = "stats.safetensors"

# Per-layer tensors written to stats.safetensors, in this order.
_TENSOR_FIELDS = (
    "expert_counts",
    "weight_sums",
    "prob_sums",
    "coactivation",
    "router_gram",
    "router_similarity",
    "reap_sum",
    "reap_scores",
    "output_max",
    "output_max_where",
)


@dataclass
class LayerStats:
    """Statistics of one MoE layer (decoder layer index ``layer``); tensors on CPU.

    output_max_where [E, 3] int64: (calibration row, position, channel) of each expert's max |output|,
    -1 for an expert that received no token. domain_counts [D, E] (None without domains; rows follow
    ``RouterStats.domain_names``). shared_output_max: the shared expert's max |output| (None: no shared expert).
    """

    layer: int
    num_experts: int
    top_k: int
    tokens: int
    expert_counts: torch.Tensor  # [E] int64
    weight_sums: torch.Tensor  # [E] float64
    prob_sums: torch.Tensor  # [E] float64
    coactivation: torch.Tensor  # [E, E] int64
    router_gram: torch.Tensor  # [E, E] float64
    reap_sum: torch.Tensor  # [E] float64
    output_max: torch.Tensor  # [E] float64
    output_max_where: torch.Tensor  # [E, 3] int64
    shared_output_max: float | None = None
    domain_counts: torch.Tensor | None = None  # [D, E] int64

    @property
    def reap_scores(self) -> torch.Tensor:
        """REAP saliency [E]: mean over routed tokens of g_e(t) * ||f_e(t)||_2 (0 for unrouted experts)."""
        return safe_mean(self.reap_sum, self.expert_counts)

    @property
    def mean_probs(self) -> torch.Tensor:
        """Mean router probability of each expert over all tokens [E]."""
        return self.prob_sums / max(self.tokens, 1)

    @property
    def mean_weights(self) -> torch.Tensor:
        """Mean applied routing weight of each expert over the tokens routed to it [E]."""
        return safe_mean(self.weight_sums, self.expert_counts)

    @property
    def frequency(self) -> torch.Tensor:
        """Share of all top-k selections [E] (sums to 1; M-SMoE's usage frequency)."""
        total = self.expert_counts.sum().double()
        return self.expert_counts.double() / total if total > 0 else torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def load_ratio(self) -> torch.Tensor:
        """Selections relative to the uniform share tokens*k/E [E] (1 = exactly even load)."""
        share = uniform_share(self.tokens, self.top_k, self.num_experts)
        return self.expert_counts.double() / share if share > 0 else torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def router_similarity(self) -> torch.Tensor:
        """Cosine similarity of experts' router-logit columns over the calibration tokens [E, E]."""
        return cosine_from_gram(self.router_gram)

    @property
    def load_cv(self) -> float:
        return load_cv(self.expert_counts)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything tensor-valued, as written to stats.safetensors (without the layer prefix)."""
        out = {name: getattr(self, name) for name in _TENSOR_FIELDS}
        if self.shared_output_max is not None:
            out["shared_output_max"] = torch.tensor([self.shared_output_max], dtype=torch.float64)
        if self.domain_counts is not None:
            out["domain_counts"] = self.domain_counts
        return out

    def summary(self) -> dict:
        """The per-layer entry of stats.json."""
        return {
            "layer": self.layer,
            "tokens": self.tokens,
            "top_k": self.top_k,
            "num_experts": self.num_experts,
            "load_cv": self.load_cv,
            "expert_counts": self.expert_counts.tolist(),
            "weight_sums": self.weight_sums.tolist(),
            "mean_probs": self.mean_probs.tolist(),
            "reap_scores": self.reap_scores.tolist(),
            "output_max": self.output_max.tolist(),
            "output_max_where": self.output_max_where.tolist(),
            "shared_output_max": self.shared_output_max,
        }


@dataclass
class RouterStats:
    """Statistics of every MoE layer of a model over one calibration set.

    ``stats.layer(i).expert_counts`` etc. for decoder layer i (see :class:`LayerStats`).
    ``super_experts``, ``super_expert_criterion`` and ``coverage`` are filled in by
    :func:`~moecompress.calibration.stats_analysis.find_super_experts` and
    :func:`~moecompress.calibration.stats_analysis.compute_coverage` (and read back by :meth:`load`).
    """

    model: str
    family: str
    num_layers: int  # decoder layers in the model (MoE or not)
    calibration: dict
    layers: dict[int, LayerStats]
    domain_names: list[str] | None = None
    super_experts: list[SuperExpert] = field(default_factory=list)
    super_expert_criterion: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)
    seconds: float | None = None  # collection wall time (not saved: the files stay deterministic)

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.layers)

    def layer(self, index: int) -> LayerStats:
        if index not in self.layers:
            raise MoeCompressError(f"layer {index} has no MoE statistics; MoE layers: {self.moe_layers}")
        return self.layers[index]

    @property
    def output_max(self) -> dict[int, torch.Tensor]:
        return {i: s.output_max for i, s in self.layers.items()}

    @property
    def shared_output_max(self) -> dict[int, float]:
        return {i: s.shared_output_max for i, s in self.layers.items() if s.shared_output_max is not None}

    @property
    def load_cv(self) -> float:
        """Mean over MoE layers of the per-layer expert-load coefficient of variation."""
        cvs = [s.load_cv for s in self.layers.values() if s.tokens > 0]
        return sum(cvs) / len(cvs) if cvs else 0.0

    def is_super_expert(self, layer: int, expert: int) -> bool:
        return any(s.layer == layer and s.expert == expert for s in self.super_experts)

    # -- files ----------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "version": STATS_VERSION,
            "model": self.model,
            "family": self.family,
            "num_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "calibration": self.calibration,
            "domains": self.domain_names,
            "load_cv": self.load_cv,
            "layers": [self.layers[i].summary() for i in self.moe_layers],
            "super_experts": [{"layer": s.layer, "expert": s.expert, "max_abs": s.max_abs} for s in self.super_experts],
            "super_expert_criterion": self.super_expert_criterion,
            "coverage": self.coverage,
        }

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``stats.safetensors`` and ``stats.json`` into ``folder`` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"layer{i}.{name}": t.contiguous() for i in self.moe_layers for name, t in self.layers[i].tensors().items()
        }
        save_file(tensors, str(folder / STATS_TENSORS), metadata={"format": f"moecompress-stats-v{STATS_VERSION}"})  # one key: safetensors writes a multi-key metadata map in random order
        (folder / STATS_JSON).write_text(json.dumps(self.to_json(), indent=1))
        return folder / STATS_JSON, folder / STATS_TENSORS

    @classmethod
    def load(cls, folder: str | Path) -> RouterStats:
        """Read a folder written by :meth:`save`; one-line MoeCompressError for anything missing or invalid."""
        folder = Path(folder)
        meta = _read_stats_json(folder)
        tensors = _read_stats_tensors(folder)
        layers = {}
        for entry in meta["layers"]:
            i = int(entry["layer"])
            layers[i] = _layer_from_tensors(i, entry, tensors, folder)
        stats = cls(
            model=meta.get("model", ""),
            family=meta.get("family", "unknown"),
            num_layers=int(meta.get("num_layers", max(layers, default=-1) + 1)),
            calibration=meta.get("calibration", {}),
            layers=layers,
            domain_names=meta.get("domains"),
            super_experts=[SuperExpert(int(s["layer"]), int(s["expert"]), float(s["max_abs"])) for s in meta.get("super_experts", [])],
            super_expert_criterion=meta.get("super_expert_criterion", {}),
            coverage=meta.get("coverage", {}),
        )
        return stats


def _read_stats_json(folder: Path) -> dict:
    path = folder / STATS_JSON
    if not path.is_file():
        raise MoeCompressError(f"{path} not found; run `moecompress stats MODEL --out {folder}` first")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoeCompressError(f"{path} is not valid JSON ({exc}); re-run `moecompress stats`") from None
    if not isinstance(meta, dict) or "version" not in meta:
        raise MoeCompressError(f"{path} is not a moecompress stats file (no version); re-run `moecompress stats`")
    if meta["version"] != STATS_VERSION:
        raise MoeCompressError(
            f"{path} has stats version {meta['version']}, this moecompress reads version {STATS_VERSION}; "
            "re-run `moecompress stats`"
        )
    if not isinstance(meta.get("layers"), list):
        raise MoeCompressError(f"{path} has no 'layers' list; re-run `moecompress stats`")
    return meta


def _read_stats_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / STATS_TENSORS
    if not path.is_file():
        raise MoeCompressError(f"{path} not found; re-run `moecompress stats` (stats.json alone is not enough)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MoeCompressError(f"cannot read {path}: {exc}; re-run `moecompress stats`") from None


def _layer_from_tensors(i: int, entry: dict, tensors: dict[str, torch.Tensor], folder: Path) -> LayerStats:
    def get(name: str, required: bool = True) -> torch.Tensor | None:
        key = f"layer{i}.{name}"
        if key not in tensors:
            if required:
                raise MoeCompressError(f"{folder / STATS_TENSORS} lacks {key}; the stats folder is incomplete, re-run")
            return None
        return tensors[key]

    counts = get("expert_counts")
    shared = get("shared_output_max", required=False)
    return LayerStats(
        layer=i,
        num_experts=int(counts.numel()),
        top_k=int(entry["top_k"]),
        tokens=int(entry["tokens"]),
        expert_counts=counts,
        weight_sums=get("weight_sums"),
        prob_sums=get("prob_sums"),
        coactivation=get("coactivation"),
        router_gram=get("router_gram"),
        reap_sum=get("reap_sum"),
        output_max=get("output_max"),
        output_max_where=get("output_max_where"),
        shared_output_max=None if shared is None else float(shared.reshape(-1)[0]),
        domain_counts=get("domain_counts", required=False),
    )
