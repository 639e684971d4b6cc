"""Grouped MoE kernels (interpreter) vs the pure-torch expert loop, plus moe_align's invariants."""

import pytest
import torch

from moecompress.errors import MoeCompressError
from moecompress.kernels.moe_gemm import (
    moe_align,
    moe_experts_forward,
    moe_experts_forward_reference,
    moe_experts_forward_with_config,
)
from moecompress.kernels.synthetic import random_expert_group, random_routing

E, H, I = 8, 64, 64

DECODE = {"decode": True, "gate_up": {"BLOCK_N": 32, "BLOCK_K": 64}, "down": {"BLOCK_N": 64, "BLOCK_K": 64}}
SORTED = {
    "decode": False,
    "gate_up": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64},
    "down": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64},  # a different BLOCK_M: aligned twice
}


def mixed_width_groups(generator, gated=True, group_size=32):
    """Experts {0,4}: 2 bits, {1,5}: 3 bits, {2,6}: 4 bits, {3,7}: 8 bits; zeros on half the classes."""
    return [
        random_expert_group([i, i + 4], H, I, bits, group_size, generator, with_zeros=i % 2 == 0, gated=gated)
        for i, bits in enumerate((2, 3, 4, 8))
    ]


def _close(out, ref, rtol=1e-5):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert ref.abs().max() > 0  # not a vacuous comparison
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < rtol, f"relative error {err:.3g}"


def _routing(tokens, generator, top_k=2):
    return random_routing(tokens, E, top_k, generator)


def test_align_sorts_by_expert_and_pads_blocks():
    ids = torch.tensor([[3, 1], [3, 0], [1, 3], [-1, 9]])  # -1 and 9: not in this class, skipped
    sorted_ids, block_expert, num_post = moe_align(ids, num_experts=4, block_m=4)
    num_slots = ids.numel()
    used = int(num_post)
    assert used == 3 * 4  # experts 0, 1, 3 each fill one padded block; expert 2 none
    assert block_expert.tolist()[:3] == [0, 1, 3] and set(block_expert.tolist()[3:]) == {-1}
    blocks = sorted_ids[:used].view(-1, 4).tolist()
    flat = ids.reshape(-1).tolist()
    for expert, block in zip(block_expert.tolist(), blocks):
        real = [s for s in block if s < num_slots]
        assert real == sorted(s for s, e in enumerate(flat) if e == expert)  # slot order kept
        assert all(s == num_slots for s in block[len(real):])  # padding only at the end
    assert set(sorted_ids[used:].tolist()) <= {num_slots}


@pytest.mark.parametrize("config", [DECODE, SORTED], ids=["decode", "sorted"])
def test_mixed_widths_silu_with_idle_expert(config):
    """Four width classes in one layer; expert 5 gets no token; T=7 is not a multiple of BLOCK_M."""
    generator = torch.Generator().manual_seed(0)
    groups = mixed_width_groups(generator)
    tokens = 2 if config["decode"] else 7
    ids, weights = random_routing(tokens, E - 1, 2, generator)
    ids = ids + (ids >= 5).long()  # route over the other 7 experts: expert 5 stays idle
    x = torch.randn(tokens, H, generator=generator)
    ref = moe_experts_forward_reference(x, ids, weights, groups, E)
    _close(moe_experts_forward_with_config(x, ids, weights, groups, E, config=config), ref)


def test_all_tokens_on_one_expert_sorted():
    """Every slot on expert 3 (8-bit class): several padded blocks of one expert, T=20 (k=1)."""
    generator = torch.Generator().manual_seed(1)
    groups = mixed_width_groups(generator)
    tokens = 20
    ids = torch.full((tokens, 1), 3)
    weights = torch.rand(tokens, 1, generator=generator)
    x = torch.randn(tokens, H, generator=generator)
    ref = moe_experts_forward_reference(x, ids, weights, groups, E)
    _close(moe_experts_forward_with_config(x, ids, weights, groups, E, config=SORTED), ref)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid(-large) -> 0 under numpy
@pytest.mark.parametrize("config", [DECODE, SORTED], ids=["decode", "sorted"])
def test_gpt_oss_clamped_swiglu_with_biases(config):
    generator = torch.Generator().manual_seed(2)
    groups = mixed_width_groups(generator)
    tokens = 1 if config["decode"] else 5
    ids, weights = _routing(tokens, generator, top_k=4)
    x = torch.randn(tokens, H, generator=generator) * 4  # large enough that the clamps bite
    gate_up_bias = torch.randn(E, 2 * I, generator=generator)
    down_bias = torch.randn(E, H, generator=generator)
    params = {"alpha": 1.702, "limit": 3.0}
    ref = moe_experts_forward_reference(x, ids, weights, groups, E, "gpt_oss", gate_up_bias, down_bias, params)
    unclamped = moe_experts_forward_reference(x, ids, weights, groups, E, "gpt_oss", gate_up_bias, down_bias, {"limit": 1e9})
    assert not torch.allclose(ref, unclamped)  # the clamp is exercised
    out = moe_experts_forward_with_config(x, ids, weights, groups, E, "gpt_oss", gate_up_bias, down_bias, params, config=config)
    _close(out, ref)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gelu_glu_sorted(activation):
    generator = torch.Generator().manual_seed(3)
    groups = mixed_width_groups(generator)
    ids, weights = _routing(6, generator)
    x = torch.randn(6, H, generator=generator)
    ref = moe_experts_forward_reference(x, ids, weights, groups, E, activation)
    _close(moe_experts_forward_with_config(x, ids, weights, groups, E, activation, config=SORTED), ref)


def test_gateless_relu_experts_and_foreign_slots_decode():
    """Experts without a gate (gate_up = up rows only); slots routed outside the groups add nothing."""
    generator = torch.Generator().manual_seed(4)
    groups = mixed_width_groups(generator, gated=False)[:2]  # only experts 0,1,4,5 are here
    ids = torch.tensor([[0, 2], [5, -1]])  # expert 2 in no group, -1 an out-of-range sentinel
    weights = torch.rand(2, 2, generator=generator)
    x = torch.randn(2, H, generator=generator)
    ref = moe_experts_forward_reference(x, ids, weights, groups, E, "relu")
    for config in (DECODE, SORTED):
        _close(moe_experts_forward_with_config(x, ids, weights, groups, E, "relu", config=config), ref)


def test_table_config_fp16_and_empty_batch():
    """The public entry (config from the table by T) on fp16 activations, and T=0."""
    generator = torch.Generator().manual_seed(5)
    groups = [random_expert_group(list(range(E)), H, I, 4, 64, generator)]
    ids, weights = _routing(3, generator)
    x = torch.randn(3, H, generator=generator).half()
    ref = moe_experts_forward_reference(x, ids, weights.half(), groups, E)
    _close(moe_experts_forward(x, ids, weights.half(), groups, E), ref, rtol=5e-3)
    empty = moe_experts_forward(x[:0], ids[:0], weights[:0], groups, E)
    assert empty.shape == (0, H)


def test_layer_validation_errors():
    generator = torch.Generator().manual_seed(6)
    groups = mixed_width_groups(generator)
    ids, weights = _routing(2, generator)
    x = torch.randn(2, H)
    with pytest.raises(MoeCompressError, match="unknown MoE activation"):
        moe_experts_forward(x, ids, weights, groups, E, "swish2")
    with pytest.raises(MoeCompressError, match="gated experts"):
        moe_experts_forward(x, ids, weights, mixed_width_groups(generator, gated=False), E, "gpt_oss")
    with pytest.raises(MoeCompressError, match="gate_up_bias"):
        moe_experts_forward(x, ids, weights, groups, E, "silu", torch.zeros(E, I))
    with pytest.raises(MoeCompressError, match="share"):
        other = random_expert_group([1], H, 2 * I, 4, 32, generator)
        moe_experts_forward(x, ids, weights, [groups[0], other], E)
    with pytest.raises(MoeCompressError, match="twice"):
        dup = random_expert_group([0, 0], H, I, 4, 32, generator)
        moe_experts_forward_reference(x, ids, weights, [dup], E)


def test_local_index_cache_follows_in_place_edits():
    from moecompress.kernels.moe_gemm import local_expert_index

    group = random_expert_group([2, 5], H, I, 4, 32, torch.Generator().manual_seed(7))
    first = local_expert_index(group, E, torch.device("cpu"))
    assert first.tolist() == [-1, -1, 0, -1, -1, 1, -1, -1]
    assert local_expert_index(group, E, torch.device("cpu")) is first  # cached
    group.expert_ids[1] = 6  # in-place edit bumps the version counter
    assert local_expert_index(group, E, torch.device("cpu")).tolist() == [-1, -1, 0, -1, -1, -1, 1, -1]


# ----------------------------------------------------------------------------------------------------------------
# Any K (kpack-v2): H and I not multiples of 32, groups that do not divide them; gate_up.k = H, down.k = I
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("config", [DECODE, SORTED], ids=["decode", "sorted"])
@pytest.mark.parametrize("hidden, inter, gated", [(48, 40, True), (72, 100, False)])
def test_odd_h_and_i_mixed_widths_match_reference(config, hidden, inter, gated):
    """Four width classes (2, 3, 4, 8 bits) at H, I in {48, 40, 72, 100} with G = 32 (a partial last group
    everywhere): the reference equals a dense loop on format.dequantize(k=...), the kernels equal the reference."""
    generator = torch.Generator().manual_seed(hidden + inter)
    groups = [
        random_expert_group([i, i + 4], hidden, inter, bits, 32, generator, with_zeros=i % 2 == 0, gated=gated)
        for i, bits in enumerate((2, 3, 4, 8))
    ]
    assert groups[0].gate_up.k == hidden and groups[0].down.k == inter
    tokens = 2 if config["decode"] else 7
    ids, weights = random_routing(tokens, E, 2, generator)
    x = torch.randn(tokens, hidden, generator=generator)
    width = 2 * inter if gated else inter
    gate_up_bias, down_bias = torch.randn(E, width, generator=generator), torch.randn(E, hidden, generator=generator)
    activation = "gpt_oss" if gated else "gelu"
    ref = moe_experts_forward_reference(x, ids, weights, groups, E, activation, gate_up_bias, down_bias)
    dense = torch.zeros(tokens, hidden)
    for group in groups:
        gate_up, down = group.gate_up.dequantize(group.bits, 32), group.down.dequantize(group.bits, 32)
        assert gate_up.shape[1:] == (width, hidden) and down.shape[1:] == (hidden, inter)
        for local, expert in enumerate(group.expert_ids.tolist()):
            for t, j in zip(*torch.where(ids == expert)):
                h = gate_up[local] @ x[t] + gate_up_bias[expert]
                if gated:
                    g, u = h[:inter].clamp(max=7.0), h[inter:].clamp(-7.0, 7.0)
                    a = (u + 1) * (g * torch.sigmoid(1.702 * g))
                else:
                    a = torch.nn.functional.gelu(h)
                dense[t] += weights[t, j] * (down[local] @ a + down_bias[expert])
    torch.testing.assert_close(ref, dense, rtol=1e-4, atol=1e-4)
    out = moe_experts_forward_with_config(x, ids, weights, groups, E, activation, gate_up_bias, down_bias, config=config)
    _close(out, ref)
