"""Standard checkpoints with fewer experts: every tiny family loads in plain transformers and generates."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moecompress.calibration.types import CalibrationSet
from moecompress.calibration.collect import collect_stats
from moecompress.errors import MoeCompressError
from moecompress.export.standard import (
    check_expert_count,
    config_expert_count,
    expert_count_keys,
    read_kept_experts,
    with_expert_count,
)
from moecompress.api.experts import StatsSource, merge_job, prune_job
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import TINY_CONFIGS, save_tiny_model, tiny_config
from moecompress.model.view import describe_model
from moecompress.passes.merge import MergeConfig
from moecompress.passes.prune import PruneConfig

IDS = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(2))
SUBPROCESS_FAMILIES = ("mixtral", "deepseek_v3")


def _outputs(root, family):
    """Prune (DERN, half the experts) and merge (M-SMoE, standard router) one tiny family."""
    src = root / family
    save_tiny_model(family, src)
    lm = LayerwiseModel(src)
    stats = collect_stats(lm, CalibrationSet(IDS, None, "random"), batch_size=4)
    stats.save(root / f"{family}-stats")
    num = config_expert_count(lm.config)
    source = StatsSource(stats_dir=root / f"{family}-stats")
    prune_job(src, root / f"{family}-prune", PruneConfig("dern", keep_ratio=0.5), source)
    merge_job(src, root / f"{family}-merge", MergeConfig(num // 2), source)
    return num


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("standard")
    return root, {family: _outputs(root, family) for family in TINY_CONFIGS}


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_outputs_load_with_fewer_experts_and_generate(written, family):
    root, counts = written
    for kind in ("prune", "merge"):
        folder = root / f"{family}-{kind}"
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
        assert not any(info.values()), (kind, info)  # no missing, unexpected or mismatched tensor
        assert config_expert_count(model.config) == counts[family] // 2
        record = read_kept_experts(folder)
        assert record["num_experts_before"] == counts[family] and record["num_experts_after"] == counts[family] // 2
        blocks = describe_model(model).blocks
        assert sorted(int(i) for i in record["layers"]) == sorted(blocks)
        for layer, entries in record["layers"].items():
            assert len(entries) == counts[family] // 2
            assert blocks[int(layer)].experts.module.down_proj.shape[0] == counts[family] // 2
            assert blocks[int(layer)].router.module.weight.shape[0] == counts[family] // 2
        out = model.eval().generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 8)
        assert (folder / "report.md").is_file()


def _checkpoint_keys(folder) -> dict[str, tuple]:
    keys = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return keys


@pytest.mark.parametrize("family, key", [("mixtral", "num_local_experts"), ("qwen2_moe", "num_experts")])
def test_written_names_and_shapes_match_save_pretrained_with_fewer_experts(written, family, key, tmp_path):
    root, counts = written
    reference = tmp_path / "reference"
    save_tiny_model(family, reference, **{key: counts[family] // 2})
    expected = _checkpoint_keys(reference)
    for kind in ("prune", "merge"):
        folder = root / f"{family}-{kind}"
        assert _checkpoint_keys(folder) == expected, kind
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(expected)


def test_deepseek_correction_bias_is_sliced_with_the_router(written):
    root, counts = written
    record = read_kept_experts(root / "deepseek_v3-prune")
    source = AutoModelForCausalLM.from_pretrained(str(root / "deepseek_v3"))
    model = AutoModelForCausalLM.from_pretrained(str(root / "deepseek_v3-prune"))
    for layer, kept in record["layers"].items():
        old, new = source.model.layers[int(layer)].mlp.gate, model.model.layers[int(layer)].mlp.gate
        assert torch.equal(new.e_score_correction_bias, old.e_score_correction_bias[kept])
        assert torch.equal(new.weight, old.weight[kept])
        # Each routing group of 4 keeps 2: survivors stay in their group.
        assert [e // 4 for e in kept] == [0, 0, 1, 1]


def test_outputs_load_in_a_process_that_never_imports_moecompress(written):
    root, counts = written
    folders = [str(root / f"{family}-{kind}") for family in SUBPROCESS_FAMILIES for kind in ("prune", "merge")]
    script = textwrap.dedent(
        """
        import json, sys
        import torch
        from transformers import AutoModelForCausalLM
        result = {}
        for folder in sys.argv[1:]:
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False)
            cfg = model.config.to_dict()
            count = next(cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in cfg)
            result[folder] = [count, list(out.shape)]
        assert not any(m == "moecompress" or m.startswith("moecompress.") for m in sys.modules)
        print(json.dumps(result))
        """
    )
    # cwd outside the repository: from its root, transformers would import the top-level `kernels/` folder
    # as the Hugging Face `kernels` package (which imports moecompress).
    proc = subprocess.run(
        [sys.executable, "-c", script, *folders], capture_output=True, text=True, timeout=300, cwd=str(root)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for family in SUBPROCESS_FAMILIES:
        for kind in ("prune", "merge"):
            assert result[str(root / f"{family}-{kind}")] == [counts[family] // 2, [1, 7]]


def test_config_keys_and_copy():
    mixtral = tiny_config("mixtral")
    assert expert_count_keys(mixtral) == ["num_local_experts"]
    assert expert_count_keys(tiny_config("deepseek_v3")) == ["n_routed_experts"]
    smaller = with_expert_count(mixtral, 2)
    assert config_expert_count(smaller) == 2 and config_expert_count(mixtral) == 4


@pytest.mark.parametrize(
    "family, count, message",
    [
        ("mixtral", 1, "fewer than the 2 experts every token is routed to"),
        ("mixtral", 5, "outside"),
        ("deepseek_v3", 5, "routing groups"),
        ("deepseek_v3", 2, "two best experts"),
    ],
)
def test_expert_count_checks(family, count, message):
    with pytest.raises(MoeCompressError, match=message):
        check_expert_count(tiny_config(family), count)
    check_expert_count(tiny_config(family), 4)
