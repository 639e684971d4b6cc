"""Any input dimension (kpack-v2), end to end: every tiny family at odd dimensions.

H = 48 and every expert / shared-expert intermediate size 40 (neither a multiple of 32, so qweight
holds padded rows), 4-bit GPTQ with G = 32 (a partial last group in every projection: 32 + 16 and
32 + 8) and 8-bit attention. The checkpoint written by ``quantize_job`` loads with plain
``AutoModelForCausalLM.from_pretrained`` and its logits equal the fake-quantized model's: the source
model with every quantized weight replaced by its dequantization (``format.dequantize`` with the true K),
so the packed runtime is checked against a dense computation it shares no code path with.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moecompress  # noqa: F401  (registers quant_method "moecompress")
from moecompress.api.quantize import quantize_job
from moecompress.model.tiny import TINY_CONFIGS, save_tiny_model
from moecompress.model.view import ExpertsView
from moecompress.modules.packed import PackedExperts, PackedLinear
from moecompress.passes.quantize import QuantizeConfig
from moecompress.quant import format as fmt

FAMILIES = list(TINY_CONFIGS)
HIDDEN, INTER = 48, 40
CFG = QuantizeConfig(bits=4, group_size=32, method="gptq", attention_bits=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def odd_overrides(family: str) -> dict:
    """H = 48 and every intermediate size the family's tiny config sets = 40."""
    sizes = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
    return {"hidden_size": HIDDEN, **{key: INTER for key in sizes if key in TINY_CONFIGS[family]}}


def load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@torch.no_grad()
def fake_quantized(src, packed_model: torch.nn.Module) -> torch.nn.Module:
    """The dense source model with every packed weight of ``packed_model`` written back dequantized."""
    dense = load(src)
    for path, module in packed_model.named_modules():
        if isinstance(module, PackedExperts):
            view, spec = ExpertsView(dense.get_submodule(path)), module.spec
            for group in module.packed_groups():
                gate_up = fmt.dequantize(group.gate_up.qweight, group.gate_up.scales, group.gate_up.zeros, group.bits,
                                         group.group_size, k=spec.hidden_size)  # [E_b, 2I or I, H]
                down = fmt.dequantize(group.down.qweight, group.down.scales, group.down.zeros, group.bits,
                                      group.down_group, k=spec.intermediate_size)  # [E_b, H, I]
                for slot, e in enumerate(group.expert_ids.tolist()):
                    if spec.has_gate:
                        view.set(e, "gate", gate_up[slot, : spec.intermediate_size])
                        view.set(e, "up", gate_up[slot, spec.intermediate_size :])
                    else:
                        view.set(e, "up", gate_up[slot])
                    view.set(e, "down", down[slot])
        elif isinstance(module, PackedLinear):
            weight = fmt.dequantize(module.qweight, module.scales, getattr(module, "zeros", None), module.bits,
                                    module.group_size, k=module.in_features)
            dense.get_submodule(path).weight.copy_(weight)
    return dense


@pytest.mark.parametrize("family", FAMILIES)
def test_odd_dims_quantize_reload_and_match_the_fake_quantized_model(tmp_path, family):
    src, out = tmp_path / "src", tmp_path / "out"
    save_tiny_model(family, src, **odd_overrides(family))
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    _, job_pass = quantize_job(src, out, CFG, ids, {"source": "random ids"})

    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert written["format"] == fmt.CURRENT_FORMAT == "kpack-v2"
    experts = {k: v for k, v in written["modules"].items() if v["type"] == "experts"}
    assert experts and all(v["hidden_size"] == HIDDEN and v["intermediate_size"] == INTER for v in experts.values())
    linear_ks = {v["in_features"] for v in written["modules"].values() if v["type"] == "linear"}
    assert HIDDEN in linear_ks  # attention (and shared experts) at K = 48 are packed too

    model = load(out)
    for path in experts:
        module = model.get_submodule(path)
        assert isinstance(module, PackedExperts)
        assert module.w4_gate_up_qweight.shape[1:] == (fmt.padded_k(HIDDEN) * 4 // 32, module.w4_gate_up_qweight.shape[2])
        assert module.w4_down_qweight.shape[1:] == (fmt.padded_k(INTER) * 4 // 32, HIDDEN)
        assert module.w4_gate_up_scales.shape[1] == 2 and module.w4_down_scales.shape[1] == 2  # ceil(48/32), ceil(40/32)
    assert all(isinstance(model.get_submodule(p), PackedLinear) for p, v in written["modules"].items() if v["type"] == "linear")

    reference = fake_quantized(src, model)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        expected = reference(input_ids=ids, use_cache=False).logits
        dense = load(src)(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, dense, atol=1e-4)  # quantization really changed the model


def test_kpack_v1_checkpoints_load_unchanged_and_unknown_formats_are_refused(tmp_path):
    """A checkpoint whose every K is a multiple of 32 and every G divides K is byte for byte kpack-v1:
    labelled "kpack-v1" (as checkpoints written before kpack-v2 are) it loads to the same logits."""
    from moecompress.errors import MoeCompressError

    src, out = tmp_path / "src", tmp_path / "out"
    save_tiny_model("qwen3_moe", src)  # H = I = 64
    quantize_job(src, out, QuantizeConfig(bits=4, group_size=32, method="rtn", attention_bits=8), None, {"source": "none"})
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    module = load(out).get_submodule("model.layers.0.mlp.experts")
    assert module.w4_gate_up_qweight.shape[1] == 64 * 4 // 32 and module.w4_gate_up_scales.shape[1] == 64 // 32  # v1 shapes
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        current = load(out)(input_ids=ids).logits
        config["quantization_config"]["format"] = "kpack-v1"
        config_path.write_text(json.dumps(config))
        assert torch.equal(load(out)(input_ids=ids).logits, current)
    config["quantization_config"]["format"] = "kpack-v9"
    config_path.write_text(json.dumps(config))
    with pytest.raises(MoeCompressError, match="packing format 'kpack-v9' is not one this moecompress reads"):
        load(out)
