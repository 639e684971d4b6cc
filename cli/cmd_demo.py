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
    from moecompress.cli.common import LayerProgress, seconds_line
    from moecompress.demo import demo_model, demo_pipeline
    from moecompress.pipeline.run import run_pipeline
    from moecompress.pipeline.schema import load_pipeline, pass_schemas

    quiet_transformers()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"), console=console, transient=True) as progress:
        task = progress.add_task("demo model (trained once, then cached)", total=None, loss="")
        plain = not console.is_terminal

        def trained(step, total, loss):
            progress.update(task, completed=step, total=total, loss=f"loss {loss:.3f}")
            if plain and (step % 25 == 0 or step == total):
                console.print(f"training the demo model (once, then cached): step {step}/{total}, loss {loss:.3f}", highlight=False)

        model = demo_model(trained)
    console.print(f"demo model: {model}")
    from moecompress.api.job import write_file_atomically

    fields = {"bits_budget": 3.0, "bit_choices": "2,3,4,8", "group_size": 32}
    pipeline_file = out / "pipeline.yaml"
    write_file_atomically(pipeline_file, yaml.safe_dump(demo_pipeline(model, out / "model", fields), sort_keys=False))
    p = load_pipeline(pipeline_file, pass_schemas())
    with LayerProgress("pass") as layer_progress:
        result = run_pipeline(p, echo=lambda s: console.print(s, highlight=False), progress=layer_progress)
    summary = result.summary
    for e in summary["eval"]:
        console.print(f"perplexity on held-out text: {e['ppl_before']:.3f} -> {e['ppl_after']:.3f} ({100 * (e['ppl_after'] / e['ppl_before'] - 1):+.2f}%)")
    console.print(f"size: {summary['input_bytes'] / 2**20:.2f} MiB -> {summary['output_bytes'] / 2**20:.2f} MiB in {seconds_line(result)}")
    console.print(f"report: [bold]{Path(result.out) / 'report.md'}[/]")


def register(app: typer.Typer) -> None:
    app.command("demo")(user_errors(demo))
