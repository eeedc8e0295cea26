"""`madpo compare`'s report, without training: Holm's correction and the sign-flip test against
hand-computed values, the paired difference from the SFT policy against an independent
computation, verdict lines, the method list (ablations, tuned settings) and the tiers report."""

import json
import os
from itertools import product

import numpy as np
import pytest

from madpo_ray.compare import compared_methods, compare_tiers, method_config, method_settings, tier_config
from madpo_ray.config import ConfigError, load_config
from madpo_ray.eval import judge as J
from madpo_ray.eval import report as R


# --------------------------------------------------------------------------- Holm and the test
def test_holm_hand_values():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 by the running max
    assert R.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Bonferroni would give [0.12, 0.03, 0.09]; no running max [0.04, 0.03, 0.06]; Hochberg's step-up [0.04, 0.03, 0.04]
    assert R.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert R.holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert R.holm([0.2]) == [0.2] and R.holm([]) == []


def test_holm_is_monotone_in_the_raw_p_values():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 0.2, size=7)
        adj = np.array(R.holm(p))
        order = np.argsort(p)
        assert np.all(np.diff(adj[order]) >= 0) and np.all(adj >= p)


def test_sign_flip_p_values_by_hand():
    # 8 sign patterns of [1, 2, 3]: |sum| >= 6 only for all + and all -  ->  2/8 (one-sided would be 1/8)
    assert R.sign_flip_pvalue([1.0, 2.0, 3.0]) == 0.25
    assert R.sign_flip_pvalue([1.0, -1.0]) == 1.0
    assert R.sign_flip_pvalue([0.0, 0.0, 0.0]) == 1.0
    assert R.sign_flip_pvalue([1.0, np.nan, 2.0, 3.0]) == 0.25  # a prompt nobody answered is dropped
    # Monte Carlo above 16 prompts: all 40 differences positive, so no flip reaches the observed sum:
    # p = (1 + 0) / (1 + 999), never 0
    assert R.sign_flip_pvalue(np.linspace(1, 2, 40), n_resamples=999) == pytest.approx(0.001)


# --------------------------------------------------------------------------- hand-made judged tables
def _row(method, seed, t, pid, gold, sample=0):
    return {"method": method, "seed": seed, "temperature": t, "prompt_id": pid, "sample": sample, "text": "x",
            "num_tokens": 1, "gold": gold}


# 3 prompts x 2 seeds at T=0.5; dpo's seed 0 has two samples of p1 (mean 2.0)
HAND = ([_row("sft", -1, 0.5, p, g) for p, g in (("p1", 1.0), ("p2", 1.5), ("p3", 0.0))]
        + [_row("dpo", 0, 0.5, "p1", 1.5, 0), _row("dpo", 0, 0.5, "p1", 2.5, 1), _row("dpo", 0, 0.5, "p2", 2.0),
           _row("dpo", 0, 0.5, "p3", 1.0)]
        + [_row("dpo", 1, 0.5, p, g) for p, g in (("p1", 1.0), ("p2", 3.0), ("p3", -1.0))])


def test_paired_difference_from_sft_against_an_independent_computation():
    """Per prompt: seed means 1.5, 2.5, 0.0 minus SFT 1.0, 1.5, 0.0 -> d = 0.5, 1.0, 0.0."""
    d = np.array([0.5, 1.0, 0.0])
    # The exact bootstrap distribution: all 27 equally likely resamples of 3 prompts. Its 2.5% and 97.5%
    # quantiles are its extremes (each has probability 1/27 > 2.5%).
    exact = sorted(np.mean(c) for c in product(d, repeat=3))
    low, high = exact[int(np.ceil(0.025 * 27)) - 1], exact[int(np.ceil(0.975 * 27)) - 1]
    out = R.paired_analysis(HAND, "gold", ["p1", "p2", "p3"], n_boot=4000)["vs_sft"]["dpo"][0]
    assert out["temperature"] == 0.5 and out["prompts"] == 3
    assert out["mean"] == pytest.approx(d.mean())
    # Pooling the 6 (seed, prompt) cells instead of averaging seeds first gives the same mean but [-1, 1.5]
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high)) == (0.0, 1.0)
    # Each seed's own mean difference: seed 0 (1.0, 0.5, 1.0), seed 1 (0.0, 1.5, -1.0)
    assert [(s["seed"], s["mean"]) for s in out["per_seed"]] == [(0, pytest.approx(2.5 / 3)),
                                                                 (1, pytest.approx(0.5 / 3))]


def _family(n_prompts):
    """sft, dpo, ipo, madpo at T=0 and 1, one seed, n prompts: madpo ahead of both on every prompt."""
    rows = []
    for t in (0.0, 1.0):
        for i in range(n_prompts):
            pid, base = f"p{i}", float(i % 3)
            rows += [_row("sft", -1, t, pid, base), _row("madpo", 0, t, pid, base + 1 + 0.01 * i),
                     _row("dpo", 0, t, pid, base + 0.5), _row("ipo", 0, t, pid, base + 0.3)]
    return rows, [f"p{i}" for i in range(n_prompts)]


def test_madpo_tests_are_holm_corrected_over_baselines_and_temperatures():
    # 6 prompts, all differences positive: raw p = 2/64 < 0.05, but Holm over a family of 4 gives 0.125
    rows, ids = _family(6)
    tests = R.paired_analysis(rows, "gold", ids, n_boot=200)["tests"]
    assert tests["family"] == 4 and tests["correction"] == "holm"
    assert [(r["baseline"], r["temperature"]) for r in tests["rows"]] == [("dpo", 0.0), ("dpo", 1.0), ("ipo", 0.0),
                                                                          ("ipo", 1.0)]
    for r in tests["rows"]:
        assert r["p"] == pytest.approx(2 / 64) and r["p_adj"] == pytest.approx(4 * 2 / 64)
        assert "not significant" in r["verdict"]
    dpo0 = tests["rows"][0]
    assert dpo0["verdict"] == "MADPO vs DPO at T=0: not significant (p_adj=0.12)"
    assert dpo0["mean"] == pytest.approx(0.5 + 0.01 * np.mean(range(6)))
    # 12 prompts: raw p = 2/4096, Holm 4 x that: significant
    rows, ids = _family(12)
    tests = R.paired_analysis(rows, "gold", ids, n_boot=200)["tests"]
    assert tests["rows"][3]["verdict"] == f"MADPO > IPO at T=1 (p_adj={4 * 2 / 4096:.2g})"


def test_verdict_text():
    assert R.verdict("madpo", "dpo", 0.5, 0.2, 0.01) == "MADPO > DPO at T=0.5 (p_adj=0.01)"
    assert R.verdict("madpo", "beta_dpo", 1.0, -0.3, 0.003) == "MADPO < beta-DPO at T=1 (p_adj=0.003)"
    assert R.verdict("madpo", "ipo", 0.25, 0.4, 0.2) == "MADPO vs IPO at T=0.25: not significant (p_adj=0.2)"
    assert R.verdict("madpo", "madpo_amplify", 0.0, 0.4, 0.05) == \
        "MADPO vs madpo_amplify at T=0: not significant (p_adj=0.05)"  # alpha is strict


def test_difference_panel_limits_ignore_a_collapsed_method():
    ranges = {"dpo": (-0.1, 0.2), "ipo": (-0.2, 0.1), "beta_dpo": (-3.0, -2.5), "madpo": (0.0, 0.3)}
    lo, hi, off = R.difference_ylim(ranges)
    assert off == ["beta_dpo"] and -0.3 < lo < -0.2 and 0.3 < hi < 0.4
    lo, hi, off = R.difference_ylim({k: v for k, v in ranges.items() if k != "beta_dpo"})
    assert off == [] and lo < -0.2 and hi > 0.3


# --------------------------------------------------------------------------- reports written to disk
def _png_size(path):
    head = path.read_bytes()[:24]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _results(tmp_path, tier, n_prompts):
    cfg = load_config("tiny", [f"data.tier={tier}", "eval.temperatures=[0,1]", "compare.seeds=[0]",
                               "policy.loss.beta=0.1", "policy.optim.lr=2.0e-4"])  # the run's own settings
    rows, ids = _family(n_prompts)
    judged = {"table": J.judge(rows, ids, baseline="sft", n_boot=200), "madpo_minus": {}, "column": "gold",
              "reference": {}}
    methods, origin = compared_methods(cfg.model_copy(update={"compare": cfg.compare.model_copy(
        update={"methods": [m for m in cfg.compare.methods if m.loss != "beta_dpo"]})}))
    return R.write_report(cfg, tmp_path / tier, judged, prompts=len(ids), seeds=[0],
                          paired=R.paired_analysis(rows, "gold", ids, n_boot=200),
                          method_settings=method_settings(cfg, methods, origin))


def test_compare_report_has_the_difference_panel_and_the_holm_table(tmp_path):
    results = _results(tmp_path, "high", 12)
    md = (tmp_path / "high" / "table.md").read_text()
    assert "Holm-adjusted p, family of 4 tests" in md
    assert "MADPO > DPO at T=0 (p_adj=" in md and "Difference from the sft policy" in md
    assert "| madpo | +1.055 [" in md  # madpo - sft = 1 + 0.01 * mean(0..11)
    assert "- **dpo** (loss `dpo`): beta=0.1 from policy.loss (run config); label_smoothing=0 from loss defaults; " \
           "lr=0.0002 from policy.optim (run config)" in md
    saved = json.loads((tmp_path / "high" / "results.json").read_text())
    assert saved["paired"]["tests"]["family"] == 4 and "diffs" not in saved["paired"]["vs_sft"]["madpo"][0]
    assert _png_size(tmp_path / "high" / "gold_vs_temperature.png")[0] == 14 * 120  # two panels
    assert R.verdicts(results)[0].startswith("MADPO > DPO at T=0")


def test_combined_tier_report(tmp_path):
    per_tier = {"high": {**_results(tmp_path, "high", 12), "run_dir": "runs/x-high"},
                "low": {**_results(tmp_path, "low", 6), "run_dir": "runs/x-low"}}
    combined = R.write_tier_report(tmp_path / "tiers", per_tier)
    md = (tmp_path / "tiers" / "table.md").read_text()
    assert combined["tiers"] == ["high", "low"]
    assert "family of N tests per tier: high: 4, low: 4" in md
    assert "| baseline | tier high | tier low |" in md
    assert "| DPO | ahead at 2/2 (T=0, 1) | ahead at 0/2 |" in md  # 12 prompts significant, 6 not after Holm
    assert "## madpo compare: mean gold reward" in md and "data-quality tier **low**" in md
    assert "`runs/x-low`" in md
    assert json.loads((tmp_path / "tiers" / "results.json").read_text())["per_tier"]["low"]["tier"] == "low"
    assert _png_size(tmp_path / "tiers" / "gold_vs_temperature_by_tier.png")[0] == 2 * 6 * 110


def test_tier_runs_are_separate_runs_with_their_own_tier():
    cfg = load_config("tiny", ["compare.tiers=[high, low]", "name=exp"])
    high = tier_config(cfg, "high")
    assert (high.name, high.data.tier, high.compare.tiers) == ("exp-high", "high", None)
    assert high.policy == cfg.policy and high.compare.seeds == cfg.compare.seeds
    with pytest.raises(ConfigError, match="tiers"):
        load_config("tiny", ["compare.tiers=[high, high]"])
    with pytest.raises(ConfigError, match="compare.tiers"):
        load_config("tiny", ["compare.tiers=[bogus]"])
    with pytest.raises(ConfigError, match="testbed"):
        compare_tiers(load_config("tiny", ["compare.tiers=[high]", "data.source=some/pairs.jsonl"]))


# --------------------------------------------------------------------------- the methods compared
def test_default_seeds_and_the_ablations_method_list():
    from madpo_ray.cli import compare_sets

    assert len(load_config("tiny").compare.seeds) >= 5
    assert compare_sets("high, low", True, True) == ['compare.tiers=["high", "low"]', "compare.ablations=true",
                                                     "compare.use_tuned=true"]
    cfg = load_config("tiny")
    assert [m.name for m in compared_methods(cfg)[0]] == ["dpo", "ipo", "beta_dpo", "madpo"]
    cfg = load_config("tiny", ["compare.ablations=true",
                               "compare.methods=[{loss: dpo}, {loss: madpo, overrides: {c_max: 3.0}}]"])
    methods, origin = compared_methods(cfg)
    assert [m.name for m in methods] == ["dpo", "madpo", "madpo_amplify", "madpo_regularize"]
    amplify = methods[2]
    assert amplify.overrides == {"c_max": 3.0}  # MADPO's settings: only the clipping of c differs
    assert method_config(cfg, amplify, 0).policy.loss.c_max == 3.0
    assert origin["madpo_amplify"] == {"c_max": "compare.methods overrides, as madpo"}


def _write_search(tune_dir, name, sets, columns, mtime):
    d = tune_dir / name
    d.mkdir(parents=True)
    cfg = load_config("tiny", sets)
    (d / "best_config.yaml").write_text(f"# best trial of search {name}: x = 0.7\n" + cfg.to_yaml())
    (d / "trials.csv").write_text(",".join(["trial_id", *columns, "heldout_preference_accuracy", "steps", "status"])
                                  + "\n")
    os.utime(d / "best_config.yaml", (mtime, mtime))


def test_tuned_settings_come_from_the_newest_finished_search_of_each_loss(tmp_path):
    run_dir = tmp_path / "runs" / "exp"
    tune = run_dir / "tune"
    _write_search(tune, "madpo_old", ["policy.loss.beta=0.05"], ["beta"], 1_000)
    _write_search(tune, "madpo_new", ["policy.loss.beta=0.3", "policy.loss.c_max=2.5", "policy.optim.lr=1e-4"],
                  ["beta", "c_max", "lr"], 2_000)
    # lr differs from the run's but was not searched: not taken
    _write_search(tune, "dpo_beta", ["policy.loss.name=dpo", "policy.loss.beta=0.2", "policy.optim.lr=5e-4"],
                  ["beta"], 3_000)
    (tune / "broken").mkdir()
    (tune / "broken" / "best_config.yaml").write_text("policy: {loss: {name: ipo, betta: 1}}\n")
    (tune / "unfinished").mkdir()  # no best_config.yaml yet
    cfg = load_config("tiny", ["compare.use_tuned=true", "name=exp", f"runs_dir={tmp_path / 'runs'}",
                               "policy.loss.beta=0.1", "policy.optim.lr=2.0e-4",  # the run's own settings
                               "compare.methods=[{loss: dpo}, {loss: ipo}, {loss: madpo, overrides: {lam: 2.0}}]"])
    methods, origin = compared_methods(cfg, [tune], run_dir)
    by = {m.name: m for m in methods}
    assert by["madpo"].overrides == {"lam": 2.0, "beta": 0.3, "c_max": 2.5, "optim.lr": 1e-4}
    assert by["dpo"].overrides == {"beta": 0.2} and by["ipo"].overrides == {}
    trained = method_config(cfg, by["madpo"], 0)
    assert (trained.policy.loss.beta, trained.policy.loss.c_max, trained.policy.optim.lr) == (0.3, 2.5, 1e-4)
    settings = {s["method"]: s for s in method_settings(cfg, methods, origin)}
    src = "tune/madpo_new/best_config.yaml"
    assert settings["madpo"]["sources"] == {"beta": src, "c_max": src, "lam": "compare.methods overrides",
                                            "tau": "loss defaults", "lr": src}
    assert settings["dpo"]["sources"]["beta"] == "tune/dpo_beta/best_config.yaml"
    assert settings["dpo"]["sources"]["lr"] == "policy.optim (run config)" and settings["dpo"]["settings"]["lr"] == 2e-4
    md = "\n".join(R.settings_section(list(settings.values())))
    assert f"beta=0.3, c_max=2.5, lr=0.0001 from {src}" in md
    assert ("- **ipo** (loss `ipo`): beta=0.1 from policy.loss (run config); "
            "lr=0.0002 from policy.optim (run config)") in md
    # without --tuned nothing is looked up
    plain = cfg.model_copy(update={"compare": cfg.compare.model_copy(update={"use_tuned": False})})
    assert {m.name: m.overrides for m in compared_methods(plain, [tune], run_dir)[0]}["madpo"] == {"lam": 2.0}
