"""`quantize --target`: what a runtime cannot run is refused before any work, naming the lint rule;
what it can run is written so that the lint finds it clean for that target."""

import json

import pytest
from tokenizer_util import save_tiny_tokenizer
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.export.lint import lint_checkpoint
from moecompress.model.tiny import save_tiny_model

runner = CliRunner()
FAST = ["--method", "rtn", "--group-size", "32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("targets") / "model"
    save_tiny_model("qwen3_moe", folder)
    save_tiny_tokenizer(folder)
    return folder


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("args, rule", [
    (["--target", "vllm", "--bits", "3"], "VL301"),
    (["--target", "vllm", "--bits", "8", "--asymmetric"], "VL302"),
    (["--target", "hf", "--asymmetric"], "HF202"),
    (["--target", "hf", "--bits-budget", "4.5"], "HF201"),
    (["--target", "hf", "--quantize-attention", "--attention-bits", "8"], "HF203"),
    (["--target", "vllm", "--bits-budget", "4.5", "--bit-choices", "2,3"], "include one of them"),
    (["--target", "vllm", "--bits", "3", "--vllm-version", "humming"], "VL301"),
    (["--target", "vllm", "--bits", "2", "--asymmetric", "--vllm-version", "humming"], "VL302"),
    (["--target", "vllm", "--quantize-attention", "--attention-bits", "2"], "VL305"),
    (["--target", "vllm", "--bits-budget", "4.5", "--granularity", "expert"], "CT101"),
    (["--target", "hf", "--transformers-version", "5.25", "--asymmetric"], "HF202"),
    (["--target", "hf", "--vllm-version", "humming"], "applies to --target vllm only"),
    (["--target", "vllm", "--vllm-version", "0.2"], "unknown --vllm-version '0.2' for target vllm; choose from 0.33, humming"),
    (["--target", "vllm", "--bits-budget", "3.5"], "infeasible: every expert at 4 bits"),  # and names humming:
    (["--target", "vllm", "--bits-budget", "3.5"], "--vllm-version humming adds 2-bit"),
])
def test_what_the_target_cannot_run_is_refused_before_work(model, tmp_path, args, rule):
    result = run("quantize", model, tmp_path / "q", *FAST, *args)
    assert result.exit_code == 2 and rule in result.stderr and result.stderr.count("\n") == 1, result.output
    assert list(tmp_path.iterdir()) == []


def test_vllm_target_mixed_precision_uses_only_vllm_widths_per_layer_and_lints_clean(model, tmp_path):
    out = tmp_path / "q"
    result = run("quantize", model, out, *FAST, "--target", "vllm", "--bits-budget", "5", "--bit-choices", "2,3,4,8", "--nsamples", "4", "--seqlen", "16", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "compressed-tensors" and summary["target"] == "vllm"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    widths = {g["weights"]["num_bits"] for g in config["config_groups"].values()}
    assert widths <= {4, 8}
    report = lint_checkpoint(out, target="vllm")
    assert report.clean_for("vllm"), [str(f) for f in report.findings]


def test_vllm_humming_target_writes_two_bit_experts_that_lint_clean_for_humming_only(model, tmp_path):
    out = tmp_path / "q"
    result = run("quantize", model, out, *FAST, "--target", "vllm", "--bits", "2", "--vllm-version", "humming", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target_version"] == "humming"
    assert lint_checkpoint(out, target="vllm", vllm_version="humming").clean
    assert lint_checkpoint(out, target="vllm").rules_hit() == {"VL301"}, "vLLM 0.33 refuses 2-bit MoE"


def test_vllm_bit_choices_follow_the_version():
    from moecompress.api.quantize import vllm_bit_choices

    assert vllm_bit_choices((2, 3, 4, 8), True) == (4, 8)
    assert vllm_bit_choices((2, 3, 4, 8), True, "humming") == (2, 4, 8)
    assert vllm_bit_choices((2, 3, 4, 8, 16), False, "humming") == (4, 16), "2-bit asymmetric is not claimed"


def test_vllm_target_refuses_widths_that_do_not_pack_the_expert_dims_before_work(tmp_path):
    """VL306 up front: 2-bit experts on vLLM need K % 16 == 0; moe intermediate 40 does not."""
    src = tmp_path / "i40"
    save_tiny_model("qwen3_moe", src, hidden_size=128, moe_intermediate_size=40)
    save_tiny_tokenizer(src)
    result = run("quantize", src, tmp_path / "q", "--method", "rtn", "--group-size", "8", "--bits", "2",
                 "--target", "vllm", "--vllm-version", "humming")
    assert result.exit_code == 2 and "VL306" in result.stderr and "intermediate size 40" in result.stderr, result.output
    mixed = run("quantize", src, tmp_path / "q", "--method", "rtn", "--group-size", "8", "--bits-budget", "5",
                "--bit-choices", "2,4,8", "--target", "vllm", "--vllm-version", "humming", "--nsamples", "2", "--seqlen", "8")
    assert mixed.exit_code == 2 and "drop 2 from --bit-choices" in mixed.stderr, mixed.output
    assert not (tmp_path / "q").exists()

