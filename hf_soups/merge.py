"""The streaming merge engine: tensor by tensor, float32 accumulation, sharded atomic output.

Memory stays at about one output shard plus the tensors in flight, whatever the number of
ingredients: each output tensor is computed from loaders that read one ingredient's tensor at a
time (see :class:`~hf_soups.methods.base.MergeMethod`), and each finished shard is written and
dropped before the next is started.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hf_soups.errors import IncompatibleIngredientsError, MissingBaseError, NonFiniteWeightsError
from hf_soups.ingredients import (
    INGREDIENT_METADATA_FILE,
    PICKLE_SUFFIXES,
    Ingredient,
    TensorInfo,
    check_compatible,
)
from hf_soups.methods.base import MergeMethod, TensorLoader, WeightedAverage
from hf_soups.output import atomic_output_dir

logger = logging.getLogger(__name__)

RECIPE_FILE = "soup.json"
# Files of the template folder that are not copied: weights (rewritten), recipes and cards
# (written anew), and training state.
_NOT_COPIED_SUFFIXES = (".safetensors", ".msgpack", ".h5", *PICKLE_SUFFIXES)
_NOT_COPIED_NAMES = {RECIPE_FILE, INGREDIENT_METADATA_FILE, "README.md", "trainer_state.json"}

IngredientLike = Ingredient | str | os.PathLike


def as_ingredients(sources: Sequence[IngredientLike], **resolve_kwargs) -> list[Ingredient]:
    """Turn folders and Hub ids into :class:`Ingredient`s, keeping given ones as they are."""
    return [
        source
        if isinstance(source, Ingredient)
        else Ingredient.from_source(source, **resolve_kwargs)
        for source in sources
    ]


def _loader(ingredient: Ingredient, name: str) -> TensorLoader:
    """A loader of ``name`` as float32, into a given buffer when one is passed."""
    stored = ingredient.tensors[name].dtype

    def load(out: torch.Tensor | None = None) -> torch.Tensor:
        if stored == torch.float32:
            return ingredient.read(name, out=out)
        tensor = ingredient.read(name).to(torch.float32)
        return tensor if out is None else out.copy_(tensor)

    return load


def _check_finite(
    tensor: torch.Tensor, name: str, ingredients: Sequence[Ingredient], allow_non_finite: bool
) -> None:
    # NaN and inf propagate through a sum, so a finite sum proves every value finite at a
    # twentieth of the cost of an elementwise isfinite; only an overflowing sum needs that.
    if math.isfinite(tensor.sum().item()) or torch.isfinite(tensor).all():
        return
    culprits = [i.name for i in ingredients if not torch.isfinite(i.read(name).float()).all()]
    where = f" in {', '.join(culprits)}" if culprits else " after merging"
    message = f"tensor {name!r} has NaN or infinite values{where}"
    if not allow_non_finite:
        raise NonFiniteWeightsError(message + " (pass allow_non_finite=True to merge anyway)")
    logger.warning(message)


def merged_tensors(
    ingredients: Sequence[Ingredient],
    method: MergeMethod,
    names: Sequence[str],
    *,
    base: Ingredient | None = None,
    allow_non_finite: bool = False,
):
    """Yield ``(name, float32 merged tensor)`` for ``names``; non-float tensors are copied from
    the first ingredient (position ids and other integer buffers are not averaged)."""
    template = ingredients[0]
    for name in names:
        if not template.tensors[name].dtype.is_floating_point:
            yield name, template.read(name)
            continue
        merged = method.merge_tensor(
            name,
            [_loader(ingredient, name) for ingredient in ingredients],
            _loader(base, name) if base is not None else None,
        )
        _check_finite(merged, name, [*ingredients, *([base] if base else [])], allow_non_finite)
        yield name, merged


def _prepare(
    ingredients: Sequence[IngredientLike],
    weights: Sequence[float] | None,
    method: MergeMethod | None,
    base: IngredientLike | None,
) -> tuple[list[Ingredient], MergeMethod, Ingredient | None]:
    ingredients = as_ingredients(ingredients)
    if not ingredients:
        raise IncompatibleIngredientsError("no ingredients given")
    if method is None:
        method = WeightedAverage(
            weights if weights is not None else [1 / len(ingredients)] * len(ingredients)
        )
    elif weights is not None:
        raise ValueError("weights: give either weights or a method, not both")
    method.check(len(ingredients))
    if method.needs_base and base is None:
        raise MissingBaseError(f"method {method.name!r} needs a base model (base=...)")
    base = as_ingredients([base])[0] if base is not None else None
    check_compatible([*ingredients, *([base] if base else [])])
    return ingredients, method, base


def _ordered_names(ingredient: Ingredient) -> list[str]:
    # Reading in file order keeps each input file's reads sequential.
    return sorted(
        ingredient.tensors,
        key=lambda n: (str(ingredient.tensors[n].file), ingredient.tensors[n].offset),
    )


def weighted_state_dict(
    ingredients: Sequence[IngredientLike],
    weights: Sequence[float] | None = None,
    *,
    method: MergeMethod | None = None,
    base: IngredientLike | None = None,
    dtype: torch.dtype | None = None,
    allow_non_finite: bool = False,
) -> dict[str, torch.Tensor]:
    """Merge into memory: the state dict, keyed as on disk, of the merged model.

    Tensors are cast back to the first ingredient's dtypes unless ``dtype`` is given. Load it
    into a model with :func:`hf_soups.models.load_model`.
    """
    ingredients, method, base = _prepare(ingredients, weights, method, base)
    template = ingredients[0]
    return {
        name: _cast(tensor, template.tensors[name], dtype)
        for name, tensor in merged_tensors(
            ingredients,
            method,
            _ordered_names(template),
            base=base,
            allow_non_finite=allow_non_finite,
        )
    }


def _cast(tensor: torch.Tensor, info: TensorInfo, dtype: torch.dtype | None) -> torch.Tensor:
    if not info.dtype.is_floating_point:
        return tensor
    return tensor.to(dtype or info.dtype)


def plan_shards(
    template: Ingredient, dtype: torch.dtype | None, max_shard_size: int | str
) -> tuple[list[tuple[str, list[str]]], dict[str, dict]]:
    """Plan the output files: ``(file name, tensor names)`` per shard, and the shard indexes.

    Tensors keep the weights-file family they had in the template (``model`` for transformers,
    ``open_clip_model`` for open_clip, ...), each family sharded by ``max_shard_size`` with
    huggingface_hub's own splitter, as ``save_pretrained`` does.
    """
    groups: dict[str, dict[str, TensorInfo]] = {}
    for name in _ordered_names(template):
        info = template.tensors[name]
        groups.setdefault(info.group, {})[name] = info
    shards: list[tuple[str, list[str]]] = []
    indexes: dict[str, dict] = {}
    for group, infos in groups.items():
        split = split_state_dict_into_shards_factory(
            infos,
            get_storage_size=lambda info: info.numel * _cast_dtype(info, dtype).itemsize,
            filename_pattern=group + "{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
        shards.extend(split.filename_to_tensors.items())
        if split.is_sharded:
            indexes[f"{group}.safetensors.index.json"] = {
                "metadata": split.metadata,
                "weight_map": split.tensor_to_filename,
            }
    return shards, indexes


def _cast_dtype(info: TensorInfo, dtype: torch.dtype | None) -> torch.dtype:
    return (dtype or info.dtype) if info.dtype.is_floating_point else info.dtype


def copy_extra_files(
    source: Path, destination: Path, *, keep_existing: bool = False, exclude: Sequence[str] = ()
) -> None:
    """Copy config, processor and tokenizer files (everything but weights, recipes and the
    `exclude` names); with ``keep_existing``, files already in ``destination`` are left as
    they are."""
    for file in sorted(source.iterdir()):
        if (
            file.is_file()
            and file.name not in exclude
            and not (keep_existing and (destination / file.name).exists())
            and not file.name.endswith(_NOT_COPIED_SUFFIXES)
            and not file.name.endswith(".safetensors.index.json")
            and file.name not in _NOT_COPIED_NAMES
        ):
            shutil.copy(file, destination / file.name)


def merge(
    ingredients: Sequence[IngredientLike],
    out_dir: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    method: MergeMethod | None = None,
    base: IngredientLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    recipe: dict | None = None,
    allow_non_finite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge ingredients into a model folder, streaming tensor by tensor.

    Args:
        ingredients: :class:`Ingredient`s, local folders or Hub ids (``org/name@rev``).
        out_dir: the folder to create. Written into a temporary folder beside it and renamed into
            place when complete; refused if it exists and is not empty, unless ``overwrite``.
        weights: mixing weights, one per ingredient (default uniform); ``(1 - a, a)`` over a
            zero-shot and a fine-tuned model is WiSE-FT. Exclusive with ``method``.
        method: a :class:`MergeMethod` (task arithmetic, TIES, ...) instead of a weighted sum.
        base: the pre-trained model, for methods that work on deltas from it.
        dtype: output dtype of floating tensors (default: the first ingredient's).
        max_shard_size: shard size limit, as in ``save_pretrained`` (``"5GB"``, ``200_000_000``).
        overwrite: replace an existing non-empty ``out_dir`` once the new one is complete.
        recipe: extra fields recorded in ``soup.json`` (scores, soup method, ...).
        allow_non_finite: warn instead of failing on NaN or infinite weights.
        progress: show a progress bar.

    Returns:
        The output folder: safetensors weights (``model.safetensors`` or
        ``model-0000k-of-0000n.safetensors`` + index), the first ingredient's config and
        processor files, and ``soup.json``, the recipe that reproduces it.
    """
    ingredients, method, base = _prepare(ingredients, weights, method, base)
    template = ingredients[0]
    shards, indexes = plan_shards(template, dtype, max_shard_size)
    with (
        atomic_output_dir(out_dir, overwrite=overwrite) as work_dir,
        tqdm(
            total=len(template.tensors), desc="Merging", unit="tensor", disable=not progress
        ) as bar,
    ):
        for file_name, names in shards:
            shard = {}
            for name, tensor in merged_tensors(
                ingredients, method, names, base=base, allow_non_finite=allow_non_finite
            ):
                shard[name] = _cast(tensor, template.tensors[name], dtype).contiguous()
                bar.update()
            save_file(shard, work_dir / file_name, metadata={"format": "pt"})
            del shard
        for index_name, index in indexes.items():
            (work_dir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        copy_extra_files(template.path, work_dir, exclude=template.foreign_files)
        record = build_recipe(ingredients, method, base, dtype)
        record.update(recipe or {})
        (work_dir / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    out_dir = Path(out_dir)
    logger.info("Merged %d ingredients into %s", len(ingredients), out_dir)
    return out_dir


def build_recipe(
    ingredients: Sequence[Ingredient],
    method: MergeMethod,
    base: Ingredient | None,
    dtype: torch.dtype | None,
) -> dict:
    """The recipe written next to merged weights: enough to reproduce the merge."""
    return {
        "library": f"hf_soups {version('hf_soups')}",
        "method": method.name,
        "parameters": method.parameters(),
        "citation": method.citation,
        "ingredients": [ingredient.record() for ingredient in ingredients],
        "base": base.record() if base is not None else None,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
    }
