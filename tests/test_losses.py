"""Loss formulas against hand-computed values and independent re-derivations (no Ray)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from madpo_ray import losses as L

TAU = math.log(999)


def _inputs(pc, pr, rc, rr, **kw):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return L.PolicyLossInputs(t(pc), t(pr), t(rc), t(rr), **{k: t(v) for k, v in kw.items()})


# ----------------------------------------------------------------------------- hand-computed
def test_bradley_terry_hand_value():
    out = L.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)  # 0.313262
    assert out[1].item() == pytest.approx(math.log(1 + math.exp(1)), abs=1e-6)


def test_dpo_hand_value_and_label_smoothing():
    # h = (-10 - -11) - (-12 - -11) = 2; beta h = 0.2
    x = _inputs([-10.0], [-12.0], [-11.0], [-11.0])
    assert x.implicit_margin().item() == pytest.approx(2.0)
    out = L.get_policy_loss("dpo")(x, beta=0.1)
    assert out.losses.item() == pytest.approx(0.5981388693815918, abs=1e-9)
    smoothed = L.get_policy_loss("dpo")(x, beta=0.1, label_smoothing=0.1)
    assert smoothed.losses.item() == pytest.approx(0.6181388693815918, abs=1e-9)


def test_ipo_is_length_normalised():
    # chosen log-ratio 1 over 4 tokens, rejected -1 over 2 tokens: h_ipo = 0.25 + 0.5 = 0.75
    x = _inputs([-10.0], [-12.0], [-11.0], [-11.0], chosen_lengths=[4.0], rejected_lengths=[2.0])
    out = L.get_policy_loss("ipo")(x, beta=0.1)
    assert out.losses.item() == pytest.approx((0.75 - 5.0) ** 2)  # 18.0625
    # asymmetric: chosen log-ratio 3 over 2 tokens (1.5), rejected -1 over 4 (-0.25): h_ipo = 1.75.
    # Swapping the two lengths would give 3/4 + 1/2 = 1.25, dividing by the summed length 0.5.
    x = _inputs([-8.0], [-12.0], [-11.0], [-11.0], chosen_lengths=[2.0], rejected_lengths=[4.0])
    assert L.get_policy_loss("ipo")(x, beta=0.1).losses.item() == pytest.approx((1.75 - 5.0) ** 2)  # 10.5625
    with pytest.raises(ValueError, match="lengths"):
        L.get_policy_loss("ipo")(_inputs([-1.0], [-2.0], [-1.0], [-1.0]), beta=0.1)


# Literal table computed by hand (python math, not this module), tau = ln 999, lam = 1.
WEIGHTS_TABLE = {
    2.0: {-8: (0.7153, 1.0), -4: (1.8522, 0.0337), -2: (1.9781, 0.1575), -1: (1.9919, 0.4464),
          0: (1.9970, 1.0), 1: (1.9919, 1.2037), 2: (1.9781, 1.1140), 4: (1.8522, 1.0177), 8: (0.7153, 0.9971)},
    4.0: {-8: (0.5399, 1.0), -4: (3.3273, 0.0001), -2: (3.8922, 0.0035), -1: (3.9596, 0.0696),
          0: (3.9850, 1.0), 1: (3.9596, 1.3423), 2: (3.8922, 1.1349), 4: (3.3273, 1.0183), 8: (0.5399, 0.9872)},
}


@pytest.mark.parametrize("c_max", [2.0, 4.0])
def test_madpo_weights_table(c_max):
    margins = sorted(WEIGHTS_TABLE[c_max])
    m = torch.tensor(margins, dtype=torch.float64)
    c = L.madpo_scale(m.abs(), c_max=c_max, tau=TAU)
    w = L.madpo_weights(m, c_max=c_max, tau=TAU)
    for i, mi in enumerate(margins):
        want_c, want_w = WEIGHTS_TABLE[c_max][mi]
        assert c[i].item() == pytest.approx(want_c, abs=1e-4), mi
        assert w[i].item() == pytest.approx(want_w, abs=1e-4), mi


def test_weights_table_rows_match_functions():
    rows = L.weights_table(margins=(0.0, 2.0), c_maxes=(4.0,))
    assert [round(r["weight"], 4) for r in rows] == [1.0, 1.1349]


def test_madpo_loss_is_weight_times_dpo():
    x = _inputs([-10.0, -5.0], [-12.0, -4.0], [-11.0, -5.0], [-11.0, -5.0], margins=[2.0, -1.0])
    out = L.get_policy_loss("madpo")(x, beta=0.1, c_max=4.0, tau=TAU)
    dpo = L.get_policy_loss("dpo")(x, beta=0.1).losses
    assert torch.allclose(out.losses, torch.tensor([1.1349, 0.0696], dtype=torch.float64) * dpo, atol=1e-4)
    reduced = L.get_policy_loss("madpo").reduce(out, L.DataParallel())
    assert reduced.item() == pytest.approx(out.losses.mean().item())  # plain mean


def test_ablations_clamp_the_scale():
    m = torch.tensor([-1.0, 1.0, 10.0], dtype=torch.float64)
    amp = L.madpo_weights(m, c_max=4.0, tau=TAU, mode="amplify")
    reg = L.madpo_weights(m, c_max=4.0, tau=TAU, mode="regularize")
    both = L.madpo_weights(m, c_max=4.0, tau=TAU)
    # |m| < tau: c > 1, so amplify == both and regularize has c' = 1 -> w = 1
    assert torch.allclose(amp[:2], both[:2]) and torch.allclose(reg[:2], torch.ones(2, dtype=torch.float64))
    # |m| > tau: c < 1, so regularize == both and amplify has c' = 1 -> w = 1
    assert reg[2].item() == pytest.approx(both[2].item()) and amp[2].item() == pytest.approx(1.0)
    assert {"madpo_amplify", "madpo_regularize"} <= set(L.POLICY_LOSSES)


# ----------------------------------------------------------------------------- spec properties
def test_scale_is_one_at_tau_and_continuity_at_minus_tau():
    for c_max in (2.0, 3.0, 4.0):
        for lam in (0.5, 1.0, 2.0):
            assert L.madpo_scale(torch.tensor(TAU, dtype=torch.float64), c_max, lam, TAU).item() == pytest.approx(1.0)
            eps = 1e-6
            left = L.madpo_weights(torch.tensor([-TAU - eps], dtype=torch.float64), c_max, lam, TAU)
            right = L.madpo_weights(torch.tensor([-TAU + eps], dtype=torch.float64), c_max, lam, TAU)
            assert left.item() == 1.0 and right.item() == pytest.approx(1.0, abs=1e-4)


def test_scale_limits():
    c0 = L.madpo_scale(torch.tensor(0.0, dtype=torch.float64), 4.0, 1.0, TAU).item()
    assert 3.9 < c0 < 4.0  # close to c_max
    big = L.madpo_scale(torch.tensor(1e4, dtype=torch.float64), 4.0, 1.0, TAU).item()
    assert big == pytest.approx(0.25)  # -> c_min, no overflow NaN


@settings(max_examples=300, deadline=None)
@given(m=st.floats(-60, 60), c_max=st.floats(1.01, 10), lam=st.floats(0.1, 5), tau=st.floats(0.5, 15))
def test_weights_bounded_and_finite(m, c_max, lam, tau):
    w = L.madpo_weights(torch.tensor([m], dtype=torch.float64), c_max, lam, tau).item()
    assert math.isfinite(w) and 0 < w < 2


@settings(max_examples=50, deadline=None)
@given(c_max=st.floats(1.01, 10), lam=st.floats(0.1, 5), tau=st.floats(0.5, 15))
def test_weight_at_zero_is_one(c_max, lam, tau):
    assert L.madpo_weights(torch.zeros(1, dtype=torch.float64), c_max, lam, tau).item() == pytest.approx(1.0)


def test_weights_are_detached():
    m = torch.tensor([0.5, 3.0], requires_grad=True)
    w = L.madpo_weights(m)
    assert not w.requires_grad
    pc = torch.tensor([-3.0, -4.0], requires_grad=True)
    x = L.PolicyLossInputs(pc, torch.tensor([-5.0, -5.0]), torch.tensor([-4.0, -4.0]), torch.tensor([-4.0, -4.0]),
                           margins=m)
    madpo = L.get_policy_loss("madpo")
    madpo.reduce(madpo(x), L.DataParallel()).backward()
    assert m.grad is None and pc.grad is not None


@pytest.mark.parametrize("m", [-5.0, -2.0, -0.5, 0.3, 1.0, 3.0, 6.0])
def test_expected_loss_optimum_is_scaled_margin(m):
    """Minimise E_label[w * DPO] numerically: the optimum is beta h* = c(|m|) m (|m| < tau)."""
    beta, c_max = 0.1, 4.0
    mt = torch.tensor([m, -m], dtype=torch.float64)
    w_pos, w_neg = L.madpo_weights(mt, c_max, 1.0, TAU).tolist()
    p = 1 / (1 + math.exp(-m))  # P(labelled order is right) under Bradley-Terry with margin m
    h = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([h], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        e = p * w_pos * -torch.nn.functional.logsigmoid(beta * h) + (1 - p) * w_neg * -torch.nn.functional.logsigmoid(-beta * h)
        e.backward()
        return e

    opt.step(closure)
    c = L.madpo_scale(torch.tensor(abs(m), dtype=torch.float64), c_max, 1.0, TAU).item()
    assert beta * h.item() == pytest.approx(c * m, rel=1e-4, abs=1e-6)


def test_gradient_at_most_twice_dpo():
    h = torch.linspace(-20, 20, 41, dtype=torch.float64)
    for m in (-3.0, 0.0, 2.0, 9.0):
        x = lambda hh: L.PolicyLossInputs(hh, torch.zeros_like(hh), torch.zeros_like(hh), torch.zeros_like(hh),  # noqa: E731
                                          margins=torch.full_like(hh, m))
        h1 = h.clone().requires_grad_(True)
        L.get_policy_loss("madpo")(x(h1)).losses.sum().backward()
        h2 = h.clone().requires_grad_(True)
        L.get_policy_loss("dpo")(x(h2)).losses.sum().backward()
        assert (h1.grad.abs() <= 2 * h2.grad.abs() + 1e-12).all()


def test_shape_mismatch_never_broadcasts():
    b = torch.zeros(4)
    with pytest.raises(ValueError, match="margins has shape"):
        L.PolicyLossInputs(b, b, b, b, margins=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="1-D"):
        col = torch.zeros(4, 1)
        L.PolicyLossInputs(col, col, col, col)
    out = L.get_policy_loss("madpo")(L.PolicyLossInputs(b, b, b, b, margins=torch.ones(4)))
    assert out.losses.shape == (4,)


def test_registry_errors_and_bad_c_max():
    with pytest.raises(KeyError, match="registered"):
        L.get_policy_loss("nope")
    with pytest.raises(ValueError, match="c_max"):
        L.madpo_weights(torch.zeros(1), c_max=1.0)
    with pytest.raises(ValueError, match="margins"):
        b = torch.zeros(2)
        L.get_policy_loss("madpo")(L.PolicyLossInputs(b, b, b, b))


# ----------------------------------------------------------------------------- beta-DPO
def test_beta_dpo_hand_value_without_filtering():
    a = [1.0, 2.0, 3.0, 6.0]  # implicit margins (ref log-probs zero)
    x = _inputs(a, [0.0] * 4, [0.0] * 4, [0.0] * 4)
    state = L.BetaDPOState()
    out = L.get_policy_loss("beta_dpo")(x, state=state, beta=0.1, alpha=0.6, rho=0.0,
                                        generator=torch.Generator().manual_seed(0))
    mean, std = 3.0, torch.tensor(a).std().item()  # unbiased std, as torch (and the official code)
    assert state.mu == pytest.approx(0.1 * mean) and state.sigma == pytest.approx(0.1 * std)
    beta_b = 0.1 * (1 + 0.6 * (mean - 0.1 * mean))  # all pairs kept: mean_kept = mean
    assert out.metrics["beta_batch"] == pytest.approx(beta_b)
    assert out.keep.tolist() == [1.0] * 4
    want = [math.log(1 + math.exp(-beta_b * ai)) for ai in a]
    assert out.losses.tolist() == pytest.approx(want)


def test_beta_dpo_filters_and_clamps():
    x = _inputs([0.0] * 10, [50.0] * 10, [0.0] * 10, [0.0] * 10)  # h = -50: beta would go negative
    state = L.BetaDPOState()
    out = L.get_policy_loss("beta_dpo")(x, state=state, beta=0.1, alpha=0.6, rho=0.2,
                                        generator=torch.Generator().manual_seed(0))
    assert out.keep.sum().item() == 8  # int(10 * 0.8)
    assert out.metrics["beta_batch"] == pytest.approx(1e-3)  # clamped
    sd = state.state_dict()
    restored = L.BetaDPOState()
    restored.load_state_dict(sd)
    assert restored == state


def test_beta_dpo_sharded_equals_global():
    """Two workers with a gather and the same seed reproduce the single-process global batch."""
    torch.manual_seed(0)
    h = torch.randn(8, dtype=torch.float64) * 3
    zeros = torch.zeros(8, dtype=torch.float64)
    full_state = L.BetaDPOState(mu=0.5, sigma=1.0)
    full = L.get_policy_loss("beta_dpo")(L.PolicyLossInputs(h, zeros, zeros, zeros), state=full_state,
                                         rho=0.5, generator=torch.Generator().manual_seed(7))
    keeps, betas = [], []
    for rank in (0, 1):
        sl = slice(4 * rank, 4 * rank + 4)
        st_ = L.BetaDPOState(mu=0.5, sigma=1.0)
        z = zeros[sl]
        out = L.get_policy_loss("beta_dpo")(L.PolicyLossInputs(h[sl], z, z, z), state=st_, rho=0.5,
                                            generator=torch.Generator().manual_seed(7),
                                            dp=L.DataParallel(rank, 2, lambda local: h.detach().float()))
        keeps.append(out.keep)
        betas.append(out.metrics["beta_batch"])
        assert st_ == full_state
    assert torch.cat(keeps).tolist() == full.keep.tolist()
    assert betas[0] == betas[1] == pytest.approx(full.metrics["beta_batch"])


def test_beta_dpo_requires_state():
    b = torch.zeros(2)
    with pytest.raises(ValueError, match="BetaDPOState"):
        L.get_policy_loss("beta_dpo")(L.PolicyLossInputs(b, b, b, b))


# ----------------------------------------------------------------------------- the loss contract
@pytest.mark.parametrize("loss,bad", [("madpo", "label_smoothing"), ("dpo", "c_max"), ("ipo", "tau"),
                                      ("madpo", "betta"), ("beta_dpo", "c_max")])
def test_a_parameter_the_loss_does_not_take_is_an_error_naming_it(loss, bad):
    b = torch.zeros(2)
    x = L.PolicyLossInputs(b, b, b, b, margins=b)
    with pytest.raises(L.LossParameterError, match=rf"{loss}.*\['{bad}'\]"):
        L.get_policy_loss(loss)(x, **{bad: 0.1})


def test_declared_parameters_are_the_signature_defaults():
    assert dict(L.get_policy_loss("dpo").params) == {"beta": 0.1, "label_smoothing": 0.0}
    assert dict(L.get_policy_loss("ipo").params) == {"beta": 0.1}
    assert dict(L.get_policy_loss("madpo").params) == {"beta": 0.1, "c_max": 4.0, "lam": 1.0, "tau": math.log(999)}
    assert dict(L.get_policy_loss("beta_dpo").params) == {"beta": 0.1, "alpha": 0.6, "rho": 0.2, "momentum": 0.9}
    assert L.get_policy_loss("beta_dpo").runtime == {"state", "generator", "dp", "share"}
    assert L.get_policy_loss("beta_dpo").plan_step is L.beta_dpo_plan
    assert [n for n, loss in L.POLICY_LOSSES.items() if loss.needs_margins] == [
        "madpo", "madpo_amplify", "madpo_regularize", "madpo_expected"]
    assert [n for n, loss in L.POLICY_LOSSES.items() if loss.needs_margin_stds] == ["madpo_expected"]


def test_loss_config_offers_exactly_the_registered_parameters():
    from madpo_ray.config import LossConfig

    assert set(LossConfig.model_fields) - {"name"} == L.all_loss_params()


def test_loss_config_refuses_a_parameter_of_another_loss_and_switches_cleanly():
    from madpo_ray.config import ConfigError, LossConfig, load_config

    with pytest.raises(ConfigError, match=r"policy.loss.*'madpo' takes no parameter\(s\) \['label_smoothing'\]"):
        load_config("tiny", ["policy.loss.label_smoothing=0.1"])
    cfg = LossConfig(name="madpo", beta=0.3, c_max=3.0)
    assert cfg.kwargs() == {"beta": 0.3, "c_max": 3.0}  # unset parameters are left to the loss
    dpo = cfg.switched_to("dpo", label_smoothing=0.1)
    assert dpo.kwargs() == {"beta": 0.3, "label_smoothing": 0.1}


def test_beta_dpo_reduction_divides_by_the_global_kept_count():
    """Worker 0 keeps 2 of its 4 pairs, worker 1 (seen through the gather) keeps 4: the kept mean
    over both is sum_0 * world / 6, so DDP's gradient average gives sum(kept losses) / 6."""
    out = L.LossOutput(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    other_keep = torch.ones(4)
    dp = L.DataParallel(0, 2, lambda local: torch.cat([local, other_keep]))
    reduced = L.get_policy_loss("beta_dpo").reduce(out, dp)
    assert reduced.item() == pytest.approx((1.0 + 3.0) * 2 / 6)
    assert L.get_policy_loss("beta_dpo").reduce(out, L.DataParallel()).item() == pytest.approx(4.0 / 2)


# ----------------------------------------------------------------------------- MADPO under margin uncertainty
def test_expected_weight_is_madpo_where_the_margin_is_certain():
    from madpo_ray.losses import expected_madpo_weights, madpo_weights

    m = torch.tensor([-9.0, -6.9, -4.0, -1.0, 0.0, 2.0, 7.0, 12.0])
    assert torch.allclose(expected_madpo_weights(m, torch.zeros(8)).float(), madpo_weights(m), atol=1e-5)


@pytest.mark.parametrize("margin,std", [(-6.0, 1.5), (-4.0, 2.0), (1.0, 0.5), (8.0, 3.0)])
def test_expected_weight_matches_monte_carlo_over_the_margins_uncertainty(margin, std):
    """An independent estimate: 400k draws of the true margin, MADPO's weight averaged."""
    from madpo_ray.losses import expected_madpo_weights, madpo_weights

    g = torch.Generator().manual_seed(0)
    draws = margin + std * torch.randn(400_000, generator=g, dtype=torch.float64)
    mc = madpo_weights(draws).double().mean().item()
    got = expected_madpo_weights(torch.tensor([margin]), torch.tensor([std])).item()
    assert got == pytest.approx(mc, abs=4e-3)


def test_uncertainty_turns_the_weights_cliff_near_minus_tau_into_a_ramp():
    """Half a unit of margin around -tau moves MADPO's weight from 0.17 to 1 (and it is about 0 at
    m = -4): a small reward-model error decides between "nearly dropped" and "full weight". With
    the margin uncertain by 1 the same half unit moves it by under 0.2, rising steadily."""
    from madpo_ray.losses import expected_madpo_weights, madpo_weights

    pair = torch.tensor([-6.5, -7.0])
    plain = madpo_weights(pair)
    assert float(plain[1] - plain[0]) > 0.8
    smooth = expected_madpo_weights(pair, torch.ones(2))
    assert 0 < float(smooth[1] - smooth[0]) < 0.2
    ramp = expected_madpo_weights(torch.tensor([-4.0, -5.0, -6.0, -7.0, -8.0]), torch.ones(5))
    assert all(float(a) < float(b) for a, b in zip(ramp, ramp[1:]))


def test_madpo_expected_loss_is_the_averaged_weight_times_dpo_and_needs_the_std():
    from madpo_ray.losses import dpo_per_example, expected_madpo_weights

    x = L.PolicyLossInputs(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5]), torch.tensor([-3.5, -5.0]),
                         torch.tensor([-4.0, -4.0]), margins=torch.tensor([-6.0, 3.0]),
                         margin_stds=torch.tensor([1.0, 0.0]))
    out = L.get_policy_loss("madpo_expected")(x, beta=0.5)
    w = expected_madpo_weights(x.margins, x.margin_stds).float()
    assert torch.allclose(out.losses, w * dpo_per_example(x.implicit_margin(), 0.5), atol=1e-6)
    certain = L.PolicyLossInputs(*[getattr(x, f) for f in ("policy_chosen_logps", "policy_rejected_logps",
                                                         "ref_chosen_logps", "ref_rejected_logps")],
                               margins=x.margins, margin_stds=torch.zeros(2))
    assert torch.allclose(L.get_policy_loss("madpo_expected")(certain, beta=0.5).losses,
                          L.get_policy_loss("madpo")(certain, beta=0.5).losses, atol=1e-5)
    with pytest.raises(ValueError, match="margin_std"):
        L.get_policy_loss("madpo_expected")(L.PolicyLossInputs(*[getattr(x, f) for f in (
            "policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")],
            margins=x.margins), beta=0.5)
