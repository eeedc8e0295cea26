"""Seed-aware paired statistics: the one definition of "method minus baseline" behind every
table, plot and verdict of `madpo compare`, `madpo eval` and `madpo study`.

A comparison's numbers have two independent sources of chance: the prompts that were judged
(a sample of the documents a user cares about) and the training seeds (each seed is one draw of
the method's model). A test that averages the seeds first and resamples only prompts treats the
seeds as fixed: its false-positive rate at a nominal 5% is about 13% when the seed standard
deviation is 0.02 gold (`calibration` reproduces this), and at T=0, where a prompt's value is
deterministic, it compares "these five models with those five".

The model here is the crossed random-effects design of a method's [seeds x prompts] matrix:

    y[i, p] = mu + seed effect a_i + prompt effect (shared by every method) + e[i, p]

Prompt effects cancel in the per-prompt difference d_p = mean_i A[i, p] - mean_j B[j, p]; the
estimate is D = mean_p d_p, and Var(D) has two parts:

    seeds:   s^2(seed means) x (1/n_A + 1/n_B), pooled over both sides (Student's pooled
             variance); a seed mean carries its seed effect and its noise averaged over P prompts
    prompts: (Var_p(d_p) - the noise the seed part already counts) / P, kept when positive: the
             method-by-prompt interaction, i.e. what generalising to other prompts adds

A one-model side (the SFT policy, or a `madpo eval` folder) is fixed: it has no seed part, and
its own per-prompt deviations belong to the prompts' part. The interval is D +- t(df) * SE and the
verdict is the two-sided t test, with Satterthwaite's degrees of freedom over the two parts: with
few seeds df is small and the t quantile widens the interval (the small-seed correction). The
tests check the formula against hand values and against the actual spread of D over repeated
simulated experiments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

# A verdict needs at least this many training seeds per compared method. With 2 the seed variance
# rests on 1 degree of freedom per method, and at the README's seed spread (sd ~0.02 gold) a true
# difference of 0.05 is found in fewer than 1 comparison in 5 (0.18); `calibration` gives the figures.
MIN_SEEDS_FOR_VERDICT = 3
TEST_NAME = ("two-sided t test of the mean paired difference with seeds and prompts as random effects "
             "(Satterthwaite df)")


@dataclass
class PairedDifference:
    """Method minus baseline, paired by prompt; `seed_sd` are the two sides' seed standard deviations
    (None for a one-model side)."""

    mean: float
    se: float
    df: float
    ci_low: float
    ci_high: float
    p: float
    prompts: int
    seeds: tuple[int, int]
    seed_sd: tuple[Optional[float], Optional[float]]

    def to_dict(self) -> dict:
        return asdict(self)


def complete_prompts(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both matrices restricted to the prompts every model of both sides answered."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two sides judge different prompt lists ({a.shape[1]} vs {b.shape[1]} prompts)")
    keep = ~(np.isnan(a).any(axis=0) | np.isnan(b).any(axis=0))
    return a[:, keep], b[:, keep]


def seed_spread(x: np.ndarray) -> tuple[float, float]:
    """One side's variance of its per-seed means and its seed-by-prompt noise variance (the
    residual mean square of the two-way layout); (0, 0) for a single model."""
    n, p = x.shape
    if n < 2:
        return 0.0, 0.0
    seed_means = x.mean(axis=1)
    resid = x - seed_means[:, None] - x.mean(axis=0)[None, :] + x.mean()
    return float(np.var(seed_means, ddof=1)), float((resid ** 2).sum() / ((n - 1) * max(p - 1, 1)))


def variance_terms(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> list[tuple[float, float]]:
    """(variance, degrees of freedom) terms of Var(D).

    Seeds: the variance of a side's seed means (which carries its seed effects and, averaged over
    the prompts, its noise) over its seed count, pooled over both sides when both have several
    seeds (Student's pooled t: exact for equal spreads, and robust with equal seed counts, where
    Welch's test keeps only 3.5% at a nominal 5% with 3 seeds a side). Prompts: the spread of the
    per-prompt differences less the noise the seed terms already count, over P. A single model is
    fixed: its own per-prompt deviations belong to the prompts' share."""
    multi = [(len(x), *seed_spread(x)) for x in (a, b) if len(x) > 1]
    terms, counted = [], sum(noise / n for n, _, noise in multi)
    if len(multi) == 2:
        (na, sa, _), (nb, sb, _) = multi
        pooled = ((na - 1) * sa + (nb - 1) * sb) / (na + nb - 2)
        terms.append((pooled * (1 / na + 1 / nb), na + nb - 2))
    elif multi:
        n, ms_seed, _ = multi[0]
        terms.append((ms_seed / n, n - 1))
    prompt_part = float(np.var(d, ddof=1)) - counted
    if prompt_part > 0:
        terms.append((prompt_part / len(d), len(d) - 1))
    return terms


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> PairedDifference:
    """Method `a` minus baseline `b`, each a [seeds, prompts] matrix of per-prompt means (one row for
    a single model). Prompts that some model did not answer are left out."""
    a, b = complete_prompts(a, b)
    n_prompts = a.shape[1]
    if n_prompts < 2:
        raise ValueError(f"a paired difference needs at least 2 prompts answered by every model, got {n_prompts}")
    d = a.mean(axis=0) - b.mean(axis=0)
    terms = variance_terms(a, b, d)
    var = sum(v for v, _ in terms)
    mean = float(d.mean())
    sds = (side_sd(a), side_sd(b))
    if var <= 0:  # every prompt's difference identical and no seed spread: no uncertainty to speak of
        return PairedDifference(mean, 0.0, float("inf"), mean, mean, 1.0 if mean == 0 else 0.0, n_prompts,
                                (len(a), len(b)), sds)
    df = var ** 2 / sum(v ** 2 / k for v, k in terms if v > 0)
    se = var ** 0.5
    half = float(scipy_stats.t.ppf(0.5 + level / 2, df)) * se
    p = float(2 * scipy_stats.t.sf(abs(mean) / se, df))
    return PairedDifference(mean, se, float(df), mean - half, mean + half, p, n_prompts, (len(a), len(b)), sds)


def side_sd(x: np.ndarray) -> Optional[float]:
    """The standard deviation of one side's per-seed means (None for one model)."""
    return float(np.std(x.mean(axis=1), ddof=1)) if len(x) > 1 else None


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    The i-th smallest p (i from 1) is multiplied by (m - i + 1), capped at 1, and made monotone
    with a running maximum so a larger raw p never gets a smaller adjusted one. It controls the
    family-wise error rate like Bonferroni (every p times m) but rejects more often."""
    p = [float(x) for x in pvalues]
    m = len(p)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: p[k])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# --------------------------------------------------------------------------- calibration
def simulate_comparisons(rng: np.random.Generator, sims: int, seeds: int, prompts: int, seed_sd: float,
                         noise_sd: float, effect: float = 0.0, prompt_sd: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """`sims` simulated comparisons of two methods: [sims, seeds, prompts] per-prompt values of A
    and B, sharing prompt effects (sd `prompt_sd`), each model with its own seed effect (sd
    `seed_sd`) and seed-by-prompt noise (sd `noise_sd`); A is `effect` higher on average."""
    prompt = rng.normal(0, prompt_sd, (sims, 1, prompts))

    def side(shift: float) -> np.ndarray:
        return (shift + prompt + rng.normal(0, seed_sd, (sims, seeds, 1))
                + rng.normal(0, noise_sd, (sims, seeds, prompts)))

    return side(effect), side(0.0)


def rejection_rate(test, a: np.ndarray, b: np.ndarray, alpha: float = 0.05) -> float:
    """The share of simulated comparisons whose p-value from `test(a_k, b_k)` is below alpha."""
    return float(np.mean([test(x, y) < alpha for x, y in zip(a, b)]))


def two_level_p(a: np.ndarray, b: np.ndarray) -> float:
    return paired_difference(a, b).p


def calibration(seeds: int = 5, prompts: int = 200, seed_sd: float = 0.02, noise_sd: float = 0.335,
                effect: float = 0.05, sims: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """False-positive rate (no true difference) and power (a true difference of `effect`) of the
    seed-aware test at a nominal alpha. The defaults follow the README's figures: a paired standard
    error of about 0.015 over 200 prompts with 5 seeds a side (noise sd 0.335) and seed sd 0.02."""
    rng = np.random.default_rng(seed)
    null = rejection_rate(two_level_p, *simulate_comparisons(rng, sims, seeds, prompts, seed_sd, noise_sd), alpha)
    power = rejection_rate(two_level_p, *simulate_comparisons(rng, sims, seeds, prompts, seed_sd, noise_sd, effect),
                           alpha)
    return {"seeds": seeds, "prompts": prompts, "seed_sd": seed_sd, "noise_sd": noise_sd, "alpha": alpha,
            "sims": sims, "false_positive_rate": null, "effect": effect, "power": power,
            "monte_carlo_se": (alpha * (1 - alpha) / sims) ** 0.5}
