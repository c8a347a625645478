"""One adapter for "an Evaluator or a callable model -> score": what greedy soups, sweeps and
selection rules accept wherever a model must be scored."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from torch import nn

from hf_soups.evaluation.evaluator import Evaluator
from hf_soups.evaluation.metrics import scalar
from hf_soups.evaluation.result import EvalResult

__all__ = ["Scored", "Scorer", "ScorerLike", "as_scorer", "score_fn"]

ScorerLike = Evaluator | Callable[[nn.Module], EvalResult | float]
"""An `Evaluator`, or a callable returning a number or an `EvalResult` (higher is better
unless the caller says otherwise)."""


class Scored(NamedTuple):
    """A model's score, and the `EvalResult` it comes from when there is one."""

    value: float
    result: EvalResult | None


class Scorer(Protocol):
    """Scores one model; `name` labels the `EvalResult` when an Evaluator makes one."""

    def __call__(self, model: nn.Module, name: str | None = None) -> Scored: ...


def as_scorer(evaluator: ScorerLike, metric: str | None = None) -> Scorer:
    """A function `(model, name=None) -> Scored` from an `Evaluator` or a plain callable.

    Args:
        evaluator: an `Evaluator` (its result is kept), or a callable `model -> float` or
            `model -> EvalResult`.
        metric: the metric of the `EvalResult` to report; its primary metric when `None`.
            A callable's plain number is reported as it is.

    Raises:
        TypeError: `evaluator` is neither (at once), or a callable returns something else.
        KeyError: the result has no metric `metric`.
    """
    if not (isinstance(evaluator, Evaluator) or callable(evaluator)):
        raise TypeError(
            f"evaluator: expected an Evaluator or a callable model -> float, got "
            f"{type(evaluator).__name__}"
        )

    def value_of(result: EvalResult) -> float:
        key = metric or result.score_metric
        if key not in result.metrics:
            raise KeyError(
                f"metric {key!r}: result {result.name!r} gives only {sorted(result.metrics)}"
            )
        return float(result.metrics[key])

    def score(model: nn.Module, name: str | None = None) -> Scored:
        if isinstance(evaluator, Evaluator):
            result = evaluator.evaluate(model, name=name)
        else:
            result = evaluator(model)
        if isinstance(result, EvalResult):
            return Scored(value_of(result), result)
        return Scored(scalar(result, f"score function {evaluator!r}"), None)

    return score


def score_fn(evaluator: ScorerLike, metric: str | None = None) -> Callable[[nn.Module], float]:
    """A function model -> float: the value `as_scorer(evaluator, metric)` gives."""
    scorer = as_scorer(evaluator, metric)
    return lambda model: scorer(model).value
