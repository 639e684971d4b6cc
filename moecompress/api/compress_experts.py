"""``moecompress.compress_experts``: compressed experts (and/or MC-MoE dynamic skipping) into OUT.

    from moecompress.api import compress_experts, CompressExpertsOptions
    result = compress_experts("model", "model-ce", CompressExpertsOptions(n_ce=1))

The fitting pass and the runtime block live in :mod:`moecompress.passes.compressed_experts` and
:mod:`moecompress.modules`; this module is the job: checks, the layer-wise sweep into the staging
folder, the optional end-to-end distillation of ``ces``, the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import moecompress
from moecompress.api.calibration import CalibrationSpec, load_for_model, require_tokenizer
from moecompress.api.job import JobResult, Progress, execute, model_label, require_float, require_int
from moecompress.errors import MoeCompressError
from moecompress.model.hub import resolve_model
from moecompress.export.writer import CheckpointWriter, outer_state
from moecompress.model.driver import LayerContext, run_layerwise
from moecompress.model.loading import LayerwiseModel, read_config
from moecompress.modules.compressed_experts import MODULE_TYPE
from moecompress.passes.compressed_experts import CompressExpertsConfig, CompressExpertsPass, LayerFitRecord
from moecompress.quant.hf_integration import MoeCompressConfig


@dataclass
class CompressExpertsOptions:
    n_ce: int = 1
    fit_steps: int = 200
    lr: float = 1e-2
    fit_batch_tokens: int = 4096
    dynamic_skip: bool = False
    protect_tokens: float = 0.02
    distill_steps: int = 0
    distill_lr: float = 1e-2
    distill_batch_size: int = 8
    distill_top_k: int = 1024
    calib: str = "mixed"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    eval_data: str | None = None
    eval_max_tokens: int | None = 40000
    eval_seqlen: int = 256

    def config(self) -> CompressExpertsConfig:
        return CompressExpertsConfig(
            n_ce=self.n_ce, fit_steps=self.fit_steps, lr=self.lr, fit_batch_tokens=self.fit_batch_tokens,
            dynamic_skip=self.dynamic_skip, protect_tokens=self.protect_tokens if self.dynamic_skip else 0.0, seed=self.seed,
            distill_steps=self.distill_steps, distill_lr=self.distill_lr, distill_batch_size=self.distill_batch_size,
            distill_top_k=self.distill_top_k,
        )

    def calibration(self) -> CalibrationSpec:
        return CalibrationSpec(self.calib, self.nsamples, self.seqlen, self.seed)

    def validate(self) -> None:
        require_float("protect_tokens", self.protect_tokens, 0.0, 1.0)
        if self.protect_tokens >= 1:
            raise MoeCompressError(f"--protect-tokens must be in [0, 1), got {self.protect_tokens}")
        require_int("batch_size", self.batch_size, 1)
        require_int("eval_seqlen", self.eval_seqlen, 2)
        require_int("eval_max_tokens", self.eval_max_tokens, self.eval_seqlen)
        if self.eval_data is not None and not Path(self.eval_data).is_file():
            raise MoeCompressError(f"--eval-data {self.eval_data} is not a file")
        self.calibration().validate()
        self.config().validate()
        if self.n_ce == 0 and not self.dynamic_skip:
            raise MoeCompressError(
                "--n-ce 0 without --dynamic-skip changes nothing; give --n-ce >= 1 (compressed experts) or add --dynamic-skip"
            )


class CompressExpertsJob:
    command = "compress-experts"

    def __init__(self, model: str | Path, options: CompressExpertsOptions, announce=None):
        self.model, self.options, self.announce = Path(model), options, announce

    def inputs(self):
        o = self.options
        return [("model", self.model), ("calibration source", o.calibration().input_path()), ("evaluation data", o.eval_data)]

    def validate(self) -> None:
        self.options.validate()
        cfg = self.options.config()
        source_quantization(read_config(self.model))
        lm = LayerwiseModel(self.model)
        lm.require_ungrouped("compress-experts")
        for block in lm.view.blocks.values():
            cfg.check_top_k(block.top_k, f"layer {block.layer_index}")
        check_distill_memory(lm, cfg, self.options.seqlen)
        require_tokenizer(self.model, self.options.calibration())

    def write(self, stage: Path, progress: Progress | None) -> JobResult:
        o = self.options
        cfg = o.config()
        calib_set, calibration = load_for_model(self.model, o.calibration(), self.announce)
        cpass = write_compressed_experts(self.model, stage, cfg, calib_set.input_ids, calibration, o.batch_size, progress)
        records = cpass.records
        summary = {
            "command": "compress-experts",
            "model": model_label(self),
            "n_ce": o.n_ce,
            "top_k": model_top_k(self.model),
            "fit_steps": o.fit_steps,
            "lr": o.lr,
            "dynamic_skip": o.dynamic_skip,
            "protect_tokens": cfg.protect_tokens,
            "calibration": calibration,
            "active_params_before": cpass.active_params(after=False),
            "active_params_after": cpass.active_params(after=True),
            "skip_fraction": sum(r.skip_fraction for r in records) / max(1, len(records)),
            "layers": [
                {"layer": r.layer, "heldout_mse_before": r.mse_heldout_before, "heldout_mse_after": r.mse_heldout_after,
                 "fit_mse_before": r.mse_fit_before, "fit_mse_after": r.mse_fit_after, "beta": r.beta, "skip_fraction": r.skip_fraction}
                for r in records
            ],
            "distill": None if cpass.distill is None else {k: v for k, v in asdict(cpass.distill).items() if k != "seconds"},
        }
        if o.eval_data is not None:
            from moecompress.evaluate import evaluate

            summary["eval"] = {
                name: {k: v for k, v in evaluate(folder, o.eval_data, seqlen=o.eval_seqlen, max_tokens=o.eval_max_tokens).as_json().items()
                       if k in ("ppl", "tokens", "chunks")}
                for name, folder in (("original", self.model), ("compressed", stage))
            }
        write_compress_report(stage / "report.md", summary, records)
        result = JobResult(None, summary)
        if cpass.distill is not None:
            d = cpass.distill
            result.notes.append(
                f"distillation: KL on held-back calibration sequences {d.kl_heldout_before:.5f} -> {d.kl_heldout_after:.5f} "
                f"(trained sequences {d.kl_train_before:.5f} -> {d.kl_train_after:.5f})"
            )
        if "eval" in summary:
            e = summary["eval"]
            result.notes.append(f"perplexity {e['original']['ppl']:.4f} -> {e['compressed']['ppl']:.4f} on {o.eval_data}")
        return result


def compress_experts(model: str | Path, out: str | Path, options: CompressExpertsOptions | None = None, *, overwrite: bool = False,
                     dry_run: bool = False, progress: Progress | None = None, announce=None, side_files=()) -> JobResult:
    """Compressed experts / dynamic skipping for ``model`` into ``out`` (a native checkpoint with report.md)."""
    model = resolve_model(model)
    return execute(CompressExpertsJob(model, options or CompressExpertsOptions(), announce), out, overwrite, dry_run, progress, side_files)


def source_quantization(config) -> dict | None:
    """The source checkpoint's moecompress quantization config as a dict, or None for a dense model."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "moecompress":
        raise MoeCompressError(
            f"the model is quantized with {qc.get('quant_method')!r}; compress-experts reads dense or moecompress checkpoints only"
        )
    if any(d.get("type") == MODULE_TYPE for d in qc.get("modules", {}).values()):
        raise MoeCompressError("the model already has compressed experts; run compress-experts on the original checkpoint")
    return qc


def model_top_k(model_folder: str | Path) -> int:
    """The smallest top-k over the model's MoE layers (read from the meta skeleton; nothing loaded)."""
    from moecompress.model.loading import LayerwiseModel

    lm = LayerwiseModel(model_folder)
    return min(b.top_k for b in lm.view.blocks.values())


def check_distill_memory(lm, cfg: CompressExpertsConfig, seqlen: int) -> None:
    """Refuse (before any work) an end-to-end distillation whose rough peak exceeds the available memory."""
    from moecompress.passes.distill_ces import available_memory_bytes, estimate_distill_bytes

    if cfg.distill_steps == 0:
        return
    available = available_memory_bytes()
    if available is None:
        return
    c = lm.config
    blocks = list(lm.view.blocks.values())
    model_bytes = sum(p.numel() * 4 for p in lm.model.parameters()) + sum(b.numel() * b.element_size() for b in lm.model.buffers())
    need = estimate_distill_bytes(
        model_bytes, cfg.distill_batch_size * seqlen, len(blocks), c.hidden_size,
        max(b.experts.intermediate_size for b in blocks), max(b.top_k for b in blocks),
        getattr(c, "num_attention_heads", 1), seqlen, c.vocab_size,
    )
    if need > available:
        raise MoeCompressError(
            f"--distill-steps holds the whole model in float32 plus one batch's activations (~{need / 2**30:.1f} GiB) but only "
            f"{available / 2**30:.1f} GiB is available; lower --distill-batch-size or run without --distill-steps"
        )


def _distill_staged(model_folder, staged: Path, writer, input_ids: torch.Tensor, cfg: CompressExpertsConfig, storage: torch.dtype, batch_size: int):
    """End-to-end distillation of the staged checkpoint's ``ces``; rewrites the shards holding them. Returns the record."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from moecompress.passes.distill_ces import compute_teacher_targets, distill_ces

    # Teacher first, released before the student loads: one full model in memory at a time.
    teacher = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32)
    targets = compute_teacher_targets(teacher, input_ids, cfg.distill_top_k, batch_size)
    del teacher
    student = AutoModelForCausalLM.from_pretrained(str(staged), dtype=torch.float32)
    record = distill_ces(
        student, input_ids, targets, cfg.distill_steps, cfg.distill_lr, cfg.distill_batch_size, cfg.seed,
        cfg.holdout_fraction, storage,
    )
    trained = {name: p.detach() for name, p in student.named_parameters() if name.endswith(".ces")}
    by_shard: dict[str, list[str]] = {}
    for name in trained:
        if name not in writer.weight_map:
            raise MoeCompressError(f"tensor {name} is not in the staged checkpoint; this is a bug in moecompress")
        by_shard.setdefault(writer.weight_map[name], []).append(name)
    for shard, names in by_shard.items():
        tensors = load_file(str(staged / shard))
        for name in names:
            tensors[name] = trained[name].to(tensors[name].dtype).contiguous()
        save_file(tensors, str(staged / shard), metadata={"format": "pt"})
    return record


def write_compressed_experts(
    model_folder: str | Path,
    target: Path,
    cfg: CompressExpertsConfig,
    input_ids: torch.Tensor,
    calibration: dict,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
):
    """Compressed experts (and/or dynamic skipping) for a dense or moecompress-quantized model folder.

    Writes a native checkpoint into the existing folder ``target``: the source's tensors unchanged plus ``<block>.ces``, and
    ``quantization_config.modules`` = the source's packed modules + one ``compressed_experts_block``
    entry per MoE block. Returns the pass with its per-layer records and, when
    ``cfg.distill_steps > 0``, ``cpass.distill``.

    The layer-wise pass holds one decoder layer at a time. ``cfg.distill_steps > 0`` adds the end-to-end
    distillation of ``ces`` (``distill_ces.py``), which loads the WHOLE model in float32 (the source as
    teacher once, then the compressed model as student) plus one batch of activations; refused up
    front (one-line error) when that rough estimate exceeds the available memory.
    """
    cfg.validate()
    if input_ids is None or input_ids.numel() == 0:
        raise MoeCompressError("compress-experts needs calibration data to fit and calibrate; pass --calib")
    source_q = source_quantization(read_config(model_folder))
    lm = LayerwiseModel(model_folder)  # a quantized source's packed modules are swapped in here
    lm.require_ungrouped("compress-experts")
    for block in lm.view.blocks.values():
        cfg.check_top_k(block.top_k, f"layer {block.layer_index}")
    check_distill_memory(lm, cfg, input_ids.shape[-1])
    storage = lm.checkpoint_dtype
    cpass = CompressExpertsPass(cfg, lm.view.layers_name, storage)
    writer = CheckpointWriter(target, lm.model, storage)

    def write_layer(ctx: LayerContext) -> None:
        writer.write_module(f"{lm.view.layers_name}.{ctx.index}", ctx.layer, f"layer-{ctx.index:05d}.safetensors")

    run_layerwise(lm, input_ids, [cpass], batch_size=batch_size, on_layer_done=write_layer, progress=progress)
    lm.load_outer()
    writer.write_tensors(outer_state(lm.model, lm.view.layers_name), "outer.safetensors")
    lm.release_outer()
    run = {
        "tool": f"moecompress {moecompress.__version__}",
        "method": "compressed-experts" if cfg.n_ce else "dynamic-skip",
        **asdict(cfg),
        "calibration": calibration,
        "source_model": str(Path(model_folder).resolve().name),
    }
    if source_q is not None:
        qconfig = MoeCompressConfig(
            modules={**source_q.get("modules", {}), **cpass.modules},
            group_size=source_q.get("group_size", 128),
            symmetric=source_q.get("symmetric", True),
            format=source_q.get("format", "kpack-v1"),
            provenance={**source_q.get("provenance", {}), "compress_experts": run},
            extra=source_q.get("extra", {}),
        )
    else:
        qconfig = MoeCompressConfig(modules=cpass.modules, provenance=run)
    config = lm.config
    config.quantization_config = qconfig.to_dict()
    config.dtype = storage
    writer.finish(config, Path(model_folder))
    if cfg.distill_steps > 0:
        cpass.distill = _distill_staged(model_folder, target, writer, input_ids, cfg, storage, batch_size)
    return cpass


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def write_compress_report(path: str | Path, summary: dict, records: list[LayerFitRecord]) -> None:
    """OUT/report.md: active parameters, per-layer fitting losses (fit and held-back), skipping."""
    s = summary
    lines = [
        "# moecompress compress-experts",
        "",
        f"- model: `{s['model']}`",
        f"- compressed experts per token (n_ce): {s['n_ce']} of top-{s['top_k']}; fit steps {s['fit_steps']}, lr {s['lr']}",
        f"- dynamic skipping: {'on' if s['dynamic_skip'] else 'off'}" + (f" (protect {s['protect_tokens']:.1%} of tokens by ||h||_1)" if s["dynamic_skip"] else ""),
        f"- calibration: {s['calibration']}",
        f"- active routed+shared expert parameters per token (all MoE layers): {s['active_params_before']:,.0f} -> "
        f"{s['active_params_after']:,.0f} ({100 * (1 - s['active_params_after'] / max(1.0, s['active_params_before'])):.1f}% fewer)",
        f"- tokens skipping an expert (calibration, mean over layers): {s['skip_fraction']:.1%}",
        "",
    ]
    if s.get("eval"):
        lines += ["## Perplexity", "", "| model | ppl | tokens |", "|---|---|---|"]
        for name, r in s["eval"].items():
            lines.append(f"| {name} | {r['ppl']:.4f} | {r['tokens']} |")
        lines.append("")
    d = s.get("distill")
    if d:
        lines += [
            "## End-to-end distillation of ces",
            "",
            f"{d['steps']} Adam steps, lr {d['lr']}, {d['batch_sequences']} sequences per step, all layers' `ces` trained jointly "
            f"(everything else frozen) on KL(original || compressed) over the teacher's top-{d['top_k']} tokens + tail; "
            f"{d['train_sequences']} calibration sequences trained, {d['heldout_sequences']} held back.",
            "",
            "| mean KL per token | before | after |",
            "|---|---|---|",
            f"| trained sequences | {d['kl_train_before']:.5f} | {d['kl_train_after']:.5f} |",
            f"| held-back sequences | {d['kl_heldout_before']:.5f} | {d['kl_heldout_after']:.5f} |",
            "",
        ]
    lines += [
        "## Per layer (block output MSE against the original block; held-back = 10% of calibration tokens never fitted)",
        "",
        "| layer | fit MSE before | fit MSE after | held-back MSE before | held-back MSE after | held-back rel. err before | after | beta | skip fraction | experts/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        beta = "—" if r.beta is None else f"{r.beta:.3f}"
        lines.append(
            f"| {r.layer} | {r.mse_fit_before:.4g} | {r.mse_fit_after:.4g} | {r.mse_heldout_before:.4g} | {r.mse_heldout_after:.4g} "
            f"| {r.rel_heldout_before:.4f} | {r.rel_heldout_after:.4f} | {beta} | {r.skip_fraction:.1%} | {r.experts_per_token:.3f} |"
        )
    Path(path).write_text("\n".join(lines) + "\n")


def compress_experts_job(model_folder: str | Path, out: str | Path, cfg: CompressExpertsConfig, input_ids: torch.Tensor,
                         calibration: dict, overwrite: bool = False, batch_size: int = 8, progress: Progress | None = None):
    """Compressed experts from a ready-made config and calibration ids -> (JobResult, CompressExpertsPass)."""
    from moecompress.api.quantize import ConfigJob

    def validate():
        cfg.validate()
        if input_ids is None or input_ids.numel() == 0:
            raise MoeCompressError("compress-experts needs calibration data to fit and calibrate; pass --calib")
        source_quantization(read_config(model_folder))
        lm = LayerwiseModel(model_folder)
        lm.require_ungrouped("compress-experts")
        for block in lm.view.blocks.values():
            cfg.check_top_k(block.top_k, f"layer {block.layer_index}")
        check_distill_memory(lm, cfg, input_ids.shape[-1])

    job = ConfigJob("compress-experts", model_folder, [], validate,
                     lambda stage, progress: write_compressed_experts(model_folder, stage, cfg, input_ids, calibration, batch_size, progress))
    result = execute(job, out, overwrite, progress=progress)
    return result, job.value
