"""SynFlow (Tanaka, Kunin, Yamins & Ganguli, "Pruning neural networks without any data by
iteratively conserving synaptic flow", NeurIPS 2020)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hf_soups.pruning.masks import apply_masks, density_of, masks_from_scores
from hf_soups.pruning.scorer import OneShotScorer

ForwardFunction = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def model_output(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's output tensor for ``inputs`` (its ``logits`` when it returns a mapping)."""
    output = model(inputs)
    return output if isinstance(output, torch.Tensor) else output["logits"]


class SynFlow(OneShotScorer):
    """Data-free, iterative: on a float64 copy of the model whose floating tensors are replaced
    by their absolute values (``|W|``), and in eval mode, the synaptic flow is
    ``R = 1ᵀ f(1)`` (the sum of the outputs for an all-ones input, ``1ᵀ(∏|W|)1`` for a linear
    network); the score is ``|∂R/∂w ⊙ w|``. Pruning runs ``iterations`` rounds, round ``k``
    keeping the density ``d0 · (d / d0)^(k / iterations)`` (the paper's exponential schedule
    from the current density ``d0`` to the target ``d``), scores recomputed on the masked copy
    each round. The model itself only receives the final mask.

    Args:
        input_shape: one input's shape, without the batch dimension (``(3, 224, 224)``).
        iterations: pruning rounds (100 in the paper).
        forward: ``(model, inputs) -> output tensor``; default ``model(inputs)``, its ``logits``
            for transformers models.
    """

    name = "synflow"

    def __init__(
        self,
        input_shape: Sequence[int],
        iterations: int = 100,
        forward: ForwardFunction = model_output,
    ) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.input_shape = tuple(input_shape)
        self.iterations = iterations
        self.forward = forward

    def scores(self, model, parameters):
        """One round's synaptic-flow scores of ``parameters`` (tensors of ``model``, named as in
        ``model.named_parameters``), computed on a positive float64 copy of the model."""
        positive = _positive_copy(model)
        positive_parameters = dict(positive.named_parameters())
        return self._flow_scores(positive, {name: positive_parameters[name] for name in parameters})

    def _flow_scores(self, positive: nn.Module, parameters) -> dict[str, torch.Tensor]:
        ones = torch.ones((1, *self.input_shape), dtype=torch.float64, device=_device(positive))
        flow = self.forward(positive, ones).sum()
        grads = torch.autograd.grad(flow, list(parameters.values()))
        return {
            name: (grad * parameter.detach()).abs()
            for (name, parameter), grad in zip(parameters.items(), grads, strict=True)
        }

    def prune_to(self, model, parameters, density, *, scope, current):
        positive = _positive_copy(model)
        positive_parameters = dict(positive.named_parameters())
        working = {name: positive_parameters[name] for name in parameters}
        masks = dict(current) if current is not None else None
        start = density_of(masks) if masks is not None else 1.0
        if masks is not None:
            apply_masks(working, masks)
        for k in range(1, self.iterations + 1):
            step_density = start * (density / start) ** (k / self.iterations) if start else 0.0
            masks = masks_from_scores(
                self._flow_scores(positive, working), step_density, scope=scope, current=masks
            )
            apply_masks(working, masks)
        apply_masks(parameters, masks)
        return masks


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _positive_copy(model: nn.Module) -> nn.Module:
    positive = copy.deepcopy(model).double().eval()
    for tensor in positive.state_dict().values():
        if tensor.is_floating_point():
            tensor.abs_()
    return positive
