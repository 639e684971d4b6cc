"""A compressed-tensors checkpoint as the dense model its serving runtime computes with.

transformers (5.24/5.25) dequantizes every routed expert of a model with ONE scheme and every dense
module with one more (lint rules HF201/HF203): a per-layer mixed export -- what ``--target vllm``
writes -- loads *silently wrong* through ``from_pretrained``. vLLM resolves each module's own scheme.
``moecompress eval`` must measure what the checkpoint computes where it runs, so for a checkpoint the
installed transformers cannot load exactly, it evaluates this: every packed module decompressed with
the scheme its own config group gives it (compressed-tensors' rules: ``ignore`` first, then the first
group whose target matches), by compressed-tensors' own decompressor, written as a float32 dense
checkpoint into a scratch folder that ``from_pretrained`` then reads.

Memory and disk: the whole dense model in float32 (an evaluation copy, not an output).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecompress.errors import MoeCompressError
from moecompress.export.lint import groups_matching, is_ignored, read_json, shard_files
from moecompress.model.families import OUTPUT_COPY_FILES


def installed_transformers_release() -> str:
    """The hf target's table for the installed transformers (export/targets.py): 5.25 from 5.25 on."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "5.25" if (major, minor) >= (5, 25) else "5.24"


def transformers_loads_exactly(folder: str | Path) -> tuple[bool, str]:
    """(True, "") when the installed transformers loads this compressed-tensors checkpoint as it is
    meant (no lint error for the hf target at the installed release); else (False, the first rule)."""
    from moecompress.export.lint import lint_checkpoint

    report = lint_checkpoint(folder, target="hf", transformers_version=installed_transformers_release())
    errors = [f for f in report.errors if f.applies_to(("hf",))]
    return (not errors, "" if not errors else f"{errors[0].rule}: {errors[0].message}")


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in shard_files(folder):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def decompress_to_dense(folder: str | Path, out: str | Path) -> Path:
    """Write at ``out`` (a scratch folder) the float32 dense checkpoint ``folder`` computes in vLLM."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    folder, out = Path(folder), Path(out)
    config = read_json(folder / "config.json")
    qc = QuantizationConfig.model_validate(config.pop("quantization_config"))
    groups, ignore = dict(qc.config_groups), list(qc.ignore or [])
    dense: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in _read_all(folder).items():
        module, _, suffix = key.rpartition(".")
        if suffix.startswith("weight_"):
            packed[module][suffix] = value
        else:
            dense[key] = value.float() if value.is_floating_point() else value
    for module, parts in sorted(packed.items()):
        hits = [] if is_ignored(module, ignore, True) else groups_matching(module, groups, True)
        if not hits:
            raise MoeCompressError(f"{folder}: {module} holds packed weights but no config group targets it; the checkpoint is corrupt")
        scheme = groups[hits[0]]
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
        dense[f"{module}.weight"] = compressor.decompress(dict(parts), scheme)["weight"].to(torch.float32)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in dense.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in OUTPUT_COPY_FILES:
        if (folder / name).exists():
            shutil.copy2(folder / name, out / name)
    return out


__all__ = ["decompress_to_dense", "installed_transformers_release", "transformers_loads_exactly"]
