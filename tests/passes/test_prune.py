"""Pruning pass: config checks, expert selection, DERN width and exactness, planted super experts."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.calibration.types import CalibrationSet
from moecompress.calibration.collect import collect_stats
from moecompress.errors import MoeCompressError
from moecompress.api.experts import StatsSource, merge_job, prune_job
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import build_tiny_model, save_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes.merge import MergeConfig
from moecompress.passes.prune import (
    PruneConfig,
    layer_scores,
    read_experts,
    select_in_routing_groups,
    write_expert,
)

IDS = torch.randint(3, 256, (8, 24), generator=torch.Generator().manual_seed(0))


def _stats(folder, out):
    stats = collect_stats(LayerwiseModel(folder), CalibrationSet(IDS, None, "random"), batch_size=4)
    stats.save(out)
    return stats


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_qwen3")
    save_tiny_model("qwen3_moe", root / "model")
    stats = _stats(root / "model", root / "stats")
    return root, stats


def _logits(folder, ids=IDS[:2]):
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits, model


# ----------------------------------------------------------------------------- config and selection


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="magnitude", keep_ratio=0.5), "unknown pruning method"),
        (dict(method="reap", keep_ratio=0.0), "outside (0, 1]"),
        (dict(method="reap", keep_ratio=1.5), "outside (0, 1]"),
        (dict(method="reap"), "exactly one"),
        (dict(method="reap", keep_ratio=0.5, num_experts=2), "exactly one"),
        (dict(method="dern", keep_ratio=0.5, similarity_threshold=2.0), "cosine"),
    ],
)
def test_config_rejects_bad_input(kwargs, message):
    with pytest.raises(MoeCompressError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PruneConfig(**kwargs).validate()


def test_target_rounds_ratio_and_keeps_one():
    assert PruneConfig("reap", keep_ratio=0.75).target(16) == 12
    assert PruneConfig("reap", keep_ratio=0.5).target(16) == 8
    assert PruneConfig("reap", keep_ratio=0.01).target(16) == 1
    assert PruneConfig("reap", num_experts=5).target(16) == 5


def test_selection_within_routing_groups_keeps_group_sizes_and_protected():
    scores = torch.tensor([9.0, 8, 7, 6, 0.1, 0.2, 0.3, 0.4])
    # Global selection would take 0..3; per group (2 groups of 4) it keeps 2 from each.
    assert select_in_routing_groups(scores, 4, [], n_group=1) == [0, 1, 2, 3]
    assert select_in_routing_groups(scores, 4, [], n_group=2) == [0, 1, 6, 7]
    assert select_in_routing_groups(scores, 4, [4], n_group=2) == [0, 1, 4, 7]
    with pytest.raises(MoeCompressError, match="routing group 1"):
        select_in_routing_groups(scores, 4, [4, 5, 6], n_group=2)


def test_scores_follow_the_statistics(qwen3):
    _, stats = qwen3
    s = stats.layers[0]
    assert torch.allclose(layer_scores("frequency", s).double(), s.expert_counts.double() / s.expert_counts.sum())
    assert torch.allclose(layer_scores("reap", s).double(), s.reap_scores.float().double())
    assert torch.allclose(layer_scores("dern", s).double(), (s.weight_sums / s.tokens).float().double())


def test_read_write_experts_round_trip_with_biases():
    model = build_tiny_model("gpt_oss")
    block = describe_model(model).blocks[0]
    before = {k: v.clone() for k, v in block.experts.module.state_dict().items()}
    stack = read_experts(block.experts)
    assert stack.biased and stack.up.shape[-1] == block.experts.hidden_size + 1
    # Write expert 2 into slot 0: slot 0 now equals expert 2 everywhere, including its biases.
    write_expert(block.experts, 0, stack, 2)
    after = block.experts.module.state_dict()
    for name, value in after.items():
        assert torch.equal(value[0], before[name][2]), name
        assert torch.equal(value[1:], before[name][1:]), name


# ----------------------------------------------------------------------------- end to end on a tiny model


def test_dern_keep_ratio_one_reproduces_the_model_exactly(qwen3, tmp_path):
    root, _ = qwen3
    prune_job(root / "model", tmp_path / "out", PruneConfig("dern", keep_ratio=1.0), StatsSource(stats_dir=root / "stats"))
    original, _ = _logits(root / "model")
    pruned, model = _logits(tmp_path / "out")
    assert model.config.num_experts == 4
    assert torch.equal(original, pruned)


def test_frequency_and_reap_keep_original_rows(qwen3, tmp_path):
    root, stats = qwen3
    _, source = _logits(root / "model")
    for method in ("frequency", "reap"):
        out = tmp_path / method
        _, pruner = prune_job(root / "model", out, PruneConfig(method, num_experts=2), StatsSource(stats_dir=root / "stats"))
        _, model = _logits(out)
        kept = json.loads((out / "kept_experts.json").read_text())["layers"]
        for i, layer in enumerate(model.model.layers):
            ids = kept[str(i)]
            assert ids == sorted(torch.topk(layer_scores(method, stats.layers[i]), 2).indices.tolist())
            old = source.model.layers[i].mlp
            assert torch.equal(layer.mlp.experts.gate_up_proj, old.experts.gate_up_proj[ids])
            assert torch.equal(layer.mlp.experts.down_proj, old.experts.down_proj[ids])
            assert torch.equal(layer.mlp.gate.weight, old.gate.weight[ids])


def test_dern_keeps_width_and_recombines_dropped_neurons(qwen3, tmp_path):
    root, _ = qwen3
    cfg = PruneConfig("dern", keep_ratio=0.5, similarity_threshold=-1.0)  # every donor neuron is accepted
    _, pruner = prune_job(root / "model", tmp_path / "out", cfg, StatsSource(stats_dir=root / "stats"))
    _, source = _logits(root / "model")
    _, model = _logits(tmp_path / "out")
    width = source.config.moe_intermediate_size
    changed = 0
    for report, layer in zip(pruner.report.layers, model.model.layers):
        experts = layer.mlp.experts
        assert experts.gate_up_proj.shape == (2, 2 * width, source.config.hidden_size)
        assert experts.down_proj.shape == (2, source.config.hidden_size, width)
        assert sum(report.dern["received"].values()) == report.dern["donor_segments"] == 2 * width
        old = source.model.layers[report.layer].mlp.experts
        for r, e in enumerate(report.kept):
            same = torch.equal(experts.down_proj[r], old.down_proj[e])
            assert same == (report.dern["received"][e] == 0)
            changed += not same
    assert changed > 0


def _plant_super_expert(folder, layer: int, expert: int, scale: float = 200.0) -> None:
    """Scale one expert's down projection through the view and save the model again."""
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    view = describe_model(model).blocks[layer].experts
    view.set(expert, "down", view.get(expert, "down") * scale)
    model.save_pretrained(str(folder))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_planted_super_expert_survives_every_method(family, tmp_path):
    save_tiny_model(family, tmp_path / "model")
    stats = _stats(tmp_path / "model", tmp_path / "plain_stats")
    layer = stats.moe_layers[0]
    counts = stats.layers[layer].expert_counts
    victim = int(counts.argmin())  # least routed: frequency pruning alone would drop it
    _plant_super_expert(tmp_path / "model", layer, victim)
    stats = _stats(tmp_path / "model", tmp_path / "stats")
    assert [(s.layer, s.expert) for s in stats.super_experts] == [(layer, victim)]
    num = stats.layers[layer].num_experts
    keep = num // 2
    source = StatsSource(stats_dir=tmp_path / "stats")
    n_group = 2 if family == "deepseek_v3" else 1
    unprotected = select_in_routing_groups(layer_scores("frequency", stats.layers[layer]), keep, [], n_group)
    assert victim not in unprotected  # the test means something: without protection it would go
    original = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    planted = describe_model(original).blocks[layer].experts.get(victim, "down").clone()
    for method in ("frequency", "reap", "dern"):
        out = tmp_path / method
        prune_job(tmp_path / "model", out, PruneConfig(method, num_experts=keep), source)
        kept = json.loads((out / "kept_experts.json").read_text())["layers"][str(layer)]
        assert victim in kept, method
        model = AutoModelForCausalLM.from_pretrained(str(out))
        down = describe_model(model).blocks[layer].experts.get(kept.index(victim), "down")
        assert down.abs().max() > 0.5 * planted.abs().max(), method  # still a super expert
    for router in ("standard", "exact", "exact-slots"):
        out = tmp_path / f"msmoe_{router}"
        merge_job(tmp_path / "model", out, MergeConfig(keep, router=router), source)
        groups = json.loads((out / "kept_experts.json").read_text())["layers"][str(layer)]
        assert [victim] in groups, router  # a singleton group
        model = AutoModelForCausalLM.from_pretrained(str(out))
        slot = victim if router == "exact-slots" else groups.index([victim])
        assert torch.equal(describe_model(model).blocks[layer].experts.get(slot, "down"), planted), router
