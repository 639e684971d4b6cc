"""`moecompress stats`: router and expert statistics over a calibration set, with a report.

Writes DIR/stats.json, DIR/stats.safetensors, DIR/report.md and PNG figures, under the output contract
of every command (moecompress.api.output): staged beside DIR, swapped in atomically when complete.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moecompress.cli.common import DRY_RUN, OVERWRITE, SAVE_PIPELINE, console, options_from, print_json, quiet_transformers, run_api, user_errors



def stats(
    model: Path = typer.Argument(..., help="model folder (save_pretrained layout)"),
    calib: str = typer.Option(..., "--calib", help="calibration: prose|code|math|multilingual|chat|mixed|self|sample, a .txt/.jsonl file or a folder"),
    out: Path = typer.Option(..., "--out", help="output folder (must not exist unless --overwrite)"),
    nsamples: int = typer.Option(64, help="calibration sequences"),
    seqlen: int = typer.Option(256, help="tokens per sequence"),
    seed: int = typer.Option(0, help="seed for drawing calibration windows"),
    batch_size: int = typer.Option(8, help="sequences per forward"),
    coverage_threshold: float = typer.Option(0.1, help="an expert with fewer than this x its uniform share (k/E x tokens) selections is starved"),
    super_percentile: float = typer.Option(99.5, help="super experts: percentile of the pooled max |output|"),
    super_ratio: float = typer.Option(0.1, help="super experts: fraction of the largest max |output|"),
    coverage_layer: int | None = typer.Option(None, help="MoE layer for the per-layer figures (default: the least covered)"),
    as_json: bool = typer.Option(False, "--json", help="print stats.json to stdout"),
    overwrite: bool = OVERWRITE,
    dry_run: bool = DRY_RUN,
    save_pipeline: Path = SAVE_PIPELINE,
) -> None:
    """Router statistics: expert load, co-activation, REAP scores, super experts and coverage, with a report."""
    from moecompress.api.stats import StatsOptions, stats as run

    quiet_transformers()
    options = StatsOptions(**options_from(StatsOptions, locals()))
    result = run_api("stats", run, model, out, options, overwrite, dry_run, save_pipeline, "collecting statistics")
    if result.dry_run:
        return
    if as_json:  # exactly stats.json
        print_json({k: v for k, v in result.summary.items() if k != "out"})
    _print_summary(result, out)


def _print_summary(job_result, out: Path) -> None:
    from moecompress.calibration.stats_types import RouterStats

    result = RouterStats.load(out)
    table = Table(title=f"router statistics: {result.model}")
    for col in ("layer", "tokens", "load CV", "min load", "max load", "starved", "max |out|"):
        table.add_column(col, justify="right")
    starved = {}
    for s in result.coverage.get("starved", []):
        starved.setdefault(s["layer"], []).append(s["expert"])
    for i in result.moe_layers:
        s = result.layers[i]
        ratio = s.load_ratio
        table.add_row(
            str(i), f"{s.tokens:,}", f"{s.load_cv:.3f}", f"{float(ratio.min()):.2f}x", f"{float(ratio.max()):.2f}x",
            str(len(starved.get(i, []))), f"{float(s.output_max.max()):.4g}",
        )
    console.print(table)
    speed = f", {job_result.run['tokens_per_second']:,.0f} tokens/s" if job_result.run.get("tokens_per_second") else ""
    console.print(f"expert-load CV (mean over layers): {result.load_cv:.4f}{speed}")
    if result.super_experts:
        found = ", ".join(f"layer {s.layer} expert {s.expert} ({s.max_abs:.4g})" for s in result.super_experts)
        console.print(f"super experts: {found}")
    else:
        console.print("super experts: none")
    threshold = result.coverage.get("threshold", 0.0)
    for layer, experts in starved.items():
        console.print(
            f"[yellow]warning:[/] layer {layer}: experts {experts} are starved "
            f"(< {threshold:g} x uniform share of the calibration tokens)",
            highlight=False,
        )
    console.print(f"wrote {out}/stats.json, stats.safetensors, report.md")


def register(app: typer.Typer) -> None:
    app.command("stats")(user_errors(stats))
