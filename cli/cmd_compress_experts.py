"""`moecompress compress-experts`: fewer computed experts per token (compressed experts, dynamic skipping)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from moecompress.cli.common import console, print_json, quiet_transformers, user_errors
from moecompress.errors import MoeCompressError


def compress_experts(
    model: Path = typer.Argument(..., help="model folder (dense, or a moecompress quantized checkpoint)"),
    out: Path = typer.Argument(..., help="output folder"),
    n_ce: int = typer.Option(1, "--n-ce", help="routed experts per token replaced by compressed experts (0 <= n_ce < top-k)"),
    fit_steps: int = typer.Option(200, help="Adam steps fitting the compressed experts per layer (0: keep them at ones)"),
    lr: float = typer.Option(1e-2, help="Adam learning rate for the compressed experts"),
    fit_batch_tokens: int = typer.Option(4096, help="calibration tokens per fitting step"),
    dynamic_skip: bool = typer.Option(False, "--dynamic-skip", help="skip a main expert when g_j < beta * g_1 (beta: per-layer median, MC-MoE ODP)"),
    protect_tokens: float = typer.Option(0.02, help="with --dynamic-skip: fraction of tokens (largest ||h||_1) never skipped"),
    distill_steps: int = typer.Option(
        0, help="after the layer-wise fit: Adam steps training all layers' compressed experts jointly on KL(original || compressed) "
        "next-token distributions of the calibration tokens (0: off). Holds the WHOLE model in float32 plus one batch's "
        "activations, unlike the layer-by-layer fit; refused up front when that does not fit in the available memory",
    ),
    distill_lr: float = typer.Option(1e-2, help="with --distill-steps: Adam learning rate (0.01: best held-back calibration KL on the testbed)"),
    distill_batch_size: int = typer.Option(8, help="with --distill-steps: calibration sequences per step (activation memory grows with it)"),
    distill_top_k: int = typer.Option(1024, help="with --distill-steps: teacher tokens kept per position (the rest is one tail bucket)"),
    calib: str = typer.Option("mixed", help="calibration source: a built-in set name, a .txt/.jsonl file, a folder, or 'self'"),
    nsamples: int = typer.Option(128, help="calibration sequences"),
    seqlen: int = typer.Option(512, help="tokens per calibration sequence"),
    seed: int = typer.Option(0, help="seed for calibration sampling, the held-back split and fitting"),
    batch_size: int = typer.Option(8, help="calibration batch size"),
    eval_data: Path = typer.Option(None, "--eval-data", help="text file: perplexity of MODEL and OUT, written to the report"),
    eval_max_tokens: int = typer.Option(40000, help="with --eval-data: only the first N tokens"),
    eval_seqlen: int = typer.Option(256, help="with --eval-data: chunk length"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
) -> None:
    """Replace the lowest-weighted routed experts by fitted compressed experts and/or skip them dynamically.

    The fit is layer by layer (one decoder layer in memory); --distill-steps adds an end-to-end step that loads the whole model.
    """
    from moecompress.cli.cmd_quantize import layer_progress
    from moecompress.export.writer import prepare_output
    from moecompress.jobs import calibration_for, peak_rss_bytes
    from moecompress.passes.compressed_experts import (
        CompressExpertsConfig,
        compress_experts_job,
        model_top_k,
        write_compress_report,
    )

    quiet_transformers()
    cfg = CompressExpertsConfig(
        n_ce=n_ce, fit_steps=fit_steps, lr=lr, fit_batch_tokens=fit_batch_tokens,
        dynamic_skip=dynamic_skip, protect_tokens=protect_tokens if dynamic_skip else 0.0, seed=seed,
        distill_steps=distill_steps, distill_lr=distill_lr, distill_batch_size=distill_batch_size, distill_top_k=distill_top_k,
    )
    cfg.validate()
    if not 0 <= protect_tokens < 1:
        raise MoeCompressError(f"--protect-tokens must be in [0, 1), got {protect_tokens}")
    if eval_data is not None and not Path(eval_data).is_file():
        raise MoeCompressError(f"--eval-data {eval_data} does not exist")
    top_k = model_top_k(model)
    cfg.check_top_k(top_k)
    prepare_output(out, overwrite)
    calib_set, calibration = calibration_for(model, calib, nsamples, seqlen, seed)
    progress, update = layer_progress("compressing experts")
    with progress:
        result, cpass = compress_experts_job(
            model, out, cfg, calib_set.input_ids, calibration, overwrite=overwrite, batch_size=batch_size, progress=update
        )
    records = cpass.records
    summary = {
        "model": str(model),
        "out": str(result.out),
        "n_ce": n_ce,
        "top_k": top_k,
        "fit_steps": fit_steps,
        "lr": lr,
        "dynamic_skip": dynamic_skip,
        "protect_tokens": cfg.protect_tokens,
        "calibration": calibration,
        "active_params_before": cpass.active_params(after=False),
        "active_params_after": cpass.active_params(after=True),
        "skip_fraction": sum(r.skip_fraction for r in records) / max(1, len(records)),
        "layers": [
            {"layer": r.layer, "heldout_mse_before": r.mse_heldout_before, "heldout_mse_after": r.mse_heldout_after,
             "fit_mse_before": r.mse_fit_before, "fit_mse_after": r.mse_fit_after, "beta": r.beta, "skip_fraction": r.skip_fraction}
            for r in records
        ],
        "distill": None if cpass.distill is None else asdict(cpass.distill),
        "seconds": round(result.seconds, 2),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if eval_data is not None:
        from moecompress.evaluate import evaluate

        summary["eval"] = {
            name: evaluate(folder, eval_data, seqlen=eval_seqlen, max_tokens=eval_max_tokens).as_json()
            for name, folder in (("original", model), ("compressed", result.out))
        }
    write_compress_report(result.out / "report.md", summary, records)
    if as_json:
        print_json(summary)
    else:
        console.print(
            f"wrote [bold]{result.out}[/] in {result.seconds:.1f}s: active expert parameters per token "
            f"{summary['active_params_before']:,.0f} -> {summary['active_params_after']:,.0f}; report: {result.out / 'report.md'}"
        )
        if cpass.distill is not None:
            d = cpass.distill
            console.print(
                f"distillation: KL on held-back calibration sequences {d.kl_heldout_before:.5f} -> {d.kl_heldout_after:.5f} "
                f"(trained sequences {d.kl_train_before:.5f} -> {d.kl_train_after:.5f})"
            )


def register(app: typer.Typer) -> None:
    app.command("compress-experts")(user_errors(compress_experts))
