"""hf_soups.stats against closed forms, scipy and constructed examples."""

import json
import math

import numpy as np
import pytest
from references import mcnemar_closed_form, wilson_closed_form
from scipy import stats as sps

from hf_soups.errors import UnpairedResultsError
from hf_soups.evaluation import EvalResult
from hf_soups.stats import (
    adjust_comparisons,
    bootstrap_interval,
    gain_is_significant,
    holm_adjust,
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


@pytest.mark.parametrize(
    ("k", "n", "confidence"),
    [(0, 10, 0.95), (10, 10, 0.95), (7, 10, 0.95), (912, 1000, 0.95), (3, 50, 0.9), (40, 41, 0.99)],
)
def test_wilson_from_scipy_equals_the_closed_form(k, n, confidence):
    # wilson_interval is scipy's binomtest(...).proportion_ci(method="wilson"): same numbers.
    expected = wilson_closed_form(k, n, confidence)
    assert wilson_interval(k, n, confidence) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("b", "c"), [(0, 1), (1, 0), (3, 9), (10, 30), (12, 8), (20, 20), (0, 25)])
def test_mcnemar_from_scipy_equals_the_closed_form(b, c):
    # mcnemar_exact is scipy's binomtest(b, b + c, 1/2).pvalue: same numbers.
    assert mcnemar_exact(b, c) == pytest.approx(mcnemar_closed_form(b, c), rel=1e-9, abs=1e-15)


def test_mcnemar_large_counts_do_not_underflow():
    assert mcnemar_exact(2950, 3200) == pytest.approx(mcnemar_closed_form(2950, 3200), rel=1e-6)
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
    with pytest.raises(ValueError, match="different examples") as caught:
        paired_comparison(soup, shorter)
    assert isinstance(caught.value, UnpairedResultsError)
    relabelled = EvalResult("other", {}, best.predictions, np.roll(best.labels, 1))
    with pytest.raises(UnpairedResultsError, match="labels differ"):
        paired_comparison(soup, relabelled)
    with pytest.raises(UnpairedResultsError, match="labels differ"):
        gain_is_significant(soup, relabelled)


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


def with_values(name: str, metric: str, values: np.ndarray) -> EvalResult:
    """A result whose per-example `metric` values are `values` (not 0/1), all labels 0."""
    n = len(values)
    zeros = np.zeros(n, dtype=np.int64)
    return EvalResult(
        name, {metric: float(np.mean(values))}, zeros, zeros, per_example={metric: values}
    )


def test_paired_comparison_of_continuous_values_names_the_better_model():
    # Per-example log-likelihoods: "soup" is 0.05 higher on every example, up to noise of sd 0.1.
    rng = np.random.default_rng(5)
    base = rng.normal(-1.0, 0.5, size=2000)
    soup = with_values("soup", "loglik", base + 0.05 + rng.normal(0.0, 0.1, size=2000))
    best = with_values("best", "loglik", base)
    forward = paired_comparison(soup, best, metric="loglik", n_resamples=2000)
    assert forward.mcnemar_p is None
    differences = soup.values("loglik") - best.values("loglik")
    se = differences.std(ddof=1) / math.sqrt(differences.size)
    assert forward.difference == pytest.approx(differences.mean())
    assert forward.interval[0] == pytest.approx(differences.mean() - 1.96 * se, abs=0.15 * se)
    assert forward.interval[1] == pytest.approx(differences.mean() + 1.96 * se, abs=0.15 * se)
    # 0.05 / se is about 22 standard errors: significant, with a bootstrap p of 0.
    assert forward.significant and forward.p_value == 0.0
    assert forward.verdict.endswith("soup is better")
    backward = paired_comparison(best, soup, metric="loglik", n_resamples=2000)
    assert backward.significant and backward.difference == pytest.approx(-forward.difference)
    assert backward.verdict.endswith("soup is better")
    assert backward.verdict.startswith("best vs soup: -0.0")
    # A difference of a tenth of a standard error is noise, both ways round.
    noise = rng.normal(0.0, 0.1, size=2000)
    noise -= noise.mean()
    close = with_values("close", "loglik", base + 0.1 * noise.std(ddof=1) / 45 + noise)
    for a, b in ((close, best), (best, close)):
        comparison = paired_comparison(a, b, metric="loglik")
        assert not comparison.significant and comparison.p_value > 0.5
        assert comparison.verdict.endswith("within noise")


def test_holm_by_hand():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone).
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Ties: 0.02 x 3 = 0.06 and 0.02 x 2 = 0.04 -> 0.06; both tied p-values get 0.06.
    assert holm_adjust([0.02, 0.5, 0.02]) == pytest.approx([0.06, 0.5, 0.06])
    # Capped at 1, and the cap carries down the order.
    assert holm_adjust([0.4, 0.6]) == pytest.approx([0.8, 0.8])
    assert holm_adjust([0.7, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([0.03]) == [0.03]
    assert holm_adjust([]) == []
    with pytest.raises(ValueError, match="p-values"):
        holm_adjust([0.5, 1.5])


@pytest.mark.parametrize("seed", range(5))
def test_holm_rejects_as_the_step_down_procedure(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 0.02, size=6), rng.uniform(0, 1, size=14)])
    rng.shuffle(p)
    adjusted = np.array(holm_adjust(p))
    order = np.argsort(p)
    assert (adjusted >= p).all()
    assert (np.diff(adjusted[order]) >= 0).all()  # adjusted p-values keep the raw order
    for alpha in (0.01, 0.05, 0.1):
        # Holm (1979): going up the sorted p-values, reject while p_(i) <= alpha / (m - i).
        rejected = set()
        for i, index in enumerate(order):
            if p[index] > alpha / (len(p) - i):
                break
            rejected.add(int(index))
        assert set(np.flatnonzero(adjusted <= alpha).tolist()) == rejected


def test_adjusted_comparisons_keep_the_raw_p_and_star_by_the_adjusted_one():
    pairs = [
        constructed_pair(both=400, only_a=30, only_b=10, neither=60, seed=1),  # p = 0.0022
        constructed_pair(both=400, only_a=22, only_b=10, neither=68, seed=2),  # p = 0.05
        constructed_pair(both=400, only_a=20, only_b=8, neither=72, seed=3),  # p = 0.036
    ]
    raw = [paired_comparison(a, b) for a, b in pairs]
    hand = [sps.binomtest(10, 40, 0.5).pvalue, sps.binomtest(10, 32, 0.5).pvalue,
            sps.binomtest(8, 28, 0.5).pvalue]  # fmt: skip
    # Holm by hand: sorted p_1 < p_3 < p_2, multiplied by 3, 2, 1, kept monotone.
    expected = [3 * hand[0], max(2 * hand[2], hand[1]), 2 * hand[2]]
    adjusted = adjust_comparisons(raw)
    for comparison, before, raw_p, adjusted_p in zip(adjusted, raw, hand, expected):
        assert comparison.mcnemar_p == pytest.approx(raw_p) == before.mcnemar_p
        assert comparison.adjusted_p == pytest.approx(adjusted_p)
        assert comparison.significant == (adjusted_p < 0.05)
        assert "Holm-adjusted p=" in comparison.verdict
    assert raw[2].significant and not adjusted[2].significant  # raw p 0.036, adjusted 0.072
    assert adjusted[2].verdict.endswith("within noise")
    assert adjusted[0].significant and adjusted[0].verdict.endswith("uniform soup is better")
    assert json.loads(json.dumps(adjusted[0].to_dict()))["adjusted_p"] == pytest.approx(expected[0])


def test_gain_on_a_continuous_metric_goes_through_the_paired_bootstrap():
    rng = np.random.default_rng(11)
    base = rng.normal(-1.0, 0.5, size=2000)
    noise = rng.normal(0.0, 0.2, size=2000)
    noise -= noise.mean()
    se = noise.std(ddof=1) / math.sqrt(noise.size)
    current = with_values("current", "loglik", base)
    clear = with_values("clear", "loglik", base + 4 * se + noise)  # 4 standard errors up
    faint = with_values("faint", "loglik", base + 0.5 * se + noise)  # half a standard error
    assert gain_is_significant(clear, current, metric="loglik")
    assert not gain_is_significant(current, clear, metric="loglik")  # swapped: the opposite
    assert not gain_is_significant(faint, current, metric="loglik")
    assert gain_is_significant(faint, current, rule="margin", metric="loglik")
    # A loss: lower is better, so the verdicts turn round.
    assert gain_is_significant(current, clear, metric="loglik", higher_is_better=False)
    assert not gain_is_significant(clear, current, metric="loglik", higher_is_better=False)
    # The exact McNemar test has nothing to say about these values.
    with pytest.raises(ValueError, match="0/1"):
        gain_is_significant(clear, current, rule="mcnemar", metric="loglik")


def test_gain_on_a_0_1_metric_is_the_mcnemar_test_either_way_round():
    better, worse = constructed_pair(both=400, only_a=30, only_b=10, neither=60)
    assert gain_is_significant(better, worse, rule="mcnemar")
    assert not gain_is_significant(worse, better, rule="mcnemar")
    # As 0/1 errors, lower is better: the better model still wins, by the same McNemar test.
    for result in (better, worse):
        result.per_example["error"] = ~result.values("accuracy")
    assert gain_is_significant(better, worse, metric="error", higher_is_better=False)
    assert not gain_is_significant(worse, better, metric="error", higher_is_better=False)
