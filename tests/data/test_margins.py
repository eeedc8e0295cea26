"""Margin diagnostics: Spearman with ties, shares beyond +-tau, weights, and the summary table."""

import math

import pytest
import torch

from madpo_ray.config import LossConfig
from madpo_ray.data.margins import average_ranks, margin_diagnostics, spearman
from madpo_ray.data.margins import margin_table, plot_margins, weighting_params
from madpo_ray.losses import DEFAULT_TAU, madpo_weights


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert average_ranks(torch.tensor([5.0, 5.0, 5.0])).tolist() == [2.0, 2.0, 2.0]


def test_spearman_against_hand_values():
    # No ties: rho = 1 - 6 sum(d^2) / (n (n^2 - 1)); ranks [1,3,4,2] vs [1,2,4,3]: d^2 = 2, rho = 0.8.
    assert spearman([-8, 0.5, 8, -1], [-5, 1, 9, 2]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # ranks, not values: monotone is 1
    # Ties: x ranks [1.5, 1.5, 3] centred [-.5, -.5, 1], y [-1, 0, 1]: rho = 1.5 / sqrt(1.5 * 2).
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))


def rows(margins, true=None):
    return [{"margin": m, **({"true_margin": t} if true else {})} for m, t in zip(margins, true or margins)]


def test_shares_beyond_tau_and_regimes():
    tau = 2.0
    d = margin_diagnostics(rows([-3.0, -1.0, 0.5, 2.5, 5.0], [-2.0, 1.0, 1.0, 3.0, 4.0]), c_max=4.0, lam=1.0, tau=tau)
    assert d["pairs"] == 5
    assert d["rm_accuracy_vs_labels"] == pytest.approx(3 / 5)
    assert d["share_abs_margin_above_tau"] == pytest.approx(3 / 5)  # -3, 2.5, 5
    assert d["share_margin_below_minus_tau"] == pytest.approx(1 / 5)
    assert d["share_margin_above_tau"] == pytest.approx(2 / 5)
    assert d["rm_accuracy_vs_true_margin"] == pytest.approx(4 / 5)  # -1 vs +1 disagrees
    assert d["true_share_abs_margin_above_tau"] == pytest.approx(2 / 5)  # 3, 4 (|-2| is not above 2)
    # Regimes: amplified |m| < tau (-1, 0.5), damped m > tau (2.5, 5), capped m <= -tau (-3).
    assert (d["share_amplified"], d["share_damped"], d["share_capped"]) == pytest.approx((0.4, 0.4, 0.2))
    w = madpo_weights(torch.tensor([-3.0, -1.0, 0.5, 2.5, 5.0]), 4.0, 1.0, tau)
    assert d["weight_min"] == pytest.approx(float(w.min())) and d["weight_max"] == pytest.approx(float(w.max()))
    assert d["weight_median"] == pytest.approx(float(w.median()))


def test_without_true_margins_and_empty():
    d = margin_diagnostics(rows([1.0, -1.0]))
    assert "spearman_rm_vs_true" not in d and d["share_abs_margin_above_tau"] == 0.0
    assert margin_diagnostics([]) == {"pairs": 0}


def test_weighting_params_follow_the_run_loss():
    assert weighting_params(LossConfig(name="madpo", tau=3.0))["tau"] == 3.0
    assert weighting_params(LossConfig(name="madpo_amplify", c_max=2.0))["c_max"] == 2.0
    assert weighting_params(LossConfig(name="dpo", beta=0.3)) == {"c_max": 4.0, "lam": 1.0, "tau": DEFAULT_TAU}


def test_table_and_plot(tmp_path):
    report = {"weighting": {"c_max": 4.0, "lam": 1.0, "tau": DEFAULT_TAU},
              "train": margin_diagnostics(rows([-8.0, 1.0, 9.0], [-1.0, 2.0, 3.0])), "test": margin_diagnostics(rows([1.0]))}
    splits, table = margin_table(report)
    assert splits == ["train", "test"]
    shares = dict((r[0], r[1:]) for r in table)
    assert shares["share |m| > tau"] == ["66.7%", "0.0%"]
    assert shares["Spearman(RM margin, true margin)"][1] == "-"
    path = plot_margins(rows([-8.0, 1.0, 9.0], [-1.0, 2.0, 3.0]), tmp_path / "m.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    from madpo_ray.plotting import pyplot

    assert pyplot().get_fignums() == []  # saved figures are closed, not left to pile up
