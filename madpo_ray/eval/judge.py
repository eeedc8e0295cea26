"""Judging generations: gold reward (testbed), reward-model score, win rates, bootstrap CIs.

Everything here is plain numpy over the rows `eval/generate.py` writes, so it is testable
without models. The unit of resampling is the prompt (and the seed, when several training
seeds of one method are pooled): samples of one prompt are not independent, prompts are.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from madpo_ray.data.testbed import document_gold


@dataclass
class Estimate:
    mean: float
    low: float
    high: float

    def fmt(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high}


def bootstrap_mean(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of a [seeds, prompts] matrix with a percentile bootstrap CI.

    Two-level resampling: seeds with replacement, then prompts with replacement (the same
    prompts for every drawn seed, since all seeds answer the same prompts). A 1-D array is one seed.
    NaN cells (a prompt a seed did not answer) are ignored.
    """
    v = np.atleast_2d(np.asarray(values, dtype=float))
    if v.size == 0 or np.all(np.isnan(v)):
        raise ValueError("bootstrap_mean: no values")
    rng = np.random.default_rng(seed)
    n_seeds, n_prompts = v.shape
    seed_idx = rng.integers(0, n_seeds, size=(n_boot, n_seeds)) if n_seeds > 1 else np.zeros((n_boot, 1), int)
    prompt_idx = rng.integers(0, n_prompts, size=(n_boot, n_prompts))
    # means[b] = nanmean over v[seed_idx[b]][:, prompt_idx[b]]
    picked = v[seed_idx[:, :, None], prompt_idx[:, None, :]]
    with warnings.catch_warnings():  # a resample that drew only NaN cells is NaN; nanquantile skips it
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(picked.reshape(n_boot, -1), axis=1)
    alpha = (1 - level) / 2
    return Estimate(float(np.nanmean(v)), float(np.nanquantile(means, alpha)), float(np.nanquantile(means, 1 - alpha)))


def win_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 where a beats b, 0.5 on a tie, 0 where it loses (elementwise)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return (a > b) + 0.5 * (a == b)


# --------------------------------------------------------------------------- scoring rows
def add_gold(rows: list[dict], docs_by_id: dict[str, dict]) -> None:
    """Testbed gold reward of each generation, in place (`gold` column)."""
    for r in rows:
        r["gold"] = document_gold(r["text"], docs_by_id[r["prompt_id"]])


def add_reward_model(rows: list[dict], prompts_by_id: dict[str, str], score: Callable[[list[str], list[str]], list[float]]) -> None:
    """The frozen reward model's score of each generation, in place (`rm` column)."""
    scores = score([prompts_by_id[r["prompt_id"]] for r in rows], [r["text"] for r in rows])
    for r, s in zip(rows, scores):
        r["rm"] = float(s)


# --------------------------------------------------------------------------- tables
def per_prompt(rows: list[dict], column: str, prompt_ids: Sequence[str]) -> np.ndarray:
    """Mean of `column` over each prompt's samples, in `prompt_ids` order (NaN if none)."""
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        acc[r["prompt_id"]].append(r[column])
    return np.array([np.mean(acc[p]) if acc.get(p) else np.nan for p in prompt_ids])


def paired_win(rows: list[dict], other: list[dict], column: str, prompt_ids: Sequence[str],
               offset: int = 0) -> np.ndarray:
    """Per-prompt win rate of `rows` against `other`: sample j meets the other's sample
    (offset + j) mod (the other's draws of that prompt), so seed k of a method (offset k x its
    draws) meets its own share of a baseline that drew once per seed, and a baseline with a single
    draw (greedy) is met by every sample."""
    theirs: dict[str, dict[int, float]] = defaultdict(dict)
    for r in other:
        theirs[r["prompt_id"]][r["sample"]] = r[column]
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        draws = theirs.get(r["prompt_id"])
        if not draws:
            continue
        j = (offset + r["sample"]) % len(draws)
        if j in draws:
            acc[r["prompt_id"]].append(float(win_values(r[column], draws[j])))
    return np.array([np.mean(acc[p]) if acc.get(p) else np.nan for p in prompt_ids])


def draws_per_prompt(rows: list[dict]) -> int:
    """How many samples a model drew per prompt (the most of any prompt)."""
    return 1 + max((r["sample"] for r in rows), default=0)


def reference_win(rows: list[dict], reference: dict[str, float], column: str, prompt_ids: Sequence[str]) -> np.ndarray:
    """Per-prompt win rate of the samples against the reference summary's score."""
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        acc[r["prompt_id"]].append(float(win_values(r[column], reference[r["prompt_id"]])))
    return np.array([np.mean(acc[p]) if acc.get(p) else np.nan for p in prompt_ids])


def judge(rows: list[dict], prompt_ids: Sequence[str], *, baseline: Optional[str] = "sft",
          reference: Optional[dict[str, dict[str, float]]] = None, n_boot: int = 2000,
          seed: int = 0) -> list[dict]:
    """One summary row per (method, temperature).

    rows: scored generations with `method` and `seed` (training seed) columns besides the
    generation columns; `gold` and/or `rm` are judged where present.
    reference: {"gold": {prompt_id: score}, "rm": {...}} scores of the reference summaries.
    baseline: the method every other is compared with sample by sample (the SFT policy).
    """
    columns = [c for c in ("gold", "rm") if rows and c in rows[0]]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["temperature"], r["seed"])].append(r)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    temps = sorted({r["temperature"] for r in rows})
    out = []
    for m in methods:
        seeds = sorted({s for (mm, _, s) in groups if mm == m})
        for t in temps:
            entry: dict = {"method": m, "temperature": t, "seeds": len(seeds),
                           "samples": sum(len(groups[(m, t, s)]) for s in seeds)}
            for col in columns:
                entry[col] = bootstrap_mean(np.stack([per_prompt(groups[(m, t, s)], col, prompt_ids) for s in seeds]),
                                            n_boot, seed).to_dict()
                if reference and col in reference:
                    entry[f"win_vs_reference_{col}"] = bootstrap_mean(np.stack(
                        [reference_win(groups[(m, t, s)], reference[col], col, prompt_ids) for s in seeds]),
                        n_boot, seed).to_dict()
                base_seeds = sorted({s for (mm, _, s) in groups if mm == baseline})
                if baseline and m != baseline and base_seeds:  # the baseline is one model: its first seed
                    base = groups[(baseline, t, base_seeds[0])]
                    wins = [paired_win(groups[(m, t, s)], base, col, prompt_ids,
                                       offset=k * draws_per_prompt(groups[(m, t, s)])) for k, s in enumerate(seeds)]
                    entry[f"win_vs_{baseline}_{col}"] = bootstrap_mean(np.stack(wins), n_boot, seed).to_dict()
            out.append(entry)
    return out

