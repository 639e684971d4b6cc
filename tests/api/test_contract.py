"""The output contract and "no silent wrong result", through the real commands.

Each test creates the failure (OUT == MODEL, OUT above MODEL, SIGKILL mid-write, a missing or
foreign tokenizer, a bad --save-pipeline path, an unwritable parent) and asserts on the files left
and the one line printed; the last tests check that two runs give byte-identical output folders.
"""

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
from tokenizer_util import save_tiny_model_with_tokenizer, save_tiny_tokenizer
from typer.testing import CliRunner

from moecompress.api import output as contract
from moecompress.cli.main import app
from moecompress.model.tiny import save_tiny_model

runner = CliRunner()
FAST_QUANT = ["--method", "rtn", "--group-size", "32"]
CALIB = ["--nsamples", "4", "--seqlen", "16"]


def digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("contract") / "model")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, contains: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and contains in lines[0], result.stderr
    return lines[0]


def commands(model: Path, out: Path) -> dict[str, list]:
    return {
        "quantize": ["quantize", model, out, *FAST_QUANT, "--overwrite"],
        "prune": ["prune", model, out, "--num-experts", 2, "--no-refit", *CALIB, "--overwrite"],
        "merge": ["merge", model, out, "--num-experts", 2, "--no-refit", "--merge-weights", "frequency", *CALIB, "--overwrite"],
        "stats": ["stats", model, "--calib", "mixed", "--out", out, *CALIB, "--overwrite"],
        "compress-experts": ["compress-experts", model, out, "--fit-steps", 1, *CALIB, "--overwrite"],
    }


@pytest.mark.parametrize("command", ["quantize", "prune", "merge", "stats", "compress-experts", "run"])
@pytest.mark.parametrize("relation", ["same", "above", "inside"])
def test_out_that_is_the_model_above_it_or_inside_it_is_refused_and_the_model_kept(model, tmp_path, command, relation):
    before = digest(model)
    out = {"same": model, "above": model.parent, "inside": model / "out"}[relation]
    if command == "run":
        doc = {"model": str(model), "passes": [{"quantize": {"method": "rtn", "group_size": 32}}],
               "export": {"output": str(out), "overwrite": True}}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
        args = ["run", tmp_path / "p.yaml"]
    else:
        args = commands(model, out)[command]
    one_line_error(run(*args), "output")
    assert digest(model) == before


def test_dry_run_writes_nothing_and_checks_the_parent(model, tmp_path, monkeypatch):
    result = run("quantize", model, tmp_path / "deep" / "out", *FAST_QUANT, "--dry-run")
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(contract, "can_write_in", lambda folder: False)
    one_line_error(run("quantize", model, tmp_path / "out", *FAST_QUANT, "--dry-run"), "no write permission")
    assert list(tmp_path.iterdir()) == []


def test_bad_save_pipeline_path_is_refused_before_any_work(model, tmp_path):
    (tmp_path / "a_folder").mkdir()
    one_line_error(run("quantize", model, tmp_path / "out", *FAST_QUANT, "--save-pipeline", tmp_path / "a_folder"), "folder")
    (tmp_path / "file").write_text("x")
    one_line_error(run("quantize", model, tmp_path / "out", *FAST_QUANT, "--save-pipeline", tmp_path / "file" / "p.yaml"), "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", "file"]


def test_a_model_without_tokenizer_files_is_refused_for_text_calibration(tmp_path):
    save_tiny_model("qwen3_moe", tmp_path / "bare")
    for args in (["quantize", tmp_path / "bare", tmp_path / "q", "--group-size", 32, *CALIB],
                 ["prune", tmp_path / "bare", tmp_path / "p", "--num-experts", 2, *CALIB],
                 ["stats", tmp_path / "bare", "--calib", "mixed", "--out", tmp_path / "s", *CALIB]):
        one_line_error(run(*args), "no tokenizer files")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    folder = tmp_path / "small-vocab"
    save_tiny_model("qwen3_moe", folder, vocab_size=64)
    save_tiny_tokenizer(folder, vocab_size=200)
    one_line_error(run("quantize", folder, tmp_path / "q", "--group-size", 32, *CALIB), "embedding")
    assert not (tmp_path / "q").exists()


_SLOW_CHILD = """
import sys, time
from moecompress.passes.quantize import QuantizePass
original = QuantizePass.process
def slow(self, ctx):
    if ctx.index == 1:
        time.sleep(120)
    return original(self, ctx)
QuantizePass.process = slow
from moecompress.cli.main import main
sys.argv = ["moecompress", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_kill_mid_write_leaves_the_old_out_whole_and_the_next_run_cleans_up(model, tmp_path, sig):
    out = tmp_path / "out"
    assert run("quantize", model, out, "--bits", 8, *FAST_QUANT).exit_code == 0
    old = digest(out)
    child = subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, "quantize", str(model), str(out), *FAST_QUANT, "--overwrite"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.moecompress-stage-*/layer-00000.safetensors")):
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.time() < deadline, "the child never wrote layer 0"
            time.sleep(0.05)
        child.send_signal(sig)
        child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert digest(out) == old, "the old OUT must stay whole"
    stale = list(tmp_path.glob(".out.moecompress-stage-*"))
    assert len(stale) == (1 if sig == signal.SIGKILL else 0)  # SIGTERM cleans up itself
    result = run("quantize", model, out, *FAST_QUANT, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the killed run's staging folder is cleaned"
    assert digest(out) != old


# ------------------------------------------------------------------------------------------------
# Same inputs and seed -> the same bytes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["quantize", *FAST_QUANT],
    ["quantize", "--bits-budget", "3.5", "--bit-choices", "2,4,8", "--group-size", "32", "--method", "rtn", *CALIB],
    ["prune", "--num-experts", 2, "--method", "reap", *CALIB],
    ["merge", "--num-experts", 2, "--router", "exact", *CALIB],
], ids=["quantize", "quantize-mixed", "prune", "merge"])
def test_two_runs_write_byte_identical_folders(model, tmp_path, command):
    name, *options = command
    for first in (True, False):  # the same OUT path twice (the first result moved aside)
        result = run(name, model, tmp_path / "out", *options)
        assert result.exit_code == 0, result.output
        if first:
            (tmp_path / "out").rename(tmp_path / "a")
    a, b = digest(tmp_path / "a"), digest(tmp_path / "out")
    assert a.keys() == b.keys() and a == b, [k for k in a if a[k] != b.get(k)]


def test_two_pipeline_runs_write_byte_identical_folders(model, tmp_path):
    doc = {"model": str(model), "calibration": {"source": "mixed", "nsamples": 4, "seqlen": 16},
           "passes": [{"stats": {}}, {"prune": {"num_experts": 3, "refit": False}}, {"quantize": {"method": "rtn", "group_size": 32}}],
           "export": {"output": str(tmp_path / "out")}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    for first in (True, False):
        result = run("run", tmp_path / "p.yaml")
        assert result.exit_code == 0, result.output
        if first:
            (tmp_path / "out").rename(tmp_path / "a")
    a, b = digest(tmp_path / "a"), digest(tmp_path / "out")
    assert (tmp_path / "out" / "reports" / "step3_quantize" / "report.md").is_file(), "the last pass's report is kept"
    assert a.keys() == b.keys() and a == b, [k for k in a if a[k] != b.get(k)]


def test_merge_with_the_exact_router_and_refit_loads_the_calibration_set_once(model, tmp_path, monkeypatch):
    from moecompress.api import experts

    loads = []
    original = experts.load_for_model

    def counted(*args, **kwargs):
        loads.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(experts, "load_for_model", counted)
    result = run("merge", model, tmp_path / "m", "--num-experts", 2, "--router", "exact", *CALIB)  # RegMean + refit
    assert result.exit_code == 0, result.output
    assert len(loads) == 1
