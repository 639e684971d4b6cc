"""`moecompress quantize` and `moecompress eval`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from moecompress.cli.common import console, print_json, quiet_transformers, user_errors
from moecompress.errors import MoeCompressError


def layer_progress(description: str):
    """A rich progress bar over decoder layers and the callback the driver calls."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"), TimeElapsedColumn(), console=console, transient=True)
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def quantize(
    model: Path = typer.Argument(..., help="model folder (save_pretrained layout)"),
    out: Path = typer.Argument(..., help="output folder for the packed checkpoint"),
    bits: int = typer.Option(4, help="expert width: 2, 3, 4 or 8"),
    group_size: int = typer.Option(128, help="quantization group size along the input dimension"),
    symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="symmetric grid or with zero points"),
    method: str = typer.Option("gptq", help="gptq or rtn"),
    calib: str = typer.Option("mixed", help="calibration source: a built-in set name, a .txt/.jsonl file, a folder, or 'self'"),
    nsamples: int = typer.Option(128, help="calibration sequences"),
    seqlen: int = typer.Option(512, help="tokens per calibration sequence"),
    seed: int = typer.Option(0, help="seed for calibration sampling"),
    calibrate_all_experts: bool = typer.Option(True, "--calibrate-all-experts/--no-calibrate-all-experts", help="every token feeds every expert's Hessian"),
    agq: bool = typer.Option(True, "--agq/--no-agq", help="weight Hessian contributions by routing affinity (MoEQuant AGQ)"),
    damp: float = typer.Option(0.01, help="GPTQ damping (fraction of the mean Hessian diagonal)"),
    act_order: bool = typer.Option(False, "--act-order/--no-act-order", help="GPTQ activation order (static groups)"),
    fallback: str = typer.Option("rtn", help="for experts with too few tokens: rtn or damped-gptq"),
    min_tokens_fraction: float = typer.Option(0.005, help="experts with fewer routed tokens than this fraction fall back"),
    quantize_attention: bool = typer.Option(False, "--quantize-attention", help="quantize attention projections too"),
    attention_bits: int = typer.Option(8, help="width for attention when --quantize-attention"),
    shared_expert_bits: int = typer.Option(None, help="width for shared experts (default: --bits; 16 keeps them dense)"),
    batch_size: int = typer.Option(8, help="calibration batch size"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
) -> None:
    """Quantize routed experts (GPTQ per expert, calibrate-all-experts, AGQ) into a packed checkpoint."""
    from moecompress.export.writer import prepare_output
    from moecompress.jobs import calibration_for, peak_rss_bytes, quantize_job
    from moecompress.passes.quantize import QuantizeConfig
    from moecompress.passes.quantize_report import write_quantize_report

    quiet_transformers()
    cfg = QuantizeConfig(
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        method=method,
        calibrate_all_experts=calibrate_all_experts,
        agq=agq,
        damp=damp,
        act_order=act_order,
        fallback=fallback,
        min_tokens_fraction=min_tokens_fraction,
        attention_bits=attention_bits if quantize_attention else None,
        shared_expert_bits=shared_expert_bits,
    )
    cfg.validate()
    prepare_output(out, overwrite)
    ids, calibration = None, {"source": "none (rtn)"}
    if method == "gptq":
        calib_set, calibration = calibration_for(model, calib, nsamples, seqlen, seed)
        ids = calib_set.input_ids
    progress, update = layer_progress("quantizing")
    with progress:
        result, qpass = quantize_job(model, out, cfg, ids, calibration, overwrite=overwrite, batch_size=batch_size, progress=update)
    summary = {
        "model": str(model),
        "out": str(result.out),
        "bits": bits,
        "group_size": group_size,
        "method": method,
        "calibration": calibration,
        "calibrate_all_experts": calibrate_all_experts,
        "agq": agq,
        "seconds": round(result.seconds, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "input_bytes": result.input_bytes,
        "output_bytes": result.output_bytes,
        "fallbacks": [{"layer": r.layer, "expert": r.expert, "tokens": r.tokens, "method": r.method} for r in qpass.report.fallbacks()],
    }
    write_quantize_report(result.out / "report.md", "moecompress quantize", summary, qpass.report)
    if as_json:
        print_json(summary)
    else:
        console.print(f"wrote [bold]{result.out}[/] ({result.output_bytes / 2**20:.1f} MiB from {result.input_bytes / 2**20:.1f} MiB) in {result.seconds:.1f}s; report: {result.out / 'report.md'}")
        for fb in summary["fallbacks"]:
            console.print(f"[yellow]fallback:[/] layer {fb['layer']} expert {fb['expert']} saw {fb['tokens']} tokens -> {fb['method']}")


def evaluate(
    model: Path = typer.Argument(..., help="model folder (original or compressed)"),
    data: Path = typer.Option(..., "--data", help="text file to measure perplexity on"),
    seqlen: int = typer.Option(256, help="chunk length (non-overlapping chunks)"),
    max_tokens: int = typer.Option(None, help="only the first N tokens of the file"),
    batch_size: int = typer.Option(8, help="chunks per forward"),
    as_json: bool = typer.Option(False, "--json", help='print {"ppl": ..., "tokens": ...}'),
) -> None:
    """Perplexity of a model folder on a text file, plus its size on disk and in memory."""
    from moecompress.evaluate import evaluate as run_eval

    quiet_transformers()
    if max_tokens is not None and max_tokens < seqlen:
        raise MoeCompressError(f"--max-tokens {max_tokens} is smaller than one chunk of --seqlen {seqlen}")
    r = run_eval(model, data, seqlen=seqlen, max_tokens=max_tokens, batch_size=batch_size)
    if as_json:
        print_json(r.as_json())
    else:
        console.print(f"perplexity {r.ppl:.4f} over {r.tokens} tokens ({r.chunks} chunks of {seqlen}); disk {r.disk_bytes / 2**20:.1f} MiB, memory {r.memory_bytes / 2**20:.1f} MiB; {r.seconds:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("quantize")(user_errors(quantize))
    app.command("eval")(user_errors(evaluate))
