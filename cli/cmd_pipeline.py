"""`moecompress run PIPELINE.yaml [--dry-run]`."""

from __future__ import annotations

from pathlib import Path

import typer

from moecompress.cli.common import console, print_json, quiet_transformers, user_errors


def run(
    pipeline: Path = typer.Argument(..., help="pipeline YAML file"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the plan, run nothing"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
) -> None:
    """Run a pipeline: model, calibration, ordered passes, export, eval (validated before any work)."""
    from moecompress.cli.common import LayerProgress, seconds_line
    from moecompress.pipeline.run import run_pipeline
    from moecompress.pipeline.schema import load_pipeline, pass_schemas

    quiet_transformers()
    p = load_pipeline(pipeline, pass_schemas())
    with LayerProgress("pass") as progress:
        result = run_pipeline(p, dry_run=dry_run, echo=lambda s: console.print(s, highlight=False), progress=progress)
    if result.out is None and not dry_run:  # a torchrun rank that wrote nothing (rank 0 speaks)
        return
    if as_json:
        print_json(result.as_json())
    elif not dry_run:
        console.print(f"wrote [bold]{result.out}[/] in {seconds_line(result)}; report: {Path(result.out) / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("run")(user_errors(run))
