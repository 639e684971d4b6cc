"""`moecompress heal`: a short knowledge distillation of a compressed model towards the original."""

from __future__ import annotations

from pathlib import Path

import typer

from moecompress.cli.common import (
    AS_JSON,
    DRY_RUN,
    OVERWRITE,
    SAVE_PIPELINE,
    LayerProgress,
    console,
    options_from,
    print_json,
    print_notes,
    quiet_transformers,
    run_api,
    seconds_line,
    user_errors,
)


class StepProgress(LayerProgress):
    """Per-step progress of a training run ("heal layer 3/6: 40/100 steps"): a bar on a terminal, and
    otherwise a line every tenth of the steps (logs stay short)."""

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
        elif done == total or done % max(1, total // 10) == 0:
            console.print(f"{self.description}: {done}/{total} steps", highlight=False)


def heal(
    model: Path = typer.Argument(..., help="the compressed model (student): pruned, merged, compressed experts or dense"),
    out: Path = typer.Argument(..., help="output folder: the healed model, in the student's format"),
    teacher: str = typer.Option(None, "--teacher", help="the original model the student was compressed from (required)"),
    mode: str = typer.Option("blockwise", help="blockwise: one decoder layer at a time, hidden states on disk (any model size); "
                             "end-to-end: logit KL over the whole model (it must fit in memory in float32; refused up front otherwise)"),
    train: str = typer.Option(None, help="what trains, comma list of ces,routers,lora,norms (default: all the student has); "
                              "embeddings and the head never train; LoRA is merged into the expert weights at the end"),
    steps: int = typer.Option(100, help="Adam steps per decoder layer (blockwise) or in all (end-to-end)"),
    lr: float = typer.Option(1e-3, help="Adam learning rate"),
    lora_lr: float = typer.Option(None, "--lora-lr", help="Adam learning rate of the LoRA adapters (default: --lr); adapters "
                                  "usually need a smaller one than ces scaling vectors"),
    router_lr: float = typer.Option(None, "--router-lr", help="Adam learning rate of the routers (default: --lr); routers "
                                    "usually need a much smaller one than ces scaling vectors"),
    norm_lr: float = typer.Option(None, "--norm-lr", help="Adam learning rate of the norms (default: --lr)"),
    lora_rank: int = typer.Option(8, help="rank of the LoRA adapters on each expert's fused weights"),
    batch_size: int = typer.Option(8, help="calibration sequences per step"),
    temperature: float = typer.Option(1.0, help="end-to-end: distillation temperature T (loss T^2 KL)"),
    top_k: int = typer.Option(1024, help="end-to-end: teacher log-probabilities kept per token (the rest: one tail bucket)"),
    holdout_fraction: float = typer.Option(0.1, help="calibration sequences held back: never trained on, decide whether a layer keeps its training"),
    checkpoint_every: int = typer.Option(25, help="save the training state every N steps (0: only after each layer); rerun the same command to resume"),
    work_dir: Path = typer.Option(None, "--work-dir", help="training state folder (default: OUT.moecompress-heal-work beside OUT; removed on success)"),
    calib: str = typer.Option("mixed", help="calibration text: prose|code|math|multilingual|chat|mixed|self|sample, a .txt/.jsonl file, a folder"),
    nsamples: int = typer.Option(128, help="calibration sequences"),
    seqlen: int = typer.Option(256, help="tokens per calibration sequence"),
    seed: int = typer.Option(0, help="seed: calibration windows, held-back split, adapters, minibatch order"),
    guard_samples: int = typer.Option(16, help="sequences sampled from the teacher on which the healed model must also be closer to "
                                      "the teacher than the unhealed one (0: check the held-back calibration sequences only)"),
    guard_z: float = typer.Option(1.0, help="keep the healed model only if its KL to the teacher drops by more than this many "
                                  "standard errors, on the held-back calibration AND the teacher-sampled sequences"),
    schedule: str = typer.Option("constant", help="learning rate: constant, or cosine (linear warmup over 5% of the steps, then cosine to 0)"),
    eval_data: Path = typer.Option(None, "--eval-data", help="text file: perplexity of teacher, student and OUT, in the report"),
    eval_seqlen: int = typer.Option(256, help="chunk length for --eval-data"),
    eval_max_tokens: int = typer.Option(40000, help="first N tokens of --eval-data"),
    overwrite: bool = OVERWRITE,
    dry_run: bool = DRY_RUN,
    save_pipeline: Path = SAVE_PIPELINE,
    as_json: bool = AS_JSON,
) -> None:
    """Train the compressed model towards the original on calibration text (knowledge distillation) and write it back in its own format."""
    from moecompress.api.heal import HealOptions, heal as run

    quiet_transformers()
    options = HealOptions(**options_from(HealOptions, locals()))
    progress = StepProgress("heal")  # plain lines (not entered): run_api shows its own display
    result = run_api("heal", lambda m, o, opts, **kw: run(m, o, opts, **{**kw, "progress": progress}),
                     model, out, options, overwrite, dry_run, save_pipeline, "heal")
    if result.dry_run:
        return
    if as_json:
        print_json(result.as_json())
        return
    s = result.summary
    console.print(f"wrote [bold]{result.out}[/] ({s['mode']}, {s['train_tokens']:,} training tokens) in {seconds_line(result)}; "
                  f"report: {result.out / 'report.md'}", highlight=False)
    print_notes(result)


def register(app: typer.Typer) -> None:
    app.command("heal")(user_errors(heal))
