"""The quantize command's report: per layer and per expert widths, tokens, errors, fallbacks."""

from __future__ import annotations

from pathlib import Path

from moecompress.passes.quantize import QuantizeReport


def write_quantize_report(path: Path, title: str, summary: dict, report: QuantizeReport, extra_sections: list[str] = ()) -> None:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary.items()]
    lines += [""]
    lines += list(extra_sections)
    fallbacks = report.fallbacks()
    lines += ["## Fallbacks", ""]
    if fallbacks:
        lines += [f"- layer {r.layer} expert {r.expert}: {r.tokens} routed tokens -> {r.method}" for r in fallbacks]
    else:
        lines += ["none: every expert saw enough routed tokens for GPTQ"]
    lines += ["", "## Routed experts", "", "| layer | expert | bits | routed tokens | method | rel. output error |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.layer} | {r.expert} | {r.bits} | {r.tokens} | {r.method} | {r.rel_error:.4f} |" for r in report.experts]
    if report.linears:
        lines += ["", "## Other linear layers", "", "| layer | module | bits | method | rel. output error |", "|---|---|---|---|---|"]
        lines += [f"| {d['layer']} | {d['module']} | {d['bits']} | {d['method']} | {d['rel_error']:.4f} |" for d in report.linears]
    path.write_text("\n".join(lines) + "\n")
