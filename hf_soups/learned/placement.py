"""Where a learned soup keeps its ingredients while it fits: streamed from the files, stacked in
host RAM, or stacked on the device.

Whatever the placement, the fit asks for one ingredient's tensor at a time
(:meth:`IngredientTensors.read`) and gets it on the device in the fit's dtype; only the cost and
the memory differ.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import psutil
import torch

from hf_soups.ingredients import Ingredient

logger = logging.getLogger(__name__)

Memory = Literal["stream", "host", "device", "auto"]
MEMORY_CHOICES = ("stream", "host", "device", "auto")

# A stack may take this fraction of the free memory it goes to: the rest is for the model, its
# gradients, activations and whatever else the process holds.
_STACK_SHARE = 0.5


def choose_memory(
    memory: Memory, stack_bytes: int, model_bytes: int, device: torch.device
) -> Literal["stream", "host", "device"]:
    """The placement ``memory="auto"`` picks, from the stack's size and the free memory.

    ``"device"`` when the device is an accelerator whose free memory holds the stack plus four
    models (weights, gradients, activations) with half of it to spare; else ``"host"`` when the
    stack takes at most half of the host's available RAM; else ``"stream"``. On a CPU device,
    host and device are one memory, reported as ``"host"``.
    """
    if memory != "auto":
        return memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if stack_bytes + 4 * model_bytes <= _STACK_SHARE * free:
            return "device"
    if stack_bytes <= _STACK_SHARE * psutil.virtual_memory().available:
        return "host"
    return "stream"


class IngredientTensors:
    """The ingredients' tensors ``theta_jm`` of the fitted names, one at a time on the device.

    Args:
        ingredients: the soup's ingredients.
        names: in-memory name -> on-disk name of every tensor the fit mixes.
        memory: ``"stream"`` reads each tensor from the files when asked (into reused buffers,
            so memory stays at one tensor in flight whatever N); ``"host"`` stacks every
            ingredient's tensors in host RAM up front and copies one to the device when asked
            (the official code's placement); ``"device"`` stacks them on the device.
        device, dtype: where and in which precision :meth:`read` returns tensors.
    """

    def __init__(
        self,
        ingredients: Sequence[Ingredient],
        names: Mapping[str, str],
        memory: Literal["stream", "host", "device"],
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.ingredients = list(ingredients)
        self.names = dict(names)
        self.memory = memory
        self.device = device
        self.dtype = dtype
        self._host: dict[torch.dtype, torch.Tensor] = {}
        self._device: torch.Tensor | None = None
        self._stacks: dict[str, torch.Tensor] = {}
        if memory != "stream":
            self._stack(device if memory == "device" else torch.device("cpu"))

    def _stack(self, where: torch.device) -> None:
        for name, disk_name in self.names.items():
            info = self.ingredients[0].tensors[disk_name]
            stack = torch.empty(
                (len(self.ingredients), *info.shape), dtype=self.dtype, device=where
            )
            for index, ingredient in enumerate(self.ingredients):
                stack[index].copy_(self._read_file(ingredient, disk_name))
            self._stacks[name] = stack
        logger.info(
            "learned soup: %d ingredients stacked on %s (%.1f MiB)",
            len(self.ingredients),
            where,
            sum(s.numel() * s.element_size() for s in self._stacks.values()) / 2**20,
        )

    def _read_file(self, ingredient: Ingredient, disk_name: str) -> torch.Tensor:
        # As the merge engine's loaders do: into one reused buffer per stored dtype, so repeated
        # reads touch no new pages and no memory map stays behind.
        info = ingredient.tensors[disk_name]
        buffer = self._host.get(info.dtype)
        if buffer is None or buffer.numel() < info.numel:
            buffer = self._host[info.dtype] = torch.empty(info.numel, dtype=info.dtype)
        return ingredient.read(disk_name, out=buffer[: info.numel].view(info.shape))

    def read(self, name: str, index: int) -> torch.Tensor:
        """Ingredient ``index``'s tensor ``name`` (in-memory name) on the device, in the fit's
        dtype; valid until the next call (it may live in a reused buffer)."""
        if self.memory == "device":
            return self._stacks[name][index]
        if self.memory == "host":
            return self._stacks[name][index].to(self.device)
        tensor = self._read_file(self.ingredients[index], self.names[name])
        if tensor.dtype == self.dtype and self.device.type == "cpu":
            return tensor
        numel = tensor.numel()
        if self._device is None or self._device.numel() < numel:
            self._device = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self._device[:numel].view(tensor.shape).copy_(tensor)
