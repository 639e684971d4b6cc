"""End-to-end distillation of the compressed experts' ``ces`` alone (the optional step of issue 9).

After the layer-wise, retraining-free fit (``compressed_experts.py``), every layer's ``ces`` is trained
jointly so that the *whole* compressed model's next-token distributions match the original model's on
the calibration tokens:

    loss = mean over tokens of KL(teacher || student),   teacher = the source model (as given:
    dense, or the quantized checkpoint compress-experts was run on), student = the compressed model.

Everything but ``ces`` stays frozen (ALGORITHMS.md section 7 keeps only ``ces`` trainable); Adam, a
seeded shuffle of the calibration sequences, so the result is deterministic for a seed.

Teacher targets are computed once (one full forward of the source model, then the model is released)
and stored compactly: per token the top-K log-probabilities with their token ids plus the log of the
remaining mass (the "tail"). The loss is then the exact KL between the two distributions *coarsened*
to {top-K tokens of the teacher, everything else}: a lower bound of the full KL (data processing),
equal to it when K covers the vocabulary. The default K = 1024 leaves 3% of the teacher's mass in the
tail on the testbed's calibration text (4k vocabulary; K = 128 left 19%, too coarse: the student was
free to reshape a fifth of the distribution). Storage is T * (8K + 4) bytes instead of T * V * 4
(268 MB for 32k calibration tokens at K = 1024).

Memory (unlike the layer-wise pass, which holds one decoder layer at a time): this step holds a whole
model in float32 (first the teacher, released before the student is loaded) plus the activations of
one batch for backpropagation; :func:`estimate_distill_bytes` gives the rough figure that
``compress_experts_job`` compares with the machine's available memory before any work starts.

Held-back calibration: ``holdout_fraction`` of the calibration *sequences* (seeded) are never trained
on; the report gives the KL before/after on them as well as on the trained sequences. The held-out
evaluation files are never seen.

The math (coarse KL, the Adam step loop, the batching) is plain functions; :func:`distill_ces` is the
model plumbing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moecompress.modules.compressed_experts import CompressedExpertsBlock

# --------------------------------------------------------------------------------------------------
# The math (tensor in, tensor out)
# --------------------------------------------------------------------------------------------------


@dataclass
class TeacherTargets:
    """Compact teacher distributions for N tokens: top-K log-probs [N, K], their ids [N, K], tail log-mass [N]."""

    logp: torch.Tensor
    index: torch.Tensor
    tail_logp: torch.Tensor

    def select(self, rows: torch.Tensor) -> "TeacherTargets":
        return TeacherTargets(self.logp[rows], self.index[rows], self.tail_logp[rows])

    @staticmethod
    def cat(parts: list["TeacherTargets"]) -> "TeacherTargets":
        return TeacherTargets(
            torch.cat([p.logp for p in parts]), torch.cat([p.index for p in parts]), torch.cat([p.tail_logp for p in parts])
        )


def teacher_targets(logits: torch.Tensor, top_k: int) -> TeacherTargets:
    """logits [N, V] -> the teacher's top-K log-probabilities, ids (int32 to save memory) and tail log-mass."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)  # [N, V]
    k = min(top_k, logits.shape[-1])
    top_logp, top_index = logp.topk(k, dim=-1)  # [N, K]
    rest = logp.scatter(-1, top_index, float("-inf"))  # [N, V] the top-K removed
    tail = torch.logsumexp(rest, dim=-1)  # [N]; -inf when K = V
    return TeacherTargets(top_logp, top_index.to(torch.int32), tail)


def coarse_kl(teacher: TeacherTargets, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || student) [N] over {teacher's top-K tokens, the rest}; student_logits [N, V].

    The student's tail mass is 1 - sum of its probabilities on the teacher's top-K, computed as
    ``-expm1(logsumexp)`` (stable) and floored at 1e-30 so an empty tail never gives log(0).
    """
    s_logp = F.log_softmax(student_logits.float(), dim=-1)  # [N, V]
    s_top = s_logp.gather(-1, teacher.index.long())  # [N, K]
    kl_top = (teacher.logp.exp() * (teacher.logp - s_top)).sum(dim=-1)  # [N]
    s_tail = torch.log((-torch.expm1(torch.logsumexp(s_top, dim=-1))).clamp_min(1e-30))  # [N]
    p_tail = teacher.tail_logp.exp()  # [N]; 0 when K covers the vocabulary
    safe_tail = torch.where(p_tail > 0, teacher.tail_logp, torch.zeros_like(teacher.tail_logp))
    kl_tail = torch.where(p_tail > 0, p_tail * (safe_tail - s_tail), torch.zeros_like(p_tail))
    return kl_top + kl_tail


def shuffled_batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatches of row ids: a fresh seeded permutation of range(n) per epoch, cut into ``batch`` rows."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for s in range(0, n, batch):
            yield perm[s : s + batch]


def adam_steps(
    params: list[torch.Tensor],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    n_rows: int,
    batch: int,
    steps: int,
    lr: float,
    seed: int,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """``steps`` Adam steps on ``params`` minimising ``batch_loss(row ids)`` over seeded shuffled minibatches.

    Returns the training loss of each step (measured before that step's update). ``after_step(step)``
    (1-based) is called after each update, e.g. to follow a held-back loss.
    """
    return resumable_adam(params, batch_loss, n_rows, batch, steps, lr, seed,
                          after_step=None if after_step is None else (lambda step, _opt, _losses: after_step(step)))


def resumable_adam(
    params: list[torch.Tensor],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    n_rows: int,
    batch: int,
    steps: int,
    lr: float,
    seed: int,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    losses: list[float] | None = None,
    after_step: Callable[[int, torch.optim.Optimizer, list[float]], None] | None = None,
    lr_scale: Callable[[int], float] | None = None,
) -> list[float]:
    """:func:`adam_steps` that can start at ``start_step`` from a saved ``optimizer_state`` (and the
    ``losses`` so far): the minibatch stream is replayed up to that step, so a resumed run takes exactly
    the steps an uninterrupted one would. ``after_step(step, optimizer, losses)`` may save a checkpoint.
    ``lr_scale(step)``: the learning rate of (0-based) step ``step`` is ``lr * lr_scale(step)``, each param
    group's own lr for groups (a schedule;
    a function of the step only, so a resumed run follows it exactly)."""
    opt = torch.optim.Adam(params, lr=lr)  # params: tensors, or torch param groups (a group may set its own lr)
    base_lrs = [group["lr"] for group in opt.param_groups]  # before a saved state overwrites them with scaled ones
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    batches = shuffled_batches(n_rows, batch, torch.Generator().manual_seed(seed))
    for _ in range(start_step):
        next(batches)
    losses = list(losses or [])
    with torch.enable_grad():
        for step in range(start_step, steps):
            if lr_scale is not None:
                for group, base in zip(opt.param_groups, base_lrs):
                    group["lr"] = base * lr_scale(step)
            loss = batch_loss(next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if after_step is not None:
                after_step(step + 1, opt, losses)
    return losses


def split_sequences(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(trained ids, held-back ids) of n calibration sequences; at least one of each when n >= 2 and fraction > 0."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        held = min(max(held, 1), n - 1)
    return perm[held:].sort().values, perm[:held].sort().values


# --------------------------------------------------------------------------------------------------
# Memory estimate
# --------------------------------------------------------------------------------------------------


def estimate_distill_bytes(
    model_bytes_fp32: int, batch_tokens: int, num_layers: int, hidden: int, intermediate: int, top_k: int, heads: int, seqlen: int, vocab: int
) -> int:
    """Rough peak of the distillation step: one float32 model + the autograd activations of one batch.

    Per token and layer we count ~16 H (norms, attention projections, residuals), 4 k I (the computed
    experts' gate/up/activation) and heads * seqlen (attention weights in eager attention); per token
    3 V for the logits, their log-softmax and its gradient. A coarse bound, meant to catch "this does not
    fit at all" before hours of layer-wise work, not to predict the peak to the megabyte.
    """
    per_token = num_layers * (16 * hidden + 4 * top_k * intermediate + heads * seqlen) + 3 * vocab
    return int(model_bytes_fp32 + 4 * batch_tokens * per_token)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), None where it cannot be read (the check is then skipped)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------------


@dataclass
class DistillRecord:
    """What the report shows about the distillation step."""

    steps: int
    lr: float
    batch_sequences: int
    top_k: int
    train_sequences: int
    heldout_sequences: int
    kl_train_before: float
    kl_train_after: float
    kl_heldout_before: float  # nan when no sequence is held back
    kl_heldout_after: float
    seconds: float
    losses: list[float] = field(default_factory=list)
    heldout_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-back KL), with heldout_every


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, L] token ids -> [B * L, V] next-token logits (no cache, every position)."""
    out = model(input_ids=ids, use_cache=False).logits
    return out.reshape(-1, out.shape[-1])


@torch.no_grad()
def compute_teacher_targets(model: nn.Module, input_ids: torch.Tensor, top_k: int, batch: int) -> TeacherTargets:
    """The teacher's compact targets for every position of every sequence ([N * L] rows, sequence-major)."""
    model.eval()
    parts = [teacher_targets(_logits(model, input_ids[s : s + batch]), top_k) for s in range(0, input_ids.shape[0], batch)]
    return TeacherTargets.cat(parts)


def _rows(seq_ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Token rows of the given sequences in the sequence-major [N * L] layout."""
    return (seq_ids[:, None] * seqlen + torch.arange(seqlen)[None, :]).reshape(-1)


@torch.no_grad()
def mean_kl(model: nn.Module, input_ids: torch.Tensor, targets: TeacherTargets, seq_ids: torch.Tensor, batch: int) -> float:
    """Mean per-token coarse KL of the model against the teacher on the given sequences (nan if none)."""
    if seq_ids.numel() == 0:
        return float("nan")
    total, count = 0.0, 0
    seqlen = input_ids.shape[1]
    for s in range(0, seq_ids.numel(), batch):
        ids = seq_ids[s : s + batch]
        kl = coarse_kl(targets.select(_rows(ids, seqlen)), _logits(model, input_ids[ids]))
        total += float(kl.sum())
        count += kl.numel()
    return total / count


def trainable_ces(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter of the model, then unfreeze and return each compressed-experts block's ``ces``."""
    for p in model.parameters():
        p.requires_grad_(False)
    ces = [m.ces for m in model.modules() if isinstance(m, CompressedExpertsBlock)]
    for p in ces:
        p.requires_grad_(True)
    return ces


def distill_ces(
    student: nn.Module,
    input_ids: torch.Tensor,
    targets: TeacherTargets,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    holdout_fraction: float,
    storage_dtype: torch.dtype = torch.float32,
    heldout_every: int = 0,
) -> DistillRecord:
    """Train every compressed-experts block's ``ces`` of ``student`` (in place) to the teacher targets.

    input_ids [N, L] calibration sequences; targets from :func:`compute_teacher_targets` on the same ids.
    The ``ces`` must be float32 (load the student with ``dtype=torch.float32``). After training they are
    rounded to ``storage_dtype`` (what the checkpoint will hold) before the "after" KL is measured.
    ``heldout_every > 0`` also records the held-back KL every that many steps (unrounded ces), to choose
    a step count on calibration data without rerunning.
    """
    start = time.time()
    student.eval()  # no dropout: the distillation is deterministic
    ces = trainable_ces(student)
    if not ces:
        raise ValueError("the student has no compressed-experts blocks to distill")
    if any(p.dtype != torch.float32 for p in ces):
        raise ValueError("load the student with dtype=torch.float32: Adam on low-precision ces would round away small updates")
    train_ids, held_ids = split_sequences(input_ids.shape[0], holdout_fraction, seed)
    seqlen = input_ids.shape[1]
    kl_train_before = mean_kl(student, input_ids, targets, train_ids, batch)
    kl_held_before = mean_kl(student, input_ids, targets, held_ids, batch)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        seqs = train_ids[rows]
        return coarse_kl(targets.select(_rows(seqs, seqlen)), _logits(student, input_ids[seqs])).mean()

    curve: list[tuple[int, float]] = []

    def follow(step: int) -> None:
        if heldout_every > 0 and step % heldout_every == 0 and held_ids.numel():
            curve.append((step, mean_kl(student, input_ids, targets, held_ids, batch)))

    try:
        losses = adam_steps(ces, batch_loss, train_ids.numel(), batch, steps, lr, seed, follow)
    finally:
        for p in ces:
            p.requires_grad_(False)
    with torch.no_grad():
        for p in ces:
            p.copy_(p.to(storage_dtype).float())
    return DistillRecord(
        steps=steps,
        lr=lr,
        batch_sequences=batch,
        top_k=targets.logp.shape[-1],
        train_sequences=int(train_ids.numel()),
        heldout_sequences=int(held_ids.numel()),
        kl_train_before=kl_train_before,
        kl_train_after=mean_kl(student, input_ids, targets, train_ids, batch),
        kl_heldout_before=kl_held_before,
        kl_heldout_after=mean_kl(student, input_ids, targets, held_ids, batch),
        seconds=time.time() - start,
        losses=losses,
        heldout_curve=curve,
    )
