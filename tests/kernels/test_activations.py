"""One activation table for the packed kernels, checked against transformers' own ACT2FN.

``kernels.moe_gemm.HF_ACTIVATIONS`` maps a config's ``hidden_act`` to the kernel activation; the
quantize pass (what a checkpoint stores) and the kernels (what it computes) both read it. Each mapped
name must compute exactly ``transformers.activations.ACT2FN[name]``: mapping ``gelu_pytorch_tanh`` to
the erf GELU (as the quantize pass once did for every ``gelu*``) is off by up to ~5e-4 per element.
"""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from moecompress.errors import MoeCompressError
from moecompress.kernels.moe_gemm import (
    HF_ACTIVATIONS,
    MoeLayerDims,
    apply_expert_activation,
    canonical_activation,
    hf_activation,
)
from moecompress.model.tiny import build_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes.quantize import activation_of

X = torch.linspace(-8.0, 8.0, 4001, dtype=torch.float64).float().reshape(1, -1)  # [1, n]


def _kernel(name: str, x: torch.Tensor, gated: bool) -> torch.Tensor:
    """The kernels' torch twin for activation ``name`` on [rows, n] (gated: gate then up columns)."""
    n = x.shape[-1] // 2 if gated else x.shape[-1]
    return apply_expert_activation(x, MoeLayerDims(hidden=1, intermediate=n, gated=gated, activation=name, alpha=1.702, limit=7.0))


@pytest.mark.parametrize("name", sorted(HF_ACTIVATIONS))
def test_every_mapped_name_computes_transformers_act2fn(name):
    expected = ACT2FN[name](X)
    got = _kernel(hf_activation(name), X, gated=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    # Gated experts: act(gate) * up with the same activation.
    up = torch.linspace(-2.0, 2.0, X.shape[-1]).reshape(1, -1)
    torch.testing.assert_close(_kernel(hf_activation(name), torch.cat([X, up], dim=-1), gated=True), expected * up, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate"])
def test_tanh_gelus_are_not_the_erf_gelu(name):
    """The old mapping (every gelu* -> erf) fails here: tanh and erf GELU differ by far more than rounding."""
    assert hf_activation(name) == "gelu_tanh"
    erf = _kernel("gelu", X, gated=False)
    assert float((ACT2FN[name](X) - erf).abs().max()) > 1e-4


def test_stored_names_and_transformers_names_share_the_table():
    for name, kernel_name in HF_ACTIVATIONS.items():
        assert canonical_activation(name) == kernel_name
    assert canonical_activation("gelu_tanh") == "gelu_tanh" and canonical_activation("swiglu") == "silu"
    for unsupported in ("quick_gelu", "gelu_10", "mish", "not_an_activation"):
        with pytest.raises(MoeCompressError, match="not supported by the packed kernels"):
            hf_activation(unsupported)


@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu", "silu"])
def test_the_quantize_pass_stores_what_the_family_computes(hidden_act):
    """activation_of (what a packed checkpoint records) reproduces the family's own expert activation."""
    model = build_tiny_model("qwen3_moe", hidden_act=hidden_act)
    experts = describe_model(model).blocks[0].experts
    name, params = activation_of(experts, model.config)
    assert name == HF_ACTIVATIONS[hidden_act] and params == {}
    i = experts.intermediate_size
    gate, up = torch.randn(64, i) * 4, torch.randn(64, i)
    native = torch.cat([gate, up], dim=-1)  # qwen3_moe: concatenated gate rows then up rows
    torch.testing.assert_close(_kernel(name, native, gated=True), experts.activation(native), rtol=0, atol=1e-5)
