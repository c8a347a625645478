"""The streaming merge engine: tensor by tensor, float32 accumulation, sharded atomic output.

Memory stays at the tensors in flight, whatever the number of ingredients or the size of the
model: each output tensor is computed from loaders that read one ingredient's tensor at a time
(see :class:`~hf_soups.methods.base.MergeMethod`), and written to its place in its output file
(planned up front, see :mod:`hf_soups.safetensors_writer`) as soon as it is computed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from tqdm.auto import tqdm

from hf_soups.cards import write_card
from hf_soups.checkpoint_files import copy_extra_files
from hf_soups.errors import IncompatibleIngredientsError, RecipeError
from hf_soups.ingredients import Ingredient, TensorInfo, check_compatible
from hf_soups.merged_tensors import cast_dtype, dtype_name, merged_tensors, ordered_names
from hf_soups.methods.base import (
    MergeMethod,
    ReusedBuffer,
    WeightedAverage,
    check_method_inputs,
)
from hf_soups.output import atomic_output_dir
from hf_soups.recipe.schema import RECIPE_FILE, Recipe, SoupRecord  # noqa: F401 - re-exported
from hf_soups.safetensors_writer import SafetensorsWriter, plan_safetensors
from hf_soups.threads import one_thread

if TYPE_CHECKING:
    from hf_soups.pruning.soup_mask import SoupMask

logger = logging.getLogger(__name__)

IngredientLike = Ingredient | str | os.PathLike


def as_ingredients(sources: Sequence[IngredientLike], **resolve_kwargs) -> list[Ingredient]:
    """Turn folders and Hub ids into :class:`Ingredient`s, keeping given ones as they are."""
    return [
        source
        if isinstance(source, Ingredient)
        else Ingredient.from_source(source, **resolve_kwargs)
        for source in sources
    ]


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
    check_method_inputs(method, len(ingredients), base is not None)
    base = as_ingredients([base])[0] if base is not None else None
    check_compatible([*ingredients, *([base] if base else [])])
    return ingredients, method, base


def weighted_state_dict(
    ingredients: Sequence[IngredientLike],
    weights: Sequence[float] | None = None,
    *,
    method: MergeMethod | None = None,
    base: IngredientLike | None = None,
    dtype: torch.dtype | None = None,
    allow_non_finite: bool = False,
    mask: SoupMask | None = None,
) -> dict[str, torch.Tensor]:
    """Merge into memory: the state dict, keyed as on disk, of the merged model.

    Tensors are cast back to the first ingredient's dtypes unless ``dtype`` is given. Load it
    into a model with :func:`hf_soups.models.load_model`.
    """
    ingredients, method, base = _prepare(ingredients, weights, method, base)
    return dict(
        merged_tensors(
            ingredients,
            method,
            ordered_names(ingredients[0]),
            base=base,
            dtype=dtype,
            allow_non_finite=allow_non_finite,
            mask=mask,
        )
    )


def plan_shards(
    template: Ingredient, dtype: torch.dtype | None, max_shard_size: int | str
) -> tuple[list[tuple[str, list[str]]], dict[str, dict]]:
    """Plan the output files: ``(file name, tensor names)`` per shard, and the shard indexes.

    Tensors keep the weights-file family they had in the template (``model`` for transformers,
    ``open_clip_model`` for open_clip, ...), each family sharded by ``max_shard_size`` with
    huggingface_hub's own splitter, as ``save_pretrained`` does.
    """
    groups: dict[str, dict[str, TensorInfo]] = {}
    for name in ordered_names(template):
        info = template.tensors[name]
        groups.setdefault(info.group, {})[name] = info
    shards: list[tuple[str, list[str]]] = []
    indexes: dict[str, dict] = {}
    for group, infos in groups.items():
        split = split_state_dict_into_shards_factory(
            infos,
            get_storage_size=lambda info: info.numel * cast_dtype(info, dtype).itemsize,
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


SAVE_METADATA = {"format": "pt"}
"""The metadata of every weights file written, as ``save_pretrained`` writes it."""


def _planned(
    template: Ingredient, names: Sequence[str], dtype: torch.dtype | None
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The output ``(dtype, shape)`` of each of ``names``, as :func:`merged_tensors` yields it."""
    return {
        name: (cast_dtype(template.tensors[name], dtype), template.tensors[name].shape)
        for name in names
    }


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
    recipe: Recipe | None = None,
    allow_non_finite: bool = False,
    progress: bool = True,
    mask: SoupMask | None = None,
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
        recipe: the :class:`~hf_soups.recipe.Recipe` to write as ``soup.json`` (a soup's, with
            its scores and selection); by default the plain record of this merge. Its merge
            fields must describe this merge.
        allow_non_finite: warn instead of failing on NaN or infinite weights.
        progress: show a progress bar.
        mask: a sparse soup's mask (:func:`hf_soups.pruning.soup_mask`): its pruned entries are
            written as exact zeros and the mask file is written beside the weights.

    Returns:
        The output folder: safetensors weights (``model.safetensors`` or
        ``model-0000k-of-0000n.safetensors`` + index), the first ingredient's config and
        processor files, and ``soup.json``, the recipe that reproduces it.
    """
    ingredients, method, base = _prepare(ingredients, weights, method, base)
    template = ingredients[0]
    if dtype is None:
        _note_mixed_precision(ingredients)
    try:
        shards, indexes = plan_shards(template, dtype, max_shard_size)
    except ValueError:
        raise ValueError(
            f"max_shard_size: {max_shard_size!r} is not a size (a number of bytes, or with a "
            "unit: '5GB', '500MB')"
        ) from None
    with (
        atomic_output_dir(
            out_dir,
            overwrite=overwrite,
            inputs=[i.path for i in [*ingredients, *([base] if base else [])]],
        ) as work_dir,
        tqdm(
            total=len(template.tensors), desc="Merging", unit="tensor", disable=not progress
        ) as bar,
    ):
        # Every file's header is planned before any tensor is computed; each merged tensor is
        # then computed into one reused buffer and written to its place at once, so only the
        # tensor in flight is in memory. (Writing in a second thread meanwhile did not pay on
        # the 2-core machine: benchmarks/README.md.)
        with one_thread(), contextlib.ExitStack() as files:
            writer_of = {}
            for file_name, names in shards:
                layout = plan_safetensors(_planned(template, names, dtype), SAVE_METADATA)
                writer = files.enter_context(SafetensorsWriter(work_dir / file_name, layout))
                writer_of.update(dict.fromkeys(names, writer))
            for name, tensor in merged_tensors(
                ingredients,
                method,
                ordered_names(template),
                base=base,
                dtype=dtype,
                allow_non_finite=allow_non_finite,
                mask=mask,
                memory=ReusedBuffer(),
            ):
                writer_of[name].write(name, tensor)
                bar.update()
        for index_name, index in indexes.items():
            (work_dir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        copy_extra_files(template.path, work_dir, exclude=template.foreign_files)
        if dtype is not None:
            _record_dtype(work_dir / "config.json", dtype)
        if mask is not None:
            mask.write(work_dir)
        if recipe is None:
            # A masked merge records its mask, so that the recipe replays it.
            pruning = SoupRecord(method.name, pruning=mask.to_record()) if mask else None
            recipe = build_recipe(ingredients, method, base, dtype, soup=pruning)
        else:
            _check_describes(recipe, method, dtype)
        recipe.save(work_dir)
        _write_card(work_dir)
    out_dir = Path(out_dir)
    logger.info("Merged %d ingredients into %s", len(ingredients), out_dir)
    return out_dir


def _note_mixed_precision(ingredients: Sequence[Ingredient]) -> None:
    # Legitimate (float32 and bfloat16 copies of one model), but the output's precision is
    # then the first ingredient's, which the user may not have meant.
    template = ingredients[0]
    for other in ingredients[1:]:
        for name, info in template.tensors.items():
            theirs = other.tensors[name].dtype
            if info.dtype.is_floating_point and theirs != info.dtype:
                ours = dtype_name(info.dtype)
                logger.warning(
                    "%s stores %s as %s, %s as %s: the merge is written as %s, the first "
                    "ingredient's (dtype=... or --dtype chooses)",
                    other.name,
                    name,
                    dtype_name(theirs),
                    template.name,
                    ours,
                    ours,
                )
                return


def _record_dtype(config_file: Path, dtype: torch.dtype) -> None:
    # transformers loads a folder in the dtype its config names: a float16 merge must say so.
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    name = dtype_name(dtype)
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_card(folder: Path) -> None:
    """Every model folder gets its card. What the user cannot fix here (the disk) costs the
    card, not the merge: ``hf-soups card`` writes it later."""
    try:
        write_card(folder)
    except OSError as error:
        logger.warning("No model card written (%s); write it with `hf-soups card DIR`", error)


def build_recipe(
    ingredients: Sequence[Ingredient],
    method: MergeMethod,
    base: Ingredient | None,
    dtype: torch.dtype | None,
    **fields,
) -> Recipe:
    """The recipe of a merge: what replays it (method, parameters, sources with their resolved
    revisions, base, dtype), plus any other :class:`~hf_soups.recipe.Recipe` ``fields``."""
    return Recipe(
        method=method.name,
        parameters=method.parameters(),
        citation=method.citation,
        ingredients=[ingredient.record() for ingredient in ingredients],
        base=base.record() if base is not None else None,
        dtype=dtype_name(dtype) if dtype is not None else None,
        **fields,
    )


def _check_describes(recipe: Recipe, method: MergeMethod, dtype: torch.dtype | None) -> None:
    # A recipe that names another merge than the one written would replay into other weights.
    expected = (method.name, json.dumps(method.parameters(), sort_keys=True, default=str))
    recorded = (recipe.method, json.dumps(recipe.parameters, sort_keys=True, default=str))
    if expected != recorded or recipe.dtype != (dtype_name(dtype) if dtype else None):
        raise RecipeError(f"the recipe names method {recorded[0]!r}, not the merge written")
