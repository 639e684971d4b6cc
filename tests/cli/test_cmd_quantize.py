"""`moecompress quantize` and `moecompress eval`: outputs, --json, one-line errors (exit 2), no partial OUT."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizer_util import save_tiny_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.model.tiny import save_tiny_model
from moecompress.passes.quantize import QuantizePass
from moecompress.modules.packed import PackedExperts

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny qwen2_moe (H = I = 64) with a tiny tokenizer."""
    folder = tmp_path_factory.mktemp("q_models") / "tiny"
    save_tiny_model("qwen2_moe", folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory):
    """A tiny model WITHOUT a tokenizer: RTN must not need one."""
    folder = tmp_path_factory.mktemp("q_bare") / "bare"
    save_tiny_model("mixtral", folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("q_text") / "text.jsonl"
    rows = [
        json.dumps({"text": f"The quick brown fox jumps over the lazy dog {i}. def add(a, b): return a + b * {i}"})
        for i in range(40)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def _quantize(*args):
    return runner.invoke(app, ["quantize", *map(str, args)])


def _one_line_error(result, fragment: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]
    return lines[0]


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_gptq_writes_a_loadable_checkpoint_report_and_json(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    result = _quantize(model_dir, out, "--group-size", 32, "--calib", text_file, "--nsamples", 4, "--seqlen", 16, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["out"] == str(out) and summary["bits"] == 4 and summary["method"] == "gptq"
    assert summary["calibration"]["nsamples"] == 4 and summary["calibration"]["seqlen"] == 16
    assert 0 < summary["output_bytes"] < summary["input_bytes"]
    assert summary["peak_rss_bytes"] > 0 and isinstance(summary["fallbacks"], list)
    report = (out / "report.md").read_text()
    assert "## Fallbacks" in report and "## Routed experts" in report and "## Other linear layers" in report
    routed = report.split("## Routed experts")[1].split("## Other linear layers")[0]
    assert routed.count("| gptq |") + routed.count("| fallback:") == 3 * 4  # every expert of every layer has a row
    for fb in summary["fallbacks"]:
        assert f"layer {fb['layer']} expert {fb['expert']}: {fb['tokens']} routed tokens -> {fb['method']}" in report
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert sum(isinstance(m, PackedExperts) for m in model.modules()) == 3
    assert (out / "tokenizer.json").exists(), "tokenizer files travel with the checkpoint"
    assert _siblings(out) == ["out"]


def test_no_calibrate_all_experts_names_starved_experts_on_the_console(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    # 2 sequences of 8 tokens: with 4 experts and a 10% threshold some experts must fall back.
    result = _quantize(model_dir, out, "--group-size", 32, "--calib", text_file, "--nsamples", 2, "--seqlen", 8,
                       "--no-calibrate-all-experts", "--min-tokens-fraction", 0.3)
    assert result.exit_code == 0, result.output
    assert "fallback:" in result.stderr and "fallback:rtn" in (out / "report.md").read_text()


def test_rtn_works_without_calibration_data_or_tokenizer(bare_model_dir, tmp_path):
    out = tmp_path / "out"
    result = _quantize(bare_model_dir, out, "--method", "rtn", "--group-size", 32, "--bits", 3, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["calibration"] == {"source": "none (rtn)"} and summary["fallbacks"] == []
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {tuple(m["bits"]) for m in config["modules"].values()} == {(3, 3, 3, 3)}
    assert "| rtn |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--bits", 5), "bits must be one of"),
        (("--bits", 1), "bits must be one of"),
        (("--method", "awq"), "unknown method"),
        (("--method", "rtn", "--group-size", 128), "longer than the input dimension"),  # a group longer than H = I = 64
        (("--fallback", "drop"), "unknown fallback"),
        (("--group-size", 0), "group_size"),
    ],
)
def test_bad_options_are_one_line_errors_without_partial_output(model_dir, tmp_path, args, fragment):
    out = tmp_path / "out"
    _one_line_error(_quantize(model_dir, out, *args), fragment)
    assert _siblings(out) == [], "no OUT and no staging folder"


def test_quantized_and_exact_merged_sources_are_refused_where_unreadable(bare_model_dir, tmp_path):
    from moecompress.calibration.types import CalibrationSet
    from moecompress.calibration.collect import collect_stats
    from moecompress.api.experts import StatsSource, merge_job
    from moecompress.model.loading import LayerwiseModel
    from moecompress.passes.merge import MergeConfig

    quantized = tmp_path / "q"
    assert _quantize(bare_model_dir, quantized, "--method", "rtn", "--group-size", 32).exit_code == 0
    _one_line_error(_quantize(quantized, tmp_path / "qq", "--method", "rtn"), "run quantize on the unquantized model")
    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    collect_stats(LayerwiseModel(bare_model_dir), CalibrationSet(ids, None, "random"), batch_size=4).save(tmp_path / "stats")
    merge_job(bare_model_dir, tmp_path / "exact", MergeConfig(2, router="exact", per_layer=True), StatsSource(stats_dir=tmp_path / "stats"))
    _one_line_error(_quantize(tmp_path / "exact", tmp_path / "ct", "--method", "rtn", "--group-size", 32, "--format", "compressed-tensors"),
                    "cannot express")
    assert not (tmp_path / "qq").exists() and not (tmp_path / "ct").exists()
    assert _quantize(tmp_path / "exact", tmp_path / "native", "--method", "rtn", "--group-size", 32).exit_code == 0


def test_missing_model_folder_and_existing_out_are_one_line_errors(model_dir, tmp_path):
    _one_line_error(_quantize(tmp_path / "nope", tmp_path / "out", "--method", "rtn"), "does not exist")
    assert not (tmp_path / "out").exists()
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(_quantize(model_dir, out, "--method", "rtn", "--group-size", 32), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    again = _quantize(model_dir, out, "--method", "rtn", "--group-size", 32, "--overwrite")
    assert again.exit_code == 0, again.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert _siblings(out) == ["taken"], "no staging folder left beside OUT"


def test_keyboard_interrupt_part_way_exits_130_and_leaves_nothing(model_dir, tmp_path, monkeypatch):
    original = QuantizePass.process

    def interrupted(self, ctx):
        if ctx.index == 1:
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(QuantizePass, "process", interrupted)
    out = tmp_path / "out"
    result = _quantize(model_dir, out, "--method", "rtn", "--group-size", 32)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert _siblings(out) == []


# A child that quantizes (RTN) but sleeps in layer 1 after layer 0 is written, so a signal lands mid-run.
_SLOW_CHILD = """
import sys, time
from moecompress.passes.quantize import QuantizePass
original = QuantizePass.process
def slow(self, ctx):
    if ctx.index == 1:
        time.sleep(60)
    return original(self, ctx)
QuantizePass.process = slow
from moecompress.cli.main import main
sys.argv = ["moecompress", *sys.argv[1:]]
main()  # what the `moecompress` console script runs
"""


def test_sigterm_part_way_leaves_no_out_and_no_staging_folder(model_dir, tmp_path):
    """A real process and a real signal (SIGINT is Python's KeyboardInterrupt, covered in-process above)."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CHILD, "quantize", str(model_dir), str(out), "--method", "rtn", "--group-size", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.moecompress-stage-*/layer-00000.safetensors")):
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.time() < deadline, "the child never wrote layer 0"
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, stderr.decode()[-2000:]  # cleaned up like Ctrl-C
    assert _siblings(out) == [], f"left behind after SIGTERM: {_siblings(out)}; stderr: {stderr.decode()[-500:]}"


def test_eval_prints_perplexity_json(model_dir, text_file, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(json.loads(line)["text"] for line in text_file.read_text().splitlines()))
    result = runner.invoke(app, ["eval", str(model_dir), "--data", str(text), "--seqlen", "32", "--json"])
    assert result.exit_code == 0, result.output
    dense = json.loads(result.stdout)
    assert {"ppl", "tokens"} <= set(dense)
    assert math.isfinite(dense["ppl"]) and dense["ppl"] > 1 and dense["tokens"] > 0 and dense["tokens"] % 31 == 0

    out = tmp_path / "q"
    assert _quantize(model_dir, out, "--method", "rtn", "--group-size", 32).exit_code == 0
    packed = json.loads(runner.invoke(app, ["eval", str(out), "--data", str(text), "--seqlen", "32", "--json"]).stdout)
    assert packed["tokens"] == dense["tokens"] and math.isfinite(packed["ppl"])
    assert packed["memory_bytes"] < dense["memory_bytes"]

    plain = runner.invoke(app, ["eval", str(out), "--data", str(text), "--seqlen", "32", "--max-tokens", "64"])
    assert plain.exit_code == 0 and "perplexity" in plain.stderr
    _one_line_error(runner.invoke(app, ["eval", str(out), "--data", str(text), "--max-tokens", "10"]), "smaller than one chunk")
    _one_line_error(runner.invoke(app, ["eval", str(out), "--data", str(tmp_path / "none.txt")]), "does not exist")
