"""Profiling sweep for mixed precision (MC-MoE PMQ): per MoE layer and expert, importance and the
output error of quantizing that expert ALONE at each candidate width.

Shape legend: T tokens of the layer (all calibration batches), T_e tokens routed to expert e,
E experts, H hidden size, I expert intermediate size, k top-k, B candidate widths.

Per MoE layer (through the layer-by-layer driver; the sweep never changes the model, so every layer
sees the original model's inputs and the profile does not depend on any allocation):

* ``freq [E]``         phi: how often each expert is in a token's top-k;
* ``weight_mass [E]``  w: sum over the tokens selecting the expert of its router probability BEFORE
  top-k renormalisation (softmax over all experts; sigmoid scores for DeepSeek-style routers);
* ``errors [E, B]``    eps_{e,b} = ||Y - Y_hat||_F (Frobenius, not squared) of the experts module's
  output over all calibration tokens when only expert e is quantized at width b;
* ``output_max [E]``   max |f_e(x)| over routed tokens (the super-expert statistic), and the shared
  expert's max |output| per layer.

The shortcut. The experts module computes ``Y[t] = sum_{e in topk(t)} g_{t,e} f_e(x_t)`` with the
routing ``(top_k_index, top_k_weights)`` fixed by the router, which is not quantized and sees the
same inputs. Quantizing only expert i replaces ``f_i`` by ``f_i_hat`` and nothing else, so
``Y - Y_hat`` is zero on tokens not routed to i and ``g_{t,i} (f_i(x_t) - f_i_hat(x_t))`` on the
tokens routed to i. Hence ``eps_{i,b} = ||g_i * (f_i(X_i) - f_i_hat(X_i))||_F`` is computed from
expert i's routed tokens alone (T_e rows instead of re-running the whole block on T rows, E * B
times). Shared experts and residual additions are identical in Y and Y_hat, so this is also the
difference of the MoE block's and of the decoder layer's outputs (for families whose block adds the
routed output linearly, i.e. every family the view supports). tests/passes/test_profile.py checks it
against a full block re-run. We measure over all calibration tokens at once; MC-MoE sums per-batch
norms, which depends on the batch size.

Quantizer: RTN (MC-MoE's choice, fast) or GPTQ as the quantize pass runs it (same Hessians, AGQ,
calibrate-all-experts, down projection calibrated on the quantized gate/up's activations), so the
errors are those of the quantizer that will really be used.

Files: :meth:`ExpertProfile.save` writes ``profile.safetensors`` (tensors ``layer{i}.{name}``) and
``profile.json`` (version, model, settings, calibration); :meth:`ExpertProfile.load` reads them back.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moecompress.analysis.super_experts import SuperExpert, detect_super_experts
from moecompress.errors import MoeCompressError
from moecompress.model.driver import LayerContext, run_layerwise
from moecompress.model.loading import LayerwiseModel
from moecompress.model.view import ExpertsView, MoEBlockView
from moecompress.passes.quantize import (
    QuantizeConfig,
    canonical_expert,
    down_hessian,
    expert_chunks,
    expert_method,
    expert_tokens,
    quantize_matrix,
    record_expert_inputs,
    solve_expert_chunk,
    solve_memory_mb_for,
)
from moecompress.quant.batched import LayerRouting, expert_hessians, expert_segments, gather_routing
from moecompress.quant.format import SUPPORTED_BITS
from moecompress.quant.gptq import accumulate_hessian, make_empty_hessian

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
PROFILE_JSON = "profile.json"
PROFILE_TENSORS = "profile.safetensors"
PROFILE_METHODS = ("rtn", "gptq")
SUPER_EXPERT_LAYER_FRACTION = 0.75  # as the stats collector (ALGORITHMS.md section 4)


# --------------------------------------------------------------------------------------------------
# Plain tensor math
# --------------------------------------------------------------------------------------------------


def routing_importance(top_k_index: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MC-MoE's phi and w of one batch: top_k_index [T, k], probs [T, E] (before renormalisation)
    -> (selections [E] float64, sum of probs over the selecting tokens [E] float64)."""
    num_experts = probs.shape[-1]
    idx = top_k_index.reshape(-1, top_k_index.shape[-1]).long()  # [T, k]
    valid = (idx >= 0) & (idx < num_experts)
    selected = torch.zeros(idx.shape[0], num_experts + 1, dtype=torch.float64)
    selected.scatter_(1, torch.where(valid, idx, num_experts), 1.0)  # sentinel column E for invalid ids
    selected = selected[:, :num_experts]  # [T, E], 1 where e is in t's top-k
    mass = (selected * probs.reshape(-1, num_experts).double()).sum(0)  # [E]
    return selected.sum(0), mass


def routed_output_error(weights: torch.Tensor, ref: torch.Tensor, approx: torch.Tensor) -> float:
    """||g * (f - f_hat)||_F over routed tokens: weights [T_e], ref and approx [T_e, H] -> float.

    Equal to ||Y - Y_hat||_F of the experts module when only this expert changed (module docstring)."""
    if ref.shape[0] == 0:
        return 0.0
    diff = (ref.double() - approx.double()) * weights.double().unsqueeze(-1)  # [T_e, H]
    return float(torch.linalg.vector_norm(diff))


def routed_tokens(
    xs: list[torch.Tensor], indices: list[torch.Tensor], weights: list[torch.Tensor], e: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's routed tokens and applied routing weights over all batches.

    xs[b] [T_b, H], indices[b] / weights[b] [T_b, k] -> (x_e [T_e, H], g_e [T_e]). A token routed to
    e twice (never in practice) counts its summed weight once, as the experts module adds it twice."""
    x_parts, g_parts = [], []
    for x, idx, w in zip(xs, indices, weights):
        hit = idx == e  # [T_b, k]
        routed = hit.any(dim=-1)  # [T_b]
        x_parts.append(x[routed])
        g_parts.append((w.float() * hit).sum(dim=-1)[routed])
    if not x_parts:
        return torch.zeros(0, 0), torch.zeros(0)
    return torch.cat(x_parts), torch.cat(g_parts)


def expert_weight_count(hidden_size: int, intermediate_size: int, has_gate: bool) -> int:
    """Quantized weights of one expert: gate_up [2I (or I), H] plus down [H, I] (biases stay dense)."""
    n_in = 2 * intermediate_size if has_gate else intermediate_size
    return n_in * hidden_size + hidden_size * intermediate_size


def _weighted_hessian(x: torch.Tensor, c: torch.Tensor, k: int) -> torch.Tensor:
    """GPTQ Hessian [K, K] of inputs x [T, K] weighted by c [T] (zeros when there are no tokens)."""
    h = make_empty_hessian(k)
    if x.shape[0]:
        h, _ = accumulate_hessian(h, x, 0, c)
    return h


# --------------------------------------------------------------------------------------------------
# Quantizing one expert in place (and putting it back)
# --------------------------------------------------------------------------------------------------


def _write_canonical(experts: ExpertsView, e: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Write canonical gate_up [2I, H] (gate rows then up; [I, H] when gateless) and down [H, I]."""
    if experts.has_gate:
        i = experts.intermediate_size
        experts.set(e, "gate", gate_up[:i])
        experts.set(e, "up", gate_up[i:])
    else:
        experts.set(e, "up", gate_up)
    experts.set(e, "down", down)


@dataclass
class _ExpertCalibration:
    """What GPTQ needs for one expert (None for RTN): inputs x [T_c, H], weights c [T_c], Hessian of x."""

    x: torch.Tensor
    c: torch.Tensor
    h_in: torch.Tensor
    solver: str
    damp: float


@torch.no_grad()
def quantize_expert_in_place(
    experts: ExpertsView, e: int, bits: int, cfg: QuantizeConfig, calib: _ExpertCalibration | None
) -> None:
    """Replace expert e's gate/up/down in the module by their quantize-dequantize at ``bits``.

    RTN when ``calib`` is None; GPTQ otherwise, ordered as the quantize pass does it (gate/up first,
    then down calibrated on the activations of the quantized gate/up)."""
    gate_up, down, _, _ = canonical_expert(experts, e)
    gate_up, down = gate_up.float().clone(), down.float().clone()
    spec = cfg.spec(bits)
    if calib is None or calib.solver == "rtn":
        q_gu = quantize_matrix(gate_up, None, spec, "rtn", cfg.damp, cfg.act_order)
        q_down = quantize_matrix(down, None, spec, "rtn", cfg.damp, cfg.act_order)
        _write_canonical(experts, e, q_gu.dequantized(), q_down.dequantized())
        return
    q_gu = quantize_matrix(gate_up, calib.h_in, spec, "gptq", calib.damp, cfg.act_order)
    _write_canonical(experts, e, q_gu.dequantized(), down)
    h_down = down_hessian(experts, e, calib.x, calib.c)
    q_down = quantize_matrix(down, h_down, spec, "gptq", calib.damp, cfg.act_order)
    experts.set(e, "down", q_down.dequantized())


# --------------------------------------------------------------------------------------------------
# Containers and files
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerProfile:
    """The profile of one MoE layer (decoder layer index ``layer``); tensors float64 on CPU."""

    layer: int
    tokens: int
    freq: torch.Tensor  # [E] selections
    weight_mass: torch.Tensor  # [E] sum of pre-renormalisation router probabilities over selections
    errors: torch.Tensor  # [E, B] eps per candidate width (ExpertProfile.bit_choices order)
    params: torch.Tensor  # [E] quantized weights per expert (gate + up + down)
    output_max: torch.Tensor  # [E] max |f_e(x)| over routed tokens
    shared_output_max: float | None = None

    @property
    def num_experts(self) -> int:
        return int(self.freq.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n).contiguous() for n in ("freq", "weight_mass", "errors", "params", "output_max")}
        if self.shared_output_max is not None:
            out["shared_output_max"] = torch.tensor([self.shared_output_max], dtype=torch.float64)
        return out


@dataclass
class ExpertProfile:
    """Profiles of every MoE layer of a model (see the module docstring)."""

    model: str
    num_layers: int
    bit_choices: tuple[int, ...]
    method: str
    group_size: int
    symmetric: bool
    calibration: dict
    layers: dict[int, LayerProfile] = field(default_factory=dict)
    seconds: float | None = None  # wall time of the sweep (not part of the file's identity)

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.layers)

    def errors_for(self, bit_choices: tuple[int, ...]) -> list[torch.Tensor]:
        """errors[l] [E_l, len(bit_choices)] in the order of ``bit_choices`` (a subset of ours)."""
        missing = [b for b in bit_choices if b not in self.bit_choices]
        if missing:
            raise MoeCompressError(
                f"the profile measured widths {list(self.bit_choices)}, not {missing}; re-profile with those "
                "--bit-choices (or drop --stats)"
            )
        cols = [self.bit_choices.index(b) for b in bit_choices]
        return [self.layers[i].errors[:, cols] for i in self.moe_layers]

    def super_experts(self, percentile: float = 99.5, ratio: float = 0.1) -> list[SuperExpert]:
        """Super experts from the profile's output_max (the criterion of analysis/super_experts.py)."""
        cutoff = round(SUPER_EXPERT_LAYER_FRACTION * self.num_layers)
        pooled = {i: p.output_max for i, p in self.layers.items() if i < cutoff}
        if not pooled:
            return []
        shared = {i: p.shared_output_max for i, p in self.layers.items() if i < cutoff and p.shared_output_max is not None}
        return detect_super_experts(
            pooled, self.num_layers, percentile, ratio, SUPER_EXPERT_LAYER_FRACTION, shared_output_max=shared
        )

    def describe(self) -> dict:
        return {
            "version": PROFILE_VERSION,
            "model": self.model,
            "num_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "experts": [self.layers[i].num_experts for i in self.moe_layers],
            "bit_choices": list(self.bit_choices),
            "method": self.method,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "calibration": self.calibration,
            "tokens": [self.layers[i].tokens for i in self.moe_layers],
        }

    def save(self, folder: str | Path) -> Path:
        """Write the profile into ``folder``. Inside a job's staging folder the output contract covers it;
        ``--stats DIR`` (a folder the user gave, receiving the profile for later runs) is written file by
        file through temporary names, the JSON last: it marks the profile present, so a kill at any
        instant leaves the old profile, none, or the new one whole, never a mix."""
        import os

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer{i}.{n}": t for i in self.moe_layers for n, t in self.layers[i].tensors().items()}
        tmp_tensors = folder / f".{PROFILE_TENSORS}.tmp-{os.getpid()}"
        tmp_json = folder / f".{PROFILE_JSON}.tmp-{os.getpid()}"
        try:
            # one metadata key: safetensors writes a multi-key metadata map in random order
            save_file(tensors, str(tmp_tensors), metadata={"format": f"moecompress-profile-v{PROFILE_VERSION}"})
            tmp_json.write_text(json.dumps(self.describe(), indent=1))
            (folder / PROFILE_JSON).unlink(missing_ok=True)  # no JSON = no profile while the tensors change
            os.replace(tmp_tensors, folder / PROFILE_TENSORS)
            os.replace(tmp_json, folder / PROFILE_JSON)
        finally:
            tmp_tensors.unlink(missing_ok=True)
            tmp_json.unlink(missing_ok=True)
        return folder / PROFILE_JSON

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / PROFILE_JSON).is_file()

    @classmethod
    def load(cls, folder: str | Path) -> ExpertProfile:
        folder = Path(folder)
        path = folder / PROFILE_JSON
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise MoeCompressError(f"{path} not found; profile the model first (run quantize --bits-budget with --stats {folder})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MoeCompressError(f"{path} is not valid JSON ({exc}); delete it to re-profile") from None
        if not isinstance(meta, dict) or meta.get("version") != PROFILE_VERSION:
            raise MoeCompressError(f"{path} is not a version-{PROFILE_VERSION} moecompress profile; delete it to re-profile")
        try:
            tensors = load_file(str(folder / PROFILE_TENSORS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise MoeCompressError(f"cannot read {folder / PROFILE_TENSORS} ({exc}); delete profile.json to re-profile") from None
        layers = {}
        for i, tokens in zip(meta["moe_layers"], meta["tokens"]):
            def get(name: str, required: bool = True):
                key = f"layer{i}.{name}"
                if key not in tensors and required:
                    raise MoeCompressError(f"{folder / PROFILE_TENSORS} lacks {key}; delete profile.json to re-profile")
                return tensors.get(key)

            shared = get("shared_output_max", required=False)
            layers[int(i)] = LayerProfile(
                int(i), int(tokens), get("freq"), get("weight_mass"), get("errors"), get("params"), get("output_max"),
                None if shared is None else float(shared.reshape(-1)[0]),
            )
        return cls(
            model=meta["model"], num_layers=int(meta["num_layers"]), bit_choices=tuple(meta["bit_choices"]),
            method=meta["method"], group_size=int(meta["group_size"]), symmetric=bool(meta["symmetric"]),
            calibration=meta.get("calibration", {}), layers=layers,
        )


# --------------------------------------------------------------------------------------------------
# The profiling pass
# --------------------------------------------------------------------------------------------------


class ProfilePass:
    """LayerPass measuring :class:`LayerProfile` for every MoE layer; never changes the model."""

    def __init__(self, cfg: QuantizeConfig, bit_choices: tuple[int, ...], method: str = "rtn"):
        if method not in PROFILE_METHODS:
            raise MoeCompressError(f"unknown profile method {method!r}; choose one of {', '.join(PROFILE_METHODS)}")
        bad = [b for b in bit_choices if b not in SUPPORTED_BITS]
        if not bit_choices or bad:
            raise MoeCompressError(f"bit choices {list(bit_choices)} must be non-empty widths from {SUPPORTED_BITS}")
        cfg.validate()
        self.cfg, self.bit_choices, self.method = cfg, tuple(bit_choices), method
        self.layers: dict[int, LayerProfile] = {}
        self._store = None
        self._shared_max: float | None = None

    def attach(self, ctx: LayerContext) -> list:
        block = ctx.block
        if block is None:
            return []
        experts = block.experts
        for b in self.bit_choices:  # fail before the sweep, not in the middle of it
            self.cfg.spec(b).validate(experts.hidden_size, packable=True)
            self.cfg.spec(b).validate(experts.intermediate_size, packable=True)
        self._store, handles = record_expert_inputs(block)
        self._shared_max = None
        if block.shared is not None:
            handles.append(block.shared.register_forward_hook(self._on_shared))
        return handles

    def _on_shared(self, _module, _args, out) -> None:
        out = out[0] if isinstance(out, tuple) else out
        value = float(out.detach().abs().max())
        self._shared_max = value if self._shared_max is None else max(self._shared_max, value)

    @torch.no_grad()
    def process(self, ctx: LayerContext) -> bool:
        if ctx.block is None or self._store is None:
            return False
        self.layers[ctx.index] = self.profile_layer(ctx.block, self._store, self._shared_max)
        self._store = None
        return False

    @torch.no_grad()
    def profile_layer(self, block: MoEBlockView, store, shared_max: float | None = None) -> LayerProfile:
        """Profile one MoE layer from its recorded experts inputs (``record_expert_inputs``' store).

        Batched over experts: one routed-token gather for the layer; per (solver, memory-sized chunk)
        the input Hessians once, then at each width the whole chunk quantized together
        (``solve_expert_chunk``, as the quantize pass), every expert's error measured, its weights
        restored. Same numbers as :meth:`profile_layer_reference` (expert by expert, width by width):
        each expert's output only reads its own weights, so quantizing a chunk at once changes nothing.
        """
        experts, cfg = block.experts, self.cfg
        num_e = experts.num_experts
        freq, mass, total_tokens = self._importance(store, num_e)
        errors = torch.zeros(num_e, len(self.bit_choices), dtype=torch.float64)
        out_max = torch.zeros(num_e, dtype=torch.float64)
        params = self._params(experts)
        if not store.x:
            return LayerProfile(block.layer_index, total_tokens, freq, mass, errors, params, out_max, shared_max)
        routing = gather_routing(store.x, store.index, store.weights, store.probs, num_e)
        routed = expert_segments(routing, range(num_e), all_tokens=False, agq=True)  # (x_e, applied g_e)
        active = [e for e in range(num_e) if routed[e][0].shape[0]]  # never routed: eps = 0 at every width
        groups: dict[str, list[int]] = {}
        damps: dict[int, float] = {}
        counts = routing.routed_counts()
        for e in active:
            solver, damps[e] = self._solver(counts[e], total_tokens)
            groups.setdefault(solver, []).append(e)
        for solver, members in sorted(groups.items()):
            for chunk in expert_chunks(experts, members, solve_memory_mb_for(cfg, routing.x.device)):
                self._profile_chunk(experts, routing, routed, chunk, solver, [damps[e] for e in chunk], errors, out_max)
        return LayerProfile(block.layer_index, total_tokens, freq, mass, errors, params, out_max, shared_max)

    def _profile_chunk(
        self, experts: ExpertsView, routing: LayerRouting, routed: list, chunk: list[int], solver: str,
        damps: list[float], errors: torch.Tensor, out_max: torch.Tensor,
    ) -> None:
        """Errors of the experts of ``chunk`` at every width (filled into ``errors`` / ``out_max``)."""
        refs = {e: experts.forward_expert(e, routed[e][0]) for e in chunk}  # [T_e, H]
        for e in chunk:
            out_max[e] = float(refs[e].abs().max())
        originals = {e: [t.detach().clone() for t in canonical_expert(experts, e)[:2]] for e in chunk}
        h_in = None
        if solver == "gptq":
            h_in = expert_hessians(expert_segments(routing, chunk, self.cfg.calibrate_all_experts, self.cfg.agq), experts.hidden_size)
        try:
            for j, bits in enumerate(self.bit_choices):
                res = solve_expert_chunk(experts, routing, chunk, self.cfg.spec(bits), solver, damps, self.cfg, h_in=h_in, report_errors=False)
                deq_down = res.down.dequantized()
                for k, e in enumerate(chunk):
                    experts.set(e, "down", deq_down[k])
                    errors[e, j] = routed_output_error(routed[e][1], refs[e], experts.forward_expert(e, routed[e][0]))
                for e in chunk:  # each width starts from the original weights
                    _write_canonical(experts, e, *originals[e])
        finally:
            for e in chunk:
                _write_canonical(experts, e, *originals[e])

    def _importance(self, store, num_e: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        freq = torch.zeros(num_e, dtype=torch.float64)
        mass = torch.zeros(num_e, dtype=torch.float64)
        for idx, probs in zip(store.index, store.probs):
            f, w = routing_importance(idx, probs)
            freq += f
            mass += w
        return freq, mass, sum(x.shape[0] for x in store.x)

    @staticmethod
    def _params(experts: ExpertsView) -> torch.Tensor:
        count = expert_weight_count(experts.hidden_size, experts.intermediate_size, experts.has_gate)
        return torch.full((experts.num_experts,), float(count), dtype=torch.float64)

    def _solver(self, routed: int, total_tokens: int) -> tuple[str, float]:
        """(solver, damping) of an expert, as :meth:`_calibration` decides it."""
        if self.method == "rtn":
            return "rtn", self.cfg.damp
        method, damp = expert_method(self.cfg, routed, total_tokens)
        return ("rtn" if method in ("rtn", "fallback:rtn") else "gptq"), damp

    @torch.no_grad()
    def profile_layer_reference(self, block: MoEBlockView, store, shared_max: float | None = None) -> LayerProfile:
        """The sweep expert by expert and width by width (the reference the batched sweep is tested against)."""
        experts, cfg = block.experts, self.cfg
        num_e = experts.num_experts
        freq, mass, total_tokens = self._importance(store, num_e)
        errors = torch.zeros(num_e, len(self.bit_choices), dtype=torch.float64)
        out_max = torch.zeros(num_e, dtype=torch.float64)
        params = self._params(experts)
        for e in range(num_e):
            x_e, g_e = routed_tokens(store.x, store.index, store.weights, e)
            if x_e.shape[0] == 0:
                continue  # never routed: Y does not depend on it, eps = 0 at every width
            ref = experts.forward_expert(e, x_e)  # [T_e, H]
            out_max[e] = float(ref.abs().max())
            original = [t.detach().clone() for t in canonical_expert(experts, e)[:2]]
            calib = self._calibration(experts, store, e, total_tokens)
            try:
                for j, bits in enumerate(self.bit_choices):
                    _write_canonical(experts, e, original[0], original[1])  # each width from the original
                    quantize_expert_in_place(experts, e, bits, cfg, calib)
                    errors[e, j] = routed_output_error(g_e, ref, experts.forward_expert(e, x_e))
            finally:
                _write_canonical(experts, e, original[0], original[1])
        return LayerProfile(block.layer_index, total_tokens, freq, mass, errors, params, out_max, shared_max)

    def _calibration(self, experts: ExpertsView, store, e: int, total_tokens: int) -> _ExpertCalibration | None:
        """GPTQ inputs of expert e, exactly as the quantize pass would build them (None for RTN)."""
        if self.method == "rtn":
            return None
        cfg = self.cfg
        x, c, routed = expert_tokens(store, e, cfg.calibrate_all_experts, cfg.agq)
        method, damp = expert_method(cfg, routed, total_tokens)
        solver = "rtn" if method in ("rtn", "fallback:rtn") else "gptq"
        h_in = _weighted_hessian(x, c, experts.hidden_size) if solver == "gptq" else torch.zeros(0)
        return _ExpertCalibration(x, c, h_in, solver, damp)


def profile_experts(
    model_folder: str | Path | LayerwiseModel,
    input_ids: torch.Tensor,
    cfg: QuantizeConfig,
    bit_choices: tuple[int, ...],
    method: str = "rtn",
    calibration: dict | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> ExpertProfile:
    """Run the profiling sweep over ``input_ids [n, L]`` layer by layer (peak memory ~ one layer)."""
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise MoeCompressError(f"profiling needs calibration input_ids [n, seqlen], got shape {tuple(input_ids.shape)}")
    lm = model_folder if isinstance(model_folder, LayerwiseModel) else LayerwiseModel(model_folder)
    lm.require_dense("quantize")
    sweep = ProfilePass(cfg, bit_choices, method)
    start = time.perf_counter()
    run_layerwise(lm, input_ids, [sweep], batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    log.info("profiled %d MoE layers x %d widths in %.1f s", len(sweep.layers), len(bit_choices), seconds)
    return ExpertProfile(
        model=Path(lm.folder).resolve().name,
        num_layers=lm.view.num_layers,
        bit_choices=tuple(bit_choices),
        method=method,
        group_size=cfg.group_size,
        symmetric=cfg.symmetric,
        calibration=calibration or {},
        layers=sweep.layers,
        seconds=seconds,
    )
