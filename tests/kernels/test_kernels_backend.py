"""Backend selector, dispatch, config table, and importing the package without triton."""

import json
import subprocess
import sys

import pytest
import torch

import moecompress.kernels.dispatch as kernels
from moecompress.errors import MoeCompressError
from moecompress.kernels import config_table
from moecompress.kernels.synthetic import random_expert_group, random_packed, random_routing


def test_env_forces_backend(monkeypatch):
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    assert kernels.get_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv(kernels.BACKEND_ENV, "TRITON")  # case-insensitive
    assert kernels.get_backend(torch.zeros(1)) == "triton"  # CPU tensors allowed: the interpreter is on


def test_invalid_env_value_raises(monkeypatch):
    monkeypatch.setenv(kernels.BACKEND_ENV, "cuda")
    with pytest.raises(MoeCompressError, match="not a kernel backend"):
        kernels.get_backend()


def test_forced_triton_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MoeCompressError, match="TRITON_INTERPRET"):
        kernels.get_backend(torch.zeros(1))


def test_default_backend_follows_device(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert kernels.get_backend(torch.zeros(1)) == "torch"  # CPU inputs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels.get_backend(torch.device("cuda", 0)) == "triton"
    assert kernels.get_backend(torch.device("cpu")) == "torch"


def test_dispatch_runs_the_selected_backend(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    w = random_packed((48, 64), 4, 32, True, generator)
    x = torch.randn(3, 64, generator=generator)
    groups = [random_expert_group([0, 1, 2, 3], 64, 32, 3, 32, generator)]
    ids, weights = random_routing(3, 4, 2, generator)
    calls = []
    monkeypatch.setattr(kernels, "dequant_gemm_reference", lambda *a: calls.append("torch-dense") or 0)
    monkeypatch.setattr(kernels, "moe_experts_forward", lambda *a: calls.append("triton-moe") or 0)
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    kernels.dequant_gemm_dispatch(x, w.qweight, w.scales, w.zeros, 4, 32)
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    kernels.moe_experts_dispatch(x[:, :64], ids, weights, groups, 4)
    assert calls == ["torch-dense", "triton-moe"]
    monkeypatch.undo()
    # Both real backends agree through the public helpers.
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    ref = kernels.packed_linear_forward(x, w)
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    torch.testing.assert_close(kernels.packed_linear_forward(x, w), ref, rtol=1e-5, atol=1e-5)


def test_config_buckets_and_user_table(monkeypatch, tmp_path):
    assert config_table.select_config("dequant_gemm", 1, "cpu")["BLOCK_M"] == 1
    assert config_table.select_config("dequant_gemm", 17, "cpu")["kernel"] == "tiled"
    assert config_table.select_config("moe", 1, "cpu")["decode"] is True
    assert config_table.select_config("moe", 10_000, "cpu")["decode"] is False
    user = {"devices": {"cpu": {"dequant_gemm": {"8": {"kernel": "tiled", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}}}}}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(user))
    monkeypatch.setenv(config_table.USER_TABLE_ENV, str(path))
    assert config_table.select_config("dequant_gemm", 3, "cpu")["BLOCK_N"] == 16  # tuned entry wins
    assert config_table.select_config("dequant_gemm", 300, "cpu")["BLOCK_N"] == 16  # past the last bound
    assert config_table.select_config("moe", 1, "cpu")["decode"] is True  # falls back to the default
    with pytest.raises(MoeCompressError, match="unknown kernel kind"):
        config_table.select_config("attention", 1, "cpu")


def test_tune_needs_a_gpu():
    from moecompress.kernels.tuning import tune

    with pytest.raises(MoeCompressError, match="GPU"):
        tune()


def test_import_and_torch_path_without_triton():
    """Block triton: the package imports, the backend is torch, the torch path computes."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, moecompress.kernels as k\n"
        "from moecompress.kernels.synthetic import random_packed\n"
        "w = random_packed((8, 64), 4, 32, False, torch.Generator().manual_seed(0))\n"
        "assert k.get_backend() == 'torch'\n"
        "y = k.packed_linear_forward(torch.ones(2, 64), w)\n"
        "assert y.shape == (2, 8) and y.abs().sum() > 0\n"
        "assert sys.modules['triton'] is None\n"
    )
    env = {"PATH": "/usr/bin:/bin", "MOECOMPRESS_KERNEL": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
