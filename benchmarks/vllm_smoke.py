"""Does vLLM load and run a ``quantize --target vllm`` export? A smoke test for a GPU machine.

    python benchmarks/vllm_smoke.py [--model EXPORT] [--source DENSE] [--bits 4] [--vllm-version 0.33]
                                    [--tokens 16] [--workdir DIR]

1. Takes ``--model`` (a compressed-tensors export), or quantizes ``--source`` (a dense model folder;
   default: a tiny qwen3_moe with hidden = intermediate = 128, Marlin-eligible, built here) with
   ``quantize --target vllm --method rtn --bits B`` into ``--workdir``.
2. ``moecompress lint --target vllm`` on it (the rules of ``--vllm-version``).
3. Loads it with ``vllm.LLM`` and generates ``--tokens`` greedy tokens from fixed prompt token ids
   (no tokenizer needed), timed.
4. The same greedy generation with transformers on the same checkpoint, where transformers can load it
   (lint clean for hf), and the agreement of the two token sequences.

Each step prints one JSON line::

    {"step": "lint", "clean": true, "errors": 0, "warnings": 3, "vllm_version": "0.33"}
    {"step": "vllm_load", "ok": true, "seconds": ...}
    {"step": "vllm_generate", "tokens": 16, "tokens_per_s": ..., "output": [...]}
    {"step": "agreement", "reference": "transformers", "matching_prefix": 16, "tokens": 16, "equal": true}

Without a CUDA GPU or without vllm installed it prints ``{"skipped": "..."}`` and exits 0: it is never a
test requirement (the test suite checks only this skip path). A failing step prints
``{"step": ..., "ok": false, "error": "..."}`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [[1, 17, 42, 99, 7, 123, 64, 5], [1, 200, 3, 88, 150, 31]]  # token ids < every tiny vocabulary


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def skip_reason() -> str | None:
    """Why this machine cannot run the smoke test (None: it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (vLLM needs one)"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vllm is not installed (pip install vllm)"
    return None


def tiny_source(folder: Path) -> Path:
    from moecompress.model.tiny import save_tiny_model

    save_tiny_model("qwen3_moe", folder, hidden_size=128, moe_intermediate_size=128)
    return folder


def quantize_for_vllm(source: Path, out: Path, bits: int, version: str | None) -> Path:
    from moecompress.api.quantize import QuantizeOptions, quantize

    opts = QuantizeOptions(bits=bits, group_size=32 if bits == 2 else 128, method="rtn", target="vllm", vllm_version=version)
    quantize(source, out, opts, overwrite=True)
    return out


def lint_step(folder: Path, version: str | None) -> bool:
    from moecompress.export.lint import lint_checkpoint

    report = lint_checkpoint(folder, target="vllm", vllm_version=version)
    emit(step="lint", clean=report.clean, errors=len(report.errors), warnings=len(report.warnings),
         vllm_version=report.tables["vllm"].version, findings=[f"{f.rule} {f.message}" for f in report.findings])
    return report.clean


def vllm_generate(folder: Path, tokens: int) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=str(folder), skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.3, dtype="bfloat16")
    emit(step="vllm_load", ok=True, seconds=round(time.perf_counter() - start, 2))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    seconds = time.perf_counter() - start
    generated = [list(o.outputs[0].token_ids) for o in outputs]
    emit(step="vllm_generate", tokens=sum(map(len, generated)), tokens_per_s=round(sum(map(len, generated)) / seconds, 1),
         output=generated)
    return generated


def transformers_generate(folder: Path, tokens: int) -> list[list[int]] | None:
    """Greedy tokens from transformers on the same checkpoint, or None where it cannot load it right."""
    import torch
    from transformers import AutoModelForCausalLM

    from moecompress.export.lint import lint_checkpoint

    import transformers
    from packaging.version import Version

    # judge by the installed transformers' rules (the table's versions: 5.24, 5.25)
    installed = "5.25" if Version(transformers.__version__) >= Version("5.25") else "5.24"
    if not lint_checkpoint(folder, target="hf", transformers_version=installed).clean_for("hf"):
        return None  # e.g. per-layer widths (HF201): transformers would load wrong weights
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).cuda().eval()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt], device="cuda")
            gen = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            out.append(gen[0, len(prompt):].tolist())
    return out


def agreement(ours: list[list[int]], reference: list[list[int]]) -> dict:
    prefix = 0
    for a, b in zip(ours, reference):
        for x, y in zip(a, b):
            if x != y:
                break
            prefix += 1
    total = sum(map(len, reference))
    return {"matching_prefix": prefix, "tokens": total, "equal": ours == reference}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a compressed-tensors export to load (skips quantization)")
    ap.add_argument("--source", type=Path, help="a dense model to quantize with --target vllm (default: a tiny qwen3_moe)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--vllm-version", default=None, help="0.33 (default) or humming")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason is not None:
        emit(skipped=reason)
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vllm_smoke_"))
    step = "quantize"
    try:
        folder = args.model
        if folder is None:
            source = args.source or tiny_source(workdir / "source")
            folder = quantize_for_vllm(source, workdir / "export", args.bits, args.vllm_version)
        step = "lint"
        lint_step(folder, args.vllm_version)
        step = "vllm_load"
        ours = vllm_generate(folder, args.tokens)
        step = "agreement"
        reference = transformers_generate(folder, args.tokens)
        if reference is None:
            emit(step="agreement", reference=None, why="transformers cannot load this checkpoint correctly (lint --target hf)")
        else:
            emit(step="agreement", reference="transformers", **agreement(ours, reference))
    except Exception as exc:  # a smoke test: report which step broke, in one line
        emit(step=step, ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
