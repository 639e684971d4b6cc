"""Pipelines: every example runs on a tiny model, bad YAML is refused with a location, runs are
atomic (a killed run leaves no OUT) and deterministic (same seed -> same checkpoint bytes)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tokenizer_util import save_tiny_model_with_tokenizer
from typer.testing import CliRunner

from moecompress.cli.main import app

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "pipelines").glob("*.yaml"))
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny") / "qwen3")


def shrink_for_tiny(doc: dict, model: Path, out: Path) -> dict:
    """The example with the tiny model, a tiny calibration budget and group sizes that fit H=64."""
    doc["model"] = str(model)
    doc["calibration"] = {"source": "mixed", "nsamples": 4, "seqlen": 32, "seed": 0}
    for item in doc["passes"]:
        (name, fields), = item.items()
        if name == "quantize":
            fields["group_size"] = 32
        if name == "compress_experts":
            fields["fit_steps"] = 5
        if name == "merge":
            fields["num_experts"] = 2  # the tiny model has 4 experts
    doc["export"]["output"] = str(out)
    return doc


def write(tmp_path: Path, doc: dict | str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_example_pipeline_runs_on_tiny_model(example, tiny, tmp_path):
    out = tmp_path / "out"
    doc = shrink_for_tiny(yaml.safe_load(example.read_text()), tiny, out)
    result = runner.invoke(app, ["run", str(write(tmp_path, doc))])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists() and (out / "report.md").exists() and (out / "pipeline.yaml").exists()
    assert not list(tmp_path.glob(".out.moecompress-stage-*")), "staging folder left behind"


BAD_CASES = {
    "unknown pass": ("model: M\npasses:\n  - squash: {}\nexport: {output: O}\n", 3, "unknown pass 'squash'"),
    "unknown field": ("model: M\npasses:\n  - quantize: {bitz: 4}\nexport: {output: O}\n", 3, "unknown field 'bitz'"),
    "wrong type": ("model: M\npasses:\n  - quantize:\n      bits: four\nexport: {output: O}\n", 4, "must be an integer"),
    "missing model": ("passes:\n  - quantize: {bits: 4}\nexport: {output: O}\n", 1, "missing 'model'"),
    "two exports": ("model: M\npasses:\n  - quantize: {bits: 4}\nexport: {output: O}\nexport: {output: P}\n", 5, "given twice"),
    "prune after quantize": ("model: M\npasses:\n  - quantize: {bits: 4}\n  - prune: {method: reap}\nexport: {output: O}\n", 4, "cannot run after quantize"),
    "prune after exact merge": ("model: M\npasses:\n  - merge: {num_experts: 2, router: exact}\n  - prune: {method: reap}\nexport: {output: O}\n", 4, "cannot read the expert -> group map"),
    "exact merge to hf": ("model: M\npasses:\n  - merge: {num_experts: 2, router: exact}\nexport: {format: hf, output: O}\n", 3, "cannot hold"),
    "unknown top key": ("model: M\nmodle: x\npasses:\n  - quantize: {}\nexport: {output: O}\n", 2, "unknown key 'modle'"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_pipeline_gives_one_line_with_location(case, tiny, tmp_path):
    text, line, message = BAD_CASES[case]
    text = text.replace("model: M", f"model: {tiny}").replace("output: O", f"output: {tmp_path / 'o'}").replace("output: P", f"output: {tmp_path / 'p'}")
    path = write(tmp_path, text)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.output
    assert f"{path}:{line}:" in result.output.replace("\n", "") or f"{path}:" in result.output
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def quantize_doc(model: Path, out: Path, nsamples: int = 8) -> dict:
    return {
        "model": str(model),
        "calibration": {"source": "mixed", "nsamples": nsamples, "seqlen": 32, "seed": 1},
        "passes": [{"quantize": {"bits": 4, "group_size": 32}}],
        "export": {"output": str(out)},
    }


def test_same_seed_gives_identical_checkpoint_bytes(tiny, tmp_path):
    digests = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        result = runner.invoke(app, ["run", str(write(tmp_path, quantize_doc(tiny, out), f"p{i}.yaml"))])
        assert result.exit_code == 0, result.output
        digests.append(folder_digest(out))
    assert digests[0] == digests[1]


def test_killed_run_leaves_no_output_and_rerun_completes(tiny, tmp_path):
    out = tmp_path / "out"
    path = write(tmp_path, quantize_doc(tiny, out, nsamples=64))
    cmd = [sys.executable, "-m", "moecompress.cli.main", "run", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "TRITON_INTERPRET": "0"})
    deadline = time.time() + 120
    # Kill it once it is working (its staging folder exists), before it finishes.
    while time.time() < deadline and not list(tmp_path.glob(".out.moecompress-stage-*")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.moecompress-stage-*")), "staging folder left behind after SIGTERM"
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists()


def test_dry_run_does_no_work(tiny, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(write(tmp_path, quantize_doc(tiny, out))), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "quantize" in result.output and not out.exists()


def test_single_command_saves_the_pipeline_it_ran(tiny, tmp_path):
    out, saved = tmp_path / "q", tmp_path / "saved.yaml"
    result = runner.invoke(app, ["quantize", str(tiny), str(out), "--bits", "4", "--group-size", "32", "--method", "rtn", "--save-pipeline", str(saved)])
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(saved.read_text())
    assert doc["passes"] == [{"quantize": {"group_size": 32, "method": "rtn"}}] and doc["model"] == str(tiny)
    # The saved pipeline reproduces the same checkpoint.
    doc["export"]["output"] = str(tmp_path / "again")
    result = runner.invoke(app, ["run", str(write(tmp_path, doc, "again.yaml"))])
    assert result.exit_code == 0, result.output
    assert folder_digest(out) == folder_digest(tmp_path / "again")
