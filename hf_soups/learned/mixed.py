"""The one model a learned soup fits in: its mixed tensors, and their coefficient gradients.

The mixed tensor ``j`` is ``theta_j = sum_m alpha[j, m] theta_jm`` (row ``j`` of ``alpha`` its
own for a learned-by-layer soup, row 0 for all tensors otherwise), so

    dL/dalpha[j, m] = <dL/dtheta_j, theta_jm>:

one forward and backward through the mixed model gives ``dL/dtheta_j`` for every tensor, and the
ingredients are then read once more, one tensor at a time, for the dot products. No ingredient
is ever held whole, and no autograd graph spans the ingredients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hf_soups.errors import HfSoupsError
from hf_soups.ingredients import Ingredient
from hf_soups.learned.names import disk_names
from hf_soups.learned.placement import IngredientTensors, Memory, choose_memory
from hf_soups.models import ZeroShotTask, load_model, logits_of


@dataclass
class CoefficientGradients:
    """Gradients of the *summed* cross-entropy over some examples (divide by ``count`` for the
    mean's): ``weights[r, k] = dL/dalpha[r, block[k]]``, ``mixed[r] = sum_j <dL/dtheta_j,
    theta_j>`` over row ``r``'s tensors, ``logit_scale = dL/d scale``."""

    weights: torch.Tensor
    mixed: torch.Tensor
    logit_scale: torch.Tensor
    loss: torch.Tensor
    count: torch.Tensor

    def pack(self) -> torch.Tensor:
        """One float64 vector, for a single all-reduce."""
        return torch.cat(
            [
                self.weights.flatten(),
                self.mixed,
                self.logit_scale.reshape(1),
                self.loss.reshape(1),
                self.count.reshape(1),
            ]
        )

    @classmethod
    def unpack(cls, packed: torch.Tensor, rows: int, block_length: int) -> CoefficientGradients:
        weights, mixed, scale, loss, count = torch.split(
            packed, [rows * block_length, rows, 1, 1, 1]
        )
        return cls(weights.view(rows, block_length), mixed, scale[0], loss[0], count[0])


class MixedModel:
    """The first ingredient's model, its mixed tensors overwritten by the soup's.

    Args:
        ingredients: the soup's ingredients (one layout).
        by_layer: one row of coefficients per mixed tensor (else one row for all).
        memory, device, dtype: where the ingredients are kept
            (:class:`~hf_soups.learned.placement.IngredientTensors`), where the model runs, and
            in which precision.
        probe: one example's inputs; the tensors the logits do not reach through autograd on it
            (a CLIP classifier's text tower) are left out: never read, never mixed (they keep
            the first ingredient's values), no coefficients.
        input_column: the keyword the model takes its inputs by.
        task: scores CLIP ingredients without a head (:func:`hf_soups.models.load_model`); the
            head it builds from the first ingredient's text tower is computed, not stored, and
            stays fixed like the frozen tensors.
    """

    def __init__(
        self,
        ingredients: Sequence[Ingredient],
        *,
        by_layer: bool,
        memory: Memory,
        device: torch.device,
        dtype: torch.dtype,
        probe: torch.Tensor,
        input_column: str = "pixel_values",
        task: ZeroShotTask | None = None,
    ):
        self.input_column = input_column
        self.model = load_model(ingredients[0], task=task).to(device=device, dtype=dtype).eval()
        self.tensors = _floating_tensors(self.model)
        self.disk_names = disk_names(ingredients[0], task)
        reached = [name for name in self._reached(probe) if name in self.disk_names]
        if not reached:
            raise HfSoupsError("learned soup: the loss reaches none of the stored tensors")
        for name, tensor in self.tensors.items():
            tensor.requires_grad_(name in reached)
        self.rows = {name: (row if by_layer else 0) for row, name in enumerate(reached)}
        self.num_rows = len(reached) if by_layer else 1
        numel = sum(self.tensors[name].numel() for name in reached)
        self.memory = choose_memory(
            memory, len(ingredients) * numel * dtype.itemsize, numel * dtype.itemsize, device
        )
        self.source = IngredientTensors(
            ingredients,
            {name: self.disk_names[name] for name in reached},
            self.memory,
            device,
            dtype,
        )

    @property
    def frozen(self) -> list[str]:
        """In-memory names of the loaded floating tensors the loss does not reach."""
        return [name for name in self.disk_names if name not in self.rows]

    def _reached(self, probe: torch.Tensor) -> list[str]:
        for tensor in self.tensors.values():
            tensor.requires_grad_(True)
        logits = logits_of(self.model(**{self.input_column: probe}))
        grads = torch.autograd.grad(logits.sum(), list(self.tensors.values()), allow_unused=True)
        return [name for name, grad in zip(self.tensors, grads) if grad is not None]

    @torch.no_grad()
    def mix(self, alpha: torch.Tensor) -> None:
        """``theta_j = sum_m alpha[row(j), m] theta_jm`` for every mixed tensor (N reads each)."""
        weights = alpha.tolist()
        for name, row in self.rows.items():
            mixed = self.tensors[name].zero_()
            for index, weight in enumerate(weights[row]):
                mixed.add_(self.source.read(name, index), alpha=weight)

    @torch.no_grad()
    def update(self, before: torch.Tensor, after: torch.Tensor, block: Sequence[int]) -> None:
        """Follow a block step from ``before`` to ``after`` with the block's tensors alone
        (``len(block)`` reads each): the other ingredients' weights changed by one factor ``c``
        per row, so ``theta_j <- c theta_j + sum_{m in block} (after - c before)[j, m] theta_jm``.
        """
        others = [index for index in range(before.shape[1]) if index not in set(block)]
        kept, was = after[:, others].sum(dim=1), before[:, others].sum(dim=1)
        # On the hyperplane the others do not change at all (and may sum to zero).
        factor = torch.where(was != 0, kept / was, torch.ones_like(was))
        change = (after - factor[:, None] * before).tolist()
        factor = factor.tolist()
        for name, row in self.rows.items():
            mixed = self.tensors[name].mul_(factor[row])
            for index in block:
                mixed.add_(self.source.read(name, index), alpha=change[row][index])

    def gradients(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: torch.Tensor,
        block: Sequence[int],
    ) -> CoefficientGradients:
        """Gradients of ``sum_i CE(logit_scale * logits_i, labels_i)`` at the current mix, for
        the ``block``'s coefficients (``len(block)`` reads per mixed tensor)."""
        device = logit_scale.device
        weights = torch.zeros(self.num_rows, len(block), dtype=torch.float64, device=device)
        mixed = torch.zeros(self.num_rows, dtype=torch.float64, device=device)
        scale = logit_scale.detach().requires_grad_(True)
        logits = logits_of(self.model(**{self.input_column: inputs}))
        loss = nn.functional.cross_entropy(scale * logits, labels, reduction="sum")
        names = list(self.rows)
        grads = torch.autograd.grad(loss, [*(self.tensors[name] for name in names), scale])
        with torch.no_grad():
            for name, grad in zip(names, grads):
                row, flat = self.rows[name], grad.reshape(-1)
                mixed[row] += torch.dot(flat, self.tensors[name].reshape(-1)).double()
                for position, index in enumerate(block):
                    dot = torch.dot(flat, self.source.read(name, index).reshape(-1))
                    weights[row, position] += dot.double()
        return CoefficientGradients(
            weights,
            mixed,
            grads[-1].detach().double(),
            loss.detach().double(),
            torch.tensor(float(len(labels)), dtype=torch.float64, device=device),
        )

    def no_gradients(self, block_length: int, device: torch.device) -> CoefficientGradients:
        """What a process with no examples in a batch contributes."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return CoefficientGradients(
            torch.zeros(self.num_rows, block_length, dtype=torch.float64, device=device),
            torch.zeros(self.num_rows, dtype=torch.float64, device=device),
            zero,
            zero,
            zero,
        )


def _floating_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating parameters and buffers by in-memory name; a tensor tied under two
    names is kept under the first (mixing or differentiating it twice would count it twice)."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor
    return tensors
