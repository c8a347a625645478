"""The averaged weights SWA and EMA keep: a float32 copy of a model's floating tensors.

The copy lives on the model's device, keyed by the model's in-memory ``state_dict`` names. It
enters a model only through ``load_state_dict`` and leaves for disk only through
``save_pretrained``, so checkpoints written from it are ordinary model folders whatever the
model's on-disk naming.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist

from hf_soups.callbacks._trainer_io import distributed_world_size
from hf_soups.errors import CorruptedCheckpointError, HfSoupsError


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
    backup = [(t, t.detach().clone()) for t in all_tensors(model)]
    averaged.load_into(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for live, saved in backup:
                live.copy_(saved)


def all_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for _, p in model.named_parameters()] + [b for _, b in model.named_buffers()]
