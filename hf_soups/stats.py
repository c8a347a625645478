"""Honest statistics for comparing models evaluated on the same examples.

On 1,000 test images one point of accuracy is ten images, and two soups evaluated on the same
images make highly correlated errors. The tools here say how much a score or a difference can
be trusted:

- `wilson_interval`: confidence interval of a proportion (accuracy), sound near 0 and 1 and
  for small n, where the normal approximation is not.
- `bootstrap_interval`: percentile bootstrap interval of a mean of per-example values, or of
  any metric recomputed on resampled (predictions, labels); seeded and reproducible.
- `mcnemar_exact`: exact McNemar test on the examples two models disagree on.
- `holm_adjust`: Holm–Bonferroni adjusted p-values for comparisons reported together.
- `paired_comparison`: difference of two `EvalResult`s with a paired bootstrap interval, the
  McNemar (or bootstrap) p-value and a verdict in words; `adjust_comparisons` judges several
  by their Holm-adjusted p-values.
- `gain_is_significant`: a noise-aware acceptance rule for greedy soups, on any metric.

The exact binomial test and the Wilson interval are scipy's (`scipy.stats.binomtest`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hf_soups.errors import UnpairedResultsError

if TYPE_CHECKING:
    from hf_soups.evaluation import EvalResult

# Resampled index matrices are drawn in chunks of about this many entries, so bootstrapping
# 50,000 examples 1,000 times does not allocate 50 million indices at once.
_CHUNK_ENTRIES = 4_000_000


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion such as accuracy.

    Args:
        successes: Number of correct examples, between 0 and `n`.
        n: Number of examples, at least 1.
        confidence: Coverage of the interval, e.g. 0.95.

    Returns:
        `(low, high)` as fractions in [0, 1].
    """
    if n < 1:
        raise ValueError(f"wilson_interval needs n >= 1 examples, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    _check_confidence(confidence)
    from scipy.stats import binomtest  # imported on use: scipy.stats takes a second to import

    interval = binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def _resample_indices(rng: np.random.Generator, n: int, n_resamples: int) -> Iterator[np.ndarray]:
    # Both bootstrap forms draw through here, so for one seed they see the same resamples.
    rows = max(1, _CHUNK_ENTRIES // n)
    done = 0
    while done < n_resamples:
        count = min(rows, n_resamples - done)
        yield rng.integers(0, n, size=(count, n))
        done += count


def _percentile_interval(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_interval(
    data: Sequence[float] | np.ndarray | tuple[Any, Any, Callable[[Any, Any], float]],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval, resampling examples with replacement.

    Args:
        data: Either a 1-D array of per-example values (the interval is for their mean), or a
            tuple `(predictions, labels, metric_fn)`: `metric_fn(predictions[idx], labels[idx])`
            is recomputed on each resample (predictions may be 2-D, e.g. logits).
        n_resamples: Number of bootstrap resamples.
        confidence: Coverage of the interval.
        seed: Seed of the resampling; the same seed gives the same interval, and both forms of
            `data` draw the same resamples.

    Returns:
        `(low, high)`.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    if isinstance(data, tuple) and len(data) == 3 and callable(data[2]):
        predictions, labels, metric_fn = np.asarray(data[0]), np.asarray(data[1]), data[2]
        n = len(labels)
        if n < 1 or len(predictions) != n:
            raise ValueError(
                f"bootstrap_interval: {len(predictions)} predictions for {n} labels; "
                "need the same non-zero number"
            )
        estimates = np.array(
            [
                float(metric_fn(predictions[idx], labels[idx]))
                for chunk in _resample_indices(rng, n, n_resamples)
                for idx in chunk
            ]
        )
    else:
        values = np.asarray(data, dtype=np.float64)
        if values.ndim != 1 or values.size < 1:
            raise ValueError(
                f"bootstrap_interval expects a non-empty 1-D array of per-example values, "
                f"got shape {values.shape}"
            )
        estimates = _resampled_means(values, rng, n_resamples)
    return _percentile_interval(estimates, confidence)


def _resampled_means(values: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    chunks = _resample_indices(rng, values.size, n_resamples)
    return np.concatenate([values[chunk].mean(axis=1) for chunk in chunks])


def _is_binary(values: np.ndarray) -> bool:
    return values.dtype == np.bool_ or bool(np.isin(values, (0, 1)).all())


def mean_interval(
    values: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval for the mean of per-example values: Wilson for 0/1 values, else bootstrap."""
    values = np.asarray(values)
    if values.ndim != 1 or values.size < 1:
        raise ValueError(f"expected a non-empty 1-D array of values, got shape {values.shape}")
    if _is_binary(values):
        return wilson_interval(int(values.sum()), int(values.size), confidence)
    return bootstrap_interval(values, n_resamples=n_resamples, confidence=confidence, seed=seed)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar test on discordant counts.

    Args:
        b: Examples the first model gets right and the second wrong.
        c: Examples the second model gets right and the first wrong.

    Returns:
        The p-value of "both models are equally accurate": under that hypothesis `b` follows
        Binomial(b + c, 1/2), and the two-sided p-value doubles the smaller tail.
    """
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"discordant counts must be non-negative integers, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    # For p = 1/2 the binomial is symmetric, so scipy's two-sided p-value (the probability of
    # outcomes no likelier than b) is twice the smaller tail, capped at 1.
    return float(binomtest(int(b), int(b) + int(c), 0.5).pvalue)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given.

    With the m p-values sorted ascending, the i-th smallest (i from 0) is multiplied by
    m - i, each is raised to the largest adjusted value before it (so the adjusted values keep
    the order of the raw ones) and capped at 1. Rejecting every hypothesis whose adjusted p is
    below a level controls the family-wise error rate at that level (Holm, 1979).
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"holm_adjust expects a 1-D sequence of p-values, got shape {p.shape}")
    if p.size and not ((p >= 0.0) & (p <= 1.0)).all():
        raise ValueError(f"p-values must lie in [0, 1], got {p_values}")
    order = np.argsort(p, kind="stable")
    scaled = (p.size - np.arange(p.size)) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted.tolist()


def _paired_values(
    result_a: EvalResult, result_b: EvalResult, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    if len(result_a.labels) != len(result_b.labels):
        raise UnpairedResultsError(
            f"cannot compare {result_a.name!r} ({len(result_a.labels)} examples) with "
            f"{result_b.name!r} ({len(result_b.labels)} examples): they were evaluated on "
            "different examples"
        )
    mismatched = np.flatnonzero(np.asarray(result_a.labels) != np.asarray(result_b.labels))
    if mismatched.size:
        raise UnpairedResultsError(
            f"cannot compare {result_a.name!r} with {result_b.name!r}: their labels differ at "
            f"{mismatched.size} positions (first at index {mismatched[0]}), so they were not "
            "evaluated on the same examples in the same order"
        )
    return (
        np.asarray(result_a.values(metric), dtype=np.float64),
        np.asarray(result_b.values(metric), dtype=np.float64),
    )


def _paired_bootstrap(
    differences: np.ndarray, n_resamples: int, confidence: float, seed: int
) -> tuple[tuple[float, float], float]:
    """Percentile interval of the mean difference and its two-sided bootstrap p-value.

    The p-value is twice the smaller share of resampled means on either side of zero, so it
    falls below 1 - confidence about when the interval excludes zero.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    means = _resampled_means(differences, np.random.default_rng(seed), n_resamples)
    tail = min(np.mean(means <= 0.0), np.mean(means >= 0.0))
    return _percentile_interval(means, confidence), float(min(1.0, 2.0 * tail))


@dataclass(frozen=True)
class PairedComparison:
    """Result of `paired_comparison`: is `name_a` better than `name_b` on the same examples?

    `difference` and `interval` are mean(a) - mean(b) as fractions (0.008 is 0.8 points).
    `mcnemar_p` is the exact McNemar p-value for 0/1 per-example values and `None` otherwise;
    `p_value` is that p-value, or the paired bootstrap's for other values. `adjusted_p` is
    set when this comparison is reported among several (`adjust_comparisons`, Holm); then
    `significant` means `adjusted_p < alpha`. Alone, `significant` means `mcnemar_p < alpha`
    for 0/1 values, and the interval excluding zero otherwise.
    """

    name_a: str
    name_b: str
    metric: str
    n: int
    difference: float
    interval: tuple[float, float]
    mcnemar_p: float | None
    n_discordant: int
    significant: bool
    confidence: float
    verdict: str
    p_value: float = 1.0
    adjusted_p: float | None = None
    alpha: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary of every field."""
        return {**dataclasses.asdict(self), "interval": list(self.interval)}

    def with_adjusted_p(self, adjusted_p: float) -> PairedComparison:
        """This comparison judged by an adjusted p-value (significance and verdict redone)."""
        significant = adjusted_p < self.alpha
        return dataclasses.replace(
            self,
            adjusted_p=adjusted_p,
            significant=significant,
            verdict=_verdict(self, significant, adjusted_p),
        )

    def __str__(self) -> str:
        return self.verdict


def _verdict(c: PairedComparison, significant: bool, adjusted_p: float | None) -> str:
    binary = c.mcnemar_p is not None
    scale, unit, digits = (100.0, " points", 1) if binary else (1.0, "", 4)
    test = f", McNemar p={c.mcnemar_p:.2g}" if binary else ""
    if adjusted_p is not None:
        test += "" if binary else f", bootstrap p={c.p_value:.2g}"
        test += f", Holm-adjusted p={adjusted_p:.2g}"
    if not significant:
        conclusion = "within noise"
    else:
        conclusion = f"{c.name_a if c.difference > 0 else c.name_b} is better"
    low, high = c.interval
    return (
        f"{c.name_a} vs {c.name_b}: {c.difference * scale:+.{digits}f}{unit} "
        f"({c.confidence:.0%} CI {low * scale:+.{digits}f} to {high * scale:+.{digits}f})"
        f"{test}: {conclusion}"
    )


def paired_comparison(
    result_a: EvalResult,
    result_b: EvalResult,
    n_resamples: int = 1000,
    seed: int = 0,
    *,
    metric: str = "accuracy",
    confidence: float = 0.95,
    alpha: float = 0.05,
) -> PairedComparison:
    """Compare two results on the same examples: paired bootstrap interval and McNemar test.

    Args:
        result_a: The result being judged, e.g. a soup.
        result_b: The reference, e.g. the best individual model.
        n_resamples: Bootstrap resamples of the per-example differences.
        seed: Bootstrap seed.
        metric: Per-example metric to compare (see `EvalResult.values`).
        confidence: Coverage of the difference's interval.
        alpha: Significance level of the test.

    When several comparisons are reported together, judge them with `adjust_comparisons`.

    Raises:
        UnpairedResultsError: If the results were not computed on the same examples in the
            same order (a `ValueError`).
    """
    a, b = _paired_values(result_a, result_b, metric)
    interval, bootstrap_p = _paired_bootstrap(a - b, n_resamples, confidence, seed)
    n_discordant = int(np.count_nonzero(a != b))
    mcnemar_p = None
    if _is_binary(a) and _is_binary(b):
        only_a = int(np.count_nonzero((a == 1) & (b == 0)))
        mcnemar_p = mcnemar_exact(only_a, n_discordant - only_a)
        significant = mcnemar_p < alpha
    else:
        significant = not interval[0] <= 0.0 <= interval[1]
    comparison = PairedComparison(
        name_a=result_a.name,
        name_b=result_b.name,
        metric=metric,
        n=int(a.size),
        difference=float(a.mean() - b.mean()),
        interval=interval,
        mcnemar_p=mcnemar_p,
        n_discordant=n_discordant,
        significant=significant,
        confidence=confidence,
        verdict="",
        p_value=bootstrap_p if mcnemar_p is None else mcnemar_p,
        alpha=alpha,
    )
    return dataclasses.replace(comparison, verdict=_verdict(comparison, significant, None))


def adjust_comparisons(comparisons: Sequence[PairedComparison]) -> list[PairedComparison]:
    """Comparisons reported together, each judged by its Holm-adjusted p-value."""
    adjusted = holm_adjust([c.p_value for c in comparisons])
    return [c.with_adjusted_p(p) for c, p in zip(comparisons, adjusted, strict=True)]


def gain_is_significant(
    candidate: EvalResult,
    current: EvalResult,
    rule: Literal["paired", "mcnemar", "margin"] = "paired",
    alpha: float = 0.05,
    *,
    margin: float = 0.0,
    metric: str = "accuracy",
    higher_is_better: bool = True,
    n_resamples: int = 1000,
    seed: int = 0,
) -> bool:
    """Noise-aware acceptance rule for greedy soups: is `candidate` really better on `metric`?

    Rules:
        - ``"paired"``: a paired test at level `alpha` finds `candidate` better: the exact
          McNemar test when the per-example values of `metric` are 0/1 (successive greedy
          soups differ on few examples, so a test on the discordant ones is the fitting one),
          else the paired bootstrap: the `1 - alpha` interval of the mean per-example gain
          lies above zero.
        - ``"mcnemar"``: the exact McNemar test only (0/1 values).
        - ``"margin"``: the mean per-example gain exceeds `margin` (a fraction: 0.005 is half a
          point). `margin=0` is the paper's plain "improves" rule with strict inequality.

    `higher_is_better=False` is for metrics to minimise (a per-example loss).

    Raises:
        UnpairedResultsError: If the results are on different examples.
        ValueError: If `rule` is unknown, or "mcnemar" meets values other than 0/1.
    """
    a, b = _paired_values(candidate, current, metric)
    gains = (a - b) if higher_is_better else (b - a)
    if rule == "margin":
        return bool(gains.mean() > margin)
    if rule not in ("paired", "mcnemar"):
        raise ValueError(f"unknown rule {rule!r}; expected 'paired', 'mcnemar' or 'margin'")
    if _is_binary(a) and _is_binary(b):
        wins, losses = int(np.count_nonzero(gains > 0)), int(np.count_nonzero(gains < 0))
        return wins > losses and mcnemar_exact(wins, losses) < alpha
    if rule == "mcnemar":
        raise ValueError(
            f"rule='mcnemar' needs 0/1 per-example values; metric {metric!r} has others"
        )
    (low, _), _ = _paired_bootstrap(gains, n_resamples, 1.0 - alpha, seed)
    return low > 0.0
