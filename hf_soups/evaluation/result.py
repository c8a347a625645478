"""`EvalResult`: one model's metrics on one dataset, with per-example outcomes and intervals."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_soups.stats import mean_interval

__all__ = ["EvalResult"]


def _compact_int(array: np.ndarray) -> np.ndarray:
    for dtype in (np.int16, np.int32):
        info = np.iinfo(dtype)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(dtype)
    return array.astype(np.int64)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@dataclass
class EvalResult:
    """Metrics of one model (or ensemble) on one dataset, with per-example outcomes.

    Attributes:
        name: Display name, e.g. "uniform soup".
        metrics: Metric name -> value (accuracy as a fraction).
        predictions: Argmax class per example, in dataset order.
        labels: Reference class per example, in dataset order.
        primary_metric: The metric `score` reports; the first metric when `None`.
        intervals: Metric name -> `(low, high)` confidence interval, for metrics where one
            can be computed (Wilson for accuracies, bootstrap for cheap callables).
        per_example: Metric name -> per-example values whose mean is the metric (0/1 hits for
            accuracy and top-k accuracy); they are what paired tests compare.
        confidence: Coverage of `intervals`.
    """

    name: str
    metrics: dict[str, float]
    predictions: np.ndarray
    labels: np.ndarray
    primary_metric: str | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_example: dict[str, np.ndarray] = field(default_factory=dict)
    confidence: float = 0.95

    @property
    def n(self) -> int:
        """Number of examples."""
        return int(len(self.labels))

    @property
    def score_metric(self) -> str:
        """Name of the metric `score` reports: `primary_metric`, else the first metric."""
        if self.primary_metric is not None:
            return self.primary_metric
        if not self.metrics:
            raise ValueError(f"result {self.name!r} holds no metrics")
        return next(iter(self.metrics))

    @property
    def score(self) -> float:
        """Value of the primary metric (the first metric unless `primary_metric` is set)."""
        if not self.metrics:
            raise ValueError(f"result {self.name!r} holds no metrics")
        return self.metrics[self.score_metric]

    def values(self, metric: str = "accuracy") -> np.ndarray:
        """Per-example values of `metric` (for "accuracy", also derivable from predictions)."""
        if metric in self.per_example:
            return np.asarray(self.per_example[metric])
        if metric == "accuracy":
            return np.asarray(self.predictions) == np.asarray(self.labels)
        raise KeyError(
            f"result {self.name!r} has no per-example values for {metric!r}; available: "
            f"{sorted({'accuracy', *self.per_example})}"
        )

    def interval(
        self,
        metric: str = "accuracy",
        confidence: float | None = None,
        n_resamples: int = 1000,
        seed: int = 0,
    ) -> tuple[float, float]:
        """Recompute a metric's interval from the stored per-example values."""
        return mean_interval(
            self.values(metric), confidence or self.confidence, n_resamples=n_resamples, seed=seed
        )

    def summary(self) -> str:
        """One line such as "soup: accuracy 0.912 [0.8929, 0.9279] (n=1000)"."""
        parts = []
        for key, value in self.metrics.items():
            text = f"{key} {value:.4g}"
            if key in self.intervals:
                low, high = self.intervals[key]
                text += f" [{low:.4g}, {high:.4g}]"
            parts.append(text)
        return f"{self.name}: {', '.join(parts)} (n={self.n})"

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: name, n, metrics, score, intervals (no per-example arrays)."""
        return {
            "name": self.name,
            "n": self.n,
            "metrics": dict(self.metrics),
            "primary_metric": self.score_metric,
            "score": self.score,
            "confidence": self.confidence,
            "intervals": {key: [low, high] for key, (low, high) in self.intervals.items()},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the summary to `path` (JSON) and per-example arrays beside it (`.npz`).

        Predictions and labels are stored as int16 (int32 past 32,767 classes) and 0/1
        per-example values as booleans, compressed, so intervals and paired tests can be
        recomputed later without rerunning any model. Returns the JSON path.
        """
        path = Path(path)
        arrays_path = path.with_suffix(".npz")
        if arrays_path == path:
            raise ValueError(f"cannot save a result to {path}: it must not end in .npz")
        arrays = {
            "predictions": _compact_int(np.asarray(self.predictions)),
            "labels": _compact_int(np.asarray(self.labels)),
        }
        for key, values in self.per_example.items():
            values = np.asarray(values)
            binary = values.dtype == np.bool_ or np.isin(values, (0, 1)).all()
            arrays[f"per_example/{key}"] = values.astype(np.bool_ if binary else np.float64)
        summary = {**self.to_dict(), "arrays": arrays_path.name}
        path.parent.mkdir(parents=True, exist_ok=True)

        def write_arrays(target: Path) -> None:
            with open(target, "wb") as handle:
                np.savez_compressed(handle, **arrays)

        _write_atomic(arrays_path, write_arrays)
        _write_atomic(path, lambda target: target.write_text(json.dumps(summary, indent=2)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EvalResult:
        """Read a result written by `save`."""
        path = Path(path)
        summary = json.loads(path.read_text())
        with np.load(path.parent / summary["arrays"]) as arrays:
            predictions = arrays["predictions"].astype(np.int64)
            labels = arrays["labels"].astype(np.int64)
            per_example = {
                key.removeprefix("per_example/"): arrays[key]
                for key in arrays.files
                if key.startswith("per_example/")
            }
        return cls(
            name=summary["name"],
            metrics=summary["metrics"],
            predictions=predictions,
            labels=labels,
            primary_metric=summary["primary_metric"],
            intervals={key: (low, high) for key, (low, high) in summary["intervals"].items()},
            per_example=per_example,
            confidence=summary["confidence"],
        )
