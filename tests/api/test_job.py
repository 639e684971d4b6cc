"""The job skeleton: labelled progress (a pipeline's pass, a job's phase); which jobs run under torchrun."""

import pytest

from moecompress.api.job import labelled


class Display:
    def __init__(self):
        self.description, self.lines = "", []

    def relabel(self, description):
        self.description = description

    def __call__(self, done, total):
        self.lines.append((self.description, done, total))


def test_labels_nest_and_plain_callbacks_pass_through():
    display = Display()
    step = labelled(display, "[2/2] quantize")
    labelled(step, "profiling")(1, 3)
    step(2, 3)
    labelled(step, "quantizing")(3, 3)
    assert display.lines == [("[2/2] quantize: profiling", 1, 3), ("[2/2] quantize", 2, 3), ("[2/2] quantize: quantizing", 3, 3)]
    assert labelled(None, "x") is None and labelled(print, "x") is print


def test_only_quantize_runs_under_torchrun(monkeypatch, tmp_path):
    """A job whose work is not shared across processes is refused in one line when launched by torchrun."""
    import moecompress.api.job as job_module
    from moecompress.errors import MoeCompressError
    from moecompress.parallel import Ranks

    monkeypatch.setattr(job_module, "init_from_env", lambda: Ranks(0, 2))

    class Prune:
        command = "prune"

        def inputs(self):
            return []

    with pytest.raises(MoeCompressError, match="prune runs in one process: launch it without torchrun"):
        job_module.execute(Prune(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
