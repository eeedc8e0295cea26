"""The pipeline on a real Ray cluster of two nodes (two raylets on this machine, one CPU each, so
every two-worker training runs one worker per node, with runs_dir as the storage both see):
every stage, DDP and FSDP equivalence, resume after a worker is killed, and the scored-parquet
contract. CI-sized: a 1-layer width-32 model, 64 documents."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from madpo_ray.config import config_from_dict, load_config
from madpo_ray.pipeline import Pipeline

from helpers import TINY_SETS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONTRACT = ["prompt", "chosen", "rejected", "ref_logp_chosen", "ref_logp_rejected", "len_chosen", "len_rejected",
            "reward_chosen", "reward_rejected", "margin", "gold_chosen", "gold_rejected"]


def free_tcp_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """Two nodes of one CPU: a training of two 1-CPU workers cannot place both on one node."""
    import ray
    from ray.cluster_utils import Cluster

    from madpo_ray.runtime import worker_env

    # A free dashboard port: another Ray on this machine (a user's, a benchmark's) may hold 8265.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1",
                                                            "dashboard_port": free_tcp_port()})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": worker_env()})  # as runtime.init_ray does
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _cfg(tmp, name, *extra):
    # score.backend=ray_data: at this size `auto` would score in a plain loop; the Ray Data pass is what is tested here.
    return load_config("tiny", TINY_SETS + [f"runs_dir={tmp}", f"name={name}", "score.backend=ray_data", *extra])


@pytest.fixture(scope="module")
def full_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    p = Pipeline(_cfg(tmp, "full", "policy.optim.max_steps=6"))  # its policy is only looked at, not compared
    results = p.run()
    return p, results


def _clone_until_policy(src: Pipeline, tmp, name, *extra) -> Pipeline:
    """A new run sharing src's scored pairs, so only the policy stage runs."""
    p = Pipeline(_cfg(tmp, name, *extra))
    for stage in ("data", "sft", "pairs", "reward", "score"):
        shutil.copytree(src.layout.stage_dir(stage), p.layout.stage_dir(stage))
    if (src.run_dir / "base").exists():
        shutil.copytree(src.run_dir / "base", p.run_dir / "base")
    return p


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
    fixed = summary["stage_fixed_seconds"]  # wall time outside each training loop
    assert set(fixed) == {"sft", "reward", "policy"}
    assert all(0 < fixed[s] < summary["stage_seconds"][s] for s in fixed)
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



def test_scored_pairs_reach_ray_the_same_read_here_or_by_ray_data(full_run, monkeypatch):
    """A small parquet is read by the driver and handed over as one Arrow table, a large one by
    Ray Data's read tasks (below the size limit here by forcing it to 0): same rows, same columns."""
    from madpo_ray import runtime

    p, _ = full_run
    path, columns = str(p.layout.scored_path("train")), ["row_id", "prompt_ids", "margin"]
    here = runtime.parquet_dataset(path, columns).take_all()
    monkeypatch.setattr(runtime, "DRIVER_READ_MAX_BYTES", 0)
    by_tasks = runtime.parquet_dataset(path, columns).take_all()
    key = lambda r: r["row_id"]  # noqa: E731
    assert len(here) == pq.read_table(path).num_rows and sorted(here[0]) == sorted(columns)
    assert [dict(r) for r in sorted(here, key=key)] == [dict(r) for r in sorted(by_tasks, key=key)]

def test_rerun_skips_complete_stages(full_run, caplog):
    p, _ = full_run
    import logging

    caplog.set_level(logging.INFO, logger="madpo_ray.pipeline")
    Pipeline(p.cfg).run(("sft", "reward"))
    assert "sft: up to date, skipping" in caplog.text and "reward: up to date, skipping" in caplog.text


def test_ddp_two_workers_match_one_worker_and_fsdp(full_run, tmp_path):
    """Same global batch (1 x 8 vs 2 x 4): the same loss trajectory within float tolerance, with
    DDP and with FSDP (sharded checkpoints every 2 steps, merged by Ray from both workers; the
    consolidated model folder loads with from_pretrained)."""
    from transformers import AutoModelForCausalLM

    p, _ = full_run
    common = ("policy.loss.name=dpo", "policy.optim.max_steps=4")
    runs = {"one": ("ray.num_workers=1", "policy.optim.per_device_batch_size=8"),
            "two": ("ray.num_workers=2", "policy.optim.per_device_batch_size=4"),
            "fsdp": ("ray.num_workers=2", "policy.optim.per_device_batch_size=4", "ray.strategy=fsdp")}
    history = {}
    for name, sets in runs.items():
        q = _clone_until_policy(p, tmp_path, name, *common, *sets)
        history[name] = q.run(("policy",))["policy"]["loss_history"]
    from madpo_ray.engine.checkpoints import checkpoint_step, find_checkpoints, newest_checkpoint

    newest = newest_checkpoint(find_checkpoints(str(q.layout.checkpoint_root("policy"))))  # Ray merged both workers
    assert sorted(f.name for f in newest.glob("shard_*.pt")) == ["shard_00000.pt", "shard_00001.pt"]
    assert checkpoint_step(newest) == 4
    assert len(history["one"]) == 4
    assert history["one"] == pytest.approx(history["two"], rel=1e-4, abs=1e-5)
    assert history["fsdp"] == pytest.approx(history["two"], rel=1e-4, abs=1e-5)
    assert history["one"][0] != pytest.approx(history["one"][-1], abs=1e-7)  # training actually moved
    ids = torch.randint(0, 500, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {name: AutoModelForCausalLM.from_pretrained(tmp_path / name / "policy" / "dpo" / "model")(ids).logits
                  for name in ("two", "fsdp")}
    assert torch.allclose(logits["fsdp"], logits["two"], atol=1e-4)


@pytest.mark.parametrize("loss", ["beta_dpo", "ipo"])
def test_other_losses_train_from_the_same_scored_pairs(full_run, tmp_path, loss):
    p, _ = full_run
    q = _clone_until_policy(p, tmp_path, loss, f"policy.loss.name={loss}", "policy.optim.max_steps=3")
    m = q.run(("policy",))["policy"]
    assert m["steps"] == 3 and m["loss_name"] == loss
    assert q.layout.stage_dir("policy").name == loss
    if loss == "beta_dpo":
        assert "beta_batch" in m


def test_killed_worker_resumes_from_last_checkpoint(full_run, tmp_path):
    """SIGKILL a worker at step 3 (checkpoint every 2): the run finishes, resumed at step 2."""
    p, _ = full_run
    q = _clone_until_policy(p, tmp_path, "killed", "policy.optim.max_steps=5", "ray.max_failures=2")
    q.faults = {"policy": {"fail_at_step": 3, "marker_dir": str(q.layout.faults_dir),
                           "batch_log_path": str(q.layout.stage_dir("policy") / "batches.log")}}
    m = q.run(("policy",))["policy"]
    assert (q.run_dir / ".faults" / "killed_at_3").exists()  # the kill really happened
    assert m["steps"] == 5 and len(m["loss_history"]) == 5
    # Rank 0's log: the batch of step index 2 was consumed twice (before the kill and again after
    # resuming from the step-2 checkpoint); every other step's batch exactly once.
    from collections import Counter

    lines = [line.split() for line in (q.layout.stage_dir("policy") / "batches.log").read_text().splitlines()]
    rank0 = [(tuple(parts[:-2]), int(parts[-2][5:])) for parts in lines if parts[-1] == "rank=0"]
    counts = Counter(step for _, step in rank0)
    assert counts == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1}
    by_step = {}
    for idx, step in rank0:
        by_step.setdefault(step, set()).add(idx)
    assert len(by_step[2]) == 1  # the replayed step saw exactly the same examples


def test_bad_config_fails_before_any_ray_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "madpo_ray", "run", "policy.loss.betta=0.2",
                           f"runs_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "policy.loss.betta" in proc.stdout + proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written, no cluster started



def test_compare_trains_every_method_and_seed_and_judges_each_temperature(full_run, tmp_path, caplog, monkeypatch):
    """`madpo compare` end to end (transformers backend, CI-sized): 2 methods x 2 seeds as Ray
    tasks, 2 temperatures, a table, a plot, and a rerun that redoes nothing."""
    from madpo_ray.compare import Comparison

    p, _ = full_run
    q = _clone_until_policy(p, tmp_path, "cmp", "compare.methods=[{loss: dpo}, {loss: madpo}]",
                            "compare.seeds=[0,1]", "eval.temperatures=[0,1]", "eval.samples_per_prompt=2",
                            "eval.backend=transformers", "policy.optim.max_steps=2", "eval.bootstrap_samples=200")
    results = Comparison(q).run()
    out = q.run_dir / "compare"
    assert sorted(results["trainings"]) == ["dpo/seed0", "dpo/seed1", "madpo/seed0", "madpo/seed1"]
    assert all(t["steps"] == 2 for t in results["trainings"].values())
    for m in ("dpo", "madpo"):
        for s in (0, 1):
            assert (out / m / f"seed{s}" / "model" / "config.json").exists()
            assert not (out / m / f"seed{s}" / "checkpoints").exists()  # cleaned once the model is saved
    # seed changes the data order, so two seeds of one method end at different weights
    from safetensors.torch import load_file

    w0 = load_file(out / "dpo" / "seed0" / "model" / "model.safetensors")
    w1 = load_file(out / "dpo" / "seed1" / "model" / "model.safetensors")
    assert any(not (w0[k] == w1[k]).all() for k in w0)
    table = {(r["method"], r["temperature"]): r for r in results["table"]}
    assert set(table) == {(m, t) for m in ("sft", "dpo", "madpo") for t in (0.0, 1.0)}
    n_prompts = results["prompts"]
    assert table[("madpo", 1.0)]["samples"] == 2 * n_prompts * 2  # 2 seeds x prompts x 2 samples
    assert table[("madpo", 0.0)]["samples"] == 2 * n_prompts
    # the SFT policy draws once per method seed: its per-prompt mean averages as many draws as a method's
    assert table[("sft", 1.0)]["samples"] == n_prompts * 2 * 2 and table[("sft", 0.0)]["samples"] == n_prompts
    for r in results["table"]:
        g = r["gold"]
        assert g["ci_low"] <= g["mean"] <= g["ci_high"] and "rm" in r
    tests = results["paired"]["tests"]
    assert [(r["baseline"], r["temperature"]) for r in tests["rows"]] == [("dpo", 0.0), ("dpo", 1.0)]
    assert tests["family"] == 0 and all(r["p_adj"] is None for r in tests["rows"])  # 2 seeds: no verdict
    for m in ("dpo", "madpo"):  # the plain comparison: the reference settings, not the run's policy settings
        trained = json.loads((out / m / "seed0" / "metrics.json").read_text())["policy"]
        assert (trained["loss"]["beta"], trained["optim"]["lr"]) == (0.1, 1e-5)
    md = (out / "table.md").read_text()
    assert "**untuned: every method at the same reference settings**" in md
    assert "tier **medium**" in md and "| madpo |" in md and "T=1" in md
    assert "2 samples per prompt" in md and "4 for the sft policy" in md
    assert (out / "gold_vs_temperature.png").stat().st_size > 5000
    assert results["generation"][0]["backend"] == "transformers"

    caplog.clear()
    again = Comparison(q).run()  # everything cached: no training, no generation
    assert again["generation"] == []
    assert again["table"] == results["table"]

    # Other sampling settings must not reuse the cached samples (the trainings still are reused).
    q.cfg = q.cfg.model_copy(update={"eval": q.cfg.eval.model_copy(update={"temperatures": [0.5]})})
    resampled = Comparison(q).run()
    assert len(resampled["generation"]) == 5  # sft + 2 methods x 2 seeds, sampled again
    assert {r["temperature"] for r in resampled["table"]} == {0.5}
    assert resampled["trainings"] == again["trainings"]
    from madpo_ray.io import read_jsonl

    validation_ids = [d["doc_id"] for d in read_jsonl(q.layout.docs_path("validation"))]
    assert resampled["split"] == "validation" and "**Validation split**" in (out / "table.md").read_text()
    assert not (q.run_dir / "final_readings.jsonl").exists()  # development never reads the sealed split

    # The final step: the same trainings judged on the sealed test split, in final/, and recorded.
    q.cfg = config_from_dict(q.cfg.model_dump(mode="json"), ["compare.final=true"])
    final = Comparison(q)
    first = final.run()
    test_ids = [d["doc_id"] for d in read_jsonl(q.layout.docs_path("test"))][:first["prompts"]]
    assert final.prompt_ids == test_ids and not set(test_ids) & set(validation_ids)
    assert first["split"] == "test" and first["trainings"] == again["trainings"]  # no training redone
    record = json.loads((out / "final" / "final.json").read_text())
    assert record["split"] == "test" and record["prompts"] == len(test_ids) and record["earlier_readings"] == []
    assert "**Sealed test split**, final reading of " + record["computed_at"] in (out / "final" / "table.md").read_text()
    assert (out / "table.md").read_text().count("Sealed") == 0  # the development report is left as it was
    import madpo_ray.eval.heldout as heldout

    monkeypatch.setattr(heldout, "INVOCATION", "a-later-command")  # a second `madpo compare --final`, another process
    second = Comparison(q).run()
    assert second["final"]["earlier_readings"] == 1
    assert len((q.run_dir / "final_readings.jsonl").read_text().splitlines()) == 2


def test_tune_trial_scores_the_temperature_objective_on_validation_documents(full_run):
    """What a gold_*_temperature search selects by: a trial's evaluator, given the files the search
    hands every trial, samples the validation documents (never test) at every eval temperature; the
    worst is the lowest, T=0 is the greedy gold."""
    from madpo_ray.config import config_from_dict
    from madpo_ray.generation import TransformersGenerator
    from madpo_ray.io import read_jsonl
    from madpo_ray.models import load_causal_lm, load_tokenizer
    from madpo_ray.stages.measures import greedy_gold_reward, mean_gold_reward
    from madpo_ray.tune import trial_evaluator, trial_inputs

    p, _ = full_run
    cfg = config_from_dict(p.cfg.model_dump(mode="json"), ["eval.temperatures=[0,1]", "eval.num_prompts=6"])
    lay, sft = p.layout, str(p.layout.model_dir("sft"))
    tok, model = load_tokenizer(sft), load_causal_lm(sft).eval()
    given = trial_inputs(p)
    assert Path(given["scored_validation"]).name == "split=validation"
    got = trial_evaluator(cfg, "gold_reward_worst_temperature", given["scored_validation"], given["validation_docs"],
                          given["reward_dir"], tok)(model)
    validation = read_jsonl(lay.docs_path("validation"))[:6]
    test = read_jsonl(lay.docs_path("test"))[:6]
    generator = TransformersGenerator(batch_size=32)
    generator.use(model, tok)
    assert got["gold_reward_t0"] == pytest.approx(greedy_gold_reward(generator, validation, cfg)[0])
    assert got["gold_reward_t1"] == pytest.approx(mean_gold_reward(generator, validation, cfg, 1.0)[0])
    # the trial reads the validation documents; an evaluator on the test ones scores other documents
    assert Path(given["validation_docs"]) == lay.docs_path("validation")
    assert not {d["doc_id"] for d in test} & {d["doc_id"] for d in validation}
    assert got["gold_reward_worst_temperature"] == min(got["gold_reward_t0"], got["gold_reward_t1"])
    assert got["gold_reward_temperatures"] == pytest.approx((got["gold_reward_t0"] + got["gold_reward_t1"]) / 2)
    assert 0.0 <= got["heldout_preference_accuracy"] <= 1.0 and "rm_reward" not in got


def test_rm_noise_study_trains_dpo_once_and_madpo_per_noise_level(full_run, tmp_path):
    """`madpo study rm-noise` end to end (CI-sized): the noise reaches MADPO's margins (its weights
    change with it), DPO is trained once, and the report has a row per (noise, temperature)."""
    import json as _json

    from madpo_ray.study import run_rm_noise

    p, _ = full_run
    q = _clone_until_policy(p, tmp_path, "noise", "compare.seeds=[0]", "eval.temperatures=[0]",
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


def test_lr_grid_trains_every_method_at_each_lr_and_reports_one_family(full_run, tmp_path):
    """`madpo compare --lr-grid`: matched settings (every method at the reference beta and the grid's
    lr), a comparison per grid point sharing the run's stages, one Holm family over the grid."""
    from madpo_ray.compare import compare_lr_grid

    p, _ = full_run
    q = _clone_until_policy(p, tmp_path, "grid", "compare.methods=[{loss: dpo}, {loss: madpo}]", "compare.seeds=[0]",
                            "eval.temperatures=[0]", "eval.backend=transformers", "policy.optim.max_steps=2",
                            "eval.bootstrap_samples=100", "compare.lr_grid=[1e-5, 1e-3]", "ray.backend=local")
    combined = compare_lr_grid(q.cfg)
    assert (combined["kind"], combined["groups"], combined["split"]) == ("lr", ["1e-05", "0.001"], "validation")
    for label, lr in (("1e-05", 1e-5), ("0.001", 1e-3)):
        for m in ("dpo", "madpo"):
            trained = json.loads((q.layout.compare_dir / f"lr{label}" / m / "seed0" / "metrics.json").read_text())
            assert (trained["policy"]["loss"]["beta"], trained["policy"]["optim"]["lr"]) == (0.1, lr)
        rows = combined["per_group"][label]["paired"]["tests"]["rows"]
        assert [(r["baseline"], r["temperature"]) for r in rows] == [("dpo", 0.0)]
    md = (q.layout.compare_dir / "lr_grid" / "table.md").read_text()
    assert "across learning rates at matched settings" in md and "| baseline | lr 1e-05 | lr 0.001 |" in md
    assert (q.layout.compare_dir / "lr_grid" / "gold_vs_temperature_by_lr.png").stat().st_size > 5000
