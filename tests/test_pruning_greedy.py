"""Greedy soups of pruned ingredients with differing masks (``masks="intersection"``): every trial
soup the greedy pass scores is the masked soup it would become, checked against the files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_vit_folder
from transformers import ViTForImageClassification

from hf_soups import SoupBuilder
from hf_soups.pruning import MASK_FILE, Magnitude, prune, save_pruned

pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned(tmp_path, seed):
    """A tiny ViT pruned to 50% by its own magnitudes: each ingredient has its own mask."""
    model = ViTForImageClassification.from_pretrained(make_vit_folder(tmp_path / f"d{seed}", seed))
    return save_pruned(model, prune(model, Magnitude(), 0.5), tmp_path / f"ft{seed}")


def _as_stored(model, folder):
    """The model's weights under the names its files use (transformers renames some in memory)."""
    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def test_greedy_trial_soups_are_masked_by_the_intersection(tmp_path):
    folders = [_pruned(tmp_path, seed) for seed in (1, 2, 3)]
    weights = [load_file(f / "model.safetensors") for f in folders]
    masks = [load_file(f / MASK_FILE) for f in folders]
    builder = SoupBuilder.from_pretrained([str(f) for f in folders], masks="intersection")
    seen = []

    def score(model) -> float:
        # Ingredients alone first, in order (ft1 best), then every trial soup gains: all kept.
        seen.append(_as_stored(model, tmp_path / f"seen{len(seen)}"))
        return 1.0 - 0.1 * len(seen) if len(seen) <= 3 else float(len(seen))

    soup = builder.greedy(score)
    assert [i.path.name for i in soup.ingredients] == ["ft1", "ft2", "ft3"]
    trials = seen[3:]
    assert len(trials) == 2
    for k, trial in enumerate(trials, start=2):
        # The soup of the first k ingredients: their mean, zero wherever any of them prunes.
        for name in masks[0]:
            kept = masks[0][name]
            for mask in masks[1:k]:
                kept = kept & mask[name]
            mean = sum(w[name] for w in weights[:k]) / k
            assert not torch.equal(kept, masks[0][name])  # the masks do differ
            torch.testing.assert_close(trial[name], mean * kept, rtol=1e-6, atol=1e-7)
            assert bool((trial[name][~kept] == 0).all())
    # The soup saved is the last trial soup scored.
    final = soup.state_dict()
    for name in masks[0]:
        torch.testing.assert_close(final[name], trials[-1][name], rtol=1e-6, atol=1e-7)


def test_greedy_soups_of_a_shared_mask_are_unchanged(tmp_path):
    model = ViTForImageClassification.from_pretrained(make_vit_folder(tmp_path / "ref", 0))
    shared = prune(model, Magnitude(), 0.5)
    folders = []
    for seed in (1, 2):
        other = ViTForImageClassification.from_pretrained(
            make_vit_folder(tmp_path / f"d{seed}", seed)
        )
        with torch.no_grad():
            parameters = dict(other.named_parameters())
            for name, mask in shared.items():
                parameters[name].mul_(mask)
        folders.append(save_pruned(other, shared, tmp_path / f"ft{seed}"))
    weights = [load_file(f / "model.safetensors") for f in folders]
    seen = []

    def score(model) -> float:
        seen.append(_as_stored(model, tmp_path / f"seen{len(seen)}"))
        return 1.0 - 0.1 * len(seen) if len(seen) <= 2 else 5.0

    SoupBuilder.from_pretrained([str(f) for f in folders]).greedy(score)
    (trial,) = seen[2:]
    for name, tensor in weights[0].items():
        if tensor.is_floating_point() and name in trial:
            expected = (tensor + weights[1][name]) / 2
            torch.testing.assert_close(trial[name], expected, rtol=1e-6, atol=1e-7)
