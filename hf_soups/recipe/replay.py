"""Replay a recipe: rebuild a model folder's weights from its ``soup.json``."""

from __future__ import annotations

import os
from pathlib import Path

from hf_soups.errors import RecipeError
from hf_soups.recipe.schema import Recipe, Source


def _resolve(source: Source, **resolve_kwargs):
    from hf_soups.ingredients import Ingredient

    return Ingredient.from_source(source.source, revision=source.revision, **resolve_kwargs)


def replay(
    recipe: Recipe | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
    **resolve_kwargs,
) -> Path:
    """Merge again what ``recipe`` records (a :class:`Recipe`, a ``soup.json`` or its folder).

    The same sources at the same revisions give the same weights bit for bit: the method is
    rebuilt from its recorded name and parameters and run by the same streaming engine. The
    recipe is written unchanged beside the weights.

    Args:
        recipe: the recipe to replay.
        out_dir: the folder to create (refused if it exists, unless ``overwrite``).
        resolve_kwargs: ``token``, ``cache_dir``, ``local_files_only``, ``allow_pickle`` for
            resolving the sources, as in :meth:`hf_soups.Ingredient.from_source`.
    """
    from hf_soups.merge import merge
    from hf_soups.methods import METHODS

    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    if recipe.method not in METHODS:
        raise RecipeError(f"recipe method {recipe.method!r} is not one hf_soups knows")
    method = METHODS[recipe.method].from_parameters(recipe.parameters)
    import torch

    from hf_soups.pruning.soup_mask import soup_mask

    dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
    ingredients = [_resolve(source, **resolve_kwargs) for source in recipe.ingredients]
    pruning = recipe.soup.pruning if recipe.soup is not None else None
    return merge(
        ingredients,
        out_dir,
        method=method,
        base=_resolve(recipe.base, **resolve_kwargs) if recipe.base else None,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        recipe=recipe,
        progress=progress,
        mask=soup_mask(ingredients, pruning.masks) if pruning else None,
    )
