"""The rows of a card's tables: ingredients, greedy selection, results, sweep, interpolated
ends. Every score is written by :func:`hf_soups.report.format_score`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hf_soups.cards.scores import ScoreTable, SweepPoint, eval_sets, metrics, point_at, values
from hf_soups.cards.sources import link, revision_text
from hf_soups.recipe.schema import GreedyStep, Recipe, Source
from hf_soups.report import MISSING, format_score, format_value, is_fraction_metric


def cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _weight(weight: float | None) -> str:
    return MISSING if weight is None else f"{weight:.4g}"


def _percent(table: ScoreTable, metric: str) -> bool:
    return is_fraction_metric(metric, values(table, metric))


def ingredient_weights(recipe: Recipe) -> dict[str, float]:
    """Mixing weight per ingredient display name, when the recipe tells them."""
    names = [source.display_name for source in recipe.ingredients]
    weights = recipe.parameters.get("weights")
    if not isinstance(weights, list) and recipe.soup is not None:
        weights = recipe.soup.weights  # per-tensor soups record the mean weight here
    if isinstance(weights, list) and len(weights) == len(names):
        return dict(zip(names, map(float, weights)))
    alpha = recipe.parameters.get("alpha")
    if recipe.patch is not None and isinstance(alpha, (int, float)) and len(names) == 2:
        return {names[0]: 1.0 - alpha, names[1]: float(alpha)}
    return {}


def _trace(recipe: Recipe) -> list[GreedyStep]:
    return list(recipe.soup.greedy_trace or []) if recipe.soup else []


def _considered(recipe: Recipe) -> list[Source]:
    """Every model considered (a greedy soup drops some), or the merged ingredients."""
    return list((recipe.soup.candidates if recipe.soup else None) or recipe.ingredients)


def ingredient_rows(
    recipe: Recipe, scores: ScoreTable, metric: str, own_set: str | None
) -> tuple[list[dict], bool]:
    """Rows of the ingredients table, and whether a "kept" column applies (greedy soups)."""
    trace = _trace(recipe)
    kept = {step.ingredient: step.kept for step in trace}
    merged = {source.display_name for source in recipe.ingredients}
    weights = ingredient_weights(recipe)
    records = _considered(recipe)
    known = {source.display_name for source in records}
    # A trace may name candidates the recipe does not record in full.
    records = [*records, *(Source(source=name) for name in kept if name not in known)]
    percent = _percent(scores, metric)
    rows = []
    for index, source in enumerate(records, start=1):
        name = source.display_name
        own = scores.get(name, {}).get(own_set) if own_set else None
        rows.append(
            {
                "index": index,
                "name": cell(name),
                "link": link(source),
                "revision": cell(revision_text(source) if name in known else "(not recorded)"),
                "weight": _weight(weights.get(name, 0.0 if trace else None)),
                "score": format_score(own, metric, percent=percent),
                "kept": "yes" if kept.get(name, name in merged) else "no",
            }
        )
    return rows, bool(trace)


def trace_rows(recipe: Recipe, metric: str) -> list[dict]:
    """The greedy soup's steps: candidate, its own score, the soup's with it, the verdict."""
    trace = _trace(recipe)
    numbers = [v for s in trace for v in (s.individual_score, s.soup_score) if v is not None]
    percent = is_fraction_metric(metric, numbers)

    def number(value: float | None) -> str:
        return MISSING if value is None else format_value(value, percent)

    return [
        {
            "step": step,
            "ingredient": cell(entry.ingredient),
            "individual": number(entry.individual_score),
            "soup": number(entry.soup_score),
            "kept": "yes" if entry.kept else "no",
            "reason": cell(entry.reason),
        }
        for step, entry in enumerate(trace, start=1)
    ]


def results_tables(
    scores: ScoreTable, models: Sequence[str], self_name: str | None, primary: str
) -> list[dict]:
    """One table per metric (``primary`` first): models as rows, eval sets as columns."""
    tables = []
    for metric in sorted(metrics(scores), key=lambda m: m != primary):
        columns = [
            name
            for name in eval_sets(scores)
            if any(_has(scores, model, name, metric) for model in models)
        ]
        percent = _percent(scores, metric)
        headers = []
        for eval_set in columns:
            sizes = {scores[m][eval_set].n for m in models if eval_set in scores.get(m, {})}
            size = f" (n={sizes.pop()})" if len(sizes) == 1 and None not in sizes else ""
            headers.append(cell(f"{eval_set}{size}"))
        rows = []
        for model in models:
            per_set = scores.get(model, {})
            cells = [format_score(per_set.get(s), metric, percent=percent) for s in columns]
            if all(text == MISSING for text in cells):
                continue
            label = cell(model) + (" (this model)" if model == self_name else "")
            rows.append({"model": f"**{label}**" if model == self_name else label, "cells": cells})
        if rows:
            unit = " (%)" if percent else ""
            tables.append({"metric": f"{metric}{unit}", "columns": headers, "rows": rows})
    return tables


def _has(scores: ScoreTable, model: str, eval_set: str, metric: str) -> bool:
    score = scores.get(model, {}).get(eval_set)
    return score is not None and metric in score.metrics


def model_order(recipe: Recipe, scores: ScoreTable) -> list[str]:
    """The results' rows: ingredients in recipe order, then every other model recorded."""
    first = [s.display_name for s in _considered(recipe) if s.display_name in scores]
    return list(dict.fromkeys([*first, *scores]))


def sweep_table(points: Sequence[SweepPoint], chosen: float | None, metric: str) -> dict | None:
    """One row per swept alpha (the chosen one marked), one column per eval set."""
    if not points:
        return None
    table = {f"{i}": per_set for i, (_, per_set) in enumerate(points)}
    known = metrics(table)
    if metric not in known and known:
        metric = known[0]
    columns = eval_sets(table)
    percent = _percent(table, metric)
    rows = []
    for alpha, per_set in points:
        is_chosen = chosen is not None and math.isclose(alpha, chosen, abs_tol=1e-12)
        rows.append(
            {
                "alpha": f"**{alpha:g}** (chosen)" if is_chosen else f"{alpha:g}",
                "cells": [format_score(per_set.get(s), metric, percent=percent) for s in columns],
            }
        )
    unit = " (%)" if percent else ""
    return {"metric": f"{metric}{unit}", "columns": [cell(s) for s in columns], "rows": rows}


def end_rows(recipe: Recipe, points: Sequence[SweepPoint], metric: str) -> list[dict]:
    """The two interpolated models, with their weights and their scores from the sweep."""
    patch = recipe.patch
    if patch is None:
        return []
    weights = ingredient_weights(recipe)
    rows = []
    for role, source, alpha in (
        ("zero-shot (α = 0)", patch.zero_shot, 0.0),
        ("fine-tuned (α = 1)", patch.fine_tuned, 1.0),
    ):
        weight = weights.get(source.display_name)
        if weight is None:
            weight = 1.0 - patch.chosen_alpha if alpha == 0.0 else patch.chosen_alpha
        scores = point_at(points, alpha) or {}
        cells = [f"{cell(name)}: {format_score(score, metric)}" for name, score in scores.items()]
        rows.append(
            {
                "role": role,
                "name": cell(source.display_name),
                "link": link(source),
                "revision": cell(revision_text(source)),
                "weight": _weight(weight),
                "score": "; ".join(cells) or MISSING,
            }
        )
    return rows
