"""Judging: bootstrap CIs, win rates and the per-temperature table, against hand-computed values."""

import math

import numpy as np
import pytest

from madpo_ray.eval import judge as J


def test_win_values_hand():
    assert J.win_values([3, 1, 2], [1, 3, 2]).tolist() == [1.0, 0.0, 0.5]


def test_bootstrap_mean_is_the_plain_mean_and_brackets_it():
    rng = np.random.default_rng(0)
    v = rng.normal(1.0, 1.0, size=400)
    e = J.bootstrap_mean(v, n_boot=2000, seed=1)
    assert e.mean == pytest.approx(v.mean(), abs=1e-12)
    assert e.low < e.mean < e.high
    # Normal theory: half-width ~ 1.96 * sd / sqrt(n)
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v))
    assert (e.high - e.low) / 2 == pytest.approx(half, rel=0.15)


def test_constant_values_give_a_zero_width_interval():
    e = J.bootstrap_mean(np.full((3, 10), 2.5))
    assert (e.mean, e.low, e.high) == (2.5, 2.5, 2.5)


def test_seed_spread_widens_the_interval():
    """Same prompts, but seeds that disagree by a constant: only the two-level bootstrap sees it."""
    rng = np.random.default_rng(0)
    prompts = rng.normal(0, 0.1, size=50)
    agree = np.stack([prompts] * 3)
    disagree = np.stack([prompts - 1, prompts, prompts + 1])
    assert J.bootstrap_mean(agree).mean == pytest.approx(J.bootstrap_mean(disagree).mean)
    w_agree = J.bootstrap_mean(agree).high - J.bootstrap_mean(agree).low
    w_dis = J.bootstrap_mean(disagree).high - J.bootstrap_mean(disagree).low
    assert w_dis > 10 * w_agree


def test_nan_cells_are_ignored_and_all_nan_is_an_error():
    v = np.array([[1.0, np.nan, 3.0]])
    assert J.bootstrap_mean(v).mean == 2.0
    with pytest.raises(ValueError, match="no values"):
        J.bootstrap_mean(np.array([np.nan, np.nan]))


def _row(method, seed, t, pid, sample, gold, rm=None):
    r = {"method": method, "seed": seed, "temperature": t, "prompt_id": pid, "sample": sample, "text": "x",
         "num_tokens": 1, "gold": gold}
    if rm is not None:
        r["rm"] = rm
    return r


def test_per_prompt_and_paired_win_hand():
    rows = [_row("a", 0, 1.0, "p1", 0, 1.0), _row("a", 0, 1.0, "p1", 1, 3.0), _row("a", 0, 1.0, "p2", 0, 0.0)]
    other = [_row("b", 0, 1.0, "p1", 0, 2.0), _row("b", 0, 1.0, "p1", 1, 2.0), _row("b", 0, 1.0, "p2", 0, 0.0)]
    assert J.per_prompt(rows, "gold", ["p1", "p2", "p3"])[:2].tolist() == [2.0, 0.0]
    assert math.isnan(J.per_prompt(rows, "gold", ["p3"])[0])
    # p1: sample 0 loses (1<2), sample 1 wins (3>2) -> 0.5; p2: tie -> 0.5
    assert J.paired_win(rows, other, "gold", ["p1", "p2"]).tolist() == [0.5, 0.5]
    assert J.reference_win(rows, {"p1": 2.0, "p2": -1.0}, "gold", ["p1", "p2"]).tolist() == [0.5, 1.0]


def test_paired_win_offset_picks_the_baselines_draws_and_wraps():
    base = [_row("sft", -1, 1.0, "p1", j, g) for j, g in enumerate((0.0, 1.0, 2.0, 3.0))]
    mine = [_row("a", 0, 1.0, "p1", j, 1.5) for j in range(2)]
    assert J.paired_win(mine, base, "gold", ["p1"], offset=0).tolist() == [1.0]  # meets 0.0, 1.0
    assert J.paired_win(mine, base, "gold", ["p1"], offset=2).tolist() == [0.0]  # meets 2.0, 3.0
    assert J.paired_win(mine, base, "gold", ["p1"], offset=3).tolist() == [0.5]  # meets 3.0, then 0.0
    greedy = [_row("sft", -1, 0.0, "p1", 0, 1.0)]
    assert J.paired_win(mine, greedy, "gold", ["p1"], offset=7).tolist() == [1.0]  # one draw: every sample meets it


def test_win_rate_gives_each_seed_its_own_share_of_the_baselines_draws():
    """The SFT policy drew 2 samples per seed (4): seed 0 meets draws 0-1 (gold 0, beaten), seed 1
    draws 2-3 (gold 10, not beaten), so the win rate is 0.5, not seed 0's draws twice (1.0)."""
    rows = [_row("sft", -1, 1.0, "p1", j, g) for j, g in enumerate((0.0, 0.0, 10.0, 10.0))]
    rows += [_row("madpo", s, 1.0, "p1", j, 5.0) for s in (0, 1) for j in (0, 1)]
    rows += [_row("sft", -1, 0.0, "p1", 0, 0.0)] + [_row("madpo", s, 0.0, "p1", 0, 5.0) for s in (0, 1)]
    by = {(r["method"], r["temperature"]): r for r in J.judge(rows, ["p1"], n_boot=50)}
    assert by[("madpo", 1.0)]["win_vs_sft_gold"]["mean"] == pytest.approx(0.5)
    assert by[("madpo", 0.0)]["win_vs_sft_gold"]["mean"] == 1.0  # both seeds meet the one greedy draw


def test_judge_table_hand_values():
    rows = []
    for pid, sft_gold in (("p1", 1.0), ("p2", 2.0)):
        for t in (0.0, 1.0):
            rows.append(_row("sft", -1, t, pid, 0, sft_gold, rm=0.0))
            for seed, delta in ((0, 0.5), (1, 1.5)):
                rows.append(_row("madpo", seed, t, pid, 0, sft_gold + delta, rm=1.0))
    table = J.judge(rows, ["p1", "p2"], reference={"gold": {"p1": 3.0, "p2": 3.0}}, n_boot=200)
    by = {(r["method"], r["temperature"]): r for r in table}
    assert set(by) == {("sft", 0.0), ("sft", 1.0), ("madpo", 0.0), ("madpo", 1.0)}
    assert by[("sft", 0.0)]["gold"]["mean"] == pytest.approx(1.5)
    assert by[("madpo", 1.0)]["gold"]["mean"] == pytest.approx(1.5 + 1.0)  # mean of +0.5 and +1.5
    assert by[("madpo", 1.0)]["seeds"] == 2 and by[("madpo", 1.0)]["samples"] == 4
    assert by[("madpo", 0.0)]["win_vs_sft_gold"]["mean"] == 1.0  # every sample beats SFT's
    # vs reference 3.0: madpo golds are 1.5, 2.5 (p1) and 2.5, 3.5 (p2) -> wins 0, 0, 0, 1 -> 0.25
    assert by[("madpo", 0.0)]["win_vs_reference_gold"]["mean"] == pytest.approx(0.25)
    assert by[("madpo", 0.0)]["rm"]["mean"] == 1.0
    assert "win_vs_sft_gold" not in by[("sft", 0.0)]
