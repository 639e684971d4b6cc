"""`moecompress prune`: fewer experts, written as a standard checkpoint (``merge`` is cmd_merge.py).

OUT loads with plain ``AutoModelForCausalLM.from_pretrained(OUT)`` (no moecompress import) and holds
``kept_experts.json`` (which original experts each new slot comes from) and ``report.md``.
"""

from __future__ import annotations

from pathlib import Path
import typer

from moecompress.cli.common import (
    AS_JSON,
    DRY_RUN,
    OVERWRITE,
    SAVE_PIPELINE,
    console,
    options_from,
    print_json,
    print_notes,
    quiet_transformers,
    run_api,
    seconds_line,
    user_errors,
)


def print_result(result, as_json: bool) -> None:
    """The summary line of prune and merge."""
    if result.dry_run:
        return
    d = result.summary
    if as_json:
        print_json(result.as_json())
        return
    stored = d.get("distinct_experts_after")
    after = f"{d['experts_after']}" if stored in (None, d["experts_after"]) else f"{d['experts_after']} router outputs, {stored:g} stored"
    console.print(
        f"wrote [bold]{result.out}[/]: {d['experts_before']} -> {after} experts per MoE layer, "
        f"{d['input_bytes'] / 2**20:.1f} -> {d['output_bytes'] / 2**20:.1f} MiB in {seconds_line(result)}; "
        f"report: {result.out / 'report.md'}",
        highlight=False,
    )
    print_notes(result)
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
}


def shared(name: str):
    default, flags, help_text = _SHARED_OPTIONS[name]
    return typer.Option(default, *flags, help=help_text)


def prune(
    model: Path = typer.Argument(..., help="model folder (save_pretrained layout)"),
    out: Path = typer.Argument(..., help="output folder: a standard checkpoint with fewer experts"),
    method: str = typer.Option("reap", help="reap (REAP saliency; best measured on the testbed), frequency (least routed) or dern (drop + recombine neurons)"),
    keep_ratio: float = typer.Option(None, "--keep-ratio", help="fraction of experts kept per layer, in (0, 1]"),
    num_experts: int = typer.Option(None, "--num-experts", help="experts kept per layer (instead of --keep-ratio)"),
    stats: Path = shared("stats"),
    calib: str = shared("calib"),
    nsamples: int = shared("nsamples"),
    seqlen: int = shared("seqlen"),
    seed: int = shared("seed"),
    batch_size: int = shared("batch_size"),
    refit: bool = shared("refit"),
    refit_damp: float = shared("refit_damp"),
    refit_sweeps: int = shared("refit_sweeps"),
    similarity_threshold: float = typer.Option(0.6, help="DERN: a dropped neuron joins a kept expert above this cosine"),
    use_gate_in_similarity: bool = typer.Option(False, "--use-gate-in-similarity/--no-gate-in-similarity", help="DERN: include the gate row in neuron similarity"),
    protect_super_experts: bool = typer.Option(True, "--protect-super-experts/--no-protect-super-experts", help="never prune super experts"),
    eval_data: Path = shared("eval_data"),
    eval_seqlen: int = shared("eval_seqlen"),
    eval_max_tokens: int = shared("eval_max_tokens"),
    overwrite: bool = OVERWRITE,
    dry_run: bool = DRY_RUN,
    save_pipeline: Path = SAVE_PIPELINE,
    as_json: bool = AS_JSON,
) -> None:
    """Drop experts (frequency, REAP or DERN) and write the same architecture with fewer experts."""
    from moecompress.api.prune import PruneOptions, prune as run

    quiet_transformers()
    options = PruneOptions(**options_from(PruneOptions, locals()))
    print_result(run_api("prune", run, model, out, options, overwrite, dry_run, save_pipeline, "statistics, then rewrite"), as_json)


def register(app: typer.Typer) -> None:
    app.command("prune")(user_errors(prune))
