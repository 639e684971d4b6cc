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
