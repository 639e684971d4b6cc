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
    from moecompress.cli.main import app
    from moecompress.cli.pipeline import load_pipeline, pass_schemas, run_pipeline

    quiet_transformers()
    schemas = pass_schemas(app)
    p = load_pipeline(pipeline, schemas)
    summary = run_pipeline(p, schemas, dry_run=dry_run, echo=lambda s: console.print(s, highlight=False))
    if as_json:
        print_json(summary)
    elif not dry_run:
        console.print(f"wrote [bold]{summary['output']}[/]; report: {Path(summary['output']) / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("run")(user_errors(run))
