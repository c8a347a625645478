"""Linear mode connectivity: score the straight path between two models and measure its barrier.

Two models are linearly connected when no model on the segment between them scores much worse
than the straight line between their own scores (Frankle et al., "Linear mode connectivity and
the lottery ticket hypothesis", ICML 2020; Neyshabur et al., "What is being transferred in
transfer learning?", NeurIPS 2020). Fine-tunes of one pre-trained start usually are, and that is
why their average works; models trained from different random starts are not, and their average
is close to chance.

An endpoint is a vector of weights over the ingredients (ingredient ``i`` is the ``i``-th unit
vector, the uniform soup is ``1/N`` everywhere), so every model on a path is one weighted merge,
built by :func:`hf_soups.merge.weighted_state_dict` (memory flat in N), loaded with
:func:`hf_soups.models.load_model` and scored by the :class:`~hf_soups.evaluation.Evaluator`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from hf_soups.evaluation import EvalResult, Evaluator
from hf_soups.ingredients import Ingredient, check_compatible
from hf_soups.merge import IngredientLike, as_ingredients, weighted_state_dict
from hf_soups.models import ZeroShotTask, load_model

logger = logging.getLogger(__name__)

__all__ = [
    "CROSS_ENTROPY",
    "DEFAULT_POINTS",
    "InterpolationPath",
    "cross_entropy",
    "interpolation_pairs",
    "linear_mode_connectivity",
]

DEFAULT_POINTS = 5
CROSS_ENTROPY = "cross_entropy"
"""Name under which the path scores carry the mean cross-entropy loss the diagnostics add."""

PairsArg = Literal["reference", "soup", "all"] | Sequence[tuple[int, int]]
SOUP = -1
"""Endpoint index of the uniform soup of all ingredients in :attr:`InterpolationPath.indices`."""


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of ``logits`` (N, classes) against class indices ``labels``.

    Its first parameter is named ``logits``, so an :class:`Evaluator` hands it the logits.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_norm - shifted[np.arange(len(labels)), labels]))


def _is_fraction(metric: str, values: Sequence[float]) -> bool:
    return "accuracy" in metric and all(0.0 <= v <= 1.0 for v in values)


def _chord_gaps(ts: Sequence[float], values: Sequence[float], sign: float) -> list[float]:
    """``sign * (line between the end values - value)`` at every point of the path."""
    first, last = values[0], values[-1]
    return [sign * ((1.0 - t) * first + t * last - v) for t, v in zip(ts, values)]


@dataclass
class InterpolationPath:
    """Scores along ``theta(t) = (1 - t) * start + t * end`` for ``t`` in ``ts``.

    Attributes:
        start, end: display names of the endpoints (an ingredient, or ``"uniform soup"``).
        indices: ingredient indices of the endpoints (:data:`SOUP` for the uniform soup).
        ts: the path points, from 0 to 1.
        metric: name of the scored metric (the Evaluator's primary metric).
        scores: its value at each point.
        higher_is_better: whether a larger ``metric`` is better.
        losses: mean cross-entropy at each point (or the named loss metric), when available.
        loss_metric: the name of that metric.
        intervals: the Evaluator's confidence interval of ``metric`` at each point, if any.
        results: the :class:`EvalResult` of each point (per-example outcomes included).
    """

    start: str
    end: str
    indices: tuple[int, int]
    ts: list[float]
    metric: str
    scores: list[float]
    higher_is_better: bool = True
    losses: list[float] | None = None
    loss_metric: str | None = None
    intervals: list[tuple[float, float] | None] = field(default_factory=list)
    results: list[EvalResult] = field(default_factory=list, repr=False)

    @property
    def in_points(self) -> bool:
        """Whether the metric is an accuracy-like fraction, reported in percentage points."""
        return _is_fraction(self.metric, self.scores)

    @property
    def unit(self) -> str:
        """``"points"`` (percentage points) for fraction metrics, else the metric's name."""
        return "points" if self.in_points else self.metric

    def _scale(self) -> float:
        return 100.0 if self.in_points else 1.0

    @property
    def barrier(self) -> float:
        """The largest drop below the straight line between the endpoint scores, in
        :attr:`unit` (percentage points for accuracy). 0 when the path is at or above it."""
        gaps = _chord_gaps(self.ts, self.scores, 1.0 if self.higher_is_better else -1.0)
        return max(0.0, max(gaps)) * self._scale()

    @property
    def barrier_t(self) -> float:
        """The path point where the barrier is largest."""
        gaps = _chord_gaps(self.ts, self.scores, 1.0 if self.higher_is_better else -1.0)
        return self.ts[int(np.argmax(gaps))]

    @property
    def loss_barrier(self) -> float | None:
        """The largest rise of the loss above the straight line between the endpoint losses
        (in nats for cross-entropy), or ``None`` without a loss."""
        if self.losses is None:
            return None
        return max(0.0, max(_chord_gaps(self.ts, self.losses, -1.0)))

    @property
    def noise(self) -> float | None:
        """Half-width of the score's confidence interval at :attr:`barrier_t`, in :attr:`unit`:
        a barrier below it cannot be told from evaluation noise."""
        interval = self.intervals[self.ts.index(self.barrier_t)] if self.intervals else None
        if interval is None:
            return None
        return (interval[1] - interval[0]) / 2.0 * self._scale()

    def summary(self) -> str:
        """One line, e.g. ``"a -> b: 91.2 ... 90.8, barrier 0.4 points at t=0.5"``."""
        scale = self._scale()
        line = (
            f"{self.start} -> {self.end}: {self.metric} "
            + " ".join(f"{scale * s:.4g}" for s in self.scores)
            + f", barrier {self.barrier:.3g} {self.unit}"
        )
        if self.barrier > 0:
            line += f" at t={self.barrier_t:g}"
        if self.loss_barrier is not None:
            line += f"; loss barrier {self.loss_barrier:.3g}"
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (EvalResult summaries included, per-example arrays not)."""
        return {
            "start": self.start,
            "end": self.end,
            "indices": list(self.indices),
            "ts": list(self.ts),
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "scores": list(self.scores),
            "barrier": self.barrier,
            "barrier_t": self.barrier_t,
            "unit": self.unit,
            "noise": self.noise,
            "loss_metric": self.loss_metric,
            "losses": list(self.losses) if self.losses is not None else None,
            "loss_barrier": self.loss_barrier,
            "intervals": [list(i) if i is not None else None for i in self.intervals],
        }


def interpolation_pairs(n: int, pairs: PairsArg = "reference", reference: int = 0) -> list:
    """The endpoint pairs ``(i, j)`` to score (``j`` may be :data:`SOUP`).

    ``"reference"``: each ingredient against ``reference``; ``"soup"``: each against the uniform
    soup; ``"all"``: every pair (N(N-1)/2 paths); or explicit index pairs.
    """
    if not 0 <= reference < n:
        raise ValueError(f"reference: index {reference} out of range for {n} ingredients")
    if pairs == "reference":
        return [(reference, i) for i in range(n) if i != reference]
    if pairs == "soup":
        return [(i, SOUP) for i in range(n)]
    if pairs == "all":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if isinstance(pairs, str):
        raise ValueError(f"pairs: {pairs!r} is not 'reference', 'soup', 'all' or index pairs")
    checked = []
    for pair in pairs:
        i, j = (int(k) for k in pair)
        for k in (i, j):
            if not (0 <= k < n or k == SOUP):
                raise ValueError(f"pairs: index {k} in {pair} out of range for {n} ingredients")
        if i == j:
            raise ValueError(f"pairs: {pair} joins an ingredient to itself")
        checked.append((i, j))
    return checked


def path_points(points: int) -> list[float]:
    """``points`` evenly spaced coefficients from 0 to 1 (at least 3: two ends and a middle)."""
    if points < 3:
        raise ValueError(f"points: {points} leaves no model between the endpoints; give 3 or more")
    return [round(k / (points - 1), 10) for k in range(points)]


def _with_loss(evaluator: Evaluator) -> Evaluator:
    """A copy of ``evaluator`` that also computes :func:`cross_entropy` from the logits.

    The loss gets no bootstrap interval: barriers compare point values, and resampling the
    logits at every path point would cost a thousand loss computations each.
    """
    return evaluator.with_metrics({CROSS_ENTROPY: cross_entropy}, bootstrap=False)


def _endpoint(index: int, n: int) -> np.ndarray:
    if index == SOUP:
        return np.full(n, 1.0 / n)
    weights = np.zeros(n)
    weights[index] = 1.0
    return weights


def _label(ingredients: Sequence[Ingredient], index: int) -> str:
    return "uniform soup" if index == SOUP else ingredients[index].name


def linear_mode_connectivity(
    ingredients: Sequence[IngredientLike],
    evaluator: Evaluator,
    *,
    pairs: PairsArg = "reference",
    reference: int = 0,
    points: int = DEFAULT_POINTS,
    loss: bool | str = True,
    higher_is_better: bool = True,
    progress: bool = True,
    task: ZeroShotTask | None = None,
) -> list[InterpolationPath]:
    """Score the linear paths between ingredients and measure their barriers.

    Args:
        ingredients: :class:`Ingredient`s, folders or Hub ids (compatible, at least two).
        evaluator: scores each model on the path; its primary metric is the path score.
        pairs: which paths (see :func:`interpolation_pairs`); default each ingredient against
            ``reference``.
        reference: the ingredient the others are compared with for ``pairs="reference"``.
        points: models per path, ends included (5 gives t = 0, 0.25, 0.5, 0.75, 1).
        loss: ``True`` adds the mean cross-entropy of the logits (:data:`CROSS_ENTROPY`); a
            string names a loss metric the evaluator already computes; ``False``: no loss.
        higher_is_better: ``False`` when the primary metric is a loss.
        progress: show a progress bar over the models scored.
        task: class names and templates for scoring CLIP models without a head.

    Returns:
        One :class:`InterpolationPath` per pair. Endpoint models shared by several paths (the
        reference, the soup) are scored once.
    """
    if not isinstance(evaluator, Evaluator):
        raise TypeError(
            f"evaluator: expected an hf_soups Evaluator, got {type(evaluator).__name__}"
        )
    ingredients = as_ingredients(ingredients)
    if len(ingredients) < 2:
        raise ValueError("linear mode connectivity needs at least two ingredients")
    check_compatible(ingredients)
    n = len(ingredients)
    chosen = interpolation_pairs(n, pairs, reference)
    ts = path_points(points)
    loss_metric = CROSS_ENTROPY if loss is True else (loss or None)
    scoring = _with_loss(evaluator) if loss is True else evaluator
    template = ingredients[0]
    cache: dict[tuple[float, ...], EvalResult] = {}
    work = {
        tuple(np.round((1 - t) * _endpoint(i, n) + t * _endpoint(j, n), 12))
        for i, j in chosen
        for t in ts
    }
    bar = tqdm(total=len(work), desc="Interpolation paths", unit="model", disable=not progress)

    def score(weights: np.ndarray, label: str) -> EvalResult:
        key = tuple(np.round(weights, 12))
        if key not in cache:
            used = [k for k in range(n) if weights[k] != 0.0]
            state_dict = weighted_state_dict(
                [ingredients[k] for k in used], [float(weights[k]) for k in used]
            )
            cache[key] = scoring.evaluate(load_model(template, state_dict, task=task), name=label)
            bar.update()
        return cache[key]

    paths = []
    with bar:
        for i, j in chosen:
            start, end = _label(ingredients, i), _label(ingredients, j)
            results = [
                score((1 - t) * _endpoint(i, n) + t * _endpoint(j, n), f"{start} -> {end} t={t:g}")
                for t in ts
            ]
            paths.append(_path(start, end, (i, j), ts, results, loss_metric, higher_is_better))
            logger.info(paths[-1].summary())
    return paths


def _path(start, end, indices, ts, results, loss_metric, higher_is_better) -> InterpolationPath:
    first = results[0]
    metric = first.score_metric
    losses = None
    if loss_metric is not None:
        missing = [r.name for r in results if loss_metric not in r.metrics]
        if missing:
            raise ValueError(
                f"loss: the evaluator gives no metric {loss_metric!r} for {missing[0]} "
                f"(it gives {sorted(first.metrics)})"
            )
        losses = [float(r.metrics[loss_metric]) for r in results]
    intervals = [r.intervals.get(metric) for r in results]
    path = InterpolationPath(
        start=start,
        end=end,
        indices=indices,
        ts=list(ts),
        metric=metric,
        scores=[float(r.metrics[metric]) for r in results],
        higher_is_better=higher_is_better,
        losses=losses,
        loss_metric=loss_metric,
        intervals=[tuple(i) if i is not None else None for i in intervals],
        results=list(results),
    )
    if not all(math.isfinite(s) for s in path.scores):
        logger.warning("%s -> %s: non-finite scores on the path %s", start, end, path.scores)
    return path
