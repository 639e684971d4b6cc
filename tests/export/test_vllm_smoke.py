"""benchmarks/vllm_smoke.py is never a test requirement: only its skip path runs here (no GPU, or no
vllm), as one JSON line and exit status 0."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm_smoke.py"


@pytest.fixture
def smoke():
    spec = importlib.util.spec_from_file_location("vllm_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(smoke, capsys) -> tuple[int, list[dict]]:
    code = smoke.main([])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_no_gpu_prints_one_skipped_line_and_exits_0(smoke, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, lines = _run(smoke, capsys)
    assert code == 0 and lines == [{"skipped": "no CUDA GPU on this machine (vLLM needs one)"}]


def test_no_vllm_prints_one_skipped_line_and_exits_0(smoke, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    code, lines = _run(smoke, capsys)
    assert code == 0 and lines == [{"skipped": "vllm is not installed (pip install vllm)"}]
