"""`moecompress inspect`: JSON and table output, and one-line errors (exit code 2) for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.model.tiny import save_tiny_model, tiny_config

JSON_KEYS = (
    "model_type",
    "num_layers",
    "moe_layers",
    "num_experts",
    "top_k",
    "has_shared_experts",
    "params_total",
    "params_routed_experts",
    "params_active",
)


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_mixtral")
    save_tiny_model("mixtral", folder, seed=0)
    return folder


def _expected_mixtral() -> dict:
    """The JSON values for the tiny Mixtral, computed from its config (not from the library)."""
    cfg = tiny_config("mixtral")
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    layers, vocab = cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_expert = 3 * h * i
    per_layer = (2 * h * h + 2 * h * kv) + 2 * h + e * h + e * per_expert
    total = 2 * vocab * h + h + layers * per_layer
    return {
        "model_type": "mixtral",
        "num_layers": layers,
        "moe_layers": list(range(layers)),
        "num_experts": e,
        "top_k": k,
        "has_shared_experts": False,
        "params_total": total,
        "params_routed_experts": layers * e * per_expert,
        "params_active": total - layers * (e - k) * per_expert,
    }


def test_inspect_json(runner, mixtral_folder):
    result = runner.invoke(app, ["inspect", str(mixtral_folder), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    for key in JSON_KEYS:
        assert key in data, key
    assert {k: data[k] for k in JSON_KEYS} == _expected_mixtral()


def test_inspect_table(runner, mixtral_folder):
    result = runner.invoke(app, ["inspect", str(mixtral_folder)])
    assert result.exit_code == 0, result.output
    for text in ("mixtral", "4 / 2", "softmax", "concatenated, out-in", f"{_expected_mixtral()['params_total']:,}"):
        assert text in result.output, text


# ---- bad input: one line, exit code 2, no traceback -------------------------------------------------


def _missing(tmp_path):
    return tmp_path / "does_not_exist"


def _no_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path


def _corrupt_weights(tmp_path, mixtral_folder):
    (tmp_path / "config.json").write_text((mixtral_folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    return tmp_path


def _dense(tmp_path):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    return tmp_path


def _unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    return tmp_path


def _config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    return tmp_path


BAD = {
    "missing_folder": (lambda tmp, mix: _missing(tmp), "does not exist"),
    "no_config": (lambda tmp, mix: _no_config(tmp), "no config.json"),
    "corrupt_safetensors": (_corrupt_weights, "corrupt or not safetensors"),
    "dense_model": (lambda tmp, mix: _dense(tmp), "no mixture-of-experts layers"),
    "unknown_architecture": (lambda tmp, mix: _unknown_architecture(tmp), "not_a_model"),
    "config_without_model_type": (lambda tmp, mix: _config_without_model_type(tmp), "config.json"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_bad_input_is_one_line_and_exit_code_2(runner, tmp_path, mixtral_folder, case, as_json):
    make, needle = BAD[case]
    folder = make(tmp_path, mixtral_folder)
    result = runner.invoke(app, ["inspect", str(folder)] + (["--json"] if as_json else []))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert needle in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""  # errors go to stderr; stdout stays parseable
