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
    bits_budget: float = typer.Option(None, "--bits-budget", help="mixed precision: average stored bits per routed-expert weight, scales included (uniform 3-bit, group 128 = 3.125)"),
    bit_choices: str = typer.Option("2,3,4,8", "--bit-choices", help="mixed precision: candidate widths, comma separated"),
    granularity: str = typer.Option("expert", help="mixed precision: a width per expert, or one per MoE layer (layer: loadable by vLLM)"),
    allocation: str = typer.Option("global", help="mixed precision: one budget over all layers (global) or one per layer (layer, MC-MoE)"),
    super_experts: str = typer.Option("pin", "--super-experts", help="mixed precision: pin super experts to the highest width, keep them unquantized, or none"),
    stats: Path = typer.Option(None, "--stats", help="mixed precision: folder holding (or receiving) the profile; stats.json there supplies super experts"),
    profile_method: str = typer.Option("rtn", "--profile-method", help="mixed precision: quantizer of the profiling sweep, rtn or gptq"),
    min_bits: int = typer.Option(None, "--min-bits", help="mixed precision: narrowest allowed width"),
    max_bits: int = typer.Option(None, "--max-bits", help="mixed precision: widest allowed width"),
    alpha: float = typer.Option(1.0, help="mixed precision: exponent of frequency and error in the cost"),
    beta: float = typer.Option(1.5, help="mixed precision: exponent of the routing-weight mass in the cost"),
    out_format: str = typer.Option("native", "--format", help="native (moecompress) or compressed-tensors (pack-quantized, for vLLM)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
) -> None:
    """Quantize routed experts (GPTQ per expert, calibrate-all-experts, AGQ) into a packed checkpoint.

    With --bits-budget: profile every expert's quantization error per width, allocate widths under the
    budget (MC-MoE PMQ, one global program), protect super experts, then quantize at those widths."""
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
    if out_format not in ("native", "compressed-tensors"):
        raise MoeCompressError(f"--format must be native or compressed-tensors, got {out_format!r}")
    if out_format == "compressed-tensors":
        from moecompress.export.compressed_tensors import check_no_expert_groups
        from moecompress.model.loading import read_config
        from moecompress.quant.hf_integration import native_config

        check_no_expert_groups((native_config(read_config(model)) or {}), str(model))
    mp = None
    if bits_budget is not None:
        mp = _mixed_precision_config(bits_budget, bit_choices, granularity, allocation, super_experts, profile_method, min_bits, max_bits, alpha, beta, out_format, cfg)
    prepare_output(out, overwrite)
    ids, calibration = None, {"source": "none (rtn)"}
    from moecompress.passes.profile import ExpertProfile

    profile_saved = mp is not None and stats is not None and ExpertProfile.exists(stats)
    if method == "gptq" or (mp is not None and not profile_saved):
        calib_set, calibration = calibration_for(model, calib, nsamples, seqlen, seed)
        ids = calib_set.input_ids
    mp_result = None

    def write_native(target: Path):
        progress, update = layer_progress("quantizing")
        if mp is None:
            with progress:
                return quantize_job(model, target, cfg, ids, calibration, overwrite=overwrite, batch_size=batch_size, progress=update) + (None,)
        from moecompress.passes.mixed_precision import mixed_precision_job

        with progress:  # one bar: the profiling sweep, then the quantization sweep
            return mixed_precision_job(
                model, target, mp, cfg, ids, calibration, stats_dir=stats, overwrite=overwrite,
                batch_size=batch_size, progress=update, profile_progress=update,
            )

    if out_format == "native":
        result, qpass, mp_result = write_native(out)
    else:
        from moecompress.export.compressed_tensors import write_via_native

        result, qpass, mp_result = write_via_native(out, overwrite, write_native)
        result.out = Path(out)
        result.output_bytes = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
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
    summary["format"] = out_format
    sections: list[str] = []
    if mp_result is not None:
        from moecompress.passes.mixed_precision import mixed_precision_sections

        summary["bits"] = f"mixed, budget {bits_budget:g}"
        summary["budget_used"] = round(mp_result.budget_written, 6)
        summary["average_bits_all_experts"] = round(mp_result.average_bits_all, 6)
        summary["objective"] = mp_result.plan.allocation.objective
        summary["protected"] = [{"layer": s.layer, "expert": s.expert} for s in mp_result.plan.protected]
        summary["profile_reused"] = mp_result.profile_reused
        summary["profile_seconds"] = None if mp_result.profile.seconds is None else round(mp_result.profile.seconds, 2)
        summary["allocation_seconds"] = round(mp_result.plan.seconds, 3)
        sections = mixed_precision_sections(result.out, mp, mp_result)
        if out_format == "compressed-tensors":
            from moecompress.export.lint import lint_checkpoint
            from moecompress.passes.mixed_precision import compressed_tensors_budget

            mp_result.profile.save(result.out / "profile")  # the native folder holding it is gone
            ct_budget = compressed_tensors_budget(result.out, mp_result.plan)
            sections += [f"- **budget used, recomputed from the compressed-tensors config**: {ct_budget:.4f}", ""]
            summary["lint_errors"] = len(lint_checkpoint(result.out).errors)
    write_quantize_report(result.out / "report.md", "moecompress quantize", summary, qpass.report, sections)
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


def _mixed_precision_config(budget, bit_choices, granularity, allocation, super_experts, profile_method, min_bits, max_bits, alpha, beta, out_format, cfg):
    """The validated mixed-precision options (infeasible budgets fail here, before calibration loads)."""
    from moecompress.passes.mixed_precision import MixedPrecisionConfig, check_budget_feasible

    try:
        choices = tuple(int(b) for b in bit_choices.split(",") if b.strip())
    except ValueError:
        raise MoeCompressError(f"--bit-choices must be comma-separated integers like 2,3,4,8, got {bit_choices!r}") from None
    mp = MixedPrecisionConfig(
        budget=budget, bit_choices=choices, allocation=allocation, granularity=granularity, alpha=alpha, beta=beta,
        min_bits=min_bits, max_bits=max_bits, super_experts=super_experts, profile_method=profile_method, export_format=out_format,
    )
    mp.validate()
    check_budget_feasible(mp, cfg.group_size, cfg.symmetric)
    return mp


def register(app: typer.Typer) -> None:
    app.command("quantize")(user_errors(quantize))
    app.command("eval")(user_errors(evaluate))
