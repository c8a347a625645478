"""The sparse stage's structured-reduction row: the dense fine-tuned CLIP with narrower image
MLPs, saved as a plain ``CLIPModel`` folder with its card.

:func:`~hf_soups.pruning.reduction.reduce_and_retrain` narrows the vision tower's MLPs (first-
order Taylor scores on a few training batches, through the same fixed zero-shot head the other
rows train against), retraining briefly after each step, until the stated parameter and FLOP
reductions. The text tower is left whole, as in every other row: the head its text tower
rebuilds on loading stays the head the model was trained against.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import CLIPModel, PrinterCallback, Trainer

from hf_soups.demo.finetune import FixedHeadFineTuning
from hf_soups.demo.sparse_results import REDUCED_KIND
from hf_soups.models.scoring import ZeroShotScorer
from hf_soups.pruning.reduction import ReductionResult, reduce_and_retrain, save_reduced

if TYPE_CHECKING:
    from hf_soups.demo.sparse import ImageSideFineTuning, _SparseStage

REDUCED_FOLDER = "reduced"
TOWERS = ("vision",)


def fixed_head_model(stage: _SparseStage, clip: CLIPModel, head: torch.Tensor):
    """``clip``'s image side scored (and trained) against the fixed zero-shot ``head``."""
    from hf_soups.demo.sparse import ImageSideFineTuning

    scorer = ZeroShotScorer(clip.vision_model, clip.visual_projection, head, stage.data.classnames)
    return ImageSideFineTuning(FixedHeadFineTuning(clip, scorer))


def reduce_dense(stage: _SparseStage, dense: ImageSideFineTuning, out: Path) -> ReductionResult:
    """Reduce ``dense``'s image MLPs to the stage's targets, add the table row of the reduced
    model and save it into ``out`` (with its card)."""
    config = stage.config
    head = dense.scorer.head

    def loss_fn(clip: CLIPModel, batch) -> torch.Tensor:
        return fixed_head_model(stage, clip, head)(**batch).loss

    def retrain(clip: CLIPModel, step: int) -> None:
        model = fixed_head_model(stage, clip, head)
        args = stage.arguments(
            f"reduction-{step}",
            epochs=config.retrain_epochs,
            learning_rate=config.reduction_learning_rate,
            seed=stage.seed + 100 + step,
        )
        steps = config.reduction_retrain_steps
        args = dataclasses.replace(
            args, max_steps=min(steps, args.max_steps) if args.max_steps > 0 else steps
        )
        trainer = Trainer(model=model, args=args, train_dataset=stage.data.train)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        clip.eval()

    generator = torch.Generator().manual_seed(stage.seed)
    order = torch.randperm(len(stage.data.train), generator=generator).tolist()
    size = config.batch_size
    batches = []
    for index in range(config.reduction_score_batches):
        rows = stage.data.train[order[index * size : (index + 1) * size]]
        batches.append({"pixel_values": rows["pixel_values"], "labels": rows["labels"]})
    result = reduce_and_retrain(
        dense.model,
        batches,
        retrain=retrain,
        target_parameters=config.reduction_parameters,
        target_flops=config.reduction_flops,
        step_flops=config.reduction_step_flops,
        towers=TOWERS,
        loss_fn=loss_fn,
        text_length=stage.text_length,
    )
    before = result.intermediate_size_before["vision"]
    name = f"reduced (vision MLP width {before} -> {result.model.config.vision_config.intermediate_size})"
    stage.add_row(name, REDUCED_KIND, 0.0, 1, fixed_head_model(stage, result.model, head))
    save_reduced(
        result,
        out,
        processing_class=stage.processor,
        model_name=f"hf-soups demo {REDUCED_KIND}",
        task=stage.task,
    )
    return result
