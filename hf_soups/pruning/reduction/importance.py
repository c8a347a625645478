"""How much each MLP neuron matters: first-order Taylor scores, or weight norms without data.

Taylor (Molchanov, Tyree, Karras, Aila & Kautz, "Pruning convolutional neural networks for
resource efficient inference", ICLR 2017, arXiv:1611.06440, criterion Θ_TE): removing neuron
``j`` sets its activation ``a_j`` (the input of ``fc2``) to zero, which changes the loss by about
``-Σ a_j ∂L/∂a_j``. The score of ``j`` is that change's size per example, summed over a batch's
examples (the sum over an example's tokens taken before the absolute value, as the paper
averages over a feature map's positions) and averaged over the batches:

    score_j = mean_batches Σ_examples |Σ_tokens a_j ∂L/∂a_j|

in units of the loss, so scores of different layers and towers compare. With the batch loss a
mean over examples, ``Σ_examples`` makes it the mean first-order change of one example's loss.

Magnitude (data-free, after Li, Kadav, Durdanovic, Samet & Graf, "Pruning filters for efficient
ConvNets", ICLR 2017, which ranks filters by weight norm): ``‖fc1 row j‖₂ · ‖fc2 column j‖₂``,
how far the neuron can move the layer's output per unit of input (for a 1-Lipschitz
activation). It carries no loss units: across towers it compares only roughly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hf_soups.errors import HfSoupsError
from hf_soups.pruning.scorer import LossFunction, model_loss

IMPORTANCE_METHODS = ("taylor", "magnitude")


def magnitude_importance(
    layers: Mapping[str, tuple[nn.Linear, nn.Linear]],
) -> dict[str, torch.Tensor]:
    """``‖fc1.weight[j]‖₂ · ‖fc2.weight[:, j]‖₂`` per neuron ``j`` of each layer."""
    return {
        name: (fc1.weight.detach().float().norm(dim=1) * fc2.weight.detach().float().norm(dim=0))
        for name, (fc1, fc2) in layers.items()
    }


def taylor_importance(
    model: nn.Module,
    layers: Mapping[str, tuple[nn.Linear, nn.Linear]],
    batches: Iterable[Any],
    loss_fn: LossFunction = model_loss,
) -> dict[str, torch.Tensor]:
    """The first-order Taylor score of every neuron of ``layers`` (see the module docstring).

    Args:
        model: the model ``loss_fn`` runs; scored in eval mode (no dropout), then restored.
        layers: MLP name -> ``(fc1, fc2)``; the activation is what enters ``fc2``.
        batches: the batches to score on (a few).
        loss_fn: ``(model, batch) -> loss``; default ``model(**batch)["loss"]``.

    A neuron the loss does not depend on (a frozen, unused tower) scores zero. Parameter
    gradients are not touched: the gradients are taken of the activations only.
    """
    activations: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def keep_input(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]):
            activation = args[0]
            if not activation.requires_grad:
                # Nothing upstream is trained (a frozen tower): start the graph here.
                activation = activation.detach().requires_grad_(True)
            activations[name].append(activation)
            return (activation, *args[1:])

        return hook

    handles = [fc2.register_forward_pre_hook(keep_input(name)) for name, (_, fc2) in layers.items()]
    was_training = model.training
    model.eval()
    totals = {
        name: torch.zeros(fc2.in_features, dtype=torch.float64) for name, (_, fc2) in layers.items()
    }
    count = 0
    try:
        for batch in batches:
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                named = [(name, a) for name, found in activations.items() for a in found]
                grads = torch.autograd.grad(loss, [a for _, a in named], allow_unused=True)
            for (name, activation), grad in zip(named, grads, strict=True):
                if grad is not None:
                    width = activation.shape[-1]
                    change = (activation.detach() * grad).reshape(activation.shape[0], -1, width)
                    totals[name] += change.sum(dim=1).abs().sum(dim=0).double().cpu()
            for found in activations.values():
                found.clear()
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise HfSoupsError("no batch given to score the MLP neurons on")
    return {name: (total / count).float() for name, total in totals.items()}


def neuron_importance(
    model: nn.Module,
    layers: Mapping[str, tuple[nn.Linear, nn.Linear]],
    batches: Iterable[Any] | None,
    loss_fn: LossFunction = model_loss,
) -> tuple[str, dict[str, torch.Tensor]]:
    """``("taylor", scores)`` when ``batches`` are given, else ``("magnitude", scores)``."""
    if batches is None:
        return "magnitude", magnitude_importance(layers)
    return "taylor", taylor_importance(model, layers, batches, loss_fn)
