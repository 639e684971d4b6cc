"""`moecompress merge`: M-SMoE expert merging into a standard checkpoint (or, with --router exact, a
native one holding E' experts behind the expert -> group map).
"""

from __future__ import annotations

from pathlib import Path

import typer

from moecompress.cli.cmd_prune import print_result, shared
from moecompress.cli.common import AS_JSON, DRY_RUN, OVERWRITE, SAVE_PIPELINE, options_from, quiet_transformers, run_api, user_errors


def merge(
    model: Path = typer.Argument(..., help="model folder (save_pretrained layout)"),
    out: Path = typer.Argument(..., help="output folder: a standard checkpoint (--router exact: native, loads after import moecompress)"),
    num_experts: int = typer.Option(..., "--num-experts", help="merged experts per layer (the average over layers with the global threshold)"),
    method: str = typer.Option("msmoe", help="msmoe (M-SMoE: align, group by router similarity, frequency-weighted merge)"),
    router: str = typer.Option("standard", help="standard (E' router rows: a plain checkpoint), exact (M-SMoE's expert -> group map: E' experts, native checkpoint, loads after import moecompress) or exact-slots (exact routing in a plain checkpoint: E slots share merged weights, same size)"),
    router_mode: str = typer.Option(None, help="standard router rows: dominant, weighted, logsumexp_approx (needs a router bias) or fitted (fitted on calibration to the exact per-group routing mass; bias-free softmax routers)"),
    per_layer: bool = typer.Option(None, "--per-layer/--global", help="same group count in every layer, or MC-SMoE's global frequency threshold (default: per-layer for standard, global for exact and exact-slots)"),
    dominance: str = typer.Option("frequency", help="which experts dominate the groups: frequency (M-SMoE) or reap (REAP saliency)"),
    grouping: str = typer.Option("auto", help="which dominant a member joins: router (M-SMoE: most similar router-logit column), output (closest expert output on the member's calibration tokens) or auto (output with the exact routers, router with the standard one)"),
    merge_weights: str = typer.Option("regmean", help="how aligned members are combined: regmean (our default: least squares on each member's calibration inputs) or frequency (M-SMoE's frequency-weighted average)"),
    stats: Path = shared("stats"),
    calib: str = shared("calib"),
    nsamples: int = shared("nsamples"),
    seqlen: int = shared("seqlen"),
    seed: int = shared("seed"),
    batch_size: int = shared("batch_size"),
    refit: bool = shared("refit"),
    refit_damp: float = shared("refit_damp"),
    refit_sweeps: int = shared("refit_sweeps"),
    protect_super_experts: bool = typer.Option(True, "--protect-super-experts/--no-protect-super-experts", help="super experts stay singleton groups"),
    eval_data: Path = shared("eval_data"),
    eval_seqlen: int = shared("eval_seqlen"),
    eval_max_tokens: int = shared("eval_max_tokens"),
    overwrite: bool = OVERWRITE,
    dry_run: bool = DRY_RUN,
    save_pipeline: Path = SAVE_PIPELINE,
    as_json: bool = AS_JSON,
) -> None:
    """Merge experts (M-SMoE) and write a checkpoint with fewer distinct experts."""
    from moecompress.api.merge import MergeOptions, merge as run

    quiet_transformers()
    options = MergeOptions(**options_from(MergeOptions, locals()))
    print_result(run_api("merge", run, model, out, options, overwrite, dry_run, save_pipeline, "statistics, then merge"), as_json)


def register(app: typer.Typer) -> None:
    app.command("merge")(user_errors(merge))
