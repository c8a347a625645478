"""Sparse soups: the one mask a soup of pruned ingredients keeps.

Ingredients pruned with one mask (the copies of a Sparse Model Soups round) average into a
model with the same zeros; a soup keeps that mask (``rule="shared"``), and refuses ingredients
whose masks differ, since their average would be denser than any of them. ``rule="intersection"``
masks the soup by the weights every ingredient keeps instead (an ingredient without a mask file
counts as dense).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from hf_soups.errors import CorruptedCheckpointError, IncompatibleIngredientsError
from hf_soups.pruning.mask_file import MASK_FILE, read_mask_file
from hf_soups.recipe.schema import PruningRecord

if TYPE_CHECKING:
    from hf_soups.ingredients import Ingredient

logger = logging.getLogger(__name__)

MASK_RULES = ("shared", "intersection")
# How much sparser than its sparsest mask an intersection may come out unremarked.
_INTERSECTION_NOTICE = 0.05


@dataclass
class SoupMask:
    """The mask of a soup: bool tensors by stored tensor name (``True`` kept), and its rule."""

    masks: dict[str, torch.Tensor]
    rule: str

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` with the pruned entries of ``name`` set to exact zeros."""
        mask = self.masks.get(name)
        return tensor if mask is None else torch.where(mask, tensor, torch.zeros_like(tensor))

    @property
    def sparsity(self) -> float:
        """Share of the masked tensors' weights pruned."""
        total = sum(mask.numel() for mask in self.masks.values())
        return 1.0 - sum(int(mask.sum()) for mask in self.masks.values()) / total

    def to_record(self) -> PruningRecord:
        """What the soup's recipe records (``SoupRecord.pruning``)."""
        return PruningRecord(
            masks=self.rule,
            mask_file=MASK_FILE,
            sparsity=self.sparsity,
            sparsity_by_tensor={
                name: 1.0 - int(mask.sum()) / mask.numel() for name, mask in self.masks.items()
            },
        )

    def write(self, folder: str | os.PathLike) -> Path:
        """Write the mask file into ``folder`` (the soup's output folder being built)."""
        target = Path(folder) / MASK_FILE
        save_file({n: m.contiguous() for n, m in self.masks.items()}, target, {"format": "pt"})
        return target


def soup_mask(ingredients: Sequence[Ingredient], rule: str = "shared") -> SoupMask | None:
    """The mask the soup of ``ingredients`` keeps, or ``None`` when none of them has a
    ``pruning_mask.safetensors``.

    Raises:
        IncompatibleIngredientsError: with ``rule="shared"``, two ingredients' masks differ
            (naming both and the first differing tensor) or only some ingredients have one.
        CorruptedCheckpointError: a mask names a tensor the ingredient does not store, or has
            another shape.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"masks must be one of {MASK_RULES}, got {rule!r}")
    found = [(ingredient, read_mask_file(ingredient.path)) for ingredient in ingredients]
    masked = [(ingredient, masks) for ingredient, masks in found if masks is not None]
    if not masked:
        return None
    for ingredient, masks in masked:
        _check_fits(ingredient, masks)
    first, reference = masked[0]
    if rule == "shared":
        for ingredient, masks in found:
            if masks is None:
                raise IncompatibleIngredientsError(
                    f"{ingredient.name} has no {MASK_FILE} but {first.name} has one; pass "
                    "masks='intersection' to soup them anyway"
                )
            differing = _first_difference(reference, masks)
            if differing is not None:
                raise IncompatibleIngredientsError(
                    f"ingredients {first.name} and {ingredient.name} have different pruning "
                    f"masks (first differing tensor {differing!r}); pass masks='intersection' "
                    "to mask the soup by their intersection"
                )
        return SoupMask(dict(reference), rule)
    combined: dict[str, torch.Tensor] = {}
    for _, masks in masked:
        for name, mask in masks.items():
            combined[name] = combined[name] & mask if name in combined else mask.clone()
    soup = SoupMask(combined, rule)
    sparsest = max(SoupMask(masks, rule).sparsity for _, masks in masked)
    # Masks that do not overlap leave much less than any of them keeps.
    if soup.sparsity > sparsest + _INTERSECTION_NOTICE:
        logger.warning(
            "the intersection of %d masks is %.1f%% sparse, the sparsest of them %.1f%%: they "
            "keep different weights",
            len(masked),
            100 * soup.sparsity,
            100 * sparsest,
        )
    return soup


def _check_fits(ingredient: Ingredient, masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        info = ingredient.tensors.get(name)
        if info is None or tuple(info.shape) != tuple(mask.shape):
            raise CorruptedCheckpointError(
                f"{ingredient.path / MASK_FILE}: mask {name!r} fits no stored tensor of "
                f"{ingredient.name}"
            )


def _first_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str | None:
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b or not torch.equal(a[name], b[name]):
            return name
    return None
