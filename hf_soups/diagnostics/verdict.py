"""Verdicts: will averaging work for each ingredient, and why.

With an evaluator the verdict rests on the interpolation barriers (the direct measure of whether
averaging loses accuracy); without one, on weight distances (a heuristic: models from another
random start sit about ``sqrt(2)`` times their norm away, fine-tunes of one start a small
fraction of it). Every threshold lives in :class:`Thresholds`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median, median_low
from typing import Any, Literal

import numpy as np

from hf_soups.diagnostics.connectivity import SOUP, InterpolationPath
from hf_soups.diagnostics.weights import WeightStatistics

logger = logging.getLogger(__name__)

__all__ = ["DiagnosticsReport", "Thresholds", "Verdict", "judge"]

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Thresholds:
    """When an ingredient is flagged. Barriers are in the path's unit: percentage points for
    accuracy-like metrics, metric units otherwise.

    Attributes:
        warn_barrier: a median barrier above this warns. 2 points is the stability criterion of
            Frankle et al. (2020): paths within 2% error of the chord count as connected.
        fail_barrier: a median barrier above this fails: the average loses that much, as between
            models of different starts (tens of points).
        max_loss_barrier: when set, a loss barrier (nats) above it warns.
        max_relative_distance: distance-only verdicts: fail when the median over tensors of the
            ingredient's distance from the reference (relative to the reference's tensor norm),
            or from the base (relative to the base's), is above this. Unrelated tensors of equal
            norm are ``sqrt(2)`` = 1.41 apart; 0.7 is half of that. Measured on a tiny ViT on
            digits: 0.09 to 0.21 between fine-tunes of one start and that start, 1.5 to 1.6
            from a model trained from another random start.
        outlier_ratio: distance-only verdicts: warn when the ingredient's relative distance is
            more than this many times the pool's median (needs 3 or more ingredients). Generous,
            because fine-tunes at learning rates a decade apart move a decade apart.
    """

    warn_barrier: float = 2.0
    fail_barrier: float = 10.0
    max_loss_barrier: float | None = None
    max_relative_distance: float = 0.7
    outlier_ratio: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.warn_barrier <= self.fail_barrier:
            raise ValueError(
                f"thresholds: need 0 <= warn_barrier ({self.warn_barrier}) <= fail_barrier "
                f"({self.fail_barrier})"
            )
        if self.max_relative_distance <= 0 or self.outlier_ratio <= 1:
            raise ValueError(
                "thresholds: max_relative_distance must be positive and outlier_ratio above 1"
            )


@dataclass
class Verdict:
    """Whether one ingredient is safe to average, with the reason in words.

    Attributes:
        ingredient: its display name; index: its position.
        status: ``"ok"``, ``"warn"`` or ``"fail"``.
        reason: e.g. ``"different pre-trained start: barrier 35.2 points; averaging will hurt"``.
        barrier: the (low) median barrier over the ingredient's paths (``None`` without an
            evaluator).
        relative_distance: median over tensors of the distance to the reference (or base),
            relative to that model's tensor norms.
        cosine: cosine with the reference (of deltas from the base, or of raw weights).
    """

    ingredient: str
    index: int
    status: Status
    reason: str
    barrier: float | None = None
    relative_distance: float | None = None
    cosine: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _distance_facts(stats: WeightStatistics, i: int, reference: int) -> tuple[float, float, str]:
    """(relative distance, cosine, words) of ingredient ``i``: the median over tensors of its
    distance from the base (relative to the base's tensors) or from the reference (relative to
    the reference's tensors; for the reference itself, from its nearest ingredient), and its
    cosine with that ingredient."""
    other = reference if i != reference else _nearest(stats, i)
    cosine = float(stats.cosines[i, other])
    if stats.base is not None:
        distance = float(stats.median_relative_moves[i])
        where, cosine_kind = "from the base", "delta cosine"
    else:
        distance = float(stats.median_relative_distances[other, i])
        where, cosine_kind = f"from {stats.ingredients[other]}", "weight cosine"
    words = (
        f"median tensor distance {_fmt(distance)} {where} (relative; unrelated weights: 1.41), "
        f"{cosine_kind} {_fmt(cosine)}"
    )
    return distance, cosine, words


def _nearest(stats: WeightStatistics, i: int) -> int:
    distances = stats.distances[i].copy()
    distances[i] = np.inf
    return int(np.argmin(distances))


def _barrier_verdict(
    i: int,
    name: str,
    paths: Sequence[InterpolationPath],
    facts: tuple[float, float, str] | None,
    thresholds: Thresholds,
) -> Verdict:
    # The low median: an ingredient on several paths (the reference) fails only when more than
    # half of them fail, not when one odd ingredient's huge barrier lifts the mean of two.
    barrier = median_low([p.barrier for p in paths])
    worst = max(paths, key=lambda p: p.barrier)
    unit = worst.unit
    against = worst.end if worst.indices[0] == i else worst.start
    where = (
        f"against {against}"
        if len(paths) == 1
        else f"median of {len(paths)} paths; worst {worst.barrier:.1f} against {against}"
    )
    text = f"barrier {barrier:.1f} {unit} ({where})"
    if worst.noise is not None:
        text += f", evaluation noise +/-{worst.noise:.1f}"
    distance, cosine = (facts[0], facts[1]) if facts else (None, None)
    details = f"; {facts[2]}" if facts else ""
    losses = [p.loss_barrier for p in paths if p.loss_barrier is not None]
    loss_barrier = median_low(losses) if losses else None
    loss_text = f", loss barrier {loss_barrier:.3g}" if losses else ""
    if barrier > thresholds.fail_barrier:
        status: Status = "fail"
        reason = (
            f"different pre-trained start or basin: {text}{loss_text}; averaging will hurt{details}"
        )
    elif barrier > thresholds.warn_barrier:
        status = "warn"
        reason = f"weakly connected: {text}{loss_text}; averaging may cost accuracy{details}"
    elif (
        thresholds.max_loss_barrier is not None
        and loss_barrier is not None
        and loss_barrier > thresholds.max_loss_barrier
    ):
        status = "warn"
        reason = (
            f"loss barrier {loss_barrier:.3g} above {thresholds.max_loss_barrier:g} "
            f"although {text}{details}"
        )
    else:
        status = "ok"
        reason = f"ok: {text}{loss_text}{details}"
    return Verdict(name, i, status, reason, barrier, distance, cosine)


def _distance_verdict(
    i: int,
    name: str,
    facts: tuple[float, float, str],
    pool_median: float | None,
    thresholds: Thresholds,
) -> Verdict:
    distance, cosine, words = facts
    if distance > thresholds.max_relative_distance:
        status: Status = "fail"
        reason = (
            f"likely a different pre-trained start: {words}, above the "
            f"{thresholds.max_relative_distance:g} limit; averaging will likely hurt (no "
            "evaluator: distance heuristic)"
        )
    elif pool_median is not None and distance > thresholds.outlier_ratio * pool_median:
        status = "warn"
        reason = (
            f"outlier: {words}, {distance / pool_median:.0f}x the pool's median "
            f"{pool_median:.3g} (no evaluator: distance heuristic)"
        )
    else:
        status = "ok"
        reason = f"ok: {words} (no evaluator: distance heuristic)"
    return Verdict(name, i, status, reason, None, distance, cosine)


def judge(
    stats: WeightStatistics | None,
    paths: Sequence[InterpolationPath] = (),
    *,
    reference: int = 0,
    thresholds: Thresholds | None = None,
    names: Sequence[str] | None = None,
) -> list[Verdict]:
    """One :class:`Verdict` per ingredient.

    An ingredient on at least one path is judged by the median barrier of its paths (so the
    reference, on every path, fails only if most others fail against it); the weight statistics
    add its distance and cosine to the reason. An ingredient on no path is judged by its
    distance from the base, or from the reference (the reference itself: from its nearest
    ingredient), relative to that model's norm.

    Args:
        stats: the weight statistics (``None`` when only paths were measured).
        paths: interpolation paths; their ``indices`` name the ingredients.
        reference: the ingredient the others were compared with.
        thresholds: see :class:`Thresholds`.
        names: display names, needed when ``stats`` is ``None``.
    """
    thresholds = thresholds or Thresholds()
    if stats is not None:
        names = stats.ingredients
    if names is None:
        raise ValueError("judge: give the weight statistics or the ingredients' names")
    n = len(names)
    if n == 1:
        return [Verdict(names[0], 0, "ok", "ok: a single ingredient, nothing to average")]
    facts = [_distance_facts(stats, i, reference) if stats else None for i in range(n)]
    pool = [f[0] for f in facts if f is not None and np.isfinite(f[0])]
    pool_median = median(pool) if len(pool) >= 3 and median(pool) > 0 else None
    verdicts = []
    for i, name in enumerate(names):
        own = [p for p in paths if i in p.indices]
        if own:
            verdicts.append(_barrier_verdict(i, name, own, facts[i], thresholds))
        elif facts[i] is not None:
            verdicts.append(_distance_verdict(i, name, facts[i], pool_median, thresholds))
        else:
            verdicts.append(
                Verdict(name, i, "warn", "not checked: on no measured path, no weight statistics")
            )
    return verdicts


@dataclass
class DiagnosticsReport:
    """Everything :func:`~hf_soups.diagnostics.check_soupability` measured, and its verdicts.

    Attributes:
        ingredients: display names, in order.
        weights: the pairwise weight statistics.
        paths: the interpolation paths (empty without an evaluator).
        verdicts: one per ingredient.
        reference: index of the ingredient others were compared with.
        thresholds: the thresholds the verdicts used.
        plots: file names of the plots written (see :func:`~hf_soups.diagnostics.write_plots`).
    """

    ingredients: list[str]
    weights: WeightStatistics | None
    paths: list[InterpolationPath]
    verdicts: list[Verdict]
    reference: int = 0
    thresholds: Thresholds = field(default_factory=Thresholds)
    plots: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every ingredient passed."""
        return all(verdict.ok for verdict in self.verdicts)

    @property
    def flagged(self) -> list[Verdict]:
        """The verdicts that warn or fail."""
        return [verdict for verdict in self.verdicts if not verdict.ok]

    def rejudge(self, thresholds: Thresholds) -> DiagnosticsReport:
        """The same measurements judged with other thresholds (nothing is re-measured)."""
        verdicts = judge(
            self.weights,
            self.paths,
            reference=self.reference,
            thresholds=thresholds,
            names=self.ingredients,
        )
        return DiagnosticsReport(
            self.ingredients,
            self.weights,
            self.paths,
            verdicts,
            self.reference,
            thresholds,
            list(self.plots),
        )

    def table(self, *, layers: int = 5) -> str:
        """Plain-text report: legend, pairwise matrices, paths, verdicts, and for flagged
        ingredients the ``layers`` layers farthest from the reference (relative to its norm)."""
        n = len(self.ingredients)
        keys = [f"[{i}]" for i in range(n)]
        lines = ["Ingredients"]
        for i, (key, name) in enumerate(zip(keys, self.ingredients)):
            marker = " (reference)" if n > 1 and i == self.reference else ""
            lines.append(f"  {key} {name}{marker}")
        if self.weights is not None and n > 1:
            w = self.weights
            if w.base is not None:
                lines.append(f"  base: {w.base}")
            lines += ["", "L2 distance ||a - b|| (row a, column b) / relative to ||a||"]
            lines += _matrix(keys, w.distances, w.relative_distances)
            lines += [
                "",
                "Median over tensors of ||a_t - b_t|| / ||a_t|| (unrelated weights: 1.41)",
            ]
            lines += _matrix(keys, w.median_relative_distances)
            if w.base is not None:
                moves = ", ".join(
                    f"{key} {_fmt(value, 3)}" for key, value in zip(keys, w.median_relative_moves)
                )
                lines += ["", f"Median over tensors of ||theta_t - base_t|| / ||base_t||: {moves}"]
            lines += ["", f"Cosine similarity of {w.cosine_of}"]
            lines += _matrix(keys, w.cosines)
        if self.paths:
            first = self.paths[0]
            lines += ["", f"Interpolation barriers ({first.metric}, {len(first.ts)} points)"]
            for path in self.paths:
                i, j = path.indices
                label = f"{keys[i]} -> {'soup' if j == SOUP else keys[j]}"
                lines.append(f"  {label}: {path.summary().split(': ', 1)[1]}")
        lines += ["", "Verdicts"]
        for verdict in self.verdicts:
            lines.append(f"  {keys[verdict.index]} {verdict.status.upper():<4} {verdict.reason}")
        if self.weights is not None and layers > 0:
            for verdict in self.flagged:
                other = self.reference if verdict.index != self.reference else None
                if other is None:
                    continue
                rows = sorted(
                    self.weights.per_layer(other, verdict.index),
                    key=lambda r: -float(r["relative_distance"]),
                )[:layers]
                lines += ["", f"Farthest layers of {keys[verdict.index]} from {keys[other]}"]
                for row in rows:
                    lines.append(
                        f"  {row['name']:<40} distance {row['distance']:.4g} "
                        f"(relative {_fmt(row['relative_distance'])}), cosine "
                        f"{_fmt(row['cosine'])}"
                    )
        return "\n".join(lines)

    def to_dict(self, *, per_tensor: bool = False) -> dict[str, Any]:
        """JSON-able record (weight matrices, paths, verdicts, thresholds, plots)."""
        return {
            "ingredients": list(self.ingredients),
            "reference": self.ingredients[self.reference],
            "ok": self.ok,
            "verdicts": [asdict(verdict) for verdict in self.verdicts],
            "thresholds": asdict(self.thresholds),
            "weights": self.weights.to_dict(per_tensor=per_tensor) if self.weights else None,
            "paths": [path.to_dict() for path in self.paths],
            "plots": list(self.plots),
        }

    def save(self, path: str | os.PathLike, *, per_tensor: bool = True) -> Path:
        """Write :meth:`to_dict` as JSON (per-tensor statistics included by default)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(per_tensor=per_tensor), indent=2) + "\n")
        return path


def _matrix(keys: Sequence[str], values: np.ndarray, relative: np.ndarray | None = None) -> list:
    width = 18 if relative is not None else 8
    lines = ["      " + "".join(key.rjust(width) for key in keys)]
    for i, key in enumerate(keys):
        cells = []
        for j in range(len(keys)):
            if i == j:
                cells.append("-".rjust(width))
            elif relative is not None:
                cells.append(f"{values[i, j]:.4g} / {_fmt(relative[i, j])}".rjust(width))
            else:
                cells.append(_fmt(values[i, j], 3).rjust(width))
        lines.append(key.ljust(6) + "".join(cells))
    return lines
