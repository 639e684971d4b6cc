"""The markdown report of router statistics: ``report.md`` and its PNG figures (:func:`write_stats_report`).

Figures: expert load (layer x expert, as a multiple of the uniform share), co-activation of one layer,
super-expert magnitudes (max |expert output|, log scale), coverage of one layer (bar chart, starved
experts highlighted) and, when the calibration rows carry domains, each domain's expert share. The
per-layer figures show :func:`default_report_layer` unless a layer is given. Tables and figures are
drawn by :mod:`moecompress.report`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moecompress.calibration.stats_types import RouterStats


def default_report_layer(stats: RouterStats) -> int:
    """The MoE layer whose least-used expert is furthest below its uniform share (first on ties)."""
    return min(stats.moe_layers, key=lambda i: (float(stats.layers[i].load_ratio.min()), i))


def write_stats_report(stats: RouterStats, folder: str | Path, layer: int | None = None) -> Path:
    """Write ``report.md`` and its PNG figures into ``folder``; ``layer`` picks the per-layer figures."""
    from moecompress import report

    folder = Path(folder)
    layer = default_report_layer(stats) if layer is None else layer
    chosen = stats.layer(layer)
    path = folder / "report.md"
    layers = stats.moe_layers
    ylabels = [str(i) for i in layers]

    def img(file: Path, alt: str) -> str:
        return report.image_markdown(file, path, alt)

    # Expert load, layer x expert, as a multiple of the uniform share (1 = even routing).
    width = max(stats.layers[i].num_experts for i in layers)
    load = torch.full((len(layers), width), float("nan"), dtype=torch.float64)
    for r, i in enumerate(layers):
        load[r, : stats.layers[i].num_experts] = stats.layers[i].load_ratio
    load_png = report.heatmap(
        load, folder / "expert_load.png", "Expert load (selections / uniform share)", "expert", "layer",
        yticklabels=ylabels, colorbar_label="x uniform share",
    )
    # The diagonal (each expert's own selection count) is k times larger than any pair and would set
    # the whole colour scale: it is blanked here; the load chart and table show those counts.
    pairs = chosen.coactivation.double().clone()
    pairs.fill_diagonal_(float("nan"))
    coact_png = report.heatmap(
        pairs, folder / f"coactivation_layer{layer}.png", f"Co-activation (pairs), layer {layer}",
        "expert", "expert", colorbar_label="tokens routed to both",
    )
    # Super-expert magnitudes: output_max per layer x expert (+ a 'shared' column), log colour scale.
    has_shared = bool(stats.shared_output_max)
    mags = torch.zeros(len(layers), width + int(has_shared), dtype=torch.float64)
    for r, i in enumerate(layers):
        mags[r, : stats.layers[i].num_experts] = stats.layers[i].output_max
        if has_shared and stats.layers[i].shared_output_max is not None:
            mags[r, width] = stats.layers[i].shared_output_max
    xlabels = [str(e) for e in range(width)] + (["shared"] if has_shared else [])
    super_png = report.heatmap(
        mags, folder / "super_experts.png", "Max |expert output| (log scale)", "expert", "layer",
        xticklabels=xlabels, yticklabels=ylabels, log=True, cmap="magma", colorbar_label="max |down_proj output|",
    )
    threshold = float(stats.coverage.get("threshold", 0.1))
    starved_here = [s["expert"] for s in stats.coverage.get("starved", []) if s["layer"] == layer]
    coverage_png = report.bar(
        chosen.load_ratio, folder / f"coverage_layer{layer}.png", f"Expert coverage, layer {layer}", "expert",
        "selections / uniform share", threshold=threshold, threshold_label=f"starved below {threshold:g}",
        highlight=starved_here,
    )

    sections = [("Summary", _summary_markdown(stats))]
    sections.append(("Expert load", img(load_png, "expert load") + "\n\n" + _load_table(stats)))
    sections.append(("Coverage", _coverage_markdown(stats, layer) + "\n\n" + img(coverage_png, "coverage")))
    sections.append(("Super experts", _super_markdown(stats) + "\n\n" + img(super_png, "super experts")))
    sections.append(
        (f"Co-activation (layer {layer})", "Tokens whose top-k holds both experts (the diagonal, each expert's own "
         "count, is left blank: see the expert load).\n\n" + img(coact_png, "co-activation"))
    )
    if chosen.domain_counts is not None and stats.domain_names:
        share = chosen.domain_counts.double() / chosen.domain_counts.sum(1, keepdim=True).clamp_min(1)
        dom_png = report.heatmap(
            share, folder / f"domains_layer{layer}.png", f"Expert share per domain, layer {layer}", "expert", "domain",
            yticklabels=stats.domain_names, colorbar_label="share of the domain's selections",
        )
        sections.append((f"Domains (layer {layer})", img(dom_png, "domains")))
    return report.write_markdown(path, sections, title=f"Router statistics: {stats.model}")


def _summary_markdown(stats: RouterStats) -> str:
    from moecompress.report import markdown_table

    cal = stats.calibration
    rows = [
        ("model", f"{stats.model} ({stats.family})"),
        ("MoE layers", f"{len(stats.moe_layers)} of {stats.num_layers}"),
        ("calibration", cal.get("source", "?")),
        ("samples x seqlen", f"{cal.get('nsamples', '?')} x {cal.get('seqlen', '?')} = {cal.get('tokens', '?')} tokens"),
        ("domains", ", ".join(stats.domain_names) if stats.domain_names else "none"),
        ("expert-load CV (mean over layers)", f"{stats.load_cv:.4f}"),
        ("super experts", str(len(stats.super_experts))),
        ("starved experts", str(stats.coverage.get("num_starved", 0))),
    ]
    return markdown_table(["", ""], rows)


def _load_table(stats: RouterStats) -> str:
    from moecompress.report import markdown_table

    rows = []
    for i in stats.moe_layers:
        s = stats.layers[i]
        ratio = s.load_ratio
        top = int(s.expert_counts.argmax())
        rows.append((i, s.tokens, s.load_cv, float(ratio.min()), float(ratio.max()), top, float(s.reap_scores.max())))
    return markdown_table(["layer", "tokens", "load CV", "min load", "max load", "busiest expert", "max REAP"], rows)


def _coverage_markdown(stats: RouterStats, layer: int) -> str:
    from moecompress.report import markdown_table

    cov = stats.coverage
    head = (
        f"An expert is starved when it is selected fewer than {cov.get('threshold', 0.1):g} x its uniform share "
        "(tokens x k / E) times: its calibration statistics rest on few tokens."
    )
    starved = cov.get("starved", [])
    if not starved:
        return head + "\n\nNo starved expert."
    rows = [(s["layer"], s["expert"], s["count"], s["count"] / s["uniform_share"] if s["uniform_share"] else 0.0) for s in starved]
    return (
        head + f"\n\n**{len(starved)} starved experts:**\n\n"
        + markdown_table(["layer", "expert", "selections", "x uniform share"], rows)
        + f"\n\nBar chart: layer {layer}."
    )


def _super_markdown(stats: RouterStats) -> str:
    from moecompress.report import markdown_table

    crit = stats.super_expert_criterion
    text = (
        f"Max |down_proj output| per expert; super iff above P{crit.get('percentile', 99.5):g} of the pooled values "
        f"of layers < {crit.get('layer_cutoff', '?')} and above {crit.get('ratio', 0.1):g} x their maximum"
    )
    if "percentile_value" in crit:
        text += f" (thresholds {crit['percentile_value']:.4g} and {crit['ratio_value']:.4g})"
    text += ". Expert -1 is a shared expert."
    if not stats.super_experts:
        return text + "\n\nNo super expert found."
    rows = []
    for s in stats.super_experts:
        where = ""
        if s.expert >= 0:
            row, pos, ch = stats.layers[s.layer].output_max_where[s.expert].tolist()
            where = f"row {row}, position {pos}, channel {ch}"
        rows.append((s.layer, s.expert, s.max_abs, where))
    return text + "\n\n" + markdown_table(["layer", "expert", "max abs", "where"], rows)
