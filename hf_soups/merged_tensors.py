"""One merged tensor at a time: the loop every merge runs, and the engine's dtype rule.

:func:`merged_tensors` reads each ingredient's tensor of one name through loaders (one input
tensor in memory at a time for a weighted sum, see :class:`~hf_soups.methods.base.MergeMethod`),
merges in float32, casts to the output dtype and checks the result finite; integer buffers are
copied, not averaged. :func:`hf_soups.merge.merge` writes what it yields to disk,
:func:`hf_soups.merge.weighted_state_dict` keeps it in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from hf_soups.errors import NonFiniteWeightsError
from hf_soups.ingredients import Ingredient, TensorInfo
from hf_soups.methods.base import MergeMethod, TensorLoader

if TYPE_CHECKING:
    from hf_soups.pruning.soup_mask import SoupMask

logger = logging.getLogger(__name__)


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
        where = f" after merging and casting to {dtype_name(tensor.dtype)}"
    else:
        where = " after merging"
    message = f"tensor {name!r} has NaN or infinite values{where}"
    if not allow_non_finite:
        raise NonFiniteWeightsError(
            message + " (allow_non_finite=True, or --allow-non-finite, merges anyway)"
        )
    logger.warning(message)


def _copied_buffer(
    name: str, ingredients: Sequence[Ingredient], source: int
) -> tuple[torch.Tensor, list[str]]:
    """An integer or boolean buffer, copied from ingredient ``source``, and the names of the
    ingredients that hold other values (the output can hold only one of them)."""
    copied = ingredients[source].read(name)
    differing = [
        ingredient.name
        for index, ingredient in enumerate(ingredients)
        if index != source and not torch.equal(ingredient.read(name), copied)
    ]
    return copied, differing


def _warn_differing_buffers(differing: dict[str, list[str]], source: Ingredient) -> None:
    # Once per merge: BatchNorm's step counters differ between any two fine-tunes, one per layer.
    if not differing:
        return
    names = list(differing)
    holders = sorted({holder for held in differing.values() for holder in held})
    logger.warning(
        "%d integer buffer(s) (%s%s) copied from %s, whose values differ in %s",
        len(names),
        ", ".join(repr(name) for name in names[:3]),
        ", ..." if len(names) > 3 else "",
        source.name,
        ", ".join(holders),
    )


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
    ``method.buffer_source`` names (the first with a non-zero weight), with one warning per
    merge when the ingredients disagree. A sparse soup's ``mask`` sets its pruned entries to exact zeros.
    """
    template = ingredients[0]
    source = method.buffer_source(len(ingredients))
    differing: dict[str, list[str]] = {}
    for name in names:
        info = template.tensors[name]
        if not info.dtype.is_floating_point:
            copied, held = _copied_buffer(name, ingredients, source)
            if held:
                differing[name] = held
            yield name, copied
            continue
        merged = method.merge_tensor(
            name,
            [_loader(ingredient, name) for ingredient in ingredients],
            _loader(base, name) if base is not None else None,
            out=memory(torch.Size(info.shape)) if memory is not None else None,
        )
        if mask is not None:
            merged = mask.apply(name, merged)
        written = merged.to(cast_dtype(info, dtype))
        _check_finite(written, name, [*ingredients, *([base] if base else [])], allow_non_finite)
        yield name, written
    _warn_differing_buffers(differing, ingredients[source])


def ordered_names(ingredient: Ingredient) -> list[str]:
    # Reading in file order keeps each input file's reads sequential.
    return sorted(
        ingredient.tensors,
        key=lambda n: (str(ingredient.tensors[n].file), ingredient.tensors[n].offset),
    )


def float_state(ingredient: Ingredient) -> dict[str, torch.Tensor]:
    """The ingredient's floating tensors in float32, read with the engine's loaders (running
    sums, such as the greedy soup's, accumulate these)."""
    return {
        name: _loader(ingredient, name)()
        for name in ordered_names(ingredient)
        if ingredient.tensors[name].dtype.is_floating_point
    }


def complete_state_dict(
    float_tensors: dict[str, torch.Tensor], template: Ingredient, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A full state dict, keyed as on disk, from merged float32 tensors: cast by the engine's
    dtype rule, with the template's non-floating buffers."""
    return {
        name: float_tensors[name].to(cast_dtype(info, dtype))
        if info.dtype.is_floating_point
        else template.read(name)
        for name, info in template.tensors.items()
    }


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``: how recipes, configs and messages name a dtype."""
    return str(dtype).removeprefix("torch.")


def cast_dtype(info: TensorInfo, dtype: torch.dtype | None) -> torch.dtype:
    """The output dtype of a tensor: ``dtype`` (default: as stored) for floating tensors;
    integer and boolean buffers keep theirs."""
    return (dtype or info.dtype) if info.dtype.is_floating_point else info.dtype
