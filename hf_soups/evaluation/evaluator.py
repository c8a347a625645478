"""`Evaluator`: score models and logit ensembles on a dataset, with Accelerate.

`Evaluator` runs a classifier over a `datasets.Dataset` (or a `DataLoader`) through
`accelerator.prepare` and `accelerator.gather_for_metrics`, so a run launched with
`accelerate launch` over several processes gives exactly the single-process metrics and
per-example predictions, whatever the dataset size. It returns an `EvalResult`: metrics,
per-example predictions and labels, and confidence intervals (see `hf_soups.stats`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hf_soups.evaluation.data import build_dataloader, dataset_length
from hf_soups.evaluation.metrics import BoundMetric, MetricsArg, Outputs, resolve_metrics
from hf_soups.evaluation.result import EvalResult
from hf_soups.models.labels import check_labels, label_names_of
from hf_soups.stats import bootstrap_interval

__all__ = ["Evaluator"]

logger = logging.getLogger(__name__)


def _logits_of(output: Any, model: nn.Module) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{type(model).__name__} returned {type(output).__name__}; the Evaluator needs a "
            "logits tensor or an output with a `.logits` tensor"
        )
    if logits.ndim != 2:
        raise ValueError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)}; expected "
            "(batch, classes)"
        )
    return logits.float()


def _input_dtype(model: nn.Module) -> torch.dtype | None:
    parameter = next(model.parameters(), None)
    return None if parameter is None else parameter.dtype


class Evaluator:
    """Run classifiers over a dataset and score them.

    Args:
        dataset: A `datasets.Dataset` with `input_column` and `label_column` (tensors, arrays
            or lists; a dataset with `set_transform` is used as it is), or a `DataLoader`
            yielding dicts with those keys or `(inputs, labels)` pairs. Do not shuffle it:
            per-example outcomes are paired across models by position.
        metrics: One or several of: "accuracy"; "top_k_accuracy" (k=5) or "top_<k>_accuracy";
            another `evaluate` module name (offline only if cached); an
            `evaluate.EvaluationModule` (given class predictions, or logits when its
            "predictions" feature is a sequence); a callable `(predictions, labels)` returning
            a float or a dict of floats (it gets logits instead when its first parameter is
            named `logits` or `scores`; note that scikit-learn metrics take `(y_true, y_pred)`
            and need wrapping). A mapping `{name: metric}` stores each under `name`.
        batch_size: Batch size per process (for a `datasets.Dataset`).
        input_column: Dataset column, and keyword the model is called with.
        label_column: Dataset column of class indices.
        accelerator: The `Accelerator` to run under; a default one is created when `None`.
        name: Default name of the results.
        primary_metric: Metric reported by `EvalResult.score`; the first metric when `None`.
        num_workers: DataLoader workers (for a `datasets.Dataset`).
        progress: Show a progress bar on the main process.
        confidence: Coverage of the intervals in results.
        n_resamples: Bootstrap resamples for intervals of callable metrics (0 disables them).
        seed: Bootstrap seed.

    Models are called as `model(**{input_column: inputs})` and must return logits or an
    object with `.logits`. They are moved to `accelerator.device`, evaluated in eval mode
    under `torch.inference_mode()`, and left on that device with their training flag
    restored. They are not wrapped for distributed training: every process holds the whole
    model and sees its shard of the data; `gather_for_metrics` drops the samples Accelerate
    repeats to even out the last batch, so metrics and per-example predictions equal those of
    a single process.

    `with_metrics` gives a copy that computes more metrics on the same data.
    """

    def __init__(
        self,
        dataset: datasets.Dataset | DataLoader,
        metrics: MetricsArg = "accuracy",
        *,
        batch_size: int = 128,
        input_column: str = "pixel_values",
        label_column: str = "labels",
        accelerator: Accelerator | None = None,
        name: str = "eval",
        primary_metric: str | None = None,
        num_workers: int = 0,
        progress: bool = True,
        confidence: float = 0.95,
        n_resamples: int = 1000,
        seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self._metrics = resolve_metrics(metrics)
        self.batch_size = batch_size
        self.input_column = input_column
        self.label_column = label_column
        self.name = name
        self.primary_metric = primary_metric
        self.num_workers = num_workers
        self.progress = progress
        self.confidence = confidence
        self.n_resamples = n_resamples
        self.seed = seed
        self._accelerator = accelerator
        self._dataloader: DataLoader | None = None

    @property
    def accelerator(self) -> Accelerator:
        """The Accelerator this evaluator runs under (created on first use if not given)."""
        if self._accelerator is None:
            self._accelerator = Accelerator()
        return self._accelerator

    def with_metrics(self, metrics: MetricsArg, *, bootstrap: bool = True) -> Evaluator:
        """A copy of this evaluator that also computes `metrics` (same forms as in `__init__`).

        The copy shares the dataset, the accelerator and, once prepared, the DataLoader; this
        evaluator is left as it is. `bootstrap=False` gives the added callable metrics no
        bootstrap interval: one costs `n_resamples` calls of the metric per model scored.
        """
        added = resolve_metrics(metrics)
        if not bootstrap:
            added = [metric.without_bootstrap() for metric in added]
        extended = copy.copy(self)
        extended._metrics = [*self._metrics, *added]
        return extended

    def _prepared_dataloader(self) -> DataLoader:
        # Prepared once: Accelerate keeps a reference to each prepared DataLoader, and greedy
        # searches call evaluate() many times.
        if self._dataloader is None:
            self._dataloader = self.accelerator.prepare(
                build_dataloader(
                    self.dataset,
                    (self.input_column, self.label_column),
                    self.batch_size,
                    self.num_workers,
                )
            )
        return self._dataloader

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, Mapping):
            for column in (self.input_column, self.label_column):
                if column not in batch:
                    raise ValueError(
                        f"batch has no key {column!r} (keys: {sorted(batch)}); set "
                        "input_column / label_column"
                    )
            return batch[self.input_column], batch[self.label_column]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(
            f"cannot read a batch of type {type(batch).__name__}: expected a dict with "
            f"{self.input_column!r} and {self.label_column!r}, or an (inputs, labels) pair"
        )

    def _run(self, models: Sequence[nn.Module], description: str) -> Outputs:
        accelerator = self.accelerator
        dataloader = self._prepared_dataloader()
        training = [model.training for model in models]
        for model in models:
            model.to(accelerator.device).eval()
        dtypes = [_input_dtype(model) for model in models]
        logits_parts: list[torch.Tensor] = []
        label_parts: list[torch.Tensor] = []
        try:
            with torch.inference_mode():
                for batch in tqdm(
                    dataloader,
                    desc=description,
                    disable=not (self.progress and accelerator.is_local_main_process),
                    leave=False,
                ):
                    inputs, labels = self._unpack(batch)
                    inputs = inputs.to(accelerator.device)
                    total = None
                    for model, dtype in zip(models, dtypes, strict=True):
                        x = inputs.to(dtype) if dtype and inputs.is_floating_point() else inputs
                        logits = _logits_of(model(**{self.input_column: x}), model)
                        total = logits if total is None else total + logits
                    mean = total / len(models)
                    labels = labels.to(accelerator.device, dtype=torch.long)
                    mean, labels = accelerator.gather_for_metrics((mean, labels))
                    logits_parts.append(mean.cpu())
                    label_parts.append(labels.cpu())
        finally:
            for model, was_training in zip(models, training, strict=True):
                model.train(was_training)
        if not logits_parts:
            raise ValueError(f"evaluation data for {description!r} is empty")
        logits = torch.cat(logits_parts)
        outputs = Outputs(
            logits=logits.numpy(),
            predictions=logits.argmax(dim=-1).numpy(),
            labels=torch.cat(label_parts).numpy(),
        )
        expected = dataset_length(self.dataset)
        if expected is not None and expected != len(outputs.labels):
            logger.warning(
                "evaluated %d examples but the dataset has %d",
                len(outputs.labels),
                expected,
            )
        return outputs

    def _result(self, outputs: Outputs, name: str) -> EvalResult:
        metrics: dict[str, float] = {}
        per_example: dict[str, np.ndarray] = {}
        intervals: dict[str, tuple[float, float]] = {}
        for metric in self._metrics:
            values = metric.compute(outputs)
            clash = sorted(set(values) & set(metrics))
            if clash:
                raise ValueError(
                    f"{metric.label} gives {clash[0]!r}, which another metric already gave; "
                    "pass metrics as a mapping {name: metric} to rename"
                )
            metrics.update(values)
            if metric.per_example is not None:
                per_example.update(metric.per_example(outputs))
            elif metric.bootstrap_fn is not None and self.n_resamples > 0:
                intervals.update(self._bootstrap(metric, outputs, list(values)))
        if self.primary_metric is not None and self.primary_metric not in metrics:
            raise ValueError(
                f"primary_metric {self.primary_metric!r} is not among the metrics computed: "
                f"{sorted(metrics)}"
            )
        result = EvalResult(
            name=name,
            metrics=metrics,
            predictions=outputs.predictions,
            labels=outputs.labels,
            primary_metric=self.primary_metric,
            per_example=per_example,
            confidence=self.confidence,
        )
        for key in per_example:
            intervals[key] = result.interval(key, n_resamples=self.n_resamples, seed=self.seed)
        result.intervals = {key: intervals[key] for key in metrics if key in intervals}
        return result

    def _bootstrap(
        self, metric: BoundMetric, outputs: Outputs, keys: list[str]
    ) -> dict[str, tuple[float, float]]:
        inputs = outputs.logits if metric.bootstrap_uses_logits else outputs.predictions
        fn = metric.bootstrap_fn
        return {
            key: bootstrap_interval(
                (inputs, outputs.labels, lambda x, y, key=key: fn(x, y)[key]),
                n_resamples=self.n_resamples,
                confidence=self.confidence,
                seed=self.seed,
            )
            for key in keys
        }

    def evaluate(self, model: nn.Module, *, name: str | None = None) -> EvalResult:
        """Score one model. `name` labels the result (default: the evaluator's name)."""
        name = name or self.name
        check_labels(label_names_of(model), self.dataset, label_column=self.label_column)
        result = self._result(self._run([model], name), name)
        if self.accelerator.is_main_process:
            logger.info(result.summary())
        return result

    __call__ = evaluate

    def evaluate_ensemble(
        self, models: Sequence[nn.Module], *, name: str | None = None
    ) -> EvalResult:
        """Score the logit ensemble of `models`: the mean of their logits, in one data pass.

        This is the ensemble baseline of the model soups paper. Every model is moved to the
        accelerator's device at once.
        """
        models = list(models)
        if not models:
            raise ValueError("evaluate_ensemble needs at least one model")
        name = name or f"ensemble of {len(models)}"
        result = self._result(self._run(models, name), name)
        if self.accelerator.is_main_process:
            logger.info(result.summary())
        return result
