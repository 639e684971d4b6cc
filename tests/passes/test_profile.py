"""Profiling sweep: importance statistics, the routed-token shortcut against a full block re-run, files."""

from __future__ import annotations

import pytest
import torch

from moecompress.errors import MoeCompressError
from moecompress.model.tiny import build_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes.profile import (
    ExpertProfile,
    LayerProfile,
    ProfilePass,
    quantize_expert_in_place,
    record_expert_inputs,
    routed_output_error,
    routing_importance,
)
from moecompress.passes.quantize import QuantizeConfig, canonical_expert

BITS = (2, 3, 4, 8)
CFG = QuantizeConfig(bits=4, group_size=32, method="rtn")


def test_routing_importance_counts_selections_and_unrenormalised_probabilities():
    index = torch.tensor([[0, 2], [2, 1], [2, 0]])  # [T=3, k=2]
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.1, 0.2, 0.6, 0.1], [0.3, 0.1, 0.4, 0.2]])  # [T, E=4]
    freq, mass = routing_importance(index, probs)
    assert freq.tolist() == [2.0, 1.0, 3.0, 0.0]
    assert torch.allclose(mass, torch.tensor([0.8, 0.2, 1.3, 0.0], dtype=torch.float64))


def test_routed_output_error_is_weighted_frobenius():
    ref, approx = torch.ones(2, 3), torch.zeros(2, 3)
    assert routed_output_error(torch.tensor([1.0, 0.5]), ref, approx) == pytest.approx((3 + 3 * 0.25) ** 0.5)
    assert routed_output_error(torch.zeros(0), torch.zeros(0, 3), torch.zeros(0, 3)) == 0.0


def _block_and_inputs(family: str):
    model = build_tiny_model(family, seed=3)
    view = describe_model(model)
    block = view.blocks[view.moe_layers[-1]]
    x = torch.randn(2, 24, model.config.hidden_size, generator=torch.Generator().manual_seed(0))  # [B, L, H]
    return block, x


def _block_output(block, x):
    out = block.block(x)
    return (out[0] if isinstance(out, tuple) else out).detach().double()


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])  # qwen2_moe: shared expert + its sigmoid gate
def test_shortcut_equals_full_block_rerun(family):
    block, x = _block_and_inputs(family)
    with torch.no_grad():
        store, handles = record_expert_inputs(block)
        y = _block_output(block, x)
        for h in handles:
            h.remove()
        before = [w.clone() for e in range(block.num_experts) for w in canonical_expert(block.experts, e)[:2]]
        profile = ProfilePass(CFG, BITS, "rtn").profile_layer(block, store)
        after = [w for e in range(block.num_experts) for w in canonical_expert(block.experts, e)[:2]]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "profiling must leave the weights untouched"
        assert (profile.freq > 0).all()
        for e in range(block.num_experts):
            originals = [w.clone() for w in canonical_expert(block.experts, e)[:2]]
            for j, bits in enumerate(BITS):
                quantize_expert_in_place(block.experts, e, bits, CFG, None)
                full = torch.linalg.vector_norm(y - _block_output(block, x)).item()
                block.experts.set(e, "gate", originals[0][: block.experts.intermediate_size])
                block.experts.set(e, "up", originals[0][block.experts.intermediate_size :])
                block.experts.set(e, "down", originals[1])
                assert full > 0
                assert profile.errors[e, j].item() == pytest.approx(full, rel=1e-4, abs=1e-7)


def test_gptq_profile_errors_fall_with_width_and_restore_weights():
    block, x = _block_and_inputs("qwen3_moe")
    with torch.no_grad():
        store, handles = record_expert_inputs(block)
        block.block(x)
        for h in handles:
            h.remove()
        before = [p.detach().clone() for p in block.experts.module.parameters()]
        gptq = ProfilePass(QuantizeConfig(bits=4, group_size=32, method="gptq"), (2, 4), "gptq").profile_layer(block, store)
        rtn = ProfilePass(CFG, (2, 4), "rtn").profile_layer(block, store)
    assert all(torch.equal(a, b) for a, b in zip(before, block.experts.module.parameters()))
    for errors in (gptq.errors, rtn.errors):
        assert (errors[:, :-1] > errors[:, 1:]).all(), "error ladder: every wider width must be more accurate"
    assert gptq.errors[:, 0].sum() < rtn.errors[:, 0].sum(), "GPTQ beats RTN on its own calibration tokens"


@pytest.mark.parametrize(
    "family,method,cfg",
    [
        ("qwen3_moe", "rtn", CFG),
        ("qwen3_moe", "gptq", QuantizeConfig(bits=4, group_size=32, method="gptq", solve_memory_mb=1)),
        ("mixtral", "gptq", QuantizeConfig(bits=4, group_size=48, calibrate_all_experts=False, act_order=True, min_tokens_fraction=0.45)),
        ("deepseek_v3", "gptq", QuantizeConfig(bits=4, group_size=32, fallback="damped-gptq", min_tokens_fraction=0.2, symmetric=False)),
    ],
)
def test_batched_sweep_equals_the_expert_by_expert_reference(family, method, cfg):
    """Bit-identical errors and output maxima, chunked or not, with fallbacks; weights restored."""
    block, x = _block_and_inputs(family)
    with torch.no_grad():
        store, handles = record_expert_inputs(block)
        block.block(x)
        for h in handles:
            h.remove()
        before = [p.detach().clone() for p in block.experts.module.parameters()]
        sweep = ProfilePass(cfg, (2, 3, 4), method)
        batched = sweep.profile_layer(block, store)
        assert all(torch.equal(a, b) for a, b in zip(before, block.experts.module.parameters()))
        reference = sweep.profile_layer_reference(block, store)
    assert (batched.errors > 0).any()
    for name in ("freq", "weight_mass", "errors", "params", "output_max"):
        assert torch.equal(getattr(batched, name), getattr(reference, name)), name


def _profile() -> ExpertProfile:
    layer = LayerProfile(
        layer=1, tokens=10, freq=torch.tensor([3.0, 1.0], dtype=torch.float64),
        weight_mass=torch.tensor([1.5, 0.2], dtype=torch.float64),
        errors=torch.tensor([[4.0, 2.0, 1.0], [3.0, 1.5, 0.5]], dtype=torch.float64),
        params=torch.tensor([10.0, 10.0], dtype=torch.float64), output_max=torch.tensor([0.1, 9.0], dtype=torch.float64),
        shared_output_max=0.5,
    )
    return ExpertProfile("m", 2, (2, 3, 4), "rtn", 32, True, {"source": "x"}, {1: layer})


def test_profile_files_round_trip(tmp_path):
    profile = _profile()
    profile.save(tmp_path)
    assert ExpertProfile.exists(tmp_path)
    back = ExpertProfile.load(tmp_path)
    assert back.describe() == profile.describe()
    for name in ("freq", "weight_mass", "errors", "params", "output_max"):
        assert torch.equal(getattr(back.layers[1], name), getattr(profile.layers[1], name))
    assert back.layers[1].shared_output_max == 0.5
    assert back.errors_for((4, 2))[0].tolist() == [[1.0, 4.0], [0.5, 3.0]]
    with pytest.raises(MoeCompressError, match="not \\[8\\]"):
        back.errors_for((2, 8))


def test_profile_load_errors_are_one_line(tmp_path):
    with pytest.raises(MoeCompressError, match="not found"):
        ExpertProfile.load(tmp_path)
    (tmp_path / "profile.json").write_text("{not json")
    with pytest.raises(MoeCompressError, match="not valid JSON"):
        ExpertProfile.load(tmp_path)


def test_profile_pass_rejects_bad_options():
    with pytest.raises(MoeCompressError, match="profile method"):
        ProfilePass(CFG, BITS, "awq")
    with pytest.raises(MoeCompressError, match="bit choices"):
        ProfilePass(CFG, (2, 5), "rtn")
