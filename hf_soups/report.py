"""Results tables: every model's score on every eval set with its 95% interval, and paired
comparisons with Holm-adjusted p-values.

:func:`format_score` is the one way hf_soups writes a score, here and in model cards
(:mod:`hf_soups.cards`): ``"91.20 [89.29, 92.79]"``, in percent for accuracy-like metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hf_soups.recipe.schema import Score, score_table
from hf_soups.recipe.typed import to_json

MISSING = "—"
"""What a cell without a score shows."""


def is_fraction_metric(metric: str, values: Iterable[float]) -> bool:
    """Whether ``metric`` reads best in percent: an accuracy whose values all lie in [0, 1]."""
    return "accuracy" in metric and all(0.0 <= value <= 1.0 for value in values)


def format_value(value: float, percent: bool) -> str:
    """``91.20`` for 0.912 in percent, else four significant digits."""
    return f"{100 * value:.2f}" if percent else f"{value:.4g}"


def format_score(
    score: Score | None, metric: str | None = None, *, percent: bool | None = None
) -> str:
    """One score: its value of ``metric`` (default: the primary metric) followed by the 95%
    interval when recorded, ``"91.20 [89.29, 92.79]"``; :data:`MISSING` when there is no score.

    Args:
        percent: show percent; by default when the metric is accuracy-like and in [0, 1]
            (give it explicitly to format a whole column alike).
    """
    metric = metric or (score.primary_metric if score is not None else None)
    if score is None or metric not in score.metrics:
        return MISSING
    value = score.metrics[metric]
    interval = score.intervals.get(metric)
    if percent is None:
        percent = is_fraction_metric(metric, [value, *(interval or [])])
    text = format_value(value, percent)
    if interval:
        low, high = (format_value(bound, percent) for bound in interval)
        text += f" [{low}, {high}]"
    return text


def results_table(
    scores: Mapping[str, Mapping[str, Score | Mapping]],
    *,
    cost: Mapping[str, str | int] | None = None,
) -> str:
    """A markdown table: one row per model, one column per eval set (each cell its primary
    metric with the 95% interval, as :func:`format_score` writes it).

    Args:
        scores: model name -> eval set name -> :class:`~hf_soups.recipe.Score`, or the
            ``EvalResult.to_dict()`` summary (or ``{"score": x}``) it is read from.
        cost: optional inference cost per model (for example 1 for a soup, N for an ensemble).
    """
    typed = score_table(to_json(scores))
    eval_sets: list[str] = []
    for per_set in typed.values():
        eval_sets.extend(name for name in per_set if name not in eval_sets)
    primary = [score for per_set in typed.values() for score in per_set.values()]
    percent = all(
        is_fraction_metric(score.primary_metric or "", [score.score or 0.0]) for score in primary
    )
    header = ["model", *eval_sets, *(["inference cost"] if cost else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, per_set in typed.items():
        row = [model, *(format_score(per_set.get(name), percent=percent) for name in eval_sets)]
        if cost:
            row.append(f"{cost.get(model, '')}x" if model in cost else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def comparisons_table(
    comparisons: list[Mapping], baseline: str | None = None, *, alpha: float | None = None
) -> str:
    """A markdown table of paired comparisons against one baseline: one row per model, one
    column per eval set, each cell the difference in points with its raw and Holm-adjusted
    p-values, marked ``*`` when the adjusted p is below the level.

    Holm's correction runs over every comparison in the table (it controls the chance of any
    false star among them); the raw p is shown beside the adjusted one.

    Args:
        comparisons: ``PairedComparison.to_dict()`` entries with an added ``"eval_set"`` key.
        baseline: how to call the model every row is compared with (default: its name).
        alpha: the level of a star; by default each entry's ``"alpha"`` (0.05 if absent).
    """
    from hf_soups.stats import holm_adjust  # numpy and scipy, not needed to format a score

    adjusted = holm_adjust([_p_value(entry) for entry in comparisons])
    eval_sets: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for entry, adjusted_p in zip(comparisons, adjusted, strict=True):
        if entry["eval_set"] not in eval_sets:
            eval_sets.append(entry["eval_set"])
        level = alpha if alpha is not None else entry.get("alpha", 0.05)
        mark = "*" if adjusted_p < level else ""
        rows.setdefault(entry["name_a"], {})[entry["eval_set"]] = (
            f"{100 * entry['difference']:+.1f} (p={_p_value(entry):.2g}, "
            f"adj. p={adjusted_p:.2g}){mark}"
        )
    name = comparisons[0]["name_b"] if comparisons else ""
    header = [f"vs {baseline} ({name})" if baseline else f"vs {name}", *eval_sets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, cells in rows.items():
        lines.append("| " + " | ".join([model, *(cells.get(s, "") for s in eval_sets)]) + " |")
    return "\n".join(lines)


def _p_value(entry: Mapping) -> float:
    # Entries written before bootstrap p-values were recorded carry only the McNemar p.
    p_value = entry.get("p_value", entry.get("mcnemar_p"))
    if p_value is None:
        raise ValueError(f"comparison {entry.get('name_a')!r} carries no p-value")
    return float(p_value)
