"""The `moecompress` command line. Thin: parse, validate, call the library, render with rich."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.2x parses with its own copy of click and raises its exceptions
    from typer._click import exceptions as _click_exceptions
except ImportError:  # older typer: click itself
    from click import exceptions as _click_exceptions

CLICK_ERRORS = (_click_exceptions.ClickException,)
CLICK_ABORTS = tuple(e for e in (getattr(_click_exceptions, "Abort", None),) if e is not None) or (KeyboardInterrupt,)

from moecompress.cli.common import console, print_json, quiet_transformers, user_errors

class OneLineErrors(TyperGroup):
    """Usage errors (a missing argument, ``--bits abc``, an unknown option) as one line and exit 2,
    like every other bad input, instead of click's multi-line usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except CLICK_ABORTS:
            sys.stderr.write("interrupted: no output was written\n")
            sys.exit(130)
        except CLICK_ERRORS as exc:
            if not exc.format_message():  # no arguments at all: the help was printed
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "moecompress"
            sys.stderr.write(f"error: {exc.format_message()} (see {where} --help)\n")
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="moecompress",
    help="Post-training compression for Mixture-of-Experts LLMs (Hugging Face checkpoints).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        import moecompress

        print(f"moecompress {moecompress.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"),
) -> None:
    """Post-training compression for Mixture-of-Experts LLMs (Hugging Face checkpoints)."""


@app.command()
@user_errors
def inspect(
    model: Path = typer.Argument(..., help="model folder (save_pretrained layout)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    group_size: int = typer.Option(128, help="group size assumed for the size estimates"),
) -> None:
    """What the model is made of: MoE layers, experts, router, parameter counts, sizes per bit width."""
    from moecompress.model.hub import resolve_model
    from moecompress.model.inspect import summarize

    quiet_transformers()
    s = summarize(resolve_model(model), group_size=group_size)
    if as_json:
        print_json(s.as_json())
        return
    t = Table(title=f"{model}", show_header=False)
    rows = [
        ("model type", s.model_type + (" (generic path)" if s.generic_path else "")),
        ("layers", f"{s.num_layers} ({len(s.moe_layers)} MoE: {s.moe_layers})"),
        ("experts / top-k", f"{s.num_experts} / {s.top_k}"
                            + (f" (router: {s.router_outputs} expert ids -> {s.num_experts} merged experts)" if s.router_outputs else "")),
        ("router", s.router_kind),
        ("shared experts", "yes" if s.has_shared_experts else "no"),
        ("expert layout", f"{s.expert_layout}; H={s.expert_hidden_size}, I={s.expert_intermediate_size}"),
        ("params total", f"{s.params_total:,}"),
        ("params routed experts", f"{s.params_routed_experts:,} ({100 * s.params_routed_experts / s.params_total:.1f}%)"),
        ("params active / token", f"{s.params_active:,}"),
        ("checkpoint on disk", _mb(s.checkpoint_bytes)),
    ]
    rows += [(f"est. size, experts at {k}", _mb(v)) for k, v in s.estimated_bytes.items()]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _register_commands() -> None:
    """Commands living in their own modules register themselves on `app`."""
    import importlib

    for name in ("stats", "quantize", "prune", "merge", "compress_experts", "heal", "lint", "pipeline", "demo"):
        importlib.import_module(f"moecompress.cli.cmd_{name}").register(app)


_register_commands()


def main() -> None:
    import signal

    from moecompress.model.driver import limit_heap_arenas

    limit_heap_arenas()  # before any compute thread allocates (see its docstring)

    # A terminated run must clean up like Ctrl-C does (staging folders removed, no partial OUT). The
    # handler does it itself and exits: an exception raised from a signal handler is lost when the
    # signal lands while Python runs a finalizer or weakref callback ("Exception ignored in ...").
    def _terminate(_signum, _frame):
        from moecompress.api.output import abort_all_staging

        abort_all_staging()
        sys.stdout.flush()
        sys.stderr.write("interrupted (SIGTERM): no output was written\n")
        sys.stderr.flush()
        os._exit(130)

    signal.signal(signal.SIGTERM, _terminate)
    from moecompress.parallel import launched_by_torchrun

    if launched_by_torchrun() and os.environ.get("RANK", "0") != "0":
        # torchrun: rank 0 (the writer) speaks for the job; the other ranks' refusals are the same
        # lines, and an unexpected failure still reaches stderr as a traceback.
        from moecompress.cli.common import console

        console.quiet = True
        sys.stdout = open(os.devnull, "w")
    app()


if __name__ == "__main__":
    main()
