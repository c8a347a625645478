"""One reduction step: score the MLP neurons, choose where to cut by importance lost per FLOP
saved, and build the narrower model."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from hf_soups.errors import HfSoupsError
from hf_soups.pruning.flops import model_counts
from hf_soups.pruning.reduction.importance import neuron_importance
from hf_soups.pruning.reduction.towers import (
    MLPTower,
    architecture_of,
    mlp_towers,
    narrowed_config,
    narrowed_model,
)
from hf_soups.pruning.scorer import LossFunction, model_loss

logger = logging.getLogger(__name__)


@dataclass
class ReductionStep:
    """What one step removed and what it saved.

    Attributes:
        importance: ``"taylor"`` or ``"magnitude"``.
        neurons: tower -> neurons removed from every layer of that tower.
        intermediate_size: tower -> ``intermediate_size`` after the step (all towers).
        removed: MLP module name -> indices of the neurons removed (numbered as in the model
            the step started from).
        importance_lost: sum of the removed neurons' scores.
        parameters, flops: ``(before, after)`` counts of :func:`~hf_soups.pruning.model_counts`.
    """

    importance: str
    neurons: dict[str, int]
    intermediate_size: dict[str, int]
    removed: dict[str, list[int]]
    importance_lost: float
    parameters: tuple[int, int]
    flops: tuple[int, int]

    def to_record(self) -> dict[str, Any]:
        """The step as the recipe (``reduction.json``) records it."""
        return {
            "importance": self.importance,
            "neurons_removed_per_layer": self.neurons,
            "intermediate_size": self.intermediate_size,
            "importance_lost": self.importance_lost,
            "parameters": {"before": self.parameters[0], "after": self.parameters[1]},
            "flops": {"before": self.flops[0], "after": self.flops[1]},
            "removed": self.removed,
        }


def flops_per_neuron(
    model: PreTrainedModel, towers: Sequence[MLPTower], text_length: int | None = None
) -> dict[str, int]:
    """FLOPs saved by removing one neuron from every layer of each tower, from the counts of
    the model's config with that tower one neuron narrower."""
    total = model_counts(model, text_length=text_length)["flops"]
    saved = {}
    for tower in towers:
        config = narrowed_config(model, {tower.name: tower.intermediate_size - 1})
        narrower = model_counts(
            config, architecture=architecture_of(model), text_length=text_length
        )
        saved[tower.name] = total - narrower["flops"]
    return saved


def plan_cuts(
    sorted_scores: Mapping[str, torch.Tensor],
    flop_costs: Mapping[str, int],
    *,
    neurons: int | None = None,
    flops: float | None = None,
) -> dict[str, int]:
    """How many neurons to remove from every layer of each tower.

    Cuts are taken one neuron per layer of one tower at a time; each goes to the tower whose
    next cut loses the least importance per FLOP saved (``sorted_scores[t][:, k].sum() /
    flop_costs[t]``, the k-th smallest score of every layer; ties: the first tower). Stops after
    ``neurons`` cuts or once ``flops`` FLOPs are saved. A tower keeps at least one neuron.

    Args:
        sorted_scores: tower -> ``[layers, width]`` scores, each row increasing.
        flop_costs: tower -> FLOPs one cut saves.
    """
    if (neurons is None) == (flops is None):
        raise HfSoupsError("give exactly one of neurons (per layer) or flops (to save)")
    cuts = dict.fromkeys(sorted_scores, 0)
    saved = 0
    while (neurons is not None and sum(cuts.values()) < neurons) or (
        flops is not None and saved < flops
    ):
        open_towers = [t for t, s in sorted_scores.items() if cuts[t] < s.shape[1] - 1]
        if not open_towers:
            raise HfSoupsError(
                "the MLPs cannot be narrowed that far: every tower is down to one neuron"
            )
        best = min(
            open_towers,
            key=lambda t: float(sorted_scores[t][:, cuts[t]].sum()) / flop_costs[t],
        )
        cuts[best] += 1
        saved += flop_costs[best]
    return cuts


def reduce_mlp(
    model: PreTrainedModel,
    batches: Iterable[Any] | None = None,
    *,
    neurons: int | None = None,
    flops: float | None = None,
    towers: Sequence[str] | None = None,
    loss_fn: LossFunction = model_loss,
    text_length: int | None = None,
) -> tuple[PreTrainedModel, ReductionStep]:
    """Narrow the MLPs of a ViT or CLIP model by its least important neurons.

    Every layer of a tower loses the same number of neurons (each layer its own least
    important ones), so the result is a plain model of the same class whose config has a
    smaller ``intermediate_size`` (``vision_config`` / ``text_config`` for CLIP); it loads with
    ``from_pretrained`` and no custom code. Where a model has two towers, each cut goes where it
    loses the least importance per FLOP saved (:func:`plan_cuts`).

    Args:
        model: a ViT or CLIP model (left as it is).
        batches: the batches of the first-order Taylor score (see
            :mod:`~hf_soups.pruning.reduction.importance`); ``None``: weight-magnitude scores.
        neurons: cuts to make, each one neuron from every layer of one tower.
        flops: or: the share of the model's forward FLOPs to save (``0 < flops < 1``).
        towers: the towers that may be narrowed (``"vision"``, ``"text"``); default all.
        loss_fn: ``(model, batch) -> loss`` for the Taylor score.
        text_length: text tokens per example in the FLOP counts (CLIP).

    Returns:
        The narrowed model (a new object) and the :class:`ReductionStep` record.
    """
    if flops is not None and not 0.0 < flops < 1.0:
        raise ValueError(f"flops must be a share in (0, 1), got {flops}")
    if neurons is not None and neurons < 1:
        raise ValueError(f"neurons must be at least 1, got {neurons}")
    found = mlp_towers(model, towers)
    layers = {name: pair for tower in found for name, pair in tower.layers.items()}
    method, scores = neuron_importance(model, layers, batches, loss_fn)
    before = model_counts(model, text_length=text_length)
    sorted_scores = {
        tower.name: torch.stack([scores[name] for name in tower.layers]).sort(dim=1).values
        for tower in found
    }
    cuts = plan_cuts(
        sorted_scores,
        flops_per_neuron(model, found, text_length),
        neurons=neurons,
        flops=None if flops is None else flops * before["flops"],
    )
    keep, removed, lost = {}, {}, 0.0
    for tower in found:
        if cuts[tower.name] == 0:
            continue
        keep[tower.name] = {}
        for name in tower.layers:
            order = scores[name].argsort(stable=True)
            cut = order[: cuts[tower.name]]
            removed[name] = sorted(int(i) for i in cut)
            lost += float(scores[name][cut].sum())
            keep[tower.name][name] = order[cuts[tower.name] :].sort().values
    narrowed = narrowed_model(model, keep)
    after = model_counts(narrowed, text_length=text_length)
    step = ReductionStep(
        importance=method,
        neurons={tower.name: cuts[tower.name] for tower in found},
        intermediate_size={t.name: t.intermediate_size for t in mlp_towers(narrowed)},
        removed=removed,
        importance_lost=lost,
        parameters=(before["parameters"], after["parameters"]),
        flops=(before["flops"], after["flops"]),
    )
    logger.info(
        "MLP reduction: %s neurons per layer removed, parameters %d -> %d, FLOPs %d -> %d",
        step.neurons,
        *step.parameters,
        *step.flops,
    )
    return narrowed, step
