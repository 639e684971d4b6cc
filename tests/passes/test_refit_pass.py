"""Refit pass: after pruning/merging, the routed-output error drops, only down projections move,
exact-merge slots stay shared, and the jobs write the refit into the report."""

from __future__ import annotations

import pytest
import torch

from moecompress.calibration.types import CalibrationSet
from moecompress.calibration.collect import collect_stats
from moecompress.errors import MoeCompressError
from moecompress.api.experts import StatsSource, merge_job
from moecompress.model.driver import run_layerwise
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import save_tiny_model
from moecompress.passes.merge import MergeConfig, MergePass
from moecompress.passes.prune import PruneConfig, PrunePass
from moecompress.passes.refit import RefitConfig, RefitPass

IDS = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("refit")
    folders = {}
    for family in ("qwen3_moe", "gpt_oss"):
        save_tiny_model(family, root / family)
        stats = collect_stats(LayerwiseModel(root / family), CalibrationSet(IDS, None, "random"), batch_size=4)
        folders[family] = (root / family, stats)
    return folders


def _sweep(folder, layer_pass, refit: RefitPass | None):
    """Run the pass (then the refit) over IDS; returns each MoE layer's expert tensors after the sweep."""
    lm = LayerwiseModel(folder)
    kept: dict[int, dict[str, torch.Tensor]] = {}

    def grab(ctx):
        if ctx.block is not None:
            kept[ctx.index] = {n: p.detach().clone() for n, p in ctx.block.experts.module.named_parameters()}

    run_layerwise(lm, IDS, [layer_pass] + ([refit] if refit else []), batch_size=4, on_layer_done=grab)
    return kept


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_refit_after_pruning_lowers_error_and_moves_only_down(tiny, family):
    folder, stats = tiny[family]
    cfg = PruneConfig(method="frequency", num_experts=2)
    refit = RefitPass(RefitConfig(damp=0.01))
    plain = _sweep(folder, PrunePass.from_stats(cfg, stats, LayerwiseModel(folder).config), None)
    refitted = _sweep(folder, PrunePass.from_stats(cfg, stats, LayerwiseModel(folder).config), refit)
    assert [r.layer for r in refit.records] == sorted(plain)
    for r in refit.records:  # a layer the pruning did not change (error ~0) may stay at ~0
        assert r.relative_error_after <= max(r.relative_error_before, 1e-9), r
    assert any(r.relative_error_after < 0.9 * r.relative_error_before for r in refit.records)
    moved = False
    for layer in plain:
        for name, before in plain[layer].items():
            after = refitted[layer][name]
            if name == "down_proj":
                moved = moved or not torch.equal(before, after)
            else:  # gate/up, biases: pruning decided them, the refit leaves them alone
                assert torch.equal(before, after), (layer, name)
    assert moved


def test_refit_keeps_exact_merge_slots_shared(tiny):
    folder, stats = tiny["qwen3_moe"]
    config = LayerwiseModel(folder).config
    merger = MergePass.from_stats(MergeConfig(2, router="exact-slots", per_layer=True), stats, config)
    refit = RefitPass(RefitConfig(damp=0.01), shared_slots=merger.groups_of)
    experts = _sweep(folder, merger, refit)
    for r in refit.records:
        assert r.relative_error_after < r.relative_error_before
    for layer, params in experts.items():
        for members in merger.groups_of(layer):
            for e in members[1:]:
                assert torch.equal(params["down_proj"][e], params["down_proj"][members[0]])
                assert torch.equal(params["gate_up_proj"][e], params["gate_up_proj"][members[0]])


def test_refit_reads_the_expert_to_group_map_of_a_native_exact_merge(tiny):
    folder, stats = tiny["qwen3_moe"]
    config = LayerwiseModel(folder).config
    merger = MergePass.from_stats(MergeConfig(2, router="exact", per_layer=True), stats, config)
    refit = RefitPass(RefitConfig(damp=0.01))  # one stored expert per group: nothing shared to keep in step
    experts = _sweep(folder, merger, refit)
    assert refit.records and all(r.relative_error_after < r.relative_error_before for r in refit.records)
    assert all(params["down_proj"].shape[0] == 2 for params in experts.values())


def test_bad_refit_options_are_refused_before_any_work(tiny, tmp_path):
    folder, _ = tiny["qwen3_moe"]
    with pytest.raises(MoeCompressError, match="--refit-damp"):
        merge_job(folder, tmp_path / "out", MergeConfig(2), StatsSource(), refit=RefitConfig(damp=0.0))
    with pytest.raises(MoeCompressError, match="--refit-sweeps"):
        merge_job(folder, tmp_path / "out", MergeConfig(2), StatsSource(), refit=RefitConfig(sweeps=0))
    assert not (tmp_path / "out").exists()


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "phimoe", "granitemoe", "glm4_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_and_merge_with_refit_on_model_samples_for_every_family(family, tmp_path):
    """The refit reads whatever routing the family applies (sigmoid + groups, sparsemixer, biases);
    ``--calib sample`` needs no tokenizer, so the tiny models calibrate on their own samples."""
    from moecompress.api.experts import prune_job
    from moecompress.model.tiny import TINY_CONFIGS
    from transformers import AutoModelForCausalLM

    if family not in TINY_CONFIGS:
        pytest.skip(f"no tiny {family}")
    save_tiny_model(family, tmp_path / "model")
    source = StatsSource(calib="sample", nsamples=4, seqlen=16, batch_size=4)
    num = LayerwiseModel(tmp_path / "model").view.blocks
    experts = next(iter(num.values())).num_experts
    top_k = next(iter(num.values())).top_k
    keep = max(top_k, experts // 2)  # tiny DeepSeek / GLM: 8 experts in 2 routing groups -> 2 kept per group
    result, _ = prune_job(tmp_path / "model", tmp_path / "pruned", PruneConfig(method="reap", num_experts=keep), source,
                          refit=RefitConfig())
    # RegMean with the standard router routes the calibration tokens through a resized copy of the
    # family's own router (softmax, sigmoid + groups, sparsemixer, biases); output grouping runs
    # within DeepSeek / GLM routing groups.
    merged, _ = merge_job(tmp_path / "model", tmp_path / "merged", MergeConfig(keep, merge_weights="regmean", grouping="output"),
                          source, refit=RefitConfig())
    for job, out in ((result, "pruned"), (merged, "merged")):
        layers = job.details["refit"]["layers"]
        assert layers and all(v["after"] <= max(v["before"], 1e-9) + 1e-6 for v in layers.values()), out
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / out))
        assert model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
