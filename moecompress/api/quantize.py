"""``moecompress.quantize``: GPTQ / RTN per expert, optionally MC-MoE mixed precision, into OUT.

    from moecompress.api import quantize, QuantizeOptions
    result = quantize("model", "model-w4", QuantizeOptions(bits=4, calib="mixed", nsamples=128))

The options are the command line's, one field per flag (``--bits-budget`` -> ``bits_budget``); the
YAML pipeline reads the same dataclass, so CLI, YAML and Python cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

import moecompress
from moecompress.parallel import current as current_ranks
from moecompress.api.calibration import CalibrationSpec, dummy_batch, load_for_model
from moecompress.api.experts import ExpertRewrite
from moecompress.api.job import JobResult, Progress, execute, labelled, model_label, require_choice, require_float, require_int
from moecompress.api.output import scratch_folder
from moecompress.errors import MoeCompressError
from moecompress.model.hub import resolve_model
from moecompress.export.writer import CheckpointWriter, outer_state
from moecompress.model.driver import LayerContext, run_layerwise
from moecompress.model.loading import LayerwiseModel, read_config
from moecompress.passes.quantize import QuantizeConfig, QuantizePass
from moecompress.passes.storage_rounding import StorageRounding
from moecompress.quant.hf_integration import MoeCompressConfig, native_config

FORMATS = ("native", "compressed-tensors")
TARGET_NAMES = ("native", "vllm", "hf")


def vllm_bit_choices(choices: tuple[int, ...], symmetric: bool, version: str | None = None) -> tuple[int, ...]:
    """The candidate widths vLLM's MoE path runs at this symmetry, in the release ``version`` (None: the
    oldest supported; capability table, export/targets.py); 16 (a layer left dense) stays, since vLLM
    loads a dense MoE layer."""
    table = _target_table("vllm", version)
    runs = table.widths(symmetric)
    kept = tuple(b for b in choices if b in runs or b == 16)
    if not any(b != 16 for b in kept):
        raise MoeCompressError(
            f"--target vllm: none of --bit-choices {','.join(map(str, choices))} runs in {table.label} ({table.versions}) "
            f"{'symmetric' if symmetric else 'asymmetric'} MoE layers (runs {list(runs)} bits); include one of them"
        )
    return kept


def _target_table(name: str, version: str | None):
    from moecompress.export.targets import get_target

    try:
        return get_target(name, version)
    except ValueError as exc:
        raise MoeCompressError(str(exc)) from None


def target_table(o: "QuantizeOptions"):
    """The capability table ``o.target`` is judged by (None for native / no target)."""
    if o.target == "vllm":
        return _target_table("vllm", o.vllm_version)
    if o.target == "hf":
        return _target_table("hf", o.transformers_version)
    return None


def dense_widths(o: "QuantizeOptions", has_shared_experts: bool) -> dict[str, int]:
    """flag -> width of every quantized attention / shared-expert linear the options ask for (the shared
    experts follow --bits unless --shared-expert-bits says otherwise; 16 = kept dense, not listed)."""
    shared = (o.shared_expert_bits if o.shared_expert_bits is not None else o.bits) if has_shared_experts else None
    widths = {"--attention-bits": o.attention_bits if o.quantize_attention else None, "--shared-expert-bits": shared}
    return {flag: w for flag, w in widths.items() if w not in (None, 16)}


def check_target_shapes(o: "QuantizeOptions", expert_dims: list[tuple[int, int]]) -> None:
    """VL306 before any work: every width the vllm target may write packs the experts' input
    dimensions (``expert_dims``: (hidden, intermediate) per MoE layer) into whole int32 rows."""
    target = target_table(o)
    if target is None or target.name != "vllm":
        return
    from moecompress.export.targets import pack_factor_problem

    widths = [o.bits] if o.bits_budget is None else list(o.mixed_precision_config().bit_choices)
    widths = [b for b in widths if b in target.widths()]  # 16 (a layer left dense) packs nothing
    for bits in widths:
        for hidden, intermediate in sorted(set(expert_dims)):
            problem = pack_factor_problem(target, bits, hidden, intermediate)
            if problem:
                advice = "choose another --bits" if o.bits_budget is None else f"drop {bits} from --bit-choices"
                raise MoeCompressError(f"--target vllm: {problem} (lint rule VL306); {advice}, or --target native")


def check_target(o: "QuantizeOptions", has_shared_experts: bool = False) -> None:
    """Refuse, before any work, what the target cannot run (the rule ids are the lint's).
    ``has_shared_experts``: whether the model has them (the job knows; options alone do not)."""
    from moecompress.export.targets import (
        DENSE_AS_EXPERTS, DENSE_ONE_SCHEME, dense_bits_problem, moe_symmetry_problem, moe_width_problem,
    )

    for flag, value, owner in (("--vllm-version", o.vllm_version, "vllm"), ("--transformers-version", o.transformers_version, "hf")):
        if value is not None and o.target != owner:
            raise MoeCompressError(f"{flag} {value} applies to --target {owner} only, not --target {o.target or '(none)'}")
    target = target_table(o)
    if target is None:
        return
    vllm = target.name == "vllm"
    if vllm and o.bits_budget is not None and o.resolved_granularity() == "expert":
        raise MoeCompressError(f"--target vllm: {target.label} reads one scheme per MoE layer, so --granularity expert "
                               "cannot load (lint rule CT101); use --granularity layer or --target native")
    if o.bits_budget is None:
        for rule, problem in (("VL301" if vllm else "HF202", moe_width_problem(target, o.bits)),
                              ("VL302" if vllm else "HF202", moe_symmetry_problem(target, o.bits, o.symmetric))):
            if problem:
                raise MoeCompressError(f"--target {o.target}: {problem} (lint rule {rule}); choose --bits / --symmetric it runs, or --target native")
    dense = dense_widths(o, has_shared_experts or o.shared_expert_bits is not None)
    if vllm:
        for flag, width in dense.items():
            problem = dense_bits_problem(target, width)
            if problem:
                raise MoeCompressError(f"--target vllm: {flag} {width}: {problem} (lint rule VL305); choose a width it runs")
        return
    if not o.symmetric:
        raise MoeCompressError(f"--target hf: {target.label} does not load asymmetric experts correctly (lint rule HF202); "
                               "drop --asymmetric or use --target native")
    if o.bits_budget is not None:
        raise MoeCompressError(f"--target hf: {target.label} dequantizes every routed expert with one scheme, so mixed widths load wrong "
                               "(lint rule HF201); use --target vllm (one width per layer) or --target native (one per expert)")
    if target.dense_schemes == DENSE_AS_EXPERTS:
        for flag, width in dense.items():
            if width != o.bits:
                raise MoeCompressError(f"--target hf: {flag} {width} differs from the experts' --bits {o.bits}; {target.label} "
                                       "dequantizes it with the experts' scheme (lint rule HF203); use the same width, "
                                       "--transformers-version 5.25, or --target native")
    elif target.dense_schemes == DENSE_ONE_SCHEME and len(set(dense.values())) > 1:
        shown = ", ".join(f"{flag} {w}" for flag, w in dense.items())
        raise MoeCompressError(f"--target hf: {shown} differ; {target.label} dequantizes every attention / shared-expert linear "
                               "with one scheme (lint rule HF203); give them one width (--shared-expert-bits defaults to --bits) "
                               "or use --target native")


@dataclass
class QuantizeOptions:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    method: str = "gptq"
    calib: str = "mixed"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    calibrate_all_experts: bool = True
    agq: bool = True
    damp: float = 0.01
    act_order: bool = False
    fallback: str = "rtn"
    min_tokens_fraction: float = 0.005
    quantize_attention: bool = False
    attention_bits: int = 8
    shared_expert_bits: int | None = None
    batch_size: int = 8
    bits_budget: float | None = None
    bit_choices: str = "2,3,4,8"
    granularity: str | None = None  # None: "layer" for --target vllm (one scheme per MoE layer), else "expert"
    allocation: str = "global"
    super_experts: str = "pin"
    stats: str | None = None
    profile_method: str = "rtn"
    min_bits: int | None = None
    max_bits: int | None = None
    alpha: float = 1.0
    beta: float = 1.5
    format: str = "native"
    target: str | None = None
    vllm_version: str | None = None  # --target vllm: the release its rules describe (None: the oldest supported)
    transformers_version: str | None = None  # --target hf: likewise
    device: str | None = None  # where the solver math runs: None = CUDA when available, else the CPU
    solve_memory_mb: int | None = None  # solver state per batch of experts (None: the device's default); larger layers are solved in chunks

    def __post_init__(self) -> None:
        # A target decides the format (and, for vLLM's one scheme per MoE layer, the default granularity,
        # resolved_granularity(); an explicit --granularity expert is refused by check_target).
        if self.target in ("vllm", "hf"):
            self.format = "compressed-tensors"
        elif self.target == "native":
            self.format = "native"

    def resolved_granularity(self) -> str:
        """--granularity, or its default: one width per MoE layer for --target vllm, else per expert."""
        if self.granularity is not None:
            return self.granularity
        return "layer" if self.target == "vllm" else "expert"

    # ------------------------------------------------------------------ derived configs

    def quantize_config(self) -> QuantizeConfig:
        return QuantizeConfig(
            bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, method=self.method,
            calibrate_all_experts=self.calibrate_all_experts, agq=self.agq, damp=self.damp, act_order=self.act_order,
            fallback=self.fallback, min_tokens_fraction=self.min_tokens_fraction,
            attention_bits=self.attention_bits if self.quantize_attention else None,
            shared_expert_bits=self.shared_expert_bits, device=self.device, solve_memory_mb=self.solve_memory_mb,
        )

    def calibration(self) -> CalibrationSpec:
        return CalibrationSpec(self.calib, self.nsamples, self.seqlen, self.seed)

    def mixed_precision_config(self):
        if self.bits_budget is None:
            return None
        from moecompress.passes.mixed_precision import MixedPrecisionConfig

        try:
            choices = tuple(int(b) for b in str(self.bit_choices).split(",") if b.strip())
        except ValueError:
            raise MoeCompressError(f"--bit-choices must be comma-separated integers like 2,3,4,8, got {self.bit_choices!r}") from None
        if self.target == "vllm":
            choices = vllm_bit_choices(choices, self.symmetric, self.vllm_version)
        return MixedPrecisionConfig(
            budget=self.bits_budget, bit_choices=choices, allocation=self.allocation, granularity=self.resolved_granularity(),
            alpha=self.alpha, beta=self.beta, min_bits=self.min_bits, max_bits=self.max_bits,
            super_experts=self.super_experts, profile_method=self.profile_method, export_format=self.format,
        )

    def validate(self) -> None:
        require_choice("format", self.format, FORMATS)
        if self.target is not None:
            require_choice("target", self.target, TARGET_NAMES)
            check_target(self)
        require_int("batch_size", self.batch_size, 1)
        require_float("damp", self.damp, 0.0, low_open=True)
        require_float("min_tokens_fraction", self.min_tokens_fraction, 0.0, 1.0)
        require_float("bits_budget", self.bits_budget, 0.0, low_open=True)
        require_float("alpha", self.alpha)
        require_float("beta", self.beta)
        self.calibration().validate()
        cfg = self.quantize_config()
        cfg.validate()
        mp = self.mixed_precision_config()
        if mp is not None:
            from moecompress.passes.mixed_precision import check_budget_feasible

            mp.validate()
            try:
                check_budget_feasible(mp, cfg.group_size, cfg.symmetric)
            except MoeCompressError as exc:
                if self.target != "vllm":
                    raise
                table = target_table(self)  # say which widths the target's release left to choose from
                raise MoeCompressError(
                    f"{exc} (--target vllm: {table.label} runs {list(table.widths(self.symmetric))}-bit experts; "
                    "--vllm-version humming adds 2-bit)"
                ) from None

    def needs_calibration(self) -> bool:
        from moecompress.passes.profile import ExpertProfile

        profile_saved = self.bits_budget is not None and self.stats is not None and ExpertProfile.exists(self.stats)
        return self.method == "gptq" or (self.bits_budget is not None and not profile_saved)


# ----------------------------------------------------------------------------------------------
# The layer-by-layer quantization sweep into a folder (no output contract: the job owns it)
# ----------------------------------------------------------------------------------------------


def write_quantized(model_folder: str | Path, target: Path, cfg: QuantizeConfig, input_ids: torch.Tensor | None,
                    calibration: dict, batch_size: int = 8, progress: Progress | None = None,
                    extra: dict | None = None, rewrite: ExpertRewrite | None = None) -> QuantizePass:
    """Quantize ``model_folder`` into the (empty, existing) folder ``target`` as a native checkpoint.

    ``rewrite``: a prune or merge planned on ``model_folder`` (:meth:`PruneJob.plan`) whose passes run
    first on each layer of the same sweep; the quantizer then observes the rewritten layer, and only
    the quantized model is written (a pipeline's fused ``prune -> quantize``)."""
    cfg.validate()
    lm = rewrite.lm if rewrite is not None else LayerwiseModel(model_folder)
    lm.require_dense("quantize")
    if input_ids is None:
        if cfg.method != "rtn":
            raise MoeCompressError("GPTQ needs calibration data; pass --calib or use --method rtn")
        input_ids = dummy_batch()
    out_dtype = lm.checkpoint_dtype
    qpass = QuantizePass(cfg, lm.config, dtype=out_dtype)
    writer = CheckpointWriter(target, lm.model, out_dtype)
    passes: list = [qpass]
    if rewrite is not None:
        check_fusable(rewrite, input_ids, batch_size)
        # The quantizer sees the rewritten weights as the rewrite's own checkpoint would hold them.
        passes = [*rewrite.passes, StorageRounding(out_dtype), qpass]

    def write_layer(ctx: LayerContext) -> None:
        writer.write_module(f"{lm.view.layers_name}.{ctx.index}", ctx.layer, f"layer-{ctx.index:05d}.safetensors")

    # Calibration activations are kept between layers as a bfloat16 model carries them itself (the
    # layers compute in float32): half the memory of the largest buffers. float16 checkpoints keep
    # float32 storage, since float32 intermediate values may leave float16's range.
    storage = torch.bfloat16 if out_dtype == torch.bfloat16 else None
    run_layerwise(lm, input_ids, passes, batch_size=batch_size, on_layer_done=write_layer, progress=progress,
                  storage_dtype=storage)
    lm.load_outer()
    writer.write_tensors(outer_state(lm.model, lm.view.layers_name), "outer.safetensors")
    lm.release_outer()
    qconfig = MoeCompressConfig(
        modules=qpass.modules,
        group_size=cfg.group_size,
        symmetric=cfg.symmetric,
        provenance={
            "tool": f"moecompress {moecompress.__version__}",
            "method": cfg.method,
            "calibrate_all_experts": cfg.calibrate_all_experts,
            "agq": cfg.agq,
            "damp": cfg.damp,
            "act_order": cfg.act_order,
            "calibration": calibration,
            "source_model": str(Path(model_folder).resolve().name),
        },
        extra=extra or {},
        expert_groups=lm.expert_groups,  # an exact-router merge stays one after quantization
    )
    config = rewrite.config() if rewrite is not None else lm.config
    config.quantization_config = qconfig.to_dict()
    config.dtype = out_dtype
    writer.finish(config, Path(model_folder))
    return qpass


def check_fusable(rewrite: ExpertRewrite, input_ids: torch.Tensor, batch_size: int) -> None:
    """A rewrite that reads activations (refit, fitted routers) must see the quantizer's calibration
    batches, since one sweep carries one calibration set. The pipeline fuses only such pairs."""
    if rewrite.native is not None:
        raise MoeCompressError("an exact-router merge cannot run in the quantizer's sweep; quantize its output")
    if rewrite.calibration is None:
        return
    if rewrite.batch_size != batch_size or not torch.equal(rewrite.calibration, input_ids):
        raise MoeCompressError("the rewrite and the quantizer need the same calibration set and batch size to share a sweep")


def write_mixed_precision(
    model_folder: str | Path,
    target: str | Path,
    mp: MixedPrecisionConfig,
    qcfg: QuantizeConfig,
    input_ids: torch.Tensor | None,
    calibration: dict,
    stats_dir: str | Path | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    profile_progress: Progress | None = None,
):
    """Profile (or reuse ``stats_dir``), allocate, quantize into the existing folder ``target``.

    Returns ``(QuantizePass, MixedPrecisionResult)``. The profile is also saved under
    ``target/profile/``. Raises MoeCompressError (one line) for bad options, an infeasible budget or a
    solver failure. The output contract (staging, swap) is the caller's: :mod:`moecompress.api`."""
    from moecompress.passes.mixed_precision import (
        EXTRA_KEY, MixedPrecisionResult, budget_bits_used, check_budget_feasible, checkpoint_budget,
        checkpoint_expert_widths, load_or_profile, plan_allocation, super_experts_for,
    )
    from moecompress.quant.allocate import BUDGET_TOL

    mp.validate()
    qcfg.validate()
    check_budget_feasible(mp, qcfg.group_size, qcfg.symmetric)
    profile, reused = load_or_profile(model_folder, stats_dir, qcfg, mp, input_ids, calibration, batch_size, profile_progress)
    super_experts, source = super_experts_for(profile, stats_dir)
    plan = plan_allocation(profile, mp, qcfg.group_size, qcfg.symmetric, super_experts)
    if input_ids is None and qcfg.method != "rtn":
        raise MoeCompressError("GPTQ needs calibration data; pass --calib or use --method rtn")
    record = {
        "budget": mp.budget,
        "bit_choices": list(mp.bit_choices),
        "allocation": mp.allocation,
        "granularity": mp.granularity,
        "alpha": mp.alpha,
        "beta": mp.beta,
        "super_experts": mp.super_experts,
        "super_expert_source": source,
        "profile_method": profile.method,
        **plan.as_json(),
    }
    qcfg = replace(qcfg, expert_bits=plan.expert_bits)
    target = Path(target)
    qpass = write_quantized(model_folder, target, qcfg, input_ids, calibration, batch_size, progress, extra={EXTRA_KEY: record})
    if not current_ranks().is_writer:  # under torchrun the other ranks only solved their experts
        return qpass, None
    profile.save(target / "profile")
    written = checkpoint_budget(target)
    if written > mp.budget + BUDGET_TOL:
        raise MoeCompressError(f"the written checkpoint uses {written:.6f} bits, over the budget {mp.budget}; this is a bug, report it")
    _, bits, params, _ = checkpoint_expert_widths(target)
    overall = budget_bits_used(bits, params, qcfg.group_size if qcfg.group_size > 0 else 128, qcfg.symmetric)
    mp_result = MixedPrecisionResult(profile, plan, reused, written, overall, {"super_expert_source": source})
    return qpass, mp_result



# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


class QuantizeJob:
    command = "quantize"
    # A prune or merge of ``model`` to run in this job's sweep (a pipeline's fused pair); see write_quantized.
    rewrite: ExpertRewrite | None = None

    def __init__(self, model: str | Path, options: QuantizeOptions, announce=None):
        self.model = Path(model)
        self.options = options
        self.announce = announce

    def inputs(self):
        return [("model", self.model), ("statistics folder", self.options.stats), ("calibration source", self.options.calibration().input_path())]

    def validate(self) -> None:
        o = self.options
        o.validate()
        lm = LayerwiseModel(self.model)  # meta skeleton: the folder, architecture and config are checked
        lm.require_dense("quantize")
        # the model decides whether the shared experts (at --bits by default) are dense modules to check
        check_target(o, has_shared_experts=any(b.shared is not None for b in lm.view.blocks.values()))
        check_target_shapes(o, [(b.experts.hidden_size, b.experts.intermediate_size) for b in lm.view.blocks.values()])
        from moecompress.passes.quantize import check_group_size_fits

        # shapes only, before any work; compressed-tensors needs whole groups
        check_group_size_fits(o.quantize_config(), lm.layers, lm.view.blocks, whole_groups=o.format == "compressed-tensors")
        if o.format == "compressed-tensors":
            from moecompress.export.compressed_tensors import check_model_exportable, check_no_expert_groups

            check_no_expert_groups(native_config(read_config(self.model)) or {}, str(self.model))
            check_model_exportable(lm.model, lm.view)
        if o.needs_calibration():
            from moecompress.api.calibration import require_tokenizer

            require_tokenizer(self.model, o.calibration())
        if o.stats is not None and not Path(o.stats).is_dir() and Path(o.stats).exists():
            raise MoeCompressError(f"--stats {o.stats} is not a folder")
        if o.stats is not None and Path(o.stats).is_dir():
            check_stats_folder(o.stats, lm, o.quantize_config(), o.mixed_precision_config())

    def write(self, stage: Path, progress: Progress | None) -> JobResult:
        o = self.options
        cfg, mp = o.quantize_config(), o.mixed_precision_config()
        ids, calibration = None, {"source": "none (rtn)"}
        if o.needs_calibration():
            calib_set, calibration = load_for_model(self.model, o.calibration(), self.announce)
            ids = calib_set.input_ids
        ranks = current_ranks()
        if not ranks.is_writer:  # torchrun: this rank solves its share of every layer's experts, writes nothing
            qpass, _ = self._write_native(stage, cfg, mp, ids, calibration, None)
            return JobResult(None, {"command": self.command, "rank": ranks.rank, "world": ranks.world,
                                    "experts_solved_here": qpass.report.solved_here})
        if o.format == "native":
            qpass, mp_result = self._write_native(stage, cfg, mp, ids, calibration, progress)
        else:
            from moecompress.export.compressed_tensors import convert_native_to_compressed_tensors

            with scratch_folder(stage, ".native") as native:
                qpass, mp_result = self._write_native(native, cfg, mp, ids, calibration, progress)
                if mp_result is not None:
                    mp_result.profile.save(stage / "profile")
                convert_native_to_compressed_tensors(native, stage, allow_mixed_layers=mp is not None)
        return self._report(stage, qpass, mp, mp_result, calibration)

    def _write_native(self, target: Path, cfg, mp, ids, calibration, progress):
        o = self.options
        if mp is None:
            return write_quantized(self.model, target, cfg, ids, calibration, o.batch_size, progress, rewrite=self.rewrite), None
        if self.rewrite is not None:  # the allocation needs a profile of the rewritten model: its own sweep
            raise MoeCompressError("--bits-budget cannot share the sweep of a prune or merge; quantize their output")
        qpass, mp_result = write_mixed_precision(
            self.model, target, mp, cfg, ids, calibration, stats_dir=o.stats, batch_size=o.batch_size,
            progress=labelled(progress, "quantizing"), profile_progress=labelled(progress, "profiling"),
        )
        return qpass, mp_result

    def _report(self, stage: Path, qpass, mp, mp_result, calibration) -> JobResult:
        from moecompress.evaluate import folder_bytes
        from moecompress.passes.quantize_report import write_quantize_report

        o = self.options
        fallbacks = qpass.report.fallbacks()
        summary = {
            "command": "quantize",
            "model": model_label(self),
            "bits": o.bits,
            "group_size": o.group_size,
            "method": o.method,
            "calibration": calibration,
            "calibrate_all_experts": o.calibrate_all_experts,
            "agq": o.agq,
            "format": o.format,
            "target": o.target,
            "target_version": None if target_table(o) is None else target_table(o).version,
            "input_bytes": folder_bytes(self.model),
            "output_bytes": folder_bytes(stage),
            "fallbacks": [{"layer": r.layer, "expert": r.expert, "tokens": r.tokens, "method": r.method} for r in fallbacks],
        }
        sections: list[str] = []
        if mp_result is not None:
            from moecompress.passes.mixed_precision import mixed_precision_sections

            summary["bits"] = f"mixed, budget {o.bits_budget:g}"
            summary["budget_used"] = round(mp_result.budget_written, 6)
            summary["average_bits_all_experts"] = round(mp_result.average_bits_all, 6)
            summary["objective"] = mp_result.plan.allocation.objective
            summary["protected"] = [{"layer": s.layer, "expert": s.expert} for s in mp_result.plan.protected]
            summary["profile_reused"] = mp_result.profile_reused
            sections = mixed_precision_sections(stage, mp, mp_result)
            if o.format == "compressed-tensors":
                from moecompress.export.lint import lint_checkpoint
                from moecompress.passes.mixed_precision import compressed_tensors_budget

                ct_budget = compressed_tensors_budget(stage, mp_result.plan)
                sections += [f"- **budget used, recomputed from the compressed-tensors config**: {ct_budget:.4f}", ""]
                judged = o.target if o.target in ("vllm", "hf") else None  # no target: both runtimes
                summary["lint_errors"] = len(lint_checkpoint(stage, judged, o.vllm_version, o.transformers_version).errors)
        report_summary = {k: v for k, v in summary.items() if k != "fallbacks"}
        write_quantize_report(stage / "report.md", "moecompress quantize", report_summary, qpass.report, sections)
        result = JobResult(None, summary)
        if fallbacks:
            result.notes.append(fallback_line(fallbacks, o))
        result.run["phase_seconds"] = qpass.report.phase_seconds()  # wall time per phase (never in OUT)
        ranks = current_ranks()
        if ranks.distributed:
            result.run.update(world=ranks.world, experts_solved_here=qpass.report.solved_here)
        if mp_result is not None:
            result.run["profile_seconds"] = None if mp_result.profile.seconds is None else round(mp_result.profile.seconds, 2)
            result.run["allocation_seconds"] = round(mp_result.plan.seconds, 3)
        return result


def check_stats_folder(folder: str | Path, lm: LayerwiseModel, qcfg: QuantizeConfig, mp) -> None:
    """``--stats`` written for another model (or, for its profile, other settings) is refused before any
    work -- before the profiling sweep, which would otherwise write its profile into that folder."""
    from moecompress.passes.profile import ExpertProfile

    shapes = {i: b.num_experts for i, b in lm.view.blocks.items()}
    if (Path(folder) / "stats.json").is_file():
        from moecompress.calibration.stats_types import RouterStats

        stats = RouterStats.load(folder)
        if {i: layer.num_experts for i, layer in stats.layers.items()} != shapes:
            raise MoeCompressError(
                f"--stats {folder} holds statistics of another model (its MoE layers or expert counts differ from "
                f"{lm.folder}'s); collect statistics on this model (moecompress stats) or use another --stats folder"
            )
    if mp is not None and ExpertProfile.exists(folder):
        from moecompress.passes.mixed_precision import _check_profile_matches

        _check_profile_matches(ExpertProfile.load(folder), lm.folder, qcfg, mp, folder)


def fallback_line(fallbacks, options: QuantizeOptions) -> str:
    """One console line for every expert that fell back (the details are in report.md)."""
    zero = sum(1 for r in fallbacks if r.tokens == 0)
    why = (
        f"{zero} saw no calibration token at all (the router never picks them on this data)" if zero else
        "they saw fewer routed tokens than --min-tokens-fraction"
    )
    advice = "more or more varied calibration (--nsamples, --calib sample) reaches more of them"
    if not options.calibrate_all_experts:
        advice += "; --calibrate-all-experts feeds every token to every expert's Hessian"
    return f"{len(fallbacks)} experts quantized with the {options.fallback} fallback: {why}; {advice}; see report.md"


def quantize(model: str | Path, out: str | Path, options: QuantizeOptions | None = None, *, overwrite: bool = False,
             dry_run: bool = False, progress: Progress | None = None, announce=None, side_files=()) -> JobResult:
    """Quantize ``model`` into ``out`` (a native or compressed-tensors checkpoint, with report.md)."""
    model = resolve_model(model)
    return execute(QuantizeJob(model, options or QuantizeOptions(), announce), out, overwrite, dry_run, progress, side_files)


# ----------------------------------------------------------------------------------------------
# Config-level entry points: a QuantizeConfig and calibration ids given directly (benchmarks, tests,
# Python users who build their own calibration). Same output contract as quantize().
# ----------------------------------------------------------------------------------------------


class ConfigJob:
    """A job from ready-made configs; ``work(stage)`` returns (JobResult summary, pass, extra)."""

    def __init__(self, command: str, model, inputs, validate, work):
        self.command, self.model = command, Path(model)
        self._inputs, self._validate, self._work = inputs, validate, work
        self.value = None

    def inputs(self):
        return [("model", self.model), *self._inputs]

    def validate(self) -> None:
        self._validate()

    def write(self, stage: Path, progress: Progress | None) -> JobResult:
        from moecompress.evaluate import folder_bytes

        self.value = self._work(stage, progress)
        return JobResult(None, {"command": self.command, "model": str(self.model),
                                "input_bytes": folder_bytes(self.model), "output_bytes": folder_bytes(stage)})


def quantize_job(model_folder: str | Path, out: str | Path, cfg: QuantizeConfig, input_ids: torch.Tensor | None,
                 calibration: dict, overwrite: bool = False, batch_size: int = 8, progress: Progress | None = None,
                 extra: dict | None = None) -> tuple[JobResult, QuantizePass]:
    """Quantize ``model_folder`` into a native checkpoint at ``out`` -> (JobResult, QuantizePass)."""
    job = ConfigJob(
        "quantize", model_folder, [], lambda: (cfg.validate(), LayerwiseModel(model_folder).require_dense("quantize")),
        lambda stage, progress: write_quantized(model_folder, stage, cfg, input_ids, calibration, batch_size, progress, extra),
    )
    result = execute(job, out, overwrite, progress=progress)
    return result, job.value


def mixed_precision_job(model_folder: str | Path, out: str | Path, mp, qcfg: QuantizeConfig, input_ids: torch.Tensor | None,
                        calibration: dict, stats_dir: str | Path | None = None, overwrite: bool = False, batch_size: int = 8,
                        progress: Progress | None = None, profile_progress: Progress | None = None):
    """Profile, allocate and quantize ``model_folder`` into ``out`` -> (JobResult, QuantizePass, MixedPrecisionResult)."""
    from moecompress.passes.mixed_precision import check_budget_feasible

    def validate():
        mp.validate()
        qcfg.validate()
        check_budget_feasible(mp, qcfg.group_size, qcfg.symmetric)

    job = ConfigJob(
        "quantize", model_folder, [("statistics folder", stats_dir)], validate,
        lambda stage, progress: write_mixed_precision(model_folder, stage, mp, qcfg, input_ids, calibration, stats_dir,
                                                      batch_size, progress, profile_progress),
    )
    result = execute(job, out, overwrite, progress=progress)
    qpass, mp_result = job.value
    return result, qpass, mp_result
