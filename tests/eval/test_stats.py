"""The seed-aware paired statistics (madpo_ray/eval/stats.py): hand-computed values, an
independent Monte Carlo check of the variance formula, and the calibration the verdicts rest on:
under simulated nulls with the README's seed spread the false-positive rate is alpha, where a
test that treats the seeds as fixed is not."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from madpo_ray.eval import stats as S


# --------------------------------------------------------------------------- hand values
def test_one_model_baseline_by_hand():
    # A: 2 seeds x 3 prompts, B: one model. d_p = (2, 3, 4) - (0, 1, 2) = 2 on every prompt, so the
    # prompts add nothing; A's seed means 2 and 4 -> s^2 = 2, over 2 seeds -> Var(D) = 1 with 1 df.
    d = S.paired_difference([[1, 2, 3], [3, 4, 5]], [[0, 1, 2]])
    assert (d.mean, d.se, d.df, d.prompts, d.seeds) == (2.0, 1.0, 1.0, 3, (2, 1))
    # t(1) is Cauchy: P(|T| > 2) = 1 - 2 atan(2) / pi
    assert d.p == pytest.approx(1 - 2 * math.atan(2) / math.pi)
    assert d.ci_high - d.mean == pytest.approx(math.tan(math.pi * (0.975 - 0.5)))  # Cauchy quantile x se
    assert d.seed_sd == (pytest.approx(math.sqrt(2)), None)


def test_two_sides_pool_their_seed_spread_by_hand():
    # seed means 1, 3 (s^2 = 2) and 0, 0 (s^2 = 0): pooled 1, times (1/2 + 1/2) -> Var(D) = 1 on 2 df
    d = S.paired_difference([[1, 1], [3, 3]], [[0, 0], [0, 0]])
    assert (d.mean, d.se, d.df) == (2.0, 1.0, 2.0)
    assert d.p == pytest.approx(1 - 2 / math.sqrt(6))  # t(2): P(|T| > t) = 1 - t / sqrt(t^2 + 2)


def test_hand_example_with_seed_by_prompt_noise():
    # A's seeds answer the prompts differently (noise), B is one model
    a = np.array([[2.0, 2.0, 1.0], [1.0, 3.0, -1.0]])
    b = np.array([[1.0, 1.5, 0.0]])
    d = S.paired_difference(a, b)
    # d_p = (0.5, 1.0, 0.0); seed means 5/3 and 1 -> s^2 = 2/9, over 2 -> 1/9. The residual mean square
    # is 7/6, so the noise share of Var_p(d_p) = 0.25 is 7/12: the prompts add nothing beyond the seeds.
    assert d.mean == pytest.approx(0.5) and d.se == pytest.approx(1 / 3) and d.df == pytest.approx(1.0)
    assert d.p == pytest.approx(1 - 2 * math.atan(1.5) / math.pi)


def test_seeds_are_not_paired_by_index():
    """Seed k of one method has nothing to do with seed k of another: pairing them by index would
    give these two methods a difference of exactly +1 with no uncertainty."""
    a = np.array([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0], [5.0, 5.0, 5.0]])
    b = a[::-1] - 1.0  # b's seed 0 is a's seed 2 minus 1, ...
    d = S.paired_difference(a, b)
    by_index = a - b  # (-3, 1, 5) per seed: a mean of 1 either way, but the spread is the seeds'
    assert d.mean == pytest.approx(by_index.mean())
    # seed means 1, 3, 5 and 4, 2, 0: pooled s^2 = 4, times (1/3 + 1/3) -> se = sqrt(8/3)
    assert d.se == pytest.approx(math.sqrt(8 / 3)) and d.df == pytest.approx(4.0)
    # with unequal seed counts, the seed averages: 3 - mean(2, 0) = 2, where pairing the first two
    # seeds by index would give mean(1 - 2, 3 - 0) = 1
    d2 = S.paired_difference(a, b[1:])
    assert d2.mean == pytest.approx(2.0) and d2.seeds == (3, 2)


def test_prompts_a_model_missed_are_left_out_on_both_sides():
    d = S.paired_difference([[1.0, np.nan, 3.0, 5.0]], [[0.0, 9.0, 1.0, 2.0]])
    assert d.prompts == 3 and d.mean == pytest.approx((1 + 2 + 3) / 3)
    with pytest.raises(ValueError, match="different prompt lists"):
        S.paired_difference([[1.0, 2.0]], [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="at least 2 prompts"):
        S.paired_difference([[1.0, np.nan]], [[0.0, 1.0]])


def test_the_prompts_share_counts_a_method_by_prompt_interaction():
    """One model a side: the classic paired t test over prompts, whatever the seeds would say."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.1, 1, (1, 50)), rng.normal(0, 1, (1, 50))
    d = S.paired_difference(a, b)
    ref = scipy_stats.ttest_rel(a[0], b[0])
    assert d.p == pytest.approx(ref.pvalue) and d.df == pytest.approx(49)


# --------------------------------------------------------------------------- Holm
def test_holm_hand_values():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 by the running max
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Bonferroni would give [0.12, 0.03, 0.09]; no running max [0.04, 0.03, 0.06]; Hochberg's step-up [0.04, 0.03, 0.04]
    assert S.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert S.holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert S.holm([0.2]) == [0.2] and S.holm([]) == []


def test_holm_is_monotone_in_the_raw_p_values():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 0.2, size=7)
        adj = np.array(S.holm(p))
        order = np.argsort(p)
        assert np.all(np.diff(adj[order]) >= 0) and np.all(adj >= p)


# --------------------------------------------------------------------------- against simulation
def test_standard_error_matches_the_spread_of_the_estimate_over_repeated_experiments():
    """The variance formula against brute force: repeat the whole experiment (new seeds, new prompts,
    new noise, with a method-by-prompt interaction) and compare the spread of D with the mean SE."""
    rng = np.random.default_rng(7)
    sims, seeds, prompts = 3000, 4, 60
    a, b = S.simulate_comparisons(rng, sims, seeds, prompts, seed_sd=0.05, noise_sd=0.3)
    a = a + rng.normal(0, 0.2, (sims, 1, prompts))  # method a's own per-prompt strengths
    results = [S.paired_difference(x, y) for x, y in zip(a, b)]
    empirical = np.std([r.mean for r in results])
    # Var(D) = 2 x 0.05^2 / 4 + (0.2^2 + 2 x 0.3^2 / 4) / 60
    assert empirical == pytest.approx(math.sqrt(2 * 0.05 ** 2 / 4 + (0.2 ** 2 + 0.3 ** 2 / 2) / 60), rel=0.05)
    assert math.sqrt(np.mean([r.se ** 2 for r in results])) == pytest.approx(empirical, rel=0.05)
    coverage = np.mean([r.ci_low <= 0 <= r.ci_high for r in results])
    assert abs(coverage - 0.95) < 3.5 * math.sqrt(0.05 * 0.95 / sims)


@pytest.mark.parametrize("seed_sd", [0.01, 0.02, 0.03])
def test_calibration_false_positive_rate_is_alpha_under_seed_variance(seed_sd):
    """The README's figures: 200 prompts, a paired prompt-level SE of about 0.015 with 5 seeds a
    side, seed sd 0.01-0.03. The false-positive rate stays within Monte Carlo error of 0.05."""
    c = S.calibration(seeds=5, prompts=200, seed_sd=seed_sd, sims=2000, seed=11)
    assert abs(c["false_positive_rate"] - 0.05) < 3.5 * c["monte_carlo_se"], c
    assert c["power"] > 0.3, c  # and the same simulation finds an effect of 0.05 often (printed in the README)


def test_a_test_that_treats_the_seeds_as_fixed_fails_the_same_calibration():
    """What the calibration guards against: averaging the seeds first and testing over prompts
    alone (the previous sign-flip test, here its t-test twin) rejects a true null far too often."""
    rng = np.random.default_rng(11)
    a, b = S.simulate_comparisons(rng, 2000, 5, 200, seed_sd=0.02, noise_sd=0.335)

    def prompts_only(x, y):
        return scipy_stats.ttest_1samp(x.mean(axis=0) - y.mean(axis=0), 0.0).pvalue

    naive = S.rejection_rate(prompts_only, a, b)
    assert naive > 0.05 + 5 * math.sqrt(0.05 * 0.95 / 2000), naive  # about 0.13
    assert abs(S.rejection_rate(S.two_level_p, a, b) - 0.05) < 3.5 * math.sqrt(0.05 * 0.95 / 2000)
