"""`moecompress lint`: a clean export passes; each rule fires on a checkpoint built to break it;
exit codes 0 / 1 / 2 through the command."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moecompress.cli import cmd_lint
from moecompress.export.compressed_tensors import convert_native_to_compressed_tensors
from moecompress.export.lint import RULES, lint_checkpoint
from moecompress.api.quantize import quantize_job
from moecompress.model.tiny import save_tiny_model
from moecompress.passes.quantize import QuantizeConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lint_model")
    save_tiny_model("qwen3_moe", folder)
    return folder


def _export(tiny, folder, expert_bits=None, bits=4, mixed=False):
    cfg = QuantizeConfig(bits=bits, group_size=32, method="rtn", attention_bits=8, expert_bits=expert_bits)
    native = folder.parent / f"{folder.name}_native"
    quantize_job(tiny, native, cfg, None, {"source": "none"})
    return convert_native_to_compressed_tensors(native, folder, allow_mixed_layers=mixed)


@pytest.fixture(scope="module")
def good(tiny, tmp_path_factory):
    return _export(tiny, tmp_path_factory.mktemp("lint") / "good")


def _copy(good, tmp_path):
    return shutil.copytree(good, tmp_path / "bad")


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


def _hit(folder) -> set[str]:
    return lint_checkpoint(folder).rules_hit()


def test_clean_export_has_no_findings(good):
    report = lint_checkpoint(good)
    assert report.clean and report.findings == [], report.as_json()
    assert report.summary["moe_layers"] == 3 and report.summary["experts"] == 12


def test_ct100_native_or_invalid_config(tiny, good, tmp_path):
    native = good.parent / "good_native"
    assert _hit(native) == {"CT100"}
    bad = _copy(good, tmp_path)
    _edit_config(bad, lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=None))
    assert _hit(bad) == {"CT100"}


def test_ct101_and_hf201_mixed_widths_in_a_layer(tiny, tmp_path):
    bad = _export(tiny, tmp_path / "mixed", {0: [4, 8, 4, 4], 1: [4] * 4, 2: [4] * 4}, mixed=True)
    assert _hit(bad) == {"CT101", "HF201"}


def test_hf201_alone_widths_differ_across_layers(tiny, tmp_path):
    bad = _export(tiny, tmp_path / "bylayer", {0: [8] * 4, 1: [4] * 4, 2: [4] * 4})
    assert _hit(bad) == {"HF201"}, "vLLM loads it (one scheme per layer); transformers does not"


def test_hf201_transformers_would_pick_another_group(good, tmp_path):
    bad = _copy(good, tmp_path)

    def prepend_decoy(qc):
        decoy = json.loads(json.dumps(qc["config_groups"]["group_1"]))
        decoy["targets"] = ["re:^nothing\\.experts$"]
        qc["config_groups"] = {"decoy": decoy, **qc["config_groups"]}

    _edit_config(bad, prepend_decoy)
    assert _hit(bad) == {"HF201"}


def test_ct102_unquantized_expert(tiny, tmp_path):
    bad = _export(tiny, tmp_path / "kept", {0: [4] * 4, 1: [4, 16, 4, 4], 2: [4] * 4}, mixed=True)
    report = lint_checkpoint(bad)
    assert report.rules_hit() == {"CT102"}
    assert {f.where for f in report.findings} == {f"model.layers.1.mlp.experts.1.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


def test_ct103_group_size_not_dividing(good, tmp_path):
    bad = _copy(good, tmp_path)
    _edit_config(bad, lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=24))
    assert _hit(bad) == {"CT103"}


def test_ct104_router_not_ignored(good, tmp_path):
    bad = _copy(good, tmp_path)
    _edit_config(bad, lambda qc: qc["ignore"].remove("model.layers.2.mlp.gate"))
    report = lint_checkpoint(bad)
    assert report.rules_hit() == {"CT104"} and [f.where for f in report.findings] == ["model.layers.2.mlp.gate"]


def test_ct105_overlapping_targets(good, tmp_path):
    bad = _copy(good, tmp_path)
    _edit_config(bad, lambda qc: qc["config_groups"]["group_1"]["targets"].append("re:^model\\.layers\\.0\\.mlp\\.experts\\.0\\.up_proj$"))
    assert "CT105" in _hit(bad)


def test_ct106_packed_tensor_shape(good, tmp_path):
    bad = _copy(good, tmp_path)
    shard = bad / "layer-00000.safetensors"
    tensors = load_file(str(shard))
    key = "model.layers.0.mlp.experts.1.down_proj.weight_scale"
    tensors[key] = torch.ones(tensors[key].shape[0], 3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    report = lint_checkpoint(bad)
    assert report.rules_hit() == {"CT106"} and report.findings[0].where == "model.layers.0.mlp.experts.1.down_proj"


def test_vl301_is_a_warning_only(tiny, tmp_path):
    folder = _export(tiny, tmp_path / "two", bits=2)
    report = lint_checkpoint(folder)
    assert report.rules_hit() == {"VL301"} and report.clean


def test_every_rule_has_a_test():
    tested = {"CT100", "CT101", "CT102", "CT103", "CT104", "CT105", "CT106", "HF201", "VL301"}
    assert set(RULES) == tested


def _cli(*args):
    app = typer.Typer()
    cmd_lint.register(app)
    app.command("noop")(lambda: None)  # two commands keep typer's sub-command syntax
    return CliRunner().invoke(app, ["lint", *map(str, args)])


def test_cli_exit_codes(good, tiny, tmp_path):
    r = _cli(good)
    assert r.exit_code == 0, r.output
    r = _cli(good, "--json")
    assert json.loads(r.stdout)["clean"] is True
    bad = _copy(good, tmp_path)
    _edit_config(bad, lambda qc: qc["ignore"].remove("lm_head"))
    r = _cli(bad)
    assert r.exit_code == 1 and "CT104 router-ignored" in r.output
    r = _cli(bad, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["findings"][0]["rule"] == "CT104"
    r = _cli(tmp_path / "missing")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    (bad / "config.json").write_text("{broken")
    r = _cli(bad)
    assert r.exit_code == 2 and "config.json" in r.output
