"""Expert parallelism over torch.distributed: who solves which expert, and how the results meet.

One compression job runs as ``world`` processes launched by ``torchrun`` (one per GPU, or several CPU
processes with gloo; several machines through torchrun's rendezvous: the same code). Every process
walks the model layer by layer with the same calibration inputs (the attention / router forward of a
layer is replicated: cheap next to the experts' work, and it keeps every process's view of the layer
identical without shipping activations). Per MoE layer:

1. the layer's *units of work* (its experts, and its attention / shared-expert linears) get owners by
   :func:`owners`: longest-processing-time-first bin packing of estimated costs, deterministic;
2. each process solves only the units it owns (Hessians from the layer's routed tokens, GPTQ);
3. :func:`share_results` gives every process every unit's result (packed codes, scales, dequantized
   weights, report rows): each owner sends its units' tensors as ONE flat byte buffer (a broadcast per
   process, not per tensor), received bit for bit;
4. every process installs all results and runs the layer forward for the next layer's inputs; only
   the writer (rank 0) writes the checkpoint.

Because each unit is solved by exactly the code, inputs and order a single process would use, a
``world``-process run writes the same bytes as a one-process run (tests/test_parallel.py checks it).

Memory per process: one decoder layer's weights + the calibration activations (as in one process) +
the Hessians and solver state of the units it owns (about 1/world of the layer's) + the received
results of one layer.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world`` (1 = not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """The one process that writes outputs and prints results."""
        return self.rank == 0


def current() -> Ranks:
    """The running job's ranks: torch.distributed's when a process group is up, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def launched_by_torchrun() -> bool:
    """torchrun (or any launcher using its env:// rendezvous) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def init_from_env() -> Ranks:
    """Join the process group torchrun described in the environment (WORLD_SIZE, RANK, MASTER_ADDR...):
    gloo for CPU tensors, and NCCL for CUDA tensors where GPUs are present (one per local rank). A plain
    launch is one process and starts nothing. Idempotent."""
    if not launched_by_torchrun():
        return current()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def owners(costs: Sequence[float], world: int) -> list[int]:
    """An owner rank per unit: longest processing time first onto the least-loaded rank.

    Deterministic (ties by unit index, then rank): every process computes the same assignment from
    the same costs without talking. Within 4/3 of the optimal makespan (Graham's bound)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    load = [0.0] * world
    owner = [0] * len(costs)
    for unit in sorted(range(len(costs)), key=lambda u: (-float(costs[u]), u)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[unit] = rank
        load[rank] += float(costs[unit])
    return owner


def _flatten(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple[str, torch.dtype, tuple[int, ...], int]]]:
    """The tensors as one uint8 buffer (their exact bytes) and how to cut it back."""
    parts, layout = [], []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)
        parts.append(raw)
        layout.append((name, t.dtype, tuple(t.shape), raw.numel()))
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return flat, layout


def _unflatten(flat: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, dtype, shape, nbytes in layout:
        raw = flat[offset : offset + nbytes]
        offset += nbytes
        # clone first: a view as a wider dtype needs an aligned start, which a slice of the buffer may lack
        out[name] = raw.clone().view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    return out


def share_results(
    mine: dict[int, tuple[dict[str, torch.Tensor], object]],
    owner: Sequence[int],
    ranks: Ranks,
    device: torch.device | None = None,
) -> dict[int, tuple[dict[str, torch.Tensor], object]]:
    """Every unit's result on every process.

    ``mine``: unit -> (tensors, picklable extra, e.g. a report row) for the units this rank owns.
    Returns the same mapping for all units, on CPU. Single process: ``mine`` itself."""
    if not ranks.distributed:
        return dict(mine)
    expected = {u for u, r in enumerate(owner) if r == ranks.rank}
    if set(mine) != expected:
        raise RuntimeError(f"rank {ranks.rank} owns units {sorted(expected)} but solved {sorted(mine)}")
    device = device or torch.device("cpu")
    results: dict[int, tuple[dict[str, torch.Tensor], object]] = {}
    for source in range(ranks.world):
        if source == ranks.rank:
            tensors = {f"{u}/{name}": t for u in sorted(mine) for name, t in mine[u][0].items()}
            flat, layout = _flatten(tensors)
            header = [pickle.dumps((layout, {u: mine[u][1] for u in sorted(mine)}, flat.numel()))]
        else:
            header = [None]
        dist.broadcast_object_list(header, src=source)
        layout, extras, nbytes = pickle.loads(header[0])
        buffer = flat.to(device) if source == ranks.rank else torch.empty(nbytes, dtype=torch.uint8, device=device)
        if nbytes:
            dist.broadcast(buffer, src=source)
        unpacked = _unflatten(buffer.cpu(), layout)
        for u, extra in extras.items():
            prefix = f"{u}/"
            results[u] = ({k[len(prefix):]: v for k, v in unpacked.items() if k.startswith(prefix)}, extra)
    return results


__all__ = ["Ranks", "current", "init_from_env", "launched_by_torchrun", "owners", "share_results", "shutdown"]
