"""`moecompress lint`: a clean export passes; each rule fires on a checkpoint built to break it (for
the target it names, and no other rule); exit codes 0 / 1 / 2 through the command."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moecompress.cli import cmd_lint
from moecompress.export.compressed_tensors import convert_native_to_compressed_tensors
from moecompress.export.lint import RULE_TARGETS, RULES, lint_checkpoint
from moecompress.api.quantize import quantize_job
from moecompress.model.tiny import save_tiny_model
from moecompress.passes.quantize import QuantizeConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lint_model")
    # hidden and intermediate multiples of 128: Marlin-eligible, so a clean export has no finding at all
    save_tiny_model("qwen3_moe", folder, hidden_size=128, moe_intermediate_size=128)
    return folder


def _export(tiny, folder, expert_bits=None, bits=4, mixed=False, attention_bits=4, symmetric=True):
    cfg = QuantizeConfig(bits=bits, group_size=32, method="rtn", attention_bits=attention_bits, expert_bits=expert_bits,
                         symmetric=symmetric)
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
    report = lint_checkpoint(bad)
    assert report.rules_hit() == {"CT101", "HF201"}
    assert report.rules_hit("vllm") == {"CT101"} and report.rules_hit("hf") == {"HF201"}
    assert lint_checkpoint(bad, target="vllm").rules_hit() == {"CT101"}


def test_hf201_alone_widths_differ_across_layers(tiny, tmp_path):
    bad = _export(tiny, tmp_path / "bylayer", {0: [8] * 4, 1: [4] * 4, 2: [4] * 4})
    report = lint_checkpoint(bad)
    assert report.rules_hit() == {"HF201"}, "vLLM loads it (one scheme per layer); transformers does not"
    assert [f.target for f in report.findings] == ["hf"] and report.clean_for("vllm") and not report.clean_for("hf")
    vllm_only = lint_checkpoint(bad, target="vllm")
    assert vllm_only.findings == [] and vllm_only.clean, "was a false failure before: per-layer 4/8 loads in vLLM"


def test_hf201_transformers_would_pick_another_group(good, tmp_path):
    bad = _copy(good, tmp_path)

    def prepend_decoy(qc):
        decoy = json.loads(json.dumps(qc["config_groups"]["group_0"]))
        decoy["targets"] = ["re:^nothing\\.experts$"]
        qc["config_groups"] = {"decoy": decoy, **qc["config_groups"]}

    _edit_config(bad, prepend_decoy)
    assert _hit(bad) == {"HF201"}


def test_ct102_unquantized_expert(tiny, tmp_path):
    bad = _export(tiny, tmp_path / "kept", {0: [4] * 4, 1: [4, 16, 4, 4], 2: [4] * 4}, mixed=True)
    report = lint_checkpoint(bad)
    assert report.rules_hit() == {"CT102"}
    assert {f.where for f in report.findings} == {f"model.layers.1.mlp.experts.1.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert {f.target for f in report.findings} == {"all"}


def test_ct102_layer_left_dense_is_an_hf_error_only(tiny, tmp_path):
    bad = _export(tiny, tmp_path / "denselayer", {0: [4] * 4, 1: [16] * 4, 2: [4] * 4}, mixed=True)
    report = lint_checkpoint(bad)
    assert report.rules_hit() == {"CT102"}
    assert [(f.target, f.where) for f in report.findings] == [("hf", "model.layers.1.mlp.experts")]
    assert report.clean_for("vllm"), "was a false failure before: vLLM loads a MoE layer left dense"
    assert lint_checkpoint(bad, target="vllm").findings == []


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

    def add_overlap(qc):
        extra = json.loads(json.dumps(qc["config_groups"]["group_0"]))
        extra["targets"] = ["re:^model\\.layers\\.0\\.mlp\\.experts\\.0\\.up_proj$"]
        qc["config_groups"]["group_1"] = extra

    _edit_config(bad, add_overlap)
    assert _hit(bad) == {"CT105"}


def test_ct106_packed_tensor_shape(good, tmp_path):
    bad = _copy(good, tmp_path)
    shard = bad / "layer-00000.safetensors"
    tensors = load_file(str(shard))
    key = "model.layers.0.mlp.experts.1.down_proj.weight_scale"
    tensors[key] = torch.ones(tensors[key].shape[0], 3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    report = lint_checkpoint(bad)
    assert report.rules_hit() == {"CT106"} and report.findings[0].where == "model.layers.0.mlp.experts.1.down_proj"


def test_vl301_two_bit_experts_fail_in_vllm(tiny, tmp_path):
    folder = _export(tiny, tmp_path / "two", bits=2, attention_bits=None)  # 2-bit attention would be VL305 too
    report = lint_checkpoint(folder)
    assert report.rules_hit() == {"VL301"} and not report.clean, "was only a warning before: vLLM 0.33 refuses 2-bit MoE"
    assert {f.target for f in report.findings} == {"vllm"} and report.clean_for("hf")
    assert report.errors and all(f.severity == "error" for f in report.findings)


def test_vl302_eight_bit_asymmetric_experts_fail_in_vllm(tiny, tmp_path):
    folder = _export(tiny, tmp_path / "asym8", bits=8, attention_bits=8, symmetric=False)
    report = lint_checkpoint(folder, target="vllm")
    assert report.rules_hit() == {"VL302"} and not report.clean, "was a miss before"
    assert lint_checkpoint(folder).rules_hit("hf") == {"HF202"}


def test_hf202_asymmetric_experts_fail_in_hf_but_load_in_vllm(tiny, tmp_path):
    folder = _export(tiny, tmp_path / "asym4", symmetric=False)
    report = lint_checkpoint(folder)
    assert report.rules_hit() == {"HF202"} and [f.target for f in report.findings] == ["hf"], "was a miss before"
    assert report.clean_for("vllm") and not report.clean_for("hf")


def test_hf203_attention_at_another_width_fails_in_hf(tiny, tmp_path):
    folder = _export(tiny, tmp_path / "attn8", attention_bits=8)
    report = lint_checkpoint(folder)
    assert report.rules_hit() == {"HF203"} and report.findings[0].target == "hf", "was a miss before"
    assert "self_attn" in report.findings[0].message and report.clean_for("vllm")
    dense_attention = _export(tiny, tmp_path / "attn16", attention_bits=None)
    assert lint_checkpoint(dense_attention).findings == [], "attention left dense is no finding"


def test_vl303_not_marlin_eligible_is_a_vllm_warning(tmp_path):
    small = tmp_path / "h64"
    save_tiny_model("qwen3_moe", small)  # hidden 64, moe intermediate 64: not a multiple of 128
    folder = _export(small, tmp_path / "h64ct")
    report = lint_checkpoint(folder)
    assert report.rules_hit() == {"VL303"} and report.clean and report.clean_for("vllm")
    assert {(f.target, f.severity) for f in report.findings} == {("vllm", "warning")}
    assert len(report.findings) == 3 and "hidden size 64" in report.findings[0].message
    assert lint_checkpoint(folder, target="hf").findings == []


def test_vl304_vllm_looks_the_scheme_up_under_gate_up_down_names(tmp_path):
    """Mixtral stores w1/w3/w2; vLLM asks for <experts>.0.gate_proj/up_proj/down_proj. Targets naming only
    w1|w2|w3 leave the layer unquantized in vLLM while its tensors are packed."""
    src = tmp_path / "mixtral"
    save_tiny_model("mixtral", src, hidden_size=128, intermediate_size=128)
    folder = _export(src, tmp_path / "mixtral_ct")
    assert lint_checkpoint(folder).findings == [], "the export names vLLM's lookup names too"
    bad = _copy(folder, tmp_path)

    def only_checkpoint_names(qc):
        for group in qc["config_groups"].values():
            group["targets"] = [re.sub(r"\([a-z0-9_|]+\)\$$", "(w1|w2|w3)$", t) for t in group["targets"]]

    _edit_config(bad, only_checkpoint_names)
    report = lint_checkpoint(bad)
    assert report.rules_hit() == {"VL304"} and report.clean_for("hf") and not report.clean_for("vllm")
    assert "none (unquantized)" in report.findings[0].message and len(report.findings) == 3  # one per MoE layer


def test_vllm_version_humming_runs_two_bit_symmetric_experts_only(tiny, tmp_path):
    two = _export(tiny, tmp_path / "two_h", bits=2, attention_bits=2)
    assert lint_checkpoint(two, "vllm").rules_hit() == {"VL301", "VL305"}, "0.33 (the default) refuses 2-bit MoE and linears"
    assert lint_checkpoint(two, "vllm", vllm_version="humming").findings == []
    three = _export(tiny, tmp_path / "three_h", bits=3, attention_bits=3)
    assert lint_checkpoint(three, "vllm", vllm_version="humming").rules_hit() == {"VL301"}, "3-bit MoE is still in review"
    two_asym = _export(tiny, tmp_path / "two_asym_h", bits=2, attention_bits=2, symmetric=False)
    report = lint_checkpoint(two_asym, "vllm", vllm_version="humming")
    assert report.rules_hit() == {"VL302"} and "2-bit asymmetric" in report.findings[0].message
    assert report.as_json()["versions"] == {"vllm": "humming"}


@pytest.fixture(scope="module")
def tiny_shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lint_shared")
    save_tiny_model("qwen2_moe", folder)  # shared experts: a second kind of dense module
    return folder


def _export_dense(model, folder, attention_bits, shared_expert_bits):
    cfg = QuantizeConfig(bits=4, group_size=32, method="rtn", attention_bits=attention_bits, shared_expert_bits=shared_expert_bits)
    native = folder.parent / f"{folder.name}_native"
    quantize_job(model, native, cfg, None, {"source": "none"})
    return convert_native_to_compressed_tensors(native, folder)


@pytest.fixture(scope="module")
def two_dense(tiny_shared, tmp_path_factory):
    """Attention 8-bit, shared experts 2-bit, experts 4-bit: two dense schemes."""
    return _export_dense(tiny_shared, tmp_path_factory.mktemp("two_dense") / "ct", attention_bits=8, shared_expert_bits=2)


def test_hf203_on_transformers_525_dense_modules_share_one_scheme_of_their_own(tiny_shared, two_dense, tmp_path):
    own = _export_dense(tiny_shared, tmp_path / "own8", attention_bits=8, shared_expert_bits=8)
    assert lint_checkpoint(own, "hf").rules_hit() == {"HF203"}, "5.24 (the default) dequantizes them with the experts' scheme"
    assert lint_checkpoint(own, "hf", transformers_version="5.25").findings == [], "5.25 loads them with their own (one) scheme"
    report = lint_checkpoint(two_dense, "hf", transformers_version="5.25")
    assert report.rules_hit() == {"HF203"} and "get_dense_scheme" in report.findings[0].message
    # groups are ordered by width: the 2-bit shared experts' group comes first, so it is the resolved one
    assert "self_attn" in report.findings[0].message and "(2-bit sym, group 32)" in report.findings[0].message


def test_dense_scheme_group_agrees_with_the_installed_transformers(two_dense):
    """Our written-out copy of transformers 5.25's get_dense_scheme picks the same group as the real one."""
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.integrations.compressed_tensors import get_dense_scheme

    from moecompress.export.targets import dense_scheme_group

    qc = QuantizationConfig.model_validate(json.loads((two_dense / "config.json").read_text())["quantization_config"])
    assert qc.config_groups[dense_scheme_group(qc.config_groups)] is get_dense_scheme(qc)


def test_unknown_runtime_version_is_refused(good):
    from moecompress.errors import MoeCompressError

    with pytest.raises(MoeCompressError, match="unknown --vllm-version '0.2' for target vllm; choose from 0.33, humming"):
        lint_checkpoint(good, vllm_version="0.2")
    with pytest.raises(MoeCompressError, match="--transformers-version"):
        lint_checkpoint(good, transformers_version="4.57")


def test_vl305_attention_at_a_width_vllm_dense_path_does_not_run(tiny, tmp_path):
    folder = _export(tiny, tmp_path / "attn3", attention_bits=3)
    report = lint_checkpoint(folder, "vllm")
    assert report.rules_hit() == {"VL305"} and "self_attn" in report.findings[0].message
    assert lint_checkpoint(folder, "vllm", vllm_version="humming").findings == [], "Humming runs 3-bit dense linears"


def test_vl306_expert_dims_must_hold_whole_int32_rows_of_codes(tmp_path):
    """vLLM allocates MoE weights as [E, K // (32 // bits), N]: 2-bit experts need K % 16 == 0. An
    intermediate size of 40 packs at 4 bits (40 % 8 == 0) but not at 2."""
    src = tmp_path / "i40"
    save_tiny_model("qwen3_moe", src, hidden_size=128, moe_intermediate_size=40)

    def export(bits):
        native = tmp_path / f"i40_w{bits}_native"
        quantize_job(src, native, QuantizeConfig(bits=bits, group_size=8, method="rtn"), None, {"source": "none"})
        return convert_native_to_compressed_tensors(native, tmp_path / f"i40_w{bits}")

    two = lint_checkpoint(export(2), "vllm", vllm_version="humming")
    assert two.errors and {f.rule for f in two.errors} == {"VL306"}, [str(f) for f in two.findings]
    assert "intermediate size 40 not a multiple of 16" in two.errors[0].message
    four = lint_checkpoint(export(4), "vllm")
    assert "VL306" not in four.rules_hit() and four.clean_for("vllm")


def test_every_rule_has_a_test():
    tested = {"CT100", "CT101", "CT102", "CT103", "CT104", "CT105", "CT106", "HF201", "HF202", "HF203",
              "VL301", "VL302", "VL303", "VL304", "VL305", "VL306"}
    assert set(RULES) == tested == set(RULE_TARGETS)


def test_unknown_target_is_refused(good):
    from moecompress.errors import MoeCompressError

    with pytest.raises(MoeCompressError, match="unknown lint target"):
        lint_checkpoint(good, target="tgi")


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


def test_cli_target_option(tiny, tmp_path):
    bylayer = _export(tiny, tmp_path / "bylayer_cli", {0: [8] * 4, 1: [4] * 4, 2: [4] * 4})
    r = _cli(bylayer)
    assert r.exit_code == 1 and "HF201" in r.output and "[error hf]" in r.output
    r = _cli(bylayer, "--target", "vllm")
    assert r.exit_code == 0, r.output
    r = _cli(bylayer, "--target", "hf", "--json")
    out = json.loads(r.stdout)
    assert r.exit_code == 1 and out["targets"] == ["hf"] and out["clean_for"] == {"hf": False}
    assert out["findings"][0]["target"] == "hf" and {"rule", "name", "severity", "where", "message"} <= set(out["findings"][0])
    r = _cli(bylayer, "--target", "tgi")
    assert r.exit_code == 2 and "unknown lint target" in r.output


def test_cli_runtime_versions(tiny, tmp_path):
    two = _export(tiny, tmp_path / "two_cli", bits=2, attention_bits=2)
    r = _cli(two, "--target", "vllm")
    assert r.exit_code == 1 and "VL301" in r.output and "vllm 0.33" in " ".join(r.output.split())
    r = _cli(two, "--target", "vllm", "--vllm-version", "humming")
    assert r.exit_code == 0 and "clean for vllm humming" in " ".join(r.output.split()), r.output
    r = _cli(two, "--vllm-version", "0.99")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "0.33, humming" in r.output
