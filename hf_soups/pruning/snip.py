"""SNIP (Lee, Ajanthan & Torr, "SNIP: Single-shot network pruning based on connection
sensitivity", ICLR 2019)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hf_soups.pruning.scorer import LossFunction, OneShotScorer, batch_gradients, model_loss


class SNIP(OneShotScorer):
    """Connection sensitivity ``|g ⊙ w|``, ``g`` the gradient of the loss summed over
    ``batches``; the weights of largest sensitivity are kept. (The paper normalises by the sum of
    sensitivities, which does not change the ranking.)

    Args:
        batches: the batches to score on (the paper uses one mini-batch).
        loss_fn: ``(model, batch) -> loss``; default ``model(**batch)["loss"]``.
    """

    name = "snip"

    def __init__(self, batches: Iterable[Any], loss_fn: LossFunction = model_loss) -> None:
        self.batches = list(batches)
        self.loss_fn = loss_fn

    def scores(self, model, parameters):
        grads = batch_gradients(model, parameters, self.batches, self.loss_fn)
        return {n: (grads[n] * p.detach()).abs() for n, p in parameters.items()}
