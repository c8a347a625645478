"""Score models and logit ensembles on a dataset, with Accelerate and `evaluate` metrics.

`Evaluator` runs a classifier over a `datasets.Dataset` (or a `DataLoader`) through
`accelerator.prepare` and `accelerator.gather_for_metrics`, so a run launched with
`accelerate launch` over several processes gives exactly the single-process metrics and
per-example predictions, whatever the dataset size. It returns an `EvalResult`: metrics,
per-example predictions and labels, and confidence intervals (see `hf_soups.stats`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from hf_soups.models.labels import check_labels, label_names_of
from hf_soups.stats import bootstrap_interval, mean_interval

if TYPE_CHECKING:
    import evaluate

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
"""Folder of the `evaluate` metric modules shipped with hf_soups (usable offline)."""

MetricLike = "str | evaluate.EvaluationModule | Callable[..., Any]"
MetricsArg = "MetricLike | Sequence[MetricLike] | Mapping[str, MetricLike]"

_TOP_K = re.compile(r"top_(k|\d+)_accuracy")
_DEFAULT_TOP_K = 5
_LOGITS_PARAMETERS = ("logits", "scores")


class _Outputs(NamedTuple):
    """Everything gathered from one pass: float32 logits, argmax predictions, labels."""

    logits: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray


@dataclass
class _Metric:
    """A metric bound to the Evaluator's outputs.

    `per_example` gives the per-example values whose mean is the metric (for intervals and
    paired tests); `bootstrap_fn` is set when the metric is cheap enough to recompute on
    bootstrap resamples: it maps (logits or predictions, labels) to the metric dict.
    """

    label: str
    compute: Callable[[_Outputs], dict[str, float]]
    per_example: Callable[[_Outputs], dict[str, np.ndarray]] | None = None
    bootstrap_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None
    bootstrap_uses_logits: bool = False


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load an `evaluate` metric: hf_soups' shipped modules by path, others by `evaluate.load`.

    "accuracy" and "top_k_accuracy" come from `METRICS_DIR` and work offline; any other name
    goes to `evaluate.load`, which works offline only if the module is already cached.
    """
    # Imported on use: `import evaluate` pulls in transformers pipelines, seconds of startup
    # that code needing only EvalResult or score_fn should not pay.
    import evaluate

    shipped = METRICS_DIR / name / f"{name}.py"
    if shipped.is_file():
        return evaluate.load(str(shipped), keep_in_memory=True)
    return evaluate.load(name)


def _scalar(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where} returned {type(value).__name__}, expected a number") from None


def _floats(values: Mapping[str, Any], where: str) -> dict[str, float]:
    return {str(key): _scalar(value, f"{where}[{key!r}]") for key, value in values.items()}


def _top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-example top-k hits, with ties in the example's favour (as the shipped metric)."""
    reference = logits[np.arange(len(labels)), labels]
    return (logits > reference[:, None]).sum(axis=1) < k


def _direct(module: evaluate.EvaluationModule, **inputs: Any) -> dict[str, Any]:
    # Shipped modules run their `_compute` directly. `compute()` first encodes the inputs
    # into an Arrow table for evaluate's own cross-process accumulation, which
    # gather_for_metrics has already done; for 10,000 x 1,000 logits that encoding took 8.7 s
    # against 0.03 s for the top-k computation itself.
    return module._compute(**inputs)


def _shipped_accuracy() -> _Metric:
    module = load_metric("accuracy")
    return _Metric(
        label="accuracy",
        compute=lambda o: _floats(
            _direct(module, predictions=o.predictions, references=o.labels), "accuracy"
        ),
        per_example=lambda o: {"accuracy": o.predictions == o.labels},
    )


def _shipped_top_k(k: int) -> _Metric:
    module = load_metric("top_k_accuracy")
    key = f"top_{k}_accuracy"
    return _Metric(
        label=key,
        compute=lambda o: _floats(
            _direct(module, predictions=o.logits, references=o.labels, k=k), key
        ),
        per_example=lambda o: {key: _top_k_hits(o.logits, o.labels, k)},
    )


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


def _module_metric(module: evaluate.EvaluationModule) -> _Metric:
    scores = _wants_scores(module)
    label = f"evaluate module {module.name!r}"
    return _Metric(
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


def _callable_metric(name: str, fn: Callable[..., Any]) -> _Metric:
    logits = _takes_logits(fn)

    def as_dict(inputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        value = fn(inputs, labels)
        if isinstance(value, Mapping):
            return _floats(value, f"metric {name!r}")
        return {name: _scalar(value, f"metric {name!r}")}

    return _Metric(
        label=f"metric {name!r}",
        compute=lambda o: as_dict(o.logits if logits else o.predictions, o.labels),
        bootstrap_fn=as_dict,
        bootstrap_uses_logits=logits,
    )


def _resolve_one(metric: MetricLike) -> _Metric:
    import evaluate

    if isinstance(metric, str):
        top_k = _TOP_K.fullmatch(metric)
        if metric == "accuracy":
            return _shipped_accuracy()
        if top_k:
            k = _DEFAULT_TOP_K if top_k.group(1) == "k" else int(top_k.group(1))
            if k < 1:
                raise ValueError(f"metric {metric!r}: k must be at least 1")
            return _shipped_top_k(k)
        return _module_metric(load_metric(metric))
    if isinstance(metric, evaluate.EvaluationModule):
        return _module_metric(metric)
    if callable(metric):
        return _callable_metric(getattr(metric, "__name__", type(metric).__name__), metric)
    raise TypeError(
        f"cannot use {metric!r} as a metric: expected a name, an evaluate.EvaluationModule or "
        "a callable (predictions, labels) -> float | dict"
    )


def _renamed(metric: _Metric, name: str) -> _Metric:
    """Store a metric's values under a user-chosen name (prefix when it gives several)."""

    def rename(values: dict[str, Any]) -> dict[str, Any]:
        if len(values) == 1:
            return {name: next(iter(values.values()))}
        return {f"{name}/{key}": value for key, value in values.items()}

    per_example = metric.per_example
    bootstrap_fn = metric.bootstrap_fn
    return _Metric(
        label=metric.label,
        compute=lambda o: rename(metric.compute(o)),
        per_example=None if per_example is None else lambda o: rename(per_example(o)),
        bootstrap_fn=None if bootstrap_fn is None else lambda x, y: rename(bootstrap_fn(x, y)),
        bootstrap_uses_logits=metric.bootstrap_uses_logits,
    )


def _resolve_metrics(metrics: MetricsArg) -> list[_Metric]:
    import evaluate

    if isinstance(metrics, Mapping):
        resolved = [_renamed(_resolve_one(m), str(name)) for name, m in metrics.items()]
    elif isinstance(metrics, (str, evaluate.EvaluationModule)) or callable(metrics):
        resolved = [_resolve_one(metrics)]
    else:
        resolved = [_resolve_one(m) for m in metrics]
    if not resolved:
        raise ValueError("metrics is empty: give at least one metric")
    return resolved


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
    def score(self) -> float:
        """Value of the primary metric (the first metric unless `primary_metric` is set)."""
        if not self.metrics:
            raise ValueError(f"result {self.name!r} holds no metrics")
        return self.metrics[self.primary_metric or next(iter(self.metrics))]

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
            "primary_metric": self.primary_metric or next(iter(self.metrics)),
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


class _Collate:
    """Stack one input column and one label column of dataset rows into a batch."""

    def __init__(self, input_column: str, label_column: str):
        self.input_column = input_column
        self.label_column = label_column

    def __call__(self, rows: list[Any]) -> dict[str, torch.Tensor]:
        if isinstance(rows[0], Mapping):
            inputs = [row[self.input_column] for row in rows]
            labels = [row[self.label_column] for row in rows]
        else:
            inputs, labels = zip(*rows, strict=True)
        return {
            self.input_column: torch.stack([torch.as_tensor(x) for x in inputs]),
            self.label_column: torch.as_tensor(
                [int(torch.as_tensor(y)) for y in labels], dtype=torch.long
            ),
        }


def _is_numeric_arrow(data_type: pa.DataType) -> bool:
    if isinstance(data_type, pa.ExtensionType):
        data_type = data_type.storage_type
    while (
        pa.types.is_list(data_type)
        or pa.types.is_large_list(data_type)
        or pa.types.is_fixed_size_list(data_type)
    ):
        data_type = data_type.value_type
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type)


def _arrow_to_tensor(column: pa.ChunkedArray, name: str) -> torch.Tensor:
    """Stack a numeric (nested) list column into one tensor without per-row conversion."""
    array = column.combine_chunks()
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    shape = [len(array)]
    while isinstance(array, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
        low, high = (value.as_py() for value in pc.min_max(pc.list_value_length(array)).values())
        if low != high:
            raise ValueError(
                f"column {name!r} holds arrays of different lengths ({low} to {high}); "
                "inputs must share one shape to form a batch"
            )
        shape.append(low or 0)
        array = array.flatten()  # unlike .values, flatten honours the batch's slice offsets
    # writable: a zero-copy view of immutable Arrow memory would make torch warn.
    return torch.from_numpy(array.to_numpy(zero_copy_only=False, writable=True).reshape(shape))


class _ArrowBatches(torch.utils.data.Dataset):
    """A numeric `datasets.Dataset` read a whole batch at a time, straight from Arrow.

    `datasets`' torch formatter converts nested-list columns (how preprocessed
    `pixel_values` are stored) row by row: on an H200 host a small ViT was evaluated at 287
    3x32x32 images/s that way, and at 45,800 images/s reading each batch's Arrow buffers
    and reshaping them, as here. The DataLoader calls `__getitems__` with
    a batch of indices (the sampler, and Accelerate's sharding of it, are unchanged) and
    `_passthrough` leaves the batch as it is.
    """

    def __init__(self, dataset: datasets.Dataset, columns: Sequence[str]):
        self.columns = list(columns)
        self.dataset = dataset.with_format("arrow", columns=self.columns)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        table = self.dataset[list(indices)]
        return {column: _arrow_to_tensor(table.column(column), column) for column in self.columns}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}


def _passthrough(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


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
        self.metrics = _resolve_metrics(metrics)
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

    def _build_dataloader(self) -> DataLoader:
        if isinstance(self.dataset, DataLoader):
            if isinstance(self.dataset.sampler, RandomSampler):
                logger.warning(
                    "the evaluation DataLoader shuffles; per-example results will not line up "
                    "between models, and paired comparisons will refuse them"
                )
            return self.dataset
        dataset = self.dataset
        columns = [self.input_column, self.label_column]
        collate: Callable[[Any], dict[str, torch.Tensor]] = _Collate(*columns)
        # A dataset with a format or transform set is read through it, as its owner meant.
        if isinstance(dataset, datasets.Dataset) and dataset.format["type"] is None:
            missing = [column for column in columns if column not in dataset.column_names]
            if missing:
                raise ValueError(
                    f"dataset has no column {missing[0]!r} (columns: {dataset.column_names}); "
                    "set input_column / label_column"
                )
            schema = dataset.data.schema
            if all(_is_numeric_arrow(schema.field(column).type) for column in columns):
                dataset, collate = _ArrowBatches(dataset, columns), _passthrough
            else:
                dataset = dataset.with_format("torch", columns=columns)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def _prepared_dataloader(self) -> DataLoader:
        # Prepared once: Accelerate keeps a reference to each prepared DataLoader, and greedy
        # searches call evaluate() many times.
        if self._dataloader is None:
            self._dataloader = self.accelerator.prepare(self._build_dataloader())
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

    def _run(self, models: Sequence[nn.Module], description: str) -> _Outputs:
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
        outputs = _Outputs(
            logits=logits.numpy(),
            predictions=logits.argmax(dim=-1).numpy(),
            labels=torch.cat(label_parts).numpy(),
        )
        expected = _length(self.dataset)
        if expected is not None and expected != len(outputs.labels):
            logger.warning(
                "evaluated %d examples but the dataset has %d",
                len(outputs.labels),
                expected,
            )
        return outputs

    def _result(self, outputs: _Outputs, name: str) -> EvalResult:
        metrics: dict[str, float] = {}
        per_example: dict[str, np.ndarray] = {}
        intervals: dict[str, tuple[float, float]] = {}
        for metric in self.metrics:
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
        self, metric: _Metric, outputs: _Outputs, keys: list[str]
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


def _length(data: Any) -> int | None:
    if isinstance(data, DataLoader):
        return _length(data.dataset) if not data.drop_last else None
    try:
        return len(data)
    except TypeError:
        return None


def score_fn(evaluator: Evaluator | Callable[[nn.Module], float]) -> Callable[[nn.Module], float]:
    """A function model -> float from an `Evaluator` (its primary metric) or a plain callable.

    Greedy soups accept either; this gives them one interface.
    """
    if isinstance(evaluator, Evaluator):

        def score(model: nn.Module) -> float:
            return evaluator.evaluate(model).score

        return score
    if callable(evaluator):

        def call(model: nn.Module) -> float:
            return _scalar(evaluator(model), f"score function {evaluator!r}")

        return call
    raise TypeError(
        f"expected an Evaluator or a callable model -> float, got {type(evaluator).__name__}"
    )
