"""Reduce, retrain briefly, repeat: structured reduction to a parameter and FLOP target, and
the folder it saves (weights, config and ``reduction.json``, the recipe of what was done).

The loop follows score-based architecture reduction (as in SNARE): each step removes the
neurons whose loss costs least per FLOP saved, a short retraining recovers, and the steps go on
until the target reduction is reached.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, Trainer, TrainingArguments

from hf_soups.cards.reduction import REDUCTION_FILE, write_reduction_card
from hf_soups.cards.sources import is_repo_id
from hf_soups.errors import HfSoupsError
from hf_soups.output import atomic_output_dir
from hf_soups.pruning.flops import FLOPS_CONVENTION, model_counts
from hf_soups.pruning.reduction.step import ReductionStep, reduce_mlp
from hf_soups.pruning.reduction.towers import mlp_towers
from hf_soups.pruning.scorer import LossFunction, model_loss

logger = logging.getLogger(__name__)

IMPORTANCE_CITATIONS = {
    "taylor": "Molchanov et al., Pruning convolutional neural networks for resource efficient "
    "inference, ICLR 2017 (arXiv:1611.06440)",
    "magnitude": "Li et al., Pruning filters for efficient ConvNets, ICLR 2017 (arXiv:1608.08710)",
}

Retrain = Callable[[PreTrainedModel, int], None]


@dataclass
class ReductionResult:
    """The reduced model, its :func:`~hf_soups.pruning.model_counts` before and after, each
    tower's ``intermediate_size`` before, and every step's record."""

    model: PreTrainedModel
    before: dict[str, Any]
    after: dict[str, Any]
    intermediate_size_before: dict[str, int]
    steps: list[ReductionStep] = field(default_factory=list)
    text_length: int | None = None

    @property
    def parameter_reduction(self) -> float:
        """Share of the parameters removed."""
        return 1.0 - self.after["parameters"] / self.before["parameters"]

    @property
    def flop_reduction(self) -> float:
        """Share of the forward FLOPs removed."""
        return 1.0 - self.after["flops"] / self.before["flops"]

    def to_record(self) -> dict[str, Any]:
        """The recipe saved as ``reduction.json``."""
        methods = sorted({step.importance for step in self.steps})
        return {
            "method": "structured MLP reduction",
            "architecture": self.before["architecture"],
            "importance": methods,
            "importance_references": [IMPORTANCE_CITATIONS[m] for m in methods],
            "selection": "importance lost per FLOP saved; every layer of a tower cut alike",
            "intermediate_size": {
                "before": self.intermediate_size_before,
                "after": {t.name: t.intermediate_size for t in mlp_towers(self.model)},
            },
            "parameters": {
                "before": self.before["parameters"],
                "after": self.after["parameters"],
                "reduction": self.parameter_reduction,
            },
            "flops": {
                "before": self.before["flops"],
                "after": self.after["flops"],
                "reduction": self.flop_reduction,
                "text_tokens": self.before.get("text_tokens"),
                "convention": FLOPS_CONVENTION,
            },
            "steps": [step.to_record() for step in self.steps],
        }


def _step_share(
    result: ReductionResult, step_flops: float | None, target_flops: float | None
) -> float | None:
    """The share of the current FLOPs the next step saves: ``step_flops``, or only what is left
    of the FLOP target when a full step would overshoot it."""
    if step_flops is None or target_flops is None:
        return step_flops
    left = 1.0 - (1.0 - target_flops) * result.before["flops"] / result.after["flops"]
    return left if 0.0 < left < step_flops else step_flops


def _reached(result: ReductionResult, parameters: float | None, flops: float | None) -> bool:
    return (parameters is None or result.parameter_reduction >= parameters) and (
        flops is None or result.flop_reduction >= flops
    )


def reduce_and_retrain(
    model: PreTrainedModel,
    batches: Iterable[Any] | None = None,
    *,
    retrain: Retrain | None = None,
    target_parameters: float | None = None,
    target_flops: float | None = None,
    step_neurons: int | None = None,
    step_flops: float | None = None,
    max_steps: int = 50,
    towers: Sequence[str] | None = None,
    loss_fn: LossFunction = model_loss,
    text_length: int | None = None,
    on_step: Callable[[ReductionStep, PreTrainedModel], None] | None = None,
) -> ReductionResult:
    """Reduce the MLPs of ``model`` step by step, retraining after each, until the targets.

    Args:
        model: a ViT or CLIP model (left as it is; each step builds a narrower one).
        batches: the batches each step scores neurons on (Taylor); ``None``: weight magnitude.
            Every step reads them again (a one-shot iterator is read into a list first).
        retrain: ``(model, step_index) -> None``, trains the narrowed model in place (e.g.
            :func:`trainer_retrain`); ``None``: no retraining.
        target_parameters, target_flops: the shares of parameters and of forward FLOPs to
            remove (both must be reached; at least one given).
        step_neurons, step_flops: the size of one step (see :func:`reduce_mlp`: cuts of one
            neuron per layer, or a share of the current FLOPs); exactly one.
        max_steps: give up (an error) after this many steps.
        towers, loss_fn, text_length: as in :func:`reduce_mlp`.
        on_step: called after each step's retraining with its record and the model.
    """
    if target_parameters is None and target_flops is None:
        raise HfSoupsError("give target_parameters or target_flops (shares to remove)")
    if (step_neurons is None) == (step_flops is None):
        raise HfSoupsError("give exactly one of step_neurons or step_flops (the size of a step)")
    if isinstance(batches, Iterable) and iter(batches) is batches:
        batches = list(batches)
    counts = model_counts(model, text_length=text_length)
    result = ReductionResult(
        model,
        counts,
        counts,
        {t.name: t.intermediate_size for t in mlp_towers(model)},
        text_length=text_length,
    )
    while not _reached(result, target_parameters, target_flops):
        if len(result.steps) == max_steps:
            raise HfSoupsError(
                f"max_steps={max_steps} steps reached a parameter reduction of "
                f"{result.parameter_reduction:.3f} and FLOP reduction of "
                f"{result.flop_reduction:.3f}, short of the targets"
            )
        narrowed, step = reduce_mlp(
            result.model,
            batches,
            neurons=step_neurons,
            flops=_step_share(result, step_flops, target_flops),
            towers=towers,
            loss_fn=loss_fn,
            text_length=text_length,
        )
        if retrain is not None:
            retrain(narrowed, len(result.steps))
        result = dataclasses.replace(
            result,
            model=narrowed,
            after=model_counts(narrowed, text_length=text_length),
            steps=[*result.steps, step],
        )
        logger.info(
            "reduction step %d: parameters -%.3f, FLOPs -%.3f",
            len(result.steps),
            result.parameter_reduction,
            result.flop_reduction,
        )
        if on_step is not None:
            on_step(step, narrowed)
    return result


def trainer_retrain(args: TrainingArguments, train_dataset: Any, **trainer_kwargs: Any) -> Retrain:
    """A ``retrain`` for :func:`reduce_and_retrain`: a ``Trainer`` run of ``args`` on the
    model itself (which must return a loss), writing under ``output_dir/step-<n>``."""

    def retrain(model: PreTrainedModel, step: int) -> None:
        step_args = dataclasses.replace(
            args, output_dir=str(Path(args.output_dir) / f"step-{step}")
        )
        Trainer(model=model, args=step_args, train_dataset=train_dataset, **trainer_kwargs).train()
        model.eval()

    return retrain


def save_reduced(
    result: ReductionResult,
    out_dir: str | os.PathLike,
    *,
    processing_class: Any = None,
    base_model: str | None = None,
    model_name: str | None = None,
    task: Any = None,
    overwrite: bool = False,
) -> Path:
    """``save_pretrained`` the reduced model with ``reduction.json`` (its recipe) and its model
    card (``README.md``, :mod:`hf_soups.cards.reduction`) beside it; the folder loads with
    plain ``from_pretrained``.

    ``result`` is what :func:`reduce_and_retrain` returns; the narrowed model of a single
    :func:`~hf_soups.pruning.reduction.reduce_mlp` step saves with its own ``save_pretrained``.

    Args:
        processing_class: a processor or tokenizer saved with the model.
        base_model: the Hub id of the model the reduction started from, for the card's
            metadata (``base_model``) and the record.
        model_name: the card's title; default: the folder's name.
        task: a :class:`~hf_soups.models.ZeroShotTask` for the card's zero-shot snippet.

    Raises:
        HfSoupsError: ``base_model`` is not a Hub repo id.
    """
    if base_model is not None and not is_repo_id(base_model):
        raise HfSoupsError(f"base_model {base_model!r} is not a Hub repo id ('org/name')")
    record = result.to_record() | ({"base_model": base_model} if base_model else {})
    with atomic_output_dir(out_dir, overwrite=overwrite) as work_dir:
        result.model.save_pretrained(work_dir)
        if processing_class is not None:
            processing_class.save_pretrained(work_dir)
        (work_dir / REDUCTION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        write_reduction_card(work_dir, model_name=model_name, task=task)
    return Path(out_dir)
