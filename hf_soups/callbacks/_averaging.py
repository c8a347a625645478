"""What SWA and EMA callbacks share: the averaged weights and the Trainer plumbing around them.

The average is a float32 copy of a model's floating tensors, kept on the model's device and
keyed by the model's in-memory ``state_dict`` names. It enters a model only through
``load_state_dict`` and leaves for disk only through ``save_pretrained``, so checkpoints written
from it are ordinary model folders whatever the model's on-disk naming. Its running state (the
tensors plus a small JSON record) rides along with every Trainer checkpoint, so a resumed run
continues the same average.
"""

from __future__ import annotations

import json
import logging
import os
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainerState, TrainingArguments

from hf_soups.callbacks._batchnorm import update_bn
from hf_soups.callbacks._ledger import Weights, weights_ledger
from hf_soups.callbacks._trainer_io import (
    checkpoint_dir,
    distributed_world_size,
    require_save_pretrained,
    save_model_folder,
    wait_for_everyone,
    write_json_atomic,
)
from hf_soups.errors import CorruptedCheckpointError, HfSoupsError
from hf_soups.output import check_output_dir

logger = logging.getLogger(__name__)


def _averaged_tensors(
    model: torch.nn.Module, include_buffers: bool
) -> tuple[list[str], list[torch.Tensor]]:
    """The model's floating tensors to average, by in-memory ``state_dict`` name.

    Tied parameters appear once (``named_parameters`` drops duplicates); buffers only when
    asked and only persistent ones, as those are what ``state_dict`` and ``load_state_dict`` see.
    """
    names, tensors = [], []
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point():
            names.append(name)
            tensors.append(parameter)
    if include_buffers:
        persistent = set(model.state_dict(keep_vars=True))
        for name, buffer in model.named_buffers():
            if name in persistent and buffer.is_floating_point():
                names.append(name)
                tensors.append(buffer)
    return names, tensors


class AveragedWeights:
    """A float32 running average of a model's floating tensors, on the model's device.

    Args:
        model: The model whose tensors are averaged. Its parameters (and persistent floating
            buffers when ``include_buffers``) are captured by reference, so updates read their
            current values without walking the module tree each step.
        include_buffers: Average floating buffers (BatchNorm statistics, ...) too. Otherwise
            the model keeps its own buffers when the average is loaded into it.
    """

    def __init__(self, model: torch.nn.Module, include_buffers: bool) -> None:
        self.names, self._sources = _averaged_tensors(model, include_buffers)
        self.tensors = [
            torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in self._sources
        ]
        # Sources already in float32 feed foreach ops directly; others are upcast per update.
        self._float32 = [i for i, t in enumerate(self._sources) if t.dtype == torch.float32]
        self._other = [i for i, t in enumerate(self._sources) if t.dtype != torch.float32]

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Set the average to the model's current values."""
        torch._foreach_copy_(self.tensors, [s.detach() for s in self._sources])

    @torch.no_grad()
    def lerp_toward_model(self, weight: float) -> None:
        """``average += weight * (model - average)`` for every tensor, with fused foreach ops."""
        if self._float32:
            torch._foreach_lerp_(
                [self.tensors[i] for i in self._float32],
                [self._sources[i].detach() for i in self._float32],
                weight,
            )
        if self._other:
            torch._foreach_lerp_(
                [self.tensors[i] for i in self._other],
                [self._sources[i].detach().float() for i in self._other],
                weight,
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by in-memory name (live tensors: clone before changing them)."""
        return dict(zip(self.names, self.tensors, strict=True))

    @torch.no_grad()
    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Replace the average with ``tensors`` (as written by :meth:`state_dict`)."""
        missing = [name for name in self.names if name not in tensors]
        unexpected = sorted(set(tensors) - set(self.names))
        if missing or unexpected:
            raise CorruptedCheckpointError(
                f"{source}: averaged weights do not match the model "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        for name, target in zip(self.names, self.tensors, strict=True):
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise CorruptedCheckpointError(
                    f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                    f"the model's has {tuple(target.shape)}"
                )
            target.copy_(tensors[name])

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module) -> None:
        """Write the average into ``model`` through ``load_state_dict`` (cast to its dtypes)."""
        result = model.load_state_dict(self.state_dict(), strict=False)
        if result.unexpected_keys:
            raise HfSoupsError(
                f"averaged weights do not fit {type(model).__name__}: unexpected tensors "
                f"{result.unexpected_keys[:5]}"
            )

    @torch.no_grad()
    def broadcast_buffers_from_main(self, model: torch.nn.Module) -> None:
        """Make averaged buffers identical across ranks.

        Parameters agree on every rank by construction of data-parallel training, but buffers
        (BatchNorm statistics) are updated from each rank's own batch after DDP's broadcast,
        so their averages drift apart; the main process's copy is taken as the reference.
        """
        if distributed_world_size() <= 1:
            return
        parameters = {name for name, _ in model.named_parameters()}
        for name, tensor in zip(self.names, self.tensors, strict=True):
            if name not in parameters:
                dist.broadcast(tensor, src=0)


@contextmanager
def swapped_in(averaged: AveragedWeights, model: torch.nn.Module) -> Iterator[None]:
    """Load ``averaged`` into ``model`` for the duration of the block, then restore the model.

    Every parameter and buffer is backed up, so changes made inside the block (such as a
    BatchNorm statistics update) are undone too.
    """
    backup = [(t, t.detach().clone()) for t in _all_tensors(model)]
    averaged.load_into(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for live, saved in backup:
                live.copy_(saved)


def _all_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for _, p in model.named_parameters()] + [b for _, b in model.named_buffers()]


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
        self._eval_backup = [(t, t.detach().clone()) for t in _all_tensors(model)]
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
