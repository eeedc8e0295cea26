"""The pipeline on the session's Ray cluster of two nodes (two raylets on this machine, one CPU
each, so every two-worker training runs one worker per node, with runs_dir as the storage both
see): every stage (the shared full run, conftest.full_run), DDP and FSDP equivalence, resume after
a worker is killed, and the scored-parquet contract. CI-sized: a 1-layer width-32 model, 64 documents."""

import json
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch

from madpo_ray.pipeline import Pipeline

from helpers import clone_until_policy

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_two_nodes")]

CONTRACT = ["prompt", "chosen", "rejected", "ref_logp_chosen", "ref_logp_rejected", "len_chosen", "len_rejected",
            "reward_chosen", "reward_rejected", "margin", "gold_chosen", "gold_rejected"]


def test_every_stage_runs_and_writes_artifacts(full_run):
    p, results = full_run
    assert list(results) == ["data", "sft", "pairs", "reward", "score", "policy", "eval"]
    assert (p.run_dir / "config.yaml").exists() and (p.run_dir / "summary.json").exists()
    for stage in results:
        assert (p.layout.stage_dir(stage) / "metrics.json").exists() and (p.layout.stage_dir(stage) / "DONE").exists()
    for stage in ("sft", "reward"):
        assert any((p.layout.stage_dir(stage) / "model").glob("*.safetensors"))
    assert any((p.layout.stage_dir("policy") / "model").glob("*.safetensors"))
    sft_hist = json.loads((p.layout.stage_dir("sft") / "metrics.json").read_text())["loss_history"]
    assert sft_hist[-1] < sft_hist[0]  # SFT learns
    summary = json.loads((p.run_dir / "summary.json").read_text())
    for key in ("sft_preference_accuracy", "policy_preference_accuracy",
                "sft_greedy_gold_reward", "policy_greedy_gold_reward"):
        assert key in summary
    # one summary per test document sampled at the hottest eval temperature, beside the greedy figure
    from madpo_ray.generation import TransformersGenerator
    from madpo_ray.io import read_jsonl
    from madpo_ray.stages.measures import mean_gold_reward

    hottest = max(p.cfg.eval.temperatures)
    docs = read_jsonl(p.layout.docs_path("validation"))[:p.cfg.eval.num_prompts]  # development: validation
    generator = TransformersGenerator(batch_size=32, dtype=p.cfg.model.dtype)
    for label in ("sft", "policy"):
        generator.load(str(p.layout.model_dir(label)))
        want, _ = mean_gold_reward(generator, docs, p.cfg, hottest)
        assert summary[f"{label}_sampled_gold_reward_t{hottest:g}"] == pytest.approx(want)
    assert summary["generation_backend"] == "transformers"  # eval.backend=auto: one model, no engine start
    margins = summary["margins"]
    for split in ("train", "validation"):  # reward-model agreement and margin shares of each development split
        for key in ("rm_accuracy_vs_labels", "rm_accuracy_vs_true_margin", "spearman_rm_vs_true",
                    "share_abs_margin_above_tau", "share_margin_below_minus_tau", "weight_median"):
            assert key in margins[split], (split, key)
    assert "test" not in margins and summary["split"] == "validation"  # the sealed split is the final step's
    fixed = summary["stage_fixed_seconds"]  # wall time outside each training loop, less the workers' start
    assert set(fixed) == {"sft", "reward", "policy"}
    assert all(0 < fixed[s] < summary["stage_seconds"][s] for s in fixed)
    # One worker group for every training and the scoring: the same two worker processes took each
    # job, and only the first waited for the workers to start.
    placed = {s: p.layout.read_metrics(s) for s in fixed}
    assert len(placed["sft"]["worker_processes"]) == 2
    assert placed["sft"]["worker_processes"] == placed["reward"]["worker_processes"] == \
        placed["policy"]["worker_processes"]
    assert p.layout.read_metrics("score")["backend"] == "workers"
    assert summary["workers_start_seconds"] == pytest.approx(sum(m["workers_wait_seconds"] for m in placed.values()))
    assert 0 <= placed["reward"]["workers_wait_seconds"] < placed["sft"]["workers_wait_seconds"]
    assert placed["policy"]["workers_wait_seconds"] >= 0  # timed from before the post, which a worker may beat
    score_metrics = p.layout.read_metrics("score")
    assert "rm_accuracy_vs_labels" not in score_metrics["test"] and score_metrics["test"]["scored"] > 0
    assert p.layout.margins_plot.stat().st_size > 10_000  # two histograms, not an empty figure
    assert summary["curves_plot"] == str(p.layout.curves_plot) and p.layout.curves_plot.stat().st_size > 10_000
    # each split's pairs by design, as written, with nothing off design or repeated
    from madpo_ray.data.testbed import pair_composition

    pairs_metrics = p.layout.read_metrics("pairs")
    for split in ("train", "validation", "test"):
        comp = summary["pair_composition"][split]
        assert comp == pairs_metrics[split]["composition"]
        assert comp["pairs"] == pair_composition(read_jsonl(p.layout.pairs_path(split)))["pairs"] > 0
        assert comp["duplicates"] == 0 and comp["off_design"] == 0 and comp["stand_ins"] == 0
    assert "Testbed pairs by design" in (p.run_dir / "summary.md").read_text()


def test_scored_parquet_contract(full_run):
    p, _ = full_run
    for split in ("train", "validation", "test"):
        table = pq.read_table(str(p.layout.scored_path(split)))
        assert set(CONTRACT) <= set(table.column_names)
        rows = table.to_pylist()
        assert rows and all(r["len_chosen"] >= 1 and r["len_rejected"] >= 1 for r in rows)
        for r in rows:
            assert r["margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"], abs=1e-5)
            for c in CONTRACT[3:]:
                assert r[c] == r[c]  # not NaN



def test_ray_data_scores_as_the_workers_do(full_run, tmp_path):
    """The same models scored by a Ray Data actor pool (score.backend=ray_data, which stops the
    worker group first) and by the full run's worker group: the same rows, the same numbers."""
    p, _ = full_run
    q = clone_until_policy(p, tmp_path, "ray_data", "score.backend=ray_data")
    assert q.run(("score",), force=("score",))["score"]["backend"] == "ray_data"
    for split in ("train", "validation", "test"):
        by_data = {r["row_id"]: r for r in pq.read_table(str(q.layout.scored_path(split))).to_pylist()}
        by_workers = {r["row_id"]: r for r in pq.read_table(str(p.layout.scored_path(split))).to_pylist()}
        assert sorted(by_data) == sorted(by_workers) and by_data
        for row_id, r in by_workers.items():
            for c in ("ref_logp_chosen", "ref_logp_rejected", "len_chosen", "reward_chosen", "margin"):
                assert by_data[row_id][c] == pytest.approx(r[c], abs=1e-4), (split, row_id, c)


def test_rerun_skips_complete_stages(full_run, caplog):
    p, _ = full_run
    import logging

    caplog.set_level(logging.INFO, logger="madpo_ray.pipeline")
    Pipeline(p.cfg).run(("sft", "reward"))
    assert "sft: up to date, skipping" in caplog.text and "reward: up to date, skipping" in caplog.text


def test_ddp_two_workers_match_one_process_and_fsdp(full_run, tmp_path):
    """Same global batch (one process x 8 vs 2 workers x 4): the same loss trajectory within float
    tolerance, with DDP (the full run's policy) and with FSDP (sharded checkpoints every 2 steps,
    merged by Ray from both workers; the consolidated model folder loads with from_pretrained). The
    one process is the local runtime's (the engine without Ray), so the Ray workers are also
    checked against it."""
    from transformers import AutoModelForCausalLM

    from madpo_ray.engine.checkpoints import checkpoint_step, find_checkpoints, newest_checkpoint

    p, results = full_run
    assert (p.cfg.ray.num_workers, p.cfg.policy.optim.per_device_batch_size, p.cfg.ray.strategy) == (2, 4, "ddp")
    history = {"two": results["policy"]["loss_history"]}
    for name, sets in {"one": ("ray.backend=local", "policy.optim.per_device_batch_size=8"),
                       "fsdp": ("ray.strategy=fsdp",)}.items():
        q = clone_until_policy(p, tmp_path, name, "policy.optim.max_steps=6", *sets)
        history[name] = q.run(("policy",))["policy"]["loss_history"]
    newest = newest_checkpoint(find_checkpoints(str(q.layout.checkpoint_root("policy"))))  # Ray merged both workers
    assert sorted(f.name for f in newest.glob("shard_*.pt")) == ["shard_00000.pt", "shard_00001.pt"]
    assert checkpoint_step(newest) == 6
    assert len(history["one"]) == 6
    assert history["one"] == pytest.approx(history["two"], rel=1e-4, abs=1e-5)
    assert history["fsdp"] == pytest.approx(history["two"], rel=1e-4, abs=1e-5)
    assert history["one"][0] != pytest.approx(history["one"][-1], abs=1e-7)  # training actually moved
    ids = torch.randint(0, 500, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {name: AutoModelForCausalLM.from_pretrained(folder)(ids).logits
                  for name, folder in (("two", p.layout.model_dir("policy")), ("fsdp", q.layout.model_dir("policy")))}
    assert torch.allclose(logits["fsdp"], logits["two"], atol=1e-4)


@pytest.mark.parametrize("loss", ["beta_dpo", "ipo"])
def test_other_losses_train_from_the_same_scored_pairs(full_run, tmp_path, loss):
    """The Ray-scored pairs train every loss. In this process (ray.backend=local): the Ray Train path
    is the full run's and the DDP test's; a loss's state across workers is tests/test_beta_dpo.py's."""
    p, _ = full_run
    q = clone_until_policy(p, tmp_path, loss, f"policy.loss.name={loss}", "policy.optim.max_steps=3",
                           "ray.backend=local")
    m = q.run(("policy",))["policy"]
    assert m["steps"] == 3 and m["loss_name"] == loss
    assert q.layout.stage_dir("policy").name == loss
    if loss == "beta_dpo":
        assert "beta_batch" in m


def test_a_worker_lost_with_no_restart_left_fails_the_run_in_the_driver(full_run, tmp_path):
    """ray.max_failures=0 and rank 0 SIGKILLed: the driver, waiting on the worker group, raises
    Ray Train's error instead of waiting forever, and the stage is not marked done."""
    p, _ = full_run
    q = clone_until_policy(p, tmp_path, "lost", "policy.optim.max_steps=3", "ray.max_failures=0")
    q.faults = {"policy": {"fail_at_step": 1, "marker_dir": str(q.layout.faults_dir)}}
    from ray.train import WorkerGroupError

    with pytest.raises(WorkerGroupError, match="Training failed"):
        q.run(("policy",))
    assert (q.run_dir / ".faults" / "killed_at_1").exists() and not (q.layout.stage_dir("policy") / "DONE").exists()
    assert q.group is None  # the driver let go of the dead group


def test_killed_workers_resume_from_their_own_training_s_last_checkpoint_or_start_over(full_run, tmp_path):
    """The reward model and the policy on one worker group, rank 0 SIGKILLed once in each. The
    reward model, killed at step 3 with checkpoints every 2, resumes from its step-2 checkpoint. The
    policy, killed at step 1 before any checkpoint of its own, while Ray's latest checkpoint is the
    reward model's, must start over, not resume from that."""
    p, _ = full_run
    q = clone_until_policy(p, tmp_path, "killed", "reward.optim.max_steps=5", "reward.optim.checkpoint_every=2",
                           "policy.optim.max_steps=3", "ray.max_failures=1")
    q.faults = {stage: {"fail_at_step": step, "marker_dir": str(q.layout.faults_dir),
                        "batch_log_path": str(q.layout.stage_dir(stage) / "batches.log")}
                for stage, step in (("reward", 3), ("policy", 1))}
    results = q.run(("reward", "policy"), force=("reward",))
    assert (q.run_dir / ".faults" / "killed_at_3").exists() and (q.run_dir / ".faults" / "killed_at_1").exists()
    reward, policy = results["reward"], results["policy"]
    assert reward["steps"] == 5 and len(reward["loss_history"]) == 5 and reward["resumed_from_step"] == 2
    assert policy["steps"] == 3 and policy["resumed_from_step"] == 0
    # Each kill restarted the group with two new workers: the pair that finished the reward model went on
    # to the policy, and the policy's kill brought a third pair.
    reward_procs, policy_procs = set(reward["worker_processes"]), set(policy["worker_processes"])
    assert len(reward_procs) == len(policy_procs) == 4 and len(reward_procs & policy_procs) == 2
    # Rank 0's logs: the reward model consumed the batch of step index 2 twice (before the kill and again
    # after resuming from the step-2 checkpoint), every other step's once, the replay the same examples;
    # the policy consumed step 0's batch before the kill and again from scratch.
    reward_steps = rank0_batches(q.layout.stage_dir("reward") / "batches.log")
    assert Counter(step for _, step in reward_steps) == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1}
    assert len({idx for idx, step in reward_steps if step == 2}) == 1
    assert sorted(step for _, step in rank0_batches(q.layout.stage_dir("policy") / "batches.log")) == [0, 0, 1, 2]


def rank0_batches(log_path) -> list[tuple[tuple[str, ...], int]]:
    """(example indices, step index) of every batch rank 0 logged (engine/faults.py's format)."""
    lines = [line.split() for line in log_path.read_text().splitlines()]
    return [(tuple(parts[:-2]), int(parts[-2][5:])) for parts in lines if parts[-1] == "rank=0"]


def test_bad_config_fails_before_any_ray_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "madpo_ray", "run", "policy.loss.betta=0.2",
                           f"runs_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "policy.loss.betta" in proc.stdout + proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written, no cluster started
