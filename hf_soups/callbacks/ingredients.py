"""Collect soup ingredients from ``transformers`` training runs.

Each run of a hyperparameter sweep ends with a model folder in a shared sweep folder, holding
``ingredient.json`` (hyperparameters, step, eval metrics), so that
``SoupBuilder.from_pretrained(sweep_dir)`` finds every ingredient and can rank them.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerState, TrainingArguments

from hf_soups.callbacks._ledger import TRAINING, Weights, weights_ledger
from hf_soups.callbacks._trainer_io import (
    require_save_pretrained,
    save_model_folder,
    wait_for_everyone,
    write_json_atomic,
)
from hf_soups.ingredients import INGREDIENT_METADATA_FILE
from hf_soups.output import check_output_dir

logger = logging.getLogger(__name__)

#: TrainingArguments recorded as an ingredient's hyperparameters.
RECORDED_ARGUMENTS = (
    "learning_rate",
    "weight_decay",
    "seed",
    "num_train_epochs",
    "max_steps",
    "label_smoothing_factor",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
)
_SPEED_SUFFIXES = (
    "_runtime",
    "_samples_per_second",
    "_steps_per_second",
    "_model_preparation_time",
)


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def hyperparameters(args: TrainingArguments, extras: Mapping[str, Any] | None = None) -> dict:
    """The hyperparameters an ingredient records: :data:`RECORDED_ARGUMENTS`, world size, extras."""
    record = {
        name: _json_value(getattr(args, name)) for name in RECORDED_ARGUMENTS if hasattr(args, name)
    }
    record["world_size"] = args.world_size
    record.update(extras or {})
    return record


def eval_metrics_at(state: TrainerState, step: int, prefix: str = "eval_") -> dict[str, float]:
    """Evaluation metrics logged at ``step`` (merged over eval datasets), without speed figures."""
    metrics: dict[str, float] = {}
    for entry in state.log_history:
        if entry.get("step") != step:
            continue
        for key, value in entry.items():
            if key.startswith(prefix) and not key.endswith(_SPEED_SUFFIXES):
                metrics[key] = value
    return metrics


def last_eval_step(state: TrainerState, prefix: str = "eval_") -> int | None:
    """The latest step at which evaluation metrics were logged."""
    steps = [e["step"] for e in state.log_history if any(k.startswith(prefix) for k in e)]
    return max(steps) if steps else None


class IngredientCallback(TrainerCallback):
    """Save the trained model (and optionally snapshots along training) as soup ingredients.

    At the end of training the model is written with ``save_pretrained`` to
    ``sweep_dir/<name>/`` together with the processor/tokenizer the Trainer holds and
    ``ingredient.json``::

        {"hyperparameters": {learning_rate, weight_decay, seed, ..., world_size, **extras},
         "step": <optimizer step of the weights>,
         "weights": <which weights: "training weights at step 6", "SWACallback's average ...">,
         "metrics": {<eval metrics logged at that step, or at the last evaluation>},
         "metrics_step": <step those metrics were computed at, or null>}

    ``metrics`` only ever describe the saved weights: the training weights when those are saved
    (of the step ``metrics_step`` names), an average only when that very average was evaluated
    (``evaluate_with_average`` with an evaluation at the last step). When an averaging
    callback's evaluation saw other weights than those saved, or when it swaps its average in
    after the last evaluation, ``metrics`` is empty, ``metrics_step`` null, and the logged
    metrics go to ``"metrics_of_other_weights": {"weights", "step", "metrics"}``, with a
    warning; evaluate the ingredient folder to score it.

    With ``every_n_steps``, snapshots are also written to ``sweep_dir/<name>-step<k>/`` every
    that many optimizer steps, as Fast Geometric Ensembling collects the cycle ends of a cyclical
    learning rate; a snapshot's metrics are filled in when the Trainer evaluates at that step.
    With ``load_best_model_at_end`` the final ingredient is the best checkpoint, recorded with
    its own step and metrics. Only the main process writes. Listed after an
    :class:`SWACallback` or :class:`EMACallback` with ``swap_at_end``, the final ingredient is
    the averaged model (callbacks run in list order).

    Args:
        sweep_dir: Folder collecting the ingredients of a sweep (default: ``args.output_dir``).
        name: Ingredient folder name (default: built from learning rate, weight decay, seed).
        every_n_steps: Also snapshot every this many optimizer steps.
        save_final: Write the final ingredient at the end of training.
        extra_hyperparameters: Added to the recorded hyperparameters (JSON values).
        overwrite: Replace existing ingredient folders of the same name.
    """

    def __init__(
        self,
        sweep_dir: str | os.PathLike | None = None,
        name: str | None = None,
        every_n_steps: int | None = None,
        save_final: bool = True,
        extra_hyperparameters: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if name is not None and (not name or Path(name).name != name):
            raise ValueError(f"name must be a plain folder name, got {name!r}")
        self.sweep_dir = Path(sweep_dir) if sweep_dir is not None else None
        self.name = name
        self.every_n_steps = every_n_steps
        self.save_final = save_final
        self.extra_hyperparameters = dict(extra_hyperparameters or {})
        self.overwrite = overwrite
        self.written: list[Path] = []
        self._snapshots: dict[int, Path] = {}

    def ingredient_dir(self, args: TrainingArguments, step: int | None = None) -> Path:
        """Folder of the final ingredient (``step=None``) or of the snapshot at ``step``."""
        sweep_dir = self.sweep_dir if self.sweep_dir is not None else Path(args.output_dir)
        name = self.name or f"lr{args.learning_rate:g}-wd{args.weight_decay:g}-seed{args.seed}"
        return sweep_dir / (name if step is None else f"{name}-step{step}")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        require_save_pretrained(model, "IngredientCallback")
        self.written = []
        self._snapshots = {}
        if self.save_final and args.should_save:
            check_output_dir(self.ingredient_dir(args), self.overwrite)

    def on_optimizer_step(self, args, state, control, model=None, processing_class=None, **kwargs):
        # Right after the update, before on_step_end, where an averaging callback may swap its
        # weights in for evaluation. The Trainer increments global_step after this event.
        step = state.global_step + 1
        if self.every_n_steps is None or step % self.every_n_steps:
            return
        target = self.ingredient_dir(args, step)
        self._write(args, state, model, processing_class, target, Weights(TRAINING, step), {}, None)
        self._snapshots[step] = target

    def on_evaluate(self, args, state, control, **kwargs):
        # The Trainer evaluates after on_step_end: complete the snapshot of this step.
        step = state.global_step
        target = self._snapshots.get(step)
        if target is None or not args.should_save:
            return
        record = self._record(
            args, state, Weights(TRAINING, step), eval_metrics_at(state, step), step, target
        )
        write_json_atomic(target / INGREDIENT_METADATA_FILE, record)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.save_final:
            return
        step = state.global_step
        if args.load_best_model_at_end and state.best_global_step:
            step = state.best_global_step
        # Callbacks listed before this one may have loaded other weights (an average).
        saved = weights_ledger(state).weights_held(step)
        metrics_step = saved.step if eval_metrics_at(state, saved.step) else last_eval_step(state)
        metrics = eval_metrics_at(state, metrics_step) if metrics_step is not None else {}
        target = self.ingredient_dir(args)
        self._write(args, state, model, processing_class, target, saved, metrics, metrics_step)

    def _record(
        self,
        args: TrainingArguments,
        state: TrainerState,
        saved: Weights,
        metrics: dict,
        metrics_step: int | None,
        target: Path,
    ) -> dict:
        record = {
            "hyperparameters": hyperparameters(args, self.extra_hyperparameters),
            "step": saved.step,
            "weights": saved.describe(),
            "metrics": metrics,
            "metrics_step": metrics_step,
        }
        if metrics_step is None:
            return record
        evaluated = weights_ledger(state).weights_evaluated_at(metrics_step)
        # Training weights of an earlier step are the documented fallback (metrics_step says so).
        if evaluated == saved or (evaluated.is_training and saved.is_training):
            return record
        logger.warning(
            "%s: the metrics logged at step %d are those of the %s, not of the %s saved; they "
            "are recorded as metrics_of_other_weights (evaluate the folder to score it)",
            target,
            metrics_step,
            evaluated.describe(),
            saved.describe(),
        )
        record.update(
            metrics={},
            metrics_step=None,
            metrics_of_other_weights={
                "weights": evaluated.describe(),
                "step": metrics_step,
                "metrics": metrics,
            },
        )
        return record

    def _write(
        self,
        args: TrainingArguments,
        state: TrainerState,
        model: Any,
        processing_class: Any,
        target: Path,
        saved: Weights,
        metrics: dict,
        metrics_step: int | None,
    ) -> None:
        if args.should_save:
            record = self._record(args, state, saved, metrics, metrics_step, target)
            save_model_folder(
                model,
                target,
                processing_class=processing_class,
                extra_files={INGREDIENT_METADATA_FILE: record},
                overwrite=self.overwrite,
            )
            self.written.append(target)
            logger.info("Saved ingredient %s (%s)", target, saved.describe())
        wait_for_everyone()
