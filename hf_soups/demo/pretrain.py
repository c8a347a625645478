"""Contrastive pre-training of a tiny transformers ``CLIPModel`` from scratch, on CPU.

The pre-trained start is what makes soups work, so the demo builds its own: image-caption pairs
from the MNIST training split and scikit-learn's digits, with broad augmentation (rotation,
scale, shifts, noise, inverted images), and captions filled from the prompt templates. Many
images in a batch share a caption, so every same-class pair counts as a positive.

The result is a plain transformers ``CLIPModel`` folder with its tokenizer and image processor
(a ``CLIPProcessor``), which ``pipeline("zero-shot-image-classification")`` loads as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

from hf_soups.demo.data import (
    PARITY_CLASSNAMES,
    PARITY_TEMPLATE,
    PRETRAIN_AUGMENTATION,
    Augmentation,
    DemoData,
    image_processor,
)
from hf_soups.errors import HfSoupsError, ZeroShotTooWeakError
from hf_soups.models.clip import clip_zero_shot_head, make_word_tokenizer
from hf_soups.models.scoring import ZeroShotScorer
from hf_soups.output import atomic_output_dir, check_output_dir
from hf_soups.threads import one_thread

logger = logging.getLogger(__name__)


PRETRAINING_RECORD = "pretraining.json"


@dataclass(frozen=True)
class PretrainConfig:
    """Model shape and schedule of one demo size."""

    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    projection_dim: int
    epochs: int
    text_hidden_size: int = 64
    text_layers: int = 1
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    min_zero_shot_accuracy: float = 0.5


# The contrastive loss stalls for a few epochs while every image has nearly the same embedding;
# batch 64 at lr 1e-3 for 10+ epochs gets out of it on these sizes (see DEMO-NOTES).
PRETRAIN_SIZES: dict[str, PretrainConfig] = {
    "fast": PretrainConfig(
        patch_size=7, hidden_size=64, num_layers=2, num_heads=4, projection_dim=64, epochs=10
    ),
    "default": PretrainConfig(
        patch_size=4, hidden_size=96, num_layers=3, num_heads=4, projection_dim=96, epochs=12
    ),
}


def get_pretrain_config(size: str | PretrainConfig) -> PretrainConfig:
    """Look a demo size up by name, or pass a ``PretrainConfig`` through."""
    if isinstance(size, PretrainConfig):
        return size
    try:
        return PRETRAIN_SIZES[size]
    except KeyError:
        raise HfSoupsError(
            f"unknown demo size {size!r}; choose one of {sorted(PRETRAIN_SIZES)}"
        ) from None


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch, insist on deterministic kernels and use one intra-op thread for the block.

    One thread makes the floating-point reduction order independent of the machine's core
    count, and the demo's tiny matrices gain nothing from more: on a busy 2-core machine, two
    threads made a fine-tuning run over ten times slower than one. Settings are restored after.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        with one_thread():
            yield
    finally:
        torch.use_deterministic_algorithms(previous)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and per-model progress bars for the block, then restore.

    The demo shows one bar per stage; loading and saving a tiny model a dozen times would
    otherwise print a dozen more.
    """
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def build_clip(
    config: PretrainConfig, tokenizer: PreTrainedTokenizerFast, num_channels: int, image_size: int
) -> CLIPModel:
    """A randomly initialised tiny CLIP whose text side matches ``tokenizer``."""
    clip_config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": config.text_hidden_size,
            "intermediate_size": 2 * config.text_hidden_size,
            "num_hidden_layers": config.text_layers,
            "num_attention_heads": config.num_heads,
            "max_position_embeddings": 16,
            "projection_dim": config.projection_dim,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": config.hidden_size,
            "intermediate_size": 2 * config.hidden_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_channels": num_channels,
            "image_size": image_size,
            "patch_size": config.patch_size,
            "projection_dim": config.projection_dim,
        },
        projection_dim=config.projection_dim,
    )
    return CLIPModel(clip_config)


def multi_positive_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric CLIP loss where every same-label image-text pair is a positive.

    The target of each row is uniform over its positives, so an image is not pushed away from a
    caption of its own class that happens to belong to another image of the batch.
    """
    logits = (
        logit_scale.exp() * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    )
    positives = (labels[:, None] == labels[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def _images_and_labels(datasets: list[Dataset]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.cat([d[:]["pixel_values"] for d in datasets])
    labels = torch.cat([d[:]["labels"] for d in datasets])
    return images, labels


def _caption_ids(
    tokenizer: PreTrainedTokenizerFast, classnames: tuple[str, ...], templates: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of every caption; caption ``c * len(templates) + t`` fills template
    ``t`` with class ``c``."""
    prompts = [t.format(c) for c in classnames for t in templates]
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def train_clip(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerFast,
    images: torch.Tensor,
    labels: torch.Tensor,
    classnames: tuple[str, ...],
    templates: tuple[str, ...],
    config: PretrainConfig,
    *,
    seed: int,
    max_steps: int | None = None,
    augmentation: Augmentation = PRETRAIN_AUGMENTATION,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` contrastively in place; returns the loss of every step.

    Each epoch shuffles the pairs, gives every image a caption from a random template, and
    augments the batch; all draws come from one generator seeded with ``seed``. AdamW with a
    linear warm-up and cosine decay. ``max_steps`` cuts the schedule short (for tests).
    """
    generator = torch.Generator().manual_seed(seed)
    caption_ids, caption_mask = _caption_ids(tokenizer, classnames, templates)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total = config.epochs * steps_per_epoch if max_steps is None else max_steps
    warmup = max(1, int(config.warmup_fraction * total))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / total))),
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc="pre-training CLIP", disable=not progress, leave=False)
    while len(losses) < total:
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(config.batch_size):
            if len(losses) == total:
                break
            batch_labels = labels[batch]
            template = torch.randint(0, len(templates), (len(batch),), generator=generator)
            image_embeds = model.get_image_features(
                pixel_values=augmentation(images[batch], generator)
            ).pooler_output
            # There are fewer distinct captions than images in a batch: encode each once.
            caption_embeds = model.get_text_features(
                input_ids=caption_ids, attention_mask=caption_mask
            ).pooler_output
            text_embeds = caption_embeds[batch_labels * len(templates) + template]
            loss = multi_positive_contrastive_loss(
                image_embeds, text_embeds, batch_labels, model.logit_scale
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # CLIP clamps the temperature so logits cannot blow up (scale at most 100).
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset: Dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of an image classifier (``.logits``) on a torch-formatted dataset."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        logits = model(pixel_values=batch["pixel_values"]).logits
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(dataset)


def pretrain_zero_shot(
    out_dir: str | os.PathLike,
    data: DemoData,
    size: str | PretrainConfig = "fast",
    seed: int = 0,
    *,
    overwrite: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> Path:
    """Pre-train a tiny CLIP and save it (``CLIPModel``, tokenizer, image processor) to ``out_dir``.

    Args:
        out_dir: folder to write; refused if it exists and is not empty, unless ``overwrite``.
        data: the demo data; pre-training uses its train split and ``pretrain_extra``, captioned
            with ``data.caption_templates``; the zero-shot check uses ``data.templates``.
        size: ``"fast"``, ``"default"`` or a ``PretrainConfig``.
        seed: seeds the initialisation, the shuffling, the captions and the augmentation.
        max_steps: stop after this many optimiser steps (for tests); skips the accuracy check.
        progress: show a progress bar.

    Returns:
        ``out_dir`` as a Path, holding a ``CLIPModel`` folder, its tokenizer and image processor,
        and ``pretraining.json`` (seed, config, steps, first and final loss, zero-shot validation
        accuracy).

    Raises:
        ZeroShotTooWeakError: after a full schedule, the zero-shot validation accuracy is below
            ``config.min_zero_shot_accuracy``.
    """
    config = get_pretrain_config(size)
    out_dir = check_output_dir(out_dir, overwrite)  # fail before training, not after
    # The vocabulary covers every prompt the demo ever encodes, the multi-task run's included.
    tokenizer = make_word_tokenizer(
        [
            *(
                t.format(c)
                for t in (*data.caption_templates, *data.templates)
                for c in data.classnames
            ),
            *(PARITY_TEMPLATE.format(c) for c in PARITY_CLASSNAMES),
        ],
        model_max_length=16,
    )
    images, labels = _images_and_labels([data.train, data.pretrain_extra])
    with deterministic(seed):
        clip = build_clip(config, tokenizer, data.num_channels, data.image_size)
        losses = train_clip(
            clip,
            tokenizer,
            images,
            labels,
            data.classnames,
            data.caption_templates,
            config,
            seed=seed,
            max_steps=max_steps,
            progress=progress,
        )
        # The zero-shot classifier the demo scores: head from the text tower and the template.
        head = clip_zero_shot_head(clip, tokenizer, data.classnames, data.templates, progress=False)
        scorer = ZeroShotScorer(clip.vision_model, clip.visual_projection, head, data.classnames)
        val_accuracy = accuracy(scorer, data.validation)
    logger.info(
        "pre-trained %d steps, final loss %.3f, zero-shot validation accuracy %.3f",
        len(losses),
        losses[-1],
        val_accuracy,
    )
    chance = 1.0 / len(data.classnames)
    if max_steps is None and val_accuracy < config.min_zero_shot_accuracy:
        raise ZeroShotTooWeakError(
            f"zero-shot validation accuracy {val_accuracy:.3f} after pre-training is below "
            f"{config.min_zero_shot_accuracy} (chance {chance:.2f}); the contrastive loss went "
            f"from {losses[0]:.3f} to {losses[-1]:.3f}. Try more epochs or another seed "
            f"(seed={seed}, config={asdict(config)})"
        )
    record = {
        "seed": seed,
        "config": asdict(config),
        "steps": len(losses),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "zero_shot_validation_accuracy": val_accuracy,
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp, quiet_transformers():
        clip.save_pretrained(tmp)
        CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(tmp)
        (tmp / PRETRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir
