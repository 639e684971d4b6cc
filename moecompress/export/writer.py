"""Checkpoint writing, one decoder layer at a time, into a folder (a job's staging folder).

``CheckpointWriter`` receives each finished layer from the driver (``on_layer_done``), writes its
tensors to one safetensors shard under the ORIGINAL checkpoint names (transformers'
``revert_weight_conversion`` undoes the fusing, so a Mixtral layer is written as ``experts.3.w1``
again), then the outer modules, the index, config and tokenizer files. The staging folder, the atomic
swap into OUT and the cleanup after a kill are the output contract's (:mod:`moecompress.api.output`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from moecompress.errors import MoeCompressError
from moecompress.export.load_guard import guard_names, write_guard
from moecompress.model.families import OUTPUT_COPY_FILES
from moecompress.parallel import current as current_ranks
from moecompress.quant.hf_integration import native_config



def _to_storage(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors in the checkpoint's dtype; integer and fp16 packed tensors as they are."""
    t = t.detach().to("cpu")
    if dtype is not None and t.is_floating_point() and t.dtype != torch.float16:
        t = t.to(dtype)
    return t.contiguous()


class CheckpointWriter:
    """Writes a model shard by shard into ``folder`` (a staging folder's path)."""

    def __init__(self, folder: Path, model: nn.Module, dtype: torch.dtype | None):
        self.folder = Path(folder)
        self.model = model
        self.dtype = dtype
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        # Under torchrun every rank walks the model; only the writer (rank 0) writes a byte.
        self.enabled = current_ranks().is_writer

    def write_module(self, prefix: str, module: nn.Module, shard_name: str) -> None:
        state = {f"{prefix}.{k}" if prefix else k: v for k, v in module.state_dict().items()}
        self.write_tensors(state, shard_name)

    def write_tensors(self, state: dict[str, torch.Tensor], shard_name: str) -> None:
        state = {k: v for k, v in state.items() if v.device.type != "meta"}
        if not state or not self.enabled:
            return
        state = revert_weight_conversion(self.model, state)
        # Tied or shared storage must be cloned for safetensors.
        tensors = {k: _to_storage(v, self.dtype).clone() for k, v in sorted(state.items())}
        save_file(tensors, str(self.folder / shard_name), metadata={"format": "pt"})
        for k, v in tensors.items():
            if k in self.weight_map:
                raise MoeCompressError(f"tensor {k} written twice; this is a bug in moecompress")
            self.weight_map[k] = shard_name
            self.total_bytes += v.numel() * v.element_size()

    def finish(self, config, source_folder: Path | None = None) -> None:
        """The load guard (native checkpoints), index, config and tokenizer files."""
        if not self.enabled:
            return
        native = native_config(config)
        if native is not None and native.get("modules"):
            guards = guard_names(config, native["modules"], self.weight_map)
            self.weight_map.update(write_guard(self.folder, guards))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save_pretrained(str(self.folder))
        if source_folder is not None:
            for name in OUTPUT_COPY_FILES:
                if (source_folder / name).exists():
                    shutil.copy2(source_folder / name, self.folder / name)


def outer_state(model: nn.Module, layers_name: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model that does not belong to a decoder layer."""
    prefix = layers_name + "."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
