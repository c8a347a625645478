"""WiSE-FT (Wortsman et al., 2022) at the end of ``transformers`` training, as a Trainer callback.

The weights the run starts from are written as a model folder before the first step, the
fine-tuned weights as another when training ends; :func:`hf_soups.patching.choose_wise_ft` then
sweeps the interpolation between the two folders, scores it and chooses the coefficient, and
:meth:`~hf_soups.patching.PatchResult.save_pretrained` writes the chosen model with its sweep
and plot. Both ends are ordinary model folders, so the interpolation, the scores and the
written model are exactly those of the standalone WiSE-FT tools, and the recipe in
``soup.json`` names folders that still exist.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments

from hf_soups.callbacks._ledger import Weights, weights_ledger
from hf_soups.callbacks._trainer_io import (
    checkpoint_dir,
    distributed_world_size,
    save_model_folder,
    wait_for_everyone,
    write_json_atomic,
)
from hf_soups.errors import CorruptedCheckpointError, HfSoupsError
from hf_soups.output import check_output_dir

# hf_soups.patching and hf_soups.models pull in matplotlib and open_clip: imported where used, so
# that importing hf_soups.callbacks for SWA or EMA does not pay for them.
if TYPE_CHECKING:
    from hf_soups.patching import PatchResult
    from hf_soups.patching.sweep import EvalSet

logger = logging.getLogger(__name__)

__all__ = ["WiSEFTCallback"]

#: Folder, inside ``args.output_dir``, holding the two ends when ``endpoints_dir`` is not given.
DEFAULT_ENDPOINTS_DIR = "wise_ft_endpoints"
ZERO_SHOT_DIR = "zero_shot"
FINE_TUNED_DIR = "fine_tuned"
#: File, inside each Trainer checkpoint, recording where the starting weights were written.
STATE_FILE = "hf_soups_wise_ft_state.json"


class WiSEFTCallback(TrainerCallback):
    """Interpolate the fine-tuned weights with the starting ones and keep the best mix.

    At the start of training (step 0) the model is written with ``save_pretrained`` to
    ``endpoints_dir/zero_shot/``, with the Trainer's processor/tokenizer. Every Trainer
    checkpoint records that folder, so a run resumed from a checkpoint interpolates with the
    weights training began from, not those it resumed from. When training ends (after the best
    checkpoint is loaded, with ``load_best_model_at_end``), the model is written to
    ``endpoints_dir/fine_tuned/``, and :func:`~hf_soups.patching.choose_wise_ft` scores
    ``theta(alpha) = (1 - alpha) * theta_start + alpha * theta_fine_tuned`` at every ``alpha``
    on the eval sets and chooses ``alpha``: by default the one maximising the mean of the
    in-distribution score and the mean shifted score, or with ``max_shifted_drop`` the best
    in-distribution score losing at most that much on each shifted set. The result is kept in
    :attr:`result`; the chosen model, with ``soup.json`` (sweep, rule, scores) and the sweep's
    plot, is written to ``save_dir``; with ``swap_at_end`` its weights are loaded into the
    model, so ``trainer.save_model()`` and ``trainer.evaluate()`` use them.

    Listed after an :class:`~hf_soups.callbacks.SWACallback` or
    :class:`~hf_soups.callbacks.EMACallback` with ``swap_at_end``, the fine-tuned end is the
    averaged model (callbacks run in list order). Listed before one, its chosen weights would be
    replaced by the average: that is refused when training begins.

    In a run over several processes every process takes part in the sweep (an
    :class:`~hf_soups.evaluation.Evaluator` splits its data across them and gathers the
    outputs, so all see the same scores), the main process's choice is adopted by all, and only
    the main process writes; every process ends with the same weights. Every process reads the
    two ends, so a run over several machines needs ``endpoints_dir`` on a shared file system
    (or ``save_on_each_node``). The sweep holds both ends and one interpolated model in memory
    besides the Trainer's model and optimizer.

    Args:
        in_distribution: Eval sets of the fine-tuning distribution, name ->
            :class:`~hf_soups.evaluation.Evaluator`, :class:`~hf_soups.patching.TaskSpec` or
            callable ``model -> score`` (higher is better). Held-out data: the choice is made
            on it.
        shifted: Eval sets of distribution shifts whose starting score should be kept.
        alphas: Coefficients to sweep (default: 0, 0.1, ..., 1).
        max_shifted_drop: Choose the best in-distribution score among the coefficients losing
            at most this much on each shifted set relative to ``alpha = 0`` (``0.01`` = one
            point of accuracy); ``None`` maximises the mean of the two groups.
        save_dir: Write the chosen model folder there.
        overwrite: Replace an existing non-empty ``save_dir``.
        swap_at_end: Load the chosen weights into the model when training ends.
        endpoints_dir: Where the two ends are written (default
            ``args.output_dir/wise_ft_endpoints``). They stay there: ``soup.json`` names them.
    """

    def __init__(
        self,
        in_distribution: Mapping[str, EvalSet],
        shifted: Mapping[str, EvalSet] | None = None,
        *,
        alphas: Sequence[float] | None = None,
        max_shifted_drop: float | None = None,
        save_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        swap_at_end: bool = True,
        endpoints_dir: str | os.PathLike | None = None,
    ) -> None:
        from hf_soups.patching import DEFAULT_ALPHAS
        from hf_soups.patching.sweep import check_alphas

        if not isinstance(in_distribution, Mapping) or not in_distribution:
            raise ValueError(
                "in_distribution must map at least one name to an eval set, got "
                f"{in_distribution!r}"
            )
        shifted = dict(shifted or {})
        overlap = sorted(set(in_distribution) & set(shifted))
        if overlap:
            raise ValueError(
                f"eval set {overlap[0]!r} is named in both in_distribution and shifted"
            )
        if max_shifted_drop is not None and max_shifted_drop < 0:
            raise ValueError(f"max_shifted_drop must be >= 0, got {max_shifted_drop}")
        self.in_distribution = dict(in_distribution)
        self.shifted = shifted
        self.alphas = check_alphas(DEFAULT_ALPHAS if alphas is None else alphas)
        self.max_shifted_drop = max_shifted_drop
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.overwrite = overwrite
        self.swap_at_end = swap_at_end
        self.endpoints_dir = Path(endpoints_dir) if endpoints_dir is not None else None
        self.zero_shot_dir: Path | None = None
        """The folder holding the weights training started from (set when training begins)."""
        self.result: PatchResult | None = None
        """The sweep and the choice (set when training ends)."""

    def resolved_endpoints_dir(self, args: TrainingArguments) -> Path:
        """The folder holding ``zero_shot/`` and ``fine_tuned/`` for this run."""
        if self.endpoints_dir is not None:
            return self.endpoints_dir
        return Path(args.output_dir) / DEFAULT_ENDPOINTS_DIR

    # ---- Trainer events ---------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        _require_folder_model(model)
        if self.swap_at_end:
            weights_ledger(state).claim_end_swap(type(self).__name__, builds_on_earlier=True)
        self.result = None
        if state.global_step > 0:
            self.zero_shot_dir = self._find_start(args, state.global_step)
            logger.info(
                "WiSE-FT: resuming at step %d; interpolating with the starting weights in %s",
                state.global_step,
                self.zero_shot_dir,
            )
            return
        if self.save_dir is not None and args.should_save:
            check_output_dir(self.save_dir, self.overwrite)
        self.zero_shot_dir = self.resolved_endpoints_dir(args) / ZERO_SHOT_DIR
        if args.should_save:
            # A fresh run starts from its own weights: an older snapshot here is replaced.
            save_model_folder(
                model, self.zero_shot_dir, processing_class=processing_class, overwrite=True
            )
            logger.info("WiSE-FT: saved the starting weights to %s", self.zero_shot_dir)
        wait_for_everyone()

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save or self.zero_shot_dir is None:
            return
        folder = checkpoint_dir(args, state.global_step)
        if not folder.is_dir():
            logger.warning(
                "%s: checkpoint folder not found; the WiSE-FT state is not saved with it", folder
            )
            return
        record = {"global_step": state.global_step, "zero_shot": str(self.zero_shot_dir.resolve())}
        write_json_atomic(folder / STATE_FILE, record)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        from hf_soups.patching import choose_wise_ft

        if self.zero_shot_dir is None:
            raise HfSoupsError("WiSEFTCallback: training ended before it began (no on_train_begin)")
        fine_tuned_dir = self.resolved_endpoints_dir(args) / FINE_TUNED_DIR
        if args.should_save:
            save_model_folder(
                model, fine_tuned_dir, processing_class=processing_class, overwrite=True
            )
        wait_for_everyone()
        show_progress = not args.disable_tqdm and args.process_index == 0
        result = choose_wise_ft(
            self.zero_shot_dir,
            fine_tuned_dir,
            in_distribution=self.in_distribution,
            shifted=self.shifted,
            alphas=self.alphas,
            max_shifted_drop=self.max_shifted_drop,
            device=args.device,
            progress=show_progress,
        )
        result = _adopt_main_process_choice(result)
        logger.info("WiSE-FT sweep:\n%s\n%s", result.sweep.table(), result.choice.describe())
        if self.save_dir is not None and args.should_save:
            result.save_pretrained(self.save_dir, overwrite=self.overwrite, progress=show_progress)
        wait_for_everyone()
        if self.swap_at_end:
            ledger = weights_ledger(state)
            trained_step = state.global_step
            if args.load_best_model_at_end and state.best_global_step:
                trained_step = state.best_global_step
            fine_tuned = ledger.weights_held(trained_step)
            _load_chosen_weights(model, result, self.save_dir)
            ledger.loaded = Weights(
                f"WiSE-FT interpolation at alpha={result.alpha:g} between the starting weights "
                f"and the {fine_tuned.source}",
                fine_tuned.step,
            )
            logger.info("WiSE-FT: loaded the weights at alpha=%g into the model", result.alpha)
        self.result = result

    # ---- internals --------------------------------------------------------------------------

    def _find_start(self, args: TrainingArguments, step: int) -> Path:
        """The starting weights of a resumed run: where its checkpoint says, else the default."""
        record_file = checkpoint_dir(args, step) / STATE_FILE
        default = self.resolved_endpoints_dir(args) / ZERO_SHOT_DIR
        folder = default
        if record_file.is_file():
            try:
                recorded = Path(json.loads(record_file.read_text())["zero_shot"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CorruptedCheckpointError(
                    f"{record_file}: unreadable WiSE-FT state ({error})"
                ) from error
            if recorded.is_dir():
                folder = recorded
            else:
                logger.warning(
                    "%s names %s, which is gone; looking for the starting weights in %s",
                    record_file,
                    recorded,
                    default,
                )
        else:
            logger.warning(
                "Resuming at step %d, but %s holds no WiSE-FT state (was the callback missing "
                "from the interrupted run?); looking for the starting weights in %s",
                step,
                record_file.parent,
                default,
            )
        from hf_soups.models.families import is_checkpoint

        if not is_checkpoint(folder):
            raise HfSoupsError(
                f"WiSE-FT: resuming at step {step}, but the weights training started from are "
                f"not in {folder}; they cannot be recovered from the checkpoint. Set "
                "endpoints_dir to where they were saved, or run hf_soups.patching.choose_wise_ft "
                "on the starting model's folder and the fine-tuned one after training"
            )
        return folder


def _require_folder_model(model: Any) -> None:
    """Fail before training for a model that cannot be written to and read from a folder."""
    from hf_soups.models import OpenCLIPZeroShotClassifier

    if not isinstance(model, (PreTrainedModel, OpenCLIPZeroShotClassifier)):
        raise HfSoupsError(
            f"WiSEFTCallback interpolates whole model folders, but the model is a "
            f"{type(model).__name__}; use a transformers PreTrainedModel or an "
            "OpenCLIPZeroShotClassifier (merge PEFT adapters into the model first)"
        )


def _adopt_main_process_choice(result: PatchResult) -> PatchResult:
    """Give every process the main process's sweep and choice.

    Evaluators gather their outputs, so every process computes the same scores; a callable eval
    set that scores only its own process's data would not, and the processes must still agree
    on the weights they end with.
    """
    if distributed_world_size() <= 1:
        return result
    payload = [(result.sweep, result.choice)]
    dist.broadcast_object_list(payload, src=0)
    sweep, choice = payload[0]
    if choice.alpha != result.alpha:
        logger.warning(
            "process %d chose alpha=%g from its own scores, the main process alpha=%g; using the "
            "main process's (do the eval sets score the same data on every process?)",
            dist.get_rank(),
            result.alpha,
            choice.alpha,
        )
    return dataclasses.replace(result, sweep=sweep, choice=choice)


@torch.no_grad()
def _load_chosen_weights(model: torch.nn.Module, result: PatchResult, written: Path | None) -> None:
    """Load the chosen interpolation into ``model``, from the written folder when there is one.

    Both models are of the class ``config.json`` names, so their in-memory ``state_dict`` names
    agree whatever the on-disk naming; ``load_state_dict`` casts to the model's dtypes and
    devices.
    """
    from hf_soups.models import load_model

    chosen = load_model(written) if written is not None else result.to_model()
    try:
        model.load_state_dict(chosen.state_dict(), strict=True)
    except RuntimeError as error:
        source = written if written is not None else f"the interpolation at alpha={result.alpha:g}"
        raise HfSoupsError(
            f"WiSE-FT: the weights of {source} do not fit the trained {type(model).__name__}: "
            f"{error}"
        ) from error
