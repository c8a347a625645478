"""The typed recipe: every model folder's soup.json replays into the same weights, bit for bit,
and a malformed recipe is one error naming the field."""

import json

import datasets
import numpy as np
import pytest
import torch
from tiny import VIT_CONFIG, load_weights
from transformers import ViTConfig, ViTForImageClassification

from hf_soups.builder import SoupBuilder
from hf_soups.errors import RecipeError
from hf_soups.evaluation import Evaluator
from hf_soups.patching import choose_wise_ft, wise_ft
from hf_soups.recipe import Recipe, replay

CONFIG = ViTConfig(**{**VIT_CONFIG, "num_labels": 3})


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    """A pre-trained start and four small moves from it, as fine-tuning makes."""
    root = tmp_path_factory.mktemp("replay")
    torch.manual_seed(0)
    start = ViTForImageClassification(CONFIG)
    start.save_pretrained(root / "start")
    generator = torch.Generator().manual_seed(1)
    folders = []
    for i in range(4):
        model = ViTForImageClassification.from_pretrained(root / "start")
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(root / f"ft{i}")
        folders.append(root / f"ft{i}")
    return root / "start", folders


@pytest.fixture(scope="module")
def held_out():
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(
        48, 3, VIT_CONFIG["image_size"], VIT_CONFIG["image_size"], generator=generator
    )
    labels = np.arange(48) % 3
    return datasets.Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels})


def assert_replays(folder, tmp_path):
    replayed = replay(folder, tmp_path / "replayed", progress=False)
    original, again = load_weights(folder), load_weights(replayed)
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name
    assert Recipe.load(replayed) == Recipe.load(folder)


def test_greedy_soup_replays(fine_tunes, held_out, tmp_path, one_thread):
    _, folders = fine_tunes
    builder = SoupBuilder.from_pretrained([str(f) for f in folders])
    soup = builder.greedy(Evaluator(held_out, batch_size=16, name="held_out", progress=False))
    folder = soup.save_pretrained(tmp_path / "greedy", progress=False)
    recipe = Recipe.load(folder)
    assert recipe.soup.method == "greedy" and recipe.method == "weighted_average"
    assert [step.kept for step in recipe.soup.greedy_trace].count(True) == len(soup.ingredients)
    assert recipe.scores["greedy soup"]["held_out"].n == 48
    assert_replays(folder, tmp_path)


def test_ties_merge_replays(fine_tunes, tmp_path, one_thread):
    start, folders = fine_tunes
    soup = SoupBuilder.from_pretrained([str(f) for f in folders]).merge_method(
        "ties", base=str(start), density=0.3, scaling=0.8
    )
    folder = soup.save_pretrained(tmp_path / "ties", progress=False)
    assert Recipe.load(folder).parameters["sign_election"] == "total"
    assert_replays(folder, tmp_path)


def test_wise_ft_replays(fine_tunes, held_out, tmp_path, one_thread):
    start, folders = fine_tunes
    plain = wise_ft(start, folders[0], 0.3, out_dir=tmp_path / "wise", progress=False)
    assert_replays(plain, tmp_path / "plain")
    chosen = choose_wise_ft(
        start,
        folders[0],
        in_distribution={"val": Evaluator(held_out, batch_size=16, name="val", progress=False)},
        alphas=[0.0, 0.5, 1.0],
        progress=False,
    )
    folder = chosen.save_pretrained(tmp_path / "chosen", progress=False)
    recipe = Recipe.load(folder)
    assert recipe.patch.chosen_alpha == chosen.alpha and recipe.parameters == {
        "alpha": chosen.alpha
    }
    assert_replays(folder, tmp_path / "chosen_replay")


def test_learned_by_layer_soup_replays(fine_tunes, held_out, tmp_path, one_thread):
    _, folders = fine_tunes
    builder = SoupBuilder.from_pretrained([str(f) for f in folders[:3]])
    soup = builder.learned(held_out, by_layer=True, epochs=1, batch_size=16, progress=False)
    folder = soup.save_pretrained(tmp_path / "learned", progress=False)
    assert Recipe.load(folder).method == "per_tensor_weights"
    assert_replays(folder, tmp_path)


def test_malformed_recipes_name_the_field(fine_tunes, tmp_path):
    _, folders = fine_tunes
    folder = (
        SoupBuilder.from_pretrained([str(f) for f in folders])
        .uniform()
        .save_pretrained(tmp_path / "uniform", progress=False)
    )
    good = json.loads((folder / "soup.json").read_text())
    cases = {
        "ingredients[0].revision: expected a string, got int": {
            **good,
            "ingredients": [{"source": "x", "revision": 3}],
        },
        "soup.maximize: expected a boolean, got the string 'false'": {
            **good,
            "soup": {**good["soup"], "maximize": "false"},
        },
        "unknown key 'weights'": {**good, "weights": [1]},
        "missing required key 'method'": {k: v for k, v in good.items() if k != "method"},
        "schema version 99": {**good, "schema_version": 99},
    }
    for message, data in cases.items():
        (folder / "soup.json").write_text(json.dumps(data))
        with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            Recipe.load(folder)
    (folder / "soup.json").write_text("[" * 100_000)
    with pytest.raises(RecipeError, match="not valid JSON"):
        Recipe.load(folder)
