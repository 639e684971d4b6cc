"""PackedExperts / PackedLinear compute what the dense modules compute with the dequantized weights.

Equivalence is checked against each family's OWN experts module (its layout and activation: Mixtral's
concatenated gate/up, GPT-OSS's interleaved transposed weights with biases and clamped activation),
after writing the dequantized weights back into it through the view; outputs are guarded against
being all zeros. Buffers are checked against the format's shapes.
"""

from __future__ import annotations

import pytest
import torch

from moecompress.model.tiny import build_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes.quantize import QuantizePass, activation_of, canonical_expert
from moecompress.quant.grid import QuantSpec, rtn
from moecompress.modules.packed import UNQUANTIZED, ExpertsSpec, PackedExperts, PackedLinear


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pack_experts_of(family: str, widths: list[int], symmetric: bool):
    """(router view, the family's experts module holding dequantized weights, the PackedExperts twin)."""
    model = build_tiny_model(family, seed=0)
    block = next(iter(describe_model(model).blocks.values()))
    experts = block.experts
    activation, params = activation_of(experts, model.config)
    spec = ExpertsSpec(
        num_experts=experts.num_experts,
        hidden_size=experts.hidden_size,
        intermediate_size=experts.intermediate_size,
        bits=tuple(widths),
        group_size=32,
        symmetric=symmetric,
        has_gate=experts.has_gate,
        has_bias=experts.has_bias,
        activation=activation,
        act_params=tuple(sorted(params.items())),
    )
    packed = PackedExperts(spec, dtype=torch.float32)
    slots = {b: 0 for b in widths}
    i = experts.intermediate_size
    for e, bits in enumerate(widths):
        gate_up, down, gu_bias, d_bias = canonical_expert(experts, e)  # [2I, H] gate rows then up rows, [H, I]
        slot = slots[bits]
        slots[bits] += 1
        if experts.has_bias:
            packed.gate_up_bias[e].copy_(gu_bias)
            packed.down_bias[e].copy_(d_bias)
        if bits == UNQUANTIZED:
            getattr(packed, f"w{bits}_gate_up")[slot].copy_(gate_up)
            getattr(packed, f"w{bits}_down")[slot].copy_(down)
            continue
        q_gu, q_down = rtn(gate_up, QuantSpec(bits, 32, symmetric)), rtn(down, QuantSpec(bits, 32, symmetric))
        QuantizePass._store_packed(packed, bits, slot, q_gu, q_down)
        dense_gu = q_gu.dequantized()
        experts.set(e, "gate", dense_gu[:i])
        experts.set(e, "up", dense_gu[i:])
        experts.set(e, "down", q_down.dequantized())
    return block.router, experts.module, packed


@pytest.mark.parametrize(
    "family, widths, symmetric",
    [
        ("mixtral", [4, 4, 4, 4], True),
        ("mixtral", [2, 3, 8, UNQUANTIZED], False),
        ("gpt_oss", [4, 3, UNQUANTIZED, 4], True),  # interleaved, transposed, biases, clamped activation
        ("olmoe", [3, 3, 3, 3], False),
    ],
)
def test_packed_experts_equal_the_family_module_on_dequantized_weights(family, widths, symmetric):
    router, dense, packed = pack_experts_of(family, widths, symmetric)
    x = torch.randn(48, packed.spec.hidden_size, generator=torch.Generator().manual_seed(0))  # [T, H]
    with torch.no_grad():
        _, top_k_weights, top_k_index = router.route(x)
        reference = dense(x, top_k_index, top_k_weights)  # [T, H]
        got = packed(x, top_k_index, top_k_weights)
    assert got.shape == reference.shape and got.dtype == x.dtype
    assert (reference.abs() > 0).float().mean() > 0.9, "reference output must not be (mostly) zeros"
    assert set(top_k_index.unique().tolist()) == set(range(len(widths))), "every width class is exercised"
    assert float((got - reference).norm() / reference.norm()) < 1e-5


def test_tokens_routed_nowhere_in_a_class_get_zero_from_it():
    router, dense, packed = pack_experts_of("mixtral", [4, 4, 3, 3], True)
    x = torch.randn(8, packed.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([[0, 1]] * 8)  # only the 4-bit class is used
    weights = torch.full((8, 2), 0.5)
    with torch.no_grad():
        reference = dense(x, index, weights)
        assert float((packed(x, index, weights) - reference).norm() / reference.norm()) < 1e-5
        assert torch.equal(packed(x, index, torch.zeros(8, 2)), torch.zeros(8, packed.spec.hidden_size))


def test_reusing_dequantized_experts_gives_the_same_bytes_and_is_dropped_on_exit():
    router, _dense, packed = pack_experts_of("mixtral", [4, 3, 4, 3], False)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(16, packed.spec.hidden_size, generator=g) for _ in range(3)]
    with torch.no_grad():
        routed = [router.route(x) for x in batches]
        plain = [packed(x, idx, w) for x, (_, w, idx) in zip(batches, routed)]
        with packed.reuse_dequantized():
            cached = [packed(x, idx, w) for x, (_, w, idx) in zip(batches, routed)]
            assert len(packed._dequantized) == 4  # each expert dequantized once, then reused
        assert packed._dequantized is None  # the float32 copies do not outlive the re-run
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))


@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_experts_buffers_follow_the_format(symmetric):
    spec = ExpertsSpec(num_experts=5, hidden_size=64, intermediate_size=32, bits=(4, 3, 4, UNQUANTIZED, 2), group_size=32,
                       symmetric=symmetric, has_bias=True)
    m = PackedExperts(spec, dtype=torch.bfloat16)
    assert m.widths == [2, 3, 4, UNQUANTIZED]
    assert not list(m.parameters())
    assert m.w4_expert_ids.tolist() == [0, 2] and m.w3_expert_ids.tolist() == [1] and m.w16_expert_ids.tolist() == [3]
    assert m.w4_gate_up_qweight.shape == (2, 64 * 4 // 32, 64) and m.w4_gate_up_qweight.dtype == torch.int32
    assert m.w4_down_qweight.shape == (2, 32 * 4 // 32, 64)
    assert m.w3_gate_up_qweight.shape == (1, 64 * 3 // 32, 64)
    assert m.w2_down_scales.shape == (1, 32 // 32, 64) and m.w2_down_scales.dtype == torch.float16
    assert m.w16_gate_up.shape == (1, 64, 64) and m.w16_down.shape == (1, 64, 32) and m.w16_down.dtype == torch.bfloat16
    assert m.gate_up_bias.shape == (5, 64) and m.down_bias.shape == (5, 64)
    assert hasattr(m, "w4_gate_up_zeros") != symmetric
    if not symmetric:
        assert m.w3_down_zeros.shape == (1, 1, 64) and m.w3_down_zeros.dtype == torch.uint8
    assert m.packed_nbytes() == sum(b.numel() * b.element_size() for b in m.buffers())
    assert [g.bits for g in m.packed_groups()] == [2, 3, 4]


def test_experts_spec_json_round_trip_and_group_for():
    spec = ExpertsSpec(4, 64, 32, (4, 4, 3, 16), 128, False, True, True, "gpt_oss", (("alpha", 1.702), ("limit", 7.0)))
    assert ExpertsSpec.from_json(spec.as_json()) == spec
    assert spec.group_for(256) == 128 and spec.group_for(128) == 128
    # The one group-size rule (format.group_size_problem): a group longer than the row is refused with
    # sizes that do divide it, never silently read as per-channel; one that does not divide K is fine
    # (the last group is partial).
    with pytest.raises(ValueError, match=r"group size 128 is longer than the input dimension 64 \(a group never spans two rows\); use 16, 32 or 64"):
        spec.group_for(64)
    assert spec.group_for(200) == 128
    assert ExpertsSpec(4, 64, 32, (4,) * 4, -1, True).group_for(32) == 32


@pytest.mark.parametrize("bits, group, symmetric, bias", [(4, 32, True, False), (3, 64, False, True), (8, -1, True, True), (2, 32, False, False)])
def test_packed_linear_equals_linear_on_the_dequantized_weight(bits, group, symmetric, bias):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 128, generator=gen)  # [N, K]
    b = torch.randn(48, generator=gen) if bias else None
    q = rtn(w, QuantSpec(bits, group, symmetric))
    m = PackedLinear.from_packed(q.packed(), b, torch.float32)
    assert not list(m.parameters())
    assert m.group_size == (128 if group == -1 else group)
    assert hasattr(m, "zeros") != symmetric
    x = torch.randn(2, 5, 128, generator=gen)  # leading batch dims are kept
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, q.dequantized(), b), rtol=1e-4, atol=1e-4)
    assert "bits=" in m.extra_repr()
