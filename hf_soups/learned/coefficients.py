"""The mixing coefficients a learned soup fits, and their optimiser step.

Two parameterisations of the weights ``alpha[j, m]`` (row ``j`` a tensor, or one row shared by
all tensors; column ``m`` an ingredient):

- ``"simplex"`` (the official learned soup): ``alpha = softmax(raw)`` over the ingredients,
  ``raw`` starting at zero (the uniform soup). Given ``G[j, m] = dL/dalpha[j, m]`` and the mixed
  tensor's own product ``<dL/dtheta_j, theta_j> = sum_m alpha[j, m] G[j, m]``, the chain rule is
  ``dL/draw[j, m] = alpha[j, m] (G[j, m] - <dL/dtheta_j, theta_j>)``.
- ``"hyperplane"`` (MEHL-Soup, Li et al., ECCV 2024): the weights themselves, starting at
  ``1/N``, summing to one and free to go below zero or above one. The gradient is projected on
  the hyperplane (``G - mean G`` over the updated ingredients) and, because Adam rescales it
  coordinate by coordinate, the updated weights are moved back onto the hyperplane after each
  step (their sum restored, the same shift for each).

Block coordinate descent (MEHL-Soup's other idea): a step may update only a block of
ingredients. Their parameters alone change (the others keep their Adam state and step count),
so the other ingredients' weights change by one common factor per row: 1 on the hyperplane, the
softmax's change of normaliser on the simplex. The mixed weights then follow from the block's
tensors alone (:func:`hf_soups.learned.fit`), K reads instead of N.

The logit scale is learned alongside, as in the official code; all parameters share one AdamW
(weight decay 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

Parameterisation = Literal["simplex", "hyperplane"]
PARAMETERISATIONS = ("simplex", "hyperplane")


class MixingCoefficients:
    """``rows x num_ingredients`` mixing weights, a logit scale and their AdamW optimiser.

    Each ingredient's column is its own parameter, so that a block step leaves the others'
    optimiser state untouched (AdamW skips parameters without a gradient).
    """

    def __init__(
        self,
        rows: int,
        num_ingredients: int,
        kind: Parameterisation,
        *,
        lr: float,
        device: torch.device,
        dtype: torch.dtype,
    ):
        if kind not in PARAMETERISATIONS:
            raise ValueError(f"coefficients={kind!r}: expected one of {PARAMETERISATIONS}")
        self.kind = kind
        start = 0.0 if kind == "simplex" else 1.0 / num_ingredients
        self.columns = [
            nn.Parameter(torch.full((rows,), start, device=device, dtype=dtype))
            for _ in range(num_ingredients)
        ]
        self.logit_scale = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        self.optimizer = torch.optim.AdamW(
            [*self.columns, self.logit_scale], lr=lr, weight_decay=0.0
        )

    @torch.no_grad()
    def weights(self) -> torch.Tensor:
        """The mixing weights ``alpha``, ``[rows, num_ingredients]``."""
        stacked = torch.stack([column.detach() for column in self.columns], dim=1)
        return torch.softmax(stacked, dim=1) if self.kind == "simplex" else stacked

    @torch.no_grad()
    def parameter_gradients(
        self, weight_grad: torch.Tensor, mixed_grad: torch.Tensor, block: Sequence[int]
    ) -> torch.Tensor:
        """The gradient of the ``block``'s parameters, ``[rows, len(block)]``, from
        ``weight_grad = dL/dalpha[:, block]`` and ``mixed_grad[r] = <dL/dtheta, theta>`` over
        row ``r``'s mixed tensors (for the hyperplane: projected on it)."""
        if self.kind == "simplex":
            return self.weights()[:, block] * (weight_grad - mixed_grad[:, None])
        return weight_grad - weight_grad.mean(dim=1, keepdim=True)

    @torch.no_grad()
    def step(
        self,
        weight_grad: torch.Tensor,
        mixed_grad: torch.Tensor,
        scale_grad: torch.Tensor,
        block: Sequence[int],
    ) -> None:
        """One AdamW step on the ``block``'s columns and the logit scale, from the gradients of
        :meth:`parameter_gradients` and ``scale_grad = dL/d logit_scale``."""
        grads = self.parameter_gradients(weight_grad, mixed_grad, block)
        block_sum = self.weights()[:, block].sum(dim=1)
        self.optimizer.zero_grad(set_to_none=True)
        for position, index in enumerate(block):
            self.columns[index].grad = grads[:, position].to(self.columns[index].dtype)
        self.logit_scale.grad = scale_grad.to(self.logit_scale.dtype).reshape(())
        self.optimizer.step()
        if self.kind == "hyperplane":
            shift = (block_sum - sum(self.columns[index] for index in block)) / len(block)
            for index in block:
                self.columns[index].add_(shift)
