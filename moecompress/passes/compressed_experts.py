"""Compressed experts (ALGORITHMS.md section 7): the pass that fits them without retraining.

The block itself, its forward and how a checkpoint rebuilds it are the runtime module
:mod:`moecompress.modules.compressed_experts` (a :class:`CompressedExpertsBlock` wraps a layer's MoE
block and adds ``ces [E, 3, H]``, one compressed expert = three scaling vectors per routed expert);
this module fits ``ces``, and calibrates dynamic skipping (:mod:`moecompress.algorithms.dynamic_skip`).

Fitting (retraining-free): everything frozen but ``ces``; per layer, through the driver, the block input
and the ORIGINAL block output are recorded in the observation forward, then Adam fits ``ces`` to the
MSE between the original and the compressed block outputs; 10% of the tokens are held back to report the
error before and after. The layers are fitted in order and each layer's input comes from the already
compressed previous layers (the driver feeds a finished layer's outputs to the next), so a layer's fit
sees the drift of the earlier ones; its target is the original block applied to that same input.

Optional end-to-end distillation (``distill_steps > 0``, ``distill_ces.py``): after the layer-wise fit,
all layers' ``ces`` are trained jointly on KL(original model || compressed model) over the calibration
tokens. Unlike the layer-wise pass it holds the whole model in float32 (see that module for the memory
figure); the job refuses up front when the estimate exceeds the available memory.

Shape legend: T tokens, E experts, H hidden size, I expert intermediate size, k top-k,
m = k - n_ce main experts, c = n_ce auxiliary experts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from moecompress.algorithms.dynamic_skip import calibrate_beta, calibrate_protect_threshold
from moecompress.errors import MoeCompressError
from moecompress.model.driver import LayerContext
from moecompress.modules.compressed_experts import (
    MODULE_TYPE,
    CompressedExpertsBlock,
    active_expert_params,
    compressed_experts_forward,
    expert_source,
    logical_params,
    params_per_expert,
    wrap_block,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressExpertsConfig:
    n_ce: int = 1
    fit_steps: int = 200
    lr: float = 1e-2
    fit_batch_tokens: int = 4096
    holdout_fraction: float = 0.1
    dynamic_skip: bool = False
    protect_tokens: float = 0.0  # fraction of tokens (largest ||h||_1) never skipped
    seed: int = 0
    distill_steps: int = 0  # end-to-end Adam steps on all layers' ces after the layer-wise fit (0: none)
    distill_lr: float = 1e-2
    distill_batch_size: int = 8  # calibration sequences per distillation step
    distill_top_k: int = 1024  # teacher tokens kept per position (the rest is one tail bucket)

    def validate(self) -> None:
        from moecompress.validation import check_float, check_int

        check_int("--n-ce", self.n_ce, 0, expected=">= 0 (an integer below the model's top-k)")
        check_int("--fit-steps", self.fit_steps, 0, expected=">= 0 (an integer)")
        check_float("--lr", self.lr, 0.0, low_open=True, expected="> 0 and finite")
        check_int("--fit-batch-tokens", self.fit_batch_tokens, 1, expected=">= 1 (an integer)")
        check_float("the held-back fraction (holdout_fraction)", self.holdout_fraction, 0.0, 1.0, high_open=True)
        check_float("--protect-tokens", self.protect_tokens, 0.0, 1.0, high_open=True)
        check_int("--seed", self.seed, expected="an integer")
        check_int("--distill-steps", self.distill_steps, 0, expected=">= 0 (an integer)")
        check_float("--distill-lr", self.distill_lr, 0.0, low_open=True, expected="> 0 and finite")
        check_int("--distill-batch-size", self.distill_batch_size, 1, expected=">= 1 (an integer)")
        check_int("--distill-top-k", self.distill_top_k, 1, expected=">= 1 (an integer)")
        if self.distill_steps > 0 and self.n_ce == 0:
            raise MoeCompressError("--distill-steps needs compressed experts (--n-ce >= 1): with n_ce = 0 there is nothing to train")

    def check_top_k(self, top_k: int, where: str = "the model") -> None:
        if self.n_ce >= top_k:
            raise MoeCompressError(
                f"--n-ce {self.n_ce} must be smaller than top-k ({top_k} in {where}): at least one expert per token must be computed"
            )


@dataclass
class LayerFitRecord:
    """One row of the report."""

    layer: int
    fit_tokens: int
    heldout_tokens: int
    mse_fit_before: float
    mse_fit_after: float
    mse_heldout_before: float
    mse_heldout_after: float
    rel_heldout_before: float  # ||Y - Y_hat|| / ||Y|| on held-back tokens
    rel_heldout_after: float
    beta: float | None
    protect_threshold: float | None
    skip_fraction: float  # calibration tokens that skip at least one expert (0 without --dynamic-skip)
    experts_per_token: float  # computed routed experts per token on calibration
    params_per_expert: int
    shared_params: int
    top_k: int
    hidden_size: int
    seconds: float


@torch.no_grad()
def _prepare(block: CompressedExpertsBlock, x: torch.Tensor, chunk: int = 8192):
    """Routing and shared outputs for tokens x [T, H] (frozen parts, computed once)."""
    sw, si, keep, base = [], [], [], []
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        _, w, i, k = block.route(xs)
        sw.append(w)
        si.append(i)
        keep.append(k if k is not None else torch.ones(xs.shape[0], block.main_experts, dtype=torch.bool))
        shared = block.shared_output(xs)
        base.append(shared.float() if shared is not None else torch.zeros_like(xs, dtype=torch.float32))
    return torch.cat(sw), torch.cat(si), torch.cat(keep), torch.cat(base)


@torch.no_grad()
def block_error(block, x, target, routes, source, chunk: int = 8192) -> tuple[float, float]:
    """(MSE, relative Frobenius error) of the compressed block against target [T, H]."""
    sw, si, keep, base = routes
    se, ref = 0.0, 0.0
    for s in range(0, x.shape[0], chunk):
        sl = slice(s, s + chunk)
        pred = block.routed_output(x[sl], sw[sl], si[sl], keep[sl], source).float() + base[sl]
        se += float((pred - target[sl]).pow(2).sum())
        ref += float(target[sl].pow(2).sum())
    n = max(1, target.numel())
    return se / n, (se / ref) ** 0.5 if ref > 0 else 0.0


def fit_ces(block: CompressedExpertsBlock, x: torch.Tensor, target: torch.Tensor, routes, source, steps: int, lr: float, batch_tokens: int, seed: int) -> list[float]:
    """Adam on ``block.ces`` alone: minimise MSE(compressed block(x), target) over minibatches of tokens.

    x, target [T, H] float32; routes from :func:`_prepare`. Returns the loss per step.
    """
    sw, si, keep, base = routes
    gen = torch.Generator().manual_seed(seed)
    master = block.ces.detach().float().clone().requires_grad_(True)  # fp32 copy whatever the block dtype
    opt = torch.optim.Adam([master], lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            sel = torch.randperm(x.shape[0], generator=gen)[:batch_tokens] if x.shape[0] > batch_tokens else torch.arange(x.shape[0])
            pred = compressed_experts_forward(x[sel], sw[sel], si[sel], source, master, block.n_ce, keep[sel]).float() + base[sel]
            loss = F.mse_loss(pred, target[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    with torch.no_grad():
        block.ces.copy_(master.to(block.ces.dtype))
    return losses


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit ids, held-back ids) of n tokens, a seeded random split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = int(round(n * fraction))
    return perm[held:], perm[:held]


class CompressExpertsPass:
    """LayerPass: wrap each MoE block as a :class:`CompressedExpertsBlock`, calibrate skipping, fit ``ces``."""

    def __init__(self, cfg: CompressExpertsConfig, layers_name: str, storage_dtype: torch.dtype = torch.float32):
        cfg.validate()
        self.cfg = cfg
        self.layers_name = layers_name
        self.storage_dtype = storage_dtype
        self.records: list[LayerFitRecord] = []
        self.distill = None  # DistillRecord of the end-to-end step, when it ran
        self.modules: dict[str, dict] = {}
        self._x: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self._tuple = False

    def attach(self, ctx: LayerContext) -> list:
        if ctx.block is None:
            return []
        self._x, self._y = [], []

        def record(_module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            self._tuple = isinstance(output, tuple)
            self._x.append(hidden.detach().reshape(-1, hidden.shape[-1]).float())
            self._y.append(out.detach().reshape(-1, out.shape[-1]).float())

        return [ctx.block.block.register_forward_hook(record, with_kwargs=True)]

    def process(self, ctx: LayerContext) -> bool:
        if ctx.block is None:
            return False
        start = time.time()
        cfg = self.cfg
        cfg.check_top_k(ctx.block.top_k, f"layer {ctx.index}")
        x, y = torch.cat(self._x), torch.cat(self._y)
        self._x, self._y = [], []
        ce = wrap_block(ctx.block, cfg.n_ce, returns_router_scores=self._tuple, dtype=torch.float32)
        ctx.layer.set_submodule(ctx.block.block_name, ce)
        if cfg.dynamic_skip:
            with torch.no_grad():
                _, sorted_w, _, _ = ce.route(x)
            ce.skip_beta = calibrate_beta(sorted_w)
            ce.protect_threshold = calibrate_protect_threshold(x, cfg.protect_tokens)
        fit_ids, held_ids = _split(x.shape[0], cfg.holdout_fraction, cfg.seed + ctx.index)
        routes = _prepare(ce, x)
        source = expert_source(ce.experts_module)
        fit_routes = tuple(r[fit_ids] for r in routes)
        held_routes = tuple(r[held_ids] for r in routes)
        before_fit = block_error(ce, x[fit_ids], y[fit_ids], fit_routes, source)
        before_held = block_error(ce, x[held_ids], y[held_ids], held_routes, source)
        if cfg.n_ce > 0 and cfg.fit_steps > 0:
            fit_ces(ce, x[fit_ids], y[fit_ids], fit_routes, source, cfg.fit_steps, cfg.lr, cfg.fit_batch_tokens, cfg.seed + ctx.index)
            # What the checkpoint stores (e.g. bf16) is what the next layer must see.
            with torch.no_grad():
                ce.ces.copy_(ce.ces.to(self.storage_dtype).float())
        after_fit = block_error(ce, x[fit_ids], y[fit_ids], fit_routes, source)
        after_held = block_error(ce, x[held_ids], y[held_ids], held_routes, source)
        keep = routes[2]
        rec = LayerFitRecord(
            layer=ctx.index,
            fit_tokens=int(fit_ids.numel()),
            heldout_tokens=int(held_ids.numel()),
            mse_fit_before=before_fit[0],
            mse_fit_after=after_fit[0],
            mse_heldout_before=before_held[0],
            mse_heldout_after=after_held[0],
            rel_heldout_before=before_held[1],
            rel_heldout_after=after_held[1],
            beta=ce.skip_beta,
            protect_threshold=ce.protect_threshold,
            skip_fraction=float((~keep).any(dim=-1).float().mean()) if keep.numel() else 0.0,
            experts_per_token=float(keep.sum(dim=-1).float().mean()) if keep.numel() else 0.0,
            params_per_expert=params_per_expert(ce.experts_module),
            shared_params=logical_params(ce.get_submodule(ce.layout.shared) if ce.layout.shared else None)
            + logical_params(ce.get_submodule(ce.layout.shared_gate) if ce.layout.shared_gate else None),
            top_k=ce.layout.top_k,
            hidden_size=ce.layout.hidden_size,
            seconds=time.time() - start,
        )
        self.records.append(rec)
        prefix = f"{self.layers_name}.{ctx.index}.{ctx.block.block_name}"
        self.modules[prefix] = ce.description()
        log.info("layer %d: held-back MSE %.4g -> %.4g", ctx.index, rec.mse_heldout_before, rec.mse_heldout_after)
        return True

    def active_params(self, after: bool) -> float:
        """Expert parameters per token over all MoE layers, before (top-k) or after compression."""
        total = 0.0
        for r in self.records:
            if after:
                total += active_expert_params(r.params_per_expert, r.experts_per_token, self.cfg.n_ce, r.hidden_size, r.shared_params)
            else:
                total += active_expert_params(r.params_per_expert, r.top_k, 0, 0, r.shared_params)
        return total
