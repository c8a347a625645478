"""Honest statistics for comparing models evaluated on the same examples.

On 1,000 test images one point of accuracy is ten images, and two soups evaluated on the same
images make highly correlated errors. The tools here say how much a score or a difference can
be trusted:

- `wilson_interval`: confidence interval of a proportion (accuracy), sound near 0 and 1 and
  for small n, where the normal approximation is not.
- `bootstrap_interval`: percentile bootstrap interval of a mean of per-example values, or of
  any metric recomputed on resampled (predictions, labels); seeded and reproducible.
- `mcnemar_exact`: exact McNemar test on the examples two models disagree on.
- `paired_comparison`: difference of two `EvalResult`s with a paired bootstrap interval, the
  McNemar p-value and a verdict in words.
- `gain_is_significant`: a noise-aware acceptance rule for greedy soups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from hf_soups.evaluation import EvalResult

# Resampled index matrices are drawn in chunks of about this many entries, so bootstrapping
# 50,000 examples 1,000 times does not allocate 50 million indices at once.
_CHUNK_ENTRIES = 4_000_000


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


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
    z = _z(confidence)
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


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
    _z(confidence)
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
        chunks = _resample_indices(rng, values.size, n_resamples)
        estimates = np.concatenate([values[chunk].mean(axis=1) for chunk in chunks])
    return _percentile_interval(estimates, confidence)


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
    n, k = int(b) + int(c), int(min(b, c))
    if n == 0 or 2 * k >= n:
        return 1.0
    # log P(X = j) for j = 0..k by the recurrence P(j+1) = P(j) (n - j) / (j + 1), in logs so
    # that thousands of discordant examples do not underflow.
    j = np.arange(k, dtype=np.float64)
    log_pmf = -n * math.log(2.0) + np.concatenate(([0.0], np.cumsum(np.log(n - j) - np.log1p(j))))
    top = log_pmf.max()
    log_tail = top + math.log(float(np.exp(log_pmf - top).sum()))
    return min(1.0, 2.0 * math.exp(log_tail))


def _paired_values(
    result_a: EvalResult, result_b: EvalResult, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    if len(result_a.labels) != len(result_b.labels):
        raise ValueError(
            f"cannot compare {result_a.name!r} ({len(result_a.labels)} examples) with "
            f"{result_b.name!r} ({len(result_b.labels)} examples): they were evaluated on "
            "different examples"
        )
    mismatched = np.flatnonzero(np.asarray(result_a.labels) != np.asarray(result_b.labels))
    if mismatched.size:
        raise ValueError(
            f"cannot compare {result_a.name!r} with {result_b.name!r}: their labels differ at "
            f"{mismatched.size} positions (first at index {mismatched[0]}), so they were not "
            "evaluated on the same examples in the same order"
        )
    return (
        np.asarray(result_a.values(metric), dtype=np.float64),
        np.asarray(result_b.values(metric), dtype=np.float64),
    )


@dataclass(frozen=True)
class PairedComparison:
    """Result of `paired_comparison`: is `name_a` better than `name_b` on the same examples?

    `difference` and `interval` are mean(a) - mean(b) as fractions (0.008 is 0.8 points).
    `mcnemar_p` is `None` when per-example values are not 0/1; then `significant` means the
    interval excludes zero.
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary of every field."""
        return {
            "name_a": self.name_a,
            "name_b": self.name_b,
            "metric": self.metric,
            "n": self.n,
            "difference": self.difference,
            "interval": list(self.interval),
            "mcnemar_p": self.mcnemar_p,
            "n_discordant": self.n_discordant,
            "significant": self.significant,
            "confidence": self.confidence,
            "verdict": self.verdict,
        }

    def __str__(self) -> str:
        return self.verdict


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
        alpha: Significance level of the McNemar test.

    Raises:
        ValueError: If the results were not computed on the same examples in the same order.
    """
    a, b = _paired_values(result_a, result_b, metric)
    difference = float(a.mean() - b.mean())
    interval = bootstrap_interval(a - b, n_resamples=n_resamples, confidence=confidence, seed=seed)
    binary = _is_binary(a) and _is_binary(b)
    n_discordant = int(np.count_nonzero(a != b))
    if binary:
        only_a = int(np.count_nonzero((a == 1) & (b == 0)))
        p_value: float | None = mcnemar_exact(only_a, n_discordant - only_a)
        significant = p_value < alpha
        test = f", McNemar p={p_value:.2g}"
        scale, unit = 100.0, " points"
    else:
        p_value = None
        significant = not interval[0] <= 0.0 <= interval[1]
        test = ""
        scale, unit = 1.0, ""
    if not significant:
        conclusion = "within noise"
    else:
        conclusion = f"{result_a.name if difference > 0 else result_b.name} is better"
    verdict = (
        f"{result_a.name} vs {result_b.name}: {difference * scale:+.{1 if binary else 4}f}{unit} "
        f"({confidence:.0%} CI {interval[0] * scale:+.{1 if binary else 4}f} to "
        f"{interval[1] * scale:+.{1 if binary else 4}f}){test}: {conclusion}"
    )
    return PairedComparison(
        name_a=result_a.name,
        name_b=result_b.name,
        metric=metric,
        n=int(a.size),
        difference=difference,
        interval=interval,
        mcnemar_p=p_value,
        n_discordant=n_discordant,
        significant=significant,
        confidence=confidence,
        verdict=verdict,
    )


def gain_is_significant(
    candidate: EvalResult,
    current: EvalResult,
    rule: Literal["mcnemar", "margin"] = "mcnemar",
    alpha: float = 0.05,
    *,
    margin: float = 0.0,
    metric: str = "accuracy",
) -> bool:
    """Noise-aware acceptance rule for greedy soups: is `candidate` really better?

    Rules:
        - ``"mcnemar"``: the candidate gets more of the discordant examples right and the exact
          McNemar test rejects equal accuracy at level `alpha`. Successive greedy soups differ
          on few examples, so a test on the discordant ones is the fitting one.
        - ``"margin"``: the candidate's mean per-example value exceeds the current one's by
          more than `margin` (a fraction: 0.005 is half a point). `margin=0` is the paper's
          plain "improves" rule with strict inequality.

    Raises:
        ValueError: If the results are on different examples, or `rule` is unknown.
    """
    a, b = _paired_values(candidate, current, metric)
    if rule == "margin":
        return bool(a.mean() - b.mean() > margin)
    if rule == "mcnemar":
        if not (_is_binary(a) and _is_binary(b)):
            raise ValueError(
                f"rule='mcnemar' needs 0/1 per-example values; metric {metric!r} has others"
            )
        wins = int(np.count_nonzero((a == 1) & (b == 0)))
        losses = int(np.count_nonzero((a == 0) & (b == 1)))
        return wins > losses and mcnemar_exact(wins, losses) < alpha
    raise ValueError(f"unknown rule {rule!r}; expected 'mcnemar' or 'margin'")
