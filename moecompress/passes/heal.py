"""Heal: a short knowledge distillation of a compressed model (student) towards its original (teacher).

After pruning, merging or compressed experts, a few hundred optimizer steps on calibration text
recover part of the quality lost (reports/heal.md). What trains (``HealConfig.train``; everything else stays frozen,
embeddings and the output head always):

* ``ces``     -- the compressed-experts blocks' scaling vectors (ALGORITHMS.md section 7);
* ``routers`` -- each MoE block's router weight (and bias): the router must learn to route over the
                 experts that are left;
* ``lora``    -- a rank-r adapter on every 3-D fused expert parameter (``gate_up_proj`` / ``down_proj``,
                 per expert: W_e + B_e A_e). Adapters are MERGED into the weights at the end, so the output
                 has exactly the input's structure and format (a pruned standard checkpoint stays one).
                 Inside a compressed-experts block too: the block computes its experts through
                 ``ExpertsView``, whose slices keep the autograd graph, so the adapters (substituted for
                 the fused weights by ``functional_call``) get their gradient there as anywhere else;
* ``norms``   -- the RMSNorm / LayerNorm weights of the decoder layers.

Each kind may have its own Adam learning rate (``lora_lr``, ``router_lr``, ``norm_lr``; default ``lr``):
a ces scaling vector near 1 needs steps of ~1e-2 to move, a router at that step makes things worse
(reports/heal.md).

Two modes:

* ``blockwise`` (default, for models of any size). Layer by layer: the teacher's layer i runs on the
  teacher's own input (teacher inputs propagated through the teacher), the student's layer i gets the
  STUDENT's propagated input (the output of its already-healed layers 0..i-1) and is trained to produce
  the teacher layer's output: normalised MSE ``||S_i(x_s) - T_i(x_t)||^2 / ||T_i(x_t)||^2``. Student inputs,
  not teacher inputs, because that is what the layer sees at inference: each layer learns to correct the
  drift accumulated before it (the sequential calibration the driver uses for every pass). Hidden states
  of the calibration tokens live on disk as memory-mapped float32 arrays [N, L, H] (one teacher and one
  student array per layer boundary, the previous ones deleted), minibatches are read from the map, and
  only one teacher and one student decoder layer are in memory at a time. The layers' keyword arguments
  (causal mask, rotary embeddings) are captured once per batch size from the model's own forward on
  dummy ids: the calibration windows are full-length and unpadded, so they do not depend on the tokens.
* ``end-to-end`` (when the whole student fits): the teacher's top-K log-probabilities at temperature T
  are computed once (the teacher is then released) and stored; all selected parameters of the whole
  student train jointly on ``T^2 * KL(teacher_T || student_T)`` over {top-K, tail} (``distill_ces.coarse_kl``).

A held-back slice of the calibration sequences (seeded, ``holdout_fraction``) is never trained on: its
loss before and after is reported, and a layer (blockwise) whose held-back loss did not improve keeps its
original weights. That loss is measured with the adapters still separate (merging is exact), so nothing
has to be undone.

The whole-model guard (both modes) decides whether the healed model is written at all. Held-back
calibration text alone is not enough: it tells whether the student got closer to the teacher on the
CALIBRATION distribution, and calibration text (e.g. the built-in ``mixed`` set) can be far from what
the model is used on; a heal can then fit the calibration text better and the model's own distribution
worse (reports/heal.md: compressed experts healed blockwise lowered the held-back calibration KL and raised
held-out perplexity). So the guard also measures KL(teacher || student) on ``guard_samples`` sequences
sampled from the TEACHER (temperature 1, a seed derived from ``seed`` and never the training seed): text
from the distribution the model was trained to produce, with no held-out data involved, never trained on.
The healed model is kept only if its KL is lower than the unhealed student's on BOTH sets, each by more
than ``guard_z`` standard errors of the paired per-sequence decrease (``clearly_lower``: the same sequences
are scored before and after, so the noise that matters is the spread of the per-sequence differences; a
one-sided paired test on each set). Default z = 1: if healing changed nothing real, each set passes by
chance with probability ~0.16, and the two sets' sequences are drawn independently, so both pass with
~0.16^2 = 2.5%, the false-acceptance rate of a single 2-SE test; z = 2 on each set (0.05% jointly) rejected
heals that improved both sets by 11-16% on the testbed (reports/heal.md). Otherwise the unhealed student is
written, unchanged (``ModelGuard``). Blockwise: the guard sequences travel through the layers with the
calibration sequences (never trained on), the unhealed student is propagated on the held-back and guard
sequences too, and the final distributions come from the heads applied to the stored final hidden states.
End-to-end: the teacher's targets are computed for the guard sequences too. Cost: sampling
``guard_samples x seqlen`` tokens with the whole teacher once (the same step ``--calib sample`` takes;
``guard_samples 0`` turns it off for a teacher that cannot be loaded whole, the guard then checks the
held-back calibration sequences only), plus a forward of those sequences.

Training checkpoints (trainable tensors, Adam state, step) are written every ``checkpoint_every`` steps
and after every finished layer into a work folder the caller owns; a rerun with the same work folder
continues where the last one stopped and gives the same bytes as an uninterrupted run.

The math (normalised MSE, LoRA delta and merge, the resumable Adam loop in ``distill_ces``) is plain
tensor functions; the rest is model plumbing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from moecompress.errors import MoeCompressError
from moecompress.model.driver import capture_layer_inputs
from moecompress.model.view import is_experts_module
from moecompress.passes.distill_ces import (
    TeacherTargets,
    coarse_kl,
    resumable_adam,
    split_sequences,
    teacher_targets,
)
from moecompress.validation import check_choice, check_float, check_int

MODES = ("blockwise", "end-to-end")
SCHEDULES = ("constant", "cosine")
WARMUP_FRACTION = 0.05
GUARD_SEED_OFFSET = 10007  # guard samples never share the seed of --calib sample's training text
TRAINABLE = ("ces", "routers", "lora", "norms")
LORA_TARGETS = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")  # 3-D fused expert parameters

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealConfig:
    mode: str = "blockwise"
    train: tuple[str, ...] | None = None  # None: every kind the student has (ces only if it has compressed experts)
    steps: int = 100  # per layer (blockwise) or in all (end-to-end)
    lr: float = 1e-3
    lora_lr: float | None = None  # the LoRA adapters' learning rate (None: lr)
    router_lr: float | None = None  # the routers' learning rate (None: lr)
    norm_lr: float | None = None  # the norms' learning rate (None: lr)
    batch_size: int = 8  # sequences per step
    lora_rank: int = 8
    temperature: float = 1.0  # end-to-end
    top_k: int = 1024  # teacher log-probs kept per token (end-to-end targets; blockwise's whole-model check)
    holdout_fraction: float = 0.1
    checkpoint_every: int = 0
    seed: int = 0
    guard_samples: int = 16  # teacher-sampled sequences the whole-model guard also checks (0: held-back calibration only)
    guard_z: float = 1.0  # keep the healed model only if its KL drops by more than this many standard errors, on both sets
    schedule: str = "constant"  # learning rate: constant, or cosine (linear warmup over the first 5% of steps, cosine to 0)

    def validate(self) -> None:
        check_choice("--mode", self.mode, MODES)
        if self.train is not None:
            if not self.train:
                raise MoeCompressError(f"--train is empty; name one or more of {', '.join(TRAINABLE)}")
            for t in self.train:
                check_choice("--train", t, TRAINABLE)
        check_int("--steps", self.steps, 1)
        check_float("--lr", self.lr, 0.0, None, low_open=True)
        for flag, value in (("--lora-lr", self.lora_lr), ("--router-lr", self.router_lr), ("--norm-lr", self.norm_lr)):
            if value is not None:
                check_float(flag, value, 0.0, None, low_open=True)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--lora-rank", self.lora_rank, 1)
        check_float("--temperature", self.temperature, 0.0, None, low_open=True)
        check_int("--top-k", self.top_k, 1)
        check_float("--holdout-fraction", self.holdout_fraction, 0.0, 0.5)
        check_int("--checkpoint-every", self.checkpoint_every, 0)
        check_int("--seed", self.seed, 0)
        check_int("--guard-samples", self.guard_samples, 0)
        check_float("--guard-z", self.guard_z, 0.0, None)
        check_choice("--schedule", self.schedule, SCHEDULES)


# --------------------------------------------------------------------------------------------------
# The math (tensor in, tensor out)
# --------------------------------------------------------------------------------------------------


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 / ||target||^2 over the whole batch (scale-free across layers)."""
    return (pred.float() - target.float()).pow(2).sum() / target.float().pow(2).sum().clamp_min(1e-30)


def lora_init(shape: torch.Size, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter for a stacked weight [E, X, Y]: A [E, r, Y] ~ N(0, 1/Y), B [E, X, r] = 0 (starts as a no-op)."""
    e, x, y = shape
    a = torch.randn(e, rank, y, generator=generator) / y**0.5
    return a, torch.zeros(e, x, rank)


def lora_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B [E, X, r] @ A [E, r, Y] -> [E, X, Y], per expert."""
    return torch.bmm(b, a)


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The merged weight W + B A: the SAME expression the adapter forward uses, so merging is exact."""
    return weight + lora_delta(a, b)


def distill_loss(targets: TeacherTargets, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean T^2 * KL(teacher_T || student_T) per token; ``targets`` were made from teacher logits / T."""
    return coarse_kl(targets, student_logits / temperature).mean() * temperature**2


def clearly_lower(before: torch.Tensor, after: torch.Tensor, z: float) -> bool:
    """Whether the per-sequence losses ``after`` are lower than ``before`` (same sequences) beyond noise:
    the mean paired decrease exceeds ``z`` standard errors of that mean (a one-sided paired test). With one
    sequence the standard error is unknown and only a decrease is asked; with none there is nothing to
    check (True)."""
    d = (before.double() - after.double()).flatten()
    if d.numel() == 0:
        return True
    se = d.std(unbiased=True) / d.numel() ** 0.5 if d.numel() > 1 else torch.zeros((), dtype=torch.float64)
    return bool(d.mean() > z * se)


def guard_keeps(calib: tuple[torch.Tensor, torch.Tensor], sampled: tuple[torch.Tensor, torch.Tensor], z: float) -> bool:
    """The whole-model guard: keep the healed model only if it is clearly closer to the teacher on the
    held-back calibration sequences AND on the teacher-sampled ones ((before, after) per-sequence KL each)."""
    return clearly_lower(*calib, z) and clearly_lower(*sampled, z)


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """Learning-rate multiplier at (0-based) ``step``: 1 (constant), or a linear warmup over the first
    ``WARMUP_FRACTION`` of the steps then a cosine decay to 0 (a function of the step only: resumable)."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, int(round(WARMUP_FRACTION * steps)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + float(np.cos(np.pi * progress)))


# --------------------------------------------------------------------------------------------------
# What trains
# --------------------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


@dataclass
class Trainables:
    """The trainable tensors of a module (a decoder layer or a whole model), by parameter name.

    ``direct``: the module's own parameters trained in place (ces, router, norms). ``lora``: base
    parameter name -> (A, B) adapters; the forward uses ``overrides()`` (W + B A) through
    ``torch.func.functional_call``, the module itself is untouched until ``merge``.
    """

    module: nn.Module
    direct: dict[str, nn.Parameter] = field(default_factory=dict)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)  # kind -> tensors selected
    direct_kind: dict[str, str] = field(default_factory=dict)  # direct tensor name -> its kind (ces, routers, norms)

    def _direct_groups(self, lr: float, kind_lr: dict[str, float | None] | None) -> list[tuple[float, list[str]]]:
        """The direct tensors' names grouped by learning rate (a kind's own lr from ``kind_lr``, else ``lr``),
        groups in order of first appearance among the sorted names: one group, sorted, when no kind has its own."""
        groups: dict[float, list[str]] = {}
        for n in sorted(self.direct):
            own = (kind_lr or {}).get(self.direct_kind.get(n, ""))
            groups.setdefault(lr if own is None else own, []).append(n)
        return list(groups.items())

    def parameters(self, lr: float = 1.0, kind_lr: dict[str, float | None] | None = None) -> list[torch.Tensor]:
        """Every trained tensor, in a fixed order (Adam's state is saved and restored by position): the
        order of ``param_groups(lr, ..., kind_lr)``."""
        params = [self.direct[n] for _lr, names in self._direct_groups(lr, kind_lr) for n in names]
        for n in sorted(self.lora):
            params += list(self.lora[n])
        return params

    def param_groups(self, lr: float, lora_lr: float | None, kind_lr: dict[str, float | None] | None = None) -> list[dict]:
        """Adam param groups in ``parameters(lr, kind_lr)`` order: the direct tensors at ``lr`` (or their kind's
        own lr in ``kind_lr``, e.g. ``{"routers": 1e-4}``), the adapters at ``lora_lr`` (default ``lr``). Adapters
        and routers need a smaller step: Adam moves every entry by ~lr per step whatever its gradient, B A sums
        r such entries into each weight, and a router's logits move with every entry of its weight, while a ces
        scaling vector near 1 needs steps of ~1e-2 to move at all."""
        groups = [{"params": [self.direct[n] for n in names], "lr": g_lr} for g_lr, names in self._direct_groups(lr, kind_lr)]
        lora = [t for n in sorted(self.lora) for t in self.lora[n]]
        return groups + ([{"params": lora, "lr": lr if lora_lr is None else lora_lr}] if lora else [])

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def overrides(self) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        return {n: merge_lora(params[n], a, b) for n, (a, b) in self.lora.items()}

    def __call__(self, *args, **kwargs):
        """The module's forward with the adapters applied."""
        return functional_call(self.module, self.overrides(), args, kwargs) if self.lora else self.module(*args, **kwargs)

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"direct.{n}": p.detach().clone() for n, p in self.direct.items()}
        for n, (a, b) in self.lora.items():
            out[f"lora_a.{n}"], out[f"lora_b.{n}"] = a.detach().clone(), b.detach().clone()
        return out

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in self.direct.items():
            p.copy_(state[f"direct.{n}"])
        for n, (a, b) in self.lora.items():
            a.copy_(state[f"lora_a.{n}"])
            b.copy_(state[f"lora_b.{n}"])

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapters into the module's weights (exactly the tensors the adapter forward used)."""
        params = dict(self.module.named_parameters())
        for n, (a, b) in self.lora.items():
            params[n].copy_(merge_lora(params[n], a, b))
        self.lora = {}

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)


def select_trainables(module: nn.Module, router_paths: list[str], what: tuple[str, ...], lora_rank: int,
                      generator: torch.Generator, prefix: str = "") -> Trainables:
    """Freeze ``module`` and pick its trainable tensors.

    ``router_paths``: module paths (relative to ``module``) of its routers. ``prefix``: only names under it
    (e.g. ``model.layers.`` so end-to-end training never picks the embeddings or the head).
    """
    for p in module.parameters():
        p.requires_grad_(False)
    found = Trainables(module)
    named = dict(module.named_modules())

    def pick(kind: str, name: str, param: nn.Parameter) -> None:
        if param.is_floating_point() and name.startswith(prefix) and name not in found.direct:
            found.direct[name] = param
            found.direct_kind[name] = kind
            found.kinds[kind] = found.kinds.get(kind, 0) + 1

    if "ces" in what:
        for name, p in module.named_parameters():
            if name == "ces" or name.endswith(".ces"):
                pick("ces", name, p)
    if "routers" in what:
        for path in router_paths:
            for pname, p in named[path].named_parameters(recurse=False):
                pick("routers", f"{path}.{pname}", p)
    if "norms" in what:
        for mname, sub in named.items():
            if _is_norm(sub):
                for pname, p in sub.named_parameters(recurse=False):
                    pick("norms", f"{mname}.{pname}" if mname else pname, p)
    if "lora" in what:
        for mname, sub in sorted(named.items()):
            if not is_experts_module(sub):
                continue
            for pname in LORA_TARGETS:
                p = getattr(sub, pname, None)
                name = f"{mname}.{pname}" if mname else pname
                if isinstance(p, nn.Parameter) and p.dim() == 3 and name.startswith(prefix):
                    a, b = lora_init(p.shape, lora_rank, generator)
                    found.lora[name] = (a.requires_grad_(True), b.requires_grad_(True))
                    found.kinds["lora"] = found.kinds.get("lora", 0) + 1
    for p in found.direct.values():
        if p.dtype != torch.float32:
            raise MoeCompressError("heal trains in float32; the student was loaded in another dtype (a bug in moecompress)")
        p.requires_grad_(True)
    return found


def available_kinds(module: nn.Module, router_paths: list[str]) -> set[str]:
    """The kinds of trainable tensors ``module`` has (works on a ``meta`` skeleton: nothing is allocated)."""
    kinds = set()
    if any(n == "ces" or n.endswith(".ces") for n, _ in module.named_parameters()):
        kinds.add("ces")
    named = dict(module.named_modules())
    if any(path in named and any(True for _ in named[path].parameters(recurse=False)) for path in router_paths):
        kinds.add("routers")
    for mname, sub in named.items():
        if _is_norm(sub) and any(True for _ in sub.parameters(recurse=False)):
            kinds.add("norms")
        fused = any(isinstance(getattr(sub, t, None), nn.Parameter) and getattr(sub, t).dim() == 3 for t in LORA_TARGETS)
        if is_experts_module(sub) and fused:
            kinds.add("lora")
    return kinds


def check_trainables(kinds: set[str], what: tuple[str, ...] | None, where: str) -> None:
    """Explicitly requested kinds must exist; something must train at all."""
    if what is not None:
        missing = [k for k in what if k not in kinds]
        if missing:
            hint = {"ces": "the student has no compressed experts (run compress-experts first)",
                    "lora": "the student has no fused expert weights LoRA can train (a quantized student? heal before quantizing)",
                    "routers": "the student has no MoE router", "norms": "the student has no norm layers"}
            raise MoeCompressError(f"--train {missing[0]}: {hint[missing[0]]} ({where})")
    if not kinds.intersection(what or TRAINABLE):
        raise MoeCompressError(f"nothing to train in {where}; choose --train from {', '.join(TRAINABLE)}")


def default_train(has_ces: bool) -> tuple[str, ...]:
    return ("ces", "routers", "lora", "norms") if has_ces else ("routers", "lora", "norms")


@torch.no_grad()
def round_to_storage(trainables: Trainables, dtype: torch.dtype) -> None:
    """Round the trained tensors to the checkpoint's dtype now, so the loss "after" and the next layer's
    inputs are those of the weights that will really be written."""
    params = dict(trainables.module.named_parameters())
    for name in [*trainables.direct, *trainables.lora]:
        p = params[name]
        p.copy_(p.to(dtype).float())


# --------------------------------------------------------------------------------------------------
# Work folder: hidden states on disk, training checkpoints, state
# --------------------------------------------------------------------------------------------------


class HiddenStore:
    """Hidden states [N, L, H] float32 of the calibration tokens, one memory-mapped file per (kind, layer)."""

    def __init__(self, folder: Path, shape: tuple[int, int, int]):
        self.folder, self.shape = Path(folder), tuple(shape)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, layer: int) -> Path:
        return self.folder / f"{kind}-{layer:05d}.f32"

    def exists(self, kind: str, layer: int) -> bool:
        p = self.path(kind, layer)
        return p.is_file() and p.stat().st_size == 4 * int(np.prod(self.shape))

    def write(self, kind: str, layer: int, chunks) -> None:
        """Fill the array from ``chunks`` (an iterator of (start row, [b, L, H] tensor)); atomic rename at the end."""
        final = self.path(kind, layer)
        tmp = final.with_suffix(".tmp")
        mm = np.memmap(tmp, dtype=np.float32, mode="w+", shape=self.shape)
        for start, t in chunks:
            mm[start : start + t.shape[0]] = t.detach().float().numpy()
        mm.flush()
        del mm
        os.replace(tmp, final)

    def read(self, kind: str, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sequence ids) as a float32 tensor (a copy: the map stays on disk)."""
        mm = np.memmap(self.path(kind, layer), dtype=np.float32, mode="r", shape=self.shape)
        return torch.from_numpy(np.ascontiguousarray(mm[rows.numpy()]))

    def delete_before(self, layer: int) -> None:
        for p in self.folder.glob("*.f32"):
            if int(p.stem.rsplit("-", 1)[1]) < layer:
                p.unlink()


def save_atomically(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomically(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class Checkpointer:
    """Training checkpoints of one training run (a layer, or the end-to-end model) in the work folder."""

    def __init__(self, path: Path, trainables: Trainables, every: int):
        self.path, self.trainables, self.every = path, trainables, every

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=True)
        self.trainables.load_state(state["trainables"])
        return state

    def maybe_save(self, step: int, steps: int, optimizer, losses: list[float], extra: dict) -> None:
        if self.every and step % self.every == 0 and step < steps:
            save_atomically({"step": step, "trainables": self.trainables.state(), "optimizer": optimizer.state_dict(),
                             "losses": list(losses), **extra}, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def train(trainables: Trainables, batch_loss: Callable[[torch.Tensor], torch.Tensor], n_rows: int, cfg: HealConfig,
          seed: int, checkpointer: Checkpointer, extra: dict, on_step: Callable[[int], None] | None) -> list[float]:
    """``cfg.steps`` Adam steps (resumed from the checkpoint when there is one). Returns every step's loss."""
    resume = checkpointer.load()
    losses = list(resume["losses"]) if resume else []
    return resumable_adam(
        trainables.param_groups(cfg.lr, cfg.lora_lr, {"routers": cfg.router_lr, "norms": cfg.norm_lr}), batch_loss, n_rows, cfg.batch_size, cfg.steps, cfg.lr, seed,
        start_step=resume["step"] if resume else 0, optimizer_state=resume["optimizer"] if resume else None,
        losses=losses, lr_scale=lambda step: lr_factor(step, cfg.steps, cfg.schedule),
        after_step=lambda step, opt, ls: (checkpointer.maybe_save(step, cfg.steps, opt, ls, extra),
                                          on_step(step) if on_step else None),
    )


# --------------------------------------------------------------------------------------------------
# Block-wise healing
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerHealRecord:
    layer: int
    trained: dict  # kind -> tensors
    trained_params: int
    steps: int
    loss_first: float  # training loss of the first / last step (normalised MSE)
    loss_last: float
    heldout_before: float  # normalised MSE on the held-back calibration sequences
    heldout_after: float
    kept: bool  # False: the held-back loss did not improve, the layer keeps its weights
    seconds: float


def _chunks(n: int, batch: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch, n)) for s in range(0, n, batch)]


def _out(o) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


class LayerKwargs:
    """The decoder layers' keyword arguments (masks, rotary embeddings) per batch size, captured once from
    the model's own forward on dummy ids: with unpadded full-length windows they do not depend on the tokens."""

    def __init__(self, lm, seqlen: int, sizes: set[int]):
        lm.load_outer()
        try:
            self.by_size = {}
            for b in sorted(sizes):
                _, kwargs = capture_layer_inputs(lm, [torch.zeros(b, seqlen, dtype=torch.long)])
                self.by_size[b] = [kw[0] for kw in kwargs]
        finally:
            lm.release_outer()

    def __call__(self, layer: int, batch: int) -> dict:
        return self.by_size[batch][layer]


def _batch_sizes(counts: list[int], batch: int) -> set[int]:
    sizes = {batch}
    for n in counts:
        if n % batch:
            sizes.add(n % batch)
        if 0 < n < batch:
            sizes.add(n)
    return sizes


@torch.no_grad()
def _write_embeddings(lm, store: HiddenStore, kind: str, input_ids: torch.Tensor, batch: int) -> None:
    lm.load_outer()
    try:
        def chunks():
            for s, e in _chunks(input_ids.shape[0], batch):
                hidden, _ = capture_layer_inputs(lm, [input_ids[s:e]])
                yield s, hidden[0]
        store.write(kind, 0, chunks())
    finally:
        lm.release_outer()


@torch.no_grad()
def _propagate(layer_fn, store: HiddenStore, kind_in: str, kind_out: str, index: int, n: int, batch: int, kwargs: LayerKwargs) -> None:
    """Run a layer over every calibration sequence: ``kind_in`` at ``index`` -> ``kind_out`` at ``index + 1``."""
    def chunks():
        for s, e in _chunks(n, batch):
            x = store.read(kind_in, index, torch.arange(s, e))
            yield s, _out(layer_fn(x, **kwargs(index, e - s)))
    store.write(kind_out, index + 1, chunks())


@torch.no_grad()
def _heldout_loss(fn, store: HiddenStore, index: int, held: torch.Tensor, batch: int, kwargs: LayerKwargs) -> float:
    """Normalised MSE of the student layer on the held-back sequences (sums over all of them)."""
    if held.numel() == 0:
        return float("nan")
    err, ref = 0.0, 0.0
    for s, e in _chunks(held.numel(), batch):
        rows = held[s:e]
        y = store.read("teacher", index + 1, rows)
        out = _out(fn(store.read("student", index, rows), **kwargs(index, e - s)))
        err += float((out - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / max(ref, 1e-30)


@dataclass
class ModelGuard:
    """The whole-model guard's numbers: mean KL(teacher || model) per token of the final next-token
    distributions, unhealed student vs healed, on the held-back calibration sequences (``kl_student`` /
    ``kl_healed``) and on the teacher-sampled guard sequences (``*_sampled``; nan when there are none),
    with the standard error of the mean per-sequence decrease on each set. ``kept`` False: the output is
    the unhealed student (``guard_keeps``)."""

    kl_student: float
    kl_healed: float
    kept: bool
    kl_student_sampled: float = float("nan")
    kl_healed_sampled: float = float("nan")
    se_calib: float = float("nan")
    se_sampled: float = float("nan")
    z: float = 0.0


def _mean_or_nan(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def _paired_se(before: torch.Tensor, after: torch.Tensor) -> float:
    d = (before.double() - after.double()).flatten()
    return float(d.std(unbiased=True) / d.numel() ** 0.5) if d.numel() > 1 else float("nan")


def judge(calib: tuple[torch.Tensor, torch.Tensor], sampled: tuple[torch.Tensor, torch.Tensor], z: float) -> ModelGuard:
    """``ModelGuard`` from per-sequence KL (before, after) on the held-back calibration and guard sequences."""
    return ModelGuard(_mean_or_nan(calib[0]), _mean_or_nan(calib[1]), guard_keeps(calib, sampled, z),
                      _mean_or_nan(sampled[0]), _mean_or_nan(sampled[1]), _paired_se(*calib), _paired_se(*sampled), z)


def heal_blockwise(teacher, student, input_ids: torch.Tensor, cfg: HealConfig, work: Path,
                   write_layer: Callable[[int, nn.Module], None], storage_dtype: torch.dtype,
                   progress: Progress | None = None, guard_ids: torch.Tensor | None = None
                   ) -> tuple[list[LayerHealRecord], ModelGuard | None]:
    """Heal ``student`` (a ``LayerwiseModel``) layer by layer towards ``teacher``; see the module doc.

    ``write_layer(i, layer)`` receives each finished (merged, rounded) student layer. Progress and resume
    state live in ``work``: rerunning with the same folder continues after the last finished layer (from
    its last training checkpoint). ``guard_ids`` [G, L] (teacher-sampled, same length as ``input_ids``)
    are appended after the calibration rows and never trained on. Besides the healed student, the UNHEALED
    student is propagated on the held-back and guard sequences only (a small third array), for the
    whole-model guard at the end (None when there is nothing to check it on).
    """
    n_calib, seqlen = input_ids.shape
    train_ids, held_ids = split_sequences(n_calib, cfg.holdout_fraction, cfg.seed)
    if guard_ids is not None and guard_ids.numel():
        input_ids = torch.cat([input_ids, guard_ids.to(input_ids.dtype)])
    n = input_ids.shape[0]
    guard_rows = torch.arange(n_calib, n)
    check_ids = torch.cat([held_ids, guard_rows])  # rows the whole-model guard scores: held-back, then guard
    n_check = check_ids.numel()
    hidden = student.config.hidden_size
    store = HiddenStore(work / "hidden", (n, seqlen, hidden))
    plain = HiddenStore(work / "hidden" / "plain", (n_check, seqlen, hidden)) if n_check else None
    kwargs_s = LayerKwargs(student, seqlen, _batch_sizes([n, train_ids.numel(), held_ids.numel(), n_check], cfg.batch_size))
    kwargs_t = LayerKwargs(teacher, seqlen, _batch_sizes([n], cfg.batch_size))
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"layers_done": 0, "records": []}
    start = state["layers_done"]
    if start == 0:
        if not store.exists("teacher", 0):
            _write_embeddings(teacher, store, "teacher", input_ids, cfg.batch_size)
        if not store.exists("student", 0):
            _write_embeddings(student, store, "student", input_ids, cfg.batch_size)
        if plain is not None and not plain.exists("plain", 0):
            plain.write("plain", 0, ((s, store.read("student", 0, check_ids[s:e])) for s, e in _chunks(n_check, cfg.batch_size)))
    num_layers = student.view.num_layers
    for i in range(start, num_layers):
        if not store.exists("teacher", i + 1):
            layer_t = teacher.load_layer(i)
            _propagate(layer_t, store, "teacher", "teacher", i, n, cfg.batch_size, kwargs_t)
            teacher.release_layer(i)
        layer = student.load_layer(i)
        if plain is not None and not plain.exists("plain", i + 1):  # the layer as loaded, before any training
            _propagate(layer, plain, "plain", "plain", i, n_check, cfg.batch_size, kwargs_s)
        record = _heal_layer(i, layer, student, store, train_ids, held_ids, cfg, kwargs_s, work, storage_dtype, progress)
        write_layer(i, layer)
        _propagate(layer, store, "student", "student", i, n, cfg.batch_size, kwargs_s)
        student.release_layer(i)
        state["layers_done"] = i + 1
        state["records"].append(asdict(record))
        write_json_atomically(state, state_path)
        (work / f"ckpt-layer-{i:05d}.pt").unlink(missing_ok=True)
        store.delete_before(i + 1)
        if plain is not None:
            plain.delete_before(i + 1)
    if plain is not None and "guard" not in state:
        before, after = _final_kl(teacher, student, store, plain, check_ids, num_layers, cfg.batch_size, cfg.top_k)
        n_held = held_ids.numel()
        guard = judge((before[:n_held], after[:n_held]), (before[n_held:], after[n_held:]), cfg.guard_z)
        state["guard"] = asdict(guard)
        write_json_atomically(state, state_path)
    guard = ModelGuard(**state["guard"]) if "guard" in state else None
    return [LayerHealRecord(**r) for r in state["records"]], guard


def _head(lm):
    """The final norm and output head of a ``LayerwiseModel`` whose outer modules are loaded."""
    base = lm.model.get_submodule(lm.view.layers_name.rsplit(".", 1)[0])
    return lambda h: lm.model.get_output_embeddings()(base.norm(h))


@torch.no_grad()
def _final_kl(teacher, student, store: HiddenStore, plain: HiddenStore, check_ids: torch.Tensor, last: int,
              batch: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean KL(teacher || .) per token of each sequence in ``check_ids``: the unhealed student, the healed one.

    Final hidden states come from the work folder; only the final norms and heads are loaded, one model's
    at a time: the teacher's distributions are kept as compact top-K targets (``distill_ces.coarse_kl``)
    in between, not as full logits."""
    chunks = _chunks(check_ids.numel(), batch)
    teacher.load_outer()
    try:
        head = _head(teacher)
        targets = [teacher_targets(head(store.read("teacher", last, check_ids[s:e])).flatten(0, 1), top_k) for s, e in chunks]
    finally:
        teacher.release_outer()
    student.load_outer()
    try:
        head = _head(student)
        per_seq = [[], []]
        for (s, e), t in zip(chunks, targets):
            for j, h in enumerate((plain.read("plain", last, torch.arange(s, e)), store.read("student", last, check_ids[s:e]))):
                per_seq[j].append(coarse_kl(t, head(h).flatten(0, 1)).reshape(e - s, -1).double().mean(1))
    finally:
        student.release_outer()
    empty = torch.zeros(0, dtype=torch.float64)
    return tuple(torch.cat(p) if p else empty for p in per_seq)


def _router_paths(lm, index: int) -> list[str]:
    block = lm.view.blocks.get(index)
    return [] if block is None else [f"{block.block_name}.{block.router_name}"]


def _heal_layer(i: int, layer: nn.Module, lm, store: HiddenStore, train_ids: torch.Tensor, held_ids: torch.Tensor,
                cfg: HealConfig, kwargs: LayerKwargs, work: Path, storage_dtype: torch.dtype, progress) -> LayerHealRecord:
    started = time.perf_counter()
    layer.eval()  # no dropout: deterministic
    generator = torch.Generator().manual_seed(cfg.seed * 100003 + i)  # a layer's adapters do not depend on the others
    what = cfg.train or default_train(has_ces=any(n.endswith("ces") for n, _ in layer.named_parameters()))
    trainables = select_trainables(layer, _router_paths(lm, i), what, cfg.lora_rank, generator)
    if not trainables.direct and not trainables.lora:  # e.g. a dense layer of a partly-MoE model with --train lora
        trainables.freeze()
        return LayerHealRecord(i, {}, 0, 0, float("nan"), float("nan"), float("nan"), float("nan"), False, 0.0)
    original = {n: p.detach().clone() for n, p in trainables.direct.items()}
    checkpointer = Checkpointer(work / f"ckpt-layer-{i:05d}.pt", trainables, cfg.checkpoint_every)
    resumed = torch.load(checkpointer.path, weights_only=True) if checkpointer.path.is_file() else None
    before = resumed["heldout_before"] if resumed else _heldout_loss(trainables, store, i, held_ids, cfg.batch_size, kwargs)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        seqs = train_ids[rows]
        out = _out(trainables(store.read("student", i, seqs), **kwargs(i, seqs.numel())))
        return normalized_mse(out, store.read("teacher", i + 1, seqs))

    if progress is not None and getattr(progress, "relabel", None) is not None:
        progress.relabel(f"heal layer {i + 1}/{lm.view.num_layers}")
    try:
        losses = train(trainables, batch_loss, train_ids.numel(), cfg, cfg.seed + i, checkpointer, {"heldout_before": before},
                       (lambda step: progress(step, cfg.steps)) if progress else None)
    finally:
        trainables.freeze()
    # Measured with the adapters (not yet merged): a layer that did not improve is put back without
    # having to undo a merge or hold a copy of its experts.
    after = _heldout_loss(trainables, store, i, held_ids, cfg.batch_size, kwargs)
    kept = not (after >= before)  # nan (nothing held back) keeps the trained weights
    n_params = trainables.numel()
    finish(trainables, original, kept, storage_dtype)
    return LayerHealRecord(i, dict(sorted(trainables.kinds.items())), n_params, cfg.steps, losses[0], losses[-1], before,
                           after if kept else before, kept, round(time.perf_counter() - started, 2))


@torch.no_grad()
def finish(trainables: Trainables, original: dict[str, torch.Tensor], kept: bool, storage_dtype: torch.dtype) -> None:
    """Kept: merge the adapters and round the trained tensors to the checkpoint dtype. Not kept: put the
    direct tensors back and drop the adapters (the module's weights were never changed by them)."""
    if kept:
        trainables.merge()
        round_to_storage(trainables, storage_dtype)
        return
    for n, p in trainables.direct.items():
        p.copy_(original[n])
    trainables.lora = {}


# --------------------------------------------------------------------------------------------------
# End-to-end healing
# --------------------------------------------------------------------------------------------------


@dataclass
class EndToEndRecord:
    trained: dict
    trained_params: int
    steps: int
    loss_first: float
    loss_last: float
    heldout_before: float  # T^2 KL per token on the held-back calibration sequences
    heldout_after: float
    kept: bool
    seconds: float


def _logits(model: nn.Module, forward, ids: torch.Tensor) -> torch.Tensor:
    out = forward(input_ids=ids, use_cache=False).logits
    return out.reshape(-1, out.shape[-1])


def _rows(seqs: torch.Tensor, seqlen: int) -> torch.Tensor:
    return (seqs[:, None] * seqlen + torch.arange(seqlen)[None, :]).reshape(-1)


@torch.no_grad()
def teacher_targets_for(model: nn.Module, input_ids: torch.Tensor, cfg: HealConfig) -> TeacherTargets:
    """The teacher's top-K log-probabilities at temperature T for every position ([N * L] rows, sequence-major)."""
    model.eval()
    parts = [teacher_targets(_logits(model, model, input_ids[s:e]) / cfg.temperature, cfg.top_k)
             for s, e in _chunks(input_ids.shape[0], cfg.batch_size)]
    return TeacherTargets.cat(parts)


@torch.no_grad()
def _kl_per_sequence(forward, model, input_ids, targets: TeacherTargets, seqs: torch.Tensor, cfg: HealConfig) -> torch.Tensor:
    """T^2 KL(teacher_T || student_T) per token, averaged over each sequence of ``seqs`` -> [len(seqs)]."""
    out = [torch.zeros(0, dtype=torch.float64)]
    for s, e in _chunks(seqs.numel(), cfg.batch_size):
        ids = seqs[s:e]
        t = targets.select(_rows(ids, input_ids.shape[1]))
        kl = coarse_kl(t, _logits(model, forward, input_ids[ids]) / cfg.temperature) * cfg.temperature**2
        out.append(kl.reshape(ids.numel(), -1).double().mean(1))
    return torch.cat(out)


def heal_end_to_end(student: nn.Module, layers_name: str, router_paths: list[str], input_ids: torch.Tensor,
                    targets: TeacherTargets, cfg: HealConfig, work: Path, storage_dtype: torch.dtype,
                    progress: Progress | None = None, guard_count: int = 0) -> tuple[EndToEndRecord, ModelGuard | None]:
    """Train the selected tensors of the whole (float32, materialised) ``student`` on the teacher's targets.

    The last ``guard_count`` rows of ``input_ids`` (and ``targets``) are the teacher-sampled guard
    sequences: never trained on, scored by the whole-model guard with the held-back calibration rows.
    Adapters are merged and the trained tensors rounded to ``storage_dtype`` in place; if the guard does
    not find the healed model clearly closer to the teacher on both sets, the student's original tensors
    are put back (``kept`` False).
    """
    started = time.perf_counter()
    student.eval()
    generator = torch.Generator().manual_seed(cfg.seed * 100003)
    what = cfg.train or default_train(has_ces=any(n.endswith(".ces") for n, _ in student.named_parameters()))
    trainables = select_trainables(student, router_paths, what, cfg.lora_rank, generator, prefix=layers_name + ".")
    check_trainables(set(trainables.kinds), cfg.train, "the student")
    original = {n: p.detach().clone() for n, p in trainables.direct.items()}
    n_calib = input_ids.shape[0] - guard_count
    train_ids, held_ids = split_sequences(n_calib, cfg.holdout_fraction, cfg.seed)
    guard_rows = torch.arange(n_calib, input_ids.shape[0])
    seqlen = input_ids.shape[1]
    checkpointer = Checkpointer(work / "ckpt-end-to-end.pt", trainables, cfg.checkpoint_every)
    resumed = torch.load(checkpointer.path, weights_only=True) if checkpointer.path.is_file() else None
    if resumed:
        before, before_sampled = resumed["heldout_before"], resumed["sampled_before"]
    else:
        before = _kl_per_sequence(trainables, student, input_ids, targets, held_ids, cfg)
        before_sampled = _kl_per_sequence(trainables, student, input_ids, targets, guard_rows, cfg)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        seqs = train_ids[rows]
        return distill_loss(targets.select(_rows(seqs, seqlen)), _logits(student, trainables, input_ids[seqs]), cfg.temperature)

    if progress is not None and getattr(progress, "relabel", None) is not None:
        progress.relabel("heal end-to-end")
    try:
        losses = train(trainables, batch_loss, train_ids.numel(), cfg, cfg.seed, checkpointer,
                       {"heldout_before": before, "sampled_before": before_sampled},
                       (lambda step: progress(step, cfg.steps)) if progress else None)
    finally:
        trainables.freeze()
    after = _kl_per_sequence(trainables, student, input_ids, targets, held_ids, cfg)
    after_sampled = _kl_per_sequence(trainables, student, input_ids, targets, guard_rows, cfg)
    guard = judge((before, after), (before_sampled, after_sampled), cfg.guard_z)
    n_params = trainables.numel()
    finish(trainables, original, guard.kept, storage_dtype)
    checkpointer.clear()
    record = EndToEndRecord(dict(sorted(trainables.kinds.items())), n_params, cfg.steps, losses[0], losses[-1], guard.kl_student,
                            guard.kl_healed if guard.kept else guard.kl_student, guard.kept, round(time.perf_counter() - started, 2))
    return record, (guard if held_ids.numel() or guard_count else None)


def estimate_end_to_end_bytes(model_bytes_fp32: int, trainable_lora_bytes: int, batch_tokens: int, num_layers: int, hidden: int,
                              intermediate: int, top_k: int, heads: int, seqlen: int, vocab: int) -> int:
    """Peak of end-to-end healing: ``distill_ces.estimate_distill_bytes`` (one float32 model + one batch of
    activations) plus the adapters with their Adam moments and gradients (4 copies)."""
    from moecompress.passes.distill_ces import estimate_distill_bytes

    return estimate_distill_bytes(model_bytes_fp32, batch_tokens, num_layers, hidden, intermediate, top_k, heads, seqlen, vocab) \
        + 4 * trainable_lora_bytes
