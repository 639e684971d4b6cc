"""The `moecompress` command line. Thin: parse, validate, call the library, render with rich."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moecompress.cli.common import console, print_json, quiet_transformers, user_errors

app = typer.Typer(
    name="moecompress",
    help="Post-training compression for Mixture-of-Experts LLMs (Hugging Face checkpoints).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Post-training compression for Mixture-of-Experts LLMs (Hugging Face checkpoints)."""


@app.command()
@user_errors
def inspect(
    model: Path = typer.Argument(..., help="model folder (save_pretrained layout)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    group_size: int = typer.Option(128, help="group size assumed for the size estimates"),
) -> None:
    """What the model is made of: MoE layers, experts, router, parameter counts, sizes per bit width."""
    from moecompress.model.inspect import summarize

    quiet_transformers()
    s = summarize(model, group_size=group_size)
    if as_json:
        print_json(s.as_json())
        return
    t = Table(title=f"{model}", show_header=False)
    rows = [
        ("model type", s.model_type + (" (generic path)" if s.generic_path else "")),
        ("layers", f"{s.num_layers} ({len(s.moe_layers)} MoE: {s.moe_layers})"),
        ("experts / top-k", f"{s.num_experts} / {s.top_k}"),
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

    for name in ("stats", "quantize", "prune", "pipeline", "demo", "compress_experts"):
        try:
            module = importlib.import_module(f"moecompress.cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"moecompress.cli.cmd_{name}":
                continue  # not built yet
            raise
        module.register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
