"""Mixed precision end to end on tiny models: budget from the written checkpoint, layer granularity,
super-expert protection, from_pretrained equivalence, profile reuse, one-line errors, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moecompress  # noqa: F401  (registers the quantizer for from_pretrained)
from moecompress.errors import MoeCompressError
from moecompress.model.tiny import build_tiny_model, save_tiny_model
from moecompress.model.view import describe_model
from moecompress.api.quantize import mixed_precision_job
from moecompress.passes.mixed_precision import MixedPrecisionConfig, checkpoint_budget, checkpoint_expert_widths
from moecompress.passes.quantize import QuantizeConfig
from moecompress.quant.allocate import BUDGET_TOL

QCFG = QuantizeConfig(bits=4, group_size=32, method="rtn")
CALIB = {"source": "random ids"}


def _ids(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen3_moe")
    save_tiny_model("qwen3_moe", folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny model whose layer 1 expert 2 has its down_proj scaled x1000: a super expert."""
    folder = tmp_path_factory.mktemp("tiny_planted")
    model = build_tiny_model("qwen3_moe", seed=0)
    experts = describe_model(model).blocks[1].experts
    experts.set(2, "down", experts.get(2, "down") * 1000.0)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def planted_stats(planted, tmp_path_factory):
    """One profile of the planted model, reused by every allocation below (as --stats does)."""
    from moecompress.passes.mixed_precision import load_or_profile

    stats = tmp_path_factory.mktemp("planted_stats")
    load_or_profile(planted, stats, QCFG, MixedPrecisionConfig(budget=3.0), _ids(), CALIB)
    return stats


@pytest.fixture(scope="module")
def global_run(tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("mp_global")
    mp = MixedPrecisionConfig(budget=3.0, super_experts="none")
    result, qpass, res = mixed_precision_job(tiny, work / "out", mp, QCFG, _ids(), CALIB, stats_dir=work / "stats")
    return work, result, res


def test_budget_holds_from_written_checkpoint(global_run):
    _work, result, res = global_run
    written = checkpoint_budget(result.out)
    assert written <= 3.0 + BUDGET_TOL
    assert written == pytest.approx(res.plan.allocation.average_bits, abs=1e-12)
    layers, bits, _params, _qc = checkpoint_expert_widths(result.out)
    assert layers == res.plan.moe_layers
    assert bits == res.plan.allocation.bits
    assert len({b for row in bits for b in row}) > 1, "a 3.0 budget between widths must mix widths"
    record = json.loads((result.out / "config.json").read_text())["quantization_config"]["extra"]["mixed_precision"]
    assert record["budget"] == 3.0 and record["bits"] == bits
    assert (result.out / "profile" / "profile.json").is_file()


def test_native_mixed_checkpoint_loads_and_matches_dequantized_model(tiny, global_run):
    from transformers import AutoModelForCausalLM

    _work, result, res = global_run
    loaded = AutoModelForCausalLM.from_pretrained(str(result.out), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    view = describe_model(reference)
    # The in-memory quantized model: the original with every expert replaced by its dequantized weights.
    for layer, block in view.blocks.items():
        packed = loaded.model.layers[layer].mlp.experts
        for group in packed.packed_groups():
            gate_up = group.gate_up.dequantize(group.bits, group.group_size)  # [E_b, 2I, H]
            down = group.down.dequantize(group.bits, group.group_size)  # [E_b, H, I]
            for slot, e in enumerate(group.expert_ids.tolist()):
                i = block.experts.intermediate_size
                block.experts.set(e, "gate", gate_up[slot, :i])
                block.experts.set(e, "up", gate_up[slot, i:])
                block.experts.set(e, "down", down[slot])
        assert list(packed.spec.bits) == res.plan.expert_bits[layer]
    ids = _ids(2, 16)
    with torch.no_grad():
        a, b = loaded(ids).logits, reference(ids).logits
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_second_allocation_reuses_profile(tiny, global_run, tmp_path):
    work, _result, first = global_run
    mp = MixedPrecisionConfig(budget=2.6, super_experts="none", allocation="layer")
    _r, _q, res = mixed_precision_job(tiny, tmp_path / "o", mp, QCFG, None, CALIB, stats_dir=work / "stats")
    assert res.profile_reused
    assert torch.equal(res.profile.layers[0].errors, first.profile.layers[0].errors)
    assert checkpoint_budget(tmp_path / "o") <= 2.6 + BUDGET_TOL
    with pytest.raises(MoeCompressError, match="group 32"):
        mixed_precision_job(tiny, tmp_path / "o2", mp, QuantizeConfig(bits=4, group_size=64, method="rtn"), None, CALIB, stats_dir=work / "stats")


def test_layer_granularity_gives_one_width_per_layer(planted, planted_stats, tmp_path):
    mp = MixedPrecisionConfig(budget=3.0, granularity="layer", super_experts="pin")
    result, _q, res = mixed_precision_job(planted, tmp_path / "o", mp, QCFG, None, CALIB, stats_dir=planted_stats)
    _layers, bits, _p, _qc = checkpoint_expert_widths(result.out)
    assert all(len(set(row)) == 1 for row in bits)
    assert bits[1] == [8, 8, 8, 8], "the super expert's whole layer is pinned to the top width"
    assert checkpoint_budget(result.out) <= 3.0 + BUDGET_TOL


@pytest.mark.parametrize("mode,width", [("pin", 8), ("keep", 16)])
def test_planted_super_expert_is_protected(planted, planted_stats, tmp_path, mode, width):
    mp = MixedPrecisionConfig(budget=2.5, super_experts=mode)
    result, _q, res = mixed_precision_job(planted, tmp_path / "o", mp, QCFG, None, CALIB, stats_dir=planted_stats)
    assert [(s.layer, s.expert) for s in res.plan.protected] == [(1, 2)]
    _layers, bits, _p, qc = checkpoint_expert_widths(result.out)
    assert bits[1][2] == width
    assert qc["extra"]["mixed_precision"]["budgeted"][1][2] is False
    assert checkpoint_budget(result.out) <= 2.5 + BUDGET_TOL
    assert (result.out / "profile" / "profile.json").is_file()


def test_statistics_of_another_model_are_refused(planted, planted_stats, tmp_path):
    """Super experts name expert ids: statistics collected before pruning or merging name other ones."""
    import shutil

    from moecompress.calibration.types import CalibrationSet
    from moecompress.calibration.collect import collect_stats
    from moecompress.model.loading import LayerwiseModel

    save_tiny_model("qwen3_moe", tmp_path / "other", num_experts=2)
    stats_dir = tmp_path / "stats"
    shutil.copytree(planted_stats, stats_dir)  # the planted model's own profile ...
    collect_stats(LayerwiseModel(tmp_path / "other"), CalibrationSet(_ids(), None, "random"), batch_size=4).save(stats_dir)
    mp = MixedPrecisionConfig(budget=3.0, super_experts="pin")  # ... with another model's statistics
    with pytest.raises(MoeCompressError, match="collect statistics on this model"):
        mixed_precision_job(planted, tmp_path / "o", mp, QCFG, None, CALIB, stats_dir=stats_dir)
    assert not (tmp_path / "o").exists()


def test_without_protection_the_planted_expert_is_budgeted(planted, planted_stats, tmp_path):
    mp = MixedPrecisionConfig(budget=2.5, super_experts="none", bit_choices=(2, 3))
    result, _q, res = mixed_precision_job(planted, tmp_path / "o", mp, QCFG, None, CALIB, stats_dir=planted_stats)
    assert res.plan.protected == [] and res.plan.pinned == {}
    assert all(all(row) for row in res.plan.allocation.budgeted)


def test_infeasible_budget_fails_before_writing(tiny, global_run, tmp_path):
    work = global_run[0]
    mp = MixedPrecisionConfig(budget=1.0, super_experts="none")
    with pytest.raises(MoeCompressError, match="infeasible") as info:
        mixed_precision_job(tiny, tmp_path / "o", mp, QCFG, None, CALIB, stats_dir=work / "stats")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_bad_options_are_one_line():
    with pytest.raises(MoeCompressError, match="--granularity layer"):
        MixedPrecisionConfig(budget=3.0, export_format="compressed-tensors").validate()
    with pytest.raises(MoeCompressError, match="super-experts"):
        MixedPrecisionConfig(budget=3.0, super_experts="maybe").validate()
    with pytest.raises(MoeCompressError, match="unquantized"):
        MixedPrecisionConfig(budget=3.0, granularity="layer", super_experts="keep", export_format="compressed-tensors").validate()


# -- the command ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
    from tokenizer_util import save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_cli")
    save_tiny_model("qwen3_moe", folder)
    save_tiny_tokenizer(folder)
    calib = folder.parent / "calib.txt"
    calib.write_text(" ".join(f"the experts route token {i} and def f(x): return x * {i}" for i in range(200)))
    return folder, calib


def _quantize(*args):
    from moecompress.cli.main import app

    return CliRunner().invoke(app, ["quantize", *map(str, args)])


def test_cli_bits_budget_writes_report_and_heatmap(cli_model, tmp_path):
    model, calib = cli_model
    common = ["--method", "rtn", "--group-size", "32", "--calib", calib, "--nsamples", "4", "--seqlen", "32"]
    r = _quantize(model, tmp_path / "o", "--bits-budget", "3.0", "--stats", tmp_path / "s", *common, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["budget_used"] <= 3.0 + BUDGET_TOL and summary["profile_reused"] is False
    text = (tmp_path / "o" / "report.md").read_text()
    assert "## Mixed precision" in text and "expert_bits.png" in text and "Width of every expert" in text
    assert (tmp_path / "o" / "expert_bits.png").is_file()
    r = _quantize(model, tmp_path / "o2", "--bits-budget", "2.6", "--stats", tmp_path / "s", *common[:4], "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["profile_reused"] is True


def test_cli_errors_exit_2_with_one_line(cli_model, tmp_path):
    model, calib = cli_model
    common = ["--method", "rtn", "--group-size", "32", "--calib", calib, "--nsamples", "4", "--seqlen", "32"]
    for extra, needle in (
        (["--bits-budget", "1.0"], "infeasible"),
        (["--bits-budget", "3", "--bit-choices", "2,x"], "--bit-choices"),
        (["--bits-budget", "3", "--format", "compressed-tensors"], "--granularity layer"),
    ):
        r = _quantize(model, tmp_path / "bad", *extra, *common)
        assert r.exit_code == 2, r.output
        assert needle in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_cli_compressed_tensors_layer_granularity(cli_model, tmp_path):
    from moecompress.export.lint import lint_checkpoint

    model, calib = cli_model
    r = _quantize(model, tmp_path / "ct", "--bits-budget", "5.0", "--granularity", "layer", "--format", "compressed-tensors",
                  "--bit-choices", "4,8", "--method", "rtn", "--group-size", "32", "--calib", calib, "--nsamples", "4", "--seqlen", "32", "--json")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert not any(p.name.startswith(".ct") for p in tmp_path.iterdir()), "the temporary native folder is removed"
    report = lint_checkpoint(tmp_path / "ct")
    assert report.clean, report.as_json()
    assert "recomputed from the compressed-tensors config" in (tmp_path / "ct" / "report.md").read_text()


def test_cli_uniform_compressed_tensors_still_works(cli_model, tmp_path):
    from moecompress.export.lint import lint_checkpoint

    model, _calib = cli_model
    r = _quantize(model, tmp_path / "u", "--bits", "4", "--method", "rtn", "--group-size", "32", "--format", "compressed-tensors")
    assert r.exit_code == 0, r.output
    assert lint_checkpoint(tmp_path / "u").clean
    assert (tmp_path / "u" / "report.md").is_file()
