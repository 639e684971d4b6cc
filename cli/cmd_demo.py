"""`moecompress demo`: the whole job end to end on the built-in small MoE model."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml
from rich.progress import BarColumn, Progress, TextColumn

from moecompress.cli.common import console, quiet_transformers, user_errors


def demo(
    out: Path = typer.Option(Path("moecompress-demo"), help="where the demo writes its pipeline, model and report"),
) -> None:
    """Train (once, cached) a small MoE model, then statistics -> mixed-precision quantization -> reload -> perplexity."""
    from moecompress.cli.main import app
    from moecompress.cli.pipeline import load_pipeline, pass_schemas, run_pipeline
    from moecompress.demo import demo_model, demo_pipeline

    quiet_transformers()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"), console=console, transient=True) as progress:
        task = progress.add_task("demo model (trained once, then cached)", total=None, loss="")
        model = demo_model(lambda step, total, loss: progress.update(task, completed=step, total=total, loss=f"loss {loss:.3f}"))
    console.print(f"demo model: {model}")
    out.mkdir(parents=True, exist_ok=True)
    schemas = pass_schemas(app)
    fields = {"bits_budget": 3.0, "bit_choices": "2,3,4,8"} if "bits_budget" in schemas["quantize"].fields else {"bits": 4}
    fields.update({"group_size": 32})
    pipeline_file = out / "pipeline.yaml"
    pipeline_file.write_text(yaml.safe_dump(demo_pipeline(model, out / "model", fields), sort_keys=False))
    p = load_pipeline(pipeline_file, schemas)
    summary = run_pipeline(p, schemas, echo=lambda s: console.print(s, highlight=False))
    for e in summary["eval"]:
        console.print(f"perplexity on held-out text: {e['ppl_before']:.3f} -> {e['ppl_after']:.3f} ({100 * (e['ppl_after'] / e['ppl_before'] - 1):+.2f}%)")
    console.print(f"size: {summary['input_bytes'] / 2**20:.2f} MiB -> {summary['output_bytes'] / 2**20:.2f} MiB")
    console.print(f"report: [bold]{Path(summary['output']) / 'report.md'}[/]")


def register(app: typer.Typer) -> None:
    app.command("demo")(user_errors(demo))
