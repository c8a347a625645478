"""The streaming merge engine: tensor by tensor, float32 accumulation, sharded atomic output.

Memory stays at the tensors in flight, whatever the number of ingredients or the size of the
model: each output tensor is computed from loaders that read one ingredient's tensor at a time
(see :class:`~hf_soups.methods.base.MergeMethod`), and written to its place in its output file
(planned up front, see :mod:`hf_soups.safetensors_writer`) as soon as it is computed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from tqdm.auto import tqdm

from hf_soups.cards import write_card
from hf_soups.checkpoint_files import copy_extra_files
from hf_soups.errors import (
    IncompatibleIngredientsError,
    NonFiniteWeightsError,
    RecipeError,
)
from hf_soups.ingredients import (
    Ingredient,
    TensorInfo,
    check_compatible,
)
from hf_soups.methods.base import (
    MergeMethod,
    TensorLoader,
    WeightedAverage,
    check_method_inputs,
)
from hf_soups.output import atomic_output_dir
from hf_soups.recipe.schema import RECIPE_FILE, Recipe  # noqa: F401 - re-exported
from hf_soups.safetensors_writer import SafetensorsWriter, plan_safetensors
from hf_soups.threads import one_thread
from hf_soups.write_behind import WriteBehind

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
    """Check ``tensor`` as it will be written, after the cast to the output dtype: a value
    beyond float16's range is finite in float32 and infinite once cast."""
    # NaN and inf propagate through a sum, so a finite sum proves every value finite at a
    # twentieth of the cost of an elementwise isfinite; only an overflowing sum needs that. Half
    # precision tensors are summed in float32, where their sum cannot overflow.
    total = tensor.sum(dtype=torch.promote_types(tensor.dtype, torch.float32))
    if math.isfinite(total.item()) or torch.isfinite(tensor).all():
        return
    culprits = [i.name for i in ingredients if not torch.isfinite(i.read(name).float()).all()]
    if culprits:
        where = f" in {', '.join(culprits)}"
    elif tensor.dtype != torch.float32:
        where = f" after merging and casting to {str(tensor.dtype).removeprefix('torch.')}"
    else:
        where = " after merging"
    message = f"tensor {name!r} has NaN or infinite values{where}"
    if not allow_non_finite:
        raise NonFiniteWeightsError(message + " (pass allow_non_finite=True to merge anyway)")
    logger.warning(message)


def _copied_buffer(name: str, ingredients: Sequence[Ingredient], source: int) -> torch.Tensor:
    """An integer or boolean buffer, copied from ingredient ``source``; warns, naming the
    ingredients, when others hold different values (the output can hold only one of them)."""
    copied = ingredients[source].read(name)
    differing = [
        ingredient.name
        for index, ingredient in enumerate(ingredients)
        if index != source and not torch.equal(ingredient.read(name), copied)
    ]
    if differing:
        logger.warning(
            "tensor %r: integer buffer copied from %s, whose values differ in %s",
            name,
            ingredients[source].name,
            ", ".join(differing),
        )
    return copied


def merged_tensors(
    ingredients: Sequence[Ingredient],
    method: MergeMethod,
    names: Sequence[str],
    *,
    base: Ingredient | None = None,
    dtype: torch.dtype | None = None,
    allow_non_finite: bool = False,
    mask: SoupMask | None = None,
    memory: Callable[[torch.Size], torch.Tensor] | None = None,
):
    """Yield ``(name, tensor)`` for ``names``, as written to the output.

    Floating tensors are merged by ``method`` in float32 (into ``memory(shape)`` when given,
    which the streaming merge reuses), cast to ``dtype`` (default: the first ingredient's dtype
    of each tensor) and then checked finite. Integer and boolean buffers
    (position ids and the like) are not averaged: they are copied from the ingredient
    ``method.buffer_source`` names (the first with a non-zero weight), with a warning when the
    ingredients disagree. A sparse soup's ``mask`` sets its pruned entries to exact zeros.
    """
    template = ingredients[0]
    source = method.buffer_source(len(ingredients))
    for name in names:
        info = template.tensors[name]
        if not info.dtype.is_floating_point:
            yield name, _copied_buffer(name, ingredients, source)
            continue
        merged = method.merge_tensor(
            name,
            [_loader(ingredient, name) for ingredient in ingredients],
            _loader(base, name) if base is not None else None,
            out=memory(torch.Size(info.shape)) if memory is not None else None,
        )
        if mask is not None:
            merged = mask.apply(name, merged)
        written = merged.to(_cast_dtype(info, dtype))
        _check_finite(written, name, [*ingredients, *([base] if base else [])], allow_non_finite)
        yield name, written


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
            _ordered_names(ingredients[0]),
            base=base,
            dtype=dtype,
            allow_non_finite=allow_non_finite,
            mask=mask,
        )
    )


def float_state(ingredient: Ingredient) -> dict[str, torch.Tensor]:
    """The ingredient's floating tensors in float32, read with the engine's loaders (running
    sums, such as the greedy soup's, accumulate these)."""
    return {
        name: _loader(ingredient, name)()
        for name in _ordered_names(ingredient)
        if ingredient.tensors[name].dtype.is_floating_point
    }


def complete_state_dict(
    float_tensors: dict[str, torch.Tensor], template: Ingredient, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A full state dict, keyed as on disk, from merged float32 tensors: cast by the engine's
    dtype rule, with the template's non-floating buffers."""
    return {
        name: float_tensors[name].to(_cast_dtype(info, dtype))
        if info.dtype.is_floating_point
        else template.read(name)
        for name, info in template.tensors.items()
    }


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


SAVE_METADATA = {"format": "pt"}
"""The metadata of every weights file written, as ``save_pretrained`` writes it."""


def _planned(
    template: Ingredient, names: Sequence[str], dtype: torch.dtype | None
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The output ``(dtype, shape)`` of each of ``names``, as :func:`merged_tensors` yields it."""
    return {
        name: (_cast_dtype(template.tensors[name], dtype), template.tensors[name].shape)
        for name in names
    }


def _largest_float_numel(template: Ingredient, names: Sequence[str]) -> int:
    infos = [template.tensors[name] for name in names]
    return max((info.numel for info in infos if info.dtype.is_floating_point), default=0)


def _cast_dtype(info: TensorInfo, dtype: torch.dtype | None) -> torch.dtype:
    """The output dtype of a tensor: ``dtype`` (default: as stored) for floating tensors;
    integer and boolean buffers keep theirs."""
    return (dtype or info.dtype) if info.dtype.is_floating_point else info.dtype


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
        # then written to its place while the next one is computed, so only the tensors in
        # flight are in memory.
        layouts = [
            (file_name, names, plan_safetensors(_planned(template, names, dtype), SAVE_METADATA))
            for file_name, names in shards
        ]
        with one_thread():
            for file_name, names, layout in layouts:
                with (
                    SafetensorsWriter(work_dir / file_name, layout) as writer,
                    WriteBehind(writer, _largest_float_numel(template, names)) as writes,
                ):
                    for name, tensor in merged_tensors(
                        ingredients,
                        method,
                        names,
                        base=base,
                        dtype=dtype,
                        allow_non_finite=allow_non_finite,
                        mask=mask,
                        memory=writes.buffer,
                    ):
                        writes.write(name, tensor)
                        bar.update()
        for index_name, index in indexes.items():
            (work_dir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        copy_extra_files(template.path, work_dir, exclude=template.foreign_files)
        if dtype is not None:
            _record_dtype(work_dir / "config.json", dtype)
        if mask is not None:
            mask.write(work_dir)
        if recipe is None:
            recipe = build_recipe(ingredients, method, base, dtype)
        else:
            _check_describes(recipe, method, dtype)
        recipe.save(work_dir)
        _write_card(work_dir)
    out_dir = Path(out_dir)
    logger.info("Merged %d ingredients into %s", len(ingredients), out_dir)
    return out_dir


def _record_dtype(config_file: Path, dtype: torch.dtype) -> None:
    # transformers loads a folder in the dtype its config names: a float16 merge must say so.
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
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
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        **fields,
    )


def _check_describes(recipe: Recipe, method: MergeMethod, dtype: torch.dtype | None) -> None:
    # A recipe that names another merge than the one written would replay into other weights.
    expected = (method.name, json.dumps(method.parameters(), sort_keys=True, default=str))
    recorded = (recipe.method, json.dumps(recipe.parameters, sort_keys=True, default=str))
    if expected != recorded or recipe.dtype != (
        str(dtype).removeprefix("torch.") if dtype else None
    ):
        raise RecipeError(f"the recipe names method {recorded[0]!r}, not the merge written")
