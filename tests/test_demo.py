"""`hf-soups demo --fast` end to end: every artifact a user is promised."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hf_soups.cli import main
from hf_soups.models import load_model

ROWS = ["zero-shot", "best individual", "uniform soup", "greedy soup", "learned soup", "ensemble"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["-q", "demo", "--fast", "--out", str(out)]) == 0
    return out


def test_results_json_has_every_row_with_intervals(demo):
    results = json.loads((demo / "results.json").read_text())
    rows = results["results"]
    assert all(name in rows for name in ROWS)
    assert sum("ingredients/ingredient-" in name for name in rows) == 6
    assert any(name.startswith("WiSE-FT") for name in rows)
    for per_set in rows.values():
        assert set(per_set) == {"test", "rotate", "noise", "invert", "downscale"}
        for entry in per_set.values():
            low, high = entry["intervals"]["accuracy"]
            assert low <= entry["score"] <= high and entry["n"] == 1000
    assert results["inference_cost"]["ensemble"] == 6
    assert {c["name_a"] for c in results["comparisons"]} >= {"uniform soup", "ensemble"}
    assert "verdicts" in results["diagnostics"]


def test_scores_match_the_saved_predictions(demo):
    """The table's accuracies are recomputable from the per-example predictions."""
    from hf_soups.evaluation import EvalResult

    results = json.loads((demo / "results.json").read_text())["results"]
    saved = EvalResult.load(demo / "predictions" / "uniform_soup__test.json")
    accuracy = float((saved.predictions == saved.labels).mean())
    assert accuracy == pytest.approx(results["uniform soup"]["test"]["score"])


def test_soup_folders_load_and_carry_cards(demo):
    for folder in ["greedy_soup", "wise_ft"]:
        model = load_model(demo / folder)
        logits = model(pixel_values=torch.zeros(2, 1, 28, 28)).logits
        assert logits.shape == (2, 10)
        card = ModelCard.load(demo / folder / "README.md")
        assert "merge" in card.data.tags
        recipe = json.loads((demo / folder / "soup.json").read_text())
        for plot in recipe.get("plots", []):
            assert (demo / folder / plot).stat().st_size > 0
    assert (demo / "wise_ft" / "wise_ft_sweep.png").is_file()
    greedy = json.loads((demo / "greedy_soup" / "soup.json").read_text())
    kept = [t["ingredient"] for t in greedy["soup"]["greedy_trace"] if t["kept"]]
    weights = load_file(str(demo / "greedy_soup" / "model.safetensors"))
    members = [
        load_file(str(demo / "ingredients" / name.split("/")[-1] / "model.safetensors"))
        for name in kept
    ]
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            reference = sum(m[name].double() for m in members) / len(members)
            torch.testing.assert_close(tensor.double(), reference, atol=1e-6, rtol=0)


def test_greedy_is_never_below_the_best_individual_on_validation(demo):
    trace = json.loads((demo / "greedy_soup" / "soup.json").read_text())["soup"]["greedy_trace"]
    best_individual = max(t["individual_score"] for t in trace)
    final = [t["soup_score"] for t in trace if t["kept"]][-1]
    assert trace[0]["individual_score"] == best_individual
    assert final >= best_individual


def test_demo_refuses_an_existing_output(demo, capsys):
    assert main(["demo", "--fast", "--out", str(demo)]) == 2
    assert "already exists" in capsys.readouterr().err
