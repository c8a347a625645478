"""A card's sparsity section: what a sparse model's mask prunes, layer by layer, and how it was
pruned.

The counts are read from the folder's ``pruning_mask.safetensors`` (what the weights hold) and
the stored tensors' shapes; the mask rule and the pruning recipe from ``soup.json``. Long lists
of tensors are collapsed by name, the layer indices replaced by ``*``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hf_soups.cards.tables import cell
from hf_soups.recipe.schema import PruningRecipe, PruningRecord, Recipe

#: Tensors listed one by one up to this many; beyond it, grouped by name across layers.
MAX_TENSOR_ROWS = 16
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


@dataclass
class MaskCount:
    """Weights a pruning mask keeps of one tensor, and the tensor's size."""

    kept: int
    total: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _rows(counts: dict[str, MaskCount]) -> list[str]:
    if len(counts) <= MAX_TENSOR_ROWS:
        lines = ["| Tensor | Kept | Total | Sparsity |", "|---|---|---|---|"]
        for name, count in counts.items():
            lines.append(
                f"| `{cell(name)}` | {count.kept:,} | {count.total:,} | "
                f"{_percent(count.sparsity)} |"
            )
        return lines
    groups: dict[str, list[MaskCount]] = {}
    for name, count in counts.items():
        groups.setdefault(_LAYER_INDEX.sub("*", name), []).append(count)
    lines = [
        "| Tensors (`*`: every layer) | Count | Kept | Total | Sparsity | Per tensor |",
        "|---|---|---|---|---|---|",
    ]
    for pattern, members in groups.items():
        kept, total = sum(m.kept for m in members), sum(m.total for m in members)
        low = min(m.sparsity for m in members)
        high = max(m.sparsity for m in members)
        spread = _percent(low) if low == high else f"{_percent(low)} – {_percent(high)}"
        lines.append(
            f"| `{cell(pattern)}` | {len(members)} | {kept:,} | {total:,} | "
            f"{_percent(MaskCount(kept, total).sparsity)} | {spread} |"
        )
    return lines


def _recipe_text(recipe: PruningRecipe) -> str:
    parts = [f"Pruned by {recipe.scorer} scores"]
    if recipe.scope:
        parts[0] += f" (scope: {recipe.scope})"
    if recipe.method:
        parts.append(f"method: {recipe.method}")
    rounds = ", ".join(_percent(s) for s in recipe.sparsities)
    parts.append(f"{len(recipe.sparsities)} round(s) to {rounds} sparsity")
    if recipe.copies_per_round is not None:
        copies = f"{recipe.copies_per_round} cop{'y' if recipe.copies_per_round == 1 else 'ies'}"
        parts.append(f"{copies} retrained per round with the round's mask")
    if recipe.soup:
        parts.append(f"{recipe.soup} soup of the copies each round")
    if recipe.retraining:
        settings = ", ".join(f"{key} {value}" for key, value in recipe.retraining.items())
        parts.append(f"retraining: {settings}")
    text = "; ".join(parts) + "."
    kept = [r.get("kept") for r in recipe.rounds or []]
    if kept and all(isinstance(k, list) for k in kept):
        # The copies are numbered from 0, as the copy folders are (copy-0, copy-1, ...).
        text += " Copies kept in each round's soup: " + "; ".join(
            f"round {i + 1}: {', '.join(f'copy-{c}' for c in k) or 'none'}"
            for i, k in enumerate(kept)
        )
        text += "."
    return text


def mask_counts(folder: Path) -> dict[str, MaskCount] | None:
    """Kept and total weights of every tensor of the folder's ``pruning_mask.safetensors``;
    ``None`` when there is none."""
    # Imported here: importing hf_soups.cards must not import torch (test_cards checks it).
    from hf_soups.pruning.mask_file import read_mask_file

    masks = read_mask_file(folder)
    if masks is None:
        return None
    return {name: MaskCount(int(m.sum()), m.numel()) for name, m in masks.items()}


def sparsity_section(
    folder: Path, recipe: Recipe, counts: dict[str, MaskCount] | None
) -> str | None:
    """The markdown of the card's "Sparsity" section, or ``None`` for a dense model (no mask
    file and no pruning recorded); ``counts``: :func:`mask_counts` of the folder."""
    from hf_soups.ingredients import Ingredient
    from hf_soups.pruning.mask_file import MASK_FILE

    pruning: PruningRecord | None = recipe.soup.pruning if recipe.soup is not None else None
    if counts is None and pruning is None:
        return None
    lines = []
    if counts is None:
        # The recipe says the model is sparse, but the mask is not in the folder: say so
        # rather than count what is not there.
        lines.append(
            f"The recipe records a {pruning.masks} pruning mask with sparsity "
            f"{_percent(pruning.sparsity)}, but this folder has no `{MASK_FILE}`."
        )
    else:
        kept = sum(c.kept for c in counts.values())
        total = sum(c.total for c in counts.values())
        stored = sum(info.numel for info in Ingredient.from_folder(folder).tensors.values())
        pruned = total - kept
        lines += [
            f"This model is sparse: **{_percent(MaskCount(kept, total).sparsity)}** of its prunable "
            f"weights are exact zeros, {kept:,} kept of {total:,} in {len(counts)} tensors "
            f"(`{MASK_FILE}` marks them; `True` is kept). Of all {stored:,} parameters stored, "
            f"{stored - pruned:,} are kept ({_percent(pruned / stored if stored else 0.0)} "
            "pruned); biases, normalisation layers and embeddings stay dense.",
        ]
        if pruning is not None:
            rule = {
                "shared": "every ingredient shares this mask, so their average keeps it",
                "intersection": "the mask is the intersection of the ingredients' masks",
            }.get(pruning.masks, f"mask rule: {pruning.masks}")
            lines[-1] += f" Soup mask rule `{pruning.masks}`: {rule}."
        lines += ["", *_rows(counts)]
    if pruning is not None and pruning.recipe is not None:
        lines += ["", _recipe_text(pruning.recipe)]
    return "\n".join(lines)
