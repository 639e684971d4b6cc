"""`--calib sample`: rows sampled from the model are deterministic, the right shape, and never hold excluded ids."""

from __future__ import annotations

import pytest
import torch

from moecompress.calibration.sampling import sample_generate
from moecompress.calibration.sources import load_calibration
from moecompress.errors import CalibrationError
from moecompress.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("qwen3_moe").eval()


def test_sampled_rows_are_deterministic_and_leave_the_global_rng_alone(model):
    state = torch.random.get_rng_state()
    a = load_calibration("sample", None, 5, 12, seed=3, model=model)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = load_calibration("sample", None, 5, 12, seed=3, model=model)
    c = load_calibration("sample", None, 5, 12, seed=4, model=model)
    assert a.input_ids.shape == (5, 12) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert "sampled from the model" in a.source


def test_excluded_and_padding_ids_are_never_sampled(model):
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = sample_generate(model, 4, 16, seed=0, vocab_exclude=[0, 1, 2], vocab_limit=vocab - 10, batch_size=3)
    ids = rows.input_ids
    assert ids.shape == (4, 16)
    assert not torch.isin(ids, torch.tensor([0, 1, 2])).any() and int(ids.max()) < vocab - 10


def test_sample_needs_the_model():
    with pytest.raises(CalibrationError, match="generates text with the model"):
        load_calibration("sample", None, 2, 8)
