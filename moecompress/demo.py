"""The built-in demo model: a small qwen3_moe trained for a minute on local text, cached.

No MoE checkpoint can be downloaded here and random weights have no real routing, so the demo
trains its own model deterministically on text every Python installation carries: the source files
of the standard library (sorted by name; the even-indexed files train, the odd-indexed ones are
held out for perplexity). A byte-level BPE tokenizer is trained on the same training text. The
result is cached under ``$MOECOMPRESS_CACHE`` (default ``~/.cache/moecompress``) and reused.
"""

from __future__ import annotations

import logging
import math
import os
import sysconfig
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEMO_VERSION = "v1"
VOCAB = 1024
SEQ = 128
STEPS = 300
BATCH = 8
TRAIN_FILES = 160
HELDOUT_CHARS = 200_000


def cache_dir() -> Path:
    """``$MOECOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/moecompress``, else ``~/.cache/moecompress``."""
    if os.environ.get("MOECOMPRESS_CACHE"):
        return Path(os.environ["MOECOMPRESS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moecompress"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    if len(files) < 40:
        from moecompress.errors import MoeCompressError

        raise MoeCompressError(f"the Python standard library at {root} has too few source files to train the demo model")
    return files


def corpus() -> tuple[str, str]:
    """(training text, held-out text) from the standard library's source files."""
    files = _stdlib_files()
    train = [f.read_text(encoding="utf-8", errors="replace") for f in files[0::2][:TRAIN_FILES]]
    held = [f.read_text(encoding="utf-8", errors="replace") for f in files[1::2]]
    return "\n\n".join(train), "\n\n".join(held)[:HELDOUT_CHARS]


def demo_model_config(vocab_size: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=512,
        router_aux_loss_coef=0.01,
        output_router_logits=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _train_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i : i + 10000] for i in range(0, len(text), 10000)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_demo_model(folder: Path, progress=None) -> Path:
    """Train the demo model into ``folder`` (deterministic for this machine's Python)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    train_text, held_text = corpus()
    tokenizer = _train_tokenizer(train_text)
    ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    config = demo_model_config(len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        lr = 3e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, ids.numel() - SEQ - 1, (BATCH,), generator=gen)
        batch = torch.stack([ids[s : s + SEQ] for s in starts])
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step + 1, STEPS, float(out.loss.detach()))
    model.eval()
    model.config.output_router_logits = False
    from moecompress.api.output import OutputFolder

    output = OutputFolder(folder, overwrite=False)
    with output.staged() as tmp:  # a unique staging name: concurrent or killed runs never collide
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "heldout.txt").write_text(held_text)
    return folder


def demo_model(progress=None) -> Path:
    """The cached demo model folder, trained on first use.

    A lock file serialises concurrent first runs: the second waits for the first's model instead of
    training its own (and the model appears in the cache only whole, through a staging folder)."""
    import fcntl

    folder = cache_dir() / f"demo-model-{DEMO_VERSION}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").exists():
            start = time.time()
            build_demo_model(folder, progress)
            log.info("trained the demo model in %.0fs", time.time() - start)
    return folder


def demo_pipeline(model: Path, out: Path, quantize_fields: dict) -> dict:
    """The demo's pipeline: statistics, mixed-precision quantization, export, perplexity before/after."""
    return {
        "model": str(model),
        "calibration": {"source": "mixed", "nsamples": 32, "seqlen": 128, "seed": 0},
        "passes": [{"stats": {}}, {"quantize": quantize_fields}],
        "export": {"format": "native", "output": str(out), "overwrite": True},
        "eval": {"data": [str(model / "heldout.txt")], "seqlen": 128, "max_tokens": 20000},
    }
