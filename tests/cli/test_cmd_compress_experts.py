"""`moecompress compress-experts`: writes a loadable checkpoint and report, --json, one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizer_util import save_tiny_tokenizer
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.model.tiny import save_tiny_model

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen2_moe_ce")
    save_tiny_model("qwen2_moe", folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib_ce") / "calib.jsonl"
    lines = [json.dumps({"text": f"the experts route token {i} and def f(x): return x * {i}"}) for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(*args):
    return runner.invoke(app, ["compress-experts", *map(str, args)])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    return lines[0]


def test_writes_checkpoint_report_and_json(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    common = ("--calib", calib_file, "--nsamples", 4, "--seqlen", 24, "--fit-steps", 5, "--json")
    result = _run(model_dir, out, "--n-ce", 1, "--dynamic-skip", *common)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_ce"] == 1 and summary["top_k"] == 2 and summary["dynamic_skip"]
    assert summary["active_params_after"] < summary["active_params_before"]
    assert [entry["layer"] for entry in summary["layers"]] == [0, 1, 2]
    assert summary["distill"] is None
    report = (out / "report.md").read_text()
    assert "held-back" in report and "active" in report
    assert "End-to-end distillation" not in report
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert all(m["type"] == "compressed_experts_block" and m["n_ce"] == 1 and m["beta"] is not None for m in modules.values())
    # OUT exists now: refused without --overwrite.
    assert "already exists" in _one_line_error(_run(model_dir, out, *common))


@pytest.mark.parametrize(
    "args, message",
    [
        (("--n-ce", 2), "smaller than top-k"),
        (("--n-ce", 5), "smaller than top-k"),
        (("--n-ce", -1), "--n-ce must be >= 0"),
        (("--fit-steps", -3), "--fit-steps must be >= 0"),
        (("--lr", 0), "--lr must be > 0"),
        (("--distill-steps", -1), "--distill-steps must be >= 0"),
        (("--distill-lr", 0), "--distill-lr must be > 0"),
    ],
)
def test_bad_input_is_one_line_exit_2(model_dir, calib_file, tmp_path, args, message):
    line = _one_line_error(_run(model_dir, tmp_path / "out", "--calib", calib_file, "--nsamples", 2, "--seqlen", 16, *args))
    assert message in line
    assert not (tmp_path / "out").exists()


def test_missing_model_is_one_line_exit_2(tmp_path):
    assert "does not exist" in _one_line_error(_run(tmp_path / "nope", tmp_path / "out"))


def test_distill_steps_runs_and_reports_kl(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = _run(model_dir, out, "--calib", calib_file, "--nsamples", 4, "--seqlen", 16, "--fit-steps", 2,
                  "--distill-steps", 3, "--distill-batch-size", 2, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)["distill"]
    assert d["steps"] == 3 and len(d["losses"]) == 3 and d["heldout_sequences"] == 1
    assert "End-to-end distillation" in (out / "report.md").read_text()
