"""hf_soups.models: zero-shot heads, CLIP / open_clip / ViT classifiers, folder loading.

References are recomputed here in float64 with plain torch (encode, normalise, average,
renormalise, scale), never taken from the code under test.
"""

from __future__ import annotations

import copy
import json
import shutil
import types
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_open_clip import (
    TINY_CLASSNAMES,
    TINY_OPEN_CLIP_CFG,
    TINY_TEMPLATES,
    make_tiny_open_clip,
    make_tiny_open_clip_classifier,
    make_tiny_open_clip_folder,
    tiny_tokenizer,
)
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, ViTConfig, ViTForImageClassification

from hf_soups.errors import CorruptedCheckpointError, UnsafeCheckpointError
from hf_soups.ingredients import Ingredient
from hf_soups.models import (
    CLIPZeroShotClassifier,
    OpenCLIPZeroShotClassifier,
    UnsupportedArchitectureError,
    build_zero_shot_head,
    load_model,
    logits_of,
    make_word_tokenizer,
    save_model,
)
from hf_soups.models.zero_shot import fill_templates

DIGITS = [str(i) for i in range(10)]
TEMPLATES = ["a photo of the digit {}", lambda c: f"a blurry photo of the number {c}"]
PROMPTS = [p for c in DIGITS for p in fill_templates(c, TEMPLATES)]


@pytest.fixture(scope="module")
def word_tokenizer():
    return make_word_tokenizer(PROMPTS, model_max_length=16)


def tiny_clip(tokenizer, seed: int) -> CLIPModel:
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def tiny_clip_classifier(tokenizer, seed: int, classnames=DIGITS) -> CLIPZeroShotClassifier:
    return CLIPZeroShotClassifier.from_clip(
        tiny_clip(tokenizer, seed), tokenizer, classnames, TEMPLATES, progress=False
    )


def tiny_vit(seed: int) -> ViTForImageClassification:
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        image_size=16,
        patch_size=8,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config).eval()


def file_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, keyed as on disk."""
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def reference_head(encode, classnames, templates, log_scale) -> torch.Tensor:
    """wise-ft's get_zeroshot_classifier, in float64."""
    rows = []
    for name in classnames:
        prompts = [t(name) if callable(t) else t.format(name) for t in templates]
        emb = encode(prompts).double()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows) * torch.exp(log_scale.double())


# --- word tokenizer --------------------------------------------------------------------------


def test_word_tokenizer_encodes_words_between_bos_and_eos_and_round_trips(word_tokenizer, tmp_path):
    vocab = word_tokenizer.get_vocab()
    ids = word_tokenizer("A photo of the digit 7")["input_ids"]
    words = ["a", "photo", "of", "the", "digit", "7"]
    assert ids == [
        word_tokenizer.bos_token_id,
        *[vocab[w] for w in words],
        word_tokenizer.eos_token_id,
    ]
    assert word_tokenizer("zebra")["input_ids"][1] == word_tokenizer.unk_token_id
    # CLIP's legacy pooling (argmax over ids) is used when eos_token_id == 2; ours must differ.
    assert word_tokenizer.eos_token_id != 2
    word_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    batch = ["a photo of the digit 3", "a blurry photo of the number 12"]
    assert (
        reloaded(batch, padding=True)["input_ids"]
        == word_tokenizer(batch, padding=True)["input_ids"]
    )
    assert reloaded.eos_token_id == word_tokenizer.eos_token_id


# --- transformers CLIP -----------------------------------------------------------------------


def test_clip_head_matches_float64_reference(word_tokenizer):
    clip = tiny_clip(word_tokenizer, seed=0)
    clip.logit_scale.data.fill_(1.7)  # not the default, so a missing exp or scale shows
    model = CLIPZeroShotClassifier.from_clip(
        clip, word_tokenizer, DIGITS, TEMPLATES, progress=False
    )
    clip64 = copy.deepcopy(clip).double()

    def encode(prompts):
        tokens = word_tokenizer(prompts, padding=True, return_tensors="pt")
        out = clip64.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return clip64.text_projection(out.pooler_output)

    with torch.no_grad():
        expected = reference_head(encode, DIGITS, TEMPLATES, clip64.logit_scale)
    head = model.classifier.weight.detach()
    assert head.shape == (10, 24)
    torch.testing.assert_close(head.double(), expected, rtol=1e-5, atol=1e-5)
    assert model.config.id2label == dict(enumerate(DIGITS))
    assert model.config.label2id == {d: i for i, d in enumerate(DIGITS)}
    # Rows differ per class: the text tower pooled at the eos token, not at a shared position.
    assert torch.cdist(head, head).fill_diagonal_(1.0).min() > 1e-3


def test_clip_logits_and_loss_match_manual_computation(word_tokenizer):
    model = tiny_clip_classifier(word_tokenizer, seed=0)
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 3, 9, 3])
    out = model(pixel_values=pixels, labels=labels)

    clip64 = copy.deepcopy(model.clip).double()
    with torch.no_grad():
        features = clip64.visual_projection(
            clip64.vision_model(pixel_values=pixels.double()).pooler_output
        )
        features = features / features.norm(dim=-1, keepdim=True)
        logits = features @ model.classifier.weight.double().T
        loss = -logits.log_softmax(dim=-1)[torch.arange(4), labels].mean()
    torch.testing.assert_close(out.logits.double(), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-5)
    assert model(pixel_values=pixels).loss is None


def test_clip_save_load_round_trip(word_tokenizer, tmp_path):
    model = tiny_clip_classifier(word_tokenizer, seed=0)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["CLIPZeroShotClassifier"]
    on_disk = file_state_dict(tmp_path / "m")
    assert "classifier.weight" in on_disk and any(k.startswith("clip.text_model.") for k in on_disk)

    pixels = torch.randn(3, 3, 16, 16)
    for loaded in (
        CLIPZeroShotClassifier.from_pretrained(tmp_path / "m"),
        load_model(tmp_path / "m"),
    ):
        assert type(loaded) is CLIPZeroShotClassifier and not loaded.training
        assert loaded.config.id2label == model.config.id2label
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        assert torch.equal(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_clip_head_swap_for_another_task(word_tokenizer, tmp_path):
    model = tiny_clip_classifier(word_tokenizer, seed=0)
    other = ["0", "1", "7"]
    head = model.build_head(word_tokenizer, other, TEMPLATES, progress=False)
    # Rows of the 10-class head for the same class names: same text tower, same templates.
    torch.testing.assert_close(head, model.classifier.weight.detach()[[0, 1, 7]])
    model.set_head(head, other)
    assert model.classifier.weight.shape == (3, 24)
    assert model.config.id2label == {0: "0", 1: "1", 2: "7"}
    assert model(pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 3)
    model.save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m").config.num_labels == 3
    with pytest.raises(ValueError, match="expected"):
        model.set_head(head, ["0", "1"])


def test_clip_freeze_text_tower_trains_only_the_image_side(word_tokenizer):
    model = tiny_clip_classifier(word_tokenizer, seed=0).train()
    model.freeze_text_tower()
    out = model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([1, 2]))
    out.loss.backward()
    for name, parameter in model.named_parameters():
        text_side = name.startswith(
            ("clip.text_model.", "clip.text_projection.", "clip.logit_scale")
        )
        assert parameter.requires_grad is not text_side, name
        if text_side:
            assert parameter.grad is None, name
    assert model.classifier.weight.grad is not None
    assert model.clip.vision_model.embeddings.patch_embedding.weight.grad is not None


def test_clip_head_refuses_a_tokenizer_without_the_configured_eos(word_tokenizer):
    clip = tiny_clip(word_tokenizer, seed=0)
    clip.config.text_config.eos_token_id = 5
    clip.text_model.eos_token_id = 5
    with pytest.raises(ValueError, match="eos_token_id=5"):
        CLIPZeroShotClassifier.from_clip(clip, word_tokenizer, ["3"], ["a photo of the digit {}"])


def test_templates_and_classnames_are_validated():
    assert fill_templates("cat", ["a {}.", "{classname}!", lambda c: c.upper()]) == [
        "a cat.",
        "cat!",
        "CAT",
    ]
    with pytest.raises(ValueError, match="'a photo'"):
        fill_templates("cat", ["a photo"])
    with pytest.raises(ValueError, match="'3' appears more than once"):
        build_zero_shot_head(lambda p: torch.ones(len(p), 2), ["3", "3"], ["{}"], 0.0)


# --- open_clip -------------------------------------------------------------------------------


def test_open_clip_head_matches_float64_reference():
    model = make_tiny_open_clip(seed=0)
    model.logit_scale.data.fill_(1.3)
    tokenizer = tiny_tokenizer()
    classifier = OpenCLIPZeroShotClassifier.from_open_clip(
        model,
        tokenizer,
        TINY_CLASSNAMES,
        TINY_TEMPLATES,
        model_cfg=TINY_OPEN_CLIP_CFG,
        progress=False,
    )
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = reference_head(
            lambda prompts: model64.encode_text(tokenizer(prompts)),
            TINY_CLASSNAMES,
            TINY_TEMPLATES,
            model64.logit_scale,
        )
    torch.testing.assert_close(
        classifier.classifier.weight.detach().double(), expected, rtol=1e-5, atol=1e-5
    )
    assert classifier.id2label == dict(enumerate(TINY_CLASSNAMES))

    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model64.encode_image(pixels.double())
        logits = (features / features.norm(dim=-1, keepdim=True)) @ expected.T
    torch.testing.assert_close(
        classifier(pixel_values=pixels).logits.double(), logits, rtol=1e-5, atol=1e-5
    )


def test_open_clip_folder_round_trips_and_stays_loadable_by_open_clip(tmp_path):
    classifier = make_tiny_open_clip_classifier(seed=0)
    make_tiny_open_clip_folder(tmp_path / "m", seed=0)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "classifier.safetensors",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    assert list(load_file(tmp_path / "m" / "classifier.safetensors")) == ["classifier.weight"]
    config = json.loads((tmp_path / "m" / "open_clip_config.json").read_text())
    assert config["model_cfg"] == TINY_OPEN_CLIP_CFG
    assert config["hf_soups"]["id2label"] == {"0": "cat", "1": "dog", "2": "bird"}

    pixels = torch.randn(2, 3, 32, 32)
    plain = open_clip.create_model(f"local-dir:{tmp_path / 'm'}").eval()
    assert torch.equal(plain.encode_image(pixels), classifier.model.encode_image(pixels))

    for loaded in (
        OpenCLIPZeroShotClassifier.from_pretrained(tmp_path / "m"),
        load_model(tmp_path / "m"),
    ):
        assert isinstance(loaded, OpenCLIPZeroShotClassifier) and not loaded.training
        assert loaded.id2label == classifier.id2label
        assert torch.equal(
            loaded(pixel_values=pixels).logits, classifier(pixel_values=pixels).logits
        )


def test_open_clip_weights_in_other_files_load_too(tmp_path):
    make_tiny_open_clip_folder(tmp_path / "m", seed=0)
    shutil.copytree(tmp_path / "m", tmp_path / "renamed")
    for file in (tmp_path / "renamed").glob("*.safetensors"):
        file.unlink()
    save_file(file_state_dict(tmp_path / "m"), tmp_path / "renamed" / "model.safetensors")
    pixels = torch.randn(2, 3, 32, 32)
    expected = load_model(tmp_path / "m")(pixel_values=pixels).logits
    assert torch.equal(load_model(tmp_path / "renamed")(pixel_values=pixels).logits, expected)


def test_open_clip_folder_without_head_loads_the_bare_model(tmp_path):
    make_tiny_open_clip_folder(tmp_path / "m", seed=0)
    (tmp_path / "m" / "classifier.safetensors").unlink()
    model = load_model(tmp_path / "m")
    assert isinstance(model, open_clip.CLIP)
    with pytest.raises(CorruptedCheckpointError, match="classifier.weight"):
        OpenCLIPZeroShotClassifier.from_pretrained(tmp_path / "m")


# --- load_model with file-keyed state dicts --------------------------------------------------


def _save_clip(tokenizer, seed, folder):
    tiny_clip_classifier(tokenizer, seed).save_pretrained(folder)


def _save_vit(seed, folder):
    tiny_vit(seed).save_pretrained(folder)


@pytest.mark.parametrize("family", ["vit", "clip", "open_clip"])
def test_load_model_with_another_checkpoints_state_dict(family, word_tokenizer, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    if family == "vit":
        _save_vit(0, a), _save_vit(1, b)
        pixels = torch.randn(2, 3, 16, 16)
    elif family == "clip":
        _save_clip(word_tokenizer, 0, a), _save_clip(word_tokenizer, 1, b)
        pixels = torch.randn(2, 3, 16, 16)
    else:
        make_tiny_open_clip_folder(a, seed=0), make_tiny_open_clip_folder(b, seed=1)
        pixels = torch.randn(2, 3, 32, 32)
    weights_b = file_state_dict(b)
    if family == "vit":  # on-disk names are not the in-memory ones: conversion must happen
        assert set(weights_b) != set(load_model(b).state_dict())

    mixed = load_model(Ingredient.from_folder(a), weights_b)
    reference = load_model(b)
    assert not mixed.training
    expected = logits_of(reference(pixel_values=pixels))
    assert torch.equal(logits_of(mixed(pixel_values=pixels)), expected)
    assert not torch.allclose(logits_of(load_model(a)(pixel_values=pixels)), expected)


@pytest.mark.parametrize("family", ["vit", "clip", "open_clip"])
def test_load_model_with_constant_state_dict_equals_folder_holding_it(
    family, word_tokenizer, tmp_path
):
    a = tmp_path / "a"
    if family == "vit":
        _save_vit(0, a)
    elif family == "clip":
        _save_clip(word_tokenizer, 0, a)
    else:
        make_tiny_open_clip_folder(a, seed=0)
    size = 32 if family == "open_clip" else 16
    pixels = torch.randn(2, 3, size, size)
    # Constants per tensor (not all ones: layer norms of constant inputs would hide differences).
    constant = {
        name: torch.full_like(t, 0.01 * (i % 7 + 1)) if t.is_floating_point() else t
        for i, (name, t) in enumerate(sorted(file_state_dict(a).items()))
    }
    c = tmp_path / "c"
    shutil.copytree(a, c)
    for file in c.glob("*.safetensors"):
        save_file({k: constant[k] for k in load_file(file)}, file)

    from_state = load_model(types.SimpleNamespace(path=a), constant)
    from_folder = load_model(c)
    for name, tensor in from_folder.state_dict().items():
        assert torch.equal(from_state.state_dict()[name], tensor), name
    assert torch.equal(
        logits_of(from_state(pixel_values=pixels)), logits_of(from_folder(pixel_values=pixels))
    )


@pytest.mark.parametrize("family", ["vit", "open_clip"])
def test_load_model_refuses_incomplete_state_dict(family, tmp_path):
    if family == "vit":
        _save_vit(0, tmp_path / "a")
    else:
        make_tiny_open_clip_folder(tmp_path / "a", seed=0)
    weights = file_state_dict(tmp_path / "a")
    dropped = sorted(weights)[-1]
    del weights[dropped]
    with pytest.raises(CorruptedCheckpointError, match="missing"):
        load_model(tmp_path / "a", weights)


def test_save_model_writes_a_loadable_folder(tmp_path):
    classifier = make_tiny_open_clip_classifier(seed=2)
    vit = tiny_vit(2)
    save_model(classifier, tmp_path / "oc")
    save_model(vit, tmp_path / "vit")
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(
        load_model(tmp_path / "oc")(pixel_values=pixels).logits,
        classifier(pixel_values=pixels).logits,
    )
    pixels = torch.randn(1, 3, 16, 16)
    assert torch.equal(
        load_model(tmp_path / "vit")(pixel_values=pixels).logits, vit(pixel_values=pixels).logits
    )
    with pytest.raises(TypeError, match="CLIP"):
        save_model(classifier.model, tmp_path / "bare")


# --- architectures ---------------------------------------------------------------------------


def _write_config(folder: Path, **fields) -> None:
    folder.mkdir()
    config = {"model_type": "vit", **fields}
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_architecture_is_named(tmp_path):
    _write_config(tmp_path / "m", architectures=["NoSuchModelForImageClassification"])
    with pytest.raises(UnsupportedArchitectureError, match="NoSuchModelForImageClassification"):
        load_model(tmp_path / "m")


def test_remote_code_is_refused_without_trust_and_names_the_architecture(tmp_path):
    marker = tmp_path / "code_ran"
    _write_config(
        tmp_path / "m",
        architectures=["SneakyModel"],
        auto_map={"AutoModelForImageClassification": "modeling_sneaky.SneakyModel"},
    )
    (tmp_path / "m" / "modeling_sneaky.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(UnsafeCheckpointError, match="SneakyModel.*trust_remote_code"):
        load_model(tmp_path / "m")
    assert not marker.exists()


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(CorruptedCheckpointError, match="config.json"):
        load_model(tmp_path / "m")


# --- zero-shot tasks, families, label checks -------------------------------------------------


def test_zero_shot_task_templates_and_json_round_trip():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from hf_soups.models import ZeroShotTask

    task = ZeroShotTask(["cat", "dog"], templates="openai_imagenet", text_model="org/clip")
    # open_clip's copy of OpenAI's 80 ImageNet templates is the independent reference.
    assert task.templates == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    assert len(task.templates) == 80
    assert ZeroShotTask(["cat"]).templates == ("a photo of a {}.",)
    assert ZeroShotTask(["cat"], templates="default").templates == ("a photo of a {}.",)
    record = task.to_dict()
    assert record == {
        "classnames": ["cat", "dog"],
        "templates": "openai_imagenet",
        "text_model": "org/clip",
    }
    assert json.loads(json.dumps(record)) == record
    assert ZeroShotTask.from_dict(record) == task
    custom = ZeroShotTask(("a", "b"), templates=["{} here", "there: {}"], name="t")
    assert ZeroShotTask.from_dict(custom.to_dict()) == custom
    assert custom.to_dict()["templates"] == ["{} here", "there: {}"]
    assert hash(custom) == hash(ZeroShotTask.from_dict(custom.to_dict()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classnames": []}, "classnames: empty"),
        ({"classnames": ["a", "b", "a"]}, "'a' appears more than once"),
        ({"classnames": "cat"}, "not the string"),
        ({"classnames": ["a"], "templates": ["a photo"]}, "'a photo' has no '{}'"),
        ({"classnames": ["a"], "templates": []}, "templates: empty"),
        ({"classnames": ["a"], "templates": "imagenet_80"}, "unknown template set 'imagenet_80'"),
    ],
)
def test_zero_shot_task_rejects_bad_input_in_one_line(kwargs, message):
    from hf_soups.errors import ZeroShotTaskError
    from hf_soups.models import ZeroShotTask

    with pytest.raises(ZeroShotTaskError, match=message) as caught:
        ZeroShotTask(**kwargs)
    assert "\n" not in str(caught.value)
    with pytest.raises(ZeroShotTaskError, match="unknown key 'labels'"):
        ZeroShotTask.from_dict({"classnames": ["a"], "labels": ["a"]})


def test_detect_family_reads_the_layout(word_tokenizer, tmp_path):
    from hf_soups.models import detect_family

    tiny_clip(word_tokenizer, 0).save_pretrained(tmp_path / "clip")
    tiny_clip(word_tokenizer, 0).vision_model.save_pretrained(tmp_path / "vision")
    (tmp_path / "vision" / "config.json").write_text(
        json.dumps(
            {
                **tiny_clip(word_tokenizer, 0).config.vision_config.to_dict(),
                "architectures": ["CLIPVisionModel"],
            }
        )
    )
    _save_vit(0, tmp_path / "vit")
    _save_clip(word_tokenizer, 0, tmp_path / "legacy")
    make_tiny_open_clip_folder(tmp_path / "oc_head", seed=0)
    shutil.copytree(tmp_path / "oc_head", tmp_path / "oc")
    (tmp_path / "oc" / "classifier.safetensors").unlink()
    config = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    del config["hf_soups"]
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(config))
    found = {
        name: detect_family(tmp_path / name)
        for name in ("clip", "vision", "vit", "legacy", "oc_head", "oc")
    }
    assert {name: family.name for name, family in found.items()} == {
        "clip": "clip",
        "vision": "clip_vision",
        "vit": "image_classifier",
        "legacy": "hf_soups_clip_classifier",
        "oc_head": "hf_soups_open_clip_classifier",
        "oc": "open_clip",
    }
    cards = {name: family.card_metadata("org/x") for name, family in found.items()}
    assert cards["clip"].pipeline_tag == "zero-shot-image-classification"
    assert cards["vit"].pipeline_tag == "image-classification"
    assert cards["legacy"].pipeline_tag is None and cards["legacy"].needs_hf_soups
    assert cards["oc"].library_name == "open_clip" and not cards["oc"].needs_hf_soups
    assert 'pipeline("image-classification", model="org/x")' in cards["vit"].snippet


def test_clip_models_without_head_need_a_task_and_score_with_one(word_tokenizer, tmp_path):
    from hf_soups.errors import ZeroShotTaskError
    from hf_soups.models import ZeroShotTask, label_names_of

    clip = tiny_clip(word_tokenizer, 3)
    clip.save_pretrained(tmp_path / "clip")
    word_tokenizer.save_pretrained(tmp_path / "clip")
    with pytest.raises(ZeroShotTaskError, match="CLIPModel has no classification head.*task="):
        load_model(tmp_path / "clip")
    task = ZeroShotTask(DIGITS[:4], templates=["a photo of the digit {}", "the number {}"])
    model = load_model(tmp_path / "clip", task=task)
    assert label_names_of(model) == DIGITS[:4]
    pixels = torch.randn(3, 3, 16, 16)

    def encode(prompts):
        tokens = word_tokenizer(prompts, padding=True, return_tensors="pt")
        return clip.get_text_features(**tokens).pooler_output

    with torch.no_grad():
        head = reference_head(encode, DIGITS[:4], list(task.templates), clip.logit_scale)
        image = clip.get_image_features(pixel_values=pixels).pooler_output.double()
        expected = (image / image.norm(dim=-1, keepdim=True)) @ head.T
        got = model(pixel_values=pixels).logits
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)

    clip.vision_model.save_pretrained(tmp_path / "vision")
    with pytest.raises(ZeroShotTaskError, match="CLIPVisionModel.*text_model="):
        load_model(tmp_path / "vision", task=task)


def test_check_labels_names_both_lists():
    import datasets

    from hf_soups.errors import LabelMismatchError
    from hf_soups.models import check_labels

    features = datasets.Features({"labels": datasets.ClassLabel(names=["a", "b", "c"])})
    data = datasets.Dataset.from_dict({"labels": [0, 1, 2]}, features=features)
    check_labels(["a", "b", "c"], data)
    check_labels(None, data)  # a model that names no classes
    check_labels(["x", "y"], datasets.Dataset.from_dict({"labels": [0, 1]}))  # plain ints
    with pytest.raises(LabelMismatchError, match=r"\['a', 'b', 'c'\].*\['a', 'c', 'b'\]") as caught:
        check_labels(["a", "c", "b"], data)
    assert "\n" not in str(caught.value)
