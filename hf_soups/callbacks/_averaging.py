"""What SWA and EMA callbacks share: the Trainer plumbing around the averaged weights
(:mod:`hf_soups.callbacks._weights`).

The average's running state (the tensors plus a small JSON record) rides along with every
Trainer checkpoint, so a resumed run continues the same average.
"""

from __future__ import annotations

import json
import logging
import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainerState, TrainingArguments

from hf_soups.callbacks._batchnorm import update_bn
from hf_soups.callbacks._ledger import Weights, weights_ledger
from hf_soups.callbacks._trainer_io import (
    checkpoint_dir,
    require_save_pretrained,
    save_model_folder,
    wait_for_everyone,
    write_json_atomic,
)
from hf_soups.callbacks._weights import AveragedWeights, all_tensors, swapped_in
from hf_soups.errors import CorruptedCheckpointError
from hf_soups.output import check_output_dir

logger = logging.getLogger(__name__)

_MIXED_EVALUATION = " on the first eval dataset, training weights on the others"


class WeightAveragingCallback(TrainerCallback):
    """Base of the averaging callbacks: state, evaluation swaps, checkpoints and the end of training.

    Subclasses say when and how the average moves (:meth:`_update`) and what else their state
    holds (:meth:`_extra_state`, :meth:`_load_extra_state`).
    """

    #: Stem of the files holding the callback's state inside a Trainer checkpoint folder.
    state_name: str = "averaging"
    #: Whether an optimizer step that mixed precision skipped (non-finite gradients, weights
    #: left unchanged) still moves the average.
    averages_skipped_steps: bool = False

    def __init__(
        self,
        *,
        average_buffers: bool,
        evaluate_with_average: bool,
        swap_at_end: bool,
        save_dir: str | os.PathLike | None,
        bn_update: bool,
        bn_update_max_batches: int | None,
        overwrite: bool,
    ) -> None:
        if bn_update_max_batches is not None and bn_update_max_batches < 1:
            raise ValueError(f"bn_update_max_batches must be >= 1, got {bn_update_max_batches}")
        self.average_buffers = average_buffers
        self.evaluate_with_average = evaluate_with_average
        self.swap_at_end = swap_at_end
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.bn_update = bn_update
        self.bn_update_max_batches = bn_update_max_batches
        self.overwrite = overwrite
        self.averaged: AveragedWeights | None = None
        self.n_averaged = 0
        self._eval_backup: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._eval_round_step: int | None = None
        self._warned_partial_eval = False
        self._loaded_from: tuple[Path, int] | None = None
        self._pending_state: tuple[dict, Path | None] | None = None
        self._scale_before_step: float | None = None

    # ---- what subclasses define -------------------------------------------------------------

    @abstractmethod
    def _update(self, step: int, state: TrainerState) -> None:
        """Move the average after optimizer step ``step`` (1-based, counting optimizer steps)."""

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, record: dict) -> None:
        pass

    def _prepare(self, args: TrainingArguments, state: TrainerState) -> None:
        """Resolve schedule settings that depend on the run (``state.max_steps``)."""

    # ---- public helpers ---------------------------------------------------------------------

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors (float32, on the model's device) by in-memory name; a copy.

        Empty until the first weights have been averaged.
        """
        if self.averaged is None or self.n_averaged == 0:
            return {}
        return {name: t.detach().clone() for name, t in self.averaged.state_dict().items()}

    def load_state(self, checkpoint: str | os.PathLike) -> None:
        """Restore the averaging state from a Trainer checkpoint folder written with this callback.

        Resuming with ``Trainer.train(resume_from_checkpoint=...)`` finds the state by itself in
        ``args.output_dir/checkpoint-<step>``; call this only for a checkpoint stored elsewhere,
        before ``train``.
        """
        checkpoint = Path(checkpoint)
        record_file, tensors_file = self._state_files(checkpoint)
        if not record_file.is_file():
            raise CorruptedCheckpointError(f"{record_file}: no {self.state_name} state here")
        record = json.loads(record_file.read_text())
        self._pending_state = (record, tensors_file if tensors_file.is_file() else None)
        self._loaded_from = (checkpoint, int(record["global_step"]))

    # ---- Trainer events ---------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.swap_at_end:
            weights_ledger(state).claim_end_swap(type(self).__name__, builds_on_earlier=False)
        if self.save_dir is not None:
            require_save_pretrained(model, "save_dir")
            if state.global_step == 0:
                check_output_dir(self.save_dir, self.overwrite)
        self._prepare(args, state)
        self.averaged = AveragedWeights(model, self.average_buffers)
        self.n_averaged = 0
        self._eval_backup = None
        if state.global_step > 0:
            self._restore(args, state)
        else:
            self._pending_state = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)
        self._scale_before_step = (
            scaler.get_scale()
            if not self.averages_skipped_steps and scaler is not None and scaler.is_enabled()
            else None
        )

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The Trainer increments global_step after this event: this is optimizer step global_step+1.
        step = state.global_step + 1
        if not self.averages_skipped_steps and self._step_was_skipped(optimizer):
            logger.debug(
                "%s: optimizer step %d was skipped (non-finite gradients); not averaged",
                type(self).__name__,
                step,
            )
            return
        self._update(step, state)

    def _step_was_skipped(self, optimizer: Any) -> bool:
        """Whether mixed precision skipped the optimizer step that just ran.

        accelerate's ``step_was_skipped`` (what the Trainer asks, after this event) infers a skip
        from the wrapped optimizer's ``step`` not being called. A GradScaler calls it anyway for
        an optimizer that handles scaling itself (fused AdamW, the Trainer's default), which
        then skips the update inside, so the flag stays False. A skip always makes the scaler
        back off its scale, which the scaler reports whatever the optimizer.
        """
        if getattr(optimizer, "step_was_skipped", False):
            return True
        if self._scale_before_step is None:
            return False
        return optimizer.scaler.get_scale() < self._scale_before_step

    # The Trainer has no event before an evaluation: DefaultFlowCallback (which runs first) sets
    # `should_evaluate` in on_step_end/on_epoch_end, and the evaluation follows right after.
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate:
            self._swap_in_for_evaluation(model, state)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate:
            self._swap_in_for_evaluation(model, state)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # Swapping back here, before the Trainer saves its checkpoint, keeps training weights in it.
        self._swap_back_after_evaluation()

    def on_prediction_step(self, args, state, control, **kwargs):
        if self._eval_backup is not None or self._eval_round_step != state.global_step:
            return
        # on_evaluate fires once per eval dataset when eval_dataset is a dict; the weights went
        # back after the first one, so the metrics logged at this step mix two sets of weights.
        if not self._warned_partial_eval:
            logger.warning(
                "%s: with several eval datasets only the first is evaluated on the averaged "
                "weights; the others see the training weights",
                type(self).__name__,
            )
            self._warned_partial_eval = True
        ledger = weights_ledger(state)
        evaluated = ledger.weights_evaluated_at(state.global_step)
        if not evaluated.source.endswith(_MIXED_EVALUATION):
            ledger.evaluated[state.global_step] = Weights(
                evaluated.source + _MIXED_EVALUATION, evaluated.step
            )

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save or self.averaged is None:
            return
        folder = checkpoint_dir(args, state.global_step)
        if not folder.is_dir():
            logger.warning(
                "%s: checkpoint folder not found; the %s state is not saved with it",
                folder,
                self.state_name,
            )
            return
        record_file, tensors_file = self._state_files(folder)
        record = {
            "global_step": state.global_step,
            "n_averaged": self.n_averaged,
            **self._extra_state(),
        }
        if self.n_averaged > 0:
            temporary = tensors_file.with_name(f".{tensors_file.name}.tmp-{os.getpid()}")
            cpu_tensors = {
                n: t.detach().cpu().contiguous() for n, t in self.averaged.state_dict().items()
            }
            save_file(cpu_tensors, temporary, metadata={"format": "pt"})
            os.replace(temporary, tensors_file)
        write_json_atomic(record_file, record)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._swap_back_after_evaluation()
        self._eval_round_step = None
        if self.averaged is None or self.n_averaged == 0:
            logger.warning(
                "%s: no weights were averaged (training ended at step %d); the model is left as "
                "trained and nothing is saved",
                type(self).__name__,
                state.global_step,
            )
            return
        self.averaged.broadcast_buffers_from_main(model)
        train_dataloader = kwargs.get("train_dataloader")
        if self.swap_at_end:
            self.averaged.load_into(model)
            recomputed = self._maybe_update_bn(model, train_dataloader)
            source = self._describe_average()
            weights_ledger(state).loaded = Weights(
                f"{source} with recomputed BatchNorm statistics" if recomputed else source,
                state.global_step,
            )
            self._save(args, model, processing_class)
            logger.info(
                "%s: loaded the average of %d weight sets into the model",
                type(self).__name__,
                self.n_averaged,
            )
        elif self.save_dir is not None:
            with swapped_in(self.averaged, model):
                self._maybe_update_bn(model, train_dataloader)
                self._save(args, model, processing_class)

    def _save(self, args: TrainingArguments, model: torch.nn.Module, processing_class: Any) -> None:
        if self.save_dir is None:
            return
        if args.should_save:
            save_model_folder(
                model, self.save_dir, processing_class=processing_class, overwrite=self.overwrite
            )
            logger.info("Saved the averaged model to %s", self.save_dir)
        wait_for_everyone()

    # ---- internals --------------------------------------------------------------------------

    def _state_files(self, folder: Path) -> tuple[Path, Path]:
        stem = f"hf_soups_{self.state_name}_state"
        return folder / f"{stem}.json", folder / f"{stem}.safetensors"

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        if self._loaded_from is None or self._loaded_from[1] != state.global_step:
            folder = checkpoint_dir(args, state.global_step)
            if not self._state_files(folder)[0].is_file():
                logger.warning(
                    "Resuming at step %d, but %s holds no %s state (was the callback missing "
                    "from the interrupted run, or is the checkpoint elsewhere? then call "
                    "load_state(folder) before train). The average restarts from here.",
                    state.global_step,
                    folder,
                    self.state_name,
                )
                return
            self.load_state(folder)
        record, tensors_file = self._pending_state
        self._pending_state = None
        n_averaged = int(record["n_averaged"])
        if n_averaged > 0:
            if tensors_file is None:
                raise CorruptedCheckpointError(
                    f"{self._loaded_from[0]}: the {self.state_name} state records {n_averaged} "
                    "averaged weight sets but its safetensors file is missing"
                )
            device_tensors = load_file(tensors_file, device=str(self.averaged.tensors[0].device))
            self.averaged.load_state_dict(device_tensors, str(tensors_file))
        self.n_averaged = n_averaged
        self._load_extra_state(record)
        logger.info(
            "Restored the %s state (%d averaged weight sets) from %s",
            self.state_name,
            n_averaged,
            self._loaded_from[0],
        )

    def _swap_in_for_evaluation(self, model: torch.nn.Module, state: TrainerState) -> None:
        if not self.evaluate_with_average or self.n_averaged == 0 or self._eval_backup is not None:
            return
        self._eval_round_step = state.global_step
        self.averaged.broadcast_buffers_from_main(model)
        self._eval_backup = [(t, t.detach().clone()) for t in all_tensors(model)]
        self.averaged.load_into(model)
        weights_ledger(state).evaluated[state.global_step] = Weights(
            self._describe_average(), state.global_step
        )

    def _describe_average(self) -> str:
        return f"{type(self).__name__}'s average of {self.n_averaged} weight sets"

    @torch.no_grad()
    def _swap_back_after_evaluation(self) -> None:
        if self._eval_backup is None:
            return
        for live, saved in self._eval_backup:
            live.copy_(saved)
        self._eval_backup = None

    def _maybe_update_bn(self, model: torch.nn.Module, train_dataloader: Any) -> bool:
        """Recompute BatchNorm statistics when asked; whether any were recomputed."""
        if not self.bn_update:
            return False
        if train_dataloader is None:
            logger.warning("No training dataloader available; BatchNorm statistics not updated")
            return False
        seen = update_bn(train_dataloader, model, max_batches=self.bn_update_max_batches)
        if seen:
            logger.info("Recomputed BatchNorm statistics over %d batches", seen)
        return seen > 0
