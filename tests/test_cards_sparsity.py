"""Model cards of sparse soups: the numbers they show, against counts made from the saved files."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_vit_folder
from transformers import ViTForImageClassification

import hf_soups.cards.sparsity as sparsity
from hf_soups import SoupBuilder
from hf_soups.cards import render_card, write_card
from hf_soups.errors import RecipeError
from hf_soups.pruning import MASK_FILE, Magnitude, prune, save_pruned
from hf_soups.recipe import PruningRecipe, Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sparse_soup(tmp_path):
    """A uniform soup of three tiny ViTs pruned to 70% with one shared magnitude mask."""
    reference = ViTForImageClassification.from_pretrained(make_vit_folder(tmp_path / "ref", 0))
    masks = prune(reference, Magnitude(), 0.7, scope="layer")
    folders = []
    for seed in (1, 2, 3):
        model = ViTForImageClassification.from_pretrained(
            make_vit_folder(tmp_path / f"d{seed}", seed)
        )
        with torch.no_grad():
            parameters = dict(model.named_parameters())
            for name, mask in masks.items():
                parameters[name].mul_(mask)
        folders.append(save_pruned(model, masks, tmp_path / f"ft{seed}"))
    soup = SoupBuilder.from_pretrained([str(f) for f in folders]).uniform()
    return soup.save_pretrained(tmp_path / "soup", progress=False)


def _counts(folder):
    """Kept and total per masked tensor, from the weights themselves (nonzeros), and the number
    of parameters stored."""
    weights = load_file(folder / "model.safetensors")
    masked = load_file(folder / MASK_FILE).keys()
    per_tensor = {n: (int((weights[n] != 0).sum()), weights[n].numel()) for n in masked}
    return per_tensor, sum(t.numel() for t in weights.values())


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_card_shows_overall_and_per_tensor_counts_of_the_saved_weights(sparse_soup):
    card = (sparse_soup / "README.md").read_text()
    per_tensor, stored = _counts(sparse_soup)
    kept = sum(k for k, _ in per_tensor.values())
    total = sum(t for _, t in per_tensor.values())
    assert "## Sparsity" in card
    overall = re.search(r"\*\*([\d.]+)%\*\* of its prunable weights", card)
    assert float(overall.group(1)) == pytest.approx(100 * (1 - kept / total), abs=0.005)
    match = re.search(r"([\d,]+) kept of ([\d,]+) in (\d+) tensors", card)
    assert (_number(match.group(1)), _number(match.group(2))) == (kept, total)
    assert int(match.group(3)) == len(per_tensor) == 13
    match = re.search(r"Of all ([\d,]+) parameters stored, ([\d,]+) are kept", card)
    assert _number(match.group(1)) == stored
    assert _number(match.group(2)) == stored - (total - kept)
    rows = dict(
        (name, (_number(k), _number(t), float(s)))
        for name, k, t, s in re.findall(
            r"\| `([^`]+)` \| ([\d,]+) \| ([\d,]+) \| ([\d.]+)% \|", card
        )
    )
    assert rows.keys() == per_tensor.keys()
    for name, (k, t) in per_tensor.items():
        assert rows[name][:2] == (k, t)
        assert rows[name][2] == pytest.approx(100 * (1 - k / t), abs=0.005)
    assert "Soup mask rule `shared`" in card


def test_long_tensor_lists_collapse_by_layer(sparse_soup, monkeypatch):
    monkeypatch.setattr(sparsity, "MAX_TENSOR_ROWS", 5)
    card = str(render_card(sparse_soup))
    per_tensor, _ = _counts(sparse_soup)
    groups: dict[str, list[tuple[int, int]]] = {}
    for name, count in per_tensor.items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(count)
    assert len(groups) == 7  # patch embedding and six tensors per layer
    found = re.findall(
        r"\| `([^`]+)` \| (\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+)% \| ([^|]+) \|", card
    )
    assert {row[0] for row in found} == groups.keys()
    for pattern, count, kept, total, _, spread in found:
        members = groups[pattern]
        assert int(count) == len(members)
        assert _number(kept) == sum(k for k, _ in members)
        assert _number(total) == sum(t for _, t in members)
        shares = sorted(100 * (1 - k / t) for k, t in members)
        bounds = [float(v) for v in re.findall(r"([\d.]+)%", spread)]
        assert bounds[0] == pytest.approx(shares[0], abs=0.005)
        assert bounds[-1] == pytest.approx(shares[-1], abs=0.005)


def test_recorded_pruning_recipe_is_shown_and_round_trips(sparse_soup):
    recipe = Recipe.load(sparse_soup)
    recipe.soup.pruning.recipe = PruningRecipe(
        scorer="magnitude",
        sparsities=[0.5, 0.7],
        scope="layer",
        copies_per_round=3,
        soup="greedy",
        rounds=[{"sparsity": 0.5, "kept": [0, 2]}, {"sparsity": 0.7, "kept": [1]}],
    )
    recipe.save(sparse_soup)
    assert Recipe.load(sparse_soup).soup.pruning.recipe == recipe.soup.pruning.recipe
    card = write_card(sparse_soup).read_text()
    assert "Pruned by magnitude scores (scope: layer)" in card
    assert "2 round(s) to 50.00%, 70.00% sparsity" in card
    assert "3 copies retrained per round" in card and "greedy soup of the copies" in card
    assert "Copies kept in each round's soup: round 1: copy-0, copy-2; round 2: copy-1." in card
    assert "zimmer2024sparse" in card  # Sparse Model Soups is cited
    assert "(the copies the last round of a greedy sparse-soup loop kept)" in card


def test_a_pruning_record_without_a_recipe_still_loads(sparse_soup):
    # What soups written before the pruning recipe was recorded hold.
    data = json.loads((sparse_soup / "soup.json").read_text())
    assert set(data["soup"]["pruning"]) == {"masks", "mask_file", "sparsity", "sparsity_by_tensor"}
    assert Recipe.from_dict(data).soup.pruning.masks == "shared"


def test_malformed_pruning_records_name_the_field(sparse_soup):
    data = json.loads((sparse_soup / "soup.json").read_text())
    data["soup"]["pruning"]["sparsity"] = "0.7"
    with pytest.raises(RecipeError, match=r"soup\.pruning\.sparsity: expected a number"):
        Recipe.from_dict(data)
    data["soup"]["pruning"]["sparsity"] = 0.7
    data["soup"]["pruning"]["recipe"] = {"scorer": "magnitude", "sparsities": "0.5"}
    with pytest.raises(RecipeError, match=r"soup\.pruning\.recipe\.sparsities: expected a list"):
        Recipe.from_dict(data)


def test_a_recorded_mask_missing_from_the_folder_is_said(sparse_soup):
    (sparse_soup / MASK_FILE).unlink()
    card = str(render_card(sparse_soup))
    assert f"this folder has no `{MASK_FILE}`" in card
    assert "| Tensor |" not in card


def test_dense_soups_have_no_sparsity_section(tmp_path):
    folders = [make_vit_folder(tmp_path / f"d{seed}", seed) for seed in (1, 2)]
    soup = SoupBuilder.from_pretrained([str(f) for f in folders]).uniform()
    out = soup.save_pretrained(tmp_path / "soup", progress=False)
    assert "## Sparsity" not in (out / "README.md").read_text()
