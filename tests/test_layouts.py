"""Real Hub checkpoint layouts in, plain transformers / open_clip models out.

Each test rebuilds repos file for file (``hub_layouts.py``) in a Hub cache (``cache_repo``, read
offline by the real ``snapshot_download``), then: resolve them with ``SoupBuilder.from_hub`` →
score with a ``ZeroShotTask`` → greedy soup → ``save_pretrained`` → load the saved folder with the
plain library class or pipeline, whose predictions must be those of hf_soups' ``Evaluator``. The
logits are also recomputed with plain torch from the plain library's model.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import open_clip
import pytest
import torch
from datasets import Array3D, ClassLabel, Dataset, Features
from hub_layouts import (
    OPENAI_NOT_CACHED,
    VIT_LABELS,
    fusion_bench_vision_repo,
    laion_repo,
    open_clip_repo,
    openai_clip_repo,
    perturbed,
    pretrained_clip_state,
    pretrained_open_clip_state,
    pretrained_vit_state,
    vit_repo,
)
from PIL import Image
from test_hub_cache import MAIN, cache_repo
from tiny import assert_matches_reference, load_weights, weighted_reference
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPModel,
    CLIPVisionModel,
    ViTForImageClassification,
    pipeline,
)

from hf_soups.errors import (
    IngredientNotFoundError,
    LabelMismatchError,
    UnsafeCheckpointError,
    WeightsFormatError,
)
from hf_soups.evaluation import Evaluator
from hf_soups.ingredients import Ingredient
from hf_soups.models import ZeroShotTask, load_model
from hf_soups.models.families import DEFAULT_WEIGHTS_FORMAT
from hf_soups.soup import SoupBuilder

CLASSNAMES = ("cat", "dog", "bird")
TEMPLATE = "a photo of the {}."
N_IMAGES = 24


def images(size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        for _ in range(N_IMAGES)
    ]


def eval_set(pixel_values: torch.Tensor, names=CLASSNAMES, seed: int = 0) -> Dataset:
    """pixel_values with random labels, the label column a ClassLabel naming the classes."""
    labels = np.random.default_rng(seed).integers(0, len(names), len(pixel_values))
    features = Features(
        {
            "pixel_values": Array3D(shape=tuple(pixel_values.shape[1:]), dtype="float32"),
            "labels": ClassLabel(names=list(names)),
        }
    )
    data = {"pixel_values": pixel_values.numpy(), "labels": labels.tolist()}
    return Dataset.from_dict(data, features=features).with_format("torch")


def evaluator(dataset: Dataset) -> Evaluator:
    return Evaluator(dataset, batch_size=8, progress=False)


def cached_repos(cache, builders: dict, *, listed=()) -> list[str]:
    """Put each folder (repo id -> built folder) in the cache; return the repo ids."""
    for repo_id, folder in builders.items():
        cache_repo(cache, repo_id, MAIN, sorted(folder.iterdir()), listed=listed)
    return list(builders)


def greedy_soup_folder(builder: SoupBuilder, dataset: Dataset, out):
    # min_gain=-1 keeps every ingredient, so the saved soup is a genuine average.
    soup = builder.greedy(evaluator(dataset), min_gain=-1.0)
    assert len(soup.ingredients) == len(builder.ingredients)
    folder = soup.save_pretrained(out, progress=False)
    reference = weighted_reference([i.path for i in soup.ingredients], soup.weights)
    assert_matches_reference(load_weights(folder), reference)
    return soup, folder


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# --- openai-style CLIPModel repos --------------------------------------------------------------


def test_openai_clip_model_repos_soup_to_a_plain_clip_model(tmp_path, one_thread):
    cache = tmp_path / "hub"
    base = pretrained_clip_state()
    ids = cached_repos(
        cache,
        {
            f"org/clip-ft-{i}": openai_clip_repo(tmp_path / f"ft{i}", perturbed(base, i + 1, 0.1))
            for i in range(3)
        },
        listed=OPENAI_NOT_CACHED,  # in the repo, not in the cache: fetching them would fail
    )
    task = ZeroShotTask(CLASSNAMES, templates=[TEMPLATE], name="pets")
    builder = SoupBuilder.from_hub(ids, cache_dir=cache, task=task)
    first = builder.ingredients[0]
    assert first.family.name == "clip"
    assert {info.file.name for info in first.tensors.values()} == {"model.safetensors"}

    pictures = images(16)
    processor = AutoImageProcessor.from_pretrained(first.path)
    dataset = eval_set(processor(pictures, return_tensors="pt").pixel_values)
    soup, folder = greedy_soup_folder(builder, dataset, tmp_path / "soup")

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"]
    for name in ("preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "soup.json").read_text())["task"] == task.to_dict()

    ours = evaluator(dataset).evaluate(load_model(folder, task=task))
    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    answers = classifier(pictures, candidate_labels=list(CLASSNAMES), hypothesis_template=TEMPLATE)
    assert [CLASSNAMES.index(a[0]["label"]) for a in answers] == ours.predictions.tolist()

    # Logits: CLIP's logits_per_image recomputed from the plain CLIPModel.
    clip = CLIPModel.from_pretrained(folder).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(
        [TEMPLATE.format(c) for c in CLASSNAMES], padding=True, return_tensors="pt"
    )
    pixel_values = dataset[:]["pixel_values"]
    with torch.no_grad():
        text = clip.get_text_features(**tokens).pooler_output
        image = clip.get_image_features(pixel_values=pixel_values).pooler_output
        expected = clip.logit_scale.exp() * unit(image) @ unit(text).T
        got = load_model(folder, task=task)(pixel_values=pixel_values).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- fusion_bench CLIPVisionModel repos ---------------------------------------------------------


def test_fusion_bench_vision_repos_soup_to_a_clip_vision_model(tmp_path, one_thread):
    cache = tmp_path / "hub"
    base = pretrained_clip_state()
    cached_repos(cache, {"openai/clip-vit-base-patch32": openai_clip_repo(tmp_path / "base", base)})
    ids = cached_repos(
        cache,
        {
            f"tanganke/clip-vit-base-patch32_task{i}": fusion_bench_vision_repo(
                tmp_path / f"ft{i}", perturbed(base, i + 1, 0.1)
            )
            for i in range(3)
        },
    )
    task = ZeroShotTask(CLASSNAMES, templates=[TEMPLATE], text_model="openai/clip-vit-base-patch32")
    with pytest.MonkeyPatch.context() as patch:
        # The text model is resolved through the Hub cache like any source.
        patch.setenv("HF_HUB_CACHE", str(cache))
        import huggingface_hub.constants

        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        builder = SoupBuilder.from_hub(ids, cache_dir=cache, task=task)
        first = builder.ingredients[0]
        assert first.family.name == "clip_vision"
        assert all(name.startswith("vision_model.") for name in first.tensors)

        text_folder = Ingredient.from_source("openai/clip-vit-base-patch32", cache_dir=cache).path
        pictures = images(16)
        processor = AutoImageProcessor.from_pretrained(text_folder)
        dataset = eval_set(processor(pictures, return_tensors="pt").pixel_values)
        soup, folder = greedy_soup_folder(builder, dataset, tmp_path / "soup")
        ours = evaluator(dataset).evaluate(load_model(folder, task=task))
        with torch.no_grad():
            in_memory = soup.to_model()(pixel_values=dataset[:]["pixel_values"]).logits

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["CLIPVisionModel"]
    assert all(name.startswith("vision_model.") for name in load_weights(folder))

    # What fusion_bench does, with plain transformers: the soup's tower, the base CLIP's rest.
    vision = CLIPVisionModel.from_pretrained(folder).eval()
    clip = CLIPModel.from_pretrained(text_folder).eval()
    tokens = AutoTokenizer.from_pretrained(text_folder)(
        [TEMPLATE.format(c) for c in CLASSNAMES], padding=True, return_tensors="pt"
    )
    pixel_values = dataset[:]["pixel_values"]
    with torch.no_grad():
        text = clip.get_text_features(**tokens).pooler_output
        image = clip.visual_projection(vision(pixel_values=pixel_values).pooler_output)
        expected = clip.logit_scale.exp() * unit(image) @ unit(text).T
    assert expected.argmax(-1).tolist() == ours.predictions.tolist()
    torch.testing.assert_close(in_memory, expected, rtol=1e-5, atol=1e-5)


# --- open_clip repos -----------------------------------------------------------------------------


def test_open_clip_repos_soup_to_an_open_clip_hub_folder(tmp_path, one_thread):
    cache = tmp_path / "hub"
    base = pretrained_open_clip_state()
    ids = cached_repos(
        cache,
        {
            f"org/open-clip-ft-{i}": open_clip_repo(
                tmp_path / f"ft{i}", perturbed(base, i + 1, 0.1)
            )
            for i in range(3)
        },
        listed=["open_clip_pytorch_model.bin", "README.md"],
    )
    task = ZeroShotTask(CLASSNAMES, templates=[TEMPLATE])
    builder = SoupBuilder.from_hub(ids, cache_dir=cache, task=task)
    assert builder.ingredients[0].family.name == "open_clip"

    _, _, preprocess = open_clip.create_model_and_transforms(
        f"hf-hub:{ids[0]}", cache_dir=str(cache)
    )
    pictures = images(40)
    dataset = eval_set(torch.stack([preprocess(p) for p in pictures]))
    soup, folder = greedy_soup_folder(builder, dataset, tmp_path / "soup")
    assert {p.name for p in folder.glob("*.safetensors")} == {"open_clip_model.safetensors"}
    ours = evaluator(dataset).evaluate(load_model(folder, task=task))

    # Published: the soup folder becomes a repo, read by open_clip's own Hub loader.
    cache_repo(cache, "org/open-clip-soup", MAIN, sorted(folder.iterdir()))
    model, _, preprocess = open_clip.create_model_and_transforms(
        "hf-hub:org/open-clip-soup", cache_dir=str(cache)
    )
    tokenizer = open_clip.get_tokenizer("hf-hub:org/open-clip-soup", cache_dir=str(cache))
    model.eval()
    pixel_values = torch.stack([preprocess(p) for p in pictures])
    with torch.no_grad():
        text = model.encode_text(tokenizer([TEMPLATE.format(c) for c in CLASSNAMES]))
        expected = model.logit_scale.exp() * unit(model.encode_image(pixel_values)) @ unit(text).T
    assert expected.argmax(-1).tolist() == ours.predictions.tolist()
    with torch.no_grad():
        got = load_model(folder, task=task)(pixel_values=pixel_values).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- laion repos holding both formats ------------------------------------------------------------


def _laion_repos(tmp_path, cache, *, listed=()):
    clip_base, open_clip_base = pretrained_clip_state(), pretrained_open_clip_state()
    folders = {
        f"laion/clip-ft-{i}": laion_repo(
            tmp_path / f"laion{i}",
            perturbed(clip_base, i + 1, 0.1),
            perturbed(open_clip_base, i + 11, 0.1),
        )
        for i in range(2)
    }
    for repo_id, folder in folders.items():
        files = [p for p in sorted(folder.iterdir()) if p.name not in listed]
        cache_repo(cache, repo_id, MAIN, files, listed=listed)
    return folders


def test_repos_with_both_formats_are_read_in_one_chosen_format(tmp_path, caplog, one_thread):
    cache = tmp_path / "hub"
    folders = _laion_repos(tmp_path, cache)
    ids = list(folders)
    transformers_keys = set(load_weights_of(folders[ids[0]], "model.safetensors"))
    open_clip_keys = set(load_weights_of(folders[ids[0]], "open_clip_model.safetensors"))
    assert len(transformers_keys & open_clip_keys) == 1  # only "logit_scale" is in both

    assert DEFAULT_WEIGHTS_FORMAT == "transformers"
    with caplog.at_level(logging.INFO, logger="hf_soups.models.families"):
        default = Ingredient.from_source(ids[0], cache_dir=cache)
        Ingredient.from_source(ids[0], cache_dir=cache)
    said = [
        r.getMessage()
        for r in caplog.records
        if "both transformers and open_clip" in r.getMessage()
    ]
    assert len(said) == 1 and "weights_format='open_clip'" in said[0]
    assert default.family.name == "clip" and set(default.tensors) == transformers_keys
    assert default.config == json.loads((folders[ids[0]] / "config.json").read_text())

    chosen = Ingredient.from_source(ids[0], cache_dir=cache, weights_format="open_clip")
    assert chosen.family.name == "open_clip" and set(chosen.tensors) == open_clip_keys
    assert {info.file.name for info in chosen.tensors.values()} == {"open_clip_model.safetensors"}
    for name in open_clip_keys:
        assert torch.equal(
            chosen.read(name), load_weights_of(folders[ids[0]], "open_clip_model.safetensors")[name]
        )

    # Each choice is scored in its own format: the open_clip one with open_clip's text tower.
    task = ZeroShotTask(CLASSNAMES, templates=[TEMPLATE])
    assert type(load_model(default, task=task)).__name__ == "ZeroShotScorer"
    scored = load_model(chosen, task=task)
    assert type(scored).__name__ == "OpenCLIPZeroShotClassifier"
    assert scored.label_names == list(CLASSNAMES)

    # Each choice merges into a folder of that format alone.
    for weights_format, kept, dropped in (
        (
            "transformers",
            {"config.json", "model.safetensors"},
            {"open_clip_config.json", "open_clip_model.safetensors"},
        ),
        (
            "open_clip",
            {"open_clip_config.json", "open_clip_model.safetensors"},
            {"config.json", "model.safetensors"},
        ),
    ):
        builder = SoupBuilder.from_hub(ids, cache_dir=cache, weights_format=weights_format)
        out = builder.uniform().save_pretrained(tmp_path / f"soup-{weights_format}", progress=False)
        names = {p.name for p in out.iterdir()}
        assert kept <= names and not dropped & names, (weights_format, names)
        file = next(iter(kept - {"config.json", "open_clip_config.json"}))
        states = [load_weights_of(folders[i], file) for i in ids]
        merged = load_weights(out)
        assert set(merged) == set(states[0])
        for name, first in states[0].items():
            expected = (first.double() + states[1][name].double()) / 2
            if not first.is_floating_point():
                expected = first
            torch.testing.assert_close(
                merged[name].double(), expected.double(), rtol=1e-6, atol=1e-7
            )

    with pytest.raises(WeightsFormatError, match="weights_format='avro'"):
        Ingredient.from_source(ids[0], cache_dir=cache, weights_format="avro")


def load_weights_of(folder, file_name):
    from safetensors.torch import load_file

    return load_file(folder / file_name)


def test_the_unchosen_format_is_never_fetched(tmp_path):
    cache = tmp_path / "hub"
    open_clip_files = [
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    ]
    # Offline, snapshot_download fails on any wanted file the cache lacks: these are listed only.
    _laion_repos(tmp_path, cache, listed=[*open_clip_files[1:], *OPENAI_NOT_CACHED])
    ingredient = Ingredient.from_source("laion/clip-ft-0", cache_dir=cache)
    assert ingredient.family.name == "clip"
    with pytest.raises(IngredientNotFoundError, match="incomplete.*open_clip_model.safetensors"):
        Ingredient.from_source("laion/clip-ft-0", cache_dir=cache, weights_format="open_clip")


# --- ViT fine-tunes ----------------------------------------------------------------------------


@pytest.mark.parametrize("pickle_only", [False, True], ids=["safetensors", "pickle-only"])
def test_vit_fine_tunes_soup_to_an_image_classification_pipeline(tmp_path, pickle_only, one_thread):
    cache = tmp_path / "hub"
    base = pretrained_vit_state()
    ids = cached_repos(
        cache,
        {
            f"org/vit-ft-{i}": vit_repo(
                tmp_path / f"ft{i}", perturbed(base, i + 1, 0.1), pickle_only=pickle_only
            )
            for i in range(3)
        },
        listed=["training_args.bin", "README.md"],
    )
    if pickle_only:
        with pytest.raises(UnsafeCheckpointError, match="org/vit-ft-0.*pytorch_model.bin"):
            SoupBuilder.from_hub(ids, cache_dir=cache)
    builder = SoupBuilder.from_hub(ids, cache_dir=cache, allow_pickle=pickle_only)
    assert builder.ingredients[0].family.name == "image_classifier"
    assert builder.ingredients[0].pickled is pickle_only

    pictures = images(16)
    processor = AutoImageProcessor.from_pretrained(builder.ingredients[0].path)
    names = [VIT_LABELS[i] for i in range(len(VIT_LABELS))]
    dataset = eval_set(processor(pictures, return_tensors="pt").pixel_values, names=names)
    soup = builder.greedy(evaluator(dataset), min_gain=-1.0)
    folder = soup.save_pretrained(tmp_path / "soup", progress=False)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    if not pickle_only:
        reference = weighted_reference([i.path for i in soup.ingredients], soup.weights)
        assert_matches_reference(load_weights(folder), reference)

    ours = evaluator(dataset).evaluate(load_model(folder))
    answers = pipeline("image-classification", model=str(folder))(pictures, top_k=1)
    assert [names.index(a[0]["label"]) for a in answers] == ours.predictions.tolist()
    plain = ViTForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = plain(pixel_values=dataset[:]["pixel_values"]).logits
        got = load_model(folder)(pixel_values=dataset[:]["pixel_values"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- label checks --------------------------------------------------------------------------------


def test_dataset_classes_must_match_the_task_or_id2label(tmp_path, one_thread):
    folder = openai_clip_repo(tmp_path / "clip", pretrained_clip_state())
    pixel_values = torch.randn(4, 3, 16, 16)
    task = ZeroShotTask(CLASSNAMES)
    shuffled = ("dog", "cat", "bird")
    with pytest.raises(
        LabelMismatchError, match=r"\['dog', 'cat', 'bird'\].*\['cat', 'dog', 'bird'\]"
    ):
        evaluator(eval_set(pixel_values, names=shuffled)).evaluate(load_model(folder, task=task))

    vit = vit_repo(tmp_path / "vit", pretrained_vit_state())
    with pytest.raises(LabelMismatchError, match=r"'dog', 'cat', 'bird'.*'cat', 'dog', 'bird'"):
        evaluator(eval_set(pixel_values, names=shuffled)).evaluate(load_model(vit))
    with pytest.raises(LabelMismatchError, match="task's classnames"):
        load_model(vit, task=ZeroShotTask(shuffled))
    # Matching names, and datasets without ClassLabel names, are scored.
    assert evaluator(eval_set(pixel_values)).evaluate(load_model(vit)).n == 4
    plain = Dataset.from_dict({"pixel_values": pixel_values.numpy(), "labels": [0, 1, 2, 0]})
    assert evaluator(plain.with_format("torch")).evaluate(load_model(folder, task=task)).n == 4


# --- the task reaches every place that scores ----------------------------------------------------


def plain_clip_predictions(folder, pixel_values: torch.Tensor) -> list[int]:
    """argmax of CLIP's logits_per_image with one prompt per class, from the plain CLIPModel."""
    clip = CLIPModel.from_pretrained(folder).eval()
    prompts = [TEMPLATE.format(c) for c in CLASSNAMES]
    tokens = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = clip.get_text_features(**tokens).pooler_output
        image = clip.get_image_features(pixel_values=pixel_values).pooler_output
    return (unit(image) @ unit(text).T).argmax(-1).tolist()


def test_soupability_check_and_learned_soup_score_clip_models_with_the_task(tmp_path, one_thread):
    base = pretrained_clip_state()
    folders = [openai_clip_repo(tmp_path / f"ft{i}", perturbed(base, i + 1, 0.1)) for i in range(2)]
    task = ZeroShotTask(CLASSNAMES, templates=[TEMPLATE])
    builder = SoupBuilder.from_pretrained([str(f) for f in folders], task=task)
    processor = AutoImageProcessor.from_pretrained(folders[0])
    pixel_values = processor(images(16), return_tensors="pt").pixel_values
    dataset = eval_set(pixel_values)
    labels = dataset[:]["labels"].tolist()

    report = builder.check(evaluator(dataset), points=3, loss=False, progress=False)
    (path,) = report.paths
    for t, index in ((0, path.indices[0]), (-1, path.indices[1])):
        predictions = plain_clip_predictions(folders[index], pixel_values)
        expected = np.mean([p == y for p, y in zip(predictions, labels)])
        assert path.scores[t] == pytest.approx(expected)

    soup = builder.learned(dataset, epochs=1, batch_size=8, progress=False)
    assert soup.task == task
    folder = soup.save_pretrained(tmp_path / "learned", progress=False)
    assert_matches_reference(load_weights(folder), weighted_reference(folders, soup.weights))
    ours = evaluator(dataset).evaluate(soup.to_model())
    assert ours.predictions.tolist() == plain_clip_predictions(folder, pixel_values)


def test_yaml_soup_recipe_takes_a_zero_shot_task(tmp_path, one_thread):
    import yaml

    from hf_soups.commands.soup import parse_recipe, run_recipe
    from hf_soups.patching.recipe import RecipeError, load_eval_set

    base = pretrained_clip_state()
    for i in range(2):
        openai_clip_repo(tmp_path / f"ft{i}", perturbed(base, i + 1, 0.1))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "ft0")
    pixel_values = processor(images(16), return_tensors="pt").pixel_values
    dataset = eval_set(pixel_values)
    dataset.save_to_disk(str(tmp_path / "test_data"))
    recipe = {
        "sources": ["ft0", "ft1"],
        "method": "uniform",
        "task": {"classnames": list(CLASSNAMES), "templates": [TEMPLATE]},
        "eval_sets": {"test": {"dataset": "test_data"}},
        "out": "soup",
    }
    file = tmp_path / "soup.yaml"
    file.write_text(yaml.safe_dump({**recipe, "task": {"classnames": ["cat", "cat"]}}))
    with pytest.raises(RecipeError, match="soup.yaml: task: classnames: 'cat' appears more"):
        parse_recipe(file)
    file.write_text(yaml.safe_dump(recipe))
    soup = run_recipe(file)
    assert soup.task == ZeroShotTask(CLASSNAMES, templates=[TEMPLATE])
    folder = tmp_path / "soup"
    assert json.loads((folder / "soup.json").read_text())["task"] == soup.task.to_dict()
    predictions = plain_clip_predictions(folder, pixel_values)
    labels = dataset[:]["labels"].tolist()
    accuracy = np.mean([p == y for p, y in zip(predictions, labels)])
    assert soup.scores["uniform soup"]["test"]["metrics"]["accuracy"] == pytest.approx(accuracy)

    # Eval sets of WiSE-FT / PAINT recipes take the same task mapping.
    spec = {"dataset": "test_data", "task": {**recipe["task"], "text_model": "ft0"}}
    task_spec = load_eval_set(file, "pets", spec, tmp_path)
    assert task_spec.task == ZeroShotTask(
        CLASSNAMES, templates=[TEMPLATE], text_model=str(tmp_path / "ft0")
    )
    with pytest.raises(RecipeError, match="eval_sets.pets: give 'task' or 'classnames'"):
        load_eval_set(file, "pets", {**spec, "classnames": list(CLASSNAMES)}, tmp_path)


def test_wise_ft_sweeps_clip_model_endpoints_with_the_task(tmp_path, one_thread):
    from hf_soups.patching import choose_wise_ft, wise_ft
    from hf_soups.patching.sweep import TaskSpec

    base = pretrained_clip_state()
    zero_shot = openai_clip_repo(tmp_path / "zero_shot", base)
    fine_tuned = openai_clip_repo(tmp_path / "fine_tuned", perturbed(base, 1, 0.3))
    task = ZeroShotTask(CLASSNAMES, templates=[TEMPLATE])
    processor = AutoImageProcessor.from_pretrained(zero_shot)
    pixel_values = processor(images(16), return_tensors="pt").pixel_values
    dataset = eval_set(pixel_values)
    labels = dataset[:]["labels"].tolist()

    result = choose_wise_ft(
        zero_shot,
        fine_tuned,
        in_distribution={"id": TaskSpec(evaluator(dataset), task=task)},
        alphas=[0.0, 0.5, 1.0],
        progress=False,
    )
    for index, folder in ((0, zero_shot), (2, fine_tuned)):
        predictions = plain_clip_predictions(folder, pixel_values)
        assert result.sweep.results["id"][index].predictions.tolist() == predictions
    middle = wise_ft(zero_shot, fine_tuned, 0.5, out_dir=tmp_path / "mid", progress=False)
    in_memory = wise_ft(zero_shot, fine_tuned, 0.5, task=task)
    with torch.no_grad():
        predicted = in_memory(pixel_values=pixel_values).logits.argmax(-1).tolist()
    assert predicted == plain_clip_predictions(middle, pixel_values)
    assert result.sweep.results["id"][1].predictions.tolist() == predicted
    assert 0 <= result.sweep.scores["id"][1] == np.mean([p == y for p, y in zip(predicted, labels)])
