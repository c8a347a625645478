"""Iterative magnitude pruning with rewinding as a ``transformers`` Trainer callback.

Frankle & Carbin, "The lottery ticket hypothesis", ICLR 2019; rewinding to an early step:
Frankle, Dziugaite, Roy & Carbin, "Linear mode connectivity and the lottery ticket hypothesis",
ICML 2020.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from hf_soups.callbacks._trainer_io import checkpoint_dir, write_json_atomic
from hf_soups.errors import CorruptedCheckpointError
from hf_soups.pruning.magnitude import Magnitude
from hf_soups.pruning.mask_file import load_masks, saved_names, write_mask_file
from hf_soups.pruning.masks import SCOPES, apply_masks, density_of
from hf_soups.pruning.targets import prunable_parameters

logger = logging.getLogger(__name__)

_STATE_STEM = "hf_soups_pruning_state"


class IterativeMagnitudePruningCallback(TrainerCallback):
    """Prune ``prune_fraction`` of the remaining weights every ``round_steps`` optimizer steps,
    then rewind the surviving weights to their values after step ``rewind_step``.

    At the end of each round (optimizer step ``j * round_steps`` for ``j >= 1``, except the last
    step of training) the prunable weights (:func:`~hf_soups.pruning.prunable_parameters`) that
    survive are ranked by magnitude (``scope="global"`` or per ``"layer"``) and the smallest
    ``prune_fraction`` of them is pruned; every parameter then goes back to its value after
    step ``rewind_step`` (0: the initial weights; ``rewind_step < round_steps``), and the
    optimizer state is cleared, so each round retrains the ticket from step ``rewind_step`` as
    a fresh run would (the learning-rate schedule is not rewound: use a constant one, or one
    Trainer run per round as :func:`~hf_soups.pruning.sparse_soup_rounds` does).
    After ``r`` rounds the density is ``(1 - prune_fraction) ** r``.

    Masked weights stay exact zeros through every optimizer step: their gradients are zeroed as
    they are computed (a tensor hook, so gradient accumulation and clipping see zeros too) and
    the mask is re-applied right after each ``optimizer.step()`` (an optimizer post-hook, so
    weight decay cannot revive them, and so SWA/EMA callbacks, which average in
    ``on_optimizer_step``, only ever see masked weights, whatever the callback order). An
    average started before a rewind mixes rounds: start SWA after the last pruning.

    Checkpoints hold the mask as ``pruning_mask.safetensors`` (keyed by stored tensor names) and
    the rewind weights in ``hf_soups_pruning_state.safetensors``; ``resume_from_checkpoint``
    continues the same rounds.

    Args:
        round_steps: optimizer steps per round.
        prune_fraction: share of the remaining prunable weights pruned at each round's end.
        rewind_step: the step whose weights each round restarts from.
        scope: ``"global"`` (one threshold) or ``"layer"`` (each tensor pruned alike).
        include_heads: prune the classification head too.
        masks: initial masks (in-memory names, ``True`` kept), e.g. from SNIP at
            initialisation or :func:`~hf_soups.pruning.load_masks`; default: dense.
    """

    def __init__(
        self,
        round_steps: int,
        prune_fraction: float = 0.2,
        rewind_step: int = 0,
        *,
        scope: str = "global",
        include_heads: bool = False,
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if round_steps < 1:
            raise ValueError(f"round_steps must be >= 1, got {round_steps}")
        if not 0.0 <= prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in [0, 1), got {prune_fraction}")
        if not 0 <= rewind_step < round_steps:
            raise ValueError(f"rewind_step must be in [0, round_steps), got {rewind_step}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.round_steps = round_steps
        self.prune_fraction = prune_fraction
        self.rewind_step = rewind_step
        self.scope = scope
        self.include_heads = include_heads
        self.masks: dict[str, torch.Tensor] = dict(masks) if masks is not None else {}
        self.rounds_done = 0
        self._initial_masks = dict(self.masks)
        self._parameters: dict[str, torch.nn.Parameter] = {}
        self._rewind: dict[str, torch.Tensor] | None = None
        self._disk_names: dict[str, str] | None = None
        self._handles: list = []
        self._optimizer = None
        self._checkpoint: Path | None = None

    @property
    def density(self) -> float:
        """Share of the prunable weights kept now."""
        return density_of(self.masks)

    def load_state(self, checkpoint: str | os.PathLike) -> None:
        """Resume from a checkpoint stored outside ``args.output_dir`` (call before ``train``)."""
        self._checkpoint = Path(checkpoint)

    # ---- Trainer events ---------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._parameters = prunable_parameters(model, include_heads=self.include_heads)
        unknown = sorted(set(self._initial_masks) - set(self._parameters))
        if unknown:
            raise ValueError(f"masks name tensors that are not prunable here: {unknown[:5]}")
        self._disk_names = None
        self.masks = {
            name: self._initial_masks.get(name, torch.ones_like(p, dtype=torch.bool)).to(p.device)
            for name, p in self._parameters.items()
        }
        self.rounds_done = 0
        self._rewind = None
        if state.global_step > 0:
            self._restore(model, self._checkpoint or checkpoint_dir(args, state.global_step))
        apply_masks(self._parameters, self.masks)
        if state.global_step == self.rewind_step and self._rewind is None:
            self._snapshot(model)
        self._install_hooks(optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if step == self.rewind_step and self._rewind is None:
            self._snapshot(model)
        if step % self.round_steps == 0 and step < state.max_steps and self.prune_fraction > 0:
            self._prune_and_rewind(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:
            return
        folder = checkpoint_dir(args, state.global_step)
        if not folder.is_dir():
            logger.warning("%s: checkpoint folder not found; the mask is not saved", folder)
            return
        write_mask_file(model, self.masks, folder, names=self._stored_names(model))
        stem = folder / _STATE_STEM
        if self._rewind is not None:
            temporary = folder / f".{_STATE_STEM}.safetensors.tmp-{os.getpid()}"
            save_file(
                {n: t.cpu().contiguous() for n, t in self._rewind.items()},
                temporary,
                metadata={"format": "pt"},
            )
            os.replace(temporary, stem.with_suffix(".safetensors"))
        record = {"global_step": state.global_step, "rounds_done": self.rounds_done}
        write_json_atomic(stem.with_suffix(".json"), record)

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        logger.info(
            "IterativeMagnitudePruningCallback: %d rounds, density %.4f",
            self.rounds_done,
            self.density,
        )

    # ---- internals --------------------------------------------------------------------------

    def _install_hooks(self, optimizer) -> None:
        for name, parameter in self._parameters.items():
            self._handles.append(
                parameter.register_hook(lambda grad, name=name: grad * self.masks[name])
            )
        # accelerate wraps the torch optimizer; its step runs the torch optimizer's hooks.
        inner = getattr(optimizer, "optimizer", optimizer)
        self._optimizer = inner
        if inner is not None:
            self._handles.append(
                inner.register_step_post_hook(lambda *_: apply_masks(self._parameters, self.masks))
            )

    def _stored_names(self, model) -> dict[str, str]:
        # Found by a save_pretrained of the model: done once, and only when a mask is stored.
        if self._disk_names is None:
            self._disk_names = saved_names(model, list(self._parameters))
        return self._disk_names

    @torch.no_grad()
    def _snapshot(self, model) -> None:
        self._rewind = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def _prune_and_rewind(self, model) -> None:
        if self._rewind is None:
            raise CorruptedCheckpointError(
                f"no weights of step {self.rewind_step} to rewind to (resumed past it without "
                "the pruning state)"
            )
        target = self.density * (1.0 - self.prune_fraction)
        self.masks = Magnitude().prune_to(
            model, self._parameters, target, scope=self.scope, current=self.masks
        )
        for name, parameter in model.named_parameters():
            parameter.copy_(self._rewind[name])
        apply_masks(self._parameters, self.masks)
        if self._optimizer is not None:
            self._optimizer.state.clear()
        self.rounds_done += 1
        logger.info(
            "IterativeMagnitudePruningCallback: round %d pruned to density %.4f, rewound to "
            "step %d",
            self.rounds_done,
            self.density,
            self.rewind_step,
        )

    def _restore(self, model, folder: Path) -> None:
        record_file = folder / f"{_STATE_STEM}.json"
        if not record_file.is_file():
            raise CorruptedCheckpointError(f"{folder}: no pruning state (resumed without it)")
        record = json.loads(record_file.read_text())
        self.rounds_done = int(record["rounds_done"])
        masks = load_masks(model, folder, names=self._stored_names(model))
        self.masks = {name: mask.to(self._parameters[name].device) for name, mask in masks.items()}
        tensors = folder / f"{_STATE_STEM}.safetensors"
        if tensors.is_file():
            device = next(model.parameters()).device
            self._rewind = {n: t.to(device) for n, t in load_file(tensors).items()}
