"""`madpo study rm-noise`: its methods, the margin noise, and the noise table from hand-made rows."""

import numpy as np
import pytest

from madpo_ray.config import MethodConfig, load_config
from madpo_ray.compare import method_config
from madpo_ray.data.scored import perturb_margins
from madpo_ray.study import noise_label, noise_methods, noise_table, render_noise_table, study_config

from helpers import clone_until_policy


def test_methods_are_dpo_once_and_madpo_per_noise_level():
    ms = noise_methods([0, 1.5, 4], {"madpo": {"c_max": 3.0}})
    assert [m.name for m in ms] == ["dpo", "madpo_noise0", "madpo_noise1.5", "madpo_noise4"]
    assert ms[2].overrides == {"c_max": 3.0, "margin_noise": 1.5}
    for bad in ([], [1, 1], [-1]):
        with pytest.raises(ValueError):
            noise_methods(bad, {})


def test_noise_reaches_the_policy_config_and_keeps_madpo_overrides():
    cfg = load_config("tiny", ["compare.methods=[{loss: madpo, overrides: {c_max: 2.0}}]", "compare.ablations=true"])
    s = study_config(cfg, [0, 2])
    assert [m.name for m in s.compare.methods] == ["dpo", "madpo_noise0", "madpo_noise2"]
    assert not s.compare.ablations and s.compare.tiers is None
    trained = method_config(s, s.compare.methods[2], seed=3)
    assert trained.policy.margin_noise == 2.0 and trained.policy.loss.c_max == 2.0
    assert trained.policy.optim.seed == 3 and method_config(s, s.compare.methods[0], 0).policy.margin_noise == 0.0


def test_with_an_ensemble_the_uncertainty_aware_variant_joins_at_every_noise_level():
    cfg = load_config("tiny", ["reward.ensemble=3",
                               "compare.methods=[{loss: madpo, overrides: {c_max: 2.0}}, {loss: madpo_expected, "
                               "overrides: {tau: 3.0}}]"])
    s = study_config(cfg, [0, 2])
    assert [m.name for m in s.compare.methods] == ["dpo", "madpo_noise0", "madpo_noise2", "madpo_expected_noise0",
                                                   "madpo_expected_noise2"]
    trained = method_config(s, s.compare.methods[4], seed=0)
    assert trained.policy.loss.name == "madpo_expected" and trained.policy.loss.tau == 3.0
    assert trained.policy.margin_noise == 2.0
    assert method_config(s, s.compare.methods[2], seed=0).policy.loss.c_max == 2.0


def test_perturb_margins_widens_a_given_uncertainty_by_the_noise():
    out = perturb_margins([{"margin": 1.0, "margin_std": 0.3}, {"margin": 1.0}], 0.4, seed=0)
    assert out[0]["margin_std"] == pytest.approx(0.5) and "margin_std" not in out[1]
    assert out[0]["margin"] != 1.0


def test_perturb_margins_is_seeded_scaled_and_a_no_op_at_zero():
    def examples():
        return [{"margin": 1.0} for _ in range(4000)]

    assert perturb_margins(examples(), 0.0, seed=0) == examples()
    a = [e["margin"] for e in perturb_margins(examples(), 2.0, seed=1)]
    b = [e["margin"] for e in perturb_margins(examples(), 2.0, seed=1)]
    c = [e["margin"] for e in perturb_margins(examples(), 2.0, seed=2)]
    assert a == b and a != c  # the same seed (any loss) sees the same noisy margins
    assert np.mean(a) == pytest.approx(1.0, abs=0.1) and np.std(a) == pytest.approx(2.0, rel=0.05)


def rows_for(method, seed, temperature, values):
    return [{"method": method, "seed": seed, "temperature": temperature, "prompt_id": f"p{i}", "sample": 0, "gold": v}
            for i, v in enumerate(values)]


def test_noise_table_against_hand_values():
    ids = ["p0", "p1", "p2"]
    rows = (rows_for("dpo", 0, 0.0, [1.0, 2.0, 3.0]) + rows_for("dpo", 1, 0.0, [3.0, 2.0, 1.0])
            + rows_for(noise_label(0), 0, 0.0, [2.0, 3.0, 4.0]) + rows_for(noise_label(0), 1, 0.0, [2.0, 3.0, 4.0])
            + rows_for(noise_label(2), 0, 0.0, [2.0, 2.0, 2.0]) + rows_for(noise_label(2), 1, 0.0, [2.0, 2.0, 2.0]))
    table = noise_table(rows, "gold", ids, [0, 2], [0.0], n_boot=200)
    by_sd = {r["noise_sd"]: r for r in table}
    # DPO's seed-averaged per-prompt values are [2, 2, 2]; MADPO at sd 0 is [2, 3, 4]: difference [0, 1, 2].
    assert by_sd[0]["dpo"]["mean"] == pytest.approx(2.0) and by_sd[0]["madpo"]["mean"] == pytest.approx(3.0)
    assert by_sd[0]["madpo_minus_dpo"]["mean"] == pytest.approx(1.0)
    assert by_sd[2]["madpo_minus_dpo"]["mean"] == pytest.approx(0.0)
    assert by_sd[2]["madpo_minus_dpo"]["ci_low"] == pytest.approx(0.0) == by_sd[2]["madpo_minus_dpo"]["ci_high"]
    text = "\n".join(render_noise_table(table, "gold"))
    assert "| 0 | 0 | 3.000" in text and "one DPO training serves every noise level" in text


def test_noise_table_with_the_variant_against_hand_values():
    ids = ["p0", "p1"]
    rows = []
    for seed in (0, 1):
        rows += rows_for("dpo", seed, 0.0, [1.0, 1.0]) + rows_for(noise_label(1), seed, 0.0, [2.0, 2.0])
        rows += rows_for(noise_label(1, "madpo_expected"), seed, 0.0, [1.5, 2.5 + seed])
    [row] = noise_table(rows, "gold", ids, [1], [0.0], n_boot=200)
    # The variant's seed-averaged per-prompt values are [1.5, 3.0]: mean 2.25; minus DPO 1.25; minus MADPO 0.25.
    assert row["madpo_expected"]["mean"] == pytest.approx(2.25)
    assert row["madpo_expected_minus_dpo"]["mean"] == pytest.approx(1.25)
    assert row["madpo_expected_minus_madpo"]["mean"] == pytest.approx(0.25)
    text = "\n".join(render_noise_table([row], "gold"))
    assert "MADPO-expected - MADPO" in text and "| 1 | 0 | 2.000" in text


def test_method_config_rejects_unknown_policy_keys():
    m = MethodConfig(loss="madpo", overrides={"margin_noise": -1.0})
    with pytest.raises(Exception, match="margin_noise"):
        method_config(load_config("tiny"), m, 0)


def test_noise_plot(tmp_path):
    from madpo_ray.study import plot_noise

    est = {"mean": 1.0, "ci_low": 0.5, "ci_high": 1.5}
    table = [{"noise_sd": sd, "temperature": t, "madpo": est, "dpo": est, "madpo_minus_dpo": est}
             for sd in (0, 2) for t in (0.0, 1.0)]
    plot_noise(table, tmp_path / "noise.png", "gold")
    assert (tmp_path / "noise.png").read_bytes()[:4] == b"\x89PNG"
    plot_noise([{**r, "madpo_expected": est} for r in table], tmp_path / "variant.png", "gold")
    assert (tmp_path / "variant.png").read_bytes()[:4] == b"\x89PNG"


def test_the_study_keeps_the_first_madpo_methods_overrides():
    cfg = load_config("tiny", ["compare.methods=[{loss: madpo, overrides: {c_max: 2.0}}, "
                               "{loss: madpo, label: wide, overrides: {c_max: 8.0}}]"])
    s = study_config(cfg, [1])
    assert method_config(s, s.compare.methods[1], seed=0).policy.loss.c_max == 2.0


@pytest.mark.ray
@pytest.mark.slow
def test_rm_noise_study_trains_dpo_once_and_madpo_per_noise_level(full_run, ray_two_nodes, tmp_path):
    """`madpo study rm-noise` end to end (CI-sized): the noise reaches MADPO's margins (its weights
    change with it), DPO is trained once, and the report has a row per (noise, temperature)."""
    import json as _json

    from madpo_ray.study import run_rm_noise

    p, _ = full_run
    q = clone_until_policy(p, tmp_path, "noise", "compare.seeds=[0]", "eval.temperatures=[0]",
                            "eval.backend=transformers", "policy.optim.max_steps=2", "eval.bootstrap_samples=100")
    results = run_rm_noise(q.cfg, [0, 8])
    out = q.layout.study_dir("rm-noise")
    assert sorted(results["trainings"]) == ["dpo/seed0", "madpo_noise0/seed0", "madpo_noise8/seed0"]
    metrics = {m: _json.loads((out / m / "seed0" / "metrics.json").read_text()) for m in ("madpo_noise0", "madpo_noise8")}
    assert metrics["madpo_noise8"]["policy"]["margin_noise"] == 8.0
    # Noise of sd 8 spreads the margins far past tau: the weights' range must differ from sd 0's.
    assert metrics["madpo_noise8"]["weight_min"] != pytest.approx(metrics["madpo_noise0"]["weight_min"], abs=1e-3)
    assert [(r["noise_sd"], r["temperature"]) for r in results["noise"]] == [(0, 0.0), (8, 0.0)]
    assert "MADPO under reward-model noise" in (out / "table.md").read_text()
    assert (out / "noise.png").stat().st_size > 5000 and not (q.run_dir / "compare").exists()
