"""Expert-aware quantization pass: GPTQ (or RTN) per expert, balanced calibration, AGQ.

Per MoE layer, through the layer-by-layer driver:

* the observation forward records, at the experts module, the block input ``x [T, H]``, the routing
  decision (``top_k_index``, ``top_k_weights``) and, at the router, the router probabilities;
* ``process`` then quantizes the layer's experts in batches (``quant/batched.py``: one routed-token
  gather per layer, batched Hessians, batched GPTQ / RTN; one batch per width and solver, cut into
  chunks by ``solve_memory_mb``), on ``device`` (CUDA when available), with the same bytes as the
  per-expert reference :func:`quantize_expert_reference`:
  - tokens: the tokens routed to the expert, or with ``calibrate_all_experts`` every calibration token
    (llm-compressor's default: statistics from all tokens, while only routed outputs flow on);
  - AGQ (MoEQuant): token t contributes ``c_t x_t x_t^T`` with ``c_t`` its affinity to the expert:
    the routing weight the model applies for routed tokens, the router probability for the others
    (which only appear with calibrate-all-experts);
  - gate and up (one fused ``[2I, H]`` matrix, same Hessian) first; the down projection's Hessian
    is then built from the activations of the QUANTIZED gate/up, as MoEQuant orders it;
  - an expert that saw fewer than ``min_tokens`` routed tokens falls back (RTN, or GPTQ with 10x
    damping over the calibrate-all Hessian), named in the report;
* the experts module is replaced by a :class:`PackedExperts` that computes from the packed weights,
  so the next layer's inputs and the written checkpoint come from exactly what ``from_pretrained``
  will load.

Routers and ``shared_expert_gate`` are never quantized. Shared experts and attention are ordinary
``nn.Linear`` modules quantized with GPTQ over their own inputs, with their own widths.

Shape legend: T tokens, E experts, H hidden, I expert intermediate size, k top-k.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from moecompress import parallel
from moecompress.errors import MoeCompressError
from moecompress.kernels.moe_gemm import hf_activation
from moecompress.model.driver import LayerContext, PhaseTimer
from moecompress.model.view import ExpertsView, MoEBlockView
from moecompress.quant.batched import (
    LayerRouting,
    expert_hessians,
    expert_segments,
    experts_per_chunk,
    gather_routing,
    gptq_quantize_batched,
)
from moecompress.quant.gptq import (
    accumulate_hessian,
    activation_hessian,
    gptq_quantize,
    make_empty_hessian,
    relative_output_error,
)
from moecompress.quant.grid import QuantResult, QuantSpec, rtn
from moecompress.quant.format import SUPPORTED_BITS, group_size_problem
from moecompress.modules.packed import UNQUANTIZED, ExpertsSpec, PackedExperts, PackedLinear
from moecompress.validation import check_choice, check_float, check_int

log = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")
FALLBACKS = ("rtn", "damped-gptq")
ERROR_TOKENS = 4096  # tokens per RTN expert the report's relative output error is measured on (GPTQ: all)


# The default chunk budget per solver device. On CUDA large batches amortize kernel launches. On the
# CPU the batched solve ran as fast with 4 or 8 experts per chunk as with 16 (testbed, 1 and 2 threads:
# solve 1.8-2.9 s either way, within run-to-run noise) while each chunk's state adds to the peak:
# W3 peak RSS 591-600 MiB at 16 MB (4 experts), 627-637 at 32 MB, 657-697 at 4096 MB (all 16).
SOLVE_MEMORY_MB_DEFAULT = {"cuda": 4096, "cpu": 16}


def solve_memory_mb_for(cfg: "QuantizeConfig", device: torch.device) -> int:
    """The chunk budget (MiB) the solver uses: the user's, else the default for ``device``."""
    if cfg.solve_memory_mb is not None:
        return cfg.solve_memory_mb
    return SOLVE_MEMORY_MB_DEFAULT.get(device.type, SOLVE_MEMORY_MB_DEFAULT["cuda"])


def resolve_device(device: str | None) -> torch.device:
    """The solver's device: ``cuda`` when available and none was named, else the CPU; a named device
    must exist (a clear error, not a failure in the middle of a layer)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise MoeCompressError(f"device {device!r} is not a torch device name (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MoeCompressError(f"device {device!r} asked for, but torch sees no CUDA device; use cpu")
    return resolved


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    method: str = "gptq"
    calibrate_all_experts: bool = True
    agq: bool = True
    damp: float = 0.01
    act_order: bool = False
    clip_search: bool = False
    min_tokens_fraction: float = 0.005  # GPTQModel's threshold: < 0.5% of the layer's tokens
    fallback: str = "rtn"
    attention_bits: int | None = None  # None: attention stays in full precision
    shared_expert_bits: int | None = None  # None: same as `bits`; 16 keeps shared experts dense
    # Per-layer per-expert widths (from the bit allocator); None: every expert at `bits`.
    expert_bits: dict[int, list[int]] | None = None
    # Where the solver math runs: None = "cuda" when available, else "cpu" (chosen once per pass).
    # Only one layer's experts and calibration inputs visit the device; the model stays on the CPU.
    device: str | None = None
    # Bytes of solver state (Hessians, factors, weights, codes) for one batch of experts; a layer whose
    # experts need more is solved in chunks (256 experts x 7168^2 x 4 B = 52 GB of Hessians alone).
    # None: SOLVE_MEMORY_MB_DEFAULT for the solver's device (solve_memory_mb_for).
    solve_memory_mb: int | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise MoeCompressError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.fallback not in FALLBACKS:
            raise MoeCompressError(f"unknown fallback {self.fallback!r}; choose one of {', '.join(FALLBACKS)}")
        widths = ", ".join(str(b) for b in SUPPORTED_BITS)
        check_choice("--bits", self.bits, SUPPORTED_BITS, f"one of {widths}")
        check_int("--group-size", self.group_size, expected="a positive group length or -1 (per-channel)")
        check_float("--damp", self.damp, 0.0, 1.0, low_open=True, expected="a number in (0, 1] (GPTQ damping, a fraction of the mean Hessian diagonal)")
        check_float("--min-tokens-fraction", self.min_tokens_fraction, 0.0, 1.0)
        for option, b in (("--attention-bits", self.attention_bits), ("--shared-expert-bits", self.shared_expert_bits)):
            if b is not None:
                check_choice(option, b, (*SUPPORTED_BITS, UNQUANTIZED), f"one of {widths} (or {UNQUANTIZED}: kept dense)")
        for layer, row in (self.expert_bits or {}).items():
            for b in row:
                check_choice(f"the width of an expert of layer {layer}", b, (*SUPPORTED_BITS, UNQUANTIZED))
        if self.solve_memory_mb is not None:
            check_int("--solve-memory-mb", self.solve_memory_mb, minimum=1, expected="a positive number of MiB")
        resolve_device(self.device)
        QuantSpec(self.bits, self.group_size, self.symmetric)
        for b in (self.attention_bits, self.shared_expert_bits):
            if b is not None and b != UNQUANTIZED:
                QuantSpec(b, self.group_size, self.symmetric)

    def spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.group_size, self.symmetric, self.clip_search)

    def widths_for(self, layer: int, num_experts: int) -> list[int]:
        if self.expert_bits is None:
            return [self.bits] * num_experts
        if layer not in self.expert_bits:
            raise MoeCompressError(f"no expert widths given for MoE layer {layer}")
        return list(self.expert_bits[layer])


@dataclass
class ExpertRecord:
    """One row of the report."""

    layer: int
    expert: int
    bits: int
    tokens: int
    method: str
    rel_error: float  # ||X W^T - X Q^T||_F / ||X W^T||_F over the Hessian tokens (AGQ-weighted), gate_up and down averaged


@dataclass
class QuantizeReport:
    experts: list[ExpertRecord] = field(default_factory=list)
    linears: list[dict] = field(default_factory=list)
    solved_here: int = 0  # experts this process solved (all of them, but for its share under torchrun)
    # The driver's run timer (load, forward, write) with this pass's phases (hessian, solve, pack);
    # wall seconds, for the JSON result only: report.md carries no timings (same inputs, same bytes).
    timer: PhaseTimer | None = None

    def phase_seconds(self) -> dict[str, float]:
        """``{phase: wall seconds}`` of the run so far (JSON-able; empty before the first layer)."""
        return {} if self.timer is None else self.timer.as_dict()

    def fallbacks(self) -> list[ExpertRecord]:
        return [r for r in self.experts if r.method not in ("gptq", "rtn", "kept")]


# --------------------------------------------------------------------------------------------------
# Observation: what reaches the experts module
# --------------------------------------------------------------------------------------------------


@dataclass
class _ExpertInputs:
    x: list[torch.Tensor] = field(default_factory=list)  # [T, H] per batch
    index: list[torch.Tensor] = field(default_factory=list)  # [T, k]
    weights: list[torch.Tensor] = field(default_factory=list)  # [T, k]
    probs: list[torch.Tensor] = field(default_factory=list)  # [T, E] router probabilities


def _experts_args(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    alt = {"top_k_index": "router_indices", "top_k_weights": "routing_weights"}
    values = list(args) + [None] * (3 - len(args))
    for i, n in enumerate(names):
        if values[i] is None:
            values[i] = kwargs.get(n, kwargs.get(alt.get(n, n)))
    return values


def record_expert_inputs(block: MoEBlockView, dtype: torch.dtype = torch.float32) -> tuple[_ExpertInputs, list]:
    """Hooks that record the experts module's inputs (kept in ``dtype``: the run's storage dtype)
    and the router probabilities."""
    store = _ExpertInputs()

    def on_experts(_module, args, kwargs):
        x, idx, w = _experts_args(args, kwargs)
        store.x.append(x.detach().to(dtype))
        store.index.append(idx.detach())
        store.weights.append(w.detach().float())

    def on_router(_module, _args, out):
        logits = out[0] if isinstance(out, tuple) else out
        store.probs.append(block.stored_expert_scores(logits)[1])

    handles = [
        block.experts.module.register_forward_pre_hook(on_experts, with_kwargs=True),
        block.router.module.register_forward_hook(on_router),
    ]
    return store, handles


def expert_tokens(store: _ExpertInputs, e: int, all_tokens: bool, agq: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Calibration tokens for expert e: (x [T_e, H], affinity weights [T_e], routed token count)."""
    xs, cs, routed = [], [], 0
    for x, idx, w, p in zip(store.x, store.index, store.weights, store.probs):
        hit = idx == e  # [T, k]
        is_routed = hit.any(dim=-1)
        routed += int(is_routed.sum())
        applied = (w * hit).sum(dim=-1)  # the routing weight the model applies, 0 when not routed
        keep = torch.ones_like(is_routed) if all_tokens else is_routed
        affinity = torch.where(is_routed, applied, p[:, e].float())
        xs.append(x[keep])
        cs.append(affinity[keep])
    x = torch.cat(xs) if xs else torch.zeros(0)
    c = torch.cat(cs) if cs else torch.zeros(0)
    return x, (c if agq else torch.ones_like(c)), routed


@dataclass
class _InputHessian:
    """One linear's GPTQ Hessian, folded in batch by batch as the observation forward passes (the
    inputs themselves are not kept: four T x H float32 copies per layer for q/k/v/o otherwise)."""

    h: torch.Tensor
    tokens: int = 0
    batches: int = 0

    def add(self, x: torch.Tensor) -> None:
        _, self.tokens = accumulate_hessian(self.h, x.detach(), self.tokens)
        self.batches += 1


class LinearInputHessians:
    """Forward pre-hooks that build each hooked linear's Hessian as the batches pass.

    Linears fed the very same tensor (q, k and v all take the normed hidden states) share one
    Hessian: the hooks fire one after the other with the same input object, and the later ones see
    it was just folded in. ``check(batches)`` then confirms every Hessian saw every batch exactly once.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.by_name: dict[str, _InputHessian] = {}
        self._last: tuple[torch.Tensor | None, _InputHessian | None] = (None, None)

    def hook(self, name: str, k: int):
        def on_input(_module, args):
            x = args[0]
            last_x, last_acc = self._last
            acc = self.by_name.get(name)
            if acc is None:
                shares = last_x is x and last_acc is not None and last_acc.h.shape[-1] == k
                acc = self.by_name[name] = last_acc if shares else _InputHessian(make_empty_hessian(k, self.device))
            if acc is last_acc and last_x is x:
                return  # the linear before this one had the same input: already folded in
            acc.add(x)
            self._last = (x, acc)

        return on_input

    def check(self, batches: int) -> None:
        for name, acc in self.by_name.items():
            if acc.batches != batches:
                raise MoeCompressError(
                    f"{name} saw {acc.batches} of {batches} calibration batches; its Hessian would be wrong "
                    "(a module called more than once per forward, or inputs that stop being shared)"
                )


# --------------------------------------------------------------------------------------------------
# Quantizing one expert / one linear
# --------------------------------------------------------------------------------------------------


def _hessian(x: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    h = make_empty_hessian(k, device=x.device)
    if x.shape[0]:
        # AGQ weights are affinities in [0, 1]; the Hessian's scale does not change GPTQ's solution
        # but damping is relative to its diagonal, so it stays consistent across experts.
        h, _ = accumulate_hessian(h, x, 0, weights)
    return h


def down_hessian(experts: ExpertsView, e: int, x: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Expert e's down_proj Hessian ``[I, I]``: over its tokens x ``[T_e, H]`` weighted by c ``[T_e]``,
    of the activations its gate/up (as the module holds them now) feed down_proj. Computed token block
    by token block (quant.gptq.activation_hessian): the ``[T_e, 2I]`` and ``[T_e, I]`` activations of
    all tokens never exist at once (96 MB per expert on the testbed with calibrate-all; 1.5 GB at
    128 x 2048 tokens and I = 1536), and on 2 CPU cores it ran 1.6x faster than one pass over all
    rows. ``out``: a ``[I, I]`` zero tensor to fill (e.g. a slice of a stack)."""
    h = out if out is not None else make_empty_hessian(experts.intermediate_size, device=x.device)
    if x.shape[0]:
        activation_hessian(h, lambda rows: experts.intermediate(e, rows), x, 0, c)
    return h


def quantize_matrix(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, method: str, damp: float, act_order: bool) -> QuantResult:
    if method == "rtn":
        return rtn(w.float(), spec)
    result, _loss = gptq_quantize(w.float(), h, spec, damp=damp, act_order=act_order)
    return result


def expert_method(cfg: QuantizeConfig, routed: int, total_tokens: int) -> tuple[str, float]:
    """(method, damping) for an expert that saw ``routed`` of the layer's ``total_tokens`` tokens."""
    if cfg.method == "rtn":
        return "rtn", cfg.damp
    if routed >= max(1, cfg.min_tokens_fraction * total_tokens):
        return "gptq", cfg.damp
    if cfg.fallback == "damped-gptq" and cfg.calibrate_all_experts:
        return "fallback:damped-gptq", cfg.damp * 10
    return "fallback:rtn", cfg.damp


@torch.no_grad()
def quantize_expert_reference(
    experts: ExpertsView, e: int, store: _ExpertInputs, cfg: QuantizeConfig, bits: int, total_tokens: int
) -> tuple[QuantResult, QuantResult, str]:
    """One expert quantized alone, as the pass did before batching: ``(gate_up, down, method)``.

    The reference the batched pass is tested against (tests/passes/test_quantize.py). Writes the
    dequantized gate/up into the module, exactly as the pass does, since down is calibrated on it."""
    gate_up, down, _, _ = canonical_expert(experts, e)
    x, c, routed = expert_tokens(store, e, cfg.calibrate_all_experts, cfg.agq)
    method, damp = expert_method(cfg, routed, total_tokens)
    solver = "rtn" if method in ("rtn", "fallback:rtn") else "gptq"
    spec = cfg.spec(bits)
    h_in = _hessian(x, c, experts.hidden_size) if solver == "gptq" else None
    q_gu = quantize_matrix(gate_up, h_in, spec, solver, damp, cfg.act_order)
    _write_gate_up(experts, e, q_gu.dequantized())
    h_down = down_hessian(experts, e, x, c) if solver == "gptq" else None
    q_down = quantize_matrix(down, h_down, spec, solver, damp, cfg.act_order)
    return q_gu, q_down, method


def activation_of(experts: ExpertsView, config) -> tuple[str, dict]:
    """The experts' activation as the kernels name it."""
    module = experts.module
    if type(module)._apply_gate.__name__ != "_default_apply_gate":
        if hasattr(module, "alpha") and hasattr(module, "limit"):
            return "gpt_oss", {"alpha": float(module.alpha), "limit": float(module.limit)}
        raise MoeCompressError(f"{type(module).__name__} has an activation moecompress cannot pack yet")
    return hf_activation(str(getattr(config, "hidden_act", "silu"))), {}


def canonical_expert(experts: ExpertsView, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(gate_up [2I, H] gate rows then up rows, down [H, I], gate_up_bias, down_bias) of expert e."""
    if experts.has_gate:
        gate_up = torch.cat([experts.get(e, "gate"), experts.get(e, "up")])
    else:
        gate_up = experts.get(e, "up")
    gu_bias = down_bias = None
    if experts.has_bias:
        gu_bias = (
            torch.cat([experts.get_bias(e, "gate"), experts.get_bias(e, "up")]) if experts.has_gate else experts.get_bias(e, "up")
        )
        down_bias = experts.get_bias(e, "down")
    return gate_up, experts.get(e, "down"), gu_bias, down_bias


def _write_gate_up(experts: ExpertsView, e: int, gate_up: torch.Tensor) -> None:
    """Write a canonical gate_up [2I, H] (or up [I, H]) back through the view."""
    if experts.has_gate:
        i = experts.intermediate_size
        experts.set(e, "gate", gate_up[:i])
        experts.set(e, "up", gate_up[i:])
    else:
        experts.set(e, "up", gate_up)


# --------------------------------------------------------------------------------------------------
# A chunk of experts at once (the batched path; shared with the profiling sweep)
# --------------------------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    """The experts of one chunk quantized together (stacked along a leading expert dimension)."""

    gate_up: QuantResult  # codes [E_c, 2I (or I), H]
    down: QuantResult  # codes [E_c, H, I]
    # Per expert, the report's relative output error (gate_up and down averaged; expert_errors);
    # empty when not asked for.
    errors: list[float] = field(default_factory=list)


def expert_chunks(experts: ExpertsView, members: list[int], budget_mb: int) -> list[list[int]]:
    """``members`` in order, cut into batches whose solver state (gate/up's or down's, the larger)
    fits ``budget_mb`` MiB (quant.batched.experts_per_chunk)."""
    n_in = 2 * experts.intermediate_size if experts.has_gate else experts.intermediate_size
    per_chunk = min(
        experts_per_chunk(experts.hidden_size, n_in, budget_mb * 2**20),
        experts_per_chunk(experts.intermediate_size, experts.hidden_size, budget_mb * 2**20),
    )
    return [members[i : i + per_chunk] for i in range(0, len(members), per_chunk)]


@torch.no_grad()
def solve_expert_chunk(
    experts: ExpertsView,
    routing: LayerRouting | None,
    chunk: list[int],
    spec: QuantSpec,
    solver: str,
    damps: list[float],
    cfg: QuantizeConfig,
    phase=None,
    h_in: torch.Tensor | None = None,
    report_errors: bool = True,
) -> ChunkResult:
    """Quantize the experts of ``chunk`` (one width, one solver: ``gptq`` or ``rtn``) as one batch.

    The order of the per-expert reference (:func:`quantize_expert_reference`): batched Hessians of the
    experts' tokens, batched GPTQ of gate/up, the dequantized gate/up written into the module, then each
    expert's down Hessian from the activations of the QUANTIZED gate/up (as MoEQuant orders it; token
    block by token block, ``down_hessian``), batched GPTQ of down. The module keeps the quantized
    gate/up; down is left as it was. ``phase(name)``: a context manager timing ``hessian`` and ``solve``.
    ``h_in``: the chunk's input Hessians when the caller already has them (the profiling sweep solves
    the same chunk at several widths). ``report_errors``: also measure each expert's output error for
    the report (:func:`expert_errors`).
    """
    phase = phase or (lambda _name: _no_phase())
    gate_up = torch.stack([canonical_expert(experts, e)[0] for e in chunk]).float()  # [E_c, 2I, H]
    down = torch.stack([canonical_expert(experts, e)[1] for e in chunk]).float()  # [E_c, H, I]
    if routing is None:
        segments = [(gate_up.new_zeros(0, experts.hidden_size), gate_up.new_zeros(0)) for _ in chunk]
    else:
        with phase("hessian"):
            segments = expert_segments(routing, chunk, cfg.calibrate_all_experts, cfg.agq)
    if solver == "rtn":
        with phase("solve"):
            q_gu = rtn(gate_up, spec)  # grid.rtn takes stacks: same values as expert by expert
            q_down = rtn(down, spec)
        _write_chunk_gate_up(experts, chunk, q_gu)
        errors = expert_errors(experts, chunk, gate_up, q_gu, down, q_down, segments) if report_errors else []
        return ChunkResult(q_gu, q_down, errors)
    if h_in is None:
        with phase("hessian"):
            h_in = expert_hessians(segments, experts.hidden_size)
    with phase("solve"):
        q_gu, _ = gptq_quantize_batched(gate_up, h_in, spec, damps, act_order=cfg.act_order)
    _write_chunk_gate_up(experts, chunk, q_gu)
    with phase("hessian"):
        h_down = torch.zeros(len(chunk), experts.intermediate_size, experts.intermediate_size, device=gate_up.device)
        for j, e in enumerate(chunk):
            down_hessian(experts, e, *segments[j], out=h_down[j])
    with phase("solve"):
        q_down, _ = gptq_quantize_batched(down, h_down, spec, damps, act_order=cfg.act_order)
    errors = expert_errors(experts, chunk, gate_up, q_gu, down, q_down, segments, (h_in, h_down)) if report_errors else []
    return ChunkResult(q_gu, q_down, errors)


def _write_chunk_gate_up(experts: ExpertsView, chunk: list[int], q_gu: QuantResult) -> None:
    deq_gu = q_gu.dequantized()
    for j, e in enumerate(chunk):
        _write_gate_up(experts, e, deq_gu[j])


def expert_errors(
    experts: ExpertsView, chunk: list[int], gate_up: torch.Tensor, q_gu: QuantResult, down: torch.Tensor,
    q_down: QuantResult, segments: list[tuple[torch.Tensor, torch.Tensor]],
    hessians: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[float]:
    """The report's error of each expert of ``chunk``: the relative output error of gate_up and of
    down (on the quantized gate/up's activations), averaged, over the expert's calibration tokens
    weighted as its Hessians weight them (AGQ affinities), from the Hessians
    (``quant.gptq.relative_output_error``: every token, no stored activations). ``hessians``: the
    chunk's (gate/up, down) Hessians when GPTQ built them; RTN chunks build small ones from the first
    ``ERROR_TOKENS`` tokens of each expert, one expert at a time. Experts without tokens get the
    weight-space error."""
    deq_gu, deq_down = q_gu.dequantized(), q_down.dequantized()
    errors = []
    for j, e in enumerate(chunk):
        if hessians is not None:
            h_gu, h_down = hessians[0][j], hessians[1][j]
        else:
            x, c = (t[:ERROR_TOKENS] for t in segments[j])
            h_gu = _hessian(x, c, experts.hidden_size).to(gate_up.device)
            h_down = down_hessian(experts, e, x, c).to(gate_up.device)
        errors.append(0.5 * (relative_output_error(gate_up[j], deq_gu[j], h_gu) + relative_output_error(down[j], deq_down[j], h_down)))
    return errors


# --------------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------------


def linears_to_quantize(cfg: QuantizeConfig, layer: nn.Module, block: MoEBlockView | None) -> dict[str, tuple[nn.Linear, int]]:
    """name (relative to the decoder layer) -> (module, bits) for the attention and shared-expert
    linears ``cfg`` quantizes (works on the meta skeleton: shapes only)."""
    chosen = {}
    shared_bits = cfg.shared_expert_bits if cfg.shared_expert_bits is not None else cfg.bits
    for name, module in layer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if block is not None and name.startswith(block.block_name + "."):
            rel = name[len(block.block_name) + 1 :]
            if block.shared_name and rel.startswith(block.shared_name + ".") and shared_bits != UNQUANTIZED:
                chosen[name] = (module, shared_bits)
            continue  # routers, shared_expert_gate: never quantized
        if ".self_attn." in f".{name}." or name.startswith("self_attn") or "attn" in name.split(".")[0]:
            if cfg.attention_bits is not None and cfg.attention_bits != UNQUANTIZED:
                chosen[name] = (module, cfg.attention_bits)
    return chosen  # every input dimension packs (kpack-v2 pads K to a multiple of 32)


def _in_shared_expert(block: MoEBlockView | None, name: str) -> bool:
    """Whether the linear ``name`` (relative to the decoder layer) belongs to ``block``'s shared expert."""
    return block is not None and bool(block.shared_name) and name.startswith(f"{block.block_name}.{block.shared_name}.")


def check_group_size_fits(cfg: QuantizeConfig, layers: nn.Module, blocks: dict, whole_groups: bool = False) -> None:
    """Before any work: ``cfg.group_size`` suits (``format.group_size_problem``: at most K; a partial last
    group is fine) the input dimension K of every matrix the pass will pack -- the routed experts' H
    and I, and each quantized attention or shared-expert linear. ``whole_groups``: G must also divide
    every K (what a compressed-tensors export needs). The refusal names the first matrix refused and
    suggests sizes that suit every matrix of the model. ``layers``: the decoder layers (meta is fine);
    ``blocks``: layer -> MoE block view."""
    dims: list[tuple[int, str, int]] = []
    for index, layer in enumerate(layers):
        block = blocks.get(index)
        if block is not None:
            dims += [(index, "experts", block.experts.hidden_size), (index, "experts", block.experts.intermediate_size)]
        dims += [(index, name, module.in_features) for name, (module, _) in linears_to_quantize(cfg, layer, block).items()]
    for index, name, k in dims:
        if group_size_problem(k, cfg.group_size, whole_groups) is not None:
            problem = group_size_problem([k, *(d[2] for d in dims)], cfg.group_size, whole_groups)
            raise MoeCompressError(f"--group-size: {problem} (layer {index} {name})")


class QuantizePass:
    """LayerPass quantizing routed experts (and optionally attention / shared experts) of each layer."""

    # After a prune or merge pass in the same sweep, the Hessians must come from the layer as pruned.
    observes_changes = True

    def __init__(self, cfg: QuantizeConfig, model_config, dtype: torch.dtype = torch.float32):
        cfg.validate()
        self.cfg = cfg
        self.model_config = model_config
        self.dtype = dtype
        self.report = QuantizeReport()
        self.device = resolve_device(cfg.device)  # chosen once for the whole run
        self.modules: dict[str, dict] = {}  # module path -> packed description (for the config)
        self._experts_store: _ExpertInputs | None = None
        self._linear_inputs = LinearInputHessians(self.device)

    # -- observation ---------------------------------------------------------------------------------

    def _linears_to_quantize(self, ctx: LayerContext) -> dict[str, tuple[nn.Linear, int]]:
        """name (relative to the layer) -> (module, bits) for attention and shared-expert linears."""
        return linears_to_quantize(self.cfg, ctx.layer, ctx.block)

    def attach(self, ctx: LayerContext) -> list:
        handles = []
        self.report.timer = ctx.timer
        if self.device.type == "cuda":
            ctx.timer.sync = torch.cuda.synchronize
        if ctx.block is not None:
            self._experts_store, h = record_expert_inputs(ctx.block, ctx.storage_dtype or torch.float32)
            handles += h
        self._linear_inputs = LinearInputHessians(self.device)
        if self.cfg.method == "gptq":
            for name, (module, _bits) in self._linears_to_quantize(ctx).items():
                if not _in_shared_expert(ctx.block, name):  # those are observed in process (_observe_shared_expert)
                    handles.append(module.register_forward_pre_hook(self._linear_inputs.hook(name, module.in_features)))
        return handles

    def observation_end(self, ctx: LayerContext) -> nn.Module | None:
        """The observation forward may end where the routed experts would run: by then the router
        has run and the experts' inputs are recorded, and attention (before the MoE block in every
        supported family) has fed its linears' Hessians; the experts' compute and the rest of the
        layer would only make outputs that the re-run after quantization replaces. The shared
        expert, which DeepSeek, GLM4 and others call after the routed ones, is observed in
        ``process`` from the recorded inputs instead (:meth:`_observe_shared_expert`). A full
        forward when the layer has no MoE block. ``process`` checks every Hessian saw every batch."""
        if ctx.block is None:
            return None
        return ctx.block.experts.module

    @torch.no_grad()
    def _observe_shared_expert(self, ctx: LayerContext) -> None:
        """The quantized shared-expert linears' Hessians, from the routed experts' recorded inputs:
        every supported family feeds its shared expert the MoE block's input, the very tokens the
        routed experts get, so running the shared expert on them batch by batch feeds its linears'
        hooks what the full forward would have (in the run's storage dtype, as the routed experts'
        Hessians; tests/passes/test_quantize.py compares with a full observation). Saves the routed
        experts' compute in the observation forward: about half of it on DeepSeek-V3."""
        block, store = ctx.block, self._experts_store
        if self.cfg.method != "gptq" or block is None or block.shared is None or store is None:
            return
        shared = {name: module for name, (module, _bits) in self._linears_to_quantize(ctx).items() if _in_shared_expert(block, name)}
        if not shared:
            return
        handles = [m.register_forward_pre_hook(self._linear_inputs.hook(name, m.in_features)) for name, m in shared.items()]
        try:
            with self._phase("hessian"):
                for x in store.x:
                    block.shared(ctx.computable(x))
        finally:
            for h in handles:
                h.remove()

    def rerun_context(self, ctx: LayerContext):
        """The re-run of the quantized layer dequantizes each packed expert once, not once per batch."""
        experts = ctx.layer.get_submodule(ctx.block.experts_name) if ctx.block is not None else None
        return experts.reuse_dequantized() if isinstance(experts, PackedExperts) else _no_phase()

    # -- processing ----------------------------------------------------------------------------------

    def process(self, ctx: LayerContext) -> bool:
        self._observe_shared_expert(ctx)
        self._linear_inputs.check(len(ctx.inputs))
        changed = False
        layer_prefix = f"{ctx.model.view.layers_name}.{ctx.index}" if ctx.model is not None else f"layers.{ctx.index}"
        for name, (module, bits) in self._linears_to_quantize(ctx).items():
            self._quantize_linear(ctx, name, module, bits, layer_prefix)
            changed = True
        if ctx.block is not None:
            self._quantize_experts(ctx, layer_prefix)
            changed = True
        self._experts_store = None
        self._linear_inputs = LinearInputHessians(self.device)
        return changed

    def _quantize_linear(self, ctx: LayerContext, name: str, module: nn.Linear, bits: int, layer_prefix: str) -> None:
        spec = self.cfg.spec(bits)
        spec.validate(module.in_features, packable=True)
        w = module.weight.detach().float().to(self.device)
        acc = self._linear_inputs.by_name.get(name)
        method = "gptq" if (self.cfg.method == "gptq" and acc is not None and acc.tokens) else "rtn"
        h = acc.h if method == "gptq" else None
        with self._phase("solve"):
            result = quantize_matrix(w, h, spec, method, self.cfg.damp, self.cfg.act_order)
        with self._phase("pack"):
            packed = _expert_result_cpu(result).packed()
        bias = module.bias.detach() if module.bias is not None else None
        new = PackedLinear.from_packed(packed, bias, self.dtype)
        ctx.layer.set_submodule(name, new)
        self.modules[f"{layer_prefix}.{name}"] = {
            "type": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bits": bits,
            "group_size": packed.group_size,
            "symmetric": spec.symmetric,
            "bias": bias is not None,
        }
        self.report.linears.append(
            {"layer": ctx.index, "module": name, "bits": bits, "method": method, "rel_error": relative_output_error(w, result.dequantized(), acc.h if acc is not None else torch.zeros(module.in_features, module.in_features))}
        )

    @torch.no_grad()
    def _quantize_experts(self, ctx: LayerContext, layer_prefix: str) -> None:
        """All experts of the layer, batched: one routed-token gather, then per (width, solver) group
        and memory-sized chunk, batched Hessians and batched GPTQ (gate/up, then down on the quantized
        gate/up's activations). Same results as quantizing expert by expert (``quantize_expert_reference``,
        tests/passes/test_quantize.py compares the checkpoints)."""
        block, store, cfg = ctx.block, self._experts_store, self.cfg
        experts = block.experts
        widths = cfg.widths_for(ctx.index, experts.num_experts)
        spec_e = self._experts_spec(experts, widths)
        packed = PackedExperts(spec_e, dtype=self.dtype)
        with self._phase("hessian"):
            routing = self._routing(store, experts.num_experts)
        self._experts_store = store = None  # gathered: the per-batch copies can go
        counts = routing.routed_counts() if routing is not None else [0] * experts.num_experts
        total_tokens = routing.num_tokens if routing is not None else 0
        slot_of = _slots(widths)
        records: dict[int, ExpertRecord] = {}
        groups: dict[tuple[int, str], list[int]] = {}
        damps: dict[int, float] = {}
        for e in range(experts.num_experts):
            if experts.has_bias:
                gu_bias, d_bias = canonical_expert(experts, e)[2:]
                packed.gate_up_bias[e].copy_(gu_bias)
                packed.down_bias[e].copy_(d_bias)
            if widths[e] == UNQUANTIZED:
                gate_up, down = canonical_expert(experts, e)[:2]
                getattr(packed, f"w{widths[e]}_gate_up")[slot_of[e]].copy_(gate_up)
                getattr(packed, f"w{widths[e]}_down")[slot_of[e]].copy_(down)
                records[e] = ExpertRecord(ctx.index, e, widths[e], counts[e], "kept", 0.0)
                continue
            method, damps[e] = expert_method(cfg, counts[e], total_tokens)
            solver = "rtn" if method in ("rtn", "fallback:rtn") else "gptq"
            groups.setdefault((widths[e], solver), []).append(e)
            records[e] = ExpertRecord(ctx.index, e, widths[e], counts[e], method, 0.0)
        ranks = parallel.current()
        owner = expert_owners(groups, counts, total_tokens, experts, cfg, ranks.world)
        with self._on_device(experts):
            for (bits, solver), members in sorted(groups.items()):
                mine = [e for e in members if owner[e] == ranks.rank]
                for chunk in self._chunks(experts, mine):
                    errors = self._solve_chunk(experts, routing, chunk, bits, solver, [damps[e] for e in chunk], packed, slot_of)
                    for e, err in zip(chunk, errors):
                        records[e].rel_error = err
                self.report.solved_here += len(mine)
        if ranks.distributed:
            with self._phase("share"):
                share_packed_experts(packed, groups, owner, slot_of, records, ranks)
        self.report.experts.extend(records[e] for e in range(experts.num_experts))
        ctx.layer.set_submodule(block.experts_name, packed)
        self.modules[f"{layer_prefix}.{block.experts_name}"] = {"type": "experts", **spec_e.as_json()}

    def _experts_spec(self, experts: ExpertsView, widths: list[int]) -> ExpertsSpec:
        activation, act_params = activation_of(experts, self.model_config)
        spec_e = ExpertsSpec(
            num_experts=experts.num_experts,
            hidden_size=experts.hidden_size,
            intermediate_size=experts.intermediate_size,
            bits=tuple(widths),
            group_size=self.cfg.group_size,
            symmetric=self.cfg.symmetric,
            has_gate=experts.has_gate,
            has_bias=experts.has_bias,
            activation=activation,
            act_params=tuple(sorted(act_params.items())),
        )
        for b in set(widths) - {UNQUANTIZED}:
            self.cfg.spec(b).validate(experts.hidden_size, packable=True)
            self.cfg.spec(b).validate(experts.intermediate_size, packable=True)
        return spec_e

    def _routing(self, store: _ExpertInputs | None, num_experts: int) -> LayerRouting | None:
        """The layer's tokens and routing on the solver device (None when no calibration reached it)."""
        if store is None or not store.x:
            return None
        pin = self.device.type == "cuda"  # the tokens go to the GPU: gather them where a DMA can read them
        return gather_routing(store.x, store.index, store.weights, store.probs, num_experts, release_inputs=True, pin=pin).to(self.device)

    def _chunks(self, experts: ExpertsView, members: list[int]) -> list[list[int]]:
        return expert_chunks(experts, members, solve_memory_mb_for(self.cfg, self.device))

    def _solve_chunk(
        self, experts: ExpertsView, routing: LayerRouting | None, chunk: list[int], bits: int, solver: str,
        damps: list[float], packed: PackedExperts, slot_of: dict[int, int],
    ) -> list[float]:
        """Quantize the experts of ``chunk`` (same width and solver) and store them packed; returns
        their relative output errors (gate_up and down averaged)."""
        res = solve_expert_chunk(experts, routing, chunk, self.cfg.spec(bits), solver, damps, self.cfg, self._phase)
        with self._phase("pack"):
            for j, e in enumerate(chunk):
                self._store_packed(packed, bits, slot_of[e], _expert_result(res.gate_up, j), _expert_result(res.down, j))
        return res.errors

    def _phase(self, name: str):
        timer = self.report.timer
        return timer.phase(name) if timer is not None else _no_phase()

    @contextmanager
    def _on_device(self, experts: ExpertsView):
        """Run the block inside on the solver device: the experts module visits it (the view reads its
        parameters in place) and goes back to the CPU after, whatever happens."""
        if self.device.type == "cpu":
            yield
            return
        home = experts.module.down_proj.device
        experts.module.to(self.device)
        try:
            yield
        finally:
            experts.module.to(home)

    @staticmethod
    def _store_packed(packed: PackedExperts, bits: int, slot: int, q_gu: QuantResult, q_down: QuantResult) -> None:
        for proj, result in (("gate_up", q_gu), ("down", q_down)):
            p = result.packed()
            getattr(packed, f"w{bits}_{proj}_qweight")[slot].copy_(p.qweight)
            getattr(packed, f"w{bits}_{proj}_scales")[slot].copy_(p.scales)
            if p.zeros is not None:
                getattr(packed, f"w{bits}_{proj}_zeros")[slot].copy_(p.zeros)


def expert_owners(groups: dict[tuple[int, str], list[int]], counts: list[int], total_tokens: int,
                  experts: ExpertsView, cfg: QuantizeConfig, world: int) -> list[int]:
    """The rank that solves each expert under torchrun (parallel.owners: LPT on estimated cost); all
    zeros for one process. Cost: the GPTQ Hessian and activation GEMMs over the expert's tokens (every
    token with calibrate-all) plus the solve; RTN costs one pass over the weights."""
    if world == 1:
        return [0] * experts.num_experts
    h, n_in, i = experts.hidden_size, (2 if experts.has_gate else 1) * experts.intermediate_size, experts.intermediate_size
    costs = [0.0] * experts.num_experts
    for (_bits, solver), members in groups.items():
        for e in members:
            if solver == "rtn":
                costs[e] = float(h * n_in + i * h)
            else:
                tokens = total_tokens if cfg.calibrate_all_experts else counts[e]
                costs[e] = float(tokens * (h * h + h * n_in + i * i) + n_in * h * h + h * i * i)
    return parallel.owners(costs, world)


def share_packed_experts(packed: PackedExperts, groups: dict[tuple[int, str], list[int]], owner: list[int],
                         slot_of: dict[int, int], records: dict[int, "ExpertRecord"], ranks: parallel.Ranks) -> None:
    """Give every rank every quantized expert's packed tensors (and report error), each from its owner,
    bit for bit (parallel.share_results)."""
    widths = {e: bits for (bits, _solver), members in groups.items() for e in members}

    def slot_tensors(e: int) -> dict[str, torch.Tensor]:
        bits, out = widths[e], {}
        for proj in ("gate_up", "down"):
            for kind in ("qweight", "scales", "zeros"):
                buffer = getattr(packed, f"w{bits}_{proj}_{kind}", None)
                if buffer is not None:
                    out[f"{proj}_{kind}"] = buffer[slot_of[e]]
        return out

    mine = {e: (slot_tensors(e), records[e].rel_error) for e in widths if owner[e] == ranks.rank}
    units = sorted(widths)  # share_results indexes units 0..n-1
    unit_of = {e: u for u, e in enumerate(units)}
    shared = parallel.share_results({unit_of[e]: v for e, v in mine.items()}, [owner[e] for e in units], ranks)
    for u, (tensors, rel_error) in shared.items():
        e = units[u]
        for name, value in slot_tensors(e).items():
            value.copy_(tensors[name])
        records[e].rel_error = rel_error


def _slots(widths: list[int]) -> dict[int, int]:
    """Expert -> its slot among the layer's experts of the same width (PackedExperts stores each width's
    experts in expert order)."""
    seen: dict[int, int] = {}
    slots = {}
    for e, b in enumerate(widths):
        slots[e] = seen.get(b, 0)
        seen[b] = slots[e] + 1
    return slots


def _expert_result(stacked: QuantResult, j: int) -> QuantResult:
    """Expert j of a stacked result, on the CPU (the packed module's buffers live there)."""
    zeros = None if stacked.zeros is None else stacked.zeros[j]
    return _expert_result_cpu(QuantResult(stacked.codes[j], stacked.scales[j], zeros, stacked.spec))


def _expert_result_cpu(result: QuantResult) -> QuantResult:
    """The result's tensors on the CPU, where the model and the packed modules live (no copy when there)."""
    zeros = None if result.zeros is None else result.zeros.cpu()
    return QuantResult(result.codes.cpu(), result.scales.cpu(), zeros, result.spec)


@contextmanager
def _no_phase():
    yield
