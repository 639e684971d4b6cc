"""Hub model ids where a folder is expected: fetched when reachable, one clear line when not."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.errors import MoeCompressError
from moecompress.model import hub
from moecompress.model.tiny import save_tiny_model


def test_existing_folders_and_paths_are_never_treated_as_hub_ids(tmp_path):
    assert hub.resolve_model(tmp_path) == tmp_path
    assert not hub.looks_like_hub_id("/abs/path/model") and not hub.looks_like_hub_id("a/b/c")
    assert hub.looks_like_hub_id("Qwen/Qwen1.5-MoE-A2.7B")


def test_an_unreachable_hub_id_is_one_line_naming_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoeCompressError, match="Hugging Face Hub.*hf download"):
        hub.resolve_model("nobody-here/no-such-model")
    result = CliRunner().invoke(app, ["inspect", "nobody-here/no-such-model"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "Hugging Face Hub" in result.stderr


def test_a_reachable_hub_id_is_read_from_its_snapshot(tmp_path, monkeypatch):
    save_tiny_model("qwen3_moe", tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "snapshot")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    result = CliRunner().invoke(app, ["inspect", "org/tiny-moe", "--json"])
    assert result.exit_code == 0, result.output
    assert calls and calls[0][0] == "org/tiny-moe" and "*.safetensors" in calls[0][1]
    assert '"model_type": "qwen3_moe"' in result.stdout
