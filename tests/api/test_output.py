"""The output contract (moecompress.api.output), clause by clause, on plain folders.

OUT is never an input or above/inside one; everything is staged beside OUT; the swap is atomic;
what killed runs leave is cleaned (or restored) by the next run; nothing is written on refusal.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moecompress.api import output as contract
from moecompress.api.output import OutputError, OutputFolder, clean_leftovers


def names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("relation", ["same", "inside", "above"])
def test_out_may_not_be_an_input_inside_one_or_above_one(tmp_path, relation):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    out = {"same": model, "inside": model / "q", "above": tmp_path / "models"}[relation]
    output = OutputFolder(out, overwrite=True, inputs=[("model", model)])
    with pytest.raises(OutputError, match="model"):
        output.check()
    with pytest.raises(OutputError):
        output.open_stage()
    assert (model / "config.json").read_text() == "{}" and names(tmp_path / "models") == ["m"]


def test_symlinked_paths_are_compared_after_resolving(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(OutputError, match="is the model itself"):
        OutputFolder(tmp_path / "link", True, [("model", model)]).check()


def test_existing_out_needs_overwrite_and_a_file_is_never_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="--overwrite"):
        OutputFolder(tmp_path / "out").check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        OutputFolder(tmp_path / "file", overwrite=True).check()
    assert (tmp_path / "file").read_text() == "x"


def test_a_parent_that_is_a_file_is_refused_before_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        OutputFolder(tmp_path / "a_file" / "out").check()


def test_unwritable_parent_is_refused_before_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(OutputError, match="no write permission"):
            OutputFolder(locked / "out").check()
    finally:
        locked.chmod(0o700)


def test_staging_appears_only_on_commit_and_failure_keeps_the_old_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with OutputFolder(out, overwrite=True).staged() as stage:
            assert stage.parent == tmp_path and stage.name.startswith(".out.moecompress-stage-")
            (stage / "half").write_text("x")
            raise RuntimeError("boom")
    assert names(tmp_path) == ["out"] and names(out) == ["old.txt"]
    with OutputFolder(out, overwrite=True).staged() as stage:
        (stage / "new.txt").write_text("new")
        assert names(out) == ["old.txt"]
    assert names(tmp_path) == ["out"] and names(out) == ["new.txt"]


def test_the_swap_without_an_atomic_exchange_still_ends_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(contract, "_exchange", lambda a, b: False)  # non-Linux: two renames
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with OutputFolder(out, overwrite=True).staged() as stage:
        (stage / "new.txt").write_text("new")
    assert names(tmp_path) == ["out"] and names(out) == ["new.txt"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_killed_runs_are_removed_or_restored(tmp_path):
    pid = _dead_pid()
    out = tmp_path / "out"
    stale = tmp_path / f".out.moecompress-stage-{pid}-abcd"
    stale.mkdir()
    (stale / "layer-00000.safetensors").write_text("half")
    # A kill between the two renames of the non-atomic swap: OUT is gone, the old one is aside.
    aside = tmp_path / f".out.moecompress-old-{pid}-abcd"
    aside.mkdir()
    (aside / "config.json").write_text("old")
    live = tmp_path / f".out.moecompress-stage-{os.getpid()}-beef"  # a running job's: never touched
    live.mkdir()
    lines = clean_leftovers(out, echo=lambda line: None)
    assert len(lines) == 2 and any("restored" in line for line in lines)
    assert (out / "config.json").read_text() == "old"
    assert names(tmp_path) == sorted([".out.moecompress-stage-%d-beef" % os.getpid(), "out"])


def test_a_new_run_cleans_a_killed_runs_staging_folder(tmp_path):
    stale = tmp_path / f".out.moecompress-stage-{_dead_pid()}-0000"
    stale.mkdir()
    with OutputFolder(tmp_path / "out").staged() as stage:
        (stage / "x").write_text("x")
    assert names(tmp_path) == ["out"]


def test_unwritable_parent_message_without_real_permissions(tmp_path, monkeypatch):
    """Root ignores permission bits, so the refusal is also checked with os.access answering no."""
    monkeypatch.setattr(contract, "can_write_in", lambda folder: False)
    with pytest.raises(OutputError, match="no write permission"):
        OutputFolder(tmp_path / "deeper" / "out").check()
    assert names(tmp_path) == []
