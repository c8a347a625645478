"""Plots of soupability diagnostics, drawn on bare matplotlib ``Figure``s (Agg canvas, no pyplot
state, no display needed).

- :data:`WEIGHTS_PLOT`: heatmaps of the pairwise relative L2 distances and cosines.
- :data:`PATHS_PLOT`: the score (and loss) along each interpolation path, with the straight line
  between its endpoints dashed: the gap between the two is the barrier.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from hf_soups.diagnostics.connectivity import SOUP, InterpolationPath
from hf_soups.diagnostics.weights import WeightStatistics
from hf_soups.output import final_path

if TYPE_CHECKING:
    from hf_soups.diagnostics.verdict import DiagnosticsReport

logger = logging.getLogger(__name__)

__all__ = ["PATHS_PLOT", "WEIGHTS_PLOT", "plot_paths", "plot_weights", "write_plots"]

WEIGHTS_PLOT = "diagnostics_weights.png"
PATHS_PLOT = "diagnostics_interpolation.png"


def _heatmap(figure: Figure, axis, values: np.ndarray, title: str, cmap: str, limits) -> None:
    n = len(values)
    image = axis.imshow(values, cmap=cmap, vmin=limits[0], vmax=limits[1])
    keys = [f"[{i}]" for i in range(n)]
    axis.set_xticks(range(n), keys)
    axis.set_yticks(range(n), keys)
    axis.set_title(title, fontsize="medium")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                value = values[i, j]
                text = "-" if i == j or not np.isfinite(value) else f"{value:.2g}"
                axis.text(j, i, text, ha="center", va="center", fontsize="x-small")
    figure.colorbar(image, ax=axis, shrink=0.8)


def plot_weights(stats: WeightStatistics, path: str | os.PathLike) -> Path:
    """Heatmaps of ``||a - b|| / ||a||`` (row ``a``) and of the cosines; written to ``path``."""
    figure = Figure(figsize=(10, 4.4), layout="constrained")
    left, right = figure.subplots(1, 2)
    relative = stats.relative_distances.copy()
    np.fill_diagonal(relative, 0.0)
    upper = max(float(np.nanmax(relative)), 1e-12)
    _heatmap(
        figure, left, relative, "relative L2 distance ||a - b|| / ||a||", "viridis", (0, upper)
    )
    _heatmap(figure, right, stats.cosines, f"cosine of {stats.cosine_of}", "coolwarm", (-1, 1))
    figure.suptitle(
        "; ".join(f"[{i}] {_short(name)}" for i, name in enumerate(stats.ingredients)),
        fontsize="small",
    )
    return _save(figure, path)


def plot_paths(
    paths: Sequence[InterpolationPath], path: str | os.PathLike, names: Sequence[str] = ()
) -> Path:
    """Score (and loss, when measured) against ``t`` for each path; the dashed line joins the
    endpoint scores, so the vertical gap is the barrier. Written to ``path``."""
    if not paths:
        raise ValueError("plot_paths: no interpolation paths to draw")
    with_loss = all(p.losses is not None for p in paths)
    figure = Figure(figsize=(11 if with_loss else 6, 4.4), layout="constrained")
    axes = figure.subplots(1, 2 if with_loss else 1, squeeze=False)[0]
    panels = [(axes[0], "score")] + ([(axes[1], "loss")] if with_loss else [])
    for axis, kind in panels:
        for p in paths:
            values = np.asarray(p.scores if kind == "score" else p.losses, dtype=float)
            scale = 100.0 if kind == "score" and p.in_points else 1.0
            values = values * scale
            i, j = p.indices
            label = f"[{i}] -> {'soup' if j == SOUP else f'[{j}]'}"
            if kind == "score":
                label += f" (barrier {p.barrier:.1f})"
            (line,) = axis.plot(p.ts, values, marker="o", markersize=3, label=label)
            axis.plot(
                [p.ts[0], p.ts[-1]],
                [values[0], values[-1]],
                linestyle="--",
                color=line.get_color(),
                alpha=0.6,
            )
        first = paths[0]
        if kind == "score":
            unit = " (%)" if first.in_points else ""
            axis.set_ylabel(f"{first.metric}{unit}")
        else:
            axis.set_ylabel(first.loss_metric or "loss")
        axis.set_xlabel("t (0 = first model, 1 = second)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="x-small")
    if names:
        figure.suptitle(
            "; ".join(f"[{i}] {_short(name)}" for i, name in enumerate(names)), fontsize="small"
        )
    return _save(figure, path)


def plot_names(report: DiagnosticsReport) -> list[str]:
    """The file names :func:`write_plots` writes for ``report``."""
    names = []
    if report.weights is not None and len(report.ingredients) > 1:
        names.append(WEIGHTS_PLOT)
    if report.paths:
        names.append(PATHS_PLOT)
    return names


def write_plots(report: DiagnosticsReport, folder: str | os.PathLike) -> list[str]:
    """Write the plots a :class:`~hf_soups.diagnostics.DiagnosticsReport` supports into
    ``folder``; return their file names (for ``soup.json``'s ``"plots"``), also kept in
    ``report.plots``."""
    folder = Path(folder)
    names = plot_names(report)
    if WEIGHTS_PLOT in names:
        plot_weights(report.weights, folder / WEIGHTS_PLOT)
    if PATHS_PLOT in names:
        plot_paths(report.paths, folder / PATHS_PLOT, report.ingredients)
    report.plots = names
    return names


def _short(name: str, width: int = 32) -> str:
    # Local folders are shown by their last component; Hub ids (org/name@rev) as they are.
    if Path(name).is_absolute():
        name = Path(name).name
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    logger.info("Wrote %s", final_path(path))
    return path
