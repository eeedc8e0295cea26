"""`madpo compare`'s report, without training: Holm's correction and the sign-flip test against
hand-computed values, the paired difference from the SFT policy against an independent
computation, verdict lines, the method list (ablations, tuned settings) and the tiers report."""

import json
import os
from itertools import product

import numpy as np
import pytest

from madpo_ray.compare import compared_methods, compare_tiers, method_config, method_settings, protocol, tier_config
from madpo_ray.config import ConfigError, load_config
from madpo_ray.eval import judge as J
from madpo_ray.eval import report as R
from madpo_ray.eval import stats as S
from madpo_ray.rendering import verdicts


# --------------------------------------------------------------------------- hand-made judged tables
def _row(method, seed, t, pid, gold, sample=0):
    return {"method": method, "seed": seed, "temperature": t, "prompt_id": pid, "sample": sample, "text": "x",
            "num_tokens": 1, "gold": gold}


# 3 prompts x 2 seeds at T=0.5; dpo's seed 0 has two samples of p1 (mean 2.0)
HAND = ([_row("sft", -1, 0.5, p, g) for p, g in (("p1", 1.0), ("p2", 1.5), ("p3", 0.0))]
        + [_row("dpo", 0, 0.5, "p1", 1.5, 0), _row("dpo", 0, 0.5, "p1", 2.5, 1), _row("dpo", 0, 0.5, "p2", 2.0),
           _row("dpo", 0, 0.5, "p3", 1.0)]
        + [_row("dpo", 1, 0.5, p, g) for p, g in (("p1", 1.0), ("p2", 3.0), ("p3", -1.0))])


def test_paired_difference_from_sft_by_hand():
    """Per prompt: seed means 1.5, 2.5, 0.0 minus SFT 1.0, 1.5, 0.0 -> d = 0.5, 1.0, 0.0. The seeds'
    means are 5/3 and 1 (variance 2/9, over 2 seeds 1/9, 1 df); the seed-by-prompt noise explains
    all of the prompts' spread, so SE = 1/3 on 1 df (t(1) is Cauchy)."""
    out = R.paired_analysis(HAND, "gold", ["p1", "p2", "p3"])["vs_sft"]["dpo"][0]
    assert out["temperature"] == 0.5 and out["prompts"] == 3 and out["seeds"] == (2, 1)
    assert out["mean"] == pytest.approx(0.5) and out["se"] == pytest.approx(1 / 3)
    half = np.tan(np.pi * 0.475) / 3
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    # Each seed's own mean difference: seed 0 (1.0, 0.5, 1.0), seed 1 (0.0, 1.5, -1.0)
    assert [(s["seed"], s["mean"]) for s in out["per_seed"]] == [(0, pytest.approx(2.5 / 3)),
                                                                 (1, pytest.approx(0.5 / 3))]


BASELINES = ("dpo", "ipo", "madpo_amplify", "madpo_regularize")


def _family(n_prompts, seeds=(0, 1, 2), temps=(0.0, 1.0)):
    """sft, madpo, two baselines and MADPO's two ablations with seed-specific values: each seed of
    each method has its own offset and its own per-prompt wiggle, so no two seeds agree."""
    rows, rng = [], np.random.default_rng(5)
    shift = {"madpo": 1.0, "dpo": 0.5, "ipo": 0.3, "madpo_amplify": 0.9, "madpo_regularize": 0.2}
    for t in temps:
        for i in range(n_prompts):
            rows.append(_row("sft", -1, t, f"p{i}", float(i % 3)))
        for m, s in product(shift, seeds):
            offset = 0.02 * (s + 1) * (1 if m == "madpo" else -1)
            rows += [_row(m, s, t, f"p{i}", float(i % 3) + shift[m] + offset + rng.normal(0, 0.05))
                     for i in range(n_prompts)]
    return rows, [f"p{i}" for i in range(n_prompts)]


def _matrix(rows, method, t, ids):
    seeds = sorted({r["seed"] for r in rows if r["method"] == method})
    return np.array([[next(r["gold"] for r in rows if r["method"] == method and r["seed"] == s
                           and r["temperature"] == t and r["prompt_id"] == p) for p in ids] for s in seeds])


def test_one_holm_family_over_every_baseline_and_ablation_and_temperature():
    rows, ids = _family(8)
    tests = R.paired_analysis(rows, "gold", ids)["tests"]
    assert tests["family"] == 8 and tests["correction"] == "holm" and tests["min_seeds"] == 3
    assert [(r["baseline"], r["temperature"]) for r in tests["rows"]] == list(product(BASELINES, (0.0, 1.0)))
    # the raw p of each row is the one definition of the difference, computed here from the matrices
    raw = [S.paired_difference(_matrix(rows, "madpo", t, ids), _matrix(rows, b, t, ids)).p
           for b, t in product(BASELINES, (0.0, 1.0))]
    assert [r["p"] for r in tests["rows"]] == pytest.approx(raw)
    assert [r["p_adj"] for r in tests["rows"]] == pytest.approx(S.holm(raw))  # ablations in the family
    assert all(r["p_adj"] > r["p"] for r in tests["rows"])
    dpo0 = tests["rows"][0]
    assert dpo0["verdict"].startswith(("MADPO > DPO at T=0 (p_adj=", "MADPO vs DPO at T=0: not significant"))


def test_no_verdict_with_too_few_seeds():
    rows, ids = _family(8, seeds=(0, 1))
    tests = R.paired_analysis(rows, "gold", ids)["tests"]
    assert tests["family"] == 0
    for r in tests["rows"]:
        assert r["p_adj"] is None and r["verdict"] == "no verdict: 2 seed(s), a verdict needs 3 per method"
    assert not any(">" in line or "<" in line for line in verdicts({"paired": {"tests": tests}}))


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


def _results(tmp_path, tier, n_prompts, settings="reference"):
    cfg = load_config("tiny", [f"data.tier={tier}", "eval.temperatures=[0,1]", "compare.seeds=[0,1,2]",
                               "compare.ablations=true", f"compare.settings={settings}",
                               "compare.methods=[{loss: dpo}, {loss: ipo}, {loss: madpo}]"])
    rows, ids = _family(n_prompts)
    judged = {"table": J.judge(rows, ids, baseline="sft", n_boot=200), "column": "gold", "reference": {}}
    methods, origin = compared_methods(cfg)
    return R.write_report(cfg, tmp_path / tier, judged, prompts=len(ids), seeds=[0, 1, 2],
                          paired=R.paired_analysis(rows, "gold", ids), protocol=protocol(cfg),
                          method_settings=method_settings(cfg, methods, origin))


def test_compare_report_says_untuned_and_shows_one_definition_of_the_difference(tmp_path):
    results = _results(tmp_path, "high", 12)
    md = (tmp_path / "high" / "table.md").read_text()
    assert "**untuned: every method at the same reference settings**" in md
    assert "Holm-adjusted p, one family of 8 tests" in md and "A verdict needs 3 training seeds per method" in md
    assert "MADPO > DPO at T=0 (p_adj=" in md and "Difference from the sft policy" in md
    # the minus table shows the tests' own differences, cell for cell
    tests = results["paired"]["tests"]["rows"]
    dpo1 = next(r for r in tests if r["baseline"] == "dpo" and r["temperature"] == 1.0)
    minus = md[md.index("MADPO minus each baseline"):]
    minus_row = next(line for line in minus.splitlines() if line.startswith("| dpo | +"))
    assert minus_row.split(" | ")[2] == f"{dpo1['mean']:+.3f} [{dpo1['ci_low']:+.2f}, {dpo1['ci_high']:+.2f}] |"
    assert "- **dpo** (loss `dpo`): beta=0.1 from compare.reference_beta (untuned, shared by every method); " \
           "label_smoothing=0 from loss defaults; lr=1e-05 from compare.reference_lr" in md
    saved = json.loads((tmp_path / "high" / "results.json").read_text())
    assert saved["paired"]["tests"]["family"] == 8 and "diffs" not in saved["paired"]["vs_sft"]["madpo"][0]
    assert saved["protocol"]["mode"] == "reference"
    assert _png_size(tmp_path / "high" / "gold_vs_temperature.png")[0] == 14 * 120  # two panels
    assert verdicts(results)[0].startswith("MADPO > DPO at T=0")


def test_combined_tier_report_is_one_holm_family(tmp_path):
    per_tier = {"high": {**_results(tmp_path, "high", 12), "run_dir": "runs/x-high"},
                "low": {**_results(tmp_path, "low", 6), "run_dir": "runs/x-low"}}
    combined = R.write_grouped_report(tmp_path / "tiers", per_tier, "tier")
    md = (tmp_path / "tiers" / "table.md").read_text()
    assert combined["groups"] == ["high", "low"] and combined["family"] == 16
    assert "one family of 16 tests: every baseline and ablation x temperature x tier" in md
    rows = [r for t in ("high", "low") for r in combined["per_group"][t]["paired"]["tests"]["rows"]]
    assert [r["p_adj"] for r in rows] == pytest.approx(S.holm([r["p"] for r in rows]))
    # each tier's own report keeps its own family; the combined one does not change it
    assert per_tier["high"]["paired"]["tests"]["family"] == 8
    assert "| baseline | tier high | tier low |" in md and "| DPO | ahead at 2/2 (T=0 (+" in md
    assert "## madpo compare: mean gold reward" in md and "data-quality tier **low**" in md
    assert "`runs/x-low`" in md and md.count("one family of 16 tests") == 3  # the summary and both tiers
    assert json.loads((tmp_path / "tiers" / "results.json").read_text())["per_group"]["low"]["tier"] == "low"
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
                                                     "compare.settings=tuned"]
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


def test_a_plain_comparison_never_hands_one_methods_settings_to_another():
    """The preset's policy settings (beta 2, lr 5e-5) are MADPO's search's choice: a plain compare
    trains every method at the shared reference settings instead, and says so."""
    cfg = load_config("tiny", ["policy.loss.beta=2.0", "policy.loss.c_max=3.0", "policy.optim.lr=5e-5"])
    assert cfg.compare.settings == "reference"
    methods, origin = compared_methods(cfg)
    for m in methods:
        trained = method_config(cfg, m, 0).policy
        assert (trained.loss.name, trained.loss.beta, trained.optim.lr) == (m.loss, 0.1, 1e-5)
        assert trained.loss.c_max is None  # the run's c_max is not MADPO's either: the loss default
    assert method_config(cfg, methods[0], 0).policy.optim.epochs == cfg.policy.optim.epochs  # untuned keys kept
    ref = load_config("tiny", ["compare.reference_beta=0.5", "compare.reference_lr=2e-4",
                               "compare.methods=[{loss: dpo}, {loss: madpo, overrides: {optim.lr: 1e-4}}]"])
    dpo, madpo = (method_config(ref, m, 0).policy for m in compared_methods(ref)[0])
    assert (dpo.loss.beta, dpo.optim.lr, madpo.loss.beta, madpo.optim.lr) == (0.5, 2e-4, 0.5, 1e-4)
    assert protocol(cfg)["title"].startswith("untuned")


def _write_search(tune_dir, name, sets, mtime):
    d = tune_dir / name
    d.mkdir(parents=True)
    cfg = load_config("tiny", sets)
    (d / "best_config.yaml").write_text(f"# best trial of search {name}: x = 0.7\n" + cfg.to_yaml())
    os.utime(d / "best_config.yaml", (mtime, mtime))


def test_tuned_settings_come_from_each_methods_own_newest_finished_search(tmp_path):
    run_dir = tmp_path / "runs" / "exp"
    tune = run_dir / "tune"
    _write_search(tune, "madpo_old", ["policy.loss.beta=0.05"], 1_000)
    _write_search(tune, "madpo_new", ["policy.loss.beta=0.3", "policy.loss.c_max=2.5", "policy.optim.lr=1e-4"], 2_000)
    _write_search(tune, "dpo_gold", ["policy.loss.name=dpo", "policy.loss.beta=0.2", "policy.optim.lr=5e-4"], 3_000)
    (tune / "broken").mkdir()
    (tune / "broken" / "best_config.yaml").write_text("policy: {loss: {name: ipo, betta: 1}}\n")
    (tune / "unfinished").mkdir()  # no best_config.yaml yet
    cfg = load_config("tiny", ["compare.settings=tuned", "name=exp", f"runs_dir={tmp_path / 'runs'}",
                               "policy.loss.beta=2.0", "policy.optim.lr=5e-5",  # MADPO's, in the run config
                               "compare.methods=[{loss: dpo}, {loss: madpo, overrides: {lam: 2.0}}]"])
    methods, origin = compared_methods(cfg, [tune], run_dir)
    by = {m.name: m for m in methods}
    assert by["madpo"].overrides == {"lam": 2.0, "beta": 0.3, "c_max": 2.5, "optim.lr": 1e-4}
    assert by["dpo"].overrides == {"beta": 0.2, "optim.lr": 5e-4}  # DPO's own search, lr included
    trained = method_config(cfg, by["madpo"], 0)
    assert (trained.policy.loss.beta, trained.policy.loss.c_max, trained.policy.optim.lr) == (0.3, 2.5, 1e-4)
    settings = {s["method"]: s for s in method_settings(cfg, methods, origin)}
    src = "tune/madpo_new/best_config.yaml"
    assert settings["madpo"]["sources"] == {"beta": src, "c_max": src, "lam": "compare.methods overrides",
                                            "tau": "loss defaults", "lr": src}
    assert settings["dpo"]["sources"]["lr"] == "tune/dpo_gold/best_config.yaml"
    assert settings["dpo"]["settings"]["lr"] == 5e-4
    md = "\n".join(R.settings_section(list(settings.values())))
    assert f"beta=0.3, c_max=2.5, lr=0.0001 from {src}" in md
    # a method without a search of its own is an error naming the search, never the run's settings
    with_ipo = load_config("tiny", ["compare.settings=tuned", "compare.methods=[{loss: dpo}, {loss: ipo}]"])
    with pytest.raises(ConfigError, match="no finished search for ipo .* madpo tune --config ipo_gold"):
        compared_methods(with_ipo, [tune], run_dir)
    # without --tuned nothing is looked up
    plain = cfg.model_copy(update={"compare": cfg.compare.model_copy(update={"settings": "reference"})})
    assert {m.name: m.overrides for m in compared_methods(plain, [tune], run_dir)[0]}["madpo"] == {"lam": 2.0}


def test_held_out_prompts_of_a_users_dataset_follow_the_split(tmp_path):
    """Development reads validation, the final step test, for any dataset (not only the testbed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from madpo_ray.eval.heldout import eval_prompts
    from madpo_ray.layout import RunLayout

    cfg = load_config("tiny", [f"runs_dir={tmp_path}", "data.source=pairs.jsonl"])
    lay = RunLayout.of(cfg)
    for split in ("validation", "test"):
        d = lay.scored_path(split)
        d.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([{"row_id": 0, "prompt": f"{split} prompt", "chosen": "c", "rejected": "r"}]),
                       d / "part-0.parquet")
    assert eval_prompts(cfg, lay)[1] == ["validation prompt"]
    assert eval_prompts(cfg, lay, "test")[1] == ["test prompt"]
    with pytest.raises(ValueError, match="held-out prompts"):
        eval_prompts(cfg, lay, "train")


def test_final_readings_count_other_commands_only_and_say_which_command(tmp_path, monkeypatch):
    from madpo_ray.eval import heldout
    from madpo_ray.layout import RunLayout

    lay = RunLayout(tmp_path / "run")
    lay.run_dir.mkdir(parents=True)
    first = heldout.record_final_reading(lay, tmp_path / "a", "madpo compare --final", ["p0"], ["x"])
    same = heldout.record_final_reading(lay, tmp_path / "b", "madpo compare --final", ["p0"], ["x"])
    assert first["earlier_readings"] == same["earlier_readings"] == 0  # one command's grid points: one reading
    monkeypatch.setattr(heldout, "INVOCATION", "another-command")
    later = heldout.record_final_reading(lay, tmp_path / "c", "madpo study rm-noise --final", ["p0"], ["x"])
    assert later["earlier_readings"] == 2 and later["command"] == "madpo study rm-noise --final"
    assert R.split_lines({"split": "test"}) == ["**test split** (no record of a final reading).", ""]
