"""Expert parallelism: ``torchrun --nproc-per-node 2 -m moecompress quantize`` (gloo, CPU) writes the
same bytes as one process, each rank solving about half of every layer's experts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_util import free_port
from tokenizer_util import save_tiny_tokenizer

from moecompress.model.tiny import save_tiny_model
from moecompress.passes.quantize import expert_owners


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}



def _quantize(model: Path, out: Path, nproc: int, extra: list[str]) -> subprocess.CompletedProcess:
    args = ["quantize", str(model), str(out), "--bits", "4", "--group-size", "32", "--calib", str(model / "calib.txt"),
            "--nsamples", "8", "--seqlen", "32", "--batch-size", "4", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "moecompress", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "-m", "moecompress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=model.parent, env=env)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist") / "model"
    save_tiny_model("qwen3_moe", folder)
    save_tiny_tokenizer(folder)
    words = " ".join(f"token{i % 97} word{i % 13}" for i in range(4000))
    (folder / "calib.txt").write_text(words)
    return folder


@pytest.mark.parametrize("extra", [[], ["--bits-budget", "3.5", "--bit-choices", "2,4,8", "--json"]], ids=["uniform", "mixed"])
def test_two_gloo_ranks_write_the_bytes_of_one_process(model, tmp_path, extra):
    one = _quantize(model, tmp_path / "one", 1, extra)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _quantize(model, tmp_path / "two", 2, extra)
    assert two.returncode == 0, two.stderr[-3000:]  # also without --json: the other rank prints nothing
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    if "--json" in extra:
        assert json.loads(two.stdout.strip().splitlines()[-1])["command"] == "quantize"  # rank 0 speaks, once
    else:
        assert (two.stdout + two.stderr).count("report.md") == 1  # rank 0 speaks, once
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("one", "two")]
    assert leftovers == []  # the other rank wrote nothing beside OUT


def test_owners_split_a_layers_experts_by_cost():
    from moecompress.model.tiny import build_tiny_model
    from moecompress.model.view import describe_model
    from moecompress.passes.quantize import QuantizeConfig

    view = describe_model(build_tiny_model("qwen3_moe"))
    experts = next(iter(view.blocks.values())).experts
    n = experts.num_experts
    groups = {(4, "gptq"): list(range(n - 2)), (4, "rtn"): [n - 2, n - 1]}
    counts = [100] * n
    owner = expert_owners(groups, counts, 1000, experts, QuantizeConfig(calibrate_all_experts=False), 2)
    gptq_split = [owner[e] for e in range(n - 2)]
    assert abs(gptq_split.count(0) - gptq_split.count(1)) <= 1
    assert expert_owners(groups, counts, 1000, experts, QuantizeConfig(), 1) == [0] * n
