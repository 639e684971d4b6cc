"""Pipelines whose prune or merge runs in the quantizer's sweep (moecompress.pipeline.run)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from dist_util import free_port
from tokenizer_util import save_tiny_model_with_tokenizer

from moecompress.api.job import execute
from moecompress.pipeline.run import PipelineJob, fusion_blocker, step_options
from moecompress.pipeline.schema import PASSES, load_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny") / "qwen3")


def pipeline(tmp_path: Path, model: Path, passes: list[dict], name: str):
    doc = {
        "model": str(model),
        "calibration": {"source": "mixed", "nsamples": 8, "seqlen": 32, "seed": 0},
        "passes": passes,
        "export": {"output": str(tmp_path / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_pipeline(path, PASSES)


def run(p, fuse: bool, echo=None):
    lines = []
    execute(PipelineJob(p, echo=lines.append if echo is None else echo, fuse=fuse), p.export["output"], False)
    return Path(p.export["output"]), lines


def model_digest(folder: Path) -> str:
    """The model's bytes: every shard, the index and the config (the reports hold timings). The
    provenance's source model is left out: separately, the quantizer read the staging folder
    ``step2_prune``; fused, it names the pipeline's model."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + [folder / "model.safetensors.index.json"]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["provenance"].pop("source_model")
    h.update(json.dumps(config, sort_keys=True).encode())
    return h.hexdigest()


@pytest.mark.parametrize("rewrite", [
    {"prune": {"method": "reap", "num_experts": 2, "refit": False}},
    {"prune": {"method": "dern", "num_experts": 2, "refit": False}},
    {"merge": {"num_experts": 2, "refit": False, "merge_weights": "frequency", "router_mode": "dominant"}},
], ids=["reap", "dern", "merge"])
def test_fused_sweep_writes_the_bytes_of_the_two_passes_one_after_the_other(tiny, tmp_path, rewrite):
    passes = [{"stats": {}}, rewrite, {"quantize": {"bits": 4, "group_size": 32}}]
    fused, lines = run(pipeline(tmp_path, tiny, passes, "fused"), fuse=True)
    separate, _ = run(pipeline(tmp_path, tiny, passes, "separate"), fuse=False)
    assert any("in one sweep" in line for line in lines), lines
    assert model_digest(fused) == model_digest(separate)
    name = next(iter(rewrite))
    kept = json.loads((fused / "reports" / f"step2_{name}" / "kept_experts.json").read_text())
    assert kept == json.loads((separate / "reports" / f"step2_{name}" / "kept_experts.json").read_text())
    assert "not written" in (fused / "reports" / f"step2_{name}" / "report.md").read_text()
    assert (fused / "reports" / "step3_quantize" / "report.md").is_file()
    assert "in the next pass's sweep" in (fused / "report.md").read_text()


def test_fused_sweep_with_refit_quantizes_the_refit_experts(tiny, tmp_path):
    """With refit the rewrite reads activations: those of the quantizer's sweep (same calibration)."""
    passes = [{"prune": {"method": "reap", "num_experts": 2}}, {"quantize": {"bits": 4, "group_size": 32}}]
    out, lines = run(pipeline(tmp_path, tiny, passes, "fused"), fuse=True)
    assert any("in one sweep" in line for line in lines), lines
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 2 and config["quantization_config"]["quant_method"] == "moecompress"
    report = (out / "reports" / "step1_prune" / "report.md").read_text()
    assert "Output refit" in report


@pytest.mark.parametrize("rewrite, quantize, reason", [
    ({"prune": {"method": "reap", "num_experts": 2, "eval_data": "x.txt"}}, {"bits": 4}, "evaluates its own output"),
    ({"merge": {"num_experts": 2, "router": "exact"}}, {"bits": 4}, "exact-router merge"),
    ({"prune": {"method": "reap", "num_experts": 2}}, {"bits_budget": 3.0}, "bit allocation"),
    ({"prune": {"method": "reap", "num_experts": 2, "batch_size": 4}}, {"bits": 4}, "another calibration set"),
])
def test_what_cannot_share_the_quantizer_sweep_is_named(tiny, tmp_path, rewrite, quantize, reason):
    p = pipeline(tmp_path, tiny, [rewrite, {"quantize": quantize}], "p")
    blocker = fusion_blocker(step_options(p, 0, None), step_options(p, 1, None))
    assert blocker is not None and reason in blocker


def test_rewrite_without_activations_fuses_whatever_the_quantizer_calibrates_on(tiny, tmp_path):
    p = pipeline(tmp_path, tiny, [{"prune": {"method": "reap", "num_experts": 2, "refit": False, "batch_size": 4}},
                                  {"quantize": {"bits": 4}}], "p")
    assert fusion_blocker(step_options(p, 0, None), step_options(p, 1, None)) is None


def test_statistics_sweep_measures_the_profile_of_the_quantize_pass_after_it(tiny, tmp_path):
    passes = [{"stats": {}}, {"quantize": {"bits_budget": 3.5, "bit_choices": "2,4", "group_size": 32}}]
    fused, lines = run(pipeline(tmp_path, tiny, passes, "fused"), fuse=True)
    separate, _ = run(pipeline(tmp_path, tiny, passes, "separate"), fuse=False)
    assert any("also measures the bit-allocation profile" in line for line in lines), lines
    assert model_digest(fused) == model_digest(separate)
    assert "reused from --stats" in (fused / "reports" / "step2_quantize" / "report.md").read_text()
    assert "reused from --stats" not in (separate / "reports" / "step2_quantize" / "report.md").read_text()



def _run_cli(path: Path, nproc: int):
    import os
    import subprocess
    import sys

    if nproc == 1:
        cmd = [sys.executable, "-m", "moecompress", "run", str(path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "-m", "moecompress", "run", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=path.parent, env=env)


def test_a_fused_pipeline_under_two_gloo_ranks_writes_the_bytes_of_one_process(tiny, tmp_path):
    """torchrun moecompress run: the statistics on every rank, prune + quantize in one sweep with the
    experts split between the ranks, rank 0 writing; the same bytes as one process at one thread."""
    passes = [{"stats": {}}, {"prune": {"method": "reap", "num_experts": 2}}, {"quantize": {"bits": 4, "group_size": 32}}]
    outputs = {}
    for nproc in (1, 2):
        p = pipeline(tmp_path, tiny, passes, f"out{nproc}")
        done = _run_cli(p.path, nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (done.stdout + done.stderr).count("report.md") == 1  # rank 0 speaks, once
        outputs[nproc] = Path(p.export["output"])
    assert model_digest(outputs[1]) == model_digest(outputs[2])
    leftovers = sorted(q.name for q in tmp_path.iterdir() if q.suffix != ".yaml")
    assert leftovers == ["out1", "out2"]  # the other rank wrote nothing beside OUT


@pytest.mark.parametrize("passes, reason", [
    ([{"prune": {"method": "reap", "num_experts": 2}}], "not followed by quantize"),
    ([{"compress_experts": {}}], "runs in one process"),
    ([{"prune": {"method": "reap", "num_experts": 2, "eval_data": "x.txt"}}, {"quantize": {"bits": 4}}], "evaluates its own output"),
])
def test_pipelines_that_would_read_a_model_only_rank_0_wrote_cannot_run_under_torchrun(tiny, tmp_path, passes, reason):
    from moecompress.pipeline.run import distributed_blocker

    blocker = distributed_blocker(pipeline(tmp_path, tiny, passes, "p"))
    assert blocker is not None and reason in blocker


def test_stats_and_fused_passes_can_run_under_torchrun(tiny, tmp_path):
    from moecompress.pipeline.run import distributed_blocker

    passes = [{"stats": {}}, {"merge": {"num_experts": 2}}, {"quantize": {"bits": 4}}]
    assert distributed_blocker(pipeline(tmp_path, tiny, passes, "p")) is None
