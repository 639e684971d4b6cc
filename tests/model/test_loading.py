"""LayerwiseModel / CheckpointIndex / read_config: lazy loading, per-expert key fusion, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moecompress.errors import MoeCompressError, UnsupportedModelError
from moecompress.model.loading import CheckpointIndex, LayerwiseModel, read_config
from moecompress.model.tiny import TINY_CONFIGS, save_tiny_model

FAMILIES = list(TINY_CONFIGS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(family, sharded) -> (folder, the in-memory model that was saved), each written once."""
    cache: dict = {}

    def get(family: str, sharded: bool = False):
        if (family, sharded) not in cache:
            folder = tmp_path_factory.mktemp(f"{family}_{'sharded' if sharded else 'single'}")
            model = save_tiny_model(family, folder, seed=0, max_shard_size="50KB" if sharded else None)
            cache[family, sharded] = (folder, model)
        return cache[family, sharded]

    return get


def _persistent_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers (what a checkpoint holds), by name."""
    return {k: v for k, v in model.state_dict().items()}


def _devices(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


# ---- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_load_full_restores_the_saved_model_exactly(saved, family, sharded):
    folder, original = saved(family, sharded)
    if sharded:
        assert (folder / "model.safetensors.index.json").exists()
    lm = LayerwiseModel(folder)
    assert _devices(lm.model) == {"meta"}  # the skeleton costs no memory
    model = lm.load_full()
    assert _devices(model) == {"cpu"}
    want, got = _persistent_state(original), _persistent_state(model)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), f"{name} differs after layer-wise loading"
    # Non-persistent rotary buffers are rebuilt, not left as uninitialised memory.
    for name, buf in original.named_buffers():
        if name.endswith("inv_freq"):
            torch.testing.assert_close(model.get_buffer(name), buf)
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_sharded_checkpoint_index_maps_keys_to_several_files(saved):
    folder, original = saved("mixtral", sharded=True)
    index = CheckpointIndex(folder)
    files = set(index.key_to_file.values())
    assert len(files) > 1
    assert set(index.keys()) == set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    assert index.total_bytes() == sum(f.stat().st_size for f in files)
    key = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    down = original.model.layers[1].mlp.experts.down_proj[2]
    assert torch.equal(index.get(key), down)


def test_load_layer_materialises_only_that_layer_and_release_returns_it_to_meta(saved):
    folder, original = saved("qwen2_moe")
    lm = LayerwiseModel(folder)
    layer = lm.load_layer(1)
    assert layer is lm.layers[1]
    assert _devices(lm.layers[1]) == {"cpu"}
    assert _devices(lm.layers[0]) == _devices(lm.layers[2]) == {"meta"}
    assert _devices(lm.model.model.embed_tokens) == {"meta"}
    for name, p in original.model.layers[1].state_dict().items():
        assert torch.equal(layer.state_dict()[name], p), name
    # The MoE view of the meta skeleton points at the materialised modules.
    assert lm.view.blocks[1].experts.module.gate_up_proj.device.type == "cpu"
    lm.release_layer(1)
    assert _devices(lm.layers[1]) == {"meta"}


def test_release_layer_frees_a_module_a_pass_swapped_out_of_the_layer(saved):
    """The quantize pass replaces the experts module; the view still references the old one, whose
    weights must not outlive the layer (they did: one layer's experts more per finished layer)."""
    folder, _original = saved("qwen2_moe")
    lm = LayerwiseModel(folder)
    layer = lm.load_layer(1)
    block = lm.view.blocks[1]
    old = block.experts.module
    layer.set_submodule(block.experts_name, torch.nn.Identity())
    lm.release_layer(1)
    assert _devices(old) == {"meta"}
    assert _devices(lm.layers[1]) == {"meta"}


def test_load_outer_and_release_outer(saved):
    folder, original = saved("deepseek_v3")
    lm = LayerwiseModel(folder)
    lm.load_outer()
    assert torch.equal(lm.model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert torch.equal(lm.model.lm_head.weight, original.lm_head.weight)
    assert torch.equal(lm.model.model.norm.weight, original.model.norm.weight)
    assert all(_devices(layer) == {"meta"} for layer in lm.layers)
    lm.release_outer()
    assert _devices(lm.model) == {"meta"}


def test_dtype_is_applied_when_loading(saved):
    folder, _ = saved("mixtral")
    lm = LayerwiseModel(folder, dtype=torch.bfloat16)
    layer = lm.load_layer(0)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}


def test_tied_embeddings_are_tied_after_load_outer(tmp_path):
    original = save_tiny_model("mixtral", tmp_path, tie_word_embeddings=True)
    lm = LayerwiseModel(tmp_path)
    model = lm.load_full()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_meta_skeleton_view_matches_from_pretrained(saved):
    folder, _ = saved("gpt_oss")
    lm = LayerwiseModel(folder)
    full = AutoModelForCausalLM.from_pretrained(str(folder))
    assert lm.view.moe_layers == [0, 1, 2]
    for name, p in full.named_parameters():
        assert lm.model.get_parameter(name).shape == p.shape, name


# ---- bad input -----------------------------------------------------------------------------------


def _write_dense_llama(folder):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))


def _copy_config(saved, folder, family="mixtral"):
    src, _ = saved(family)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text((src / "config.json").read_text())


def test_missing_folder(tmp_path):
    with pytest.raises(MoeCompressError, match="does not exist"):
        LayerwiseModel(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(MoeCompressError, match="is not a folder"):
        LayerwiseModel(f)


def test_folder_without_config(tmp_path):
    with pytest.raises(MoeCompressError, match="no config.json"):
        LayerwiseModel(tmp_path)


def test_folder_without_weights(saved, tmp_path):
    _copy_config(saved, tmp_path)
    with pytest.raises(MoeCompressError, match="no model.safetensors"):
        LayerwiseModel(tmp_path)


def test_corrupt_safetensors(saved, tmp_path):
    _copy_config(saved, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(MoeCompressError, match="corrupt or not safetensors"):
        LayerwiseModel(tmp_path)


def test_corrupt_index_json(saved, tmp_path):
    _copy_config(saved, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(MoeCompressError, match="not a valid safetensors index"):
        LayerwiseModel(tmp_path)


def test_index_pointing_to_a_missing_shard(saved, tmp_path):
    _copy_config(saved, tmp_path)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoeCompressError, match="is missing"):
        LayerwiseModel(tmp_path)


def test_checkpoint_lacking_an_expert_weight(saved, tmp_path):
    src, _ = saved("mixtral")
    _copy_config(saved, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.0.w2.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    lm = LayerwiseModel(tmp_path)
    lm.load_layer(0)  # complete layers still load
    # transformers reports the 3-expert stack as a *mismatched* key (not a missing one); the fused
    # down_proj must not be left as uninitialised memory.
    with pytest.raises(MoeCompressError, match=r"layers\.1\."):
        lm.load_layer(1)


def test_checkpoint_lacking_the_embeddings(saved, tmp_path):
    src, _ = saved("mixtral")
    _copy_config(saved, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    del state["model.embed_tokens.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MoeCompressError, match="lacks model.embed_tokens.weight"):
        LayerwiseModel(tmp_path).load_outer()


def test_dense_model_is_unsupported(tmp_path):
    _write_dense_llama(tmp_path)
    with pytest.raises(UnsupportedModelError, match="no mixture-of-experts layers"):
        LayerwiseModel(tmp_path)


def test_unknown_architecture_is_unsupported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_model", "hidden_size": 8}))
    with pytest.raises(UnsupportedModelError, match="cannot read"):
        read_config(tmp_path)
    with pytest.raises(MoeCompressError):
        LayerwiseModel(tmp_path)


def test_unreadable_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(MoeCompressError):
        read_config(tmp_path)


def test_loaded_weights_are_frozen_until_a_pass_selects_them(tmp_path):
    """A backward through a loaded layer (the compressed-experts fit) must not compute the layer's
    weight gradients: the MoE view reads expert weights with their autograd graph."""
    import torch

    from moecompress.model.loading import LayerwiseModel
    from moecompress.model.tiny import save_tiny_model

    save_tiny_model("qwen3_moe", tmp_path / "m")
    lm = LayerwiseModel(tmp_path / "m")
    layer = lm.load_layer(0)
    lm.load_outer()
    assert not any(p.requires_grad for p in layer.parameters())
    assert not any(p.requires_grad for p in lm.model.get_output_embeddings().parameters())
    experts = lm.view.blocks[0].experts
    x = torch.randn(3, experts.hidden_size, requires_grad=True)
    experts.forward_expert(0, x).sum().backward()
    assert x.grad is not None and experts.module.gate_up_proj.grad is None
