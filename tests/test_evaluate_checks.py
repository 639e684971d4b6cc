"""Evaluation refuses bad options and corrupt weights with one line, before reading or computing anything."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from moecompress.errors import MoeCompressError
from moecompress.evaluate import check_eval_options, evaluate
from moecompress.model.tiny import save_tiny_model

sys.path.insert(0, str(Path(__file__).parent / "cli"))
from tokenizer_util import save_tiny_tokenizer  # noqa: E402  (the CLI tests' tiny tokenizer)


@pytest.mark.parametrize(
    "seqlen, max_tokens, batch_size, message",
    [
        (1, None, 8, "--seqlen must be at least 2 (an integer: tokens per chunk), got 1"),
        (16.5, None, 8, "--seqlen must be at least 2 (an integer: tokens per chunk), got 16.5"),
        (16, None, 0, "--batch-size must be at least 1 (an integer: chunks per forward), got 0"),
        (16, 8, 8, "--max-tokens must be at least one chunk of --seqlen 16 (an integer), got 8"),
        (16, float("nan"), 8, "--max-tokens must be at least one chunk of --seqlen 16 (an integer), got nan"),
    ],
)
def test_bad_options_are_refused_before_the_files_are_read(tmp_path, seqlen, max_tokens, batch_size, message):
    with pytest.raises(MoeCompressError) as info:
        check_eval_options(seqlen, max_tokens, batch_size)
    assert str(info.value) == message
    with pytest.raises(MoeCompressError, match="--"):  # neither folder nor file exists: the options fail first
        evaluate(tmp_path / "no-model", tmp_path / "no-data.txt", seqlen=seqlen, max_tokens=max_tokens, batch_size=batch_size)


def test_nan_weights_are_refused_instead_of_a_nan_perplexity(tmp_path):
    src = tmp_path / "src"
    save_tiny_model("qwen3_moe", src, seed=0)
    state = load_file(str(src / "model.safetensors"))
    state["lm_head.weight"][5, 7] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    save_tiny_tokenizer(src)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    with pytest.raises(MoeCompressError, match=r"tensor lm_head\.weight holds NaN/Inf values; the checkpoint is corrupt"):
        evaluate(src, text, seqlen=16)
