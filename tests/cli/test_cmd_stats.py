"""`moecompress stats`: files and keys written, --json, overwrite protection, one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest
from tokenizer_util import save_tiny_tokenizer
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.model.tiny import save_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen2_moe")
    save_tiny_model("qwen2_moe", folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    lines = [
        json.dumps({"text": f"the experts route token {i} and def f(x): return x * {i}", "domain": ("prose", "code")[i % 2]})
        for i in range(60)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(*args):
    return runner.invoke(app, ["stats", *map(str, args)])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    return lines[0]


def test_writes_stats_report_and_json(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = _run(model_dir, "--calib", calib_file, "--out", out, "--nsamples", 6, "--seqlen", 24, "--batch-size", 4, "--json")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "stats.json").read_text())
    assert json.loads(result.stdout) == meta
    assert {"version", "model", "calibration", "layers", "super_experts", "coverage"} <= set(meta)
    assert meta["calibration"]["nsamples"] == 6 and meta["calibration"]["seqlen"] == 24 and meta["calibration"]["seed"] == 0
    assert meta["domains"] == ["code", "prose"]
    assert [entry["layer"] for entry in meta["layers"]] == [0, 1, 2]
    for entry in meta["layers"]:
        assert {"layer", "tokens", "top_k", "expert_counts", "reap_scores", "weight_sums", "output_max"} <= set(entry)
        assert sum(entry["expert_counts"]) == entry["tokens"] * entry["top_k"] == 6 * 24 * 2
    for name in ("stats.safetensors", "report.md", "expert_load.png", "super_experts.png"):
        assert (out / name).is_file(), name
    assert "## Coverage" in (out / "report.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary folder may remain"
    # rerun: refused without --overwrite, replaced with it
    _one_line_error(_run(model_dir, "--calib", calib_file, "--out", out, "--nsamples", 6, "--seqlen", 24))
    again = _run(model_dir, "--calib", calib_file, "--out", out, "--nsamples", 6, "--seqlen", 24, "--batch-size", 4,
                 "--overwrite", "--coverage-layer", 1, "--coverage-threshold", 2.0)
    assert again.exit_code == 0, again.output
    assert (out / "coverage_layer1.png").is_file()
    meta2 = json.loads((out / "stats.json").read_text())
    assert meta2["coverage"]["threshold"] == 2.0 and meta2["coverage"]["num_starved"] > 0
    assert "starved" in again.stderr  # every starved expert is named on the console
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_error_while_writing_leaves_no_partial_output(model_dir, calib_file, tmp_path, monkeypatch):
    import moecompress.calibration.stats_report as stats_module

    def broken_report(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(stats_module, "write_stats_report", broken_report)
    result = _run(model_dir, "--calib", calib_file, "--out", tmp_path / "out", "--nsamples", 2, "--seqlen", 16)
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "case",
    ["empty_file", "unknown_name", "nsamples_0", "seqlen_too_long", "bad_jsonl", "coverage_layer", "no_tokenizer", "missing_model"],
)
def test_bad_inputs_exit_2_with_one_line(case, model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    model, calib, extra = model_dir, calib_file, []
    if case == "empty_file":
        calib = tmp_path / "empty.txt"
        calib.write_text("")
    elif case == "unknown_name":
        calib = "no_such_set"
    elif case == "nsamples_0":
        extra = ["--nsamples", 0]
    elif case == "seqlen_too_long":
        extra = ["--seqlen", 300]  # tiny models have 256 positions
    elif case == "bad_jsonl":
        calib = tmp_path / "bad.jsonl"
        calib.write_text('{"text": "fine line"}\n{"text": broken\n')
    elif case == "coverage_layer":
        extra = ["--coverage-layer", 7]
    elif case == "no_tokenizer":
        model = tmp_path / "bare"
        save_tiny_model("olmoe", model)
    elif case == "missing_model":
        model = tmp_path / "nowhere"
    line = _one_line_error(_run(model, "--calib", calib, "--out", out, *extra))
    expected = {
        "empty_file": "empty",
        "unknown_name": "no_such_set",
        "nsamples_0": "nsamples",
        "seqlen_too_long": "256",
        "bad_jsonl": "line 2",
        "coverage_layer": "--coverage-layer 7",
        "no_tokenizer": "tokenizer",
        "missing_model": "does not exist",
    }[case]
    assert expected in line
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
