"""Merging pass: identical experts merge back to themselves, exact vs standard router, routing groups."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.calibration.types import CalibrationSet
from moecompress.calibration.collect import collect_stats
from moecompress.errors import MoeCompressError
from moecompress.api.experts import StatsSource, merge_job
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import build_tiny_model, save_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes.merge import (
    MergeConfig,
    MergePass,
    check_fittable_router,
    group_in_routing_groups,
    layer_group_counts,
    merge_block,
    mean_group_similarity,
)

IDS = torch.randint(3, 256, (8, 24), generator=torch.Generator().manual_seed(1))


def _stats(folder, out):
    stats = collect_stats(LayerwiseModel(folder), CalibrationSet(IDS, None, "random"), batch_size=4)
    stats.save(out)
    return stats


def _make_experts_identical(model) -> None:
    """Every expert of every MoE layer becomes a copy of that layer's expert 0."""
    for block in describe_model(model).blocks.values():
        module = block.experts.module
        with torch.no_grad():
            for name, p in module.named_parameters(recurse=False):
                p.copy_(p[:1].expand_as(p))


@pytest.fixture(scope="module")
def identical_mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_identical")
    model = build_tiny_model("mixtral")
    _make_experts_identical(model)
    model.save_pretrained(str(root / "model"))
    _stats(root / "model", root / "stats")
    return root


def _logits(folder):
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=IDS[:2]).logits, model


def test_merging_identical_experts_gives_back_that_expert(identical_mixtral, tmp_path):
    root = identical_mixtral
    original, source = _logits(root / "model")
    for router in ("standard", "exact", "exact-slots"):
        out = tmp_path / router
        merge_job(root / "model", out, MergeConfig(2, router=router), StatsSource(stats_dir=root / "stats"))
        merged, model = _logits(out)
        for layer, old in zip(model.model.layers, source.model.layers):
            experts = layer.mlp.experts
            assert experts.gate_up_proj.shape[0] == (4 if router == "exact-slots" else 2)
            for e in range(experts.gate_up_proj.shape[0]):
                assert torch.equal(experts.gate_up_proj[e], old.mlp.experts.gate_up_proj[0])
                assert torch.equal(experts.down_proj[e], old.mlp.experts.down_proj[0])
        # Mixtral renormalises the top-k weights, so with identical experts the routing cannot matter.
        assert torch.allclose(merged, original, atol=1e-5), router


def test_regmean_merging_gives_back_identical_experts_and_differs_otherwise(identical_mixtral, tmp_path):
    root = identical_mixtral
    source = StatsSource(stats_dir=root / "stats", calib="sample", nsamples=4, seqlen=16, batch_size=4)
    original, _ = _logits(root / "model")
    result, _ = merge_job(root / "model", tmp_path / "same", MergeConfig(2, router="exact", merge_weights="regmean"), source)
    assert result.details["merge_weights"] == "regmean"
    assert torch.allclose(_logits(tmp_path / "same")[0], original, atol=1e-5)
    assert "RegMean" in (tmp_path / "same" / "report.md").read_text()
    save_tiny_model("qwen3_moe", tmp_path / "model")
    _stats(tmp_path / "model", tmp_path / "stats")
    source = StatsSource(stats_dir=tmp_path / "stats", calib="sample", nsamples=4, seqlen=16, batch_size=4)
    for weights in ("frequency", "regmean"):
        merge_job(tmp_path / "model", tmp_path / weights, MergeConfig(2, router="exact", per_layer=True, merge_weights=weights), source)
    assert not torch.allclose(_logits(tmp_path / "frequency")[0], _logits(tmp_path / "regmean")[0])
    result, _ = merge_job(tmp_path / "model", tmp_path / "output", MergeConfig(2, per_layer=True, grouping="output"), source)
    assert result.details["grouping"] == "output" and "closest output" in (tmp_path / "output" / "report.md").read_text()


def test_auto_grouping_uses_outputs_with_exact_routers_and_router_similarity_otherwise():
    assert MergeConfig(2, router="exact", grouping="auto").grouping_used == "output"
    assert MergeConfig(2, router="exact-slots", grouping="auto").grouping_used == "output"
    assert MergeConfig(2, router="standard", grouping="auto").grouping_used == "router"
    assert MergeConfig(2, router="exact").grouping_used == "router"  # the library default is M-SMoE's
    assert MergeConfig(2, router="exact", grouping="auto").needs_activations


@torch.no_grad()
def test_output_similarity_prefers_the_dominant_that_computes_the_same_function():
    from moecompress.passes.merge import output_similarity

    torch.manual_seed(0)
    block = describe_model(build_tiny_model("qwen3_moe").eval()).blocks[0]
    module = block.experts.module
    for p in (module.gate_up_proj, module.down_proj):
        p[2] = p[1]  # expert 2 computes exactly what expert 1 does
    hidden = torch.randn(40, block.experts.hidden_size)
    index = torch.tensor([[2, 0]] * 20 + [[0, 1]] * 20)  # expert 3 receives no token
    router_sim = torch.rand(4, 4)
    sim = output_similarity(block, [(hidden, index)], [2, 3], [0, 1], router_sim)
    assert sim[0, 1] == 0 and sim[0, 0] < 0  # the copy stands in exactly, the other does not
    assert torch.equal(sim[1], router_sim[3, [0, 1]].double())  # no token: M-SMoE's router row


def test_exact_slots_router_keeps_every_slot_and_members_share_weights(tmp_path):
    save_tiny_model("qwen3_moe", tmp_path / "model")
    _stats(tmp_path / "model", tmp_path / "stats")
    out = tmp_path / "exact"
    merge_job(tmp_path / "model", out, MergeConfig(2, router="exact-slots", per_layer=True), StatsSource(stats_dir=tmp_path / "stats"))
    record = json.loads((out / "kept_experts.json").read_text())
    assert record["router"] == "exact-slots" and record["num_experts_after"] == 4
    _, source = _logits(tmp_path / "model")
    _, model = _logits(out)
    for i, layer in enumerate(model.model.layers):
        groups = record["layers"][str(i)]
        assert sorted(e for g in groups for e in g) == [0, 1, 2, 3] and len(groups) == 2
        experts = layer.mlp.experts
        assert torch.equal(layer.mlp.gate.weight, source.model.layers[i].mlp.gate.weight)  # router untouched
        for members in groups:
            for e in members[1:]:
                assert torch.equal(experts.gate_up_proj[e], experts.gate_up_proj[members[0]])
                assert torch.equal(experts.down_proj[e], experts.down_proj[members[0]])


def test_merge_with_biases_returns_identical_expert_with_its_biases():
    model = build_tiny_model("gpt_oss")
    _make_experts_identical(model)
    block = describe_model(model).blocks[0]
    before = {k: v[0].clone() for k, v in block.experts.module.state_dict().items()}
    merge_block(block, [[0, 1], [2, 3]], torch.tensor([0.4, 0.1, 0.3, 0.2]), "standard", "weighted")
    after = block.experts.module.state_dict()
    assert block.num_experts == 2 and block.router.module.weight.shape[0] == 2
    assert block.router.module.bias.shape == (2,)
    for name, value in after.items():
        for g in range(2):
            assert torch.allclose(value[g], before[name], atol=1e-6), name


def test_router_rows_weighted_mean_and_resized_forward_runs():
    model = build_tiny_model("olmoe")
    block = describe_model(model).blocks[0]
    weight = block.router.module.weight.detach().clone()
    freq = torch.tensor([0.1, 0.2, 0.3, 0.4])
    merge_block(block, [[3, 0], [2, 1]], freq, "standard", "weighted")
    expected = torch.stack([(0.4 * weight[3] + 0.1 * weight[0]) / 0.5, (0.3 * weight[2] + 0.2 * weight[1]) / 0.5])
    assert torch.allclose(block.router.module.weight, expected, atol=1e-6)
    with torch.no_grad():
        out = model(input_ids=IDS[:1]).logits
    assert torch.isfinite(out).all()


def test_grouping_stays_within_routing_groups():
    freq = torch.tensor([0.3, 0.1, 0.05, 0.05, 0.2, 0.1, 0.1, 0.1])
    sim = torch.eye(8)
    sim[1, 4] = sim[4, 1] = 0.99  # most similar across the routing-group boundary
    groups = group_in_routing_groups(freq, sim, 4, [], n_group=2)
    assert len(groups) == 4
    for members in groups:
        assert len({e // 4 for e in members}) == 1, groups
    assert mean_group_similarity([[0], [1]], sim) is None


def test_group_counts_per_layer_and_global(tmp_path):
    save_tiny_model("mixtral", tmp_path / "model")
    stats = _stats(tmp_path / "model", tmp_path / "stats")
    assert layer_group_counts(MergeConfig(2), stats, {}) == {0: 2, 1: 2, 2: 2}
    counts = layer_group_counts(MergeConfig(2, router="exact"), stats, {})
    assert sum(counts.values()) <= 6 and all(1 <= n <= 4 for n in counts.values())
    assert layer_group_counts(MergeConfig(1), stats, {0: [3]})[0] == 2  # super expert + one group


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=2, router="standard", per_layer=False), "same expert count in every layer"),
        (dict(num_experts=2, router="fancy"), "unknown --router"),
        (dict(num_experts=2, router_mode="median"), "unknown --router-mode"),
        (dict(num_experts=0), "at least 1"),
        (dict(num_experts=2, method="hcsmoe"), "unknown merging method"),
    ],
)
def test_config_rejects_bad_input(kwargs, message):
    with pytest.raises(MoeCompressError, match=message):
        MergeConfig(**kwargs).validate()


def test_logsumexp_rows_need_a_router_bias():
    model = build_tiny_model("mixtral")
    block = describe_model(model).blocks[0]
    with pytest.raises(MoeCompressError, match="needs a router bias"):
        merge_block(block, [[0, 1], [2, 3]], torch.ones(4), "standard", "logsumexp_approx")


def test_fitted_router_rows_are_recorded_and_sigmoid_routers_refused(tmp_path):
    from moecompress.model.driver import run_layerwise
    from moecompress.model.tiny import TINY_CONFIGS

    save_tiny_model("qwen3_moe", tmp_path / "model")
    stats = _stats(tmp_path / "model", tmp_path / "stats")
    lm = LayerwiseModel(tmp_path / "model")
    merger = MergePass.from_stats(MergeConfig(2, router_mode="fitted"), stats, lm.config)
    run_layerwise(lm, IDS, [merger], batch_size=4)
    for r in merger.report.layers:
        assert r.router_fit is not None and r.router_fit[1] < r.router_fit[0]
    sigmoid = next(f for f in ("deepseek_v3", "glm4_moe") if f in TINY_CONFIGS)
    save_tiny_model(sigmoid, tmp_path / "sig")
    block = next(iter(LayerwiseModel(tmp_path / "sig").view.blocks.values()))
    with pytest.raises(MoeCompressError, match="bias-free softmax router"):
        check_fittable_router(block)
