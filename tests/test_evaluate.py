"""Perplexity protocol: non-overlapping chunks, last partial chunk dropped, exp(mean NLL) in float32."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from moecompress.errors import MoeCompressError
from moecompress.evaluate import evaluate, folder_bytes, model_memory_bytes, perplexity_of_ids, read_text
from moecompress.api.quantize import quantize_job
from moecompress.model.tiny import build_tiny_model, save_tiny_model
from moecompress.passes.quantize import QuantizeConfig

sys.path.insert(0, str(Path(__file__).parent / "cli"))
from tokenizer_util import save_tiny_tokenizer  # noqa: E402  (the CLI tests' tiny tokenizer)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("olmoe", seed=0)


def manual_perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    """Chunk by chunk, token by token sums: the protocol written out plainly."""
    n = ids.numel() // seqlen
    nll, count = 0.0, 0
    for c in range(n):
        chunk = ids[c * seqlen : (c + 1) * seqlen]
        with torch.no_grad():
            logp = model(input_ids=chunk[None]).logits[0].float().log_softmax(-1)  # [L, V]
        for t in range(seqlen - 1):
            nll -= float(logp[t, chunk[t + 1]])
            count += 1
    return math.exp(nll / count)


def test_perplexity_matches_the_protocol_and_drops_the_partial_chunk(tiny):
    ids = torch.randint(3, 256, (5 * 16 + 7,), generator=torch.Generator().manual_seed(0))
    ppl, tokens, chunks = perplexity_of_ids(tiny, ids, seqlen=16, batch_size=2)
    assert chunks == 5 and tokens == 5 * 15
    assert ppl == pytest.approx(manual_perplexity(tiny, ids, 16), rel=1e-5)
    # batching does not change the number; a random model is near-uniform over 256 tokens
    assert perplexity_of_ids(tiny, ids, seqlen=16, batch_size=5)[0] == pytest.approx(ppl, rel=1e-5)
    assert 100 < ppl < 600


def test_too_few_tokens_for_one_chunk_is_an_error(tiny):
    with pytest.raises(MoeCompressError, match="fewer than one chunk"):
        perplexity_of_ids(tiny, torch.arange(10), seqlen=16)


def test_read_text_errors(tmp_path):
    with pytest.raises(MoeCompressError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(MoeCompressError, match="empty"):
        read_text(tmp_path / "empty.txt")


def test_evaluate_a_folder_dense_and_packed(tmp_path):
    src = tmp_path / "src"
    save_tiny_model("qwen3_moe", src, seed=0)
    tokenizer = save_tiny_tokenizer(src)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. def add(a, b): return a + b\n" * 30)
    n_ids = len(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])

    dense = evaluate(src, text, seqlen=32)
    assert dense.chunks == n_ids // 32 and dense.tokens == dense.chunks * 31
    assert math.isfinite(dense.ppl) and dense.ppl > 1
    assert dense.disk_bytes == folder_bytes(src) > 0
    assert set(dense.as_json()) >= {"ppl", "tokens", "chunks", "seconds", "disk_bytes", "memory_bytes"}
    assert evaluate(src, text, seqlen=32, max_tokens=64).tokens == 2 * 31

    result, _ = quantize_job(src, tmp_path / "q", QuantizeConfig(bits=4, group_size=32, method="rtn"), None, {})
    packed = evaluate(result.out, text, seqlen=32)
    assert packed.tokens == dense.tokens and math.isfinite(packed.ppl)
    assert packed.memory_bytes < dense.memory_bytes and packed.disk_bytes < dense.disk_bytes
    assert packed.ppl == pytest.approx(dense.ppl, rel=0.1)  # 4-bit experts barely move a random model

    with pytest.raises(MoeCompressError, match="exceeds the model's maximum"):
        evaluate(src, text, seqlen=512)  # tiny models have 256 positions
    with pytest.raises(MoeCompressError, match="at least 2"):
        evaluate(src, text, seqlen=1)


def test_evaluate_needs_a_tokenizer_and_a_model_folder(tmp_path):
    src = tmp_path / "src"
    save_tiny_model("mixtral", src, seed=0)
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 50)
    with pytest.raises(MoeCompressError, match="no tokenizer"):
        evaluate(src, text)
    with pytest.raises(MoeCompressError, match="does not exist"):
        evaluate(tmp_path / "nowhere", text)


def test_model_memory_bytes_counts_shared_storage_once():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    model.register_buffer("extra", torch.zeros(3, dtype=torch.int32))
    assert model_memory_bytes(model) == 10 * 4 * 4 + 3 * 4
