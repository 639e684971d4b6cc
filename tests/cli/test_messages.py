"""What the commands print (issue 20): progress a log can follow, sizes and counts that add up,
one summary line where there used to be one line per expert, the version."""

import re

import pytest
from tokenizer_util import save_tiny_tokenizer
from typer.testing import CliRunner

import moecompress
from moecompress.cli.main import app
from moecompress.model.tiny import save_tiny_model

runner = CliRunner()
CALIB = ["--nsamples", "4", "--seqlen", "16"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("messages") / "model"
    save_tiny_model("qwen3_moe", folder)
    save_tiny_tokenizer(folder)
    return folder


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_progress_off_a_terminal_is_a_plain_line_per_layer_with_a_known_total(model, tmp_path):
    result = run("quantize", model, tmp_path / "q", "--method", "rtn", "--group-size", 32)
    assert result.exit_code == 0, result.output
    lines = re.findall(r"quantizing: (\d+)/(\w+) layers", result.stderr)
    assert [int(d) for d, _ in lines] == [1, 2, 3] and {t for _, t in lines} == {"3"}


def test_the_summary_line_gives_wall_and_cpu_time(model, tmp_path):
    result = run("quantize", model, tmp_path / "q", "--method", "rtn", "--group-size", 32)
    assert re.search(r"in [\d.]+s wall, [\d.]+s CPU, peak RSS", result.stderr), result.stderr


def test_an_exact_merge_says_how_many_experts_it_stores(model, tmp_path):
    result = run("merge", model, tmp_path / "m", "--num-experts", 2, "--router", "exact", "--per-layer", "--no-refit",
                 "--merge-weights", "frequency", *CALIB)
    assert result.exit_code == 0, result.output
    assert "4 -> 4 router outputs, 2 stored experts per MoE layer" in " ".join(result.stderr.split())


def test_fallbacks_are_one_line_with_the_reason_and_what_to_do(model, tmp_path):
    result = run("quantize", model, tmp_path / "q", "--group-size", 32, "--min-tokens-fraction", 0.9, *CALIB)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:") and "fallback" in line]
    assert len(notes) == 1 and "--nsamples" in notes[0] and "report.md" in notes[0], result.stderr
    assert "## Fallbacks" in (tmp_path / "q" / "report.md").read_text()


def test_compress_experts_with_eval_data_prints_the_perplexity(model, tmp_path):
    data = tmp_path / "eval.txt"
    data.write_text("the experts route every token to a few experts and return a + b. " * 40)
    result = run("compress-experts", model, tmp_path / "c", "--fit-steps", 1, "--eval-data", data, "--eval-seqlen", 16,
                 "--eval-max-tokens", 64, *CALIB)
    assert result.exit_code == 0, result.output
    assert re.search(r"perplexity [\d.]+ -> [\d.]+", result.stderr), result.stderr


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"moecompress {moecompress.__version__}"
