"""Choosing the mixing coefficient from a sweep's scores, as the PAINT paper does.

The eval sets of a sweep fall in two groups: **target** sets, which fine-tuning is meant to
improve (the patching task in PAINT, the reference distribution in WiSE-FT), and **preserve**
sets, whose zero-shot accuracy should survive (PAINT's supported tasks, WiSE-FT's distribution
shifts). Two rules:

- ``"average"`` (PAINT, Ilharco et al. 2022, section 3): maximise the average of the target
  accuracy and the preserve accuracy, each group first averaged over its sets, so that several
  supported tasks do not outweigh one patching task. With no preserve set, the target accuracy.
- ``"max_drop"``: the best target accuracy among the coefficients that lose at most
  ``max_drop`` on *every* preserve set relative to the zero-shot model (``alpha = 0``), in the
  metric's units (``0.01`` = one point of accuracy). ``alpha = 0`` always qualifies.

Scores are higher-is-better. Ties (within ``1e-12``) go to the smallest ``alpha``: the model
closest to the zero-shot one. Choose on held-out data, not on the test sets you report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

__all__ = ["AlphaChoice", "choose_alpha"]

_TIE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class AlphaChoice:
    """The chosen coefficient, the rule that chose it and what the rule saw at every ``alpha``.

    Attributes:
        alpha: the chosen mixing coefficient.
        rule: ``"average"`` or ``"max_drop"``.
        alphas: the coefficients compared, in sweep order.
        objective: per ``alpha``, the value the rule maximised.
        feasible: per ``alpha``, whether it met the ``max_drop`` constraint (all true for
            ``"average"``).
        target: names of the target sets; preserve: names of the preserve sets.
        max_drop: the allowed loss on each preserve set (``"max_drop"`` only).
    """

    alpha: float
    rule: str
    alphas: tuple[float, ...]
    objective: tuple[float, ...]
    feasible: tuple[bool, ...]
    target: tuple[str, ...]
    preserve: tuple[str, ...]
    max_drop: float | None = None

    @property
    def index(self) -> int:
        """Position of the chosen ``alpha`` in :attr:`alphas`."""
        return self.alphas.index(self.alpha)

    def describe(self) -> str:
        """The rule in words, for logs and model cards."""
        target = " + ".join(self.target)
        if self.rule == "average":
            if not self.preserve:
                return f"alpha={self.alpha:g} maximises the score on {target}"
            return (
                f"alpha={self.alpha:g} maximises the mean of the scores on {target} and on "
                f"{' + '.join(self.preserve)} (each group averaged over its sets)"
            )
        return (
            f"alpha={self.alpha:g} maximises the score on {target} while losing at most "
            f"{self.max_drop:g} on each of {', '.join(self.preserve)} relative to alpha=0"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of the choice."""
        return {
            "alpha": self.alpha,
            "rule": self.rule,
            "max_drop": self.max_drop,
            "target": list(self.target),
            "preserve": list(self.preserve),
            "objective": list(self.objective),
            "feasible": list(self.feasible),
            "description": self.describe(),
        }


def _check_names(
    scores: Mapping[str, Sequence[float]],
    n_alphas: int,
    target: Sequence[str],
    preserve: Sequence[str],
) -> None:
    if not target:
        raise ValueError("target: name at least one eval set that fine-tuning should improve")
    overlap = sorted(set(target) & set(preserve))
    if overlap:
        raise ValueError(f"eval set {overlap[0]!r} is both a target and a preserve set")
    for name in [*target, *preserve]:
        if name not in scores:
            raise KeyError(f"no scores for eval set {name!r} (have: {sorted(scores)})")
        if len(scores[name]) != n_alphas:
            raise ValueError(
                f"eval set {name!r} has {len(scores[name])} scores for {n_alphas} alphas"
            )


def _argmax_smallest_alpha(
    alphas: Sequence[float], objective: Sequence[float], feasible: Sequence[bool]
) -> int:
    candidates = [i for i in range(len(alphas)) if feasible[i]]
    best = max(objective[i] for i in candidates)
    tied = [i for i in candidates if objective[i] >= best - _TIE_TOLERANCE]
    return min(tied, key=lambda i: alphas[i])


def choose_alpha(
    alphas: Sequence[float],
    scores: Mapping[str, Sequence[float]],
    *,
    target: Sequence[str],
    preserve: Sequence[str] = (),
    max_drop: float | None = None,
) -> AlphaChoice:
    """Pick the mixing coefficient from a score table (see the module docstring for the rules).

    Args:
        alphas: the swept coefficients.
        scores: eval set name -> one score per ``alpha`` (higher is better).
        target: sets fine-tuning should improve (patching task, reference distribution).
        preserve: sets whose zero-shot score should be kept (supported tasks, shifts).
        max_drop: use the ``"max_drop"`` rule with this allowed loss per preserve set; needs
            ``0`` among ``alphas`` (the zero-shot reference). ``None``: the ``"average"`` rule.
    """
    alphas = [float(alpha) for alpha in alphas]
    if not alphas:
        raise ValueError("alphas is empty")
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"alphas has duplicates: {alphas}")
    target, preserve = tuple(target), tuple(preserve)
    _check_names(scores, len(alphas), target, preserve)
    target_mean = [fmean(scores[name][i] for name in target) for i in range(len(alphas))]
    if max_drop is None:
        if preserve:
            preserve_mean = [
                fmean(scores[name][i] for name in preserve) for i in range(len(alphas))
            ]
            objective = [(t + p) / 2 for t, p in zip(target_mean, preserve_mean)]
        else:
            objective = target_mean
        feasible = [True] * len(alphas)
        rule = "average"
    else:
        max_drop = float(max_drop)
        if max_drop < 0:
            raise ValueError(f"max_drop must be >= 0, got {max_drop}")
        if 0.0 not in alphas:
            raise ValueError("the max_drop rule compares with the zero-shot model: include alpha=0")
        reference = alphas.index(0.0)
        feasible = [
            all(
                scores[name][i] >= scores[name][reference] - max_drop - _TIE_TOLERANCE
                for name in preserve
            )
            for i in range(len(alphas))
        ]
        objective = target_mean
        rule = "max_drop"
    chosen = _argmax_smallest_alpha(alphas, objective, feasible)
    return AlphaChoice(
        alpha=alphas[chosen],
        rule=rule,
        alphas=tuple(alphas),
        objective=tuple(objective),
        feasible=tuple(feasible),
        target=target,
        preserve=preserve,
        max_drop=max_drop,
    )
