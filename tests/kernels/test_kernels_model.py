"""A quantized tiny model computes the same logits through the Triton kernels (interpreter on CPU)
and through the pure-torch reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moecompress  # noqa: F401  (registers the quantizer)
from moecompress.api.quantize import quantize_job
from moecompress.model.tiny import save_tiny_model
from moecompress.passes.quantize import QuantizeConfig
from moecompress.modules.packed import PackedExperts


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_triton_and_torch_kernels_agree_on_a_quantized_model(family, tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "q"
    save_tiny_model(family, src)
    # Mixed widths in one layer: the grouped kernel runs one launch per width class.
    cfg = QuantizeConfig(bits=4, group_size=32, method="rtn", expert_bits={0: [2, 3, 4, 8], 1: [4, 4, 8, 3], 2: [8, 2, 2, 4]}, attention_bits=8)
    quantize_job(src, out, cfg, None, {"source": "none"})
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert isinstance(model.model.layers[0].mlp.experts, PackedExperts)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MOECOMPRESS_KERNEL", backend)
        with torch.no_grad():
            logits[backend] = model(ids).logits
    assert torch.isfinite(logits["torch"]).all()
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)


def test_triton_and_torch_kernels_agree_at_odd_dims(tmp_path, monkeypatch):
    """H = 48, I = 40 (not multiples of 32: padded qweight rows), G = 32 (a partial last group): the
    grouped MoE kernels, the shared expert's and attention's dense kernels mask the tail exactly."""
    src, out = tmp_path / "src", tmp_path / "q"
    save_tiny_model("qwen2_moe", src, hidden_size=48, intermediate_size=40, moe_intermediate_size=40,
                    shared_expert_intermediate_size=40)
    cfg = QuantizeConfig(bits=4, group_size=32, method="rtn", expert_bits={0: [2, 3, 4, 8], 1: [4, 4, 8, 3], 2: [8, 2, 2, 4]},
                         attention_bits=8, symmetric=False)
    quantize_job(src, out, cfg, None, {"source": "none"})
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert isinstance(model.model.layers[0].mlp.experts, PackedExperts)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MOECOMPRESS_KERNEL", backend)
        with torch.no_grad():
            logits[backend] = model(ids).logits
    assert torch.isfinite(logits["torch"]).all()
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
