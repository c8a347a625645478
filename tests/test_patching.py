"""WiSE-FT and PAINT: interpolation exactness, the alpha choice, head swaps, plots and the CLI.

References are independent of hf_soups' arithmetic: float64 torch sums over weights read with
safetensors itself (tests/tiny.py), accuracies computed with plain torch, choices worked out by
hand or by a brute-force loop written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from datasets import Array3D, Dataset, Features, Value
from safetensors.torch import load_file
from tiny import (
    assert_matches_reference,
    load_weights,
    make_clip_folder,
    make_vit_folder,
    weighted_reference,
)
from transformers import AutoTokenizer, CLIPModel

from hf_soups.cli import main
from hf_soups.errors import IncompatibleIngredientsError
from hf_soups.evaluation import Evaluator
from hf_soups.merge import merge
from hf_soups.models import UnsupportedArchitectureError, load_model
from hf_soups.models.clip import CLIPZeroShotClassifier
from hf_soups.patching import (
    PLOT_FILE,
    Endpoints,
    TaskSpec,
    choose_alpha,
    choose_wise_ft,
    parse_alphas,
    patch,
    sweep,
    wise_ft,
)
from hf_soups.patching.recipe import RecipeError
from hf_soups.recipe import Recipe

PATCH_CLASSES = ["cat", "dog", "bird"]
PATCH_TEMPLATES = ["a photo of a {}"]
SUPPORTED_CLASSES = ["dog", "bird"]
SUPPORTED_TEMPLATES = ["a drawing of a {}"]
IMAGE_SHAPE = (3, 16, 16)


# -- tiny models and data ------------------------------------------------------------------


def _zero_shot(tmp: Path) -> Path:
    """A CLIPZeroShotClassifier folder (head for PATCH_CLASSES) with its tokenizer."""
    clip_dir = make_clip_folder(tmp / "clip", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    model = CLIPZeroShotClassifier.from_clip(
        CLIPModel.from_pretrained(clip_dir),
        tokenizer,
        PATCH_CLASSES,
        PATCH_TEMPLATES,
        progress=False,
    )
    folder = tmp / "zero_shot"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _fine_tune(zero_shot: Path, out: Path, *, seed: int, paint: bool, steps: int = 3) -> Path:
    """Train a few SGD steps on random images. ``paint``: text tower and head frozen, as PAINT
    fine-tunes; otherwise everything moves (as a WiSE-FT run that also trains the head)."""
    model = CLIPZeroShotClassifier.from_pretrained(zero_shot).train()
    if paint:
        model.freeze_text_tower()
        model.classifier.requires_grad_(False)
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        images = torch.randn(16, *IMAGE_SHAPE, generator=generator)
        labels = torch.randint(0, len(PATCH_CLASSES), (16,), generator=generator)
        logits = model(pixel_values=images).logits
        loss = F.cross_entropy(logits, labels)
        if not paint:  # make the text tower's parameters move too
            loss = loss + sum(p.square().sum() for p in model.clip.text_model.parameters()) * 1e-3
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(out)
    return out


def _dataset(seed: int, n: int = 48, num_classes: int = 3) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, *IMAGE_SHAPE, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    features = Features(
        {"pixel_values": Array3D(shape=IMAGE_SHAPE, dtype="float32"), "labels": Value("int64")}
    )
    return Dataset.from_dict(
        {"pixel_values": images.numpy(), "labels": labels.numpy()}, features=features
    )


def _evaluator(dataset: Dataset, name: str) -> Evaluator:
    return Evaluator(dataset, batch_size=16, name=name, progress=False, n_resamples=0)


def _plain_accuracy(model: torch.nn.Module, dataset: Dataset) -> tuple[float, np.ndarray]:
    """Accuracy and predictions by plain torch, without the Evaluator."""
    images = torch.tensor(np.asarray(dataset["pixel_values"]), dtype=torch.float32)
    labels = torch.tensor(dataset["labels"])
    with torch.no_grad():
        predictions = model.eval()(pixel_values=images).logits.argmax(dim=-1)
    return int((predictions == labels).sum()) / len(labels), predictions.numpy()


def _reference_model(folders: list[Path], weights: list[float]) -> CLIPZeroShotClassifier:
    """The float64 reference interpolation, cast to float32 and loaded without hf_soups."""
    reference = weighted_reference(folders, weights)
    state = {k: v.float() if v.is_floating_point() else v for k, v in reference.items()}
    template = CLIPZeroShotClassifier.from_pretrained(folders[0])
    template.load_state_dict(state)
    return template.eval()


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("patching_models")
    zero_shot = _zero_shot(tmp)
    return {
        "zero_shot": zero_shot,
        "fine_tuned": _fine_tune(zero_shot, tmp / "fine_tuned", seed=1, paint=False),
        "fine_tuned_2": _fine_tune(zero_shot, tmp / "fine_tuned_2", seed=2, paint=False),
        "paint": _fine_tune(zero_shot, tmp / "paint", seed=3, paint=True),
    }


# -- interpolation --------------------------------------------------------------------------


def test_endpoints_reproduced_bitwise(clip_models, tmp_path):
    zero_shot, fine_tuned = clip_models["zero_shot"], clip_models["fine_tuned"]
    endpoints = Endpoints(zero_shot, fine_tuned)
    for alpha, expected_folder in ((0.0, zero_shot), (1.0, fine_tuned)):
        expected = load_weights(expected_folder)
        folder = wise_ft(
            zero_shot, fine_tuned, alpha, out_dir=tmp_path / f"a{alpha}", progress=False
        )
        for got in (load_weights(folder), endpoints.state_dict(alpha)):
            assert got.keys() == expected.keys()
            for name, tensor in expected.items():
                assert got[name].dtype == tensor.dtype, name
                assert torch.equal(got[name], tensor), f"alpha={alpha}: {name} differs"


@pytest.mark.parametrize("alpha", [0.3, 0.75])
def test_interpolation_matches_float64_reference(clip_models, tmp_path, alpha):
    zero_shot, fine_tuned = clip_models["zero_shot"], clip_models["fine_tuned"]
    reference = weighted_reference([zero_shot, fine_tuned], [1 - alpha, alpha])
    folder = wise_ft(zero_shot, fine_tuned, alpha, out_dir=tmp_path / "out", progress=False)
    on_disk = load_weights(folder)
    assert_matches_reference(on_disk, reference)
    # The sweep's in-memory weights are the very bits later written for the chosen alpha.
    in_memory = Endpoints(zero_shot, fine_tuned).state_dict(alpha)
    assert all(torch.equal(in_memory[name], on_disk[name]) for name in on_disk)
    # In memory, wise_ft returns the model holding those weights.
    model = wise_ft(zero_shot, fine_tuned, alpha)
    assert isinstance(model, CLIPZeroShotClassifier)
    assert torch.equal(model.classifier.weight.detach(), on_disk["classifier.weight"])
    assert torch.equal(
        model.clip.vision_model.embeddings.patch_embedding.weight.detach(),
        on_disk["clip.vision_model.embeddings.patch_embedding.weight"],
    )


def test_half_precision_endpoints(tmp_path):
    zero_shot = make_clip_folder(tmp_path / "zs", seed=0, dtype=torch.float16)
    fine_tuned = make_clip_folder(tmp_path / "ft", seed=1, dtype=torch.float16)
    folder = wise_ft(zero_shot, fine_tuned, 0.4, out_dir=tmp_path / "out", progress=False)
    merged = load_weights(folder)
    assert merged["logit_scale"].dtype == torch.float16
    # float32 accumulation, one float16 rounding at the end: within half an fp16 ulp.
    assert_matches_reference(
        merged, weighted_reference([zero_shot, fine_tuned], [0.6, 0.4]), rel_tol=1e-3
    )
    for alpha, source in ((0.0, zero_shot), (1.0, fine_tuned)):
        out = wise_ft(zero_shot, fine_tuned, alpha, out_dir=tmp_path / f"e{alpha}", progress=False)
        expected = load_weights(source)
        assert all(torch.equal(load_weights(out)[k], v) for k, v in expected.items())


def test_heads_are_interpolated(clip_models, tmp_path):
    zero_shot, fine_tuned = clip_models["zero_shot"], clip_models["fine_tuned"]
    head_0 = load_file(zero_shot / "model.safetensors")["classifier.weight"].double()
    head_1 = load_file(fine_tuned / "model.safetensors")["classifier.weight"].double()
    assert not torch.allclose(head_0, head_1), "fine-tuning should have moved the head"
    folder = wise_ft(zero_shot, fine_tuned, 0.5, out_dir=tmp_path / "out", progress=False)
    model = load_model(folder)
    head = model.classifier.weight.detach().double()
    torch.testing.assert_close(head, 0.5 * head_0 + 0.5 * head_1, rtol=0, atol=1e-6)
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "bird"}


def test_frozen_tensors_stay_bitwise(clip_models):
    """PAINT fine-tuning leaves the text tower and head as they were: every alpha keeps them
    exactly, so heads built from the patched model are the zero-shot heads."""
    zero_shot, paint = clip_models["zero_shot"], clip_models["paint"]
    theta_0, theta_1 = load_weights(zero_shot), load_weights(paint)
    frozen = {k for k in theta_0 if torch.equal(theta_0[k], theta_1[k])}
    assert "classifier.weight" in frozen and "clip.logit_scale" in frozen
    assert any(k.startswith("clip.text_model.") for k in frozen)
    assert any(k.startswith("clip.vision_model.") for k in theta_0.keys() - frozen)
    state = Endpoints(zero_shot, paint).state_dict(0.3)
    assert all(torch.equal(state[k], theta_0[k]) for k in frozen)


def test_mismatched_models_raise_clear_error(clip_models, tmp_path):
    other_clip = make_clip_folder(tmp_path / "clip", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(other_clip)
    four_classes = CLIPZeroShotClassifier.from_clip(
        CLIPModel.from_pretrained(other_clip),
        tokenizer,
        ["cat", "dog", "bird", "a"],
        ["{}"],
        progress=False,
    )
    four_classes.save_pretrained(tmp_path / "four")
    with pytest.raises(IncompatibleIngredientsError, match="classifier.weight"):
        wise_ft(clip_models["zero_shot"], tmp_path / "four", 0.5)
    vit = make_vit_folder(tmp_path / "vit", seed=0)
    with pytest.raises(IncompatibleIngredientsError, match="architecture"):
        wise_ft(clip_models["zero_shot"], vit, 0.5, out_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(IncompatibleIngredientsError, match="architecture"):
        sweep(clip_models["zero_shot"], vit, [0.5], {"x": lambda model: 0.0})


def test_soup_as_fine_tuned_end(clip_models, tmp_path):
    """A soup folder (here a uniform soup of two fine-tuned runs) is the fine-tuned end."""
    zero_shot = clip_models["zero_shot"]
    ingredients = [clip_models["fine_tuned"], clip_models["fine_tuned_2"]]
    soup = merge(ingredients, tmp_path / "soup", progress=False)
    folder = wise_ft(zero_shot, soup, 0.5, out_dir=tmp_path / "wise", progress=False)
    reference = weighted_reference([zero_shot, *ingredients], [0.5, 0.25, 0.25])
    assert_matches_reference(load_weights(folder), reference)
    recipe = json.loads((folder / "soup.json").read_text())
    assert recipe["method"] == "wise_ft" and recipe["parameters"] == {"alpha": 0.5}
    assert recipe["patch"]["zero_shot"]["source"] == str(zero_shot)
    assert recipe["patch"]["fine_tuned"]["source"] == str(soup)
    assert recipe["patch"]["fine_tuned"]["recipe"]["method"] == "weighted_average"
    assert len(recipe["patch"]["fine_tuned"]["recipe"]["ingredients"]) == 2


def test_open_clip_interpolation_includes_head(tmp_path):
    from tiny_open_clip import make_tiny_open_clip_folder

    zero_shot = make_tiny_open_clip_folder(tmp_path / "zs", seed=0)
    fine_tuned = make_tiny_open_clip_folder(tmp_path / "ft", seed=1)
    folder = wise_ft(zero_shot, fine_tuned, 0.25, out_dir=tmp_path / "out", progress=False)
    assert {p.name for p in folder.glob("*.safetensors")} == {
        "open_clip_model.safetensors",
        "classifier.safetensors",
    }
    reference = weighted_reference([zero_shot, fine_tuned], [0.75, 0.25])
    assert_matches_reference(load_weights(folder), reference)
    model = load_model(folder)
    torch.testing.assert_close(
        model.classifier.weight.detach().double(), reference["classifier.weight"], rtol=0, atol=1e-6
    )


# -- choosing alpha -------------------------------------------------------------------------

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
TABLE = {
    "patch": [0.20, 0.50, 0.70, 0.80, 0.85],
    "s1": [0.90, 0.90, 0.88, 0.80, 0.60],
    "s2": [0.80, 0.81, 0.78, 0.70, 0.50],
}


def test_average_rule_hand_computed():
    # (patch + (s1 + s2) / 2) / 2 per alpha: 0.525, 0.6775, 0.765, 0.775, 0.7 -> alpha 0.75.
    choice = choose_alpha(ALPHAS, TABLE, target=["patch"], preserve=["s1", "s2"])
    assert choice.alpha == 0.75 and choice.rule == "average"
    assert choice.objective == pytest.approx((0.525, 0.6775, 0.765, 0.775, 0.7))
    # Without preserve sets the rule is the target score alone: alpha 1.
    assert choose_alpha(ALPHAS, TABLE, target=["patch"]).alpha == 1.0


def test_max_drop_rule_hand_computed():
    # Drops vs alpha=0 (s1, s2): 0.25: (0, -0.01), 0.5: (0.02, 0.02), 0.75: (0.1, 0.1), 1: big.
    at_most_2 = choose_alpha(ALPHAS, TABLE, target=["patch"], preserve=["s1", "s2"], max_drop=0.02)
    assert at_most_2.alpha == 0.5 and at_most_2.feasible == (True, True, True, False, False)
    at_most_1 = choose_alpha(ALPHAS, TABLE, target=["patch"], preserve=["s1", "s2"], max_drop=0.01)
    assert at_most_1.alpha == 0.25
    # The bound holds per supported task: a mean drop within it does not suffice.
    uneven = {"patch": [0.1, 0.9], "s1": [0.9, 0.97], "s2": [0.9, 0.85]}
    assert (
        choose_alpha(
            [0.0, 1.0], uneven, target=["patch"], preserve=["s1", "s2"], max_drop=0.02
        ).alpha
        == 0.0
    )
    with pytest.raises(ValueError, match="alpha=0"):
        choose_alpha(
            [0.5, 1.0],
            {"patch": [0, 1], "s1": [1, 1]},
            target=["patch"],
            preserve=["s1"],
            max_drop=0.1,
        )


def test_choice_matches_brute_force_and_breaks_ties_low():
    rng = np.random.default_rng(0)
    alphas = [i / 10 for i in range(11)]
    for _ in range(50):
        table = {name: list(rng.integers(0, 6, size=11) / 5) for name in ("p", "a", "b")}
        best, best_alpha = -1.0, None
        for i, alpha in enumerate(alphas):  # ascending, strict > keeps the lowest alpha on ties
            value = (table["p"][i] + (table["a"][i] + table["b"][i]) / 2) / 2
            if value > best + 1e-12:
                best, best_alpha = value, alpha
        assert choose_alpha(alphas, table, target=["p"], preserve=["a", "b"]).alpha == best_alpha


def test_choice_rejects_bad_groups():
    with pytest.raises(ValueError, match="both"):
        choose_alpha(ALPHAS, TABLE, target=["patch"], preserve=["patch"])
    with pytest.raises(KeyError, match="nope"):
        choose_alpha(ALPHAS, TABLE, target=["nope"])


def test_parse_alphas():
    assert parse_alphas("0:1:0.1") == [i / 10 for i in range(11)]
    assert parse_alphas("0,0.5,1") == [0.0, 0.5, 1.0]
    assert parse_alphas("0:1:0.4") == [0.0, 0.4, 0.8]
    for bad in ("1:0:0.1", "0:1:0", "a,b"):
        with pytest.raises(RecipeError):
            parse_alphas(bad)


# -- sweeps, PAINT head swaps, plots --------------------------------------------------------


@pytest.fixture(scope="module")
def eval_data() -> dict[str, Dataset]:
    return {
        "id": _dataset(10),
        "shifted": _dataset(11),
        "supported": _dataset(12, num_classes=len(SUPPORTED_CLASSES)),
    }


def test_sweep_scores_match_plain_evaluation(clip_models, eval_data):
    zero_shot, fine_tuned = clip_models["zero_shot"], clip_models["fine_tuned"]
    alphas = [0.0, 0.5, 1.0]
    result = sweep(
        zero_shot,
        fine_tuned,
        alphas,
        {"id": _evaluator(eval_data["id"], "id"), "shifted": lambda model: 0.25},
        progress=False,
    )
    assert result.alphas == alphas and result.scores["shifted"] == [0.25] * 3
    # Endpoints are exact, so plain-torch accuracy of the two source models is the reference.
    for alpha, folder in ((0.0, zero_shot), (1.0, fine_tuned)):
        accuracy, predictions = _plain_accuracy(load_model(folder), eval_data["id"])
        swept = result.results["id"][alphas.index(alpha)]
        assert swept.score == accuracy
        assert np.array_equal(swept.predictions, predictions)
    accuracy, _ = _plain_accuracy(
        _reference_model([zero_shot, fine_tuned], [0.5, 0.5]), eval_data["id"]
    )
    assert abs(result.score("id", 0.5) - accuracy) <= 1 / len(eval_data["id"])
    assert "alpha" in result.table() and result.to_dict()["scores"]["shifted"] == [0.25] * 3


def test_paint_head_swap_keeps_supported_task_zero_shot(clip_models, eval_data, tmp_path):
    zero_shot, paint_model = clip_models["zero_shot"], clip_models["paint"]
    tokenizer = AutoTokenizer.from_pretrained(zero_shot)
    supported_task = TaskSpec(
        _evaluator(eval_data["supported"], "supported"),
        classnames=SUPPORTED_CLASSES,
        templates=SUPPORTED_TEMPLATES,
        tokenizer=tokenizer,
    )
    result = patch(
        zero_shot,
        paint_model,
        supported={"supported": supported_task},
        patching={"id": _evaluator(eval_data["id"], "id")},
        alphas=[0.0, 0.5, 1.0],
        progress=False,
    )
    # The zero-shot model of the supported task, built independently from the CLIP weights.
    clip = CLIPModel.from_pretrained(clip_models["zero_shot"].parent / "clip")
    reference = CLIPZeroShotClassifier.from_clip(
        clip, tokenizer, SUPPORTED_CLASSES, SUPPORTED_TEMPLATES, progress=False
    )
    reference_accuracy, reference_predictions = _plain_accuracy(reference, eval_data["supported"])
    at_zero = result.sweep.results["supported"][0]
    assert np.array_equal(at_zero.predictions, reference_predictions)
    assert at_zero.score == reference_accuracy
    # At alpha=1 the supported task is scored with its own head on the fine-tuned image tower.
    fine_tuned = CLIPZeroShotClassifier.from_pretrained(paint_model)
    fine_tuned.set_head(reference.classifier.weight.detach(), SUPPORTED_CLASSES)
    accuracy, predictions = _plain_accuracy(fine_tuned, eval_data["supported"])
    assert np.array_equal(result.sweep.results["supported"][2].predictions, predictions)
    # The patching task keeps the model's own (frozen zero-shot) head.
    accuracy, _ = _plain_accuracy(load_model(paint_model), eval_data["id"])
    assert result.sweep.scores["id"][2] == accuracy

    # The saved patched model still classifies the supported task zero-shot: its text tower
    # builds exactly the zero-shot head.
    folder = result.save_pretrained(tmp_path / "patched", progress=False)
    # The chosen model's scores are recorded under the name its recipe (and card) give it.
    recipe = Recipe.load(folder)
    assert recipe.name == f"PAINT alpha={result.alpha:g}" and recipe.name in recipe.scores
    patched = load_model(folder)
    head = patched.build_head(tokenizer, SUPPORTED_CLASSES, SUPPORTED_TEMPLATES, progress=False)
    # Bit for bit: the text tower is the zero-shot model's, so the head built from it is the
    # head the zero-shot model builds (on the same code path; the independent reference above,
    # built through CLIPModel's own attention, agrees to float rounding).
    saved, original = load_weights(folder), load_weights(zero_shot)
    text_tensors = [name for name in original if "text" in name or name.endswith("logit_scale")]
    assert text_tensors and all(torch.equal(saved[n], original[n]) for n in text_tensors)
    zero_shot_head = load_model(zero_shot).build_head(
        tokenizer, SUPPORTED_CLASSES, SUPPORTED_TEMPLATES, progress=False
    )
    assert torch.equal(head, zero_shot_head)
    torch.testing.assert_close(head, reference.classifier.weight.detach(), rtol=1e-6, atol=1e-5)
    patched.set_head(head, SUPPORTED_CLASSES)
    _, predictions = _plain_accuracy(patched, eval_data["supported"])
    assert np.array_equal(
        result.sweep.results["supported"][result.choice.index].predictions, predictions
    )


def test_head_rebuilt_when_text_tower_changes(clip_models, eval_data):
    """When fine-tuning moved the text tower, each alpha's head comes from its own text tower."""
    zero_shot, fine_tuned = clip_models["zero_shot"], clip_models["fine_tuned"]
    tokenizer = AutoTokenizer.from_pretrained(zero_shot)
    task = TaskSpec(
        _evaluator(eval_data["supported"], "supported"),
        classnames=SUPPORTED_CLASSES,
        templates=SUPPORTED_TEMPLATES,
        tokenizer=tokenizer,
    )
    result = sweep(zero_shot, fine_tuned, [0.0, 1.0], {"supported": task}, progress=False)
    model = CLIPZeroShotClassifier.from_pretrained(fine_tuned)
    zero_shot_head = CLIPZeroShotClassifier.from_pretrained(zero_shot).build_head(
        tokenizer, SUPPORTED_CLASSES, SUPPORTED_TEMPLATES, progress=False
    )
    own_head = model.build_head(tokenizer, SUPPORTED_CLASSES, SUPPORTED_TEMPLATES, progress=False)
    assert not torch.equal(own_head, zero_shot_head)
    model.set_head(own_head, SUPPORTED_CLASSES)
    _, predictions = _plain_accuracy(model, eval_data["supported"])
    assert np.array_equal(result.results["supported"][1].predictions, predictions)


def test_head_swap_needs_clip_classifier(tmp_path, eval_data):
    zero_shot = make_vit_folder(tmp_path / "a", seed=0)
    fine_tuned = make_vit_folder(tmp_path / "b", seed=1)
    task = TaskSpec(lambda m: 0.0, classnames=["a"], templates=["{}"], tokenizer=object())
    with pytest.raises(UnsupportedArchitectureError, match="build_head"):
        sweep(zero_shot, fine_tuned, [0.5], {"task": task}, progress=False)
    with pytest.raises(ValueError, match="templates"):
        TaskSpec(lambda m: 0.0, classnames=["a"])


def test_wise_ft_selection_saves_curve_and_plot(clip_models, eval_data, tmp_path):
    zero_shot, fine_tuned = clip_models["zero_shot"], clip_models["fine_tuned"]
    result = choose_wise_ft(
        zero_shot,
        fine_tuned,
        in_distribution={"id": _evaluator(eval_data["id"], "id")},
        shifted={"shifted": _evaluator(eval_data["shifted"], "shifted")},
        alphas=[0.0, 0.25, 0.5, 0.75, 1.0],
        progress=False,
    )
    scores = result.sweep.scores
    objective = [(scores["id"][i] + scores["shifted"][i]) / 2 for i in range(5)]
    assert result.alpha == result.sweep.alphas[int(np.argmax(objective))]
    folder = result.save_pretrained(tmp_path / "chosen", progress=False)
    plot = folder / PLOT_FILE
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    recipe = json.loads((folder / "soup.json").read_text())
    assert recipe["method"] == "wise_ft" and recipe["parameters"] == {"alpha": result.alpha}
    assert recipe["patch"]["chosen_alpha"] == result.alpha and recipe["plots"] == [PLOT_FILE]
    assert recipe["patch"]["sweep"]["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert recipe["patch"]["sweep"]["scores"] == scores
    assert recipe["patch"]["selection"]["target"] == ["id"] and recipe["patch"]["selection"][
        "preserve"
    ] == ["shifted"]
    assert {"zero-shot", "fine-tuned"} <= recipe["scores"].keys()
    assert recipe["patch"]["zero_shot"]["source"] == str(zero_shot)
    reference = weighted_reference([zero_shot, fine_tuned], [1 - result.alpha, result.alpha])
    assert_matches_reference(load_weights(folder), reference)
    assert (folder / "tokenizer.json").is_file()  # processor files travel with the model


# -- command line ---------------------------------------------------------------------------


def _save_datasets(eval_data: dict[str, Dataset], root: Path) -> None:
    for name, dataset in eval_data.items():
        dataset.save_to_disk(str(root / "data" / name))


def test_cli_alpha(clip_models, tmp_path, capsys):
    zero_shot, fine_tuned = clip_models["zero_shot"], clip_models["fine_tuned"]
    out = tmp_path / "out"
    assert (
        main(
            ["-q", "wise-ft", str(zero_shot), str(fine_tuned), "--alpha", "0.25", "--out", str(out)]
        )
        == 0
    )
    assert_matches_reference(
        load_weights(out), weighted_reference([zero_shot, fine_tuned], [0.75, 0.25])
    )
    assert json.loads((out / "soup.json").read_text())["parameters"] == {"alpha": 0.25}
    # Refuses to overwrite; --sweep needs --recipe; mismatched models name the tensor.
    assert (
        main(
            ["-q", "wise-ft", str(zero_shot), str(fine_tuned), "--alpha", "0.5", "--out", str(out)]
        )
        == 2
    )
    assert (
        main(
            [
                "-q",
                "wise-ft",
                str(zero_shot),
                str(fine_tuned),
                "--sweep",
                "0:1:0.5",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "--recipe" in capsys.readouterr().err


def test_cli_sweep_with_recipe(clip_models, eval_data, tmp_path, capsys):
    zero_shot, fine_tuned = clip_models["zero_shot"], clip_models["fine_tuned"]
    _save_datasets(eval_data, tmp_path)
    recipe = {
        "eval_sets": {
            "id": {"dataset": "data/id", "batch_size": 16},
            "shifted": {"dataset": "data/shifted"},
        },
        "select": {"id": "id", "shifted": ["shifted"]},
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "chosen"
    argv = [
        "-q",
        "wise-ft",
        str(zero_shot),
        str(fine_tuned),
        "--sweep",
        "0:1:0.5",
        "--recipe",
        str(tmp_path / "eval.yaml"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    record = json.loads((out / "soup.json").read_text())
    scores = record["patch"]["sweep"]["scores"]
    assert record["patch"]["sweep"]["alphas"] == [0.0, 0.5, 1.0]
    for i, folder in ((0, zero_shot), (2, fine_tuned)):
        for name in ("id", "shifted"):
            assert scores[name][i] == _plain_accuracy(load_model(folder), eval_data[name])[0]
    objective = [(scores["id"][i] + scores["shifted"][i]) / 2 for i in range(3)]
    expected_alpha = [0.0, 0.5, 1.0][int(np.argmax(objective))]
    assert record["patch"]["chosen_alpha"] == expected_alpha
    assert (out / PLOT_FILE).is_file()
    assert f"alpha={expected_alpha:g}" in capsys.readouterr().out


def test_cli_patch_recipe(clip_models, eval_data, tmp_path):
    _save_datasets(eval_data, tmp_path)
    recipe = {
        "zero_shot": str(clip_models["zero_shot"]),
        "fine_tuned": str(clip_models["paint"]),
        "out": "patched",
        "alphas": [0, 0.5, 1],
        "eval_sets": {
            "id": {"dataset": "data/id"},
            "supported": {
                "dataset": "data/supported",
                "classnames": SUPPORTED_CLASSES,
                "templates": SUPPORTED_TEMPLATES,
            },
        },
        "select": {"patching": ["id"], "supported": ["supported"], "max_drop": 0.0},
    }
    (tmp_path / "patch.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["-q", "patch", str(tmp_path / "patch.yaml")]) == 0
    record = json.loads((tmp_path / "patched" / "soup.json").read_text())
    scores = record["patch"]["sweep"]["scores"]
    assert record["patch"]["kind"] == "paint" and record["patch"]["selection"]["rule"] == "max_drop"
    # Brute force: best patching score among alphas losing nothing on the supported task.
    feasible = [i for i in range(3) if scores["supported"][i] >= scores["supported"][0]]
    best = max(scores["id"][i] for i in feasible)
    assert record["patch"]["chosen_alpha"] == min(
        [0.0, 0.5, 1.0][i] for i in feasible if scores["id"][i] == best
    )
    # Recipe errors name the file and the key.
    recipe["select"] = {"patching": ["missing"]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["-q", "patch", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()


def test_open_clip_paint_heads_are_zero_shot_heads(tmp_path):
    """open_clip: with only ``visual.*`` fine-tuned, every alpha's swapped-in head is the
    zero-shot head of that task, built independently."""
    from safetensors.torch import save_file
    from tiny_open_clip import make_tiny_open_clip_folder, tiny_tokenizer

    zero_shot = make_tiny_open_clip_folder(tmp_path / "zs", seed=0)
    fine_tuned = tmp_path / "ft"
    fine_tuned.mkdir()
    generator = torch.Generator().manual_seed(1)
    for file in zero_shot.iterdir():
        if file.name == "open_clip_model.safetensors":
            state = {
                k: v + 0.05 * torch.randn(v.shape, generator=generator)
                if k.startswith("visual.")
                else v
                for k, v in load_file(file).items()
            }
            save_file(state, fine_tuned / file.name)
        else:
            (fine_tuned / file.name).write_bytes(file.read_bytes())
    seen = []
    task = TaskSpec(
        lambda model: seen.append(model.classifier.weight.detach().clone()) or 0.0,
        classnames=SUPPORTED_CLASSES,
        templates=SUPPORTED_TEMPLATES,
        tokenizer=tiny_tokenizer(),
    )
    sweep(zero_shot, fine_tuned, [0.0, 0.5, 1.0], {"supported": task}, progress=False)
    expected = load_model(zero_shot).build_head(
        tiny_tokenizer(), SUPPORTED_CLASSES, SUPPORTED_TEMPLATES, progress=False
    )
    assert len(seen) == 3 and all(torch.equal(head, expected) for head in seen)


def test_example_recipe_is_valid(clip_models, tmp_path):
    """recipes/wise_ft_example.yaml parses, with datasets at the paths it names."""
    from hf_soups.patching import load_eval_recipe

    example = Path(__file__).resolve().parents[1] / "recipes" / "wise_ft_example.yaml"
    raw = yaml.safe_load(example.read_text())
    for spec in raw["eval_sets"].values():
        _dataset(0, n=4).save_to_disk(str(tmp_path / spec["dataset"]))
    copy = tmp_path / "eval.yaml"
    copy.write_text(example.read_text())
    recipe = load_eval_recipe(copy, zero_shot=clip_models["zero_shot"], progress=False)
    assert recipe.target == ["id"] and recipe.preserve == ["rotated", "inverted", "digits"]
    assert recipe.eval_sets["digits"].swaps_head and not recipe.eval_sets["id"].swaps_head
    assert recipe.alphas == [i / 10 for i in range(11)] and recipe.max_drop is None


def test_wise_ft_max_shifted_drop_bounds_the_loss_on_shifts(tmp_path):
    """Scores written as functions of alpha: in distribution alpha, shifted 1 - alpha. The
    average rule is indifferent (ties go to the smallest alpha, 0); allowing a shifted drop of
    0.3 makes alpha = 0.25 the best feasible in-distribution score."""
    zero_shot = make_vit_folder(tmp_path / "zero_shot", seed=0)
    fine_tuned = make_vit_folder(tmp_path / "fine_tuned", seed=1)
    start = load_weights(zero_shot)["classifier.weight"]
    span = (load_weights(fine_tuned)["classifier.weight"] - start).norm()

    def alpha_of(model) -> float:
        return round(float((model.classifier.weight.detach() - start).norm() / span), 6)

    def choose(**options) -> float:
        return choose_wise_ft(
            zero_shot,
            fine_tuned,
            in_distribution={"id": alpha_of},
            shifted={"shift": lambda model: 1.0 - alpha_of(model)},
            alphas=[0.0, 0.25, 0.5, 0.75, 1.0],
            progress=False,
            **options,
        ).alpha

    assert choose() == 0.0
    assert choose(max_shifted_drop=0.3) == 0.25
    assert choose(max_shifted_drop=1.0) == 1.0


def test_an_alpha_outside_zero_one_is_warned_about_once(tmp_path, caplog):
    zero_shot = make_vit_folder(tmp_path / "zero_shot", seed=0)
    fine_tuned = make_vit_folder(tmp_path / "fine_tuned", seed=1)
    with caplog.at_level("WARNING"):
        folder = wise_ft(zero_shot, fine_tuned, 1.5, out_dir=tmp_path / "out", progress=False)
    assert sum("outside [0, 1]" in r.getMessage() for r in caplog.records) == 1
    reference = weighted_reference([zero_shot, fine_tuned], [-0.5, 1.5])
    assert_matches_reference(load_weights(folder), reference)
