"""`moecompress quantize` and `moecompress eval`."""

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
from moecompress.errors import MoeCompressError


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
    granularity: str = typer.Option(None, help="mixed precision: a width per expert (default), or one per MoE layer (layer: loadable by vLLM; the default for --target vllm)"),
    allocation: str = typer.Option("global", help="mixed precision: one budget over all layers (global) or one per layer (layer, MC-MoE)"),
    super_experts: str = typer.Option("pin", "--super-experts", help="mixed precision: pin super experts to the highest width, keep them unquantized, or none"),
    stats: Path = typer.Option(None, "--stats", help="mixed precision: folder holding (or receiving) the profile; stats.json there supplies super experts"),
    profile_method: str = typer.Option("rtn", "--profile-method", help="mixed precision: quantizer of the profiling sweep, rtn or gptq"),
    min_bits: int = typer.Option(None, "--min-bits", help="mixed precision: narrowest allowed width"),
    max_bits: int = typer.Option(None, "--max-bits", help="mixed precision: widest allowed width"),
    alpha: float = typer.Option(1.0, help="mixed precision: exponent of frequency and error in the cost"),
    beta: float = typer.Option(1.5, help="mixed precision: exponent of the routing-weight mass in the cost"),
    format: str = typer.Option("native", "--format", help="native (moecompress) or compressed-tensors (pack-quantized, for vLLM)"),
    target: str = typer.Option(None, "--target", help="where the checkpoint will run: native (moecompress, any width per expert), vllm (compressed-tensors; 4-bit sym/asym or 8-bit sym experts, one width per MoE layer) or hf (compressed-tensors, one symmetric width for all experts); refuses what the target cannot run and sets --format"),
    vllm_version: str = typer.Option(None, "--vllm-version", help="--target vllm: the vLLM release to run on: 0.33 (default, oldest supported) or humming (newer vLLM with the Humming MoE path: 2-bit sym experts too)"),
    transformers_version: str = typer.Option(None, "--transformers-version", help="--target hf: the transformers release to load with: 5.24 (default, oldest supported: attention / shared experts at the experts' width) or 5.25 (one own width for them)"),
    device: str = typer.Option(None, "--device", help="where the solver math runs (cpu, cuda, cuda:1); default: CUDA when available, else the CPU"),
    solve_memory_mb: int | None = typer.Option(None, "--solve-memory-mb", help="solver memory (Hessians, factors) per batch of experts, MiB; larger layers are solved in chunks [default: 16 on the CPU, 4096 on CUDA]"),
    overwrite: bool = OVERWRITE,
    dry_run: bool = DRY_RUN,
    save_pipeline: Path = SAVE_PIPELINE,
    as_json: bool = AS_JSON,
) -> None:
    """Quantize routed experts (GPTQ per expert, calibrate-all-experts, AGQ) into a packed checkpoint.

    With --bits-budget: profile every expert's quantization error per width, allocate widths under the
    budget (MC-MoE PMQ, one global program), protect super experts, then quantize at those widths."""
    from moecompress.api.quantize import QuantizeOptions, quantize as run

    quiet_transformers()
    options = QuantizeOptions(**options_from(QuantizeOptions, locals()))
    result = run_api("quantize", run, model, out, options, overwrite, dry_run, save_pipeline, "quantizing")
    if result.dry_run or result.out is None:  # out None: a torchrun rank that wrote nothing (rank 0 speaks)
        return
    if as_json:
        print_json(result.as_json())
        return
    s = result.summary
    console.print(f"wrote [bold]{result.out}[/] ({s['output_bytes'] / 2**20:.1f} MiB from {s['input_bytes'] / 2**20:.1f} MiB) "
                  f"in {seconds_line(result)}; report: {result.out / 'report.md'}")
    print_notes(result)


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
    from moecompress.model.hub import resolve_model

    r = run_eval(resolve_model(model), data, seqlen=seqlen, max_tokens=max_tokens, batch_size=batch_size)
    if as_json:
        print_json(r.as_json())
    else:
        console.print(f"perplexity {r.ppl:.4f} over {r.tokens} tokens ({r.chunks} chunks of {seqlen}); disk {r.disk_bytes / 2**20:.1f} MiB, memory {r.memory_bytes / 2**20:.1f} MiB; {r.seconds:.1f}s")
        if r.loaded != "from_pretrained":
            console.print(f"note: weights {r.loaded}; memory is that dense float32 copy's")


def register(app: typer.Typer) -> None:
    app.command("quantize")(user_errors(quantize))
    app.command("eval")(user_errors(evaluate))
