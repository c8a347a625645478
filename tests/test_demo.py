"""`hf-soups demo --fast` end to end: every artifact a user is promised."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from hf_soups.cli import main
from hf_soups.models import ZeroShotTask, load_model

ROWS = ["zero-shot", "best individual", "uniform soup", "greedy soup", "learned soup", "ensemble"]
REPORTED = {"test", "rotate", "noise", "invert", "downscale"}
TEMPLATE = "a photo of the digit {}"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["-q", "demo", "--fast", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def data():
    from hf_soups.demo.data import load_demo_data

    return load_demo_data(seed=0)


def test_results_json_has_every_row_with_intervals(demo):
    results = json.loads((demo / "results.json").read_text())
    rows = results["results"]
    assert all(name in rows for name in ROWS)
    assert sum("ingredients/ingredient-" in name for name in rows) == 6
    assert any(name.startswith("WiSE-FT") for name in rows)
    for per_set in rows.values():
        assert set(per_set) == REPORTED
        for entry in per_set.values():
            low, high = entry["intervals"]["accuracy"]
            assert low <= entry["score"] <= high and entry["n"] == 1000
    assert results["inference_cost"]["ensemble"] == 6
    assert {c["name_a"] for c in results["comparisons"]} >= {"uniform soup", "ensemble"}
    assert "verdicts" in results["diagnostics"]


def test_comparisons_are_holm_adjusted_over_the_whole_table(demo):
    comparisons = json.loads((demo / "results.json").read_text())["comparisons"]
    assert len(comparisons) == 5 * len(REPORTED)
    # Holm by hand: sort ascending, multiply the i-th smallest by m - i, running max, cap at 1.
    raw = [c["p_value"] for c in comparisons]
    m = len(raw)
    order = sorted(range(m), key=lambda i: raw[i])
    expected, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * raw[i])
        expected[i] = min(1.0, running)
    for comparison, adjusted in zip(comparisons, expected, strict=True):
        assert comparison["adjusted_p"] == pytest.approx(adjusted, rel=1e-12)
        assert comparison["significant"] == (adjusted < 0.05)
    table = (demo / "results.md").read_text()
    assert "adj. p=" in table and "How every choice was made" in table


def test_wise_ft_alpha_is_never_chosen_on_a_reported_shift(demo):
    selection = json.loads((demo / "results.json").read_text())["wise_ft_selection"]
    assert selection["target"] == ["validation"]
    assert selection["preserve"] == ["validation (translate)"]
    # The recipe's sweep scored alpha on those two sets only: no reported set among them.
    patch = json.loads((demo / "wise_ft" / "soup.json").read_text())["patch"]
    assert set(patch["sweep"]["results"]) == {"validation", "validation (translate)"}
    assert patch["selection"]["preserve"] == ["validation (translate)"]


def test_scores_match_the_saved_predictions(demo):
    """The table's accuracies are recomputable from the per-example predictions."""
    from hf_soups.evaluation import EvalResult

    results = json.loads((demo / "results.json").read_text())["results"]
    saved = EvalResult.load(demo / "predictions" / "uniform_soup__test.json")
    accuracy = float((saved.predictions == saved.labels).mean())
    assert accuracy == pytest.approx(results["uniform soup"]["test"]["score"])


def test_soup_folders_are_plain_clip_models_and_carry_cards(demo):
    task = ZeroShotTask(DIGITS, templates=[TEMPLATE])
    for folder in ["zero_shot", "greedy_soup", "wise_ft", *_ingredients(demo)]:
        config = json.loads((demo / folder / "config.json").read_text())
        assert config["architectures"] == ["CLIPModel"], folder
        for name in ["tokenizer.json", "model.safetensors"]:
            assert (demo / folder / name).is_file(), (folder, name)
        model = load_model(demo / folder, task=task)
        logits = model(pixel_values=torch.zeros(2, 3, 28, 28)).logits
        assert logits.shape == (2, 10)
    for folder in ["greedy_soup", "wise_ft"]:
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


def _ingredients(demo):
    return [f"ingredients/{p.name}" for p in sorted((demo / "ingredients").iterdir())]


@pytest.mark.parametrize("folder", ["greedy_soup", "wise_ft"])
def test_pipeline_reproduces_the_reported_test_accuracy(demo, data, folder, one_thread):
    """transformers alone, on PIL images, gives the predictions hf_soups measured."""
    from transformers import pipeline

    from hf_soups.demo.data import to_pil_images

    results = json.loads((demo / "results.json").read_text())["results"]
    row = "greedy soup" if folder == "greedy_soup" else _wise_row(results)
    classifier = pipeline("zero-shot-image-classification", model=str(demo / folder))
    outputs = classifier(
        to_pil_images(data.test),
        candidate_labels=DIGITS,
        hypothesis_template=TEMPLATE,
        batch_size=250,
    )
    predictions = np.array([DIGITS.index(out[0]["label"]) for out in outputs])
    labels = data.test[:]["labels"].numpy()
    assert float((predictions == labels).mean()) == results[row]["test"]["score"]

    from hf_soups.evaluation import EvalResult

    saved = EvalResult.load(demo / "predictions" / f"{_slug(row)}__test.json")
    np.testing.assert_array_equal(predictions, saved.predictions)


def _wise_row(results):
    return next(name for name in results if name.startswith("WiSE-FT"))


def _slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def test_greedy_is_never_below_the_best_individual_on_validation(demo):
    trace = json.loads((demo / "greedy_soup" / "soup.json").read_text())["soup"]["greedy_trace"]
    best_individual = max(t["individual_score"] for t in trace)
    final = [t["soup_score"] for t in trace if t["kept"]][-1]
    assert trace[0]["individual_score"] == best_individual
    assert final >= best_individual


# --- the multi-task run ------------------------------------------------------------------------

TASKS = ["mnist", "digits", "parity"]


def test_multitask_folders_are_clip_vision_models(demo):
    for folder in ["pretrained_vision", *(f"finetuned/{t}" for t in TASKS)]:
        path = demo / "multitask" / folder
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == ["CLIPVisionModel"], folder
        assert config["model_type"] == "clip_vision_model"
        weights = load_file(str(path / "model.safetensors"))
        assert all(key.startswith("vision_model.") for key in weights), folder
    clip = load_file(str(demo / "zero_shot" / "model.safetensors"))
    base = load_file(str(demo / "multitask" / "pretrained_vision" / "model.safetensors"))
    for key, tensor in base.items():
        assert torch.equal(tensor, clip[key]), key  # the pre-trained CLIP's own vision tower


def test_multitask_table_rows_columns_and_wilson_intervals(demo):
    record = json.loads((demo / "multitask_results.json").read_text())
    assert record["tasks"] == TASKS
    rows = list(record["results"])
    assert rows[:5] == [
        "pre-trained",
        "fine-tuned on mnist",
        "fine-tuned on digits",
        "fine-tuned on parity",
        "uniform soup",
    ]
    assert rows[5].startswith("task arithmetic (lambda=") and rows[6].startswith("TIES (lambda=")
    z = 1.959963984540054
    for model, per_task in record["results"].items():
        assert set(per_task) == set(TASKS)
        for entry in per_task.values():
            # Wilson's interval by hand.
            n, p = entry["n"], entry["score"]
            centre = (p + z * z / (2 * n)) / (1 + z * z / n)
            half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
            low, high = entry["intervals"]["accuracy"]
            assert low == pytest.approx(centre - half, abs=1e-9)
            assert high == pytest.approx(centre + half, abs=1e-9)
        mean = sum(per_task[t]["score"] for t in TASKS) / 3
        assert record["average"][model] == pytest.approx(mean)
    assert record["results"]["pre-trained"]["parity"]["n"] == 1000
    # Each fine-tune beats the pre-trained model on its own task.
    for task in TASKS:
        own = record["results"][f"fine-tuned on {task}"][task]["score"]
        assert own > record["results"]["pre-trained"][task]["score"]
    table = (demo / "multitask_results.md").read_text()
    assert "| method | mnist | digits | parity | average |" in table


def test_task_arithmetic_row_matches_plain_torch(demo, data, tmp_path, one_thread):
    """Rebuild the task-arithmetic model and the parity head by hand; score it on parity."""
    from transformers import AutoTokenizer, CLIPModel, CLIPVisionModel

    record = json.loads((demo / "multitask_results.json").read_text())
    row = next(name for name in record["results"] if name.startswith("task arithmetic"))
    scaling = record["choices"]["task arithmetic"]["lambda"]
    root = demo / "multitask"
    base = load_file(str(root / "pretrained_vision" / "model.safetensors"))
    tuned = [load_file(str(root / "finetuned" / t / "model.safetensors")) for t in TASKS]
    merged = {
        k: (base[k].double() + scaling * sum(t[k].double() - base[k].double() for t in tuned)).to(
            base[k].dtype
        )
        for k in base
    }
    # Written as the fine-tunes are (vision_model.* keys) and read by transformers' loader.
    shutil.copy(root / "pretrained_vision" / "config.json", tmp_path / "config.json")
    save_file(merged, str(tmp_path / "model.safetensors"))
    vision = CLIPVisionModel.from_pretrained(tmp_path).eval()
    clip = CLIPModel.from_pretrained(demo / "zero_shot").eval()
    tokenizer = AutoTokenizer.from_pretrained(demo / "zero_shot")
    prompts = [f"a photo of an {name} digit" for name in ("even", "odd")]
    with torch.no_grad():
        text = clip.get_text_features(**tokenizer(prompts, return_tensors="pt")).pooler_output
        image = clip.visual_projection(
            vision(pixel_values=data.test[:]["pixel_values"]).pooler_output
        )
    logits = image / image.norm(dim=-1, keepdim=True) @ (text / text.norm(dim=-1, keepdim=True)).T
    parity = data.test[:]["labels"] % 2
    accuracy = (logits.argmax(-1) == parity).double().mean().item()
    assert accuracy == pytest.approx(record["results"][row]["parity"]["score"], abs=0.0015)


def test_demo_refuses_an_existing_output(demo, capsys):
    assert main(["demo", "--fast", "--out", str(demo)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_learned_soup_streams_the_demo_ingredients_to_the_in_memory_fit(demo, data, one_thread):
    """The demo's learned soup fitted from the files (memory="stream") finds the coefficients of
    the in-memory fit (memory="host"), on the demo's own ingredients and held-out images."""
    from hf_soups.builder import SoupBuilder

    task = ZeroShotTask(classnames=DIGITS, templates=[TEMPLATE])
    builder = SoupBuilder.from_pretrained(demo / "ingredients", task=task)
    held_out = data.validation.select(range(256))
    fits = {
        memory: builder.learned(held_out, memory=memory, epochs=1, batch_size=64, progress=False)
        for memory in ("stream", "host")
    }
    streamed, in_memory = (fits[m].weights for m in ("stream", "host"))
    assert streamed == pytest.approx(in_memory, abs=1e-5)
    assert fits["stream"].record.coefficients["options"]["memory"] == "stream"
