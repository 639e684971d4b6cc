"""The layer-by-layer driver: calibration batches through a model one decoder layer at a time.

Sequential calibration as in GPTQ / llm-compressor's sequential pipeline: the inputs of layer i are
the outputs of layer i-1 *after* the passes changed it, so every pass sees the model it will really
be part of. Only one decoder layer's weights are materialised at a time (plus embeddings at the start
and the head at the end when logits are asked for), so peak memory is about one layer plus the
activations of the calibration set.

Per layer the driver:
  1. materialises the layer (``LayerwiseModel.load_layer``);
  2. lets every pass register hooks (``LayerPass.attach``), runs the layer on every batch (the
     observation forward; its outputs are kept, unless every pass has seen all it needs before some
     module, ``observation_stop``: then the forward ends there), removes the hooks;
  3. lets every pass process the layer (``LayerPass.process``), e.g. quantize it; when one reports a
     change (or the observation stopped early) the layer is re-run so the next layer sees the changed
     outputs, each batch's input released as its output is made;
  4. hands the finished layer to ``on_layer_done`` (e.g. a checkpoint writer), then releases it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from moecompress import parallel
from moecompress.model.loading import LayerwiseModel
from moecompress.model.view import MoEBlockView

log = logging.getLogger(__name__)


class PhaseTimer:
    """Wall seconds per named phase, summed over layers (``time.perf_counter``; a dict add per phase).

    The driver records ``load``, ``forward`` and ``write`` (the ``on_layer_done`` callback); passes
    add their own phases (the quantize pass: ``hessian``, ``solve``, ``pack``) through
    ``LayerContext.timer``. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each reading when
    work is queued on an accelerator, so a phase is charged for its own kernels, not the next one's.
    """

    def __init__(self, sync: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.sync = sync

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync is not None:
            self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        """JSON-able ``{phase: seconds}`` rounded to milliseconds, in first-recorded order."""
        return {name: round(value, 3) for name, value in self.seconds.items()}


class _StopForward(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for a decoder layer: records its keyword arguments, passes hidden states through.

    The model's own forward builds masks and rotary embeddings for every layer (per-layer attention
    types included), so the driver never re-implements them.
    """

    def __init__(self, index: int, store: dict, last: bool):
        super().__init__()
        self.index, self.store, self.last = index, store, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers are expected to take keyword arguments after hidden_states")
        self.store.setdefault("kwargs", {})[self.index] = kwargs
        if self.index == 0:
            self.store["hidden"] = hidden_states
        if self.last:
            raise _StopForward
        return hidden_states


@dataclass
class LayerContext:
    """What a pass sees of the layer being processed."""

    index: int
    layer: nn.Module
    block: MoEBlockView | None
    inputs: list[torch.Tensor]  # hidden states per batch [B, L, H]
    kwargs: list[dict]  # the layer's keyword arguments per batch
    outputs: list[torch.Tensor] = field(default_factory=list)
    model: LayerwiseModel | None = None
    timer: PhaseTimer = field(default_factory=PhaseTimer)  # the run's timer (one per run_layerwise)
    # The dtype calibration activations are kept in between layers (None: as computed). The layer
    # always computes in its own dtype; see run_layerwise's storage_dtype.
    storage_dtype: torch.dtype | None = None

    def run(self, stop_at: nn.Module | None = None, release_inputs: bool = False) -> list[torch.Tensor]:
        """Run the layer on every batch; returns the outputs (the pass's hooks fire).

        ``stop_at``: end each batch's forward where ``stop_at`` would start (its forward pre-hooks
        registered before this call still fire) and return no outputs: an observation forward whose
        passes have seen all they need there skips the rest of the layer (e.g. the experts' compute).
        ``release_inputs``: drop each batch's input once its output exists (the final run of a layer:
        the inputs are not needed after it), so inputs and outputs never both exist in full."""
        with torch.no_grad():
            if stop_at is not None:
                return self._run_until(stop_at)
            outputs = []
            for b in range(len(self.kwargs)):
                outputs.append(self.run_batch(b))
                if release_inputs:
                    self.inputs[b] = None
            return outputs

    def run_batch(self, b: int) -> torch.Tensor:
        """The layer's output on batch ``b``, as it is kept between layers."""
        return self.stored(_layer_output(self.layer(self.computable(self.inputs[b]), **self.kwargs[b])))

    def computable(self, hidden: torch.Tensor) -> torch.Tensor:
        """A stored activation in the dtype the layer computes in."""
        dtype = self.model.dtype if self.model is not None else hidden.dtype
        return hidden if hidden.dtype == dtype else hidden.to(dtype)

    def stored(self, hidden: torch.Tensor) -> torch.Tensor:
        """An activation as it is kept between layers (``storage_dtype``)."""
        dtype = self.storage_dtype
        return hidden if dtype is None or hidden.dtype == dtype else hidden.to(dtype)

    def _run_until(self, module: nn.Module) -> list[torch.Tensor]:
        handle = module.register_forward_pre_hook(_stop_forward)  # after the passes' hooks: theirs fire first
        try:
            for h, kw in zip(self.inputs, self.kwargs):
                try:
                    self.layer(self.computable(h), **kw)
                except _StopForward:
                    continue
                raise RuntimeError(f"layer {self.index}: {type(module).__name__} never ran, so the observation could not stop there")
        finally:
            handle.remove()
        return []


def _stop_forward(_module, _args):
    raise _StopForward


def rerun_shared(ctx: LayerContext, ranks: parallel.Ranks) -> list[torch.Tensor]:
    """The re-run of a changed layer (its outputs are the next layer's inputs), data-parallel across
    torchrun ranks: rank r runs batches r, r + world, ..., and every rank receives every batch's
    output bit for bit (``parallel.share_results``). A batch's output does not depend on which rank
    computed it (the same code at the same thread count), so the bytes are those of one process; each
    rank's forward shrinks to 1 / world of the re-run (the observation forward, whose hooks need every
    batch in order, stays on every rank). One process: ``ctx.run``."""
    if not ranks.distributed:
        return ctx.run(release_inputs=True)
    owner = [b % ranks.world for b in range(len(ctx.inputs))]
    mine = {}
    with torch.no_grad():
        for b in range(len(owner)):
            if owner[b] == ranks.rank:
                mine[b] = ({"out": ctx.run_batch(b)}, None)
    for b in range(len(ctx.inputs)):
        ctx.inputs[b] = None
    shared = parallel.share_results(mine, owner, ranks)
    return [shared[b][0]["out"] for b in range(len(owner))]


def observation_stop(passes: list, ctx: LayerContext) -> nn.Module | None:
    """Where the observation forward of ``ctx``'s layer may end: the module every pass names through
    its optional ``observation_end(ctx)`` (the module before which the pass has recorded all it needs,
    and whose observation outputs it does not use; the layer itself when it needs no observation);
    None, a full forward, unless all passes name the same one."""
    ends = [getattr(p, "observation_end", lambda _ctx: None)(ctx) for p in passes]
    if not ends or any(end is None or end is not ends[0] for end in ends):
        return None
    return ends[0]


def observation_stages(passes: list) -> list[list]:
    """``passes`` split where a pass must observe the layer as the passes before it left it.

    A pass with ``observes_changes = True`` (the quantizer: its Hessians come from the routing of the
    experts it will solve) starts a new stage when passes precede it: in one sweep, a pruned or merged
    layer is then observed again before it is quantized, and written once. Every stage has its own
    observation forward (cut short per :func:`observation_stop`) and its passes' ``process`` calls.
    The default, one stage, is one observation forward shared by every pass."""
    stages: list[list] = [[]]
    for p in passes:
        if getattr(p, "observes_changes", False) and stages[-1]:
            stages.append([])
        stages[-1].append(p)
    return stages


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class LayerPass(Protocol):
    """A pass over one layer: register hooks for the observation forward, then process.

    Optional: ``observation_end(ctx) -> nn.Module | None``, the module before which the pass has seen
    all it needs (see :func:`observation_stop`); a pass that uses the observation's outputs in
    ``process`` returns None or does not define it. ``rerun_context(ctx)``: a context manager the
    driver enters around the re-run of a changed layer. ``observes_changes = True``: the pass observes
    the layer as the passes before it in the list changed it (see :func:`observation_stages`)."""

    def attach(self, ctx: LayerContext) -> list:  # returns hook handles
        ...

    def process(self, ctx: LayerContext) -> bool:  # True when the layer's weights changed
        ...


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_heap_arenas(count: int = 1) -> None:
    """Let glibc keep at most ``count`` heap arenas in this process (``mallopt(M_ARENA_MAX)``).

    By default every thread that allocates while another holds the heap lock gets an arena of its
    own (up to 8 per core), and each keeps its freed memory apart: the compute threads' temporaries
    (token blocks, GEMM outputs) then leave holes in several heaps. One arena measured 36 MB less peak
    RSS on the testbed at 32 x 256 calibration tokens (598 vs 634 MB, 2 threads) and 643-659 vs
    658-681 MB at 128 x 256 (two runs each; wall time within the run-to-run noise). Call it before the compute threads start (the
    CLI does, first thing); later only threads without an arena are affected. No-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, count)
    except (OSError, AttributeError):
        pass


def return_freed_memory() -> None:
    """Give the heap pages freed by the finished layer back to the OS (glibc ``malloc_trim``).

    glibc keeps freed memory for reuse, and after the first large frees it serves allocations of up
    to 32 MB from the heap instead of fresh mappings, so each layer's activations leave holes that
    count as resident memory: measured on the testbed, 180 MB of a 696 MB process after the run was
    freed heap. Trimming once per layer costs milliseconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def batches_of(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]


@torch.no_grad()
def capture_layer_inputs(lm: LayerwiseModel, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Embeddings of every batch and each layer's keyword arguments (masks, positions, rotary)."""
    layers = lm.layers
    n = len(layers)
    originals = list(layers)
    hidden, kwargs = [], [[] for _ in range(n)]
    try:
        for b in batches:
            store: dict = {}
            for i in range(n):
                layers[i] = _InputCatcher(i, store, last=(i == n - 1))
            try:
                lm.model(input_ids=b, use_cache=False)
            except _StopForward:
                pass
            hidden.append(store["hidden"])
            for i in range(n):
                kwargs[i].append(store["kwargs"][i])
    finally:
        for i in range(n):
            layers[i] = originals[i]
    return hidden, kwargs


@dataclass
class DriverResult:
    hidden: list[torch.Tensor]  # final hidden states per batch (before the final norm)
    logits: list[torch.Tensor] | None = None
    timer: PhaseTimer | None = None


@torch.no_grad()
def run_layerwise(
    lm: LayerwiseModel,
    input_ids: torch.Tensor,
    passes: list[LayerPass] = (),
    batch_size: int = 8,
    on_layer_done: Callable[[LayerContext], None] | None = None,
    compute_logits: bool = False,
    progress: Callable[[int, int], None] | None = None,
    timer: PhaseTimer | None = None,
    storage_dtype: torch.dtype | None = None,
) -> DriverResult:
    """Run ``input_ids [n, L]`` through the model layer by layer, applying ``passes`` to each layer.

    ``timer``: where the per-phase wall times go (a new one when None); every LayerContext carries it.
    ``storage_dtype``: keep the hidden states between layers in this dtype (e.g. the checkpoint's
    bfloat16, as the model itself carries them at inference) while every layer computes in the model's
    dtype (float32): half the memory of the largest per-layer buffers (T x H each: 7.5 GB in float32
    at 128 x 2048 tokens and H = 7168). None keeps them as computed."""
    timer = timer if timer is not None else PhaseTimer()
    batches = batches_of(input_ids, batch_size)
    with timer.phase("load"):
        lm.load_outer()
    with timer.phase("forward"):
        hidden, layer_kwargs = capture_layer_inputs(lm, batches)
        if storage_dtype is not None:
            hidden = [h.to(storage_dtype) for h in hidden]
    if not compute_logits:
        lm.release_outer()
    for i in range(lm.view.num_layers):
        with timer.phase("load"):
            layer = lm.load_layer(i)
        ctx = LayerContext(i, layer, lm.view.blocks.get(i), hidden, layer_kwargs[i], model=lm, timer=timer, storage_dtype=storage_dtype)
        outputs_current = False  # whether ctx.outputs are the layer's outputs as it is now
        for stage in observation_stages(passes):
            handles = [h for p in stage for h in (p.attach(ctx) or [])]
            stop = observation_stop(stage, ctx)
            try:
                with timer.phase("forward"):
                    ctx.outputs = ctx.run(stop_at=stop)
            finally:
                for h in handles:
                    h.remove()
            changed = False
            for p in stage:
                changed = bool(p.process(ctx)) or changed
            outputs_current = stop is None and not changed
        if not outputs_current:  # the next layer's inputs: the outputs of the changed layer
            with timer.phase("forward"), contextlib.ExitStack() as stack:
                for p in passes:  # optional: a pass may set the layer up for the re-run (e.g. caches)
                    if hasattr(p, "rerun_context"):
                        stack.enter_context(p.rerun_context(ctx))
                ctx.outputs = rerun_shared(ctx, parallel.current())
        if on_layer_done is not None:
            with timer.phase("write"):
                on_layer_done(ctx)
        hidden = ctx.outputs
        lm.release_layer(i)
        return_freed_memory()
        if progress is not None:
            progress(i + 1, lm.view.num_layers)
    logits = None
    if compute_logits:
        base = lm.model.get_submodule(lm.view.layers_name.rsplit(".", 1)[0])
        head = lm.model.get_output_embeddings()
        logits = [head(base.norm(h.to(lm.dtype))) for h in hidden]
        lm.release_outer()
    return DriverResult(hidden=hidden, logits=logits, timer=timer)
