"""Label names of classifiers, and the check that a dataset's classes are the model's.

A model scored on a dataset whose class ids mean other classes gives a wrong score without any
error; when both sides name their classes, :func:`check_labels` compares the names in order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from hf_soups.errors import LabelMismatchError

__all__ = [
    "check_labels",
    "check_task_matches",
    "dataset_label_names",
    "label_names_of",
    "names_from_id2label",
]

# transformers fills id2label with LABEL_0, LABEL_1, ... when a config names no classes.
_PLACEHOLDER = re.compile(r"LABEL_\d+")


def names_from_id2label(id2label: Mapping[Any, str] | None) -> list[str] | None:
    """The class names of an ``id2label`` mapping in id order; None for transformers'
    placeholder names (``LABEL_0``, ...), which name no class."""
    if not id2label:
        return None
    by_id = {int(key): str(value) for key, value in id2label.items()}
    names = [by_id[i] for i in sorted(by_id)]
    if sorted(by_id) != list(range(len(names))):
        return None
    if all(_PLACEHOLDER.fullmatch(name) for name in names):
        return None
    return names


def label_names_of(model: Any) -> list[str] | None:
    """The class names a classifier predicts, in logit order, or None when it names none.

    Reads ``model.label_names`` (hf_soups' scoring classifiers), else ``model.config.id2label``
    (transformers models), else ``model.id2label``.
    """
    names = getattr(model, "label_names", None)
    if names is not None:
        return list(names)
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) if config is not None else None
    if id2label is None:
        id2label = getattr(model, "id2label", None)
    return names_from_id2label(id2label) if isinstance(id2label, Mapping) else None


def dataset_label_names(dataset: Any, label_column: str = "labels") -> list[str] | None:
    """The names of a ``datasets.Dataset``'s ``ClassLabel`` column, or None when it has none."""
    features = getattr(dataset, "features", None)
    if not isinstance(features, Mapping) or label_column not in features:
        return None
    names = getattr(features[label_column], "names", None)
    return list(names) if names else None


def _shown(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{shown}{more}]"


def check_labels(
    model_label_names: Sequence[str] | None, dataset: Any, *, label_column: str = "labels"
) -> None:
    """Refuse to score a model on a dataset whose class names differ from the model's.

    Args:
        model_label_names: the model's class names in logit order (its ``id2label`` or the
            zero-shot task's class names; :func:`label_names_of` reads them from a model), or
            None when the model names no classes.
        dataset: the evaluation data; checked when it is a ``datasets.Dataset`` whose
            `label_column` is a ``ClassLabel`` with names.
        label_column: the dataset's label column.

    Raises:
        LabelMismatchError: both name their classes and the lists differ (in order or content).
    """
    if model_label_names is None:
        return
    data_names = dataset_label_names(dataset, label_column)
    if data_names is None:
        return
    model_names = list(model_label_names)
    if model_names != data_names:
        raise LabelMismatchError(
            f"the dataset's {label_column!r} classes {_shown(data_names)} differ from the "
            f"model's {_shown(model_names)}; label ids would mean other classes. Give the "
            "model (or the ZeroShotTask) the dataset's class names in the dataset's order, or "
            "cast the dataset's ClassLabel to the model's"
        )


def check_task_matches(
    model_label_names: Sequence[str] | None, task: Any, *, model_name: str = "model"
) -> None:
    """A :class:`~hf_soups.models.task.ZeroShotTask` given for a model with its own head must
    name the head's classes in order (the head, not the task, decides the logits)."""
    if model_label_names is None or list(model_label_names) == list(task.classnames):
        return
    raise LabelMismatchError(
        f"the task's classnames {_shown(list(task.classnames))} differ from the {model_name}'s "
        f"own labels {_shown(list(model_label_names))}; its classification head decides the "
        "classes, so give the task its id2label names in order (or no task)"
    )
