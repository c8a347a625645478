"""``hf-soups soup RECIPE.yaml`` end to end on tiny ViTs, bad recipes, and the shipped recipes.

The ingredients are a "target" ViT plus noise of different sizes; the data are random images
labelled by the target, saved with ``Dataset.save_to_disk``. Scores and the greedy choice are
checked against plain-torch accuracy and the paper's greedy loop written out here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors.torch import save_file
from tiny import load_weights, make_vit_folder, weighted_reference
from transformers import ViTConfig, ViTForImageClassification

from hf_soups.cli import main
from hf_soups.commands.soup import METHODS, parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NOISE = [0.05, 0.1, 0.15, 0.2, 0.3]  # relative to each tensor's spread


def _model(folder: Path, state: dict[str, torch.Tensor]) -> ViTForImageClassification:
    """A ViT from file-keyed float tensors, through transformers only."""
    config = ViTConfig.from_pretrained(folder)
    state = {name: tensor.to(torch.float32) for name, tensor in state.items()}
    return ViTForImageClassification.from_pretrained(None, config=config, state_dict=state).eval()


def _accuracy(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    images, labels = data
    with torch.inference_mode():
        predictions = model(pixel_values=images).logits.argmax(-1)
    return (predictions == labels).double().mean().item()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """``root`` with ``target/``, ``ingredients/ing0..4`` (ingredient.json in each),
    ``data/held_out`` and ``data/test``; and those splits as (images, labels) tensors."""
    root = tmp_path_factory.mktemp("soup_cli")
    # A wide initialisation, so that the random target's predictions vary with the input.
    target_dir = make_vit_folder(root / "target", seed=0, initializer_range=1.0)
    target = load_weights(target_dir)
    target_model = _model(target_dir, target)
    generator = torch.Generator().manual_seed(0)
    splits = {}
    for split, n in (("held_out", 96), ("test", 64)):
        images = torch.randn(n, 3, 16, 16, generator=generator)
        with torch.inference_mode():
            labels = target_model(pixel_values=images).logits.argmax(-1)
        data = datasets.Dataset.from_dict(
            {"pixel_values": images.numpy(), "labels": labels.numpy()}
        )
        data.save_to_disk(str(root / "data" / split))
        splits[split] = (images, labels)
    for i, scale in enumerate(NOISE):
        folder = shutil.copytree(target_dir, root / "ingredients" / f"ing{i}")
        noisy = {
            name: tensor + scale * tensor.std() * torch.randn(tensor.shape, generator=generator)
            if tensor.numel() > 1
            else tensor
            for name, tensor in target.items()
        }
        save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "ingredient.json").write_text(json.dumps({"noise": scale}))
    return root, splits


def _folders(root: Path) -> list[Path]:
    return sorted((root / "ingredients").iterdir())


def _write_recipe(root: Path, name: str, recipe: dict) -> Path:
    file = root / f"{name}.yaml"
    file.write_text(yaml.safe_dump(recipe))
    return file


def _run(recipe: Path, capsys, *options: str) -> tuple[int, str, str]:
    code = main(["-q", "soup", str(recipe), *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _table(stdout: str) -> dict[str, list[str]]:
    """The printed markdown table: model -> cells."""
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    header, *body = ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)
    assert header[0] == "model"
    return {cells[0]: cells[1:] for cells in body}


def paper_greedy(folders, data):
    """The greedy loop of mlfoundations/model-soups on plain state dicts and plain accuracy."""
    states = [load_weights(folder) for folder in folders]
    individual = [_accuracy(_model(folders[0], state), data) for state in states]
    order = sorted(range(len(states)), key=lambda i: individual[i], reverse=True)
    soup, best = [order[0]], individual[order[0]]
    for i in order[1:]:
        kept = soup + [i]
        mean = {name: sum(states[j][name].double() for j in kept) / len(kept) for name in states[0]}
        score = _accuracy(_model(folders[0], mean), data)
        if score > best:
            soup, best = kept, score
    return soup, individual, best


def test_greedy_recipe_end_to_end(pool, tmp_path, capsys):
    pool, splits = pool
    folders = _folders(pool)
    recipe = _write_recipe(
        pool,
        "greedy",
        {
            "sources": [f"ingredients/{f.name}" for f in folders],
            "method": "greedy",
            "held_out": {"dataset": "data/held_out", "metric": "accuracy"},
            "eval_sets": {"test": {"dataset": "data/test", "batch_size": 16}},
            "ensemble": True,
            "out": str(tmp_path / "greedy_soup"),
        },
    )
    code, stdout, err = _run(recipe, capsys)
    assert code == 0, err

    held_out, test = splits["held_out"], splits["test"]
    kept, individual, best = paper_greedy(folders, held_out)
    assert 1 < len(kept) < len(folders)  # the pool is built so that greedy must choose

    out = tmp_path / "greedy_soup"
    record = json.loads((out / "soup.json").read_text())
    assert record["soup"]["method"] == "greedy"
    trace = record["soup"]["greedy_trace"]
    assert [t["ingredient"] for t in trace if t["kept"]] == [str(folders[i]) for i in kept]
    assert [t["individual_score"] for t in trace] == pytest.approx(sorted(individual, reverse=True))
    assert [r["source"] for r in record["ingredients"]] == [str(folders[i]) for i in kept]
    # the folder is the uniform average of the kept ingredients and loads as a model
    reference = weighted_reference([folders[i] for i in kept], [1 / len(kept)] * len(kept))
    saved = load_weights(out)
    for name, expected in reference.items():
        torch.testing.assert_close(saved[name].double(), expected, atol=1e-6, rtol=0)
    loaded = ViTForImageClassification.from_pretrained(out)
    soup_test = _accuracy(loaded, test)
    assert (out / "README.md").is_file()
    assert "greedy" in (out / "README.md").read_text().lower()

    table = _table(stdout)
    columns = ["held_out", "test"]
    for i, folder in enumerate(folders):
        cells = dict(zip(columns, table[str(folder)]))
        assert cells["held_out"].startswith(f"{100 * individual[i]:.2f} [")
        assert cells["test"].startswith(
            f"{100 * _accuracy(_model(folder, load_weights(folder)), test):.2f} ["
        )
    greedy_row = dict(zip(columns, table["greedy soup"]))
    assert greedy_row["held_out"].startswith(f"{100 * best:.2f} [")
    assert greedy_row["test"].startswith(f"{100 * soup_test:.2f} [")
    assert {"best individual", "ensemble"} <= table.keys()


def test_uniform_recipe_from_a_sweep_folder(pool, tmp_path, capsys):
    pool, splits = pool
    folders = _folders(pool)
    recipe = _write_recipe(
        pool,
        "uniform",
        {
            "sources": "ingredients",  # one sweep folder: every subfolder with ingredient.json
            "method": "uniform",
            "eval_sets": {"test": {"dataset": "data/test"}},
            "out": str(tmp_path / "uniform"),
        },
    )
    code, stdout, err = _run(recipe, capsys)
    assert code == 0, err
    out = tmp_path / "uniform"
    reference = weighted_reference(folders, [1 / len(folders)] * len(folders))
    saved = load_weights(out)
    for name, expected in reference.items():
        torch.testing.assert_close(saved[name].double(), expected, atol=1e-6, rtol=0)
    record = json.loads((out / "soup.json").read_text())
    assert record["soup"]["method"] == "uniform"
    assert record["parameters"]["weights"] == pytest.approx([1 / len(folders)] * len(folders))
    assert (out / "README.md").is_file()
    expected = _accuracy(_model(folders[0], reference), splits["test"])
    assert _table(stdout)["uniform soup"][0].startswith(f"{100 * expected:.2f} [")


def test_learned_recipe(pool, tmp_path, capsys):
    pool, splits = pool
    folders = _folders(pool)[:3]
    recipe = _write_recipe(
        pool,
        "learned",
        {
            "sources": [f"ingredients/{f.name}" for f in folders],
            "method": "learned",
            "held_out": {"dataset": "data/held_out"},
            "learned": {"epochs": 2, "batch_size": 32, "lr": 0.05, "progress": False},
            "out": str(tmp_path / "learned"),
        },
    )
    code, stdout, err = _run(recipe, capsys)
    assert code == 0, err
    out = tmp_path / "learned"
    record = json.loads((out / "soup.json").read_text())
    assert record["soup"]["method"] == "learned"
    weights = record["soup"]["weights"]
    assert len(weights) == 3 and min(weights) > 0 and sum(weights) == pytest.approx(1.0)
    assert weights != pytest.approx([1 / 3] * 3, abs=1e-4)  # the fit moved them
    reference = weighted_reference(folders, weights)
    saved = load_weights(out)
    for name, expected in reference.items():
        torch.testing.assert_close(saved[name].double(), expected, atol=1e-6, rtol=0)
    ViTForImageClassification.from_pretrained(out)
    assert (out / "README.md").is_file()
    assert stdout.startswith("| model |")


def test_merge_method_recipe_records_the_method(pool, tmp_path, capsys):
    pool, splits = pool
    folders = _folders(pool)[:3]
    recipe = _write_recipe(
        pool,
        "ties",
        {
            "sources": [f"ingredients/{f.name}" for f in folders],
            "method": "ties",
            "base": "target",
            "parameters": {"density": 0.3, "scaling": 0.8},
            "eval_sets": {"test": {"dataset": "data/test"}},
            "out": str(tmp_path / "ties"),
        },
    )
    code, stdout, err = _run(recipe, capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "ties" / "soup.json").read_text())
    assert record["method"] == "ties" and record["soup"]["method"] == "ties"
    assert {key: record["parameters"][key] for key in ("density", "scaling")} == {
        "density": 0.3,
        "scaling": 0.8,
    }
    assert "Yadav" in record["citation"] and record["soup"]["citation"] == record["citation"]
    assert record["base"]["source"] == str(pool / "target")
    assert "ties soup" in _table(stdout)
    assert "Yadav" in (tmp_path / "ties" / "README.md").read_text()


BAD_RECIPES = {
    "unknown key": ({"metod": "greedy"}, ["'metod'"]),
    "no sources": ({"sources": []}, ["'sources'"]),
    "unknown method": ({"method": "gready"}, ["'gready'"]),
    "greedy without data": ({"method": "greedy"}, ["'held_out'"]),
    "missing dataset": (
        {"method": "greedy", "held_out": {"dataset": "data/nowhere"}},
        ["held_out.dataset", "nowhere"],
    ),
    "greedy option": (
        {"method": "greedy", "held_out": {"dataset": "data/held_out"}, "greedy": {"strictly": 1}},
        ["greedy:", "'strictly'", "strict"],
    ),
    "learned option": (
        {"method": "learned", "held_out": {"dataset": "data/held_out"}, "learned": {"epoch": 1}},
        ["learned:", "'epoch'", "epochs"],
    ),
    "options of another method": ({"greedy": {"strict": True}}, ["'greedy'", "'uniform'"]),
    "merge method without base": ({"method": "ties"}, ["'ties'", "'base'"]),
    "unknown parameter": (
        {"method": "ties", "base": "target", "parameters": {"densty": 0.2}},
        ["parameters:", "'densty'", "density"],
    ),
    "parameters not a mapping": (
        {"method": "ties", "base": "target", "parameters": [0.2]},
        ["'parameters'"],
    ),
    "base for a soup": ({"method": "uniform", "base": "target"}, ["'base'", "'uniform'"]),
    "base for fisher": (
        {"method": "fisher", "base": "target", "parameters": {"fisher_dirs": ["a", "b"]}},
        ["'base'", "'fisher'"],
    ),
    "no output": ({"out": None}, ["'out'"]),
    # bool("false") is True: a string where a boolean belongs must never mean overwrite.
    "overwrite as a string": ({"overwrite": "false"}, ["'overwrite'", "true or false"]),
    "ensemble as a number": ({"ensemble": 1}, ["'ensemble'", "true or false"]),
    "output outside the recipe's folder": ({"out": "../elsewhere"}, ["outside", "absolute"]),
    "source not a string": ({"sources": ["ingredients/ing0", 3]}, ["'sources'", "strings"]),
    "batch size not a number": (
        {"method": "greedy", "held_out": {"dataset": "data/held_out", "batch_size": "many"}},
        ["held_out.batch_size", "positive integer", "'many'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipes_exit_2_naming_the_key(pool, tmp_path, capsys, case):
    pool, _ = pool
    changes, expected = BAD_RECIPES[case]
    recipe = {"sources": ["ingredients/ing0", "ingredients/ing1"], "out": str(tmp_path / "o")}
    recipe.update(changes)
    recipe = {key: value for key, value in recipe.items() if value is not None}
    code, stdout, err = _run(_write_recipe(pool, "bad", recipe), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-soups soup: error: "), err
    for fragment in expected:
        assert fragment in lines[0]
    assert not (tmp_path / "o").exists()


def test_shipped_recipes_parse():
    """Every soup recipe in recipes/ passes the real parser (nothing is loaded or run)."""
    soup_recipes = [
        file
        for file in sorted(RECIPES.glob("*.yaml"))
        if "sources" in yaml.safe_load(file.read_text())
    ]
    names = {file.name for file in soup_recipes}
    assert {"offline_greedy_soup.yaml", "clip_vit_b32_imagenet_greedy.yaml"} <= names
    for file in soup_recipes:
        assert parse_recipe(file)["method"] in METHODS


def test_offline_recipe_runs_on_the_demo_layout(pool, tmp_path, capsys):
    """recipes/offline_greedy_soup.yaml, copied beside a folder laid out as the demo and its
    documented data snippet leave it (tiny ViTs instead of the demo's models), runs as is."""
    pool, _ = pool
    (tmp_path / "recipes").mkdir()
    recipe = shutil.copy(RECIPES / "offline_greedy_soup.yaml", tmp_path / "recipes")
    demo = tmp_path / "demo_output"
    for i, folder in enumerate(_folders(pool)[:3]):
        shutil.copytree(folder, demo / "ingredients" / f"ingredient-{i:02d}")
    shutil.copytree(pool / "data" / "held_out", demo / "data" / "validation")
    shutil.copytree(pool / "data" / "test", demo / "data" / "test")
    out = demo / "greedy_soup_recipe"
    code, stdout, err = _run(Path(recipe), capsys, "--out", str(out))
    assert code == 0, err
    assert json.loads((out / "soup.json").read_text())["soup"]["method"] == "greedy"
    assert {"greedy soup", "ensemble", "best individual"} <= _table(stdout).keys()
