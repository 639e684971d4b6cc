"""Reports: markdown files and PNG figures (matplotlib, Agg backend: no display needed).

Generic helpers every command reuses:

* :func:`heatmap` - a 2-D matrix as a colour image (optionally log-scaled);
* :func:`bar` - one value per label, with an optional threshold line and highlighted bars;
* :func:`markdown_table`, :func:`image_markdown` and :func:`write_markdown` - a report as sections.

matplotlib is imported on first use (importing this module sets no global state); figures are always
closed after saving, so long runs do not accumulate memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, works without a display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _as_2d(matrix) -> np.ndarray:
    """Any tensor / array / nested list -> float64 numpy array [rows, cols]."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().double().cpu().numpy()
    arr = np.asarray(matrix, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {arr.shape}")
    return arr


def _tick_positions(count: int, max_ticks: int = 32) -> list[int]:
    """At most ``max_ticks`` evenly spaced tick positions in range(count)."""
    step = max(1, -(-count // max_ticks))
    return list(range(0, count, step))


def heatmap(
    matrix,
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
    log: bool = False,
    cmap: str = "viridis",
    colorbar_label: str | None = None,
    categories: Sequence[float] | None = None,
) -> Path:
    """Save ``matrix [rows, cols]`` as a heatmap PNG at ``path`` (rows on y, columns on x).

    log: logarithmic colour scale (non-positive cells drawn as the lowest colour).
    categories: the matrix holds these few values (bit widths, say): one distinct colour and one
    labelled colour-bar entry each, instead of a continuous scale (NaN cells stay blank).
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm

    plt = _pyplot()
    arr = _as_2d(matrix)
    rows, cols = arr.shape
    norm = None
    category_ticks = None
    if categories is not None:
        values = list(categories)
        index = np.full(arr.shape, np.nan)
        for i, v in enumerate(values):
            index[arr == v] = i
        arr = index
        palette = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
        cmap = ListedColormap([palette(i) for i in range(len(values))])
        norm = BoundaryNorm(np.arange(len(values) + 1) - 0.5, len(values))
        category_ticks = (list(range(len(values))), [f"{v:g}" for v in values])
    elif log:
        positive = arr[arr > 0]
        low = float(positive.min()) if positive.size else 1e-12
        high = float(positive.max()) if positive.size else 1.0
        arr = arr.clip(min=low)
        norm = LogNorm(vmin=low, vmax=max(high, low * 1.0001))
    width = min(16.0, 3.0 + 0.28 * cols)
    height = min(12.0, 2.2 + 0.3 * rows)
    fig, ax = plt.subplots(figsize=(max(width, 4.5), max(height, 2.8)))
    try:
        image = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        colorbar = fig.colorbar(image, ax=ax)
        if category_ticks is not None:
            colorbar.set_ticks(category_ticks[0])
            colorbar.set_ticklabels(category_ticks[1])
        if colorbar_label:
            colorbar.set_label(colorbar_label)
        for axis, count, labels in ((ax.xaxis, cols, xticklabels), (ax.yaxis, rows, yticklabels)):
            ticks = _tick_positions(count)
            axis.set_ticks(ticks)
            axis.set_ticklabels([str(labels[t]) if labels is not None else str(t) for t in ticks])
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def bar(
    values,
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    labels: Sequence[str] | None = None,
    threshold: float | None = None,
    threshold_label: str | None = None,
    highlight: Iterable[int] = (),
    log: bool = False,
) -> Path:
    """Save one bar per value as a PNG; ``highlight`` bars (indices) drawn in red, ``threshold`` a dashed line."""
    plt = _pyplot()
    vals = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    marked = set(highlight)
    colors = ["tab:red" if i in marked else "tab:blue" for i in range(len(vals))]
    fig, ax = plt.subplots(figsize=(min(16.0, max(4.5, 2.0 + 0.25 * len(vals))), 3.6))
    try:
        ax.bar(range(len(vals)), vals, color=colors)
        if threshold is not None:
            ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=threshold_label)
            if threshold_label:
                ax.legend(loc="upper right")
        ticks = _tick_positions(len(vals))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(labels[t]) if labels is not None else str(t) for t in ticks])
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub markdown table; floats shown with 4 significant digits."""
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def image_markdown(image: str | Path, report: str | Path, alt: str) -> str:
    """Markdown for an image, linked relative to the report's folder."""
    image, folder = Path(image), Path(report).parent
    try:
        rel = image.relative_to(folder)
    except ValueError:
        rel = image
    return f"![{alt}]({rel.as_posix()})"


def write_markdown(path: str | Path, sections: Sequence[tuple[str, str]], title: str | None = None) -> Path:
    """Write a markdown report: optional ``# title``, then one ``## heading`` + body per section."""
    parts = [f"# {title}\n"] if title else []
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.strip()}\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
