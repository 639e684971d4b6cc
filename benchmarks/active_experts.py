"""Fewer active experts on the testbed: compressed experts and dynamic skipping; writes reports/active_experts.md.

    python benchmarks/active_experts.py [--testbed DIR] [--workdir DIR] [--nsamples 128] [--seqlen 256]
                                        [--fit-steps 200] [--lr 0.01] [--threads 1] [--report reports/active_experts.md]
                                        [--distill-steps N] [--distill-lr LR] [--variants a,b,..]
    python benchmarks/active_experts.py --select-distill 0.003,0.01,0.03 --select-steps 240   # choose on calibration only

Protocol (testbed/README.md): perplexity on ``heldout_prose.txt`` and ``heldout_code.txt``, 256-token
chunks, first 40k tokens each, float32 compute, and their geometric mean. Calibration: the built-in
``mixed`` set (never the held-out files). Every compressed variant is written by
``compress_experts_job`` and measured after ``from_pretrained`` (so the export path is exercised).

Variants:

* ``original``            top-2 of 16;
* ``top1``                ``num_experts_per_tok=1`` (top-1, weight renormalised to 1): no compensation;
* ``ce-ones``             compressed experts, n_ce = 1, ces = 1 (top-1 with the ORIGINAL top-1 weight);
* ``ce-fit``              compressed experts, n_ce = 1, ces fitted layer by layer;
* ``ce-distill``          ``ce-fit`` + end-to-end distillation of all layers' ces (``--distill-steps``,
                          ``--distill-lr``): KL(original || compressed) on the calibration tokens;
* ``ce-fit-self``, ``ce-distill-self``  as ``ce-fit`` / ``ce-distill`` (same settings) calibrated on ``self``
                          (EBSS: text the model generates for itself, so in its own distribution) instead of
                          ``mixed`` (on which the original model's perplexity is ~900: off its distribution);
* ``ce-fit-sampled``, ``ce-distill-sampled``  the same calibrated on text sampled from the original model
                          (first token uniform, then plain sampling at temperature 1, seed 0): the contexts
                          the model itself expects, which is what a KL to the model should be averaged over;
* ``skip``                dynamic skipping (ODP rule, per-layer median beta, 2% of tokens protected by ||h||_1).

``--select-distill LR,LR,..`` chooses the distillation settings on calibration data only: starting from
the ``ce-fit`` checkpoint, one run per learning rate of ``--select-steps`` steps, the KL on the held-back
10% of the calibration sequences recorded every ``--select-every`` steps; the (lr, steps) with the
lowest held-back KL is printed and stored in ``WORKDIR/distill_selection.json`` (shown in the report).
The held-out files play no part in it.

Active expert parameters per token count the computed routed experts (measured on the held-out
tokens for ``skip``) plus 3H per compressed expert. CPU time per token is the wall time of the
variants' forwards on the same 8 x 256 held-out tokens, interleaved over ``--timing-rounds`` rounds, minimum
kept, on a shared, noisy 2-core machine (``--threads``). Results are cached in ``WORKDIR/results.json``
per variant, with the job settings (a variant whose settings changed is recomputed; delete the file to
start over), so ``--variants`` can run only new rows while the report keeps the cached ones.
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
    from moecompress.modules.compressed_experts import CompressedExpertsBlock

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
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--distill-lr", type=float, default=1e-2)
    ap.add_argument("--distill-batch-size", type=int, default=8)
    ap.add_argument("--distill-top-k", type=int, default=1024)
    ap.add_argument("--select-distill", default="", help="comma-separated learning rates: choose distillation settings on calibration data, then exit")
    ap.add_argument("--select-steps", type=int, default=240)
    ap.add_argument("--select-every", type=int, default=40)
    ap.add_argument("--variants", default="original,top1,ce-ones,ce-fit,ce-distill,ce-fit-self,ce-distill-self,ce-fit-sampled,ce-distill-sampled,skip")
    ap.add_argument("--report", type=Path, default=REPO / "reports" / "active_experts.md")
    args = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moecompress  # noqa: F401  (registers the quantizer)
    from moecompress.api.calibration import calibration_for
    from moecompress.api.compress_experts import compress_experts_job
    from moecompress.passes.compressed_experts import CompressExpertsConfig, LayerFitRecord
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
        "ce-distill": CompressExpertsConfig(
            n_ce=1, fit_steps=args.fit_steps, lr=args.lr, distill_steps=args.distill_steps, distill_lr=args.distill_lr,
            distill_batch_size=args.distill_batch_size, distill_top_k=args.distill_top_k,
        ),
        "ce-fit-self": CompressExpertsConfig(n_ce=1, fit_steps=args.fit_steps, lr=args.lr),
        "ce-fit-sampled": CompressExpertsConfig(n_ce=1, fit_steps=args.fit_steps, lr=args.lr),
        "ce-distill-sampled": CompressExpertsConfig(
            n_ce=1, fit_steps=args.fit_steps, lr=args.lr, distill_steps=args.distill_steps, distill_lr=args.distill_lr,
            distill_batch_size=args.distill_batch_size, distill_top_k=args.distill_top_k,
        ),
        "ce-distill-self": CompressExpertsConfig(
            n_ce=1, fit_steps=args.fit_steps, lr=args.lr, distill_steps=args.distill_steps, distill_lr=args.distill_lr,
            distill_batch_size=args.distill_batch_size, distill_top_k=args.distill_top_k,
        ),
        "skip": CompressExpertsConfig(n_ce=0, fit_steps=0, dynamic_skip=True, protect_tokens=args.protect_tokens),
    }
    cache_file = args.workdir / "results.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if args.select_distill:
        select_distill(args, jobs["ce-fit"], calib.input_ids, calibration, cache, cache_file)
        return
    results, fit_records, models, distill = {}, {}, {}, {}
    for name in args.variants.split(","):
        if name == "original":
            models[name] = AutoModelForCausalLM.from_pretrained(str(args.testbed), dtype=torch.float32).eval()
        elif name == "top1":
            models[name] = AutoModelForCausalLM.from_pretrained(str(args.testbed), dtype=torch.float32, num_experts_per_tok=1).eval()
        else:
            out = args.workdir / name
            job_calib, job_calibration = (calib, calibration)
            if name.endswith("-self"):
                job_calib, job_calibration = self_calibration(args)
            if name.endswith("-sampled"):
                job_calib, job_calibration = sampled_calibration(args)
            settings = dict(asdict(jobs[name]), calibration=job_calibration)
            if cache.get(name, {}).get("config") != settings or not (out / "config.json").exists():
                res, cpass = compress_experts_job(args.testbed, out, jobs[name], job_calib.input_ids, job_calibration, overwrite=True)
                cache[name] = dict(
                    config=settings, job_seconds=res.seconds, records=[asdict(r) for r in cpass.records],
                    distill=None if cpass.distill is None else asdict(cpass.distill),
                )
                cache_file.write_text(json.dumps(cache, indent=1))
            fit_records[name] = [LayerFitRecord(**r) for r in cache[name]["records"]]
            if cache[name].get("distill"):
                distill[name] = cache[name]["distill"]
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
    selection_file = args.workdir / "distill_selection.json"
    selection = json.loads(selection_file.read_text()) if selection_file.exists() else None
    write_report(args, results, fit_records, calibration, per_expert, n_layers, top_k, distill, selection)


def self_calibration(args):
    """EBSS self-generated calibration (``--calib self``), generated once and kept in WORKDIR (generation is slow on CPU)."""
    from moecompress.api.calibration import calibration_for

    from types import SimpleNamespace

    path = args.workdir / "self_calibration.pt"
    if not path.exists():
        calib, description = calibration_for(args.testbed, "self", args.nsamples, args.seqlen, seed=0)
        torch.save({"input_ids": calib.input_ids, "description": description}, path)
    saved = torch.load(path)
    return SimpleNamespace(input_ids=saved["input_ids"]), saved["description"]


def sampled_calibration(args, batch: int = 32):
    """``nsamples`` sequences sampled from the original model (temperature 1, no top-k/top-p), kept in WORKDIR."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    path = args.workdir / "sampled_calibration.pt"
    if not path.exists():
        model = AutoModelForCausalLM.from_pretrained(str(args.testbed), dtype=torch.float32).eval()
        first = torch.randint(1, model.config.vocab_size, (args.nsamples, 1), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        rows = []
        for s in range(0, args.nsamples, batch):
            with torch.no_grad():
                rows.append(model.generate(
                    input_ids=first[s : s + batch], attention_mask=torch.ones_like(first[s : s + batch]), do_sample=True,
                    temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.seqlen - 1, min_new_tokens=args.seqlen - 1,
                    pad_token_id=0,
                ))
        description = {"source": "sampled from the original model (T=1, seed 0)", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
        torch.save({"input_ids": torch.cat(rows), "description": description}, path)
    saved = torch.load(path)
    return SimpleNamespace(input_ids=saved["input_ids"]), saved["description"]


def select_distill(args, fit_cfg, input_ids: torch.Tensor, calibration: dict, cache: dict, cache_file: Path) -> None:
    """Distillation settings chosen on calibration data only: held-back calibration KL per (lr, steps), from ce-fit."""
    from transformers import AutoModelForCausalLM

    from moecompress.passes.distill_ces import compute_teacher_targets, distill_ces

    out = args.workdir / "ce-fit"
    if cache.get("ce-fit", {}).get("config") != dict(asdict(fit_cfg), calibration=calibration) or not (out / "config.json").exists():
        raise SystemExit("run the ce-fit variant first (python benchmarks/active_experts.py --variants ce-fit)")
    teacher = AutoModelForCausalLM.from_pretrained(str(args.testbed), dtype=torch.float32)
    targets = compute_teacher_targets(teacher, input_ids, args.distill_top_k, 8)
    del teacher
    tail = float(targets.tail_logp.exp().mean())
    runs = []
    for lr in [float(v) for v in args.select_distill.split(",")]:
        student = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        rec = distill_ces(
            student, input_ids, targets, args.select_steps, lr, args.distill_batch_size, fit_cfg.seed,
            fit_cfg.holdout_fraction, torch.bfloat16, heldout_every=args.select_every,
        )
        runs.append({"lr": lr, "kl_heldout_start": rec.kl_heldout_before, "curve": rec.heldout_curve,
                     "kl_train_before": rec.kl_train_before, "kl_train_after": rec.kl_train_after, "seconds": rec.seconds})
        print(json.dumps(runs[-1]), flush=True)
    best = min(((r["lr"], step, kl) for r in runs for step, kl in r["curve"]), key=lambda t: t[2])
    selection = {"best": {"lr": best[0], "steps": best[1], "kl_heldout": best[2]}, "runs": runs,
                 "teacher_tail_mass": tail, "top_k": args.distill_top_k, "batch_sequences": args.distill_batch_size}
    (args.workdir / "distill_selection.json").write_text(json.dumps(selection, indent=1))
    print(json.dumps(selection["best"]), flush=True)


def write_report(args, results: dict, fit_records: dict, calibration: dict, per_expert: int, n_layers: int, top_k: int,
                 distill: dict | None = None, selection: dict | None = None) -> None:
    base = results.get("original")
    lines = [
        "# Fewer active experts: compressed experts and dynamic skipping (testbed)",
        "",
        "Generated by `python benchmarks/active_experts.py` "
        f"(calibration: {calibration['source']}, {calibration['nsamples']} x {calibration['seqlen']} tokens, seed 0; "
        f"fit steps {args.fit_steps}, lr {args.lr}, 4096 tokens per step; distillation {args.distill_steps} steps, lr {args.distill_lr}, "
        f"{args.distill_batch_size} sequences per step, teacher top-{args.distill_top_k}; {args.threads} CPU thread(s)).",
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
        for name in ("ce-ones", "ce-fit", "ce-distill", "ce-fit-self", "ce-distill-self", "ce-fit-sampled", "ce-distill-sampled", "skip"):
            if name in results:
                rec = (math.log(results["top1"]["mean"]) - math.log(results[name]["mean"])) / gap if gap else float("nan")
                lines.append(f"- {name}: recovers {100 * rec:.1f}% of that gap.")
        if "ce-ones" in results:
            gap1 = math.log(results["ce-ones"]["mean"]) - math.log(base["mean"])
            for name in ("ce-fit", "ce-distill", "ce-fit-sampled", "ce-distill-sampled"):
                if name in results and gap1:
                    rec1 = (math.log(results["ce-ones"]["mean"]) - math.log(results[name]["mean"])) / gap1
                    lines.append(f"- {name} vs ce-ones (same computed expert, trained vs unit compressed experts): recovers {100 * rec1:.1f}% of the ce-ones gap.")
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
    for name, d in (distill or {}).items():
        lines += [
            f"## {name}: end-to-end distillation of ces (calibration sequences only)",
            "",
            f"{d['steps']} Adam steps, lr {d['lr']}, {d['batch_sequences']} sequences x {calibration['seqlen']} tokens per step, "
            f"calibration {d['train_sequences'] + d['heldout_sequences']} sequences, "
            f"all layers' ces jointly, everything else frozen; loss KL(original || compressed) over the teacher's top-{d['top_k']} "
            f"tokens + a tail bucket; {d['train_sequences']} sequences trained, {d['heldout_sequences']} held back; {d['seconds']:.0f}s "
            "(CPU, 1 thread), after the layer-wise fit.",
            "",
            "| mean KL per token | before (after layer-wise fit) | after distillation |",
            "|---|---|---|",
            f"| trained calibration sequences | {d['kl_train_before']:.5f} | {d['kl_train_after']:.5f} |",
            f"| held-back calibration sequences | {d['kl_heldout_before']:.5f} | {d['kl_heldout_after']:.5f} |",
            "",
        ]
    if selection:
        b = selection["best"]
        lines += [
            "## Choosing the distillation settings (calibration data only)",
            "",
            f"`--select-distill`: from the ce-fit checkpoint, held-back KL (10% of the calibration sequences, never trained on) "
            f"every few steps, {selection['batch_sequences']} sequences per step, teacher top-{selection['top_k']} "
            f"(mean teacher mass outside the top-{selection['top_k']}: {selection['teacher_tail_mass']:.3f}). "
            f"Lowest: lr {b['lr']}, {b['steps']} steps (KL {b['kl_heldout']:.5f}).",
            "",
            "| lr | start | " + " | ".join(f"step {s}" for s, _ in selection["runs"][0]["curve"]) + " |",
            "|---|---|" + "---|" * len(selection["runs"][0]["curve"]),
        ]
        for r in selection["runs"]:
            lines.append(f"| {r['lr']} | {r['kl_heldout_start']:.5f} | " + " | ".join(f"{kl:.5f}" for _, kl in r["curve"]) + " |")
        lines.append("")
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
