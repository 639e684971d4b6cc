"""Fewer active experts on the testbed: compressed experts and dynamic skipping; writes reports/active_experts.md.

    python benchmarks/active_experts.py [--testbed DIR] [--workdir DIR] [--nsamples 128] [--seqlen 256]
                                        [--fit-steps 200] [--lr 0.01] [--threads 1] [--report reports/active_experts.md]

Protocol (testbed/README.md): perplexity on ``heldout_prose.txt`` and ``heldout_code.txt``, 256-token
chunks, first 40k tokens each, float32 compute, and their geometric mean. Calibration: the built-in
``mixed`` set (never the held-out files). Every compressed variant is written by
``compress_experts_job`` and measured after ``from_pretrained`` (so the export path is exercised).

Variants:

* ``original``            top-2 of 16;
* ``top1``                ``num_experts_per_tok=1`` (top-1, weight renormalised to 1): no compensation;
* ``ce-ones``             compressed experts, n_ce = 1, ces = 1 (top-1 with the ORIGINAL top-1 weight);
* ``ce-fit``              compressed experts, n_ce = 1, ces fitted layer by layer;
* ``skip``                dynamic skipping (ODP rule, per-layer median beta, 2% of tokens protected by ||h||_1).

Active expert parameters per token count the computed routed experts (measured on the held-out
tokens for ``skip``) plus 3H per compressed expert. CPU time per token is the wall time of the
variants' forwards on the same 8 x 256 held-out tokens, interleaved over ``--timing-rounds`` rounds, minimum
kept, on a shared, noisy 2-core machine (``--threads``). Results are cached in ``WORKDIR/results.json``
(delete it to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TESTBED = REPO.parent / "shared" / "testbed"


def heldout_ids(tokenizer, testbed: Path, max_tokens: int) -> dict[str, torch.Tensor]:
    from moecompress.evaluate import read_text

    return {
        name: torch.tensor(tokenizer(read_text(testbed / f"heldout_{name}.txt"), add_special_tokens=False)["input_ids"][:max_tokens])
        for name in ("prose", "code")
    }


def measure(model, ids: dict[str, torch.Tensor], seqlen: int) -> dict:
    """Perplexity per file, geo-mean, seconds per predicted token, and the CE blocks' compute counters."""
    from moecompress.evaluate import perplexity_of_ids
    from moecompress.passes.compressed_experts import CompressedExpertsBlock

    blocks = [m for m in model.modules() if isinstance(m, CompressedExpertsBlock)]
    for b in blocks:
        b.stats.reset()
    result, tokens, seconds = {}, 0, 0.0
    for name, x in ids.items():
        start = time.perf_counter()
        ppl, n, _ = perplexity_of_ids(model, x, seqlen)
        seconds += time.perf_counter() - start
        result[name] = ppl
        tokens += n
    result["mean"] = math.sqrt(result["prose"] * result["code"])
    result["ms_per_token_eval"] = 1000 * seconds / tokens
    if blocks:
        result["experts_per_token"] = [b.stats.experts_per_token for b in blocks]
        result["skip_fraction"] = [b.stats.skip_fraction for b in blocks]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", type=Path, default=DEFAULT_TESTBED)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/active_experts"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--fit-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--protect-tokens", type=float, default=0.02)
    ap.add_argument("--max-tokens", type=int, default=40000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timing-rounds", type=int, default=7)
    ap.add_argument("--timing-chunks", type=int, default=8)
    ap.add_argument("--variants", default="original,top1,ce-ones,ce-fit,skip")
    ap.add_argument("--report", type=Path, default=REPO / "reports" / "active_experts.md")
    args = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moecompress  # noqa: F401  (registers the quantizer)
    from moecompress.jobs import calibration_for
    from moecompress.passes.compressed_experts import CompressExpertsConfig, LayerFitRecord, compress_experts_job
    from moecompress.model.loading import LayerwiseModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(args.testbed))
    ids = heldout_ids(tokenizer, args.testbed, args.max_tokens)
    lm = LayerwiseModel(args.testbed)
    blocks = list(lm.view.blocks.values())
    per_expert = blocks[0].experts.params_per_expert()
    hidden, n_layers, top_k = blocks[0].experts.hidden_size, len(blocks), blocks[0].top_k
    calib, calibration = calibration_for(args.testbed, "mixed", args.nsamples, args.seqlen, seed=0)

    jobs = {
        "ce-ones": CompressExpertsConfig(n_ce=1, fit_steps=0),
        "ce-fit": CompressExpertsConfig(n_ce=1, fit_steps=args.fit_steps, lr=args.lr),
        "skip": CompressExpertsConfig(n_ce=0, fit_steps=0, dynamic_skip=True, protect_tokens=args.protect_tokens),
    }
    cache_file = args.workdir / "results.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    results, fit_records, models = {}, {}, {}
    for name in args.variants.split(","):
        if name == "original":
            models[name] = AutoModelForCausalLM.from_pretrained(str(args.testbed), dtype=torch.float32).eval()
        elif name == "top1":
            models[name] = AutoModelForCausalLM.from_pretrained(str(args.testbed), dtype=torch.float32, num_experts_per_tok=1).eval()
        else:
            out = args.workdir / name
            if "records" not in cache.get(name, {}) or not (out / "config.json").exists():
                res, cpass = compress_experts_job(args.testbed, out, jobs[name], calib.input_ids, calibration, overwrite=True)
                cache.setdefault(name, {}).update(job_seconds=res.seconds, records=[asdict(r) for r in cpass.records])
                cache_file.write_text(json.dumps(cache, indent=1))
            fit_records[name] = [LayerFitRecord(**r) for r in cache[name]["records"]]
            models[name] = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        if "ppl" not in cache.get(name, {}):
            r = measure(models[name], ids, 256)
            if name == "original":
                r["active_expert_params"] = n_layers * top_k * per_expert
            elif name == "top1":
                r["active_expert_params"] = n_layers * per_expert
            else:
                r["active_expert_params"] = sum(e * per_expert + jobs[name].n_ce * 3 * hidden for e in r["experts_per_token"])
            cache.setdefault(name, {})["ppl"] = r
            cache_file.write_text(json.dumps(cache, indent=1))
        results[name] = dict(cache[name]["ppl"], job_seconds=cache[name].get("job_seconds"))
        print(json.dumps({"variant": name, **results[name]}), flush=True)

    # CPU time per token: the variants interleaved, round after round, on the same chunks; the minimum
    # over rounds is the least disturbed by the other jobs sharing this machine.
    chunk = ids["prose"][: args.timing_chunks * 256].view(args.timing_chunks, 256)
    best = {name: float("inf") for name in models}
    for _ in range(args.timing_rounds):
        for name, model in models.items():
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=chunk, use_cache=False)
            best[name] = min(best[name], (time.perf_counter() - start) / chunk.numel())
    for name in models:
        results[name]["ms_per_token"] = 1000 * best[name]
    write_report(args, results, fit_records, calibration, per_expert, n_layers, top_k)


def write_report(args, results: dict, fit_records: dict, calibration: dict, per_expert: int, n_layers: int, top_k: int) -> None:
    base = results.get("original")
    lines = [
        "# Fewer active experts: compressed experts and dynamic skipping (testbed)",
        "",
        "Generated by `python benchmarks/active_experts.py` "
        f"(calibration: {calibration['source']}, {calibration['nsamples']} x {calibration['seqlen']} tokens, seed 0; "
        f"fit steps {args.fit_steps}, lr {args.lr}, 4096 tokens per step; {args.threads} CPU thread(s)).",
        "",
        f"Protocol: held-out perplexity, 256-token chunks, first {args.max_tokens} tokens of each file, float32; "
        f"mean = geometric mean. qwen3_moe, {n_layers} MoE layers, top-{top_k} of 16, {per_expert:,} parameters per expert. "
        "Every compressed variant was written by `compress_experts_job` and reloaded with `from_pretrained`.",
        "",
        "| variant | prose | code | mean | vs original | active expert params / token | ms / token (CPU, min of rounds, noisy) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rel = f"{100 * (r['mean'] / base['mean'] - 1):+.2f}%" if base else "—"
        lines.append(
            f"| {name} | {r['prose']:.3f} | {r['code']:.3f} | {r['mean']:.3f} | {rel} | {r['active_expert_params']:,.0f} | {r['ms_per_token']:.3f} |"
        )
    lines.append("")
    if base and "top1" in results:
        gap = math.log(results["top1"]["mean"]) - math.log(base["mean"])
        lines.append(f"Log-perplexity gap top-1 -> top-2 (geo-mean): {gap:.4f}.")
        for name in ("ce-ones", "ce-fit", "skip"):
            if name in results:
                rec = (math.log(results["top1"]["mean"]) - math.log(results[name]["mean"])) / gap if gap else float("nan")
                lines.append(f"- {name}: recovers {100 * rec:.1f}% of that gap.")
        if "ce-ones" in results:
            gap1 = math.log(results["ce-ones"]["mean"]) - math.log(base["mean"])
            if "ce-fit" in results and gap1:
                rec1 = (math.log(results["ce-ones"]["mean"]) - math.log(results["ce-fit"]["mean"])) / gap1
                lines.append(f"- ce-fit vs ce-ones (same computed expert, fitted vs unit compressed experts): recovers {100 * rec1:.1f}% of the ce-ones gap.")
        lines.append("")
    if "skip" in results:
        s = results["skip"]
        lines += [
            "Dynamic skipping on the held-out tokens, per layer: experts computed per token "
            + ", ".join(f"{e:.3f}" for e in s["experts_per_token"])
            + "; tokens skipping the 2nd expert "
            + ", ".join(f"{100 * f:.1f}%" for f in s["skip_fraction"])
            + ".",
            "",
        ]
    for name, records in fit_records.items():
        lines += [
            f"## {name}: per layer (block-output MSE vs the original block; held-back = 10% of calibration tokens)",
            "",
            "| layer | fit before | fit after | held-back before | held-back after | held-back rel. err before -> after | beta | calib. skip fraction |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in records:
            beta = "—" if r.beta is None else f"{r.beta:.3f}"
            lines.append(
                f"| {r.layer} | {r.mse_fit_before:.4g} | {r.mse_fit_after:.4g} | {r.mse_heldout_before:.4g} | {r.mse_heldout_after:.4g} "
                f"| {r.rel_heldout_before:.4f} -> {r.rel_heldout_after:.4f} | {beta} | {100 * r.skip_fraction:.1f}% |"
            )
        lines.append("")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    existing_notes = ""
    if args.report.exists():
        text = args.report.read_text()
        marker = "## Notes"
        if marker in text:
            existing_notes = text[text.index(marker):]
    args.report.write_text("\n".join(lines) + "\n" + existing_notes)


if __name__ == "__main__":
    main()
