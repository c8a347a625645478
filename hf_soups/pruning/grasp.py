"""GraSP (Wang, Zhang & Grosse, "Picking winning tickets before training by preserving gradient
flow", ICLR 2020)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from hf_soups.pruning.scorer import LossFunction, OneShotScorer, batch_gradients, model_loss


class GraSP(OneShotScorer):
    """Score ``S = -w ⊙ Hg``, ``g`` the loss gradient summed over ``batches`` and ``Hg`` the
    Hessian-gradient product, by double backpropagation (the gradient of ``g(w) · stop(g)``).
    As in the paper, the weights of *largest* score are pruned (removing them reduces gradient
    flow least).

    The authors' code divides the logits by a temperature (200) before the loss; do it in
    ``loss_fn`` to follow it.

    Args:
        batches: the batches to score on.
        loss_fn: ``(model, batch) -> loss``; default ``model(**batch)["loss"]``.
    """

    name = "grasp"
    keep_largest = False

    def __init__(self, batches: Iterable[Any], loss_fn: LossFunction = model_loss) -> None:
        self.batches = list(batches)
        self.loss_fn = loss_fn

    def scores(self, model, parameters):
        fixed = {
            name: grad.detach()
            for name, grad in batch_gradients(model, parameters, self.batches, self.loss_fn).items()
        }
        live = batch_gradients(model, parameters, self.batches, self.loss_fn, create_graph=True)
        names = list(parameters)
        product = sum((live[name] * fixed[name]).sum() for name in names)
        hessian_gradient = torch.autograd.grad(product, [parameters[name] for name in names])
        return {
            name: -parameters[name].detach() * hg
            for name, hg in zip(names, hessian_gradient, strict=True)
        }
