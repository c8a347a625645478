"""What every pruning scorer shares: prune a model's weights to a density, given current masks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hf_soups.errors import HfSoupsError
from hf_soups.pruning.masks import apply_masks, density_of, masks_from_scores
from hf_soups.pruning.targets import prunable_parameters

LossFunction = Callable[[nn.Module, Any], torch.Tensor]
Masks = dict[str, torch.Tensor]


def model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss a transformers-style model returns for a batch (``model(**batch)["loss"]``;
    a ``CLIPModel`` returns one only when the batch holds ``return_loss=True``)."""
    output = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = output.get("loss") if isinstance(output, Mapping) else None
    if loss is None:
        raise HfSoupsError(
            f"{type(model).__name__} returned no loss for the batch (a CLIPModel needs "
            "return_loss=True in it; other models need labels), or pass loss_fn"
        )
    return loss


def batch_gradients(
    model: nn.Module,
    parameters: Mapping[str, nn.Parameter],
    batches: Iterable[Any],
    loss_fn: LossFunction,
    *,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """The gradient of the loss summed over ``batches`` with respect to ``parameters``."""
    names = list(parameters)
    total: list[torch.Tensor] | None = None
    for batch in batches:
        grads = torch.autograd.grad(
            loss_fn(model, batch), [parameters[n] for n in names], create_graph=create_graph
        )
        total = list(grads) if total is None else [t + g for t, g in zip(total, grads, strict=True)]
    if total is None:
        raise ValueError("no batch given to score the weights on")
    return dict(zip(names, total, strict=True))


class Scorer(ABC):
    """A pruning criterion: :meth:`prune_to` zeros weights until a density is reached."""

    name: str = "scorer"

    @abstractmethod
    def prune_to(
        self,
        model: nn.Module,
        parameters: Mapping[str, nn.Parameter],
        density: float,
        *,
        scope: str,
        current: Mapping[str, torch.Tensor] | None,
    ) -> Masks:
        """Prune ``parameters`` (tensors of ``model``) to ``density``, keeping pruned what
        ``current`` prunes; returns the new masks, already applied."""


class OneShotScorer(Scorer):
    """A criterion scoring every weight once; the mask keeps the best-scored ones."""

    #: Whether a high score means keep (SNIP, magnitude) or prune (GraSP).
    keep_largest: bool = True

    @abstractmethod
    def scores(
        self, model: nn.Module, parameters: Mapping[str, nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """One score per weight of each parameter, computed on the model as it is now."""

    def prune_to(self, model, parameters, density, *, scope, current):
        masks = masks_from_scores(
            self.scores(model, parameters),
            density,
            scope=scope,
            keep_largest=self.keep_largest,
            current=current,
        )
        apply_masks(parameters, masks)
        return masks


def prune(
    model: nn.Module,
    scorer: Scorer,
    sparsity: float,
    *,
    scope: str = "global",
    include_heads: bool = False,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Prune ``model`` in place to ``sparsity`` (share of prunable weights set to zero).

    The prunable weights are those of :func:`~hf_soups.pruning.prunable_parameters`. Weights
    pruned by ``masks`` (from an earlier round) stay pruned and count toward ``sparsity``.

    Returns:
        The masks (in-memory parameter name -> bool tensor, ``True`` kept); the pruned weights
        are exact zeros.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    parameters = prunable_parameters(model, include_heads=include_heads)
    if masks is not None:
        unknown = sorted(set(masks) - set(parameters))
        if unknown:
            raise ValueError(f"masks name tensors that are not prunable here: {unknown[:5]}")
        apply_masks(parameters, masks)
        if 1.0 - sparsity > density_of(masks) + 1e-12:
            raise ValueError(
                f"sparsity {sparsity} is below the masks' own {1 - density_of(masks):.4f}"
            )
    return scorer.prune_to(model, parameters, 1.0 - sparsity, scope=scope, current=masks)
