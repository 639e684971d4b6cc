"""`moecompress compress-experts`: fewer computed experts per token (compressed experts, dynamic skipping)."""

from __future__ import annotations

from pathlib import Path

import typer

from moecompress.cli.common import (
    AS_JSON,
    DRY_RUN,
    OVERWRITE,
    SAVE_PIPELINE,
    console,
    options_from,
    print_json,
    print_notes,
    quiet_transformers,
    run_api,
    seconds_line,
    user_errors,
)


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
    overwrite: bool = OVERWRITE,
    dry_run: bool = DRY_RUN,
    save_pipeline: Path = SAVE_PIPELINE,
    as_json: bool = AS_JSON,
) -> None:
    """Replace the lowest-weighted routed experts by fitted compressed experts and/or skip them dynamically.

    The fit is layer by layer (one decoder layer in memory); --distill-steps adds an end-to-end step that loads the whole model.
    """
    from moecompress.api.compress_experts import CompressExpertsOptions, compress_experts as run

    quiet_transformers()
    options = CompressExpertsOptions(**options_from(CompressExpertsOptions, locals()))
    result = run_api("compress-experts", run, model, out, options, overwrite, dry_run, save_pipeline, "compressing experts")
    if result.dry_run:
        return
    if as_json:
        print_json(result.as_json())
        return
    s = result.summary
    console.print(
        f"wrote [bold]{result.out}[/] in {seconds_line(result)}: active expert parameters per token "
        f"{s['active_params_before']:,.0f} -> {s['active_params_after']:,.0f}; report: {result.out / 'report.md'}"
    )
    print_notes(result)


def register(app: typer.Typer) -> None:
    app.command("compress-experts")(user_errors(compress_experts))
