"""Plots of a WiSE-FT / PAINT sweep, drawn on a bare matplotlib ``Figure`` (Agg canvas, no
pyplot state, no display needed).

Left: the score on each eval set against ``alpha`` (target sets solid, preserve sets dashed,
confidence intervals shaded when the results carry them). Right, when there are both target and
preserve sets: the curve of the WiSE-FT paper (its figure 1): mean target score on x, mean
preserve score on y, one point per ``alpha``, labelled with it. The chosen ``alpha`` is marked
on both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean

from matplotlib.figure import Figure

from hf_soups.output import final_path
from hf_soups.patching.sweep import SweepResult, result_interval

logger = logging.getLogger(__name__)

__all__ = ["PLOT_FILE", "plot_sweep"]

PLOT_FILE = "wise_ft_sweep.png"


def _legend(name: str, group: str) -> str:
    return name if name.lower() == group.lower() else f"{name} ({group})"


def _axis_label(group: str, names: Sequence[str]) -> str:
    return f"{group} ({'mean of ' if len(names) > 1 else ''}{', '.join(names)})"


def plot_sweep(
    result: SweepResult,
    path: str | os.PathLike,
    *,
    target: Sequence[str],
    preserve: Sequence[str] = (),
    chosen_alpha: float | None = None,
    target_label: str = "target",
    preserve_label: str = "preserve",
    title: str | None = None,
) -> Path:
    """Draw the sweep to a PNG file at ``path`` and return the path.

    Args:
        result: the sweep to draw.
        target: eval sets fine-tuning should improve (ID / patching task).
        preserve: eval sets whose zero-shot score should be kept (shifts / supported tasks).
        chosen_alpha: marked on both panels when given.
        target_label, preserve_label: axis names of the two groups, e.g. ``"ID"`` and
            ``"shifted"`` (WiSE-FT) or ``"patching task"`` and ``"supported tasks"`` (PAINT).
        title: figure title.
    """
    alphas = result.alphas
    scores = result.scores
    both = bool(target) and bool(preserve)
    figure = Figure(figsize=(11 if both else 6, 4.5), layout="constrained")
    axes = figure.subplots(1, 2 if both else 1, squeeze=False)[0]

    left = axes[0]
    for name in [*target, *preserve]:
        (line,) = left.plot(
            alphas,
            scores[name],
            marker="o",
            markersize=3,
            linestyle="-" if name in target else "--",
            label=_legend(name, target_label if name in target else preserve_label),
        )
        intervals = [result_interval(r) for r in result.results[name]]
        if all(interval is not None for interval in intervals):
            left.fill_between(
                alphas,
                [low for low, _ in intervals],
                [high for _, high in intervals],
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )
    if chosen_alpha is not None:
        left.axvline(
            chosen_alpha, color="black", linestyle=":", label=f"chosen alpha={chosen_alpha:g}"
        )
    left.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    left.set_ylabel("score")
    left.grid(alpha=0.3)
    left.legend(fontsize="small")

    if both:
        right = axes[1]
        x = [fmean(scores[name][i] for name in target) for i in range(len(alphas))]
        y = [fmean(scores[name][i] for name in preserve) for i in range(len(alphas))]
        right.plot(x, y, marker="o", markersize=4, color="tab:blue")
        # Coinciding points (equal scores at several alphas) share one label.
        labels: dict[tuple[float, float], list[str]] = {}
        for alpha, point in zip(alphas, zip(x, y)):
            labels.setdefault(point, []).append(f"{alpha:g}")
        for point, names in labels.items():
            right.annotate(
                ", ".join(names),
                point,
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="x-small",
            )
        if chosen_alpha is not None:
            i = alphas.index(chosen_alpha)
            right.scatter(
                [x[i]],
                [y[i]],
                marker="*",
                s=220,
                color="tab:red",
                zorder=3,
                label=f"chosen alpha={chosen_alpha:g}",
            )
            right.legend(fontsize="small")
        right.set_xlabel(_axis_label(target_label, target))
        right.set_ylabel(_axis_label(preserve_label, preserve))
        right.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    logger.info("Wrote the sweep plot to %s", final_path(path))
    return path
