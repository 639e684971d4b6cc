"""`moecompress lint`: can vLLM (and transformers) load this compressed-tensors checkpoint's MoE layers?

Exit 0: no errors for the chosen targets (warnings may be listed); 1: findings with errors, one line
each with its rule id and target; 2: input that cannot be read, or a folder that is no
compressed-tensors checkpoint at all. ``--target vllm|hf`` (repeatable; default both);
``--vllm-version 0.33|humming`` and ``--transformers-version 5.24|5.25`` pick the release each target's
rules describe (default: the oldest supported, ``moecompress/export/targets.py``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from moecompress.cli.common import console, print_json, user_errors

EXIT_FINDINGS = 1


def lint(
    folder: Path = typer.Argument(..., help="checkpoint folder (compressed-tensors export)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with every finding"),
    target: list[str] = typer.Option(None, "--target", help="runtime to check for: vllm or hf (repeatable; default both)"),
    vllm_version: str = typer.Option(None, "--vllm-version", help="vLLM release the vllm rules describe: 0.33 (default, oldest supported) or humming (adds 2-bit sym experts)"),
    transformers_version: str = typer.Option(None, "--transformers-version", help="transformers release the hf rules describe: 5.24 (default, oldest supported) or 5.25 (dense modules may use their own one scheme)"),
) -> None:
    """Check a compressed-tensors checkpoint against what vLLM and transformers need for MoE layers."""
    from moecompress.export.lint import RULES, format_findings, lint_checkpoint, require_compressed_tensors

    require_compressed_tensors(folder)
    report = lint_checkpoint(folder, target=target or None, vllm_version=vllm_version, transformers_version=transformers_version)
    if as_json:
        print_json(report.as_json())
    else:
        for line in format_findings(report):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        status = "clean" if report.clean else f"{len(report.errors)} error(s)"
        judged = ", ".join(f"{t} {report.tables[t].version}" for t in report.targets)
        console.print(f"{folder}: {status} for {judged}, {len(report.findings)} finding(s); "
                      f"rules checked: {', '.join(RULES)}", highlight=False)
    if not report.clean:
        raise typer.Exit(EXIT_FINDINGS)


def register(app: typer.Typer) -> None:
    app.command("lint")(user_errors(lint))
