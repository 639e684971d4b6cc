"""What every command shares: one-line errors with exit code 2, console, JSON output."""

from __future__ import annotations

import functools
import json
import logging
import sys

import typer
from rich.console import Console

from moecompress.errors import MoeCompressError

console = Console(stderr=True)
EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
    """Print one line and exit with code 2."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def user_errors(func):
    """Turn library errors into one clear line and exit code 2 (never a traceback for bad input)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MoeCompressError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            console.print("interrupted: no output was written")
            raise typer.Exit(130)

    return wrapper


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=False) + "\n")


def quiet_transformers() -> None:
    """Keep transformers' progress bars and warnings off the console of a CLI run."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("moecompress").setLevel(logging.INFO)


# ------------------------------------------------------------------------------------------------
# Running an API job from a command: progress, dry run, --save-pipeline, the printed summary
# ------------------------------------------------------------------------------------------------


class LayerProgress:
    """Per-layer progress: a rich bar on a terminal, a plain line per layer otherwise (logs, CI)."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None
        self.task = None
        self.last = None

    def __enter__(self):
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                                TimeElapsedColumn(), console=console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.description, total=None)
        return self

    def relabel(self, description: str) -> None:
        """A new phase (a pipeline's next pass, profiling then quantizing) under its own name."""
        if description != self.description:
            self.description, self.last = description, None
            if self.bar is not None:
                self.bar.update(self.task, description=description, completed=0, total=None)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
        elif (done, total) != self.last:
            self.last = (done, total)
            console.print(f"{self.description}: {done}/{total} layers", highlight=False)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def announce(line: str) -> None:
    console.print(line, highlight=False)


def run_api(command: str, api_call, model, out, options, overwrite: bool, dry_run: bool, save_pipeline,
            description: str):
    """Call ``api_call(model, out, options, ...)`` with progress and the checks of --save-pipeline;
    after success write the one-pass pipeline. Returns the JobResult (printing is the caller's)."""
    from pathlib import Path

    with LayerProgress(description) as progress:
        result = api_call(model, out, options, overwrite=overwrite, dry_run=dry_run, progress=progress,
                          announce=announce, side_files=[save_pipeline])
    if dry_run:
        console.print(f"dry run: the inputs and options are valid and {out} can be written; nothing was written", highlight=False)
    elif save_pipeline is not None:
        import yaml

        from moecompress.api.job import write_file_atomically
        from moecompress.pipeline.schema import single_pass_pipeline

        doc = single_pass_pipeline(command, options, Path(model), Path(out), overwrite)
        write_file_atomically(save_pipeline, yaml.safe_dump(doc, sort_keys=False))
    return result


def print_notes(result) -> None:
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


def seconds_line(result) -> str:
    run = result.run
    return f"{run.get('seconds', 0):.1f}s wall, {run.get('cpu_seconds', 0):.1f}s CPU, peak RSS {run.get('peak_rss_bytes', 0) / 2**30:.2f} GiB"


# Options every writing command takes (typer reads a parameter's default from its own Option object,
# and the same OptionInfo may serve several commands since it is never mutated).
OVERWRITE = typer.Option(False, "--overwrite", help="replace OUT if it exists (atomically: the old OUT stays whole until the new one is complete)")
DRY_RUN = typer.Option(False, "--dry-run", help="validate the inputs, options and OUT, write nothing")
SAVE_PIPELINE = typer.Option(None, "--save-pipeline", help="write the one-pass pipeline YAML this command ran")
AS_JSON = typer.Option(False, "--json", help="print a JSON summary")

# Command parameters that are not options of the job (the job's options dataclass holds the rest).
RUNNER_OWNED = ("model", "out", "overwrite", "dry_run", "save_pipeline", "as_json")


def options_from(options_class, params: dict) -> dict:
    """The command's parameters that are fields of ``options_class`` (a test checks they all are)."""
    import dataclasses
    from pathlib import Path

    names = {f.name for f in dataclasses.fields(options_class)}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items() if k in names}
