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
