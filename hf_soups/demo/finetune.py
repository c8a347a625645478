"""Fine-tune a sweep of soup ingredients from the demo's pre-trained CLIP with ``Trainer``.

Every ingredient starts from the same pre-trained ``CLIPModel``, so they share a start and can be
averaged. The image tower and visual projection are trained with cross-entropy against the
FIXED zero-shot head that the frozen text tower builds from the task's prompts (the head of
:class:`~hf_soups.models.ZeroShotScorer`); the text tower, text projection and logit scale never
change, so every ingredient and soup is a plain ``CLIPModel`` whose own text tower rebuilds
exactly that head, as ``pipeline("zero-shot-image-classification")`` does. Hyperparameters vary
as in the model-soups sweeps: learning rate (log-uniform over a wide range, stratified so a
short sweep still covers it), weight decay, augmentation on or off, label smoothing and seed.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    CLIPModel,
    CLIPProcessor,
    EvalPrediction,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.modeling_outputs import ImageClassifierOutput

from hf_soups.callbacks import IngredientCallback
from hf_soups.demo.data import FINETUNE_AUGMENTATION, DemoData, TrainingImages
from hf_soups.demo.pretrain import deterministic, quiet_transformers
from hf_soups.errors import HfSoupsError
from hf_soups.models.clip import clip_zero_shot_head
from hf_soups.models.scoring import ZeroShotScorer
from hf_soups.output import check_output_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    """Size and ranges of one demo sweep."""

    num_ingredients: int
    epochs: int
    batch_size: int = 64
    learning_rate_range: tuple[float, float] = (1e-5, 1e-3)
    weight_decays: tuple[float, ...] = (0.0, 0.01, 0.1)
    label_smoothings: tuple[float, ...] = (0.0, 0.1)


SWEEP_SIZES: dict[str, SweepConfig] = {
    "fast": SweepConfig(num_ingredients=6, epochs=1),
    "default": SweepConfig(num_ingredients=8, epochs=2),
}


@dataclass(frozen=True)
class IngredientSpec:
    """The hyperparameters of one ingredient of the sweep."""

    name: str
    learning_rate: float
    weight_decay: float
    augment: bool
    label_smoothing: float
    seed: int


def get_sweep_config(size: str | SweepConfig) -> SweepConfig:
    """Look a demo size up by name, or pass a ``SweepConfig`` through."""
    if isinstance(size, SweepConfig):
        return size
    try:
        return SWEEP_SIZES[size]
    except KeyError:
        raise HfSoupsError(
            f"unknown demo size {size!r}; choose one of {sorted(SWEEP_SIZES)}"
        ) from None


def sample_sweep(config: SweepConfig, seed: int) -> list[IngredientSpec]:
    """Draw the sweep's hyperparameters; the same seed gives the same sweep.

    Learning rates are stratified: the log range is cut into ``num_ingredients`` equal bins
    and one rate is drawn uniformly inside each, so even six ingredients span it. Augmentation
    alternates so half the ingredients use it whatever the seed.
    """
    rng = np.random.default_rng(seed)
    n = config.num_ingredients
    low, high = (math.log(x) for x in config.learning_rate_range)
    edges = np.linspace(low, high, n + 1)
    rates = np.exp(edges[:-1] + (edges[1:] - edges[:-1]) * rng.random(n))
    rates = rates[rng.permutation(n)]
    specs = []
    for i in range(n):
        specs.append(
            IngredientSpec(
                name=f"ingredient-{i:02d}",
                learning_rate=float(f"{rates[i]:.3g}"),
                weight_decay=float(rng.choice(config.weight_decays)),
                augment=i % 2 == 0,
                label_smoothing=float(rng.choice(config.label_smoothings)),
                seed=seed * 1000 + i,
            )
        )
    return specs


class FixedHeadFineTuning(nn.Module):
    """A model trained through a :class:`ZeroShotScorer` against its fixed head, saved as itself.

    ``forward`` is the scorer's (logits of the fixed zero-shot head, cross-entropy with
    ``labels``); ``save_pretrained`` writes ``model``, whose image tower the scorer holds, so the
    Trainer's callbacks save a ``CLIPModel`` (or ``CLIPVisionModel``) folder, never the scorer.
    """

    def __init__(self, model: PreTrainedModel, scorer: ZeroShotScorer) -> None:
        super().__init__()
        self.scorer = scorer
        self.model = model

    @property
    def config(self):
        """The saved model's config (the Trainer reads it, e.g. with label smoothing)."""
        return self.model.config

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImageClassifierOutput:
        return self.scorer(pixel_values=pixel_values, labels=labels)

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> None:
        self.model.save_pretrained(folder, **kwargs)


def clip_fine_tuning(
    zero_shot_dir: Path, classnames: tuple[str, ...], templates: tuple[str, ...]
) -> FixedHeadFineTuning:
    """The pre-trained ``CLIPModel`` set up for fine-tuning its image side: text tower, text
    projection and logit scale frozen, the head built once from them and kept fixed."""
    clip = CLIPModel.from_pretrained(zero_shot_dir, use_safetensors=True)
    for module in (clip.text_model, clip.text_projection):
        module.requires_grad_(False)
    clip.logit_scale.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(zero_shot_dir)
    head = clip_zero_shot_head(clip, tokenizer, classnames, templates, progress=False)
    scorer = ZeroShotScorer(clip.vision_model, clip.visual_projection, head, classnames)
    return FixedHeadFineTuning(clip, scorer)


def _accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def fixed_head_trainer(
    model: FixedHeadFineTuning,
    train: Dataset,
    validation: Dataset,
    spec: IngredientSpec,
    config: SweepConfig,
    *,
    work_dir: Path,
    processing_class=None,
    callbacks: list[TrainerCallback] | None = None,
    max_steps: int = -1,
) -> Trainer:
    """A ``Trainer`` for one fine-tuning run of ``spec``'s hyperparameters; call it inside
    ``deterministic(spec.seed)``. It evaluates once, at the last step."""
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = max_steps if max_steps > 0 else config.epochs * steps_per_epoch
    args = TrainingArguments(
        output_dir=str(work_dir / spec.name),
        use_cpu=True,
        num_train_epochs=config.epochs,
        max_steps=total_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=500,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        label_smoothing_factor=spec.label_smoothing,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        seed=spec.seed,
        # One evaluation, at the last step: greedy soups rank ingredients by it, and
        # per-epoch scores would cost a validation pass each.
        eval_strategy="steps",
        eval_steps=total_steps,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TrainingImages(
            train, FINETUNE_AUGMENTATION if spec.augment else None, seed=spec.seed
        ),
        eval_dataset=validation,
        processing_class=processing_class,
        data_collator=default_data_collator,
        compute_metrics=_accuracy,
        callbacks=callbacks,
    )
    # The demo shows one bar per stage; the Trainer's per-run log lines would drown it.
    trainer.remove_callback(PrinterCallback)
    return trainer


def finetune_one(
    zero_shot_dir: Path,
    data: DemoData,
    spec: IngredientSpec,
    config: SweepConfig,
    sweep_dir: Path,
    *,
    work_dir: Path,
    overwrite: bool = False,
    max_steps: int = -1,
) -> Path:
    """Fine-tune one ingredient from the pre-trained CLIP; returns its ``CLIPModel`` folder."""
    with deterministic(spec.seed):
        model = clip_fine_tuning(zero_shot_dir, data.classnames, data.templates)
        callback = IngredientCallback(
            sweep_dir,
            name=spec.name,
            extra_hyperparameters={
                "augment": spec.augment,
                "frozen": "text tower, text projection, logit scale (fixed zero-shot head)",
                "zero_shot_model": zero_shot_dir.name,
            },
            overwrite=overwrite,
        )
        trainer = fixed_head_trainer(
            model,
            data.train,
            data.validation,
            spec,
            config,
            work_dir=work_dir,
            # Saved beside every ingredient: tokenizer and image processor for the pipelines.
            processing_class=CLIPProcessor.from_pretrained(zero_shot_dir),
            callbacks=[callback],
            max_steps=max_steps,
        )
        trainer.train()
    return callback.ingredient_dir(trainer.args)


def finetune_sweep(
    zero_shot_dir: str | os.PathLike,
    data: DemoData,
    out_dir: str | os.PathLike,
    size: str | SweepConfig = "fast",
    seed: int = 0,
    *,
    overwrite: bool = False,
    max_steps: int = -1,
    progress: bool = True,
) -> list[Path]:
    """Fine-tune the demo's sweep of ingredients into ``out_dir/<name>/``.

    Args:
        zero_shot_dir: the ``CLIPModel`` folder written by ``pretrain_zero_shot``.
        data: the demo data; trains on ``train``, evaluates on ``validation`` (recorded in each
            ``ingredient.json`` as ``eval_accuracy``).
        out_dir: the sweep folder; refused if it exists and is not empty, unless
            ``overwrite`` (which replaces ingredient folders of the same names).
        size: ``"fast"``, ``"default"`` or a ``SweepConfig``.
        seed: seeds the hyperparameter draw and, through it, every run.
        max_steps: cut every run to this many optimiser steps (for tests).
        progress: show one progress bar over the sweep.

    Returns:
        The ingredient folders, in sweep order.
    """
    config = get_sweep_config(size)
    zero_shot_dir = Path(zero_shot_dir)
    out_dir = check_output_dir(out_dir, overwrite)
    specs = sample_sweep(config, seed)
    folders: list[Path] = []
    with quiet_transformers(), tempfile.TemporaryDirectory(prefix="hf-soups-trainer-") as work_dir:
        for spec in tqdm(specs, desc="fine-tuning ingredients", disable=not progress):
            logger.info("fine-tuning %s: %s", spec.name, asdict(spec))
            folders.append(
                finetune_one(
                    zero_shot_dir,
                    data,
                    spec,
                    config,
                    out_dir,
                    work_dir=Path(work_dir),
                    overwrite=overwrite,
                    max_steps=max_steps,
                )
            )
    return folders
