"""Model cards: rendered from soup.json alone, parsed back with huggingface_hub's own parsers.

Recipes are written by hand here in the typed form (:class:`hf_soups.recipe.Recipe`) the soup
builder and the WiSE-FT/PAINT code record, so every expected value comes from the recipe the
test built, not from hf_soups. Two tests run the real builders on tiny models and rebuild the
weights with the card's command.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from safetensors.torch import load_file
from tiny import make_vit_folder

from hf_soups import citations
from hf_soups.cards import write_card
from hf_soups.cli import build_parser, main
from hf_soups.recipe import Recipe

ZS = {"source": "acme/clip-zero-shot", "revision": "a" * 40}
FT = {"source": "acme/clip-finetuned", "revision": "b" * 40}


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def cell(value: float, interval) -> str:
    return f"{pct(value)} [{pct(interval[0])}, {pct(interval[1])}]"


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table row in ``text`` (header and separator rows skipped)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return [row for row in rows if row[0] not in {"#", "Model", "Step", "α", "Role"}]


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)\n```", text, flags=re.S)


def eval_result(acc: float, n: int = 1000, half: float = 0.02) -> dict:
    """A score entry as ``EvalResult.to_dict`` writes it."""
    return {
        "name": "x",
        "n": n,
        "metrics": {"accuracy": acc},
        "primary_metric": "accuracy",
        "score": acc,
        "confidence": 0.95,
        "intervals": {"accuracy": [acc - half, acc + half / 2]},
    }


def name_of(record: dict) -> str:
    return f"{record['source']}@{record['revision'][:10]}"


def greedy_recipe() -> dict:
    candidates = [{"source": f"acme/ft-lr{i}", "revision": f"{i}" * 40} for i in range(4)]
    names = [name_of(r) for r in candidates]
    own = {"validation": [0.91, 0.86, 0.9, 0.88], "test": [0.9, 0.85, 0.885, 0.87]}
    kept = [0, 2, 3]
    scores = {name: {s: eval_result(own[s][i]) for s in own} for i, name in enumerate(names)}
    scores["ensemble"] = {"test": eval_result(0.93)}
    scores["uniform soup"] = {"validation": eval_result(0.905), "test": eval_result(0.897)}
    scores["greedy soup"] = {"validation": eval_result(0.925), "test": eval_result(0.912)}
    order = [0, 2, 3, 1]
    soup_scores = {0: 0.91, 2: 0.92, 3: 0.925, 1: 0.915}
    return {
        "library": "hf_soups 0.1.0",
        "method": "weighted_average",
        "parameters": {"weights": [1 / 3] * 3},
        "citation": None,
        "ingredients": [candidates[i] for i in kept],
        "base": None,
        "dtype": None,
        "soup": {
            "method": "greedy",
            "weights": [1 / 3] * 3,
            "metric": "accuracy",
            "held_out": "validation",
            "candidates": candidates,
            "greedy_trace": [
                {
                    "ingredient": names[i],
                    "individual_score": own["validation"][i],
                    "soup_score": soup_scores[i],
                    "kept": i in kept,
                    "reason": "best individual" if i == 0 else "gain",
                }
                for i in order
            ],
        },
        "scores": scores,
        "datasets": ["ylecun/mnist"],
        # "test" is a Hub dataset's split; "validation" was carved out locally (no Hub id).
        "eval_sets": {"test": {"dataset": "ylecun/mnist", "split": "test"}},
        "comparisons": [{"verdict": "greedy soup vs best: +1.2 points: within noise"}],
    }


def write_folder(tmp_path, recipe: dict, config: dict | None = None, name: str = "my-soup"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "soup.json").write_text(json.dumps(recipe, indent=2))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def own_results(recipe: dict, per_set: dict) -> set[tuple]:
    """(eval set, metric, value, Hub dataset) for each score in ``per_set`` (one model's) on an
    eval set whose Hub dataset the recipe names: what the model-index must hold."""
    expected = set()
    for eval_set, entry in per_set.items():
        dataset = recipe.get("eval_sets", {}).get(eval_set, {}).get("dataset")
        if dataset is not None:
            for metric, value in entry["metrics"].items():
                expected.add((eval_set, metric, value, dataset))
    return expected


def parsed_results(readme) -> set[tuple]:
    name, results = model_index_to_eval_results(metadata_load(readme)["model-index"])
    assert name
    return {(r.dataset_name, r.metric_type, r.metric_value, r.dataset_type) for r in results}


def test_greedy_soup_card(tmp_path):
    recipe = greedy_recipe()
    folder = write_folder(tmp_path, recipe, {"architectures": ["CLIPZeroShotClassifier"]})
    readme = write_card(folder)
    assert readme == folder / "README.md"

    card = ModelCard.load(readme)  # huggingface_hub parses metadata and model-index strictly
    data = card.data
    assert data.base_model == [c["source"] for c in recipe["ingredients"]]
    assert data.base_model_relation == "merge"
    assert data.library_name == "transformers"
    # A class only hf_soups defines: no pipeline tag may point transformers at it, and the
    # card says how to load it.
    assert data.pipeline_tag is None
    usage = section(card.text, "Usage")
    assert "needs hf_soups" in usage and "from hf_soups.models import load_model" in usage
    assert {"model-soup", "merge", "hf-soups"} <= set(data.tags)
    assert "wise-ft" not in data.tags
    assert data.datasets == ["ylecun/mnist"]
    assert data.model_name == "my-soup"
    # The model-index holds this model's scores only, on the eval set with a Hub dataset.
    this_model = recipe["scores"]["greedy soup"]
    assert parsed_results(readme) == own_results(recipe, this_model)
    assert parsed_results(readme) == {
        ("test", "accuracy", this_model["test"]["metrics"]["accuracy"], "ylecun/mnist")
    }
    assert len(data.eval_results) == 1

    text = card.text
    assert "arXiv:2203.05482" in text
    kept = {c["source"] for c in recipe["ingredients"]}
    rows = {row[1]: row for row in table_rows(section(text, "Ingredients").split("###")[0])}
    assert len(rows) == len(recipe["soup"]["candidates"])
    for candidate in recipe["soup"]["candidates"]:
        name = name_of(candidate)
        (row,) = [r for key, r in rows.items() if name in key]
        assert row[2] == candidate["revision"]
        assert row[3] == (f"{1 / 3:.4g}" if candidate["source"] in kept else "0")
        own = recipe["scores"][name]["validation"]
        assert row[4] == cell(own["metrics"]["accuracy"], own["intervals"]["accuracy"])
        assert row[5] == ("yes" if candidate["source"] in kept else "no")

    trace_rows = table_rows(section(text, "Ingredients").split("### Greedy selection")[1])
    assert [row[1].strip("`") for row in trace_rows] == [
        t["ingredient"] for t in recipe["soup"]["greedy_trace"]
    ]
    assert [row[4] for row in trace_rows] == [
        "yes" if t["kept"] else "no" for t in recipe["soup"]["greedy_trace"]
    ]

    # Every model's scores stay in the body, on every eval set.
    results = section(text, "Results")
    result_rows = {
        row[0].strip("*").removesuffix(" (this model)"): row for row in table_rows(results)
    }
    assert set(result_rows) == set(recipe["scores"])
    assert result_rows["greedy soup"][0] == "**greedy soup (this model)**"
    header = next(line for line in results.splitlines() if line.startswith("| Model"))
    columns = [c.strip().split(" (n=")[0] for c in header.split("|")[2:-1]]
    for model, per_set in recipe["scores"].items():
        for eval_set, entry in per_set.items():
            got = result_rows[model][1 + columns.index(eval_set)]
            assert got == cell(entry["metrics"]["accuracy"], entry["intervals"]["accuracy"])
    assert recipe["comparisons"][0]["verdict"] in results

    reproduce = section(text, "Reproduce")
    (recipe_json,) = fenced(reproduce, "json")
    assert json.loads(recipe_json) == Recipe.from_dict(recipe).to_dict()
    (command,) = fenced(reproduce, "bash")
    words = shlex.split(command)
    args = build_parser().parse_args(words[1:])
    assert words[0] == "hf-soups" and args.command == "merge"
    assert args.sources == [f"{c['source']}@{c['revision']}" for c in recipe["ingredients"]]
    assert [float(w) for w in args.weights.split(",")] == recipe["parameters"]["weights"]


def test_report_and_cards_write_a_score_alike():
    """One score formatter: ``report.results_table`` writes the cells the card writes."""
    from hf_soups.report import results_table

    recipe = greedy_recipe()
    rows = {row[0]: row for row in table_rows(results_table(recipe["scores"]))}
    entry = recipe["scores"]["greedy soup"]["validation"]
    assert rows["greedy soup"][1] == cell(
        entry["metrics"]["accuracy"], entry["intervals"]["accuracy"]
    )
    assert rows["ensemble"][1] == "—"  # no validation score


def sweep_recipe(kind: str = "wise_ft") -> dict:
    """What ``PatchResult.save_pretrained`` records: dict-form sweep with EvalResult summaries."""
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    curves = {"validation": [0.7, 0.8, 0.86, 0.88, 0.89], "rotated": [0.6, 0.64, 0.63, 0.58, 0.5]}
    results = {s: [eval_result(v, n=500) for v in values] for s, values in curves.items()}
    chosen = 0.5
    by_alpha = {a: {s: results[s][i] for s in curves} for i, a in enumerate(alphas)}
    return {
        "library": "hf_soups 0.1.0",
        "method": "wise_ft",
        "parameters": {"alpha": chosen},
        "citation": citations.WISE_FT,
        "ingredients": [ZS, FT],
        "base": None,
        "dtype": None,
        "patch": {
            "kind": kind,
            "zero_shot": ZS,
            "fine_tuned": FT,
            "chosen_alpha": chosen,
            "selection": {"alpha": chosen, "description": "alpha=0.5 maximises the mean score"},
            "chosen_scores": {s: curves[s][2] for s in curves},
            "sweep": {
                "zero_shot": name_of(ZS),
                "fine_tuned": name_of(FT),
                "alphas": alphas,
                "scores": curves,
                "results": results,
            },
        },
        "scores": {
            "WiSE-FT alpha=0.5": by_alpha[0.5],
            "zero-shot": by_alpha[0.0],
            "fine-tuned": by_alpha[1.0],
        },
        "eval_sets": {
            "validation": {"dataset": "acme/digits", "split": "validation"},
            "rotated": {"dataset": "acme/digits-rotated", "split": "test"},
        },
        "plots": ["wise_ft_sweep.png", "not_there.png"],
    }


def test_wise_ft_card_with_sweep(tmp_path):
    recipe = sweep_recipe()
    patch = recipe["patch"]
    folder = tmp_path / "wise"
    folder.mkdir()
    (folder / "soup.json").write_text(json.dumps(recipe))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 8}}))
    (folder / "wise_ft_sweep.png").write_bytes(b"\x89PNG\r\n")

    card = ModelCard.load(write_card(folder))
    data = card.data
    assert data.base_model == [ZS["source"], FT["source"]]
    assert data.base_model_relation == "merge"
    assert data.library_name == "open_clip"
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert {"wise-ft", "merge", "hf-soups"} <= set(data.tags)
    assert "model-soup" not in data.tags and "paint" not in data.tags
    # The model-index holds the chosen model's scores only, on both eval sets.
    got = parsed_results(folder / "README.md")
    assert got == own_results(recipe, recipe["scores"]["WiSE-FT alpha=0.5"])
    assert {(r[0], r[2]) for r in got} == {("validation", 0.86), ("rotated", 0.63)}

    text = card.text
    assert "arXiv:2109.01903" in text
    sweep = patch["sweep"]
    sweep_rows = table_rows(section(text, "Mixing coefficient sweep"))
    assert [row[0] for row in sweep_rows] == ["0", "0.25", "**0.5** (chosen)", "0.75", "1"]
    for row, i in zip(sweep_rows, range(len(sweep["alphas"]))):
        for column, eval_set in enumerate(sweep["results"], start=1):
            entry = sweep["results"][eval_set][i]
            assert row[column] == cell(entry["metrics"]["accuracy"], entry["intervals"]["accuracy"])
    assert patch["selection"]["description"] in text
    ends = {row[0]: row for row in table_rows(section(text, "Interpolated models"))}
    assert ends["zero-shot (α = 0)"][2] == ZS["revision"] and ends["zero-shot (α = 0)"][3] == "0.5"
    assert ends["fine-tuned (α = 1)"][2] == FT["revision"]
    assert name_of(ZS) in ends["zero-shot (α = 0)"][1]
    for model in recipe["scores"]:
        assert model in section(text, "Results")
    assert "](wise_ft_sweep.png)" in text and "not_there.png)" not in text

    (command,) = fenced(section(text, "Reproduce"), "bash")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.command == "wise-ft" and args.alpha == patch["chosen_alpha"]
    assert args.zero_shot == f"{ZS['source']}@{ZS['revision']}"
    assert args.fine_tuned == f"{FT['source']}@{FT['revision']}"


def test_paint_card_scored_only_in_its_sweep(tmp_path):
    """PAINT, with results recorded only per alpha: this model's scores come from the sweep."""
    alphas = [0.0, 0.4, 1.0]

    def entry(value: float, interval: list[float]) -> dict:
        return {"metrics": {"accuracy": value}, "intervals": {"accuracy": interval}, "n": 200}

    curves = {
        "supported": [entry(0.8 - 0.1 * a, [0.7, 0.85]) for a in alphas],
        "patch task": [entry(0.3 + 0.6 * a, [0.2, 0.95]) for a in alphas],
    }
    recipe = {
        "method": "wise_ft",
        "parameters": {"alpha": 0.4},
        "ingredients": [ZS, FT],
        "patch": {
            "kind": "paint",
            "zero_shot": ZS,
            "fine_tuned": FT,
            "chosen_alpha": 0.4,
            "sweep": {"alphas": alphas, "results": curves},
        },
        "eval_sets": {
            "supported": {"dataset": "acme/cifar-like"},
            "patch task": {"dataset": "acme/mnist-like"},
        },
    }
    folder = write_folder(tmp_path, recipe, {"architectures": ["CLIPModel"]})
    card = ModelCard.load(write_card(folder))
    assert {"paint", "wise-ft", "model-patching"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert "arXiv:2208.05592" in card.text
    chosen = {name: column[1] for name, column in curves.items()}
    assert parsed_results(folder / "README.md") == own_results(recipe, chosen)
    rows = table_rows(section(card.text, "Mixing coefficient sweep"))
    assert rows[1][0] == "**0.4** (chosen)"
    assert rows[1][2] == cell(0.3 + 0.6 * 0.4, [0.2, 0.95])


def test_minimal_recipe_with_local_ingredients(tmp_path):
    """Only what ``merge`` writes, local folders: no base_model, no model-index, still a card,
    naming the local folders by their names only."""
    recipe = {
        "library": "hf_soups 0.1.0",
        "method": "weighted_average",
        "parameters": {"weights": [0.25, 0.75]},
        "citation": None,
        "ingredients": [
            {"source": "/data/run one", "revision": None},
            {"source": "/data/run2", "revision": None},
        ],
        "base": None,
        "dtype": "bfloat16",
    }
    folder = write_folder(tmp_path, recipe)
    card = ModelCard.load(write_card(folder))
    metadata = metadata_load(folder / "README.md")
    assert "base_model" not in metadata and "base_model_relation" not in metadata
    assert "model-index" not in metadata
    assert card.data.library_name is None
    assert {"merge", "hf-soups"} <= set(card.data.tags)
    assert "No scores were recorded" in card.text
    assert "/data" not in card.text  # no local path is published
    rows = table_rows(section(card.text, "Ingredients"))
    assert [row[1].strip("`") for row in rows] == ["run one", "run2"]
    assert [row[3] for row in rows] == ["0.25", "0.75"]
    (command,) = fenced(section(card.text, "Reproduce"), "bash")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.sources == ["run one", "run2"] and args.dtype == "bfloat16"
    assert args.weights == "0.25,0.75"
    assert "run this in the folder that holds them" in section(card.text, "Reproduce")


def test_other_methods_cite_the_recorded_paper(tmp_path):
    recipe = {
        "method": "ties",
        "parameters": {"density": 0.2},
        "citation": "Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708",
        "ingredients": [FT, {"source": "acme/other", "revision": "c" * 40}],
        "base": ZS,
    }
    card = ModelCard.load(write_card(write_folder(tmp_path, recipe)))
    assert recipe["citation"] in card.text and "2203.05482" not in card.text
    assert card.data.base_model == [FT["source"], "acme/other", ZS["source"]]
    assert "ties" in card.data.tags


def test_eval_sets_made_from_one_split_stay_apart(tmp_path):
    """Shifted copies of one test split share a dataset id and split; huggingface_hub groups
    results by those, so each set must still come back under its own name."""
    recipe = greedy_recipe()
    recipe["eval_sets"] = {
        "test": {"dataset": "ylecun/mnist", "split": "test"},
        "validation": {"dataset": "ylecun/mnist", "split": "test"},
    }
    folder = write_folder(tmp_path, recipe)
    write_card(folder)
    expected = own_results(recipe, recipe["scores"]["greedy soup"])
    assert parsed_results(folder / "README.md") == expected
    assert {r[0] for r in expected} == {"test", "validation"}
    _, results = model_index_to_eval_results(metadata_load(folder / "README.md")["model-index"])
    assert {(r.dataset_type, r.dataset_split) for r in results} == {("ylecun/mnist", "test")}


def test_card_command(tmp_path, capsys):
    folder = write_folder(
        tmp_path, greedy_recipe(), {"architectures": ["ViTForImageClassification"]}
    )
    assert main(["card", str(folder), "--model-name", "acme/greedy"]) == 0
    written = (folder / "README.md").read_text()
    assert ModelCard.load(folder / "README.md").data.model_name == "acme/greedy"
    assert str(folder / "README.md") in capsys.readouterr().out
    (folder / "README.md").unlink()
    write_card(folder, model_name="acme/greedy")
    assert (folder / "README.md").read_text() == written

    # --license is recorded in the recipe, so the next card keeps it.
    assert main(["card", str(folder), "--license", "mit"]) == 0
    assert ModelCard.load(folder / "README.md").data.license == "mit"
    assert json.loads((folder / "soup.json").read_text())["license"] == "mit"
    write_card(folder)
    assert ModelCard.load(folder / "README.md").data.license == "mit"
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["card", str(empty)]) == 2
    assert "soup.json" in capsys.readouterr().err

    # A wrongly typed soup.json is one line naming the file and the field.
    bad = write_folder(tmp_path, {**greedy_recipe(), "ingredients": "acme/x"}, name="bad")
    assert main(["card", str(bad)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "soup.json" in line and "ingredients" in line
    assert not (bad / "README.md").exists()


def local_ingredient(root, name: str, license: str | None):
    """A local ingredient folder whose README.md declares ``license``; "no card" writes none,
    "broken" a card whose YAML does not parse."""
    folder = root / name
    folder.mkdir()
    front = {None: "tags: [vision]\n", "broken": "license: [mit\n"}.get(license)
    if license != "no card":
        front = front or f"license: {license}\n"
        (folder / "README.md").write_text(f"---\n{front}---\n\n# {name}\n")
    return {"source": str(folder), "revision": None}


@pytest.mark.parametrize(
    ("licenses", "inherited"),
    [
        (["mit", "mit"], "mit"),
        (["mit", "apache-2.0"], None),  # they disagree
        (["mit", None], None),  # one card declares none
        (["mit", "no card"], None),  # one ingredient has no card
        (["mit", "broken"], None),  # one card cannot be read
    ],
)
def test_license_is_inherited_when_every_ingredient_card_agrees(
    tmp_path, caplog, licenses, inherited
):
    ingredients = [local_ingredient(tmp_path, f"ft{i}", lic) for i, lic in enumerate(licenses)]
    recipe = {"method": "weighted_average", "parameters": {"weights": [0.5, 0.5]}}
    folder = write_folder(tmp_path, {**recipe, "ingredients": ingredients})
    with caplog.at_level(logging.INFO, logger="hf_soups.cards"):
        card = ModelCard.load(write_card(folder))
    assert card.data.license == inherited
    if inherited is None:
        assert "No license in the card" in caplog.text
        # A license given explicitly wins.
        assert ModelCard.load(write_card(folder, license="cc-by-4.0")).data.license == "cc-by-4.0"


def test_license_of_hub_ingredients_comes_from_their_cached_cards(tmp_path, monkeypatch):
    """Hub ingredients' cards are read from the Hub cache, at the recorded commit."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    for source in (ZS, FT):
        repo = "models--" + source["source"].replace("/", "--")
        snapshot = cache / repo / "snapshots" / source["revision"]
        snapshot.mkdir(parents=True)
        (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# clip\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    recipe = {"method": "wise_ft", "parameters": {"alpha": 0.5}, "ingredients": [ZS, FT]}
    card = ModelCard.load(write_card(write_folder(tmp_path, recipe)))
    assert card.data.license == "mit"


VISION_TASK = {
    "classnames": ["zero", "one", "two"],
    "templates": ["a photo of the number {}."],
    "text_model": "openai/clip-vit-base-patch32",
}


@pytest.mark.parametrize(
    ("files", "library", "pipeline_tag", "usage"),
    [
        (
            {"config.json": {"architectures": ["CLIPModel"]}},
            "transformers",
            "zero-shot-image-classification",
            ['pipeline("zero-shot-image-classification"', "'zero', 'one', 'two'"],
        ),
        (  # a vision tower: the card names its text model and the class names
            {"config.json": {"architectures": ["CLIPVisionModel"]}},
            "transformers",
            None,
            ["openai/clip-vit-base-patch32", "'zero', 'one', 'two'", "a photo of the number {}."],
        ),
        (
            {"config.json": {"architectures": ["ViTForImageClassification"]}},
            "transformers",
            "image-classification",
            ['pipeline("image-classification"'],
        ),
        (
            {"open_clip_config.json": {"model_cfg": {"embed_dim": 8}}},
            "open_clip",
            "zero-shot-image-classification",
            ["open_clip.create_model_and_transforms", "'zero', 'one', 'two'"],
        ),
        (  # hf_soups' linear head on open_clip: only hf_soups loads it
            {"open_clip_config.json": {"model_cfg": {}}, "classifier.safetensors": None},
            "open_clip",
            None,
            ["needs hf_soups", "load_model("],
        ),
    ],
)
def test_family_metadata(tmp_path, files, library, pipeline_tag, usage):
    recipe = {
        "method": "weighted_average",
        "parameters": {"weights": [1.0]},
        "ingredients": [FT],
        "task": VISION_TASK,
    }
    folder = write_folder(tmp_path, recipe)
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content) if content is not None else "")
    card = ModelCard.load(write_card(folder))
    assert card.data.library_name == library
    assert card.data.pipeline_tag == pipeline_tag
    text = section(card.text, "Usage")
    for fragment in usage:
        assert fragment in text


def test_public_recipe_names_local_folders_only():
    hub = {"source": "acme/ft", "revision": "d" * 40}
    local = ["/runs/a/ckpt", "/runs/b/ckpt", "/x/solo"]
    recipe = Recipe.from_dict(
        {
            "method": "weighted_average",
            "parameters": {"weights": [0.25] * 4},
            "ingredients": [*({"source": p, "revision": None} for p in local), hub],
            "soup": {
                "method": "greedy",
                "greedy_trace": [
                    {"ingredient": p, "individual_score": 0.5, "soup_score": 0.5, "kept": True}
                    for p in local
                ],
            },
            "scores": {p: {"test": {"metrics": {"accuracy": 0.5}}} for p in local},
            "comparisons": [{"verdict": "greedy soup vs /x/solo: +1.0 points"}],
            "command": "hf-soups merge /runs/a/ckpt /runs/b/ckpt /x/solo acme/ft --out soup",
            "eval_sets": {
                "test": {"dataset": "/data/digits", "split": "test"},
                "hub": {"dataset": "ylecun/mnist", "split": "test"},
            },
        }
    )
    public = recipe.public()
    # Folder names, with the parent where two share one; Hub sources as they are.
    assert [s.source for s in public.ingredients] == ["a/ckpt", "b/ckpt", "solo", "acme/ft"]
    assert [s.revision for s in public.ingredients] == [None, None, None, hub["revision"]]
    assert set(public.scores) == {"a/ckpt", "b/ckpt", "solo"}
    assert [step.ingredient for step in public.soup.greedy_trace] == ["a/ckpt", "b/ckpt", "solo"]
    assert public.comparisons == [{"verdict": "greedy soup vs solo: +1.0 points"}]
    assert public.command == "hf-soups merge a/ckpt b/ckpt solo acme/ft --out soup"
    assert public.eval_sets == {
        "test": {"dataset": "digits", "split": "test"},
        "hub": {"dataset": "ylecun/mnist", "split": "test"},
    }
    published = json.dumps(public.to_dict())
    assert "/runs" not in published and "/x/" not in published and "/data" not in published
    assert recipe.ingredients[0].source == "/runs/a/ckpt"  # the recipe itself is unchanged


def test_importing_cards_does_not_import_torch():
    """``write_card`` runs after every merge and in ``hf-soups card``: it must stay cheap."""
    code = "import sys, hf_soups.cards; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def vit_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit_pool")
    return [make_vit_folder(root / f"ft{i}", seed=i) for i in range(3)]


def weights_of(folder):
    return load_file(str(folder / "model.safetensors"))


def test_every_merge_writes_its_card(vit_pool, tmp_path):
    from hf_soups.merge import merge

    out = merge([str(f) for f in vit_pool[:2]], tmp_path / "merged", progress=False)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert card.text.lstrip().startswith("# merged")  # the output's name, not a temporary one
    assert ".tmp-" not in card.text
    assert vit_pool[0].name in card.text and str(vit_pool[0]) not in card.text
    # The folder's own recipe keeps the paths that replay it.
    assert json.loads((out / "soup.json").read_text())["ingredients"][0]["source"] == str(
        vit_pool[0]
    )


def test_a_card_the_disk_refuses_does_not_fail_the_merge(vit_pool, tmp_path, monkeypatch, caplog):
    import hf_soups.merge as engine

    def full_disk(folder, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine, "write_card", full_disk)
    out = engine.merge([str(f) for f in vit_pool[:2]], tmp_path / "merged", progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "README.md").exists()
    assert "No model card written" in caplog.text and "No space left" in caplog.text

    def bug(folder, **kwargs):
        raise KeyError("a bug in the card code")

    monkeypatch.setattr(engine, "write_card", bug)
    with pytest.raises(KeyError):  # a bug is not hidden
        engine.merge([str(f) for f in vit_pool[:2]], tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()


def test_real_greedy_soup_card_rebuilds_the_soup(vit_pool, tmp_path, monkeypatch):
    """A greedy soup from the real builder: the card lists every candidate and score, and its
    command rebuilds the same weights through the CLI (run where the ingredients are)."""
    from hf_soups.soup import SoupBuilder

    target = weights_of(vit_pool[0])

    def score(model):  # minus the distance to ft0: greedy keeps ft0 and drops the others
        state = model.state_dict()
        return -sum(float((state[k] - target[k]).pow(2).sum()) for k in target if k in state)

    soup = SoupBuilder.from_pretrained([str(f) for f in vit_pool]).greedy(score)
    folder = soup.save_pretrained(tmp_path / "greedy", progress=False)
    assert ModelCard.load(folder / "README.md").data.tags  # saved with its card
    recipe = json.loads((folder / "soup.json").read_text())
    card = ModelCard.load(write_card(folder))
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert "model-soup" in card.data.tags
    assert str(vit_pool[0].parent) not in card.text  # local folders by their names
    ingredients_text = section(card.text, "Ingredients")
    for entry in recipe["soup"]["greedy_trace"]:
        assert f"`{entry['ingredient'].rsplit('/', 1)[-1]}`" in ingredients_text
    # Scored on a local held-out set: no Hub dataset, so no model-index; the scores are in the
    # body, every model's.
    assert "model-index" not in metadata_load(folder / "README.md")
    rows = {
        row[0].strip("*").removesuffix(" (this model)"): row
        for row in table_rows(section(card.text, "Results"))
    }
    for model, per_set in recipe["scores"].items():
        (value,) = [entry["score"] for entry in per_set.values()]
        assert rows[model.rsplit("/", 1)[-1]][1] == f"{value:.4g}"

    (command,) = fenced(section(card.text, "Reproduce"), "bash")
    words = shlex.split(command)
    out = tmp_path / "rebuilt"
    monkeypatch.chdir(vit_pool[0].parent)
    assert main(["-q", *words[1 : words.index("--out")], "--out", str(out)]) == 0
    rebuilt, original = weights_of(out), weights_of(folder)
    assert rebuilt.keys() == original.keys()
    for name in original:
        assert torch.equal(rebuilt[name], original[name]), name


def test_real_wise_ft_card_rebuilds_the_model(vit_pool, tmp_path, monkeypatch):
    """A WiSE-FT sweep from the real patching code: every alpha is in the sweep table, the plot
    is linked, and the card's ``hf-soups wise-ft`` command rebuilds the same bits."""
    from hf_soups.patching import choose_wise_ft

    zero_shot, fine_tuned = vit_pool[0], vit_pool[1]
    target = weights_of(fine_tuned)

    def closeness(model):  # peaks at the fine-tuned end: higher alpha scores higher
        state = model.state_dict()
        return -sum(float((state[k] - target[k]).abs().sum()) for k in target if k in state)

    def shifted(model):  # peaks at the zero-shot end
        return -closeness(model)

    result = choose_wise_ft(
        str(zero_shot),
        str(fine_tuned),
        in_distribution={"id": closeness},
        shifted={"shift": shifted},
        alphas=[0.0, 0.5, 1.0],
        progress=False,
    )
    folder = result.save_pretrained(tmp_path / "wise", progress=False)
    recipe = json.loads((folder / "soup.json").read_text())
    patch = recipe["patch"]
    card = ModelCard.load(folder / "README.md")  # written by save_pretrained, plot included
    assert "wise-ft" in card.data.tags and card.data.base_model is None  # local ends
    assert "model-index" not in metadata_load(folder / "README.md")  # local eval sets
    for plot in recipe["plots"]:
        assert f"]({plot})" in card.text
    rows = table_rows(section(card.text, "Mixing coefficient sweep"))
    assert [r[0] for r in rows if "(chosen)" in r[0]] == [f"**{patch['chosen_alpha']:g}** (chosen)"]
    columns = list(patch["sweep"]["scores"])
    for row, alpha in zip(rows, patch["sweep"]["alphas"]):
        assert row[0].strip("*").removesuffix("** (chosen)") == f"{alpha:g}"
        for column, eval_set in enumerate(columns, start=1):
            value = patch["sweep"]["scores"][eval_set][patch["sweep"]["alphas"].index(alpha)]
            assert row[column] == f"{value:.4g}"

    (command,) = fenced(section(card.text, "Reproduce"), "bash")
    words = shlex.split(command)
    out = tmp_path / "rebuilt"
    monkeypatch.chdir(vit_pool[0].parent)
    assert main(["-q", *words[1 : words.index("--out")], "--out", str(out)]) == 0
    rebuilt, original = weights_of(out), weights_of(folder)
    assert rebuilt.keys() == original.keys()
    for name in original:
        assert torch.equal(rebuilt[name], original[name]), name


@pytest.mark.parametrize("license", ["not a license", "MIT", "", "apache 2.0"])
def test_a_license_that_is_no_hub_id_is_refused_and_nothing_changes(tmp_path, license):
    recipe = {"method": "weighted_average", "parameters": {"weights": [0.5, 0.5]}}
    ingredients = [local_ingredient(tmp_path, f"ft{i}", "mit") for i in range(2)]
    folder = write_folder(tmp_path, {**recipe, "ingredients": ingredients})
    before = (folder / "soup.json").read_bytes()
    with pytest.raises(ValueError, match="not a Hub license id"):
        write_card(folder, license=license)
    assert (folder / "soup.json").read_bytes() == before
    assert not (folder / "README.md").exists()


def test_card_command_on_a_missing_folder_says_so(tmp_path, capsys):
    assert main(["card", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().endswith("nowhere: no such file or folder")


def test_the_rebuild_command_writes_to_the_folder_name_not_the_title(tmp_path):
    recipe = {
        "method": "weighted_average",
        "parameters": {"weights": [0.5, 0.5]},
        "ingredients": [
            {"source": "org/a", "revision": None},
            {"source": "org/b", "revision": None},
        ],
    }
    folder = write_folder(tmp_path, recipe)
    text = write_card(folder, model_name="My soup, v2").read_text()
    assert "# My soup, v2" in text
    assert "--out my-soup" in text and "--out 'My soup" not in text


def test_a_method_merge_card_rebuilds_the_model_from_the_command_line(
    vit_pool, tmp_path, monkeypatch
):
    base, tunes = vit_pool[0], vit_pool[1:]
    monkeypatch.chdir(base.parent)
    folder = tmp_path / "merged"
    args = ["-q", "merge", *(t.name for t in tunes), "--method", "ties", "--base", base.name]
    assert (
        main([*args, "--param", "density=0.5", "--param", "scaling=0.8", "--out", str(folder)]) == 0
    )
    (command,) = fenced(section((folder / "README.md").read_text(), "Reproduce"), "bash")
    words = shlex.split(command)
    assert words[words.index("--method") + 1] == "ties" and "replay" not in command
    out = tmp_path / "rebuilt"
    assert main(["-q", *words[1 : words.index("--out")], "--out", str(out)]) == 0
    rebuilt, original = weights_of(out), weights_of(folder)
    assert rebuilt.keys() == original.keys()
    assert all(torch.equal(rebuilt[name], original[name]) for name in original)
