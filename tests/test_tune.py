"""Ray Tune search: bad search spaces name the key; a 2-trial search on a local cluster writes its
table and best config; resuming an interrupted search reruns only the unfinished trial."""

import json
import pickle
from pathlib import Path

import pytest
import yaml

from madpo_ray.config import ConfigError, load_config
from madpo_ray.tune_space import load_search_space

from helpers import clone_until_policy, tiny_config


def _space(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


BASE = "name: t\nparams:\n"


@pytest.mark.parametrize("params,needle", [
    ("  c_maxx: {type: uniform, low: 1, high: 2}\n", "unknown parameter(s) ['c_maxx']"),
    ("  tau: {type: uniform, low: 3, high: 3}\n", "params.tau"),
    ("  tau: {type: uniform, low: 3, high: 3}\n", "empty range"),
    ("  c_max: {type: uniform, low: 6, high: 1.5}\n", "params.c_max"),
    ("  c_max: {type: uniform, low: 6, high: 1.5}\n", "low (6.0) > high (1.5)"),
    ("  beta: {type: loguniform, low: 0, high: 1}\n", "loguniform needs low > 0"),
    ("  c_max: {type: grid, values: []}\n", "non-empty values"),
    ("  c_max: {type: normal, low: 1, high: 2}\n", "params.c_max.type"),
    ("  label_smoothing: {type: uniform, low: 0, high: 0.2}\n", "'madpo' takes no parameter(s) ['label_smoothing']"),
])
def test_bad_search_space_names_the_key(tmp_path, params, needle):
    with pytest.raises(ConfigError) as err:
        load_search_space(_space(tmp_path, BASE + params))
    assert needle in str(err.value)


def test_presets_load():
    from madpo_ray.tune_space import SEARCH_SPACES

    names = sorted(p.name[:-5] for p in SEARCH_SPACES.iterdir() if p.name.endswith(".yaml"))
    gold_searches = ("dpo_gold", "ipo_gold", "beta_dpo_gold", "madpo_gold")
    assert {"madpo_default", "madpo_grid", "baselines", *gold_searches} <= set(names)
    for name in names:
        space = load_search_space(name)
        assert space.params and space.name == name
    gold = [load_search_space(n) for n in gold_searches]
    assert [(s.loss, s.objective) for s in gold] == [(n.removesuffix("_gold"), "gold_reward_worst_temperature")
                                                     for n in gold_searches]
    # one grid for every method, so `madpo compare --tuned` compares like with like
    assert len({tuple((k, tuple(p.values)) for k, p in sorted(s.params.items())) for s in gold}) == 1
    grid = load_search_space("madpo_grid")
    assert grid.params["c_max"].values == [2, 3, 4] and grid.params["tau"].values == [2, 4, 7, 10]


@pytest.mark.ray
@pytest.mark.slow
def test_two_trial_search_then_resume(full_run, ray_two_nodes, tmp_path):
    from madpo_ray.tune import run_search

    p = _scored_pipeline(full_run, tmp_path, max_steps=4)
    space = load_search_space(_space(tmp_path, "name: two\nsearch: random\nnum_samples: 1\neval_every: 2\n"
                                               "objective: rm_reward\n"
                                               "scheduler: {type: none}\n"
                                               "params:\n  c_max: {type: choice, values: [3.0]}\n"))
    # The trials train in the configured dtype (one policy-training path for every caller).
    p.cfg = tiny_config(tmp_path, "full", "policy.optim.max_steps=4", "model.dtype=bfloat16")
    # fail_once adds a second trial that fails on its first attempt: an interrupted search.
    first = run_search(p, space, fail_once=True)
    out = p.run_dir / "tune" / "two"
    assert first["trials"] == 2 and first["errored"] == 1
    assert isinstance(first["best_value"], float)  # the reward model judged the trial's summaries
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and sum("ERROR" in r for r in rows) == 1
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["policy"]["loss"]["c_max"] == 3.0
    assert load_config(out / "best_config.yaml").policy.loss.name == "madpo"  # ready to run
    assert (out / "search.png").exists()
    tracked = _trial_runs(p.cfg)  # trials land in the run's MLflow experiment, beside its stages
    assert [r.info.status for r in tracked] == ["FINISHED"]  # the failing trial raised before training
    assert tracked[0].data.params["c_max"] == "3.0" and "_fail_once" not in tracked[0].data.params
    assert "rm_reward" in tracked[0].data.metrics  # the objective, as curves

    finished = [d for d in out.glob("trial_*")
                if json.loads((d / "params.json").read_text()).get("_fail_once") is False]
    assert len(finished) == 1
    last = json.loads((finished[0] / "result.json").read_text().splitlines()[-1])
    assert last["param_dtype"] == "torch.bfloat16"
    lines_before = (finished[0] / "result.json").read_text().count("\n")
    # Every pickle Tune left in the run folder (shared storage) becomes one that would run code
    # when loaded: resuming must read the project's own JSON records, never these.
    pickles = list(out.rglob("*.pkl"))
    assert pickles  # Tune did write some: the check below is not vacuous
    canary = tmp_path / "unpickled"
    for f in pickles:
        f.write_bytes(pickle.dumps(PlantedPickle(str(canary))))
    records = list((out / "finished_trials").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["params"]["_fail_once"] is False
    second = run_search(p, space, resume=True, fail_once=True)
    assert not canary.exists()
    assert second["trials"] == 2 and second["errored"] == 0
    assert (finished[0] / "result.json").read_text().count("\n") == lines_before  # not rerun
    assert len(_trial_runs(p.cfg)) == 2  # the resumed search tracked the trial that failed before
    assert len(list((out / "finished_trials").glob("*.json"))) == 2


class PlantedPickle:
    """A pickle that writes a file when loaded: what an attacker with write access could plant."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "code ran"))


def _scored_pipeline(full_run, tmp_path, max_steps: int):
    """A copy of the session's full run with every stage a search needs done, under the same name
    (the run's MLflow experiment, with its stages' runs, comes along)."""
    import shutil

    src, _ = full_run
    p = clone_until_policy(src, tmp_path, "full", f"policy.optim.max_steps={max_steps}")
    shutil.copytree(src.run_dir / "mlruns", p.run_dir / "mlruns")
    return p


def _mlflow_client(cfg):
    from madpo_ray.tracking import mlflow_client

    return mlflow_client((cfg.run_dir.resolve() / "mlruns").as_uri())


def _trial_runs(cfg, search: str = "two"):
    """MLflow runs of the run's experiment that are the search's Tune trials, read with MLflow's client."""
    client = _mlflow_client(cfg)
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    assert {"sft", "reward"} <= {r.info.run_name for r in runs}
    return [r for r in runs if r.info.run_name.startswith(f"tune/{search}/")]


@pytest.mark.ray
@pytest.mark.slow
def test_trials_the_scheduler_stops_are_not_left_running_in_mlflow(full_run, ray_one_node, tmp_path):
    """Ray Tune stops a trial with sys.exit(0) inside its report: the trial's MLflow run ends
    KILLED (not FAILED, not left RUNNING) and holds the report the scheduler judged it on. The
    trials run one after another on one reused actor (`reuse_actors`): a trial that ran on it after
    others reports what the same trial reports alone on a fresh actor."""
    import csv

    from madpo_ray.tune import run_search

    p = _scored_pipeline(full_run, tmp_path, max_steps=8)
    # A continuous objective (the reward model's score of greedy summaries) and learning rates
    # far apart, so the trials differ at the first rung (accuracies on 16 pairs tie).
    space = load_search_space(_space(tmp_path, "name: two\nsearch: grid\neval_every: 2\nobjective: rm_reward\n"
                                               "scheduler: {type: asha, grace_period: 1, reduction_factor: 2}\n"
                                               "params:\n  lr: {type: grid, values: [1.0e-1, 1.0e-4, 3.0e-2, 1.0e-3]}\n"))
    run_search(p, space, cpus_per_trial=2)  # one trial at a time (one node of 2 CPUs): the later ones meet a full rung
    with open(p.run_dir / "tune" / "two" / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = {r["trial_id"]: int(r["steps"]) for r in rows}
    status = {r.info.run_name.split("/")[-1]: r.info.status for r in _trial_runs(p.cfg)}
    stopped = [t for t, s in steps.items() if s < 8]
    assert stopped and status.keys() == steps.keys()  # ASHA stopped some, so the case happened
    assert all(status[t] == "KILLED" for t in stopped)
    # A trial the scheduler stops at its last report is KILLED too, so only "nothing else" is exact:
    assert set(status.values()) <= {"FINISHED", "KILLED"}
    client = _mlflow_client(p.cfg)
    histories = {}
    for run in _trial_runs(p.cfg):  # every trial's last tracked step is its last report, the stopping one included
        trial_id = run.info.run_name.split("/")[-1]
        histories[trial_id] = curves(client, run)
        assert max(step for step, _ in histories[trial_id]["rm_reward"]) == steps[trial_id]
    last_reports = [json.loads(f.read_text().splitlines()[-1]) for f in (p.run_dir / "tune" / "two").glob("*/result.json")]
    pid = {r["trial_id"]: r["pid"] for r in last_reports}
    first, *others = sorted(steps)  # trial ids count up in the order the trials started
    on_first_actor = [t for t in others if pid[t] == pid[first]]
    assert on_first_actor, pid  # a later trial ran on the first trial's actor
    later = next(r for r in rows if r["trial_id"] == max(on_first_actor, key=steps.get))  # the longest of them
    space = load_search_space(_space(tmp_path, "name: fresh\nsearch: grid\neval_every: 2\nobjective: rm_reward\n"
                                               f"params:\n  lr: {{type: grid, values: [{later['lr']}]}}\n"))
    run_search(p, space, cpus_per_trial=2)
    [alone] = _trial_runs(p.cfg, "fresh")
    fresh, reused = curves(client, alone), histories[later["trial_id"]]
    for name in ("rm_reward", "loss"):  # the objective (greedy text) and the training loss (the weights) alike
        assert len(reused[name]) >= 2 and reused[name] == fresh[name][:len(reused[name])], name


def curves(client, run) -> dict[str, list[tuple[int, float]]]:
    """A tracked trial's objective and loss curves, (step, value) in step order."""
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
            for name in ("rm_reward", "loss")}


@pytest.mark.ray
@pytest.mark.slow
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
