"""Perplexity of a model folder (original or compressed) on a text file.

Protocol (the testbed's): the text is tokenized once, cut into non-overlapping chunks of ``seqlen``
tokens (the last partial chunk dropped), optionally only the first ``max_tokens`` tokens; the
perplexity is exp(mean next-token NLL) over all predicted tokens, computed in float32.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moecompress.errors import MoeCompressError
from moecompress.validation import check_int


@dataclass
class EvalResult:
    ppl: float
    tokens: int
    chunks: int
    seconds: float
    disk_bytes: int
    memory_bytes: int  # parameters + buffers as loaded (packed modules count their packed size)
    # How the weights were read: "from_pretrained", or, for a compressed-tensors checkpoint the installed
    # transformers would load wrong, "decompressed per module (<rule>)" -- what vLLM computes with.
    loaded: str = "from_pretrained"

    def as_json(self) -> dict:
        return asdict(self)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def model_memory_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def load_for_eval(model_folder: str | Path, how: list | None = None):
    """``from_pretrained`` in float32 (packed modules stay packed) plus its tokenizer.

    A compressed-tensors checkpoint that the installed transformers would load wrong (a per-layer mixed
    export: one scheme per model for the experts, HF201) is evaluated as its runtime computes it: every
    module decompressed with its own scheme (:mod:`moecompress.export.decompress`), never silently wrong.
    ``how``: a list that receives how the weights were read (EvalResult.loaded)."""
    import moecompress  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecompress.model.checks import check_finite
    from moecompress.model.loading import read_config

    config = read_config(model_folder)  # one-line errors for missing folders / configs
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
    except (OSError, ValueError) as exc:
        raise MoeCompressError(f"{model_folder} has no tokenizer; copy the tokenizer files into it") from exc
    qc = getattr(config, "quantization_config", None)
    method = (qc if isinstance(qc, dict) else qc.to_dict() if qc is not None else {}).get("quant_method")
    loaded = "from_pretrained"
    if method == "compressed-tensors":
        from moecompress.export.decompress import decompress_to_dense, transformers_loads_exactly

        exact, rule = transformers_loads_exactly(model_folder)
        if not exact:
            with tempfile.TemporaryDirectory(prefix="moecompress-eval-") as scratch:
                dense = decompress_to_dense(model_folder, Path(scratch) / "dense")
                model = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
            loaded = f"decompressed per module ({rule.split(':')[0]}: transformers would load it wrong)"
    if loaded == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32).eval()
    check_finite(model, "", model_folder)  # a NaN weight would only show as a NaN perplexity
    if how is not None:
        how.append(loaded)
    return model, tokenizer


def read_text(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        raise MoeCompressError(f"evaluation file {p} is a folder; pass a text file")
    if not p.is_file():
        raise MoeCompressError(f"evaluation file {p} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise MoeCompressError(f"evaluation file {p} is empty")
    return text


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seqlen: int = 256, batch_size: int = 8) -> tuple[float, int, int]:
    """(ppl, predicted tokens, chunks) for token ids [N] cut into non-overlapping chunks."""
    n_chunks = ids.numel() // seqlen
    if n_chunks == 0:
        raise MoeCompressError(f"the text has {ids.numel()} tokens, fewer than one chunk of {seqlen}")
    chunks = ids[: n_chunks * seqlen].view(n_chunks, seqlen)
    nll, count = 0.0, 0
    for i in range(0, n_chunks, batch_size):
        batch = chunks[i : i + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count), count, n_chunks


def check_eval_options(seqlen: int, max_tokens: int | None, batch_size: int) -> None:
    """One-line errors for evaluation options, before any file is read."""
    check_int("--seqlen", seqlen, 2, expected="at least 2 (an integer: tokens per chunk)")
    check_int("--batch-size", batch_size, 1, expected="at least 1 (an integer: chunks per forward)")
    if max_tokens is not None:
        check_int("--max-tokens", max_tokens, seqlen, expected=f"at least one chunk of --seqlen {seqlen} (an integer)")


def evaluate(model_folder: str | Path, data: str | Path, seqlen: int = 256, max_tokens: int | None = None, batch_size: int = 8) -> EvalResult:
    check_eval_options(seqlen, max_tokens, batch_size)
    text = read_text(data)
    start = time.time()
    how: list[str] = []
    model, tokenizer = load_for_eval(model_folder, how)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise MoeCompressError(f"--seqlen {seqlen} exceeds the model's maximum of {max_pos} positions")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    ppl, tokens, chunks = perplexity_of_ids(model, ids, seqlen, batch_size)
    return EvalResult(ppl, tokens, chunks, time.time() - start, folder_bytes(Path(model_folder)), model_memory_bytes(model), how[0])
