"""`moecompress prune` and `moecompress merge`: fewer experts, written as a standard checkpoint.

OUT loads with plain ``AutoModelForCausalLM.from_pretrained(OUT)`` (no moecompress import) and holds
``kept_experts.json`` (which original experts each new slot comes from) and ``report.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moecompress.cli.common import console, print_json, quiet_transformers, user_errors


def _progress() -> tuple[Progress, Callable[[int, int], None]]:
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"), TimeElapsedColumn(),
        console=console, transient=True,
    )
    task = bar.add_task("statistics, then rewrite", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _source(stats: Path | None, calib: str, nsamples: int, seqlen: int, seed: int, batch_size: int):
    from moecompress.jobs_experts import StatsSource

    return StatsSource(stats_dir=stats, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)


def _eval(eval_data: Path | None, eval_seqlen: int, eval_max_tokens: int | None):
    from moecompress.jobs_experts import EvalRequest

    return None if eval_data is None else EvalRequest(eval_data, eval_seqlen, eval_max_tokens)


def _print_result(result, as_json: bool) -> None:
    d = result.details
    if as_json:
        print_json(d)
        return
    console.print(
        f"wrote [bold]{result.out}[/]: {d['experts_before']} -> {d['experts_after']} experts per MoE layer, "
        f"{d['input_bytes'] / 2**20:.1f} -> {d['output_bytes'] / 2**20:.1f} MiB in {d['seconds']:.1f}s; "
        f"report: {result.out / 'report.md'}",
        highlight=False,
    )
    if d.get("super_experts"):
        found = ", ".join(f"layer {s['layer']} expert {s['expert']}" for s in d["super_experts"])
        console.print(f"super experts kept: {found}", highlight=False)
    ev = d.get("eval")
    if ev:
        console.print(f"perplexity {ev['ppl_before']:.4f} -> {ev['ppl_after']:.4f} ({100 * ev['change']:+.2f}%)", highlight=False)


# Options shared by both commands: name -> (default, flag declarations, help). ``_shared(name)`` makes a
# fresh typer.Option each time (typer reads a parameter's default from its own Option object).
_SHARED_OPTIONS = {
    "stats": (None, ("--stats",), "statistics folder from `moecompress stats` (skips the statistics sweep)"),
    "calib": ("mixed", (), "calibration for the statistics (when no --stats) and the refit: "
                           "prose|code|math|multilingual|chat|mixed|self|sample, a .txt/.jsonl file, a folder"),
    "nsamples": (64, (), "calibration sequences"),
    "seqlen": (256, (), "tokens per calibration sequence"),
    "seed": (0, (), "seed for drawing (or sampling) calibration windows"),
    "batch_size": (8, (), "sequences per forward"),
    "refit": (True, ("--refit/--no-refit",), "re-solve the rebuilt experts' down projections to reproduce each original "
              "layer's routed output on the calibration set (moecompress's extension; --no-refit: the paper method alone)"),
    "refit_damp": (0.1, (), "refit: ridge towards the pruned/merged weights, relative to the mean Gram diagonal"),
    "refit_sweeps": (2, (), "refit: block-coordinate-descent sweeps over a layer's experts"),
    "eval_data": (None, ("--eval-data",), "text file: perplexity before and after, in report.md"),
    "eval_seqlen": (256, (), "chunk length for --eval-data"),
    "eval_max_tokens": (40000, (), "first N tokens of --eval-data"),
    "overwrite": (False, ("--overwrite",), "replace OUT if it exists"),
    "as_json": (False, ("--json",), "print a JSON summary"),
}


def _shared(name: str):
    default, flags, help_text = _SHARED_OPTIONS[name]
    return typer.Option(default, *flags, help=help_text)


def _refit(refit: bool, damp: float, sweeps: int):
    from moecompress.passes.refit import RefitConfig

    if not refit:
        return None
    cfg = RefitConfig(damp=damp, sweeps=sweeps)
    cfg.validate()
    return cfg


def prune(
    model: Path = typer.Argument(..., help="model folder (save_pretrained layout)"),
    out: Path = typer.Argument(..., help="output folder: a standard checkpoint with fewer experts"),
    method: str = typer.Option("reap", help="reap (REAP saliency; best measured on the testbed), frequency (least routed) or dern (drop + recombine neurons)"),
    keep_ratio: float = typer.Option(None, "--keep-ratio", help="fraction of experts kept per layer, in (0, 1]"),
    num_experts: int = typer.Option(None, "--num-experts", help="experts kept per layer (instead of --keep-ratio)"),
    stats: Path = _shared("stats"),
    calib: str = _shared("calib"),
    nsamples: int = _shared("nsamples"),
    seqlen: int = _shared("seqlen"),
    seed: int = _shared("seed"),
    batch_size: int = _shared("batch_size"),
    refit: bool = _shared("refit"),
    refit_damp: float = _shared("refit_damp"),
    refit_sweeps: int = _shared("refit_sweeps"),
    similarity_threshold: float = typer.Option(0.6, help="DERN: a dropped neuron joins a kept expert above this cosine"),
    use_gate_in_similarity: bool = typer.Option(False, "--use-gate-in-similarity/--no-gate-in-similarity", help="DERN: include the gate row in neuron similarity"),
    protect_super_experts: bool = typer.Option(True, "--protect-super-experts/--no-protect-super-experts", help="never prune super experts"),
    eval_data: Path = _shared("eval_data"),
    eval_seqlen: int = _shared("eval_seqlen"),
    eval_max_tokens: int = _shared("eval_max_tokens"),
    overwrite: bool = _shared("overwrite"),
    as_json: bool = _shared("as_json"),
) -> None:
    """Drop experts (frequency, REAP or DERN) and write the same architecture with fewer experts."""
    from moecompress.jobs_experts import prune_job
    from moecompress.passes.prune import PruneConfig

    quiet_transformers()
    cfg = PruneConfig(
        method=method, keep_ratio=keep_ratio, num_experts=num_experts, similarity_threshold=similarity_threshold,
        use_gate_in_similarity=use_gate_in_similarity, protect_super_experts=protect_super_experts,
    )
    cfg.validate()
    bar, update = _progress()
    with bar:
        result, _ = prune_job(
            model, out, cfg, _source(stats, calib, nsamples, seqlen, seed, batch_size), overwrite=overwrite,
            eval_request=_eval(eval_data, eval_seqlen, eval_max_tokens), progress=update,
            refit=_refit(refit, refit_damp, refit_sweeps),
        )
    _print_result(result, as_json)


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
    stats: Path = _shared("stats"),
    calib: str = _shared("calib"),
    nsamples: int = _shared("nsamples"),
    seqlen: int = _shared("seqlen"),
    seed: int = _shared("seed"),
    batch_size: int = _shared("batch_size"),
    refit: bool = _shared("refit"),
    refit_damp: float = _shared("refit_damp"),
    refit_sweeps: int = _shared("refit_sweeps"),
    protect_super_experts: bool = typer.Option(True, "--protect-super-experts/--no-protect-super-experts", help="super experts stay singleton groups"),
    eval_data: Path = _shared("eval_data"),
    eval_seqlen: int = _shared("eval_seqlen"),
    eval_max_tokens: int = _shared("eval_max_tokens"),
    overwrite: bool = _shared("overwrite"),
    as_json: bool = _shared("as_json"),
) -> None:
    """Merge experts (M-SMoE) and write a checkpoint with fewer distinct experts."""
    from moecompress.jobs_experts import merge_job
    from moecompress.passes.merge import DEFAULT_ROUTER_MODE, MergeConfig

    quiet_transformers()
    cfg = MergeConfig(
        num_experts=num_experts, method=method, router=router, router_mode=router_mode or DEFAULT_ROUTER_MODE,
        per_layer=per_layer, protect_super_experts=protect_super_experts, dominance=dominance,
        merge_weights=merge_weights, grouping=grouping,
    )
    cfg.validate()
    bar, update = _progress()
    with bar:
        result, _ = merge_job(
            model, out, cfg, _source(stats, calib, nsamples, seqlen, seed, batch_size), overwrite=overwrite,
            eval_request=_eval(eval_data, eval_seqlen, eval_max_tokens), progress=update,
            refit=_refit(refit, refit_damp, refit_sweeps),
        )
    _print_result(result, as_json)


def register(app: typer.Typer) -> None:
    app.command("prune")(user_errors(prune))
    app.command("merge")(user_errors(merge))
