"""Exponential moving average of the weights as a ``transformers`` Trainer callback."""

from __future__ import annotations

import logging
import math
import os

from transformers import TrainerState

from hf_soups.callbacks._averaging import WeightAveragingCallback

logger = logging.getLogger(__name__)


class EMACallback(WeightAveragingCallback):
    """Keep an exponential moving average of the weights, updated after every optimizer step.

    After optimizer update ``u`` (1-based), ``ema = decay_u * ema + (1 - decay_u) * weights``,
    computed in float32 on the model's device with one fused ``torch._foreach_lerp_`` per dtype
    group. ``decay_u`` follows timm's ``ModelEmaV3``: 0 (a plain copy of the weights) for the
    first ``update_after_step + 1`` updates, then ``decay``, or with ``use_warmup``
    ``clamp(1 - (1 + k / warmup_gamma) ** -warmup_power, min_decay, decay)`` where
    ``k = u - update_after_step - 1``. Gradient accumulation does not change the schedule:
    updates count optimizer steps. An optimizer step that mixed precision skipped still counts:
    the weights stayed where they were for that step, and timm and diffusers update their
    averages after every step alike.

    Warm-up is on by default. A constant ``decay`` suits the long runs timm's defaults were set
    for (100k+ steps); after a fine-tune of 500 steps, ``0.9999`` leaves in the average 95% of
    the weights after the first step, which are nearly the pre-trained ones. With the warm-up
    the averaging window grows with the run, about ``(1 + k) ** warmup_power`` updates, so the
    average forgets its start (a 3e-10 share after 500 steps with the defaults); it needs no
    knowledge of the run's length, unlike a decay derived from it, and is what the schedule
    here already offered (timm's and diffusers' EMA warm-up). At the end of training a warning
    names the share of the first averaged weights still in the average
    (:meth:`first_weights_share`) when it is above a tenth.

    Evaluation during training can run on the averaged weights (``evaluate_with_average``),
    which are swapped in just before the Trainer evaluates and swapped out right after, before
    any checkpoint is written. The end of training works as for :class:`SWACallback`.

    Args:
        decay: Decay once warm (the weight of the old average), in [0, 1].
        min_decay: Lower bound of the warm-up decay.
        update_after_step: Updates that only copy the weights before averaging begins.
        use_warmup: Ramp the decay up with timm's power warm-up (on by default; off, the decay
            is ``decay`` from the second update on).
        warmup_gamma: Warm-up horizon (``gamma`` in timm).
        warmup_power: Warm-up exponent (``power`` in timm; 2/3 suits long runs, 3/4 short ones).
        average_buffers: Average floating buffers too (timm's default); otherwise the model
            keeps its own buffers when the average is loaded.
        evaluate_with_average: Evaluate on the averaged weights during training.
        swap_at_end: Load the averaged weights into the model when training ends. Only one
            callback of a run may (another SWA, EMA or WiSE-FT callback listed before this
            one with ``swap_at_end`` raises :class:`~hf_soups.errors.CallbackConflictError`
            when training begins).
        save_dir: Also write the averaged model there (with the processor/tokenizer).
        bn_update: Recompute BatchNorm statistics for the averaged weights at the end.
        bn_update_max_batches: Stop the BatchNorm pass after this many batches.
        overwrite: Replace an existing non-empty ``save_dir``.
    """

    state_name = "ema"
    averages_skipped_steps = True
    #: Above this share of the first averaged weights, the end of training warns.
    max_first_weights_share = 0.1

    def __init__(
        self,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = True,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        average_buffers: bool = True,
        evaluate_with_average: bool = False,
        swap_at_end: bool = True,
        save_dir: str | os.PathLike | None = None,
        bn_update: bool = False,
        bn_update_max_batches: int | None = None,
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
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if not 0.0 <= min_decay <= decay:
            raise ValueError(f"min_decay must be in [0, decay={decay}], got {min_decay}")
        if update_after_step < 0:
            raise ValueError(f"update_after_step must be >= 0, got {update_after_step}")
        if warmup_gamma <= 0 or warmup_power <= 0:
            raise ValueError(
                f"warmup_gamma and warmup_power must be > 0, got {warmup_gamma}, {warmup_power}"
            )
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power

    def decay_at(self, update: int) -> float:
        """Decay applied at optimizer update ``update`` (1-based), as timm's ModelEmaV3 computes it."""
        k = max(0, update - self.update_after_step - 1)
        if k <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        warm = 1 - (1 + k / self.warmup_gamma) ** -self.warmup_power
        return max(min(warm, self.decay), self.min_decay)

    def first_weights_share(self, last_update: int, first_update: int = 1) -> float:
        """Share, in the average after update ``last_update``, of the weights it started from.

        The average restarts as a copy of the weights at every update whose decay is 0 (the
        first ``update_after_step + 1`` updates, and ``first_update``, where averaging began);
        each later update ``u`` multiplies the share of those weights by ``decay_at(u)``. The
        share is ``decay ** (n - 1)`` after ``n`` averaging updates without warm-up, the
        product of the warm-up decays with it.
        """
        start = max(first_update, self.update_after_step + 1)
        if last_update <= start:
            return 1.0
        if not self.use_warmup:
            return self.decay ** (last_update - start)
        return math.prod(self.decay_at(update) for update in range(start + 1, last_update + 1))

    def on_train_end(self, args, state, control, **kwargs):
        if self.n_averaged > 0 and state.is_world_process_zero:
            last = state.global_step
            share = self.first_weights_share(last, first_update=last - self.n_averaged + 1)
            if share > self.max_first_weights_share:
                logger.warning(
                    "EMACallback: after %d updates the average still holds %.1f%% of the "
                    "weights of its first update, where training began (decay=%g, "
                    "use_warmup=%s); for a run this short use the warm-up or a lower decay",
                    self.n_averaged,
                    100 * share,
                    self.decay,
                    self.use_warmup,
                )
        super().on_train_end(args, state, control, **kwargs)

    def _update(self, step: int, state: TrainerState) -> None:
        decay = self.decay_at(step)
        if decay == 0.0 or self.n_averaged == 0:
            self.averaged.copy_from_model()
        else:
            self.averaged.lerp_toward_model(1.0 - decay)
        self.n_averaged += 1

    def _extra_state(self) -> dict:
        return {"decay": self.decay, "use_warmup": self.use_warmup}
