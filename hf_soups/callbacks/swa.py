"""Stochastic Weight Averaging (Izmailov et al., 2018) as a ``transformers`` Trainer callback."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Literal

from transformers import TrainerState, TrainingArguments

from hf_soups.callbacks._averaging import WeightAveragingCallback

logger = logging.getLogger(__name__)


class SWACallback(WeightAveragingCallback):
    """Average the weights seen along training with equal weights, as SWA does.

    From optimizer step ``swa_start`` on, the weights after every ``every_n_steps``-th optimizer
    step join a float32 running mean kept on the model's device; the result equals that of
    :class:`torch.optim.swa_utils.AveragedModel` fed the same weights. Steps count optimizer
    updates, so gradient accumulation does not change the schedule. A scheduled step that mixed
    precision skipped (non-finite gradients: the weights are still the previous step's) is not
    averaged, so no weights count twice. For a cyclical learning rate (FGE / cyclic SWA), set
    ``every_n_steps`` to the cycle length and ``swa_start`` to the end of the first cycle, so
    that the weights at each cycle end are averaged.

    With ``swa_lr`` set, the learning rate of every optimizer step after ``swa_start`` follows
    :class:`torch.optim.swa_utils.SWALR`: it anneals from the rate in use at step ``swa_start``
    to ``swa_lr`` over ``anneal_steps`` steps (cosine or linear), then stays there, overriding
    the Trainer's scheduler. The Trainer still logs its own scheduler's rate.

    At the end of training the averaged weights are loaded into the model (``swap_at_end``),
    so ``trainer.save_model()`` and ``trainer.evaluate()`` use them, and/or written to
    ``save_dir`` with ``save_pretrained``. With ``bn_update`` (the default) BatchNorm
    statistics are then recomputed for the averaged weights with one pass over the Trainer's
    training dataloader, as :func:`torch.optim.swa_utils.update_bn` does; models without
    BatchNorm are left alone.

    Args:
        swa_start: First optimizer step whose weights are averaged: an ``int`` >= 1, or a
            ``float`` in [0, 1) read as a fraction of the run's total optimizer steps.
        every_n_steps: Average every this many optimizer steps after ``swa_start``.
        swa_lr: Learning rate of the SWA phase, one value or one per optimizer param group;
            ``None`` leaves the Trainer's schedule untouched.
        anneal_steps: Steps over which the rate anneals to ``swa_lr`` (0: switch at once).
        anneal_strategy: ``"cos"`` or ``"linear"``, as in ``SWALR``.
        bn_update: Recompute BatchNorm statistics for the averaged weights at the end.
        bn_update_max_batches: Stop the BatchNorm pass after this many batches.
        average_buffers: Average floating buffers as well (``AveragedModel(use_buffers=True)``);
            otherwise the model's own buffers are kept when the average is loaded.
        evaluate_with_average: Evaluate on the averaged weights during training (once any
            exist), swapping back to the training weights right after each evaluation.
        swap_at_end: Load the averaged weights into the model when training ends. Only one
            callback of a run may (another SWA, EMA or WiSE-FT callback listed before this
            one with ``swap_at_end`` raises :class:`~hf_soups.errors.CallbackConflictError`
            when training begins).
        save_dir: Also write the averaged model there (with the processor/tokenizer).
        overwrite: Replace an existing non-empty ``save_dir``.
    """

    state_name = "swa"

    def __init__(
        self,
        swa_start: int | float = 0.75,
        every_n_steps: int = 1,
        swa_lr: float | Sequence[float] | None = None,
        anneal_steps: int = 10,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        bn_update: bool = True,
        bn_update_max_batches: int | None = None,
        average_buffers: bool = False,
        evaluate_with_average: bool = False,
        swap_at_end: bool = True,
        save_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__(
            average_buffers=average_buffers,
            evaluate_with_average=evaluate_with_average,
            swap_at_end=swap_at_end,
            save_dir=save_dir,
            bn_update=bn_update,
            bn_update_max_batches=bn_update_max_batches,
            overwrite=overwrite,
        )
        if isinstance(swa_start, bool) or not isinstance(swa_start, (int, float)):
            raise ValueError(
                f"swa_start must be an int step or a float fraction, got {swa_start!r}"
            )
        if isinstance(swa_start, int) and swa_start < 1:
            raise ValueError(f"swa_start as a step must be >= 1, got {swa_start}")
        if isinstance(swa_start, float) and not 0.0 <= swa_start < 1.0:
            raise ValueError(f"swa_start as a fraction must be in [0, 1), got {swa_start}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.swa_start = swa_start
        self.every_n_steps = every_n_steps
        self.swa_lr = swa_lr
        self.anneal_steps = anneal_steps
        self.anneal_strategy = anneal_strategy
        self.start_step: int | None = None
        self._lr_at_start: list[float] | None = None

    def _prepare(self, args: TrainingArguments, state: TrainerState) -> None:
        if isinstance(self.swa_start, float):
            self.start_step = max(1, math.floor(self.swa_start * state.max_steps))
        else:
            self.start_step = self.swa_start
        if self.start_step > state.max_steps:
            logger.warning(
                "SWA starts at step %d but training has %d optimizer steps: nothing will be averaged",
                self.start_step,
                state.max_steps,
            )
        self._lr_at_start = None

    def is_averaging_step(self, step: int) -> bool:
        """Whether the weights after optimizer step ``step`` (1-based) join the average."""
        return step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0

    def _update(self, step: int, state: TrainerState) -> None:
        if not self.is_averaging_step(step):
            return
        if self.n_averaged == 0:
            self.averaged.copy_from_model()
        else:
            self.averaged.lerp_toward_model(1.0 / (self.n_averaged + 1))
        self.n_averaged += 1

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.swa_lr is None or optimizer is None:
            return
        step = state.global_step + 1  # the optimizer step about to run
        if step == self.start_step:
            self._lr_at_start = [float(group["lr"]) for group in optimizer.param_groups]
            logger.info("SWA learning-rate phase begins after step %d", step)
        elif step > self.start_step:
            if self._lr_at_start is None:
                # Resumed past swa_start from a checkpoint without SWA state.
                self._lr_at_start = [float(group["lr"]) for group in optimizer.param_groups]
                logger.warning(
                    "SWA: the learning rate at step %d is unknown (no SWA state in the checkpoint); "
                    "annealing from the current rate %s instead",
                    self.start_step,
                    self._lr_at_start,
                )
            for group, lr in zip(optimizer.param_groups, self.swa_lr_at(step), strict=True):
                group["lr"] = lr

    def swa_lr_at(self, step: int) -> list[float]:
        """Per-group learning rate of optimizer step ``step`` (> ``swa_start``), as SWALR sets it."""
        swa_lrs = self._swa_lrs(len(self._lr_at_start))
        progress = min(1.0, (step - self.start_step) / max(1, self.anneal_steps))
        if self.anneal_strategy == "cos":
            alpha = (1 - math.cos(math.pi * progress)) / 2
        else:
            alpha = progress
        return [
            swa * alpha + lr * (1 - alpha)
            for swa, lr in zip(swa_lrs, self._lr_at_start, strict=True)
        ]

    def _swa_lrs(self, n_groups: int) -> list[float]:
        if isinstance(self.swa_lr, (int, float)):
            return [float(self.swa_lr)] * n_groups
        swa_lrs = [float(lr) for lr in self.swa_lr]
        if len(swa_lrs) != n_groups:
            raise ValueError(
                f"swa_lr has {len(swa_lrs)} values but the optimizer has {n_groups} param groups"
            )
        return swa_lrs

    def _extra_state(self) -> dict:
        return {"start_step": self.start_step, "lr_at_start": self._lr_at_start}

    def _load_extra_state(self, record: dict) -> None:
        if record.get("start_step") not in (None, self.start_step):
            logger.warning(
                "The checkpoint's SWA started at step %s, this run's at %d; keeping this run's",
                record["start_step"],
                self.start_step,
            )
        self._lr_at_start = record.get("lr_at_start")
