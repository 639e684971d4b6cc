"""Per-expert mixed precision (MC-MoE PMQ with a global program): profile -> allocate -> quantize.

1. Profile (:mod:`moecompress.passes.profile`): phi, w and eps_{e,b} per MoE layer and expert, saved
   as ``profile.json`` + ``profile.safetensors`` in the stats folder (``--stats DIR``) so a second
   allocation with other budgets or options does not re-profile.
2. Protect super experts (ALGORITHMS.md section 4): pinned to the highest candidate width (``pin``)
   or kept unquantized (``keep``, width 16), excluded from the budget trade-off (``none`` disables).
   They come from ``DIR/stats.json`` when the stats folder has one (``moecompress stats``), else from
   the profile's own output_max (the same statistic and criterion). With ``granularity="layer"``
   the whole layer of a super expert is pinned, so every layer keeps one width (what vLLM loads).
3. Allocate with :func:`moecompress.quant.allocate.allocate_bits` (global budget by default,
   ``scope="layer"`` for the paper's per-layer budget).
4. Quantize with the quantize pass at the chosen widths (``QuantizeConfig.expert_bits``), through
   :func:`moecompress.api.quantize.write_mixed_precision`; the budget is then recomputed from the WRITTEN checkpoint's
   ``config.json`` and checked.

Shape legend: L MoE layers, E experts per layer, B candidate widths.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from moecompress.parallel import current as current_ranks
from moecompress.analysis.super_experts import SHARED_EXPERT, SuperExpert
from moecompress.errors import MoeCompressError
from moecompress.passes.profile import ExpertProfile, expert_weight_count, profile_experts
from moecompress.passes.quantize import QuantizeConfig
from moecompress.quant.allocate import (
    BUDGET_TOL,
    UNQUANTIZED_BITS,
    Allocation,
    AllocationConfig,
    allocate_bits,
    budget_bits_used,
    effective_bits,
)
from moecompress.quant.format import SUPPORTED_BITS
from moecompress.validation import check_choice, check_float, fail

log = logging.getLogger(__name__)

SUPER_EXPERT_MODES = ("pin", "keep", "none")
FORMATS = ("native", "compressed-tensors")
EXTRA_KEY = "mixed_precision"  # key of the allocation record in quantization_config.extra


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """``budget``: average stored bits per budgeted routed-expert weight, scale/zero overhead included
    (uniform 3-bit with group 128 symmetric = 3.125). The rest as :class:`AllocationConfig`."""

    budget: float
    bit_choices: tuple[int, ...] = (2, 3, 4, 8)
    allocation: str = "global"  # global | layer (AllocationConfig.scope)
    granularity: str = "expert"  # expert | layer
    alpha: float = 1.0
    beta: float = 1.5
    min_bits: int | None = None
    max_bits: int | None = None
    super_experts: str = "pin"  # pin | keep | none
    profile_method: str = "rtn"  # rtn | gptq
    export_format: str = "native"  # native | compressed-tensors

    def allocation_config(self, group_size: int, symmetric: bool, per_channel_k: int | None = None) -> AllocationConfig:
        group = per_channel_k if group_size == -1 and per_channel_k else group_size
        return AllocationConfig(
            budget=self.budget, bit_choices=tuple(self.bit_choices), scope=self.allocation,
            granularity=self.granularity, alpha=self.alpha, beta=self.beta, min_bits=self.min_bits,
            max_bits=self.max_bits, group_size=group, symmetric=symmetric,
        )

    def validate(self) -> None:
        check_float("--bits-budget", self.budget, 0.0, low_open=True,
                    expected="a finite number > 0 (average stored bits per routed-expert weight, e.g. 2.5)")
        widths = ", ".join(str(b) for b in SUPPORTED_BITS)
        choices = self.bit_choices
        if not isinstance(choices, (tuple, list)) or not choices:
            fail("--bit-choices", f"a non-empty comma-separated list of widths from {widths}", choices)
        for b in choices:
            check_choice("--bit-choices", b, SUPPORTED_BITS, f"widths from {widths}")
        if len(set(choices)) != len(choices):
            fail("--bit-choices", "a list of distinct widths (each width once)", ",".join(str(b) for b in choices))
        check_choice("--allocation", self.allocation, ("global", "layer"))
        check_choice("--granularity", self.granularity, ("expert", "layer"))
        check_float("--alpha", self.alpha, 0.0)
        check_float("--beta", self.beta, 0.0)
        for option, b in (("--min-bits", self.min_bits), ("--max-bits", self.max_bits)):
            if b is not None:
                check_choice(option, b, SUPPORTED_BITS, f"one of {widths}")
        if self.min_bits is not None and self.max_bits is not None and self.min_bits > self.max_bits:
            fail("--min-bits", f"<= --max-bits ({self.max_bits})", self.min_bits)
        lo, hi = self.min_bits or 0, self.max_bits or UNQUANTIZED_BITS
        if not any(lo <= b <= hi for b in choices):
            fail("--bit-choices", f"a list with at least one width within --min-bits {self.min_bits} and --max-bits {self.max_bits}",
                 ",".join(str(b) for b in choices))
        if self.super_experts not in SUPER_EXPERT_MODES:
            raise MoeCompressError(f"--super-experts must be one of {', '.join(SUPER_EXPERT_MODES)}, got {self.super_experts!r}")
        if self.profile_method not in ("rtn", "gptq"):
            raise MoeCompressError(f"--profile-method must be rtn or gptq, got {self.profile_method!r}")
        if self.export_format not in FORMATS:
            raise MoeCompressError(f"--format must be one of {', '.join(FORMATS)}, got {self.export_format!r}")
        if self.export_format == "compressed-tensors":
            if self.granularity != "layer":
                raise MoeCompressError(
                    "--format compressed-tensors needs one width per MoE layer (vLLM): add --granularity layer"
                )
            if self.super_experts == "keep":
                raise MoeCompressError(
                    "--super-experts keep leaves experts unquantized, which vLLM cannot load from compressed-tensors; "
                    "use --super-experts pin or none"
                )
        self.allocation_config(128, True)  # the allocator's own checks (widths, scope, alpha, ...)

    @property
    def protected_width(self) -> int | None:
        """The width super experts get: the highest allowed candidate, or None (unquantized) for keep."""
        if self.super_experts == "keep":
            return None
        return self.allocation_config(128, True).allowed_widths()[-1]


@dataclass
class MixedPrecisionPlan:
    """An allocation mapped back to decoder layers."""

    moe_layers: list[int]  # decoder index of each MoE layer, in allocation order
    allocation: Allocation
    protected: list[SuperExpert]  # routed super experts that were pinned (shared ones are only reported)
    shared_super_experts: list[SuperExpert]
    pinned: dict[tuple[int, int], int | None]  # (decoder layer, expert) -> width (None = unquantized)
    seconds: float

    @property
    def expert_bits(self) -> dict[int, list[int]]:
        """Decoder layer -> per-expert widths (16 = unquantized), as ``QuantizeConfig.expert_bits``."""
        return {layer: list(row) for layer, row in zip(self.moe_layers, self.allocation.bits)}

    def as_json(self) -> dict:
        return {
            "moe_layers": self.moe_layers,
            **self.allocation.as_json(),
            "protected": [{"layer": s.layer, "expert": s.expert, "max_abs": s.max_abs} for s in self.protected],
            "shared_super_experts": [{"layer": s.layer, "max_abs": s.max_abs} for s in self.shared_super_experts],
            "pinned": [{"layer": l, "expert": e, "bits": UNQUANTIZED_BITS if b is None else b} for (l, e), b in sorted(self.pinned.items())],
        }  # no timing: this record goes into config.json, whose bytes depend only on the inputs and seed


def check_budget_feasible(mp: MixedPrecisionConfig, group_size: int, symmetric: bool) -> None:
    """Fail before profiling when even the narrowest allowed width exceeds the budget (the allocator
    checks again; this only saves the sweep). Per-channel groups are checked at the first width."""
    if group_size <= 0:
        return
    narrowest = mp.allocation_config(group_size, symmetric).allowed_widths()[0]
    need = effective_bits(narrowest, group_size, symmetric)
    if need > mp.budget + BUDGET_TOL:
        raise MoeCompressError(
            f"budget {mp.budget:g} bits is infeasible: every expert at {narrowest} bits already stores {need:.4f} bits "
            f"per weight with group {group_size}; raise the budget or allow narrower widths"
        )


def super_expert_pins(
    super_experts: list[SuperExpert],
    moe_layers: list[int],
    experts_per_layer: list[int],
    mode: str,
    width: int | None,
    whole_layer: bool,
) -> dict[tuple[int, int], int | None]:
    """(decoder layer, expert) -> pinned width for the routed super experts (shared ones are skipped).

    ``whole_layer``: pin every expert of a super expert's layer (layer granularity keeps one width
    per layer). ``mode == "none"``: no pins."""
    if mode == "none":
        return {}
    sizes = dict(zip(moe_layers, experts_per_layer))
    pins: dict[tuple[int, int], int | None] = {}
    for s in super_experts:
        if s.expert == SHARED_EXPERT or s.layer not in sizes:
            continue
        experts = range(sizes[s.layer]) if whole_layer else [s.expert]
        for e in experts:
            pins[(s.layer, e)] = width
    return pins


def plan_allocation(
    profile: ExpertProfile,
    mp: MixedPrecisionConfig,
    group_size: int,
    symmetric: bool,
    super_experts: list[SuperExpert],
) -> MixedPrecisionPlan:
    """Protect the super experts and solve the allocation over the profile."""
    start = time.perf_counter()
    layers = profile.moe_layers
    if not layers:
        raise MoeCompressError("the profile has no MoE layers; re-profile the model")
    acfg = mp.allocation_config(group_size, symmetric)
    errors = profile.errors_for(acfg.bit_choices)
    sizes = [profile.layers[i].num_experts for i in layers]
    routed = [s for s in super_experts if s.expert != SHARED_EXPERT]
    pins = super_expert_pins(routed, layers, sizes, mp.super_experts, mp.protected_width, mp.granularity == "layer")
    position = {layer: l for l, layer in enumerate(layers)}
    allocation = allocate_bits(
        [profile.layers[i].freq for i in layers],
        [profile.layers[i].weight_mass for i in layers],
        errors,
        [profile.layers[i].params for i in layers],
        acfg,
        pinned={(position[l], e): w for (l, e), w in pins.items()},
    )
    protected = [] if mp.super_experts == "none" else routed
    shared = [s for s in super_experts if s.expert == SHARED_EXPERT]
    return MixedPrecisionPlan(layers, allocation, protected, shared, pins, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# Reading widths back from a written native checkpoint
# --------------------------------------------------------------------------------------------------


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def checkpoint_expert_widths(folder: str | Path) -> tuple[list[int], list[list[int]], list[list[float]], dict]:
    """From a native checkpoint's config.json: (decoder layer per MoE layer, widths [L][E], weight
    counts [L][E], quantization_config)."""
    path = Path(folder) / "config.json"
    try:
        qc = json.loads(path.read_text())["quantization_config"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise MoeCompressError(f"cannot read quantization_config from {path} ({exc})") from None
    rows = []
    for name, d in qc.get("modules", {}).items():
        if d.get("type") != "experts":
            continue
        found = _LAYER_INDEX.search(f".{name}.")
        if found is None:
            raise MoeCompressError(f"{path}: cannot tell the layer of experts module {name!r}")
        count = expert_weight_count(d["hidden_size"], d["intermediate_size"], d.get("has_gate", True))
        rows.append((int(found.group(1)), [int(b) for b in d["bits"]], [float(count)] * len(d["bits"])))
    rows.sort()
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], qc


def checkpoint_budget(folder: str | Path) -> float:
    """Average effective bits over the budgeted routed-expert weights, recomputed from the written
    checkpoint: widths from ``quantization_config.modules[...]["bits"]``, the budgeted mask from our
    allocation record in ``quantization_config.extra`` (all experts when there is none)."""
    layers, bits, params, qc = checkpoint_expert_widths(folder)
    record = qc.get("extra", {}).get(EXTRA_KEY, {})
    budgeted = record.get("budgeted") or None
    if budgeted is not None and record.get("moe_layers") != layers:
        raise MoeCompressError(f"{folder}: the allocation record covers layers {record.get('moe_layers')}, the checkpoint {layers}")
    return budget_bits_used(bits, params, int(qc.get("group_size", 128)), bool(qc.get("symmetric", True)), budgeted)


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


@dataclass
class MixedPrecisionResult:
    profile: ExpertProfile
    plan: MixedPrecisionPlan
    profile_reused: bool
    budget_written: float  # recomputed from the written native checkpoint
    average_bits_all: float  # over every routed expert, pinned ones included
    details: dict = field(default_factory=dict)


def load_or_profile(
    model_folder: str | Path,
    stats_dir: str | Path | None,
    qcfg: QuantizeConfig,
    mp: MixedPrecisionConfig,
    input_ids: torch.Tensor | None,
    calibration: dict,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ExpertProfile, bool]:
    """The profile from ``stats_dir`` when it has one matching these settings, else a fresh sweep
    (saved into ``stats_dir`` when given). -> (profile, reused)."""
    if stats_dir is not None and ExpertProfile.exists(stats_dir):
        profile = ExpertProfile.load(stats_dir)
        _check_profile_matches(profile, model_folder, qcfg, mp, stats_dir)
        log.info("reusing the profile in %s", stats_dir)
        return profile, True
    if input_ids is None:
        raise MoeCompressError("profiling for --bits-budget needs calibration data; pass --calib (or --stats DIR with a saved profile)")
    profile = profile_experts(model_folder, input_ids, qcfg, tuple(mp.bit_choices), mp.profile_method, calibration, batch_size, progress)
    if stats_dir is not None and current_ranks().is_writer:  # under torchrun, one rank writes it
        profile.save(stats_dir)
    return profile, False


def _check_profile_matches(profile: ExpertProfile, model_folder, qcfg: QuantizeConfig, mp: MixedPrecisionConfig, folder) -> None:
    from moecompress.model.loading import LayerwiseModel

    where = f"the profile in {folder}"
    if profile.group_size != qcfg.group_size or profile.symmetric != qcfg.symmetric:
        raise MoeCompressError(
            f"{where} was measured with group {profile.group_size}, symmetric={profile.symmetric}; this run uses group "
            f"{qcfg.group_size}, symmetric={qcfg.symmetric}: use another --stats folder to re-profile"
        )
    if profile.method != mp.profile_method:
        raise MoeCompressError(f"{where} was measured with --profile-method {profile.method}; pass it or use another --stats folder")
    profile.errors_for(tuple(mp.bit_choices))  # raises when a requested width was not measured
    view = LayerwiseModel(model_folder).view
    shapes = {i: b.num_experts for i, b in view.blocks.items()}
    if shapes != {i: p.num_experts for i, p in profile.layers.items()}:
        raise MoeCompressError(f"{where} is for another model (MoE layers or expert counts differ); use another --stats folder")


def super_experts_for(profile: ExpertProfile, stats_dir: str | Path | None) -> tuple[list[SuperExpert], str]:
    """Super experts from ``stats_dir/stats.json`` when present, else from the profile. -> (list, source)."""
    if stats_dir is not None and (Path(stats_dir) / "stats.json").is_file():
        from moecompress.calibration.stats_types import RouterStats

        stats = RouterStats.load(stats_dir)
        # Statistics of another model (e.g. the one before pruning or merging) name other expert ids.
        shapes = {i: p.num_experts for i, p in profile.layers.items()}
        if {i: layer.num_experts for i, layer in stats.layers.items()} != shapes:
            raise MoeCompressError(
                f"the statistics in {stats_dir} describe other experts than this model stores (MoE layers or expert counts "
                "differ; e.g. they were collected before pruning or merging); collect statistics on this model"
            )
        # The folder's name, not its path: a pipeline's statistics live in a staging folder of random
        # name, and the checkpoint's config must be the same bytes run after run.
        return list(stats.super_experts), f"{Path(stats_dir).name}/stats.json"
    return profile.super_experts(), "the profiling sweep's output_max"


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def mixed_precision_sections(out: Path, mp: MixedPrecisionConfig, res: MixedPrecisionResult) -> list[str]:
    """Markdown lines for report.md: allocation summary, width heatmap, protected experts, widths table."""
    from moecompress import report

    plan, alloc = res.plan, res.plan.allocation
    width = max(len(r) for r in alloc.bits)
    grid = torch.full((len(plan.moe_layers), width), float("nan"), dtype=torch.float64)
    for r, row in enumerate(alloc.bits):
        grid[r, : len(row)] = torch.tensor(row, dtype=torch.float64)
    png = report.heatmap(
        grid, out / "expert_bits.png", "Bits per expert", "expert", "layer",
        yticklabels=[str(i) for i in plan.moe_layers], colorbar_label="bits (16 = unquantized)",
        categories=sorted({b for row in alloc.bits for b in row}),  # every width present, 16 included
    )
    prof = res.profile
    lines = ["## Mixed precision", ""]
    lines += [
        f"- **budget**: {mp.budget:g} average bits per budgeted routed-expert weight (scale/zero overhead included)",
        f"- **budget used (recomputed from the written config.json)**: {res.budget_written:.4f}",
        f"- **average over all routed experts (pinned included)**: {res.average_bits_all:.4f}",
        f"- **allocation**: {mp.allocation}, granularity {mp.granularity}, widths {list(mp.bit_choices)}, "
        f"alpha {mp.alpha:g}, beta {mp.beta:g}; solver status {alloc.status}",
        f"- **objective** (sum of phi^a w^b eps^a over budgeted experts): {alloc.objective:.6g}",
        f"- **profile**: {prof.method}, {'reused from --stats' if res.profile_reused else 'measured'}",
        f"- **super experts** ({mp.super_experts}, from {res.details.get('super_expert_source', '?')}): "
        + (", ".join(f"layer {s.layer} expert {s.expert} (max |out| {s.max_abs:.4g})" for s in plan.protected) or "none"),
    ]
    if plan.shared_super_experts:
        lines.append("- **shared super experts** (reported only; their width is --shared-expert-bits): "
                     + ", ".join(f"layer {s.layer}" for s in plan.shared_super_experts))
    if plan.pinned:
        lines.append("- **pinned**: " + ", ".join(f"({l}, {e}) -> {UNQUANTIZED_BITS if b is None else b}" for (l, e), b in sorted(plan.pinned.items())))
    counts = {}
    for row in alloc.bits:
        for b in row:
            counts[b] = counts.get(b, 0) + 1
    lines.append("- **experts per width**: " + ", ".join(f"{b} bits: {n}" for b, n in sorted(counts.items())))
    lines += ["", report.image_markdown(png, out / "report.md", "bits per expert"), ""]
    headers = ["layer"] + [str(e) for e in range(width)]
    rows = [[layer] + list(row) + [""] * (width - len(row)) for layer, row in zip(plan.moe_layers, alloc.bits)]
    lines += ["### Width of every expert", "", report.markdown_table(headers, rows), ""]
    return lines


def compressed_tensors_budget(folder: str | Path, plan: MixedPrecisionPlan | None = None) -> float:
    """The budget recomputed from a compressed-tensors checkpoint (each expert's scheme width and
    group, its weight count from ``weight_shape``), over ``plan``'s budgeted experts (all when None)."""
    from moecompress.export.lint import expert_widths
    from moecompress.quant.allocate import effective_bits

    widths = expert_widths(folder)
    paths = sorted(widths, key=lambda p: int(_LAYER_INDEX.search(f".{p}.").group(1)))
    used = total = 0.0
    for l, path in enumerate(paths):
        for e, w in enumerate(widths[path]):
            if plan is not None and not plan.allocation.budgeted[l][e]:
                continue
            used += w.params * effective_bits(w.bits, w.group_size, w.symmetric)
            total += w.params
    if total <= 0:
        raise MoeCompressError(f"{folder}: no budgeted routed-expert weights found")
    return used / total
