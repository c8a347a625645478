"""What every YAML recipe file shares: reading it, resolving its paths, and its eval sets.

An eval set entry (``held_out``, and each of ``eval_sets``)::

    dataset: data/mnist_validation   # a folder written by Dataset.save_to_disk; relative paths
                                     # are relative to the recipe's folder
    split: null                      # a split name when the folder holds a DatasetDict
    metric: accuracy                 # anything Evaluator accepts (default accuracy)
    batch_size: 128
    input_column: pixel_values       # defaults pixel_values / labels
    label_column: labels
    classnames: [zero, one, two]     # a task with its own zero-shot head (PAINT), label order
    templates: ["a photo of the digit {}"]
    tokenizer: null                  # default: the zero-shot model's folder
    task: {classnames: [cat, dog], templates: openai_imagenet, text_model: org/clip}
                                     # instead of classnames/templates: any CLIP layout scored
                                     # with a ZeroShotTask (text_model: vision-only models)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hf_soups.errors import HfSoupsError, RecipeError

if TYPE_CHECKING:
    from hf_soups.models.task import ZeroShotTask
    from hf_soups.patching.sweep import TaskSpec

__all__ = [
    "default_tokenizer",
    "load_eval_set",
    "read_recipe_file",
    "resolve_path",
    "zero_shot_task",
]

_EVAL_SET_KEYS = {
    "dataset",
    "split",
    "metric",
    "batch_size",
    "input_column",
    "label_column",
    "classnames",
    "templates",
    "tokenizer",
    "task",
}


def read_recipe_file(file: Path, known_keys: set[str]) -> dict[str, Any]:
    """A YAML recipe's top-level mapping, refusing keys outside ``known_keys``."""
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{file}: invalid YAML ({error})") from None
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{file}: expected a mapping at the top level")
    unknown = sorted(set(raw) - known_keys)
    if unknown:
        raise RecipeError(f"{file}: unknown key {unknown[0]!r} (known: {sorted(known_keys)})")
    return dict(raw)


def resolve_path(value: str, base: Path) -> str:
    """A path relative to the recipe's folder when it exists there, else as written (Hub id)."""
    candidate = base / os.path.expanduser(value)
    return str(candidate) if candidate.exists() else value


def zero_shot_task(file: Path, key: str, value: Any) -> ZeroShotTask:
    """The :class:`~hf_soups.models.ZeroShotTask` a recipe's mapping at `key` describes; a
    ``text_model`` folder is relative to the recipe file."""
    from hf_soups.models.task import ZeroShotTask

    try:
        task = ZeroShotTask.from_dict(value)
    except HfSoupsError as error:
        raise RecipeError(f"{file}: {key}: {error}") from None
    if task.text_model is None:
        return task
    return dataclasses.replace(task, text_model=resolve_path(task.text_model, file.parent))


def default_tokenizer(model_folder: str | os.PathLike) -> Any:
    """The tokenizer saved with a model: open_clip's for an open_clip folder, else a
    transformers tokenizer (``AutoTokenizer``)."""
    from hf_soups.models.families import detect_family

    return detect_family(model_folder).load_tokenizer(model_folder)


def _load_dataset(file: Path, name: str, spec: Mapping[str, Any], base: Path):
    import datasets

    if "dataset" not in spec:
        raise RecipeError(f"{file}: eval_sets.{name} has no 'dataset' (a save_to_disk folder)")
    folder = base / os.path.expanduser(str(spec["dataset"]))
    if not folder.exists():
        raise RecipeError(f"{file}: eval_sets.{name}.dataset: no such folder {folder}")
    data = datasets.load_from_disk(str(folder))
    split = spec.get("split")
    if isinstance(data, datasets.DatasetDict):
        if split is None:
            raise RecipeError(
                f"{file}: eval_sets.{name}: {folder} holds splits {sorted(data)}; set 'split'"
            )
        if split not in data:
            raise RecipeError(
                f"{file}: eval_sets.{name}: split {split!r} not in {folder} (has {sorted(data)})"
            )
        data = data[split]
    elif split is not None:
        raise RecipeError(f"{file}: eval_sets.{name}: {folder} is a single split; drop 'split'")
    return data


def _positive_int(file: Path, key: str, value: Any) -> int:
    if type(value) is not int or value < 1:
        raise RecipeError(f"{file}: {key} must be a positive integer, got {value!r}")
    return value


def load_eval_set(
    file: Path,
    name: str,
    spec: Any,
    base: Path,
    tokenizer_folder: str | None = None,
    accelerator: Any = None,
    progress: bool = True,
) -> TaskSpec:
    """One eval set of a recipe file (``name`` is its key, for error messages): the dataset
    from disk, its Evaluator, and its zero-shot head's class names and templates if any."""
    from hf_soups.evaluation import Evaluator
    from hf_soups.patching.sweep import TaskSpec

    if not isinstance(spec, Mapping):
        raise RecipeError(f"{file}: eval_sets.{name} must be a mapping with a 'dataset' key")
    unknown = sorted(set(spec) - _EVAL_SET_KEYS)
    if unknown:
        raise RecipeError(
            f"{file}: eval_sets.{name}: unknown key {unknown[0]!r} (known: {sorted(_EVAL_SET_KEYS)})"
        )
    evaluator = Evaluator(
        _load_dataset(file, name, spec, base),
        spec.get("metric", "accuracy"),
        batch_size=_positive_int(file, f"eval_sets.{name}.batch_size", spec.get("batch_size", 128)),
        input_column=spec.get("input_column", "pixel_values"),
        label_column=spec.get("label_column", "labels"),
        accelerator=accelerator,
        name=name,
        progress=progress,
    )
    if spec.get("task") is not None:
        if spec.get("classnames") is not None or spec.get("templates") is not None:
            raise RecipeError(
                f"{file}: eval_sets.{name}: give 'task' or 'classnames'/'templates', not both"
            )
        return TaskSpec(
            evaluator, task=zero_shot_task(file, f"eval_sets.{name}.task", spec["task"])
        )
    classnames = spec.get("classnames")
    if classnames is None:
        if spec.get("templates") is not None:
            raise RecipeError(f"{file}: eval_sets.{name}: 'templates' without 'classnames'")
        return TaskSpec(evaluator)
    templates = spec.get("templates")
    if not templates:
        raise RecipeError(f"{file}: eval_sets.{name}: 'classnames' needs 'templates'")
    tokenizer_source = spec.get("tokenizer")
    if tokenizer_source is not None:
        tokenizer_source = resolve_path(str(tokenizer_source), base)
    else:
        tokenizer_source = tokenizer_folder
    if tokenizer_source is None:
        raise RecipeError(
            f"{file}: eval_sets.{name}: 'classnames' needs a tokenizer; set 'tokenizer' or give "
            "the zero-shot model's folder"
        )
    return TaskSpec(
        evaluator,
        classnames=[str(c) for c in classnames],
        templates=[str(t) for t in templates],
        tokenizer=default_tokenizer(tokenizer_source),
    )
