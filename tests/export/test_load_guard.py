"""The load guard: a native checkpoint loaded without moecompress registered fails loudly, never with
random experts; with moecompress it loads exactly as before (the guard is invisible).

The plain load runs in a subprocess that never imports moecompress (this process has, and the
quantizer registration cannot be undone)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moecompress  # noqa: F401  (registers quant_method "moecompress")
from moecompress.api.quantize import quantize_job
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import TINY_CONFIGS, save_tiny_model
from moecompress.passes.quantize import QuantizeConfig
from moecompress.quant.hf_integration import GUARD_SHARD

PLAIN_LOAD = textwrap.dedent("""
    import sys
    from transformers import AutoModelForCausalLM
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
    except RuntimeError as error:
        print("REFUSED", error)
        sys.exit(0)
    print("LOADED")
    sys.exit(1)
""")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _quantized(tmp_path, family: str, **cfg):
    src, out = tmp_path / "src", tmp_path / "out"
    save_tiny_model(family, src)
    quantize_job(src, out, QuantizeConfig(bits=4, group_size=32, method="rtn", **cfg), None, {"source": "none (rtn)"})
    return src, out


def _plain_load(folder) -> subprocess.CompletedProcess:
    # -I: no user site, no PYTHON* variables; the cwd is the checkpoint, so nothing of the repo is on the path.
    return subprocess.run([sys.executable, "-I", "-c", PLAIN_LOAD, str(folder)], capture_output=True, text=True,
                          cwd=folder, timeout=300)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_plain_transformers_refuses_instead_of_random_experts(tmp_path, family):
    _, out = _quantized(tmp_path, family)
    done = _plain_load(out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REFUSED" in done.stdout and "ignore_mismatched_sizes" in done.stdout
    assert "moecompress" in done.stderr  # transformers' "Unknown quantization type, got moecompress" warning


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_every_replaced_parameter_is_guarded_and_moecompress_loads_unchanged(tmp_path, family):
    _, out = _quantized(tmp_path, family)
    with safe_open(str(out / GUARD_SHARD), "pt") as f:
        guarded = set(f.keys())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for path in qc["modules"]:  # each replaced experts module has its fused parameters guarded
        assert any(name.startswith(path + ".") for name in guarded), path
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k for k, f in index.items() if f == GUARD_SHARD} == guarded

    lm = LayerwiseModel(out)  # our loader never reads the guard shard
    assert not guarded & set(lm.checkpoint.keys())
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert not guarded & set(model.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(ids).logits).all()


def test_packed_attention_is_guarded_too(tmp_path):
    _, out = _quantized(tmp_path, "qwen3_moe", attention_bits=8)
    with safe_open(str(out / GUARD_SHARD), "pt") as f:
        guarded = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in guarded
    assert "REFUSED" in _plain_load(out).stdout
