"""`moecompress stats`: router and expert statistics over a calibration set, with a report.

Writes DIR/stats.json, DIR/stats.safetensors, DIR/report.md and PNG figures. Everything is written to a
temporary folder beside DIR and renamed into place at the end, so an error or Ctrl-C leaves no partial DIR.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moecompress.cli.common import console, print_json, quiet_transformers, user_errors
from moecompress.errors import MoeCompressError



def stats(
    model: Path = typer.Argument(..., help="model folder (save_pretrained layout)"),
    calib: str = typer.Option(..., "--calib", help="calibration: prose|code|math|multilingual|chat|mixed|self|sample, a .txt/.jsonl file or a folder"),
    out: Path = typer.Option(..., "--out", help="output folder (must not exist unless --overwrite)"),
    nsamples: int = typer.Option(64, help="calibration sequences"),
    seqlen: int = typer.Option(256, help="tokens per sequence"),
    seed: int = typer.Option(0, help="seed for drawing calibration windows"),
    batch_size: int = typer.Option(8, help="sequences per forward"),
    coverage_threshold: float = typer.Option(0.1, help="an expert with fewer than this x its uniform share (k/E x tokens) selections is starved"),
    super_percentile: float = typer.Option(99.5, help="super experts: percentile of the pooled max |output|"),
    super_ratio: float = typer.Option(0.1, help="super experts: fraction of the largest max |output|"),
    coverage_layer: int | None = typer.Option(None, help="MoE layer for the per-layer figures (default: the least covered)"),
    as_json: bool = typer.Option(False, "--json", help="print stats.json to stdout"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
) -> None:
    """Router statistics: expert load, co-activation, REAP scores, super experts and coverage, with a report."""
    from moecompress.calibration.stats import collect_stats, write_stats_report
    from moecompress.model.loading import LayerwiseModel

    quiet_transformers()
    _check_out(out, overwrite)
    if batch_size < 1:
        raise MoeCompressError(f"--batch-size must be at least 1, got {batch_size}")
    if coverage_threshold < 0:
        raise MoeCompressError(f"--coverage-threshold must be >= 0, got {coverage_threshold}")
    lm = LayerwiseModel(model)  # meta skeleton: validates the folder and the architecture cheaply
    if coverage_layer is not None and coverage_layer not in lm.view.blocks:
        raise MoeCompressError(f"--coverage-layer {coverage_layer} is not an MoE layer; MoE layers: {lm.view.moe_layers}")
    calibration = _calibration(model, calib, nsamples, seqlen, seed, lm.config)

    with _layer_progress() as progress:
        task = progress.add_task("collecting statistics", total=lm.view.num_layers)
        result = collect_stats(
            lm,
            calibration,
            batch_size=batch_size,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            super_expert_percentile=super_percentile,
            super_expert_ratio=super_ratio,
            coverage_threshold=coverage_threshold,
        )
    result.calibration["seed"] = seed
    _write_atomically(out, overwrite, lambda tmp: (result.save(tmp), write_stats_report(result, tmp, coverage_layer)))

    if as_json:
        print_json(result.to_json())
    _print_summary(result, out)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MoeCompressError(f"--out {out} exists and is not a folder; choose another path")
    if out.exists() and not overwrite:
        raise MoeCompressError(f"--out {out} already exists; pass --overwrite to replace it or choose another folder")


def _calibration(model: Path, source: str, nsamples: int, seqlen: int, seed: int, config):
    """The calibration set: text through the model's tokenizer, or EBSS samples from the model itself."""
    from moecompress.calibration.sources import MODEL_SOURCES, load_calibration

    max_positions = getattr(config, "max_position_embeddings", None)
    tokenizer = _tokenizer(model, required=source not in MODEL_SOURCES)
    generator = None
    if source in MODEL_SOURCES:
        from moecompress.model.loading import LayerwiseModel

        with console.status(f"loading the model to generate calibration text ({source})"):
            generator = LayerwiseModel(model).load_full()
        what = "EBSS (slow on CPU)" if source == "self" else "sampling at temperature 1"
        console.print(f"generating {nsamples} x {seqlen} tokens with {what} ...")
    try:
        return load_calibration(source, tokenizer, nsamples, seqlen, seed=seed, model=generator, max_positions=max_positions)
    finally:
        del generator  # free the full model before the layer-by-layer pass


def _tokenizer(model: Path, required: bool):
    """The model folder's tokenizer; None (or an error when ``required``) if it has none."""
    from transformers import AutoTokenizer

    from moecompress.jobs import TOKENIZER_FILES, has_tokenizer_files

    # transformers 5 builds an EMPTY tokenizer from the config alone when no tokenizer file exists, so
    # look for the files instead of trusting from_pretrained to fail.
    if not has_tokenizer_files(model):
        if required:
            raise MoeCompressError(
                f"{model} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); save the tokenizer into the model "
                "folder or use --calib self or --calib sample"
            )
        return None
    try:
        return AutoTokenizer.from_pretrained(str(model))
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a broken tokenizer
        if not required:
            return None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MoeCompressError(
            f"cannot load the tokenizer of {model} ({first[:160]}); re-save it or use --calib self"
        ) from None


def _layer_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("layers"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _write_atomically(out: Path, overwrite: bool, write) -> None:
    """Run ``write(tmp_folder)`` in a temporary folder beside ``out``, then rename it to ``out``."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        write(tmp)
        if out.exists():
            if not overwrite:  # appeared while we worked
                raise MoeCompressError(f"--out {out} already exists; pass --overwrite to replace it")
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)  # put the previous results back
            old = None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _print_summary(result, out: Path) -> None:
    table = Table(title=f"router statistics: {result.model}")
    for col in ("layer", "tokens", "load CV", "min load", "max load", "starved", "max |out|"):
        table.add_column(col, justify="right")
    starved = {}
    for s in result.coverage.get("starved", []):
        starved.setdefault(s["layer"], []).append(s["expert"])
    for i in result.moe_layers:
        s = result.layers[i]
        ratio = s.load_ratio
        table.add_row(
            str(i), f"{s.tokens:,}", f"{s.load_cv:.3f}", f"{float(ratio.min()):.2f}x", f"{float(ratio.max()):.2f}x",
            str(len(starved.get(i, []))), f"{float(s.output_max.max()):.4g}",
        )
    console.print(table)
    tokens = result.calibration.get("tokens", 0)
    speed = f", {tokens / result.seconds:,.0f} tokens/s" if result.seconds else ""
    console.print(f"expert-load CV (mean over layers): {result.load_cv:.4f}{speed}")
    if result.super_experts:
        found = ", ".join(f"layer {s.layer} expert {s.expert} ({s.max_abs:.4g})" for s in result.super_experts)
        console.print(f"super experts: {found}")
    else:
        console.print("super experts: none")
    threshold = result.coverage.get("threshold", 0.0)
    for layer, experts in starved.items():
        console.print(
            f"[yellow]warning:[/] layer {layer}: experts {experts} are starved "
            f"(< {threshold:g} x uniform share of the calibration tokens)",
            highlight=False,
        )
    console.print(f"wrote {out}/stats.json, stats.safetensors, report.md")


def register(app: typer.Typer) -> None:
    app.command("stats")(user_errors(stats))
