"""Open a Hugging Face checkpoint without loading it: one decoder layer at a time.

The model skeleton is built on the ``meta`` device (no memory). Any module can then be materialised
from the safetensors shards on demand: its checkpoint keys are read lazily (``safe_open``) and passed
through transformers' own conversion machinery (``convert_and_load_state_dict_in_model`` with the
model's ``get_model_conversion_mapping``), so per-expert checkpoint names (``experts.3.w1.weight``)
are fused exactly as ``from_pretrained`` fuses them. Releasing a module moves it back to ``meta``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig

from moecompress.errors import MoeCompressError, UnsupportedModelError
from moecompress.model.checks import (
    check_checkpoint_complete,
    check_config_dtype,
    check_finite,
    check_native_tensors,
    check_routing_config,
)
from moecompress.model.families import OUTPUT_HEAD
from moecompress.model.view import MoEModelView, describe_model
from moecompress.quant.hf_integration import GUARD_SHARD, native_config, rebuild_native_structure

log = logging.getLogger(__name__)

class CheckpointIndex:
    """Checkpoint key -> safetensors file, for a single-file or sharded (index.json) checkpoint."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise MoeCompressError(f"{index} is not a valid safetensors index ({exc}); re-save the model") from exc
            # The load guard's shard holds tripwires for plain transformers, never weights for us.
            self.key_to_file = {k: folder / f for k, f in weight_map.items() if f != GUARD_SHARD}
        elif single.exists():
            self.key_to_file = {k: single for k in self._keys_of(single)}
        else:
            raise MoeCompressError(
                f"{folder} has no model.safetensors or model.safetensors.index.json; "
                "save the model with save_pretrained(safe_serialization=True)"
            )
        for file in sorted(set(self.key_to_file.values())):
            if not file.exists():
                raise MoeCompressError(f"checkpoint shard {file} is missing; re-download or re-save the model")
        if index.exists():  # every tensor the index lists is in its shard (headers only: cheap)
            by_file: dict[Path, list[str]] = {}
            for key, file in self.key_to_file.items():
                by_file.setdefault(file, []).append(key)
            for file, keys in sorted(by_file.items()):
                present = set(self._keys_of(file))
                absent = [k for k in keys if k not in present]
                if absent:
                    more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
                    raise MoeCompressError(
                        f"checkpoint {folder} is incomplete: tensor {absent[0]}{more}, listed in {index.name}, is not in "
                        f"{file.name}; re-download or re-save the model"
                    )
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        try:
            with safe_open(str(file), "pt") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise MoeCompressError(f"cannot read {file}: {exc}; the file is corrupt or not safetensors") from exc

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), "pt")
            except Exception as exc:
                raise MoeCompressError(f"cannot read {file}: {exc}; the file is corrupt or not safetensors") from exc
        return self._handles[file]

    def get(self, key: str) -> torch.Tensor:
        """A tensor backed by the file's memory map (no copy until the model's loader makes one)."""
        try:
            return self._handle(self.key_to_file[key]).get_tensor(key)
        except MoeCompressError:
            raise
        except Exception as exc:
            raise MoeCompressError(f"cannot read tensor {key} from {self.key_to_file[key]}: {exc}") from exc

    def close(self) -> None:
        """Drop the open file handles (and their memory maps) between layers."""
        self._handles.clear()

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.key_to_file.values()))


def read_config(folder: str | Path):
    """AutoConfig of a model folder, with one-line errors for the usual mistakes."""
    path = Path(folder)
    if not path.exists():
        raise MoeCompressError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise MoeCompressError(f"{path} is not a folder; pass a folder written by save_pretrained")
    if not (path / "config.json").exists():
        raise MoeCompressError(f"{path} has no config.json; pass a folder written by save_pretrained")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raw = None  # AutoConfig reports it below, in its own words
    if isinstance(raw, dict):
        check_config_dtype(raw, path / "config.json")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except StrictDataclassError as exc:  # a field of the wrong type: the cause is on the following lines
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise UnsupportedModelError(f"cannot read {path / 'config.json'}: {reason}; fix config.json") from exc
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"cannot read {path / 'config.json'}: {first}") from exc
    check_routing_config(config, str(path / "config.json"))
    return config


@torch.no_grad()
def _own_storage(module: nn.Module) -> None:
    """Copy tensors that still point into a shard's memory map (those the loader assigned without a
    conversion: attention, norms, router) so the map, and its pages in RSS, go away now instead of
    when the layer is released. Fused experts were built by stacking and already own their memory."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.numel() and not _is_fused_expert_param(sub, name):
                p.data = p.data.clone()


def _is_fused_expert_param(module: nn.Module, name: str) -> bool:
    return hasattr(module, "is_concatenated") and name in ("gate_up_proj", "up_proj", "down_proj")


def _rotary_like(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding")


def _freeze(module: nn.Module) -> None:
    """Loaded weights are frozen: nothing trains one unless it selects it (heal's select_trainables).
    The MoE view reads expert weights with their autograd graph (heal trains through it), so a weight
    left requiring grad would make every backward through it (the compressed-experts fit) compute and
    keep a gradient the size of the layer's experts."""
    module.requires_grad_(False)


class LayerwiseModel:
    """A causal LM whose weights live on disk until a module is asked for.

    ``model`` is the full skeleton (meta device); ``view`` its MoE view (valid on meta: shapes only).
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        self.checkpoint = CheckpointIndex(self.folder)
        self.dtype = dtype
        try:
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(
                    self.config, dtype=dtype, attn_implementation=attn_implementation
                )
        except ValueError as exc:
            first = str(exc).strip().splitlines()[0]
            raise UnsupportedModelError(f"transformers cannot build model type {self.config.model_type!r}: {first}") from exc
        self.model.eval()
        self.view: MoEModelView = describe_model(self.model)
        self.layers = self.model.get_submodule(self.view.layers_name)
        # A moecompress native checkpoint: packed / wrapped modules and expert -> group maps are
        # rebuilt now, as our quantizer does in from_pretrained, before any weight is read. The view
        # was taken on the family skeleton: grouped experts are resized in place (the view sees E'),
        # replaced modules are read by the passes that accept them (compress-experts).
        self.native = native_config(self.config)
        if self.native is not None:
            rebuild_native_structure(self.model, self.native, dtype)  # the runtime modules' function, registered
        self._mapping = get_model_conversion_mapping(self.model)
        if self.native is not None:
            # Every tensor the config promises must be in the shards: a missing one would be left as
            # uninitialised memory by to_empty() (NaN or garbage far from the cause).
            check_native_tensors(self.model, self.native, self.checkpoint.keys(), self.folder, self._mapping)
        tied_head = [f"{OUTPUT_HEAD}.weight"] if getattr(self.config, "tie_word_embeddings", False) else []
        check_checkpoint_complete(self.model, self.checkpoint.keys(), self.folder, self._mapping, optional=tied_head)

    @property
    def packed_modules(self) -> dict[str, dict]:
        """Module path -> description of the checkpoint's packed/wrapped modules (empty for a dense model)."""
        return dict((self.native or {}).get("modules", {}))

    @property
    def expert_groups(self) -> dict[str, list[int]]:
        """Experts module path -> expert -> group map (an exact-router merge); empty otherwise."""
        return dict((self.native or {}).get("expert_groups", {}))

    def require_dense(self, command: str) -> None:
        """One-line refusal for commands that read only unquantized checkpoints."""
        if self.packed_modules:
            raise MoeCompressError(
                f"{self.folder} is a quantized or compressed moecompress checkpoint; run {command} on the unquantized model"
            )

    def require_ungrouped(self, command: str) -> None:
        """One-line refusal for commands that cannot read an exact-router merge (expert -> group maps)."""
        if self.expert_groups:
            raise MoeCompressError(
                f"{self.folder} holds merged experts behind an expert -> group map (merge --router exact); "
                f"run {command} on the model before merging, or merge with --router standard or exact-slots"
            )

    @property
    def checkpoint_dtype(self) -> torch.dtype:
        """The dtype the checkpoint was saved in, read from config.json (the in-memory config's dtype
        is the one layers are computed in), for writing outputs in the source's precision."""
        raw = json.loads((self.folder / "config.json").read_text())
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        found = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        return found if isinstance(found, torch.dtype) else torch.float32

    # -- materialising modules ---------------------------------------------------------------------

    def _keys_under(self, prefix: str) -> list[str]:
        p = prefix + "."
        return [k for k in self.checkpoint.keys() if k.startswith(p)]

    @torch.no_grad()
    def _load_keys(self, keys: list[str]) -> set[str]:
        """Load checkpoint tensors into the (materialised) skeleton; return the parameter names filled."""
        try:
            state = {k: self.checkpoint.get(k) for k in keys}
            cfg = LoadStateDictConfig(weight_mapping=self._mapping, dtype=self.dtype)
            info, _ = convert_and_load_state_dict_in_model(self.model, state, cfg)
            del state
        finally:
            # Pages of a memory-mapped shard count in RSS for as long as the map is open: close it
            # so peak memory stays about one layer, not the whole checkpoint read so far.
            self.checkpoint.close()
        if info.conversion_errors:
            raise MoeCompressError(f"cannot convert checkpoint tensors: {info.conversion_errors}")
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys, key=str)[0]
            raise MoeCompressError(
                f"checkpoint {self.folder}: {name} has shape {tuple(got)} but the model expects {tuple(want)}; "
                "the checkpoint is incomplete or from another configuration"
            )
        return info.missing_keys

    def _materialize(self, module: nn.Module) -> None:
        module.to_empty(device="cpu")
        # Non-persistent buffers (rotary inverse frequencies) are computed in __init__, not stored:
        # rebuild them on CPU instead of leaving uninitialised memory behind.
        for name, sub in list(module.named_modules()):
            if _rotary_like(sub):
                fresh = type(sub)(config=sub.config) if hasattr(sub, "config") else type(sub)(self.config)
                parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                if name:
                    setattr(parent, name.rsplit(".", 1)[-1], fresh)

    def _check_loaded(self, prefix: str, module: nn.Module, missing: set[str]) -> None:
        names = {f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()}
        absent = sorted(names & missing)
        if absent:
            raise MoeCompressError(
                f"checkpoint {self.folder} lacks {len(absent)} weights of {prefix or 'the model'} "
                f"(first: {absent[0]}); the checkpoint is incomplete or from another architecture"
            )

    def load_layer(self, index: int) -> nn.Module:
        """Materialise decoder layer ``index`` on CPU with its checkpoint weights."""
        prefix = f"{self.view.layers_name}.{index}"
        layer = self.layers[index]
        self._materialize(layer)
        missing = self._load_keys(self._keys_under(prefix))
        self._check_loaded(prefix, layer, missing)
        _own_storage(layer)
        check_finite(layer, prefix, self.folder)
        _freeze(layer)
        return layer

    def release_layer(self, index: int) -> None:
        """Free layer ``index``'s weights: its modules go back to meta. So do the modules the view still
        references, since a pass may have swapped one out of the layer (the quantize pass replaces the
        experts module): otherwise its weights stayed alive through the view, one layer more per layer."""
        self.layers[index].to("meta")
        block = self.view.blocks.get(index)
        for module in block.referenced_modules() if block is not None else []:
            module.to("meta")

    def load_outer(self) -> None:
        """Materialise everything that is not a decoder layer: embeddings, final norm, head, rotary."""
        layers = self.view.layers_name
        outer_keys = [k for k in self.checkpoint.keys() if not k.startswith(layers + ".")]
        for name, module in self.model.named_children():
            self._materialize_outer(module, name)
        missing = self._load_keys(outer_keys)
        self._tie_if_needed(missing)
        outer_missing = {m for m in missing if not m.startswith(layers + ".")}
        if outer_missing:
            raise MoeCompressError(
                f"checkpoint {self.folder} lacks {sorted(outer_missing)[0]}; the checkpoint is incomplete"
            )
        check_finite(self.model, "", self.folder, skip_prefix=layers)
        for name, module in self.model.named_children():
            if name != layers:
                _freeze(module)

    def _materialize_outer(self, module: nn.Module, name: str) -> None:
        layers = self.view.layers_name
        if name == layers:
            return
        if layers.startswith(name + "."):
            for child_name, child in module.named_children():
                self._materialize_outer(child, f"{name}.{child_name}")
            for pname, p in list(module.named_parameters(recurse=False)):
                module.register_parameter(pname, nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=False))
            return
        self._materialize(module)
        if _rotary_like(module):
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, type(module)(config=self.config))

    def _tie_if_needed(self, missing: set[str]) -> None:
        head = f"{OUTPUT_HEAD}.weight"
        if head in missing and getattr(self.config, "tie_word_embeddings", False):
            self.model.get_submodule(OUTPUT_HEAD).weight = self.model.get_input_embeddings().weight
            missing.discard(head)

    def release_outer(self) -> None:
        for name, module in self.model.named_children():
            if name != self.view.layers_name.split(".")[0]:
                module.to("meta")
        base = self.model.get_submodule(self.view.layers_name.rsplit(".", 1)[0]) if "." in self.view.layers_name else None
        if base is not None:
            for child_name, child in base.named_children():
                if f"{self.view.layers_name.rsplit('.', 1)[0]}.{child_name}" != self.view.layers_name:
                    child.to("meta")

    def load_full(self) -> nn.Module:
        """Materialise the whole model (for small models and tests)."""
        self.load_outer()
        for i in range(self.view.num_layers):
            self.load_layer(i)
        return self.model
