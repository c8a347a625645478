"""Stacked scoring: several scorers applied one after the other, each pruning part of the way.

Split rule: with ``m`` scorers, current density ``d0`` and target ``d``, scorer ``i`` (1-based)
prunes to density ``d0 · (d / d0)^(i / m)``: each removes the same *share of the weights still
remaining* (a geometric split, as SynFlow's schedule and iterative magnitude pruning split their
rounds), so a later scorer ranks the network its predecessors left. ``weights`` changes the
shares: scorer ``i`` takes the exponent ``(w_1 + ... + w_i) / (w_1 + ... + w_m)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from hf_soups.pruning.masks import density_of
from hf_soups.pruning.scorer import Scorer


def stage_densities(start: float, target: float, weights: Sequence[float]) -> list[float]:
    """The density reached after each stage under the geometric split rule above."""
    if any(w <= 0 for w in weights):
        raise ValueError(f"stage weights must be > 0, got {list(weights)}")
    if start == 0.0:
        return [0.0] * len(weights)
    total, reached, densities = sum(weights), 0.0, []
    for weight in weights:
        reached += weight
        densities.append(start * (target / start) ** (reached / total))
    densities[-1] = target  # exact at the end, whatever the rounding of the powers
    return densities


class Stacked(Scorer):
    """Apply ``scorers`` in sequence to reach the target density (see the module docstring).

    Args:
        scorers: two or more scorers (:class:`Magnitude`, :class:`SNIP`, :class:`GraSP`,
            :class:`SynFlow`), in the order they prune.
        weights: relative share of the pruning done by each (default equal).
    """

    name = "stacked"

    def __init__(self, scorers: Sequence[Scorer], weights: Sequence[float] | None = None) -> None:
        if len(scorers) < 2:
            raise ValueError("stacked scoring needs at least two scorers")
        if weights is not None and len(weights) != len(scorers):
            raise ValueError(f"weights: {len(weights)} given for {len(scorers)} scorers")
        self.scorers = list(scorers)
        self.weights = list(weights) if weights is not None else [1.0] * len(scorers)
        self.name = "stacked(" + ", ".join(s.name for s in self.scorers) + ")"

    def prune_to(self, model, parameters, density, *, scope, current):
        start = density_of(current) if current is not None else 1.0
        masks = current
        for scorer, stage in zip(
            self.scorers, stage_densities(start, density, self.weights), strict=True
        ):
            masks = scorer.prune_to(model, parameters, stage, scope=scope, current=masks)
        return masks
