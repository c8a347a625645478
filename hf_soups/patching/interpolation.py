"""WiSE-FT: ``theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned``.

Interpolation is a weighted merge of two ingredients with weights ``(1 - alpha, alpha)``. It is
run by the streaming engine of :mod:`hf_soups.merge` through :class:`Interpolation`, a
:class:`~hf_soups.methods.base.MergeMethod` that differs from the plain weighted average in two
exactness guarantees:

- ``alpha = 0`` and ``alpha = 1`` give the two endpoints bit for bit;
- a tensor that is identical in both endpoints is kept bit for bit. ``0.7 * x + 0.3 * x`` is not
  always ``x`` in floating point, and PAINT relies on frozen parameters (the text tower, hence the
  zero-shot heads built from it) being exactly those of the zero-shot model.

For sweeps, :class:`Endpoints` reads both state dicts once and forms any ``alpha``'s weights in
memory with the same arithmetic, so the swept model and the folder later written for the chosen
``alpha`` are the same bits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from hf_soups.errors import RecipeError
from hf_soups.ingredients import Ingredient, check_compatible
from hf_soups.merge import IngredientLike, as_ingredients, build_recipe, merge, weighted_state_dict
from hf_soups.methods.wise_ft import Interpolation, check_alpha, interpolate
from hf_soups.models import ZeroShotTask, load_model
from hf_soups.recipe.schema import RECIPE_FILE, PatchRecord, Recipe, Source

logger = logging.getLogger(__name__)

__all__ = ["Endpoints", "Interpolation", "interpolate", "wise_ft"]


def _endpoints(zero_shot: IngredientLike, fine_tuned: IngredientLike) -> list[Ingredient]:
    ingredients = as_ingredients([zero_shot, fine_tuned])
    check_compatible(ingredients)
    return ingredients


def source_record(ingredient: Ingredient) -> Source:
    """The record of an endpoint, with its own recipe when it is itself a merge (a greedy soup
    as the fine-tuned end of WiSE-FT), so the composed recipe keeps its whole history."""
    record = ingredient.record()
    if (ingredient.path / RECIPE_FILE).is_file():
        try:
            record.recipe = Recipe.load(ingredient.path)
        except RecipeError as error:
            logger.warning("%s: recipe not recorded (%s)", ingredient.name, error)
    return record


def interpolation_recipe(
    ingredients: Sequence[Ingredient], alpha: float, dtype: torch.dtype | None, **fields
) -> Recipe:
    """The recipe of the model at ``alpha`` between ``ingredients = [zero_shot, fine_tuned]``;
    ``fields`` adds to it (a :class:`~hf_soups.recipe.PatchRecord` as ``patch``, scores...)."""
    zero_shot, fine_tuned = ingredients
    fields.setdefault(
        "patch",
        PatchRecord(
            kind="wise_ft",
            zero_shot=source_record(zero_shot),
            fine_tuned=source_record(fine_tuned),
            chosen_alpha=alpha,
        ),
    )
    return build_recipe(ingredients, Interpolation(alpha), None, dtype, **fields)


def wise_ft(
    zero_shot: IngredientLike,
    fine_tuned: IngredientLike,
    alpha: float = 0.5,
    *,
    out_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    recipe: Recipe | None = None,
    progress: bool = True,
    task: ZeroShotTask | None = None,
    **merge_kwargs,
) -> nn.Module | Path:
    """Interpolate a zero-shot and a fine-tuned model (WiSE-FT, PAINT).

    Every tensor is interpolated, a CLIP classifier's head included (it is an ordinary tensor of
    the folder). Either end may be any compatible folder or Hub id, a soup written by
    ``Soup.save_pretrained`` included (the model soups paper interpolates a greedy soup with the
    zero-shot model this way).

    Args:
        zero_shot: the model before fine-tuning (``alpha = 0``).
        fine_tuned: the fine-tuned model (``alpha = 1``).
        alpha: mixing coefficient; 0.5 is the WiSE-FT paper's default.
        out_dir: write a model folder there (streaming, through :func:`hf_soups.merge.merge`)
            and return its path; when ``None``, return the interpolated model in memory.
        dtype: dtype of the floating tensors (default: the zero-shot model's).
        recipe: the recipe to write (default: :func:`interpolation_recipe`'s).
        progress: show a progress bar while writing.
        task: class names and templates for the in-memory model of CLIP layouts without a head
            (see :func:`hf_soups.models.load_model`).
        **merge_kwargs: passed to :func:`~hf_soups.merge.merge` (``overwrite``,
            ``max_shard_size``, ``allow_non_finite``) or, in memory, to
            :func:`~hf_soups.merge.weighted_state_dict` (``allow_non_finite``).

    Returns:
        The output folder, or the model (from :func:`hf_soups.models.load_model`, in eval mode).

    Raises:
        IncompatibleIngredientsError: the models differ in architecture, tensor names or shapes.
    """
    ingredients = _endpoints(zero_shot, fine_tuned)
    method = Interpolation(alpha)
    if out_dir is None:
        state_dict = weighted_state_dict(ingredients, method=method, dtype=dtype, **merge_kwargs)
        return load_model(ingredients[0], state_dict=state_dict, task=task)
    return merge(
        ingredients,
        out_dir,
        method=method,
        dtype=dtype,
        recipe=recipe or interpolation_recipe(ingredients, method.alpha, dtype),
        progress=progress,
        **merge_kwargs,
    )


class Endpoints:
    """Both ends of an interpolation held in memory, to form many ``alpha``'s weights cheaply.

    The two state dicts are read once (two models in memory); :meth:`state_dict` then costs
    one pass of tensor arithmetic per ``alpha``, with the arithmetic of :class:`Interpolation`.
    """

    def __init__(self, zero_shot: IngredientLike, fine_tuned: IngredientLike):
        self.zero_shot, self.fine_tuned = _endpoints(zero_shot, fine_tuned)
        self._theta_0 = self.zero_shot.state_dict()
        self._theta_1 = self.fine_tuned.state_dict()
        self.changed = frozenset(
            name
            for name, tensor in self._theta_0.items()
            if not torch.equal(tensor.float(), self._theta_1[name].float())
        )
        """Names of the tensors that differ between the endpoints; all others stay fixed."""
        logger.info(
            "%d of %d tensors differ between %s and %s",
            len(self.changed),
            len(self._theta_0),
            self.zero_shot.name,
            self.fine_tuned.name,
        )

    def state_dict(self, alpha: float) -> dict[str, torch.Tensor]:
        """The interpolated state dict, keyed as on disk, in the zero-shot model's dtypes.

        Non-floating tensors (position ids, counters) are the zero-shot model's, as in a merge.
        """
        alpha = check_alpha(alpha)
        merged = {}
        for name, theta_0 in self._theta_0.items():
            if not theta_0.is_floating_point() or name not in self.changed:
                # A copy: loading may alias the given tensors, and PAINT swaps heads in place.
                merged[name] = theta_0.clone()
                continue
            merged[name] = interpolate(theta_0, self._theta_1[name], alpha).to(theta_0.dtype)
        return merged
