"""`madpo train --margins-from data`: MADPO from the dataset's own margins, no reward model."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from tests.helpers import TINY_SETS

LOCAL = [s for s in TINY_SETS if not s.startswith(("ray.", "score."))] + ["ray.backend=local"]


def pairs(n, with_margin=True):
    rows = []
    for i in range(n):
        r = {"prompt": f"Summarise package {i}: a tool for task {i % 7}.\nTL;DR:", "chosen": f" tool for task {i % 7}",
             "rejected": f" library {i} about nothing"}
        if with_margin:
            r["margin"] = round(-3.0 + 0.25 * i, 2)  # spans both signs, and past tau = 6.9 for the last ones
        rows.append(r)
    return rows


def madpo(tmp_path, source, *extra):
    return subprocess.run([sys.executable, "-m", "madpo_ray", "train", "--margins-from", "data",
                           f"data.source={source}", f"runs_dir={tmp_path / 'runs'}", "name=m", *LOCAL, *extra],
                          capture_output=True, text=True, timeout=900)


def test_trains_madpo_from_the_datasets_margins_without_a_reward_model(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = pairs(80)
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = madpo(tmp_path, f)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    run = tmp_path / "runs" / "m"
    assert not (run / "reward" / "model").exists()  # no reward model was trained
    given = {r["prompt"]: r["margin"] for r in rows}
    for split in ("train", "validation", "test"):
        for r in pq.read_table(run / "score" / "scored" / f"split={split}").to_pylist():
            assert r["margin"] == given[r["prompt"]] and "reward_chosen" not in r
    summary = json.loads((run / "summary.json").read_text())
    assert summary["margins"]["margins_from"] == "data"
    assert summary["margins"]["train"]["share_margin_above_tau"] > 0  # the given margins, not a model's
    assert "from the dataset's margin column" in out
    # The one-process runtime tracks its trainings too, and no reward-model training was tracked.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("m").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["policy/madpo", "sft"]
    assert all(r.info.status == "FINISHED" and "loss" in r.data.metrics for r in runs)


def test_a_pair_without_a_margin_is_named_before_any_scoring(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = pairs(40)
    del rows[5]["margin"], rows[17]["margin"]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = madpo(tmp_path, f, "data.validation_fraction=0.05")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "have no 'margin'" in out and "Traceback" not in out, out[-2000:]
    assert not (tmp_path / "runs" / "m" / "sft" / "model").exists()  # stopped at the data stage, before SFT
