"""Typed views of what a recipe records about scores: this model's own, every model's, and a
WiSE-FT/PAINT sweep's, one :class:`~hf_soups.recipe.Score` per model and eval set."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from hf_soups.recipe.schema import PatchRecord, Recipe, Score, score_table
from hf_soups.recipe.typed import from_json

ScoreTable = dict[str, dict[str, Score]]
"""Model (or alpha) -> eval set -> score."""

SweepPoint = tuple[float, dict[str, Score]]
"""One swept ``alpha`` and its score on every eval set."""


def sweep_points(patch: PatchRecord | None) -> list[SweepPoint]:
    """The sweep of a WiSE-FT/PAINT recipe, in recorded order: each alpha's result summaries
    (``sweep.results``), or its bare values (``sweep.scores``) when no summary was kept."""
    if patch is None or not patch.sweep:
        return []
    sweep = patch.sweep
    alphas = from_json(list[float], sweep.get("alphas", []), "patch.sweep.alphas")
    per_set = sweep.get("results")
    if per_set is None:
        values = from_json(dict[str, list[float]], sweep.get("scores", {}), "patch.sweep.scores")
        per_set = {name: [{"score": v} for v in column] for name, column in values.items()}
    per_set = from_json(dict[str, list[Any]], per_set, "patch.sweep.results")
    points = []
    for i, alpha in enumerate(alphas):
        entries = {name: column[i] for name, column in per_set.items() if i < len(column)}
        points.append((alpha, score_table({"point": entries})["point"] if entries else {}))
    return points


def point_at(points: Iterable[SweepPoint], alpha: float | None) -> dict[str, Score] | None:
    """The scores swept at ``alpha``, if it was swept."""
    if alpha is None:
        return None
    return next((s for a, s in points if math.isclose(a, alpha, abs_tol=1e-12)), None)


def self_name(recipe: Recipe) -> str | None:
    """This model's row in ``recipe.scores``, when it was scored under its name."""
    return recipe.name if recipe.name in recipe.scores else None


def own_scores(recipe: Recipe) -> dict[str, Score]:
    """This model's scores per eval set: its row of ``scores``, else (an interpolation scored
    only in its sweep) the sweep at the chosen alpha."""
    name = self_name(recipe)
    if name is not None:
        return recipe.scores[name]
    chosen = recipe.patch.chosen_alpha if recipe.patch else None
    return point_at(sweep_points(recipe.patch), chosen) or {}


def eval_sets(table: Mapping[str, Mapping[str, Score]]) -> list[str]:
    """Every eval set of a score table, in first-seen order."""
    return list(dict.fromkeys(name for per_set in table.values() for name in per_set))


def metrics(table: Mapping[str, Mapping[str, Score]]) -> list[str]:
    """Every metric of a score table, primary metrics first, in first-seen order."""
    scores = [score for per_set in table.values() for score in per_set.values()]
    primary = [s.primary_metric for s in scores if s.primary_metric]
    return list(dict.fromkeys([*primary, *(m for s in scores for m in s.metrics)]))


def values(table: Mapping[str, Mapping[str, Score]], metric: str) -> list[float]:
    """Every recorded value of ``metric`` (to decide how a whole column is written)."""
    return [
        score.metrics[metric]
        for per_set in table.values()
        for score in per_set.values()
        if metric in score.metrics
    ]


def primary_metric(recipe: Recipe, table: Mapping[str, Mapping[str, Score]]) -> str:
    """The metric the card leads with: the one the soup was selected on when recorded, else
    the first primary metric seen, else accuracy."""
    known = metrics(table)
    selected = recipe.soup.metric if recipe.soup else None
    if selected in known:
        return selected
    return known[0] if known else "accuracy"


def has_intervals(*tables: Mapping[str, Mapping[str, Score]]) -> bool:
    return any(
        score.intervals for t in tables for per_set in t.values() for score in per_set.values()
    )
