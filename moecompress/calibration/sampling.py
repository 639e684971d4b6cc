"""``--calib sample``: calibration text sampled from the model itself (plain ancestral sampling).

When no text close to the model's own training data is at hand, the model's samples are: each row
starts from one token drawn uniformly from the allowed vocabulary, then ``seqlen - 1`` tokens are
sampled at temperature 1 with no top-k / top-p truncation, so the rows follow the model's own
distribution (the data-free calibration of LLM-QAT, arXiv 2305.17888). Compared with ``self``
(EBSS), nothing steers the expert load: the experts are exercised as the model's own text exercises
them. Special tokens and logit-padding ids past the tokenizer are never sampled.

Deterministic for a seed: the sampling runs inside ``torch.random.fork_rng`` seeded with ``seed``, so
the caller's global RNG is left as it was.
"""

from __future__ import annotations

import torch

from moecompress.calibration.types import CalibrationSet
from moecompress.errors import CalibrationError


def _allowed_ids(vocab_size: int, exclude: list[int] | None, limit: int | None) -> torch.Tensor:
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    if limit is not None and limit < vocab_size:
        allowed[limit:] = False
    for token in exclude or []:
        if 0 <= token < vocab_size:
            allowed[token] = False
    if not allowed.any():
        raise CalibrationError("no token is left to sample from after removing the special tokens")
    return allowed


@torch.no_grad()
def sample_generate(
    model,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    vocab_exclude: list[int] | None = None,
    vocab_limit: int | None = None,
    batch_size: int = 16,
):
    """``nsamples`` rows of ``seqlen`` tokens sampled from ``model`` -> :class:`CalibrationSet`."""
    vocab = model.get_output_embeddings().weight.shape[0]
    allowed = _allowed_ids(vocab, vocab_exclude, vocab_limit)
    banned = (~allowed).float() * -1e9  # added to the logits: banned ids get probability ~0
    ids = allowed.nonzero().squeeze(-1)
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        first = ids[torch.randint(len(ids), (nsamples,))]
        for start in range(0, nsamples, batch_size):
            tokens = first[start : start + batch_size, None]
            out = model(input_ids=tokens, use_cache=True)
            past = out.past_key_values
            for _ in range(seqlen - 1):
                logits = out.logits[:, -1, :].float() + banned
                nxt = torch.multinomial(logits.softmax(dim=-1), 1)
                tokens = torch.cat([tokens, nxt], dim=1)
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
            rows.append(tokens)
    input_ids = torch.cat(rows).long()
    return CalibrationSet(input_ids, None, f"sampled from the model (temperature 1, seed {seed})")
