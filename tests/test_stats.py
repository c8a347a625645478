"""hf_soups.stats against closed forms, scipy and constructed examples."""

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from hf_soups.evaluation import EvalResult
from hf_soups.stats import (
    bootstrap_interval,
    gain_is_significant,
    mcnemar_exact,
    mean_interval,
    paired_comparison,
    wilson_interval,
)


def wilson_by_quadratic(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson's interval as the roots in p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    z = sps.norm.ppf(1 - (1 - confidence) / 2)
    phat = k / n
    a = 1 + z**2 / n
    b = -(2 * phat + z**2 / n)
    c = phat**2
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize(
    ("k", "n", "confidence"),
    [(0, 10, 0.95), (10, 10, 0.95), (7, 10, 0.95), (912, 1000, 0.95), (3, 50, 0.9), (40, 41, 0.99)],
)
def test_wilson_matches_quadratic_roots(k, n, confidence):
    low, high = wilson_interval(k, n, confidence)
    ref_low, ref_high = wilson_by_quadratic(k, n, confidence)
    assert low == pytest.approx(max(ref_low, 0.0), abs=1e-12)
    assert high == pytest.approx(min(ref_high, 1.0), abs=1e-12)


def test_wilson_rejects_bad_input():
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 10, confidence=1.5)


@pytest.mark.parametrize(("p", "n"), [(0.85, 200), (0.5, 60)])
def test_wilson_covers_true_accuracy_about_95_percent(p, n):
    rng = np.random.default_rng(1234)
    draws = rng.binomial(n, p, size=1000)
    covered = 0
    for k in draws:
        low, high = wilson_interval(int(k), n)
        covered += low <= p <= high
    assert 0.92 <= covered / len(draws) <= 0.98


@pytest.mark.parametrize(("b", "c"), [(0, 1), (1, 0), (3, 9), (10, 30), (12, 8), (20, 20), (0, 25)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    expected = sps.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_mcnemar_large_counts_do_not_underflow():
    expected = sps.binomtest(2950, 2950 + 3200, 0.5).pvalue
    assert mcnemar_exact(2950, 3200) == pytest.approx(expected, rel=1e-6)
    assert mcnemar_exact(0, 0) == 1.0


def test_bootstrap_is_seeded_and_both_forms_agree():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=300)
    predictions = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 5, size=300))
    correct = (predictions == labels).astype(float)
    first = bootstrap_interval(correct, n_resamples=500, seed=3)
    assert bootstrap_interval(correct, n_resamples=500, seed=3) == first
    assert bootstrap_interval(correct, n_resamples=500, seed=4) != first

    def accuracy(p, y):
        return float(np.mean(p == y))

    recomputed = bootstrap_interval((predictions, labels, accuracy), n_resamples=500, seed=3)
    assert recomputed == pytest.approx(first, abs=1e-12)


def test_bootstrap_of_a_mean_agrees_with_normal_theory():
    values = np.random.default_rng(7).normal(loc=2.0, scale=3.0, size=4000)
    low, high = bootstrap_interval(values, n_resamples=2000, seed=0)
    half = 1.959964 * values.std(ddof=1) / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_mean_interval_wilson_for_binary_bootstrap_otherwise():
    hits = np.array([1] * 37 + [0] * 13)
    assert mean_interval(hits) == pytest.approx(wilson_by_quadratic(37, 50, 0.95), abs=1e-12)
    losses = np.linspace(0.0, 2.0, 50)
    assert mean_interval(losses, seed=1) == bootstrap_interval(losses, seed=1)


def constructed_pair(both: int, only_a: int, only_b: int, neither: int, seed: int = 0):
    """Two results on the same labels with the given correct/incorrect counts, shuffled."""
    rng = np.random.default_rng(seed)
    n = both + only_a + only_b + neither
    labels = rng.integers(0, 10, size=n)
    wrong = (labels + 1) % 10
    a_right = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, dtype=bool)
    b_right = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, dtype=bool)
    order = rng.permutation(n)
    a_right, b_right = a_right[order], b_right[order]

    def result(name, right):
        predictions = np.where(right, labels, wrong)
        accuracy = float(np.mean(right))
        return EvalResult(name, {"accuracy": accuracy}, predictions, labels.copy())

    return result("uniform soup", a_right), result("best individual", b_right)


def test_paired_comparison_on_known_discordant_counts():
    soup, best = constructed_pair(both=400, only_a=30, only_b=10, neither=60)
    comparison = paired_comparison(soup, best, n_resamples=2000, seed=0)
    n = 500
    assert comparison.n == n
    assert comparison.n_discordant == 40
    assert comparison.difference == pytest.approx(20 / n)
    assert comparison.mcnemar_p == pytest.approx(sps.binomtest(10, 40, 0.5).pvalue)
    assert comparison.significant
    # The paired difference's standard error from the discordant counts (normal theory).
    se = math.sqrt((30 + 10) - (30 - 10) ** 2 / n) / n
    low, high = comparison.interval
    assert low == pytest.approx(20 / n - 1.96 * se, abs=0.006)
    assert high == pytest.approx(20 / n + 1.96 * se, abs=0.006)
    assert comparison.verdict.startswith("uniform soup vs best individual: +4.0 points (95% CI")
    assert "uniform soup is better" in comparison.verdict
    assert json.loads(json.dumps(comparison.to_dict()))["n_discordant"] == 40


def test_paired_comparison_within_noise():
    soup, best = constructed_pair(both=800, only_a=12, only_b=8, neither=180)
    comparison = paired_comparison(soup, best)
    assert comparison.mcnemar_p == pytest.approx(sps.binomtest(8, 20, 0.5).pvalue)
    assert not comparison.significant
    assert comparison.verdict.endswith("within noise")
    assert "+0.4 points" in comparison.verdict


def test_paired_comparison_refuses_different_examples():
    soup, best = constructed_pair(both=40, only_a=5, only_b=3, neither=2)
    shorter = EvalResult("short", {}, best.predictions[:-1], best.labels[:-1])
    with pytest.raises(ValueError, match="different examples"):
        paired_comparison(soup, shorter)
    relabelled = EvalResult("other", {}, best.predictions, np.roll(best.labels, 1))
    with pytest.raises(ValueError, match="labels differ"):
        paired_comparison(soup, relabelled)


def test_gain_is_significant_rules():
    better, worse = constructed_pair(both=400, only_a=30, only_b=10, neither=60)
    assert gain_is_significant(better, worse)
    assert not gain_is_significant(worse, better)
    slightly, base = constructed_pair(both=800, only_a=12, only_b=8, neither=180)
    assert not gain_is_significant(slightly, base)
    assert gain_is_significant(slightly, base, rule="margin", margin=0.0)
    assert gain_is_significant(better, worse, rule="margin", margin=0.03)
    assert not gain_is_significant(better, worse, rule="margin", margin=0.05)
    with pytest.raises(ValueError, match="unknown rule"):
        gain_is_significant(better, worse, rule="vibes")
