"""The greedy soup (Wortsman et al., ICML 2022, Recipe 1), as the official code makes it.

Score every ingredient on held-out data, sort best first, start the soup with the best, then
make one pass over the rest: add an ingredient to the uniform average only if the held-out score
of the soup with it beats the current soup's. A float32 running sum read with the merge engine's
loaders is kept, so each ingredient's weights are read once in the pass, and each candidate soup
is cast by the engine's dtype rule (:func:`hf_soups.merged_tensors.complete_state_dict`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hf_soups.ingredients import Ingredient
from hf_soups.merged_tensors import complete_state_dict, float_state
from hf_soups.pruning.mask_file import read_mask_file
from hf_soups.recipe.schema import GreedyStep
from hf_soups.stats import gain_is_significant

logger = logging.getLogger(__name__)

__all__ = ["AcceptanceRule", "GreedyResult", "greedy_pass"]


@dataclass(frozen=True)
class AcceptanceRule:
    """When a candidate joins the soup.

    Attributes:
        maximize: ``False`` for metrics to minimise (a loss).
        strict: accept only a strictly better score (the paper's ``>``); ``False`` accepts ties.
        min_gain: the gain must exceed it (negative: accept ingredients that cost at most that).
        noise_aware: also require the gain in ``metric`` to be distinguishable from noise on the
            held-out examples at level ``significance`` (exact McNemar for 0/1 per-example
            values, else a paired bootstrap: :func:`hf_soups.stats.gain_is_significant`).
        significance: the level of that test.
        max_size: stop adding once the soup has this many ingredients.
    """

    maximize: bool = True
    strict: bool = True
    min_gain: float = 0.0
    noise_aware: bool = False
    significance: float = 0.05
    max_size: int | None = None
    metric: str | None = None
    """The metric the gains are measured in (default: the evaluator's primary metric)."""

    def gain(self, score: float, current: float) -> float:
        return (score - current) if self.maximize else (current - score)

    def accepts(self, gain: float) -> bool:
        return gain > self.min_gain if self.strict else gain >= self.min_gain

    def to_dict(self) -> dict:
        return {"strict": self.strict, "min_gain": self.min_gain, "noise_aware": self.noise_aware}


@dataclass
class GreedyResult:
    """The kept ingredients (best first), the soup's held-out score and the whole trace."""

    kept: list[Ingredient]
    order: list[Ingredient]
    score: float
    result: object | None
    trace: list[GreedyStep]


Scorer = Callable[[nn.Module, str], tuple[float, object | None]]
"""``scorer(model, name) -> (value, EvalResult or None)``."""


def greedy_pass(
    ingredients: Sequence[Ingredient],
    individual: dict[str, float],
    individual_results: dict[str, object],
    scorer: Scorer,
    build_model: Callable[[Ingredient, dict[str, torch.Tensor]], nn.Module],
    rule: AcceptanceRule,
    *,
    intersect_masks: bool = False,
) -> GreedyResult:
    """Run the greedy pass over ``ingredients`` already scored alone (``individual``).

    ``intersect_masks``: pruned ingredients souped with ``masks="intersection"``; each trial
    soup is masked by the intersection of its ingredients' masks, as the soup it would become
    is (ingredients sharing one mask need nothing: their average keeps its zeros)."""
    sign = 1.0 if rule.maximize else -1.0
    order = sorted(ingredients, key=lambda i: -sign * individual[i.name])
    best = order[0]
    kept = [best]
    running_sum = float_state(best)
    best_score = individual[best.name]
    best_result = individual_results.get(best.name)
    trace = [GreedyStep(best.name, best_score, best_score, True, "best individual")]
    kept_mask = read_mask_file(best.path) if intersect_masks else None
    for candidate in order[1:]:
        own = individual[candidate.name]
        if rule.max_size is not None and len(kept) >= rule.max_size:
            trace.append(GreedyStep(candidate.name, own, None, False, "max_size reached"))
            continue
        candidate_tensors = float_state(candidate)
        k = len(kept) + 1
        soup_state = {name: (running_sum[name] + t) / k for name, t in candidate_tensors.items()}
        trial_mask = None
        if intersect_masks:
            trial_mask = _intersection(kept_mask, read_mask_file(candidate.path))
            for name, mask in (trial_mask or {}).items():
                soup_state[name] = torch.where(mask, soup_state[name], 0.0)
        model = build_model(best, complete_state_dict(soup_state, best))
        score, result = scorer(model, f"greedy soup + {candidate.name}")
        gain = rule.gain(score, best_score)
        accepted = rule.accepts(gain)
        reason = f"gain {gain:+.4g}"
        if accepted and rule.noise_aware:
            accepted = gain_is_significant(
                result,
                best_result,
                alpha=rule.significance,
                metric=rule.metric or result.score_metric,
                higher_is_better=rule.maximize,
            )
            reason += ", significant" if accepted else ", within noise"
        trace.append(GreedyStep(candidate.name, own, score, accepted, reason))
        logger.info(
            "greedy: + %s -> %.4g (%s)%s",
            candidate.name,
            score,
            reason,
            ", kept" if accepted else "",
        )
        if accepted:
            kept.append(candidate)
            kept_mask = trial_mask
            best_score, best_result = score, result
            for name, tensor in candidate_tensors.items():
                running_sum[name] += tensor
    if len(kept) == 1 and len(ingredients) > 1:
        logger.warning(
            "Greedy soup kept only the best ingredient (%s): adding any other did not raise "
            "the held-out score. On small pools this is common; try more diverse ingredients "
            "(a wider learning-rate range), strict=False or a negative min_gain, or compare "
            "with the uniform soup.",
            best.name,
        )
    return GreedyResult(kept, order, best_score, best_result, trace)


def _intersection(a: dict | None, b: dict | None) -> dict | None:
    """Masks keeping what both keep; a tensor (or model) without a mask counts as dense."""
    if a is None or b is None:
        return a if b is None else b
    return {
        name: a[name] & b[name] if name in a and name in b else a.get(name, b.get(name))
        for name in a.keys() | b.keys()
    }
