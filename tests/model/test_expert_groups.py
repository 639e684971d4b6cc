"""Expert -> group maps (the exact-router merge format): the hook, resizing, and merge outputs that
store E' experts, reload identically, quantize, and are refused by commands that cannot read them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.calibration.types import CalibrationSet
from moecompress.calibration.collect import collect_stats
from moecompress.errors import MoeCompressError
from moecompress.evaluate import folder_bytes
from moecompress.api.experts import StatsSource, merge_job, prune_job
from moecompress.model.expert_groups import (
    _map_routing_to_groups,
    check_expert_to_group,
    expert_groups_of,
    install_expert_groups,
    keep_expert_rows,
)
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import TINY_CONFIGS, build_tiny_model, save_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes.merge import MergeConfig
from moecompress.passes.prune import PruneConfig

IDS = torch.randint(3, 256, (6, 16), generator=torch.Generator().manual_seed(4))


def _experts(family="qwen3_moe"):
    torch.manual_seed(0)
    model = build_tiny_model(family).eval()
    return describe_model(model).blocks[describe_model(model).moe_layers[0]]


def _routing(num_experts, tokens=12, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)])
    return index, torch.rand(tokens, k, generator=g)


@torch.no_grad()
def test_grouped_module_equals_slots_holding_copies():
    block = _experts()
    module = block.experts.module
    num = block.num_experts
    groups = [g % 2 for g in range(num)]  # experts alternate between two groups
    for name, p in module.named_parameters(recurse=False):  # slots form: every member holds its group's weights
        p.copy_(p[torch.tensor(groups)] if p.shape[0] == num else p)
    x = torch.randn(12, block.experts.hidden_size)
    index, weights = _routing(num)
    slots_out = module(x, index, weights)
    keep_expert_rows(module, [0, 1])
    install_expert_groups(module, groups)
    assert module.down_proj.shape[0] == 2 and module.num_experts == 2
    assert torch.allclose(module(x, index, weights), slots_out, atol=1e-6)
    # keyword call (GPT-OSS names its arguments router_indices / routing_weights; qwen3 top_k_index)
    assert torch.allclose(module(hidden_states=x, top_k_index=index, top_k_weights=weights), slots_out, atol=1e-6)


def test_map_survives_meta_round_trip_and_reinstalling_keeps_one_hook():
    block = _experts()
    module = block.experts.module
    keep_expert_rows(module, [0, 1])
    install_expert_groups(module, [0, 1, 1, 0])
    install_expert_groups(module, [1, 0, 0, 1])
    assert len(module._forward_pre_hooks) == 1
    module.to("meta")
    module.to_empty(device="cpu")  # what the layer-wise loader does between layers
    assert expert_groups_of(module) == (1, 0, 0, 1)
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    index = torch.tensor([[0, 1], [2, 3]])
    module(torch.zeros(2, block.experts.hidden_size), index, torch.ones(2, 2))
    assert seen[0].tolist() == [[1, 0], [0, 1]]  # later hooks see group ids


@torch.no_grad()
def test_out_of_range_ids_stay_sentinels_and_a_meta_call_does_not_break_later_calls():
    block = _experts()
    module = block.experts.module
    keep_expert_rows(module, [0, 1])
    install_expert_groups(module, [0, 1, 1, 0])
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    h = block.experts.hidden_size
    # A shape-only (meta) pass reaches the hook; the family forward itself cannot run on meta.
    _map_routing_to_groups(module, (torch.zeros(2, h, device="meta"), torch.zeros(2, 2, dtype=torch.long, device="meta")), {})
    index = torch.tensor([[0, 4], [-1, 2]])  # 4 = E and -1: expert-parallel style "no expert here"
    module(torch.zeros(2, h), index, torch.ones(2, 2))
    assert seen[-1].tolist() == [[0, 2], [2, 1]]  # E' = 2 is the family's own sentinel (>= num_experts)


@pytest.mark.parametrize(
    "mapping, message",
    [([], "at least one"), ([0, 2], "every group id"), ([-1, 0], "every group id")],
)
def test_bad_maps_are_refused(mapping, message):
    with pytest.raises(MoeCompressError, match=message):
        check_expert_to_group(mapping)


def test_map_and_stored_count_must_agree():
    module = _experts().experts.module
    with pytest.raises(MoeCompressError, match="stores 4 experts"):
        install_expert_groups(module, [0, 1, 1, 0])


# ----------------------------------------------------------------------------- merge --router exact


def _stats(folder, out):
    collect_stats(LayerwiseModel(folder), CalibrationSet(IDS, None, "random"), batch_size=3).save(out)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Every tiny family merged to half its experts with the exact router, native and slots forms."""
    root = tmp_path_factory.mktemp("groups")
    counts = {}
    for family in TINY_CONFIGS:
        save_tiny_model(family, root / family)
        _stats(root / family, root / f"{family}-stats")
        num = describe_model(AutoModelForCausalLM.from_pretrained(str(root / family))).blocks
        counts[family] = next(iter(num.values())).num_experts
        source = StatsSource(stats_dir=root / f"{family}-stats")
        for router in ("exact", "exact-slots"):
            merge_job(root / family, root / f"{family}-{router}", MergeConfig(counts[family] // 2, router=router, per_layer=True), source)
    return root, counts


@torch.no_grad()
@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_exact_merge_stores_fewer_experts_and_equals_the_slots_form(merged, family):
    root, counts = merged
    native = AutoModelForCausalLM.from_pretrained(str(root / f"{family}-exact")).eval()
    slots = AutoModelForCausalLM.from_pretrained(str(root / f"{family}-exact-slots")).eval()
    config = json.loads((root / f"{family}-exact" / "config.json").read_text())
    groups = config["quantization_config"]["expert_groups"]
    assert len(groups) == len(describe_model(native).blocks)
    for block in describe_model(native).blocks.values():
        assert block.experts.module.down_proj.shape[0] == counts[family] // 2
        assert block.router.module.weight.shape[0] == counts[family]  # the router keeps every row
    assert torch.allclose(native(input_ids=IDS).logits, slots(input_ids=IDS).logits, atol=1e-4)
    assert folder_bytes(root / f"{family}-exact") < folder_bytes(root / f"{family}-exact-slots")
    assert native.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_exact_merge_reloads_identically_in_a_fresh_process(merged):
    root, _ = merged
    folder = root / "mixtral-exact"
    expected = AutoModelForCausalLM.from_pretrained(str(folder)).eval()(input_ids=IDS[:1]).logits
    script = textwrap.dedent(
        """
        import sys, torch
        import moecompress  # registers the native format
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(int(sys.argv[4]))  # the parent's: a matmul's bits depend on the thread count
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        ids = torch.tensor([[int(t) for t in sys.argv[2].split(",")]])
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, sys.argv[3])
        """
    )
    ids = ",".join(str(int(t)) for t in IDS[0])
    proc = subprocess.run([sys.executable, "-c", script, str(folder), ids, str(root / "logits.pt"), str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=300, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(root / "logits.pt"), expected.detach())


@torch.no_grad()
def test_quantizing_an_exact_merge_keeps_the_map(merged, tmp_path):
    from moecompress.api.quantize import quantize_job
    from moecompress.passes.quantize import QuantizeConfig

    root, counts = merged
    folder = root / "qwen3_moe-exact"
    result, _ = quantize_job(folder, tmp_path / "q", QuantizeConfig(bits=8, method="gptq", group_size=32), IDS, {"source": "random"})
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    source_groups = json.loads((folder / "config.json").read_text())["quantization_config"]["expert_groups"]
    assert config["quantization_config"]["expert_groups"] == source_groups
    assert all(d["num_experts"] == counts["qwen3_moe"] // 2 for d in config["quantization_config"]["modules"].values()
               if d["type"] == "experts")
    quantized = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q")).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    a, b = quantized(input_ids=IDS).logits, merged_model(input_ids=IDS).logits
    assert (a - b).norm() / b.norm() < 0.05  # 8-bit: close to the merged model


def test_inspect_counts_stored_experts_and_names_the_router_outputs(merged):
    from moecompress.model.inspect import summarize

    root, counts = merged
    s = summarize(root / "qwen3_moe-exact")
    assert s.num_experts == counts["qwen3_moe"] // 2 and s.router_outputs == counts["qwen3_moe"]
    assert s.params_active <= s.params_total
    assert summarize(root / "qwen3_moe-exact-slots").router_outputs is None


def test_commands_that_cannot_read_an_exact_merge_refuse_it(merged, tmp_path):
    from moecompress.api.experts import StatsSource
    from moecompress.api.compress_experts import compress_experts_job
    from moecompress.passes.compressed_experts import CompressExpertsConfig

    root, _ = merged
    folder = root / "qwen3_moe-exact"
    source = StatsSource(stats_dir=root / "qwen3_moe-stats")
    with pytest.raises(MoeCompressError, match="expert -> group map"):
        prune_job(folder, tmp_path / "p", PruneConfig("frequency", keep_ratio=0.5), source)
    with pytest.raises(MoeCompressError, match="expert -> group map"):
        merge_job(folder, tmp_path / "m", MergeConfig(2), source)
    with pytest.raises(MoeCompressError, match="expert -> group map"):
        compress_experts_job(folder, tmp_path / "c", CompressExpertsConfig(n_ce=1), IDS, {})
    assert not any((tmp_path / n).exists() for n in ("p", "m", "c"))
