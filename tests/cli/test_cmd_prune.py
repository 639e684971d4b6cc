"""`moecompress prune` / `moecompress merge`: outputs, --json, calibration on the fly, one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizer_util import save_tiny_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moecompress.calibration.types import CalibrationSet
from moecompress.calibration.collect import collect_stats
from moecompress.cli.main import app
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import save_tiny_model

runner = CliRunner()
IDS = torch.randint(3, 200, (6, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny qwen2_moe with a tokenizer and statistics, and a tiny deepseek_v3 (routing groups)."""
    root = tmp_path_factory.mktemp("cli_prune")
    for family in ("qwen2_moe", "deepseek_v3"):
        save_tiny_model(family, root / family)
        save_tiny_tokenizer(root / family)
        stats = collect_stats(LayerwiseModel(root / family), CalibrationSet(IDS, None, "random"), batch_size=3)
        stats.save(root / f"{family}-stats")
    calib = root / "calib.txt"
    calib.write_text(" ".join(f"the experts route token {i} and def f(x): return x * {i}." for i in range(80)))
    return root


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, contains: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and contains in lines[0], lines[0]
    return lines[0]


def test_prune_with_stats_writes_checkpoint_record_and_report(models, tmp_path):
    out = tmp_path / "pruned"
    result = _run("prune", models / "qwen2_moe", out, "--method", "reap", "--keep-ratio", 0.5,
                  "--stats", models / "qwen2_moe-stats", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["experts_before"] == 4 and summary["experts_after"] == 2 and summary["method"] == "reap"
    assert summary["output_bytes"] < summary["input_bytes"]
    record = json.loads((out / "kept_experts.json").read_text())
    assert record["layers"] == summary["layers"] and all(len(v) == 2 for v in record["layers"].values())
    report = (out / "report.md").read_text()
    assert "Experts kept per layer" in report and "REAP saliency" in report
    # the refit is on by default: its per-layer errors are in the summary and the report
    assert summary["refit"]["damp"] == 0.1 and summary["refit"]["layers"]
    assert all(v["after"] <= max(v["before"], 1e-9) for v in summary["refit"]["layers"].values())
    assert "Output refit" in report
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_experts == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"], "no staging folder may remain"
    _one_line_error(_run("prune", models / "qwen2_moe", out, "--keep-ratio", 0.5, "--stats", models / "qwen2_moe-stats"),
                    "already exists")


def test_prune_dern_calibrates_on_the_fly_and_evaluates(models, tmp_path):
    out = tmp_path / "dern"
    result = _run("prune", models / "qwen2_moe", out, "--method", "dern", "--num-experts", 2, "--calib", models / "calib.txt",
                  "--nsamples", 4, "--seqlen", 16, "--eval-data", models / "calib.txt", "--eval-seqlen", 16,
                  "--eval-max-tokens", 64, "--similarity-threshold", 0.0, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["statistics"]["nsamples"] == 4 and summary["statistics"]["seqlen"] == 16
    assert summary["options"]["similarity_threshold"] == 0.0
    ev = summary["eval"]
    assert ev["ppl_before"] > 0 and ev["ppl_after"] > 0
    assert "perplexity" in (out / "report.md").read_text()


def test_merge_standard_and_exact(models, tmp_path):
    stats = models / "qwen2_moe-stats"
    standard = _run("merge", models / "qwen2_moe", tmp_path / "std", "--num-experts", 2, "--stats", stats, "--json")
    assert standard.exit_code == 0, standard.output
    assert json.loads(standard.stdout)["experts_after"] == 2
    for router in ("exact", "exact-slots"):
        exact = _run("merge", models / "qwen2_moe", tmp_path / router, "--num-experts", 2, "--router", router,
                     "--stats", stats, "--json")
        assert exact.exit_code == 0, exact.output
        summary = json.loads(exact.stdout)
        assert summary["experts_after"] == 4 and summary["group_counts"] == "global threshold"
        assert summary["distinct_experts_after"] == 2 and summary["grouping"] == "output"  # auto: output for exact
        record = json.loads((tmp_path / router / "kept_experts.json").read_text())
        assert record["router"] == router
        assert all(sorted(e for g in groups for e in g) == [0, 1, 2, 3] for groups in record["layers"].values())
        report = (tmp_path / router / "report.md").read_text()
        assert "Exact router" in report and "2 distinct experts" in report
        config = json.loads((tmp_path / router / "config.json").read_text())
        assert ("expert_groups" in config.get("quantization_config", {})) == (router == "exact")
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / router))
        assert model.generate(IDS[:1, :4], max_new_tokens=2, do_sample=False).shape == (1, 6)
    plain = _run("merge", models / "qwen2_moe", tmp_path / "plain", "--num-experts", 2, "--stats", stats, "--no-refit",
                 "--dominance", "reap", "--json")
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["refit"] is None
    assert "Output refit" not in (tmp_path / "plain" / "report.md").read_text()


def test_calibration_without_tokenizer_is_refused(tmp_path):
    save_tiny_model("mixtral", tmp_path / "bare")
    _one_line_error(_run("prune", tmp_path / "bare", tmp_path / "out", "--keep-ratio", 0.5), "no tokenizer files")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, contains",
    [
        (["prune", "{m}", "{o}", "--keep-ratio", "1.5", "--stats", "{s}"], "outside (0, 1]"),
        (["prune", "{m}", "{o}", "--keep-ratio", "0", "--stats", "{s}"], "outside (0, 1]"),
        (["prune", "{m}", "{o}", "--num-experts", "1", "--stats", "{s}"], "fewer than the 2 experts"),
        (["prune", "{m}", "{o}", "--method", "magnitude", "--keep-ratio", "0.5", "--stats", "{s}"], "unknown pruning method"),
        (["prune", "{m}", "{o}", "--stats", "{s}"], "exactly one of --keep-ratio or --num-experts"),
        (["merge", "{m}", "{o}", "--num-experts", "1", "--stats", "{s}"], "fewer than the 2 experts"),
        (["merge", "{m}", "{o}", "--num-experts", "2", "--method", "hcsmoe", "--stats", "{s}"], "unknown merging method"),
        (["merge", "{m}", "{o}", "--num-experts", "2", "--global", "--stats", "{s}"], "same expert count in every layer"),
        (["merge", "{m}", "{o}", "--num-experts", "2", "--router-mode", "logsumexp_approx", "--stats", "{s}"], "needs a router bias"),
        (["merge", "{m}", "{o}", "--num-experts", "2", "--dominance", "size", "--stats", "{s}"], "unknown --dominance"),
        (["merge", "{m}", "{o}", "--num-experts", "2", "--router", "slots", "--stats", "{s}"], "unknown --router"),
        (["merge", "{m}", "{o}", "--num-experts", "2", "--merge-weights", "mean", "--stats", "{s}"], "unknown --merge-weights"),
        (["merge", "{m}", "{o}", "--num-experts", "2", "--grouping", "weights", "--stats", "{s}"], "unknown --grouping"),
        (["prune", "{m}", "{o}", "--num-experts", "2", "--refit-damp", "0", "--stats", "{s}"], "--refit-damp must be positive"),
        (["merge", "{m}", "{o}", "--num-experts", "2", "--refit-sweeps", "0", "--stats", "{s}"], "--refit-sweeps must be at least 1"),
        (["prune", "{d}", "{o}", "--num-experts", "5", "--stats", "{ds}"], "routing groups"),
        (["merge", "{d}", "{o}", "--num-experts", "3", "--stats", "{ds}"], "routing groups"),
        (["prune", "{m}", "{o}", "--keep-ratio", "0.5", "--stats", "{ds}"], "collect statistics on this model"),
        (["prune", "{m}", "{o}", "--keep-ratio", "0.5", "--stats", "{o}"], "holds no stats.json"),
        (["prune", "{m}", "{o}", "--keep-ratio", "0.5", "--stats", "{s}", "--eval-data", "{o}.txt"], "is not a file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(models, tmp_path, args, contains):
    values = {
        "m": models / "qwen2_moe", "s": models / "qwen2_moe-stats", "o": tmp_path / "out",
        "d": models / "deepseek_v3", "ds": models / "deepseek_v3-stats",
    }
    _one_line_error(_run(*[a.format(**values) for a in args]), contains)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [], "no staging folder may remain"
