"""Results tables: every model's score on every eval set with its 95% interval, and paired
comparisons with Holm-adjusted p-values."""

from __future__ import annotations

from collections.abc import Mapping

from hf_soups.stats import holm_adjust


def format_score(entry: Mapping) -> str:
    """``"91.20 [89.29, 92.79]"`` (percent) from an ``EvalResult.to_dict()``-like entry."""
    score = entry.get("score")
    if score is None:
        return "-"
    metric = entry.get("primary_metric")
    interval = (entry.get("intervals") or {}).get(metric) if metric else None
    text = f"{100 * score:.2f}"
    if interval:
        text += f" [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"
    return text


def results_table(
    scores: Mapping[str, Mapping[str, Mapping]],
    *,
    cost: Mapping[str, str | int] | None = None,
) -> str:
    """A markdown table: one row per model, one column per eval set (percent, 95% interval).

    Args:
        scores: model name -> eval set name -> ``EvalResult.to_dict()`` (or ``{"score": x}``).
        cost: optional inference cost per model (for example 1 for a soup, N for an ensemble).
    """
    eval_sets: list[str] = []
    for per_set in scores.values():
        eval_sets.extend(name for name in per_set if name not in eval_sets)
    header = ["model", *eval_sets, *(["inference cost"] if cost else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, per_set in scores.items():
        row = [model, *(format_score(per_set.get(name, {})) for name in eval_sets)]
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
