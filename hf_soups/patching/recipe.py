"""YAML recipe files for ``hf-soups wise-ft --sweep`` and ``hf-soups patch``: the eval sets
(entries as :mod:`hf_soups.recipe.files` reads them, from ``datasets.load_from_disk`` folders, so
they work offline), the two groups and the rule that chooses ``alpha``.

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

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_soups.errors import RecipeError
from hf_soups.patching.sweep import TaskSpec
from hf_soups.recipe.files import load_eval_set, read_recipe_file, resolve_path, zero_shot_task

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
_TOP_KEYS = {"eval_sets", "select", "alphas", "zero_shot", "fine_tuned", "out"}


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
