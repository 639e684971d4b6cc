"""`moecompress heal`: a healed checkpoint with --json and progress lines; bad inputs are one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizer_util import save_tiny_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moecompress.api.experts import StatsSource, prune_job
from moecompress.cli.main import app
from moecompress.model.tiny import save_tiny_model
from moecompress.passes.prune import PruneConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_heal")
    save_tiny_model("qwen3_moe", root / "teacher")
    save_tiny_tokenizer(root / "teacher")
    (root / "calib.txt").write_text(" ".join(f"the experts route token {i} and def f(x): return x * {i}." for i in range(200)))
    prune_job(root / "teacher", root / "pruned", PruneConfig("frequency", num_experts=2),
              StatsSource(calib=str(root / "calib.txt"), nsamples=8, seqlen=32, batch_size=8))
    save_tiny_model("qwen3_moe", root / "vocab", vocab_size=300)
    save_tiny_model("mixtral", root / "arch")
    return root


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _common(models):
    return ["--calib", models / "calib.txt", "--nsamples", 8, "--seqlen", 32, "--steps", 4, "--batch-size", 4]


def test_heal_writes_the_student_format_with_json_summary(models, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "healed"
    result = _run("heal", models / "pruned", out, "--teacher", models / "teacher", *_common(models), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["command"] == "heal" and summary["mode"] == "blockwise" and len(summary["records"]) == 3
    assert "heal layer 3/3: 4/4 steps" in result.stderr  # per-step progress lines
    assert json.loads((out / "config.json").read_text()) == json.loads((models / "pruned" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(str(out))


def _one_line_error(result, contains: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and contains in lines[0], lines[0]


@pytest.mark.parametrize("args, contains", [
    ([], "--teacher is required"),
    (["--teacher", "{root}/missing"], "does not exist"),
    (["--teacher", "{root}/vocab"], "vocab_size"),
    (["--teacher", "{root}/arch"], "model_type"),
    (["--teacher", "{root}/teacher", "--train", "ces"], "no compressed experts"),
    (["--teacher", "{root}/teacher", "--train", "embeddings"], "--train"),
    (["--teacher", "{root}/teacher", "--mode", "sideways"], "--mode"),
    (["--teacher", "{root}/teacher", "--steps", "0"], "--steps"),
    (["--teacher", "{root}/teacher", "--lr", "nan"], "--lr"),
])
def test_bad_input_is_one_line_and_exit_2(models, tmp_path, args, contains):
    args = [a.format(root=models) for a in args]
    result = _run("heal", models / "pruned", tmp_path / "out", *_common(models), *args)
    _one_line_error(result, contains)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.moecompress-heal-work").exists()


def test_out_may_not_be_the_teacher(models):
    result = _run("heal", models / "pruned", models / "teacher", "--teacher", models / "teacher", "--overwrite", *_common(models))
    _one_line_error(result, "teacher")


def test_pipeline_heals_after_prune_with_the_pipelines_model_as_teacher(models, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "p.yaml").write_text(
        f"model: {models / 'teacher'}\n"
        f"calibration: {{source: {models / 'calib.txt'}, nsamples: 8, seqlen: 32, seed: 0}}\n"
        "passes:\n"
        "  - prune: {method: frequency, num_experts: 2, refit: false}\n"
        "  - heal: {steps: 3, batch_size: 4, train: [routers, lora]}\n"
        f"export: {{format: hf, output: {out}, overwrite: false}}\n"
    )
    result = _run("run", tmp_path / "p.yaml")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "heal.json").read_text())
    assert summary["teacher"] == str(models / "teacher") and summary["train"] == ["routers", "lora"]
    assert (out / "reports" / "step2_heal" / "report.md").is_file()
    AutoModelForCausalLM.from_pretrained(str(out))
