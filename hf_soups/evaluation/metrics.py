"""Metric adapters: turn what users pass as `metrics=` into functions of the gathered outputs.

Accepted metrics: "accuracy" and "top_<k>_accuracy" (computed here, directly from the logits),
other `evaluate` module names or `evaluate.EvaluationModule`s (run through their public
`compute`), and plain callables `(predictions or logits, labels) -> float | dict`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import datasets
import numpy as np
import torch

if TYPE_CHECKING:
    import evaluate

__all__ = ["METRICS_DIR", "MetricLike", "MetricsArg", "load_metric"]

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"
"""Folder of the `evaluate` metric modules shipped with hf_soups (usable offline)."""

MetricLike: TypeAlias = "str | evaluate.EvaluationModule | Callable[..., Any]"
"""One metric: a name, an `evaluate.EvaluationModule` or a callable."""
MetricsArg: TypeAlias = "MetricLike | Sequence[MetricLike] | Mapping[str, MetricLike]"
"""One metric, several, or a mapping `{name: metric}` that stores each under `name`."""

_TOP_K = re.compile(r"top_(k|\d+)_accuracy")
_DEFAULT_TOP_K = 5
_LOGITS_PARAMETERS = ("logits", "scores")


class Outputs(NamedTuple):
    """Everything gathered from one pass: float32 logits, argmax predictions, labels."""

    logits: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class BoundMetric:
    """A metric bound to the Evaluator's outputs.

    `per_example` gives the per-example values whose mean is the metric (for intervals and
    paired tests); `bootstrap_fn` is set when the metric is cheap enough to recompute on
    bootstrap resamples: it maps (logits or predictions, labels) to the metric dict.
    """

    label: str
    compute: Callable[[Outputs], dict[str, float]]
    per_example: Callable[[Outputs], dict[str, np.ndarray]] | None = None
    bootstrap_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None
    bootstrap_uses_logits: bool = False

    def without_bootstrap(self) -> BoundMetric:
        """The same metric, with no bootstrap interval computed for it."""
        return dataclasses.replace(self, bootstrap_fn=None)


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load an `evaluate` metric: hf_soups' shipped modules by path, others by `evaluate.load`.

    "accuracy" and "top_k_accuracy" come from `METRICS_DIR` and work offline; any other name
    goes to `evaluate.load`, which works offline only if the module is already cached.
    """
    # Imported on use: `import evaluate` pulls in transformers pipelines, seconds of startup
    # that code needing only the shipped metrics, EvalResult or as_scorer should not pay.
    import evaluate

    shipped = METRICS_DIR / name / f"{name}.py"
    if shipped.is_file():
        return evaluate.load(str(shipped), keep_in_memory=True)
    return evaluate.load(name)


def scalar(value: Any, where: str) -> float:
    """`value` as a float (a 0-d tensor or numpy number included); TypeError naming `where`."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where} returned {type(value).__name__}, expected a number") from None


def _floats(values: Mapping[str, Any], where: str) -> dict[str, float]:
    return {str(key): scalar(value, f"{where}[{key!r}]") for key, value in values.items()}


def top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-example top-k hits, with ties in the example's favour (as the shipped module)."""
    reference = logits[np.arange(len(labels)), labels]
    return (logits > reference[:, None]).sum(axis=1) < k


def _mean_of_hits(key: str, hits: Callable[[Outputs], np.ndarray]) -> BoundMetric:
    # The metric is the mean of its per-example hits, computed here rather than through the
    # evaluate module: its public compute() first encodes the inputs into an Arrow table for
    # evaluate's own cross-process accumulation, which gather_for_metrics has already done;
    # for 10,000 x 1,000 logits that encoding took 8.7 s against 0.03 s for top-k itself.
    return BoundMetric(
        label=key,
        compute=lambda o: {key: float(np.mean(hits(o)))},
        per_example=lambda o: {key: hits(o)},
    )


def _accuracy() -> BoundMetric:
    return _mean_of_hits("accuracy", lambda o: o.predictions == o.labels)


def _top_k(k: int) -> BoundMetric:
    return _mean_of_hits(f"top_{k}_accuracy", lambda o: top_k_hits(o.logits, o.labels, k))


def _wants_scores(module: evaluate.EvaluationModule) -> bool:
    features = module.features
    if isinstance(features, list):
        features = features[0]
    prediction_feature = features.get("predictions")
    # Class-index predictions are declared as a scalar Value/ClassLabel; anything else (a
    # sequence of floats) asks for per-class scores.
    return prediction_feature is not None and not isinstance(
        prediction_feature, (datasets.Value, datasets.ClassLabel)
    )


def _module_metric(module: evaluate.EvaluationModule) -> BoundMetric:
    scores = _wants_scores(module)
    label = f"evaluate module {module.name!r}"
    return BoundMetric(
        label=label,
        compute=lambda o: _floats(
            module.compute(predictions=o.logits if scores else o.predictions, references=o.labels),
            label,
        ),
    )


def _takes_logits(fn: Callable[..., Any]) -> bool:
    try:
        parameters = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(parameters) and parameters[0] in _LOGITS_PARAMETERS


def _callable_metric(name: str, fn: Callable[..., Any]) -> BoundMetric:
    logits = _takes_logits(fn)

    def as_dict(inputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        value = fn(inputs, labels)
        if isinstance(value, Mapping):
            return _floats(value, f"metric {name!r}")
        return {name: scalar(value, f"metric {name!r}")}

    return BoundMetric(
        label=f"metric {name!r}",
        compute=lambda o: as_dict(o.logits if logits else o.predictions, o.labels),
        bootstrap_fn=as_dict,
        bootstrap_uses_logits=logits,
    )


def _is_evaluate_module(metric: Any) -> bool:
    # An EvaluationModule can only exist once `evaluate` is imported, so there is no need to
    # import it (seconds) just to learn that a callable is not one.
    evaluate = sys.modules.get("evaluate")
    return evaluate is not None and isinstance(metric, evaluate.EvaluationModule)


def _resolve_one(metric: MetricLike) -> BoundMetric:
    if isinstance(metric, str):
        top_k = _TOP_K.fullmatch(metric)
        if metric == "accuracy":
            return _accuracy()
        if top_k:
            k = _DEFAULT_TOP_K if top_k.group(1) == "k" else int(top_k.group(1))
            if k < 1:
                raise ValueError(f"metric {metric!r}: k must be at least 1")
            return _top_k(k)
        return _module_metric(load_metric(metric))
    if _is_evaluate_module(metric):
        return _module_metric(metric)
    if callable(metric):
        return _callable_metric(getattr(metric, "__name__", type(metric).__name__), metric)
    raise TypeError(
        f"cannot use {metric!r} as a metric: expected a name, an evaluate.EvaluationModule or "
        "a callable (predictions, labels) -> float | dict"
    )


def _renamed(metric: BoundMetric, name: str) -> BoundMetric:
    """Store a metric's values under a user-chosen name (prefix when it gives several)."""

    def rename(values: dict[str, Any]) -> dict[str, Any]:
        if len(values) == 1:
            return {name: next(iter(values.values()))}
        return {f"{name}/{key}": value for key, value in values.items()}

    per_example = metric.per_example
    bootstrap_fn = metric.bootstrap_fn
    return BoundMetric(
        label=metric.label,
        compute=lambda o: rename(metric.compute(o)),
        per_example=None if per_example is None else lambda o: rename(per_example(o)),
        bootstrap_fn=None if bootstrap_fn is None else lambda x, y: rename(bootstrap_fn(x, y)),
        bootstrap_uses_logits=metric.bootstrap_uses_logits,
    )


def resolve_metrics(metrics: MetricsArg) -> list[BoundMetric]:
    """Bind every metric of a `metrics=` argument (see `Evaluator`); refuse an empty one."""
    if isinstance(metrics, Mapping):
        resolved = [_renamed(_resolve_one(m), str(name)) for name, m in metrics.items()]
    elif isinstance(metrics, str) or _is_evaluate_module(metrics) or callable(metrics):
        resolved = [_resolve_one(metrics)]
    else:
        resolved = [_resolve_one(m) for m in metrics]
    if not resolved:
        raise ValueError("metrics is empty: give at least one metric")
    return resolved
