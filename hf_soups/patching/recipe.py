"""YAML recipes for ``hf-soups wise-ft --sweep`` and ``hf-soups patch``: eval sets read from
disk (``datasets.load_from_disk``, works offline) and the rule that chooses ``alpha``.

An eval recipe (``wise-ft --recipe``)::

    eval_sets:
      id:                              # any name
        dataset: data/mnist_validation # a folder written by Dataset.save_to_disk; relative
                                       # paths are relative to this file
        split: null                    # a split name when the folder holds a DatasetDict
        metric: accuracy               # anything Evaluator accepts (default accuracy)
        batch_size: 128                # default 128
        input_column: pixel_values     # defaults pixel_values / labels
        label_column: labels
      rotated: {dataset: data/mnist_rotated_validation}
      digits:                          # a task with its own zero-shot head (PAINT):
        dataset: data/digits_validation
        classnames: [zero, one, two]   # label order
        templates: ["a photo of the digit {}"]
        tokenizer: null                # default: the zero-shot model's folder
      pets:                            # any CLIP layout (CLIPModel, CLIPVisionModel, open_clip):
        dataset: data/pets_validation  # a ZeroShotTask, the model loaded with its head
        task: {classnames: [cat, dog], templates: openai_imagenet,
               text_model: openai/clip-vit-base-patch32}   # text_model: vision-only models
    select:
      id: [id]                         # target sets (aliases: target, patching)
      shifted: [rotated]               # preserve sets (aliases: preserve, supported)
      max_drop: null                   # null: maximise the mean of the two groups;
                                       # 0.01: best target score losing <= 1 point per shift
    alphas: "0:1:0.1"                  # optional; --sweep overrides it

A patch recipe (``hf-soups patch RECIPE.yaml``) adds the models and the output folder, and
names its groups ``patching`` / ``supported``::

    zero_shot: models/zero_shot        # folder (relative to this file) or Hub id
    fine_tuned: models/fine_tuned
    out: models/patched
    alphas: [0, 0.25, 0.5, 0.75, 1]
    eval_sets: {...}
    select: {patching: [mnist], supported: [digits], max_drop: null}
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hf_soups.errors import HfSoupsError
from hf_soups.patching.sweep import TaskSpec

if TYPE_CHECKING:
    from hf_soups.models.task import ZeroShotTask

logger = logging.getLogger(__name__)

__all__ = [
    "EvalRecipe",
    "RecipeError",
    "load_eval_recipe",
    "load_eval_set",
    "parse_alphas",
    "read_recipe_file",
    "resolve_path",
    "zero_shot_task",
]

_TARGET_KEYS = ("target", "id", "patching")
_PRESERVE_KEYS = ("preserve", "shifted", "supported")
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
_TOP_KEYS = {"eval_sets", "select", "alphas", "zero_shot", "fine_tuned", "out"}


class RecipeError(HfSoupsError, ValueError):
    """A recipe file is malformed; the message names the file and the key."""


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


def parse_alphas(spec: str | float | Sequence[float]) -> list[float]:
    """Coefficients from ``"start:stop:step"`` (stop included), ``"0,0.5,1"`` or a list.

    ``"0:1:0.1"`` gives 0, 0.1, ..., 1 (rounded to 10 decimals, so no 0.30000000000000004).
    """
    if isinstance(spec, (int, float)):
        return [float(spec)]
    if not isinstance(spec, str):
        return [float(value) for value in spec]
    try:
        if ":" in spec:
            start, stop, step = (float(part) for part in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            alphas = [round(start + i * step, 10) for i in range(count)]
            return [alpha for alpha in alphas if alpha <= stop + 1e-9]
        return [float(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise RecipeError(
            f"alphas: {spec!r} is neither start:stop:step (stop >= start, step > 0) nor a "
            "comma-separated list of numbers"
        ) from None


@dataclass
class EvalRecipe:
    """A parsed recipe: eval sets, the two groups, the selection rule, optional models."""

    eval_sets: dict[str, TaskSpec]
    target: list[str]
    preserve: list[str]
    max_drop: float | None = None
    alphas: list[float] | None = None
    zero_shot: str | None = None
    fine_tuned: str | None = None
    out: str | None = None
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def group(self, names: Sequence[str]) -> dict[str, TaskSpec]:
        """The eval sets of one group, by name."""
        return {name: self.eval_sets[name] for name in names}


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
        batch_size=int(spec.get("batch_size", 128)),
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


def _names(file: Path, select: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    given = [key for key in keys if key in select]
    if len(given) > 1:
        raise RecipeError(f"{file}: select: {given[0]!r} and {given[1]!r} name the same group")
    if not given:
        return []
    value = select[given[0]]
    return [value] if isinstance(value, str) else [str(v) for v in value]


def load_eval_recipe(
    path: str | os.PathLike,
    *,
    zero_shot: str | os.PathLike | None = None,
    accelerator: Any = None,
    progress: bool = True,
) -> EvalRecipe:
    """Read a recipe (see the module docstring), load its datasets and build its Evaluators.

    Args:
        path: the YAML file.
        zero_shot: the zero-shot model's folder, whose tokenizer builds the heads of eval sets
            with ``classnames`` (default: the recipe's ``zero_shot``).
        accelerator: shared by every Evaluator (one is created when ``None``).
        progress: progress bars in the Evaluators.

    Raises:
        RecipeError: naming the file and the key at fault.
    """
    file = Path(path)
    base = file.parent
    raw = read_recipe_file(file, _TOP_KEYS)
    models = {
        key: resolve_path(str(raw[key]), base) if raw.get(key) is not None else None
        for key in ("zero_shot", "fine_tuned")
    }
    out = str(base / os.path.expanduser(str(raw["out"]))) if raw.get("out") else None
    eval_specs = raw.get("eval_sets")
    if not isinstance(eval_specs, Mapping) or not eval_specs:
        raise RecipeError(f"{file}: 'eval_sets' must map names to eval set specs")
    select = raw.get("select") or {}
    if not isinstance(select, Mapping):
        raise RecipeError(f"{file}: 'select' must be a mapping")
    unknown = sorted(set(select) - {*_TARGET_KEYS, *_PRESERVE_KEYS, "max_drop", "rule"})
    if unknown:
        raise RecipeError(f"{file}: select: unknown key {unknown[0]!r}")
    target = _names(file, select, _TARGET_KEYS)
    preserve = _names(file, select, _PRESERVE_KEYS)
    if not target:
        raise RecipeError(f"{file}: select: name the target eval sets ({' / '.join(_TARGET_KEYS)})")
    for name in [*target, *preserve]:
        if name not in eval_specs:
            raise RecipeError(f"{file}: select names {name!r}, which is not in eval_sets")
    max_drop = select.get("max_drop")
    rule = select.get("rule", "max_drop" if max_drop is not None else "average")
    if rule not in ("average", "max_drop") or (rule == "max_drop") != (max_drop is not None):
        raise RecipeError(
            f"{file}: select: rule must be 'average', or 'max_drop' with a max_drop value"
        )
    unused = sorted(set(eval_specs) - {*target, *preserve})
    if unused:
        logger.warning("%s: eval set(s) %s are in no group and will not be scored", file, unused)
    tokenizer_folder = str(zero_shot) if zero_shot is not None else models["zero_shot"]
    eval_sets = {
        str(name): load_eval_set(
            file, str(name), eval_specs[name], base, tokenizer_folder, accelerator, progress
        )
        for name in [*target, *preserve]
    }
    return EvalRecipe(
        eval_sets=eval_sets,
        target=target,
        preserve=preserve,
        max_drop=float(max_drop) if max_drop is not None else None,
        alphas=parse_alphas(raw["alphas"]) if raw.get("alphas") is not None else None,
        zero_shot=models["zero_shot"],
        fine_tuned=models["fine_tuned"],
        out=out,
        source=file,
        raw=dict(raw),
    )
