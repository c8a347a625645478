"""Soupability diagnostics: will averaging these models work?

Weight averaging works when the models share a pre-trained start and stay in one low-loss basin
(Neyshabur et al. 2020; Frankle et al. 2020). :func:`check_soupability` measures both sides:

- pairwise weight statistics streamed tensor by tensor through the merge engine
  (:func:`~hf_soups.diagnostics.weights.pairwise_weight_statistics`): L2 distances, cosines of the
  deltas from a base (or of the raw weights), per tensor and per layer;
- linear mode connectivity scored by an :class:`~hf_soups.evaluation.Evaluator`
  (:func:`~hf_soups.diagnostics.connectivity.linear_mode_connectivity`): the barrier of each
  interpolation path, in accuracy points and in loss;

and returns a :class:`DiagnosticsReport` with a :class:`Verdict` per ingredient and its reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from hf_soups.diagnostics.connectivity import (
    CROSS_ENTROPY,
    DEFAULT_POINTS,
    SOUP,
    InterpolationPath,
    PairsArg,
    cross_entropy,
    linear_mode_connectivity,
)
from hf_soups.diagnostics.plots import PATHS_PLOT, WEIGHTS_PLOT, write_plots
from hf_soups.diagnostics.verdict import DiagnosticsReport, Thresholds, Verdict, judge
from hf_soups.diagnostics.weights import (
    WeightStatistics,
    layer_of,
    pairwise_weight_statistics,
)
from hf_soups.evaluation import Evaluator
from hf_soups.merge import IngredientLike, as_ingredients
from hf_soups.models import ZeroShotTask

logger = logging.getLogger(__name__)

__all__ = [
    "CROSS_ENTROPY",
    "DEFAULT_POINTS",
    "PATHS_PLOT",
    "SOUP",
    "WEIGHTS_PLOT",
    "DiagnosticsReport",
    "InterpolationPath",
    "Thresholds",
    "Verdict",
    "WeightStatistics",
    "check_soupability",
    "cross_entropy",
    "judge",
    "layer_of",
    "linear_mode_connectivity",
    "pairwise_weight_statistics",
    "write_plots",
]


def check_soupability(
    ingredients: Sequence[IngredientLike],
    *,
    base: IngredientLike | None = None,
    evaluator: Evaluator | None = None,
    points: int = DEFAULT_POINTS,
    pairs: PairsArg = "reference",
    reference: int | None = None,
    loss: bool | str = True,
    higher_is_better: bool = True,
    thresholds: Thresholds | None = None,
    plots_dir: str | os.PathLike | None = None,
    progress: bool = True,
    task: ZeroShotTask | None = None,
) -> DiagnosticsReport:
    """Measure whether the ingredients can be averaged, and judge each one.

    Args:
        ingredients: :class:`~hf_soups.ingredients.Ingredient`s, folders or Hub ids.
        base: their common pre-trained start, if known: cosines are then of the deltas from it,
            and distance-only verdicts measure how far each moved from it.
        evaluator: scores the interpolation paths. Without one, verdicts rest on weight
            distances alone (a heuristic, and said so in each reason).
        points: models per path, ends included.
        pairs: ``"reference"`` (each ingredient against the reference), ``"soup"`` (each
            against the uniform soup), ``"all"`` or explicit index pairs.
        reference: index of the reference ingredient; default the medoid of the weight
            distances, so that an odd one out is not the yardstick when most share a start.
        loss: add the cross-entropy barrier (``True``), name a loss metric the evaluator gives,
            or ``False``.
        higher_is_better: ``False`` when the evaluator's primary metric is a loss.
        thresholds: see :class:`Thresholds`.
        plots_dir: write the plots there (their names are in ``report.plots``).
        progress: progress bars.
        task: class names and templates for scoring CLIP models without a head.

    Returns:
        A :class:`DiagnosticsReport`; every warning or failure is also logged as a warning.
    """
    ingredients = as_ingredients(ingredients)
    if not ingredients:
        raise ValueError("check_soupability: no ingredients given")
    stats = pairwise_weight_statistics(ingredients, base=base, progress=progress)
    if reference is None:
        reference = stats.medoid()
    elif not 0 <= reference < len(ingredients):
        raise ValueError(f"reference: index {reference} out of range for {len(ingredients)}")
    paths: list[InterpolationPath] = []
    if evaluator is not None and len(ingredients) > 1:
        paths = linear_mode_connectivity(
            ingredients,
            evaluator,
            pairs=pairs,
            reference=reference,
            points=points,
            loss=loss,
            higher_is_better=higher_is_better,
            progress=progress,
            task=task,
        )
    thresholds = thresholds or Thresholds()
    verdicts = judge(stats, paths, reference=reference, thresholds=thresholds)
    report = DiagnosticsReport(
        ingredients=stats.ingredients,
        weights=stats,
        paths=paths,
        verdicts=verdicts,
        reference=reference,
        thresholds=thresholds,
    )
    for verdict in report.flagged:
        logger.warning("Soupability of %s: %s", verdict.ingredient, verdict.reason)
    if plots_dir is not None:
        write_plots(report, plots_dir)
    return report
