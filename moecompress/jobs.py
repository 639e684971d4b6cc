"""End-to-end jobs behind the commands: read a model, run passes layer by layer, write OUT.

Each job validates everything it can before the first layer is touched, writes into a staging
folder and renames it when complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import moecompress
from moecompress.errors import MoeCompressError
from moecompress.export.writer import CheckpointWriter, StagingFolder, outer_state, prepare_output
from moecompress.model.driver import LayerContext, run_layerwise
from moecompress.model.loading import LayerwiseModel
from moecompress.passes.quantize import QuantizeConfig, QuantizePass
from moecompress.quant.hf_integration import MoeCompressConfig

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    out: Path
    seconds: float
    output_bytes: int
    input_bytes: int
    details: dict = field(default_factory=dict)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quantize_job(
    model_folder: str | Path,
    out: str | Path,
    cfg: QuantizeConfig,
    input_ids: torch.Tensor | None,
    calibration: dict,
    overwrite: bool = False,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    extra: dict | None = None,
) -> tuple[JobResult, QuantizePass]:
    """Quantize a model folder into a native moecompress checkpoint at ``out``."""
    cfg.validate()
    prepare_output(out, overwrite)
    start = time.time()
    lm = LayerwiseModel(model_folder)
    lm.require_dense("quantize")
    if input_ids is None:
        if cfg.method != "rtn":
            raise MoeCompressError("GPTQ needs calibration data; pass --calib or use --method rtn")
        input_ids = torch.zeros(1, 8, dtype=torch.long)  # RTN: one tiny batch only drives the sweep
    out_dtype = lm.checkpoint_dtype
    qpass = QuantizePass(cfg, lm.config, dtype=out_dtype)
    with StagingFolder(out, overwrite) as stage:
        writer = CheckpointWriter(stage.path, lm.model, out_dtype)

        def write_layer(ctx: LayerContext) -> None:
            writer.write_module(f"{lm.view.layers_name}.{ctx.index}", ctx.layer, f"layer-{ctx.index:05d}.safetensors")

        run_layerwise(lm, input_ids, [qpass], batch_size=batch_size, on_layer_done=write_layer, progress=progress)
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
        config = lm.config
        config.quantization_config = qconfig.to_dict()
        config.dtype = out_dtype
        writer.finish(config, Path(model_folder))
        final = stage.commit()
    result = JobResult(final, time.time() - start, writer.total_bytes, lm.checkpoint.total_bytes())
    return result, qpass


# Files whose presence means a model folder has its own tokenizer. transformers 5 builds an EMPTY
# tokenizer from the config alone when none exists, so callers look for the files instead.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer_files(model_folder: str | Path) -> bool:
    return any((Path(model_folder) / name).is_file() for name in TOKENIZER_FILES)


def calibration_for(
    model_folder: str | Path, source: str, nsamples: int, seqlen: int, seed: int = 0
):
    """Calibration windows for a model folder: its tokenizer for text sources, the model for ``self``."""
    from moecompress.calibration.sources import MODEL_SOURCES, load_calibration
    from moecompress.model.loading import read_config

    config = read_config(model_folder)
    max_pos = getattr(config, "max_position_embeddings", None)
    tokenizer, model = None, None
    if source in MODEL_SOURCES:
        from transformers import AutoModelForCausalLM

        # EBSS / sampling generate with the whole model: the one step that is not layer by layer.
        model = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32).eval()
        if has_tokenizer_files(model_folder):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_folder))  # only to keep special tokens out
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
        except (OSError, ValueError) as exc:
            raise MoeCompressError(
                f"{model_folder} has no tokenizer, needed to tokenize calibration text; copy the tokenizer files or use --calib self or --calib sample"
            ) from exc
    calib = load_calibration(source, tokenizer, nsamples, seqlen, seed=seed, model=model, max_positions=max_pos)
    description = {"source": calib.source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    return calib, description
