"""``moecompress eval`` of a compressed-tensors export transformers would load wrong (per-layer widths,
HF201) evaluates every module decompressed with its own scheme: the fake-quantized model's logits,
where plain ``from_pretrained`` gives other ones."""

from __future__ import annotations

import pytest
import torch
from test_export_matrix import IDS, build, load, logits

from moecompress.evaluate import load_for_eval
from moecompress.export.decompress import transformers_loads_exactly


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_per_layer_mixed_export_is_evaluated_as_vllm_computes_it(tmp_path):
    built = build("qwen3_moe", "mixed_layer", tmp_path)
    folder = built.compressed()
    exact, rule = transformers_loads_exactly(folder)
    assert not exact and rule.startswith("HF201")
    how: list[str] = []
    model, _ = load_for_eval(folder, how)
    assert how == ["decompressed per module (HF201: transformers would load it wrong)"]
    torch.testing.assert_close(logits(model, IDS), built.reference, rtol=0, atol=1e-4)
    wrong = (logits(load(folder), IDS) - built.reference).abs().max()  # what from_pretrained alone gives
    assert wrong > 1e-3


def test_uniform_export_still_loads_through_transformers(tmp_path):
    folder = build("qwen3_moe", "uniform4", tmp_path).compressed()
    how: list[str] = []
    load_for_eval(folder, how)
    assert transformers_loads_exactly(folder) == (True, "") and how == ["from_pretrained"]
