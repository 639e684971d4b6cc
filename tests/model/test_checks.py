"""Broken models refused at load with one line (moecompress.model.checks, wired into read_config,
LayerwiseModel, the MoE view, evaluation and the HfQuantizer): bad dtype / top-k in config.json,
NaN/Inf weights, a native checkpoint missing a tensor its quantization_config promises."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moecompress  # noqa: F401  (registers quant_method "moecompress")
from moecompress.errors import MoeCompressError, UnsupportedModelError
from moecompress.model.checks import all_finite, check_native_tensors, check_routing_config, promised_tensors
from moecompress.model.loading import LayerwiseModel, read_config
from moecompress.model.tiny import build_tiny_model, save_tiny_model, tiny_config
from moecompress.model.view import describe_model
from moecompress.passes.quantize import QuantizeConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> a saved tiny model folder (written once per family)."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            save_tiny_model(family, folder, seed=0)
            cache[family] = folder
        return cache[family]

    return get


@pytest.fixture(scope="module")
def native(tmp_path_factory, tiny):
    """A native (RTN w4, attention w8) checkpoint of the tiny mixtral: its packed keys are written under
    the family's checkpoint names (``block_sparse_moe``), not the module paths (``mlp``)."""
    from moecompress.api.quantize import quantize_job

    out = tmp_path_factory.mktemp("native") / "q"
    cfg = QuantizeConfig(bits=4, group_size=32, method="rtn", attention_bits=8)
    quantize_job(tiny("mixtral"), out, cfg, None, {"source": "none (rtn)"})
    return out


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    raw = json.loads((src / "config.json").read_text())
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


# ----------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("value", ["float99", "int8", "torch.float32", 5])
@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_unsupported_dtype_in_config_is_one_line(tiny, tmp_path, key, value):
    folder = _copy_with_config(tiny("mixtral"), tmp_path / "m", **{key: value})
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: {key} must be one of float32, bfloat16, float16") as info:
        LayerwiseModel(folder)
    assert "\n" not in str(info.value) and repr(value) in str(info.value)


def test_supported_dtypes_load(tiny, tmp_path):
    for i, value in enumerate(["bfloat16", "float16", "float32"]):
        read_config(_copy_with_config(tiny("mixtral"), tmp_path / str(i), dtype=value))


@pytest.mark.parametrize("family, key, count", [("mixtral", "num_local_experts", 4), ("deepseek_v3", "n_routed_experts", 8)])
@pytest.mark.parametrize("top_k", [0, -1, 9])
def test_top_k_outside_the_expert_count_is_refused_at_load(tiny, tmp_path, family, key, count, top_k):
    folder = _copy_with_config(tiny(family), tmp_path / "m", num_experts_per_tok=top_k)
    message = rf"num_experts_per_tok \(experts per token, top-k\) must be an integer >= 1 and at most {key} \({count}\), got {top_k}"
    with pytest.raises(UnsupportedModelError, match=message):
        read_config(folder)
    with pytest.raises(UnsupportedModelError, match=message):
        LayerwiseModel(folder)


def test_a_config_field_of_the_wrong_type_is_one_line(tiny, tmp_path):
    folder = _copy_with_config(tiny("mixtral"), tmp_path / "m", num_experts_per_tok=2.5)
    with pytest.raises(UnsupportedModelError, match=r"config\.json: .*'num_experts_per_tok'.*expected int, got float \(value: 2\.5\)") as info:
        LayerwiseModel(folder)
    assert "\n" not in str(info.value)


def test_group_limited_routing_that_cannot_select_top_k_is_refused(tiny, tmp_path):
    # deepseek tiny: 8 experts in n_group=2 groups, topk_group=1 -> 4 reachable experts
    folder = _copy_with_config(tiny("deepseek_v3"), tmp_path / "a", num_experts_per_tok=5)
    with pytest.raises(UnsupportedModelError, match=r"num_experts_per_tok must be at most 4 .*got 5"):
        read_config(folder)
    folder = _copy_with_config(tiny("deepseek_v3"), tmp_path / "b", n_group=3)
    with pytest.raises(UnsupportedModelError, match=r"n_routed_experts \(8\) must split evenly into n_group \(3\)"):
        read_config(folder)
    folder = _copy_with_config(tiny("deepseek_v3"), tmp_path / "c", topk_group=3)
    with pytest.raises(UnsupportedModelError, match=r"topk_group must be an integer in \[1, n_group \(2\)\], got 3"):
        read_config(folder)


def test_every_tiny_family_passes_the_routing_check():
    from moecompress.model.tiny import TINY_CONFIGS

    for family in TINY_CONFIGS:
        check_routing_config(tiny_config(family), family)


def test_view_refuses_an_in_memory_model_with_a_broken_top_k():
    model = build_tiny_model("qwen3_moe", seed=0)
    for block in describe_model(model).blocks.values():
        block.router.module.top_k = 7
    with pytest.raises(UnsupportedModelError, match=r"top-k.* must be an integer in \[1, 4\].*got 7"):
        describe_model(model)


# ----------------------------------------------------------------------------- NaN / Inf weights


def test_all_finite_chunks_large_tensors(monkeypatch):
    import moecompress.model.checks as checks

    monkeypatch.setattr(checks, "FINITE_CHUNK", 7)
    t = torch.zeros(10, 5)
    assert all_finite(t) and all_finite(torch.zeros(3, dtype=torch.int32)) and all_finite(torch.empty(0))
    t[9, 4] = float("inf")
    assert not all_finite(t)
    t[9, 4] = float("nan")
    assert not all_finite(t.t())  # non-contiguous
    assert not all_finite(t.to(torch.bfloat16))


def _poison(src, dst, key, value=float("nan")):
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_nan_in_a_decoder_layer_is_refused_when_the_layer_loads(tiny, tmp_path):
    folder = _poison(tiny("mixtral"), tmp_path / "m", "model.layers.1.block_sparse_moe.experts.2.w2.weight")
    lm = LayerwiseModel(folder)
    lm.load_layer(0)  # healthy layers still load
    with pytest.raises(MoeCompressError, match=r"tensor model\.layers\.1\.mlp\.experts\.down_proj holds NaN/Inf values; the checkpoint is corrupt"):
        lm.load_layer(1)


def test_inf_in_the_outer_weights_is_refused(tiny, tmp_path):
    folder = _poison(tiny("qwen3_moe"), tmp_path / "m", "model.norm.weight", float("-inf"))
    lm = LayerwiseModel(folder)
    with pytest.raises(MoeCompressError, match=r"tensor model\.norm\.weight holds NaN/Inf values"):
        lm.load_outer()


def test_nan_weights_are_refused_by_the_driver_before_any_pass_runs(tiny, tmp_path):
    from moecompress.model.driver import run_layerwise

    folder = _poison(tiny("qwen3_moe"), tmp_path / "m", "model.layers.0.self_attn.q_proj.weight")
    ran = []

    class Pass:
        def attach(self, ctx):
            ran.append(ctx.index)
            return []

        def process(self, ctx):
            return False

    with pytest.raises(MoeCompressError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight holds NaN/Inf"):
        run_layerwise(LayerwiseModel(folder), torch.zeros(1, 4, dtype=torch.long), [Pass()])
    assert ran == []


# ----------------------------------------------------------------------------- native checkpoints


def _drop_tensor(src, dst, key):
    """Copy a (sharded) native checkpoint without ``key`` (from its shard and from the index)."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = dst / index["weight_map"].pop(key)
    state = load_file(str(shard))
    del state[key]
    save_file(state, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    return dst


def test_complete_native_checkpoint_promises_only_what_it_holds(native):
    lm = LayerwiseModel(native)  # runs the check
    promised = promised_tensors(lm.model, lm.native)
    assert "model.layers.1.mlp.experts.w4_down_qweight" in promised
    assert "model.layers.0.self_attn.q_proj.scales" in promised
    keys = json.loads((native / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.block_sparse_moe.experts.w4_down_qweight" in keys  # renamed on load
    check_native_tensors(lm.model, lm.native, keys, native)
    AutoModelForCausalLM.from_pretrained(str(native))


@pytest.mark.parametrize(
    "key, name",
    [
        ("model.layers.1.block_sparse_moe.experts.w4_gate_up_scales", "model.layers.1.mlp.experts.w4_gate_up_scales"),
        ("model.layers.2.self_attn.o_proj.qweight", "model.layers.2.self_attn.o_proj.qweight"),
    ],
)
def test_native_checkpoint_missing_a_packed_tensor_is_refused_by_both_loaders(native, tmp_path, key, name):
    bad = _drop_tensor(native, tmp_path / "bad", key)
    message = rf"{bad}: the checkpoint is incomplete: tensor {name}, promised by its quantization_config, is in none of its safetensors files; re-run"
    with pytest.raises(MoeCompressError, match=message.replace(".", r"\.").replace("(", r"\(")):
        LayerwiseModel(bad)  # before any layer is read
    with pytest.raises(MoeCompressError, match=message.replace(".", r"\.").replace("(", r"\(")):
        AutoModelForCausalLM.from_pretrained(str(bad))


def test_native_config_naming_a_module_the_model_lacks_is_refused(native):
    lm = LayerwiseModel(native)
    qc = {**lm.native, "modules": {"model.layers.9.mlp.experts": {"type": "experts"}}}
    with pytest.raises(MoeCompressError, match=r"lists module 'model\.layers\.9\.mlp\.experts', which this model does not have"):
        promised_tensors(lm.model, qc)
