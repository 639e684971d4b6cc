"""Checkpoint writing: original tensor names, index and config, and no partial output ever.

A layer-by-layer copy of a model (no pass) must load with ``from_pretrained`` and equal the source;
a run that fails or is interrupted part-way leaves neither OUT nor its staging folder (the output
contract itself is tested in tests/api/test_output.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moecompress  # noqa: F401
from moecompress.errors import MoeCompressError
from moecompress.export.writer import CheckpointWriter, outer_state
from moecompress.api.quantize import quantize_job
from moecompress.model.driver import run_layerwise
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import save_tiny_model
from moecompress.passes.quantize import QuantizeConfig, QuantizePass


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def keys_of(folder) -> set[str]:
    keys = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys.update(f.keys())
    return keys


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# --------------------------------------------------------------------------------------------------
# CheckpointWriter
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_layerwise_copy_keeps_the_original_names_and_loads_equal(tmp_path, family):
    """Fused experts are written back under the checkpoint's own names (experts.3.w1 for Mixtral)."""
    src, out = tmp_path / "src", tmp_path / "out"
    source = save_tiny_model(family, src, seed=0)
    (src / "tokenizer.json").write_text("{}")  # copied verbatim by finish()
    lm = LayerwiseModel(src)
    writer = CheckpointWriter(out, lm.model, torch.float32)
    out.mkdir()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    run_layerwise(lm, ids, [], on_layer_done=lambda ctx: writer.write_module(f"{lm.view.layers_name}.{ctx.index}", ctx.layer, f"layer-{ctx.index}.safetensors"))
    lm.load_outer()
    writer.write_tensors(outer_state(lm.model, lm.view.layers_name), "outer.safetensors")
    writer.finish(lm.config, src)

    assert keys_of(out) == keys_of(src)
    if family == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys_of(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == keys_of(out)
    assert set(index["weight_map"].values()) == {"outer.safetensors", "layer-0.safetensors", "layer-1.safetensors", "layer-2.safetensors"}
    assert index["metadata"]["total_size"] == writer.total_bytes == sum(
        p.numel() * p.element_size() for p in source.state_dict().values()
    )
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, source(input_ids=ids).logits)


def test_writing_a_tensor_twice_is_an_error(tmp_path):
    lm = LayerwiseModel(_saved(tmp_path))
    writer = CheckpointWriter(tmp_path, lm.model, torch.float32)
    writer.write_tensors({"x.weight": torch.ones(2)}, "a.safetensors")
    with pytest.raises(MoeCompressError, match="written twice"):
        writer.write_tensors({"x.weight": torch.ones(2)}, "b.safetensors")


def test_floating_tensors_are_stored_in_the_checkpoint_dtype_packed_ones_as_they_are(tmp_path):
    lm = LayerwiseModel(_saved(tmp_path))
    writer = CheckpointWriter(tmp_path, lm.model, torch.bfloat16)
    tensors = {
        "a.weight": torch.ones(4),
        "a.qweight": torch.ones(4, dtype=torch.int32),
        "a.scales": torch.ones(4, dtype=torch.float16),
        "a.zeros": torch.ones(4, dtype=torch.uint8),
        "a.meta": torch.empty(4, device="meta"),
    }
    writer.write_tensors(tensors, "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {"a.weight": torch.bfloat16, "a.qweight": torch.int32, "a.scales": torch.float16, "a.zeros": torch.uint8}
    assert writer.total_bytes == 4 * 2 + 4 * 4 + 4 * 2 + 4


def _saved(tmp_path):
    folder = tmp_path / "src"
    save_tiny_model("mixtral", folder, seed=0)
    return folder


# --------------------------------------------------------------------------------------------------
# quantize_job: failures part-way leave nothing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_quantize_job_interrupted_part_way_leaves_no_out_and_no_staging_folder(tmp_path, monkeypatch, error):
    src = _saved(tmp_path)
    original = QuantizePass.process
    written = []

    def process_then_fail(self, ctx):
        if ctx.index == 1:
            written.extend(p.name for p in tmp_path.glob(".out.moecompress-stage-*/*"))
            raise error("stopped part-way")
        return original(self, ctx)

    monkeypatch.setattr(QuantizePass, "process", process_then_fail)
    with pytest.raises(error):
        quantize_job(src, tmp_path / "out", QuantizeConfig(bits=4, group_size=32, method="rtn"), None, {})
    assert written == ["layer-00000.safetensors"], "layer 0 was already written when the run stopped"
    assert leftovers(tmp_path) == ["src"]
