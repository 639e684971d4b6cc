"""Checkpoint writing, one decoder layer at a time, into a temporary folder renamed when complete.

``CheckpointWriter`` receives each finished layer from the driver (``on_layer_done``), writes its
tensors to one safetensors shard under the ORIGINAL checkpoint names (transformers'
``revert_weight_conversion`` undoes the fusing, so a Mixtral layer is written as ``experts.3.w1``
again), then the outer modules, the index, config and tokenizer files. Nothing appears at the
output path until ``commit()`` renames the finished temporary folder: an interrupted run leaves no
partial output (the temporary folder is removed on failure).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from moecompress.errors import MoeCompressError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def prepare_output(out: str | Path, overwrite: bool) -> Path:
    """Check the output path before any work starts."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MoeCompressError(f"output {out} already exists; pass --overwrite or choose another path")
    if out.exists() and not out.is_dir():
        raise MoeCompressError(f"output {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


# Staging folders of this process not yet committed or aborted, for abort_all_staging().
_ACTIVE_STAGING: set[Path] = set()


def abort_all_staging() -> None:
    """Remove every staging folder this process still holds (a termination signal's last act)."""
    for path in list(_ACTIVE_STAGING):
        shutil.rmtree(path, ignore_errors=True)
        _ACTIVE_STAGING.discard(path)


class StagingFolder:
    """A temporary folder beside ``out`` that becomes ``out`` on commit, or disappears on failure."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = prepare_output(out, overwrite)
        self.overwrite = overwrite
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        _ACTIVE_STAGING.add(self.path)

    def commit(self) -> Path:
        if self.out.exists():
            if not self.overwrite:
                raise MoeCompressError(f"output {self.out} appeared while running; not overwriting it")
            shutil.rmtree(self.out)
        self.path.rename(self.out)
        _ACTIVE_STAGING.discard(self.path)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        _ACTIVE_STAGING.discard(self.path)

    def __enter__(self) -> "StagingFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


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

    def write_module(self, prefix: str, module: nn.Module, shard_name: str) -> None:
        state = {f"{prefix}.{k}" if prefix else k: v for k, v in module.state_dict().items()}
        self.write_tensors(state, shard_name)

    def write_tensors(self, state: dict[str, torch.Tensor], shard_name: str) -> None:
        state = {k: v for k, v in state.items() if v.device.type != "meta"}
        if not state:
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
        """Index, config and tokenizer files."""
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save_pretrained(str(self.folder))
        if source_folder is not None:
            for name in TOKENIZER_FILES:
                if (source_folder / name).exists():
                    shutil.copy2(source_folder / name, self.folder / name)


def outer_state(model: nn.Module, layers_name: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model that does not belong to a decoder layer."""
    prefix = layers_name + "."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
