"""Batched, seeded augmentation of the demo's training images, and the in-memory training set
that applies it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from datasets import Dataset


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
        # One noise draw for all channels: the images stay gray.
        return out + std * torch.randn((n, 1, *out.shape[2:]), generator=generator)


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
