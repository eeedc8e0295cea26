"""The reward ensemble (reward.ensemble: K heads on one backbone, each on its own bootstrap
resample): its training step, the margin mean and spread scoring stores, the calibration the run
summary reports, and a run end to end into madpo_expected."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from madpo_ray.data.margins import uncertainty_calibration
from madpo_ray.models import load_reward_model, reward_scores
from madpo_ray.pair_forward import PairCollator
from madpo_ray.stages.reward import EnsembleStep, bootstrap_weights
from madpo_ray.stages.score import reward_columns
from tests.helpers import TINY_SETS


def test_bootstrap_weights_are_poisson_counts_fixed_by_the_seed():
    w = bootstrap_weights(4000, 4, seed=3)
    assert w.shape == (4000, 4) and torch.equal(w, bootstrap_weights(4000, 4, seed=3))
    assert not torch.equal(w, bootstrap_weights(4000, 4, seed=4))
    assert torch.equal(w, w.round()) and float(w.min()) == 0.0  # counts, some pairs left out of a resample
    assert abs(float(w.mean()) - 1.0) < 0.03 and abs(float(w.var()) - 1.0) < 0.08  # Poisson(1)
    assert not torch.equal(w[:, 0], w[:, 1])  # each head its own resample


def pair_batch(tokenizer, n: int):
    examples = [{"prompt_ids": tokenizer.encode(f"package {i} does"), "chosen_ids": tokenizer.encode(" a useful thing"),
                 "rejected_ids": tokenizer.encode(f" nothing {i} at all"), "index": 10 + 2 * i} for i in range(n)]
    return PairCollator(tokenizer.pad_token_id)(examples)


def test_ensemble_step_is_the_heads_mean_of_their_resampled_bradley_terry_losses(tiny_base_dir, tiny_tokenizer):
    """Against an independent computation: each sequence scored on its own, each head's loss
    weighted by that pair's count in the head's resample (looked up by the batch's example index,
    which here is not the position in the batch)."""
    torch.manual_seed(0)
    model = load_reward_model(str(tiny_base_dir), pad_token_id=tiny_tokenizer.pad_token_id, heads=3).eval()
    batch = pair_batch(tiny_tokenizer, 4)
    weights = bootstrap_weights(20, 3, seed=1)
    loss, metrics = EnsembleStep(weights)(model, batch)
    n = 4
    ids, mask = batch["input_ids"], batch["attention_mask"]
    scores = torch.stack([reward_scores(model, ids[i:i + 1], mask[i:i + 1])[0] for i in range(2 * n)])  # [2n, 3]
    chosen, rejected = scores[:n], scores[n:]
    w = weights[torch.tensor([10, 12, 14, 16])]
    expected = sum(float(w[i, k]) * float(-F.logsigmoid(chosen[i, k] - rejected[i, k]))
                   for i in range(n) for k in range(3)) / (n * 3)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    margins = chosen - rejected
    assert metrics["head_disagreement"] == pytest.approx(float(margins.std(-1).mean()), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((margins.mean(-1) > 0).float().mean()))


def test_a_saved_ensemble_loads_with_its_heads(tiny_base_dir, tiny_tokenizer, tmp_path):
    model = load_reward_model(str(tiny_base_dir), pad_token_id=tiny_tokenizer.pad_token_id, heads=4)
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    again = load_reward_model(str(tmp_path), pad_token_id=tiny_tokenizer.pad_token_id)
    assert again.config.num_labels == 4
    assert torch.equal(again.score.weight, model.score.weight)
    assert load_reward_model(str(tiny_base_dir)).config.num_labels == 1  # an LM folder: one new head


def test_scored_columns_are_the_heads_mean_margin_and_their_sample_std():
    cols = reward_columns(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5, 0.5]))
    assert cols["margin"] == pytest.approx(1.5) and cols["margin_std"] == pytest.approx(1.0)  # not sqrt(2/3)
    assert cols["reward_chosen"] == pytest.approx(2.0) and cols["reward_rejected"] == pytest.approx(0.5)
    assert reward_columns(torch.tensor(2.0), torch.tensor(0.5)) == {"reward_chosen": 2.0, "reward_rejected": 0.5,
                                                                    "margin": 1.5}


def test_calibration_bins_pairs_by_disagreement_against_the_scaled_true_margin():
    # margins are 2 x the true margin except where the ensemble disagrees most: there it is wrong.
    rows = [{"margin": 2.0 * t, "true_margin": t, "margin_std": 0.1} for t in (1.0, -1.0, 2.0, -2.0)]
    rows += [{"margin": -2.0 * t, "true_margin": t, "margin_std": 1.0} for t in (0.1, -0.1)]
    cal = uncertainty_calibration(rows, bins=2)
    t = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.1, -0.1], dtype=torch.float64)
    m = torch.tensor([2.0, -2.0, 4.0, -4.0, -0.2, 0.2], dtype=torch.float64)
    scale = float((m * t).sum() / (t * t).sum())
    assert cal["scale_true_to_rm"] == pytest.approx(scale)
    low, high = cal["bins"]
    assert (low["pairs"], high["pairs"]) == (3, 3)
    assert low["sign_error_rate"] == 0.0 and high["sign_error_rate"] == pytest.approx(2 / 3)
    errors = (m - scale * t).abs()
    assert low["abs_error_mean"] == pytest.approx(float(errors[:3].mean()))
    assert cal["spearman_std_vs_sign_error"] > 0.5
    assert uncertainty_calibration([{"margin": 1.0, "true_margin": 1.0}]) == {}  # no ensemble: nothing to say


LOCAL = [s for s in TINY_SETS if not s.startswith(("ray.", "score."))] + ["ray.backend=local"]


@pytest.mark.slow
def test_a_run_with_an_ensemble_scores_its_spread_trains_madpo_expected_and_reports_calibration(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "madpo_ray", "run", f"runs_dir={tmp_path}", "name=ens", *LOCAL,
                           "reward.ensemble=3", "policy.loss.name=madpo_expected", "policy.optim.max_steps=2"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run = tmp_path / "ens"
    assert len(json.loads((run / "reward" / "model" / "config.json").read_text())["id2label"]) == 3
    rows = pq.read_table(run / "score" / "scored" / "split=train").to_pylist()
    stds = [r["margin_std"] for r in rows]
    assert min(stds) >= 0 and max(stds) > 0  # the heads disagree somewhere
    reward = json.loads((run / "reward" / "train_metrics.json").read_text())
    assert "head_disagreement" in reward
    summary = json.loads((run / "summary.json").read_text())
    cal = summary["margins"]["calibration"]
    assert cal["pairs"] == summary["pairs"] and len(cal["bins"]) == 5
    assert (run / "calibration.png").stat().st_size > 0
    assert "does its disagreement find its errors" in (run / "summary.md").read_text()
    policy = json.loads((run / "policy" / "madpo_expected" / "train_metrics.json").read_text())
    assert policy["steps"] == 2 and "weight_mean" in policy


def test_reward_model_scores_of_an_ensemble_are_its_heads_mean(tiny_base_dir, tiny_tokenizer):
    from madpo_ray.stages.measures import reward_model_scores

    torch.manual_seed(0)
    model = load_reward_model(str(tiny_base_dir), pad_token_id=tiny_tokenizer.pad_token_id, heads=3).eval()
    prompts, texts = ["package a does", "package b does"], ["a thing", "nothing at all"]
    got = reward_model_scores(model, tiny_tokenizer, prompts, texts)
    assert all(isinstance(x, float) for x in got)
    with torch.no_grad():
        heads = model.score.weight.clone()
        model.score.weight.copy_(heads.mean(0, keepdim=True).expand_as(heads))  # every head the mean head
        same = reward_model_scores(model, tiny_tokenizer, prompts, texts)
    assert got == pytest.approx(same, rel=1e-5)  # linear heads: mean of rewards == reward of the mean head


def test_the_validator_of_an_ensemble_averages_its_heads_per_pair(tiny_base_dir, tiny_tokenizer):
    from madpo_ray.engine.sessions import WorkerInfo
    from madpo_ray.stages.reward import reward_validator

    torch.manual_seed(1)
    model = load_reward_model(str(tiny_base_dir), pad_token_id=tiny_tokenizer.pad_token_id, heads=3).eval()
    pairs = [{"prompt_ids": tiny_tokenizer.encode(f"package {i} does"), "chosen_ids": tiny_tokenizer.encode(" a useful thing"),
              "rejected_ids": tiny_tokenizer.encode(f" nothing {i} at all")} for i in range(5)]
    collate = PairCollator(tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        got = reward_validator(pairs, collate, 2, WorkerInfo())(model)
        b = collate(pairs)
        scores = torch.stack([reward_scores(model, b["input_ids"][i:i + 1], b["attention_mask"][i:i + 1])[0]
                              for i in range(10)])
    margins = scores[:5] - scores[5:]  # [5 pairs, 3 heads]
    assert got["eval_loss"] == pytest.approx(float(-F.logsigmoid(margins).mean()), rel=1e-5)
    assert got["eval_accuracy"] == pytest.approx(float((margins.mean(-1) > 0).float().mean()))


def test_train_reward_with_an_ensemble_saves_that_many_heads(tiny_base_dir, tiny_tokenizer, tmp_path):
    from madpo_ray.config import load_config
    from madpo_ray.engine.sessions import LocalSession
    from madpo_ray.stages.outputs import StageOutput
    from madpo_ray.stages.reward import train_reward

    cfg = load_config("tiny", ["reward.ensemble=2", "reward.optim.max_steps=1", "reward.optim.per_device_batch_size=4",
                               "reward.optim.effective_batch_size=4"])
    pairs = [{"prompt_ids": tiny_tokenizer.encode(f"package {i} does"), "chosen_ids": tiny_tokenizer.encode(" a thing"),
              "rejected_ids": tiny_tokenizer.encode(f" nothing {i}")} for i in range(8)]
    out = StageOutput(tmp_path / "model", tmp_path / "metrics.json")
    result = train_reward(cfg, LocalSession({"train": pairs}), model_dir=str(tiny_base_dir), out=out)
    assert result.steps == 1 and "head_disagreement" in json.loads(out.metrics_path.read_text())
    assert load_reward_model(str(out.model_dir)).config.num_labels == 2


def test_margin_diagnostics_and_calibration_skip_pairs_without_a_margin_std():
    from madpo_ray.data.margins import margin_diagnostics

    rows = [{"margin": 1.0, "margin_std": 0.5, "true_margin": 1.0}, {"margin": -1.0, "margin_std": None, "true_margin": 1.0},
            {"margin": 2.0, "margin_std": 1.5, "true_margin": 2.0}]
    d = margin_diagnostics(rows)
    assert d["margin_std_mean"] == pytest.approx(1.0) and d["pairs_with_margin_std"] == 2 and d["pairs"] == 3
    cal = uncertainty_calibration(rows, bins=2)
    assert cal["pairs"] == 2 and cal["spearman_std_vs_sign_error"] is None  # no sign error to rank: None, not NaN


def test_the_terminal_line_prints_a_zero_correlation_as_zero_and_a_missing_one_as_n_a():
    from madpo_ray.rendering import console, print_margin_line

    report = {"weighting": {"tau": 6.9}, "validation": {"rm_accuracy_vs_labels": 0.9}, "train": {},
              "calibration": {"spearman_std_vs_abs_error": 0.0, "spearman_std_vs_sign_error": None},
              "calibration_plot": "calibration.png"}
    with console.capture() as out:
        print_margin_line(report)
    assert "with its error 0.00, with a wrong sign n/a" in out.get()
