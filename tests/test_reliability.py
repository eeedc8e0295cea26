"""Faults and bad input: each fails once, clearly, before any training, and loses nothing.

(The SIGKILLed training worker and the interrupted checkpoint write are in
test_pipeline_ray.py and test_checkpoints.py.)"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from madpo_ray.data.preference import DataValidationError, load_pairs
from madpo_ray.models import ModelLoadError

ROWS = [{"prompt": f"Document {i} about a Rust library.\nTL;DR:", "chosen": f" A Rust library {i}.",
         "rejected": f" A Go daemon {i}."} for i in range(12)]


def _madpo(*args, preexec=None, timeout=300, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "madpo_ray", *args], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec, env={**os.environ, **(env or {})})


def test_truncated_jsonl_keeps_every_whole_row_and_names_the_cut_one(tmp_path):
    f = tmp_path / "pairs.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in ROWS)
    f.write_text(text[:-25])  # the copy stopped inside the last row
    pairs, report = load_pairs(str(f))
    assert len(pairs) == 11 and report.skipped == 1
    assert "row 11" in str(report.issues[0]) and "JSON" in str(report.issues[0])
    with pytest.raises(DataValidationError, match="row 11"):
        load_pairs(str(f), strict=True)


def test_truncated_parquet_fails_before_any_training(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    proc = _madpo("run", f"data.source={cut}", f"runs_dir={tmp_path / 'runs'}", "name=cut")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "cannot read parquet" in out and "cut.parquet" in out
    assert "Traceback" not in out
    assert not (tmp_path / "runs" / "cut" / "sft").exists()  # stopped at the data stage


def test_input_parquet_missing_a_column_names_it(tmp_path):
    f = tmp_path / "norejected.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "rejected"} for r in ROWS]), f)
    with pytest.raises(DataValidationError) as e:
        load_pairs(str(f))
    assert "rejected" in str(e.value) and "no usable rows" in str(e.value)


def _scored(tmp_path, **replace):
    rows = []
    for i in range(6):
        r = {"row_id": 100 + i, "prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8, 2],
             "ref_logp_chosen": -3.0, "ref_logp_rejected": -4.0, "len_chosen": 2.0, "len_rejected": 2.0, "margin": 0.5}
        r.update({k: v(i) for k, v in replace.items()})
        rows.append(r)
    path = tmp_path / "scored.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_scored_parquet_missing_margin_column(tmp_path):
    from madpo_ray.data.scored import load_policy_examples

    path = _scored(tmp_path)
    t = pq.read_table(path).drop(["margin"])
    pq.write_table(t, path)
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['margin'\]"):
        load_policy_examples(path, "madpo")
    assert len(load_policy_examples(path, "dpo")) == 6  # DPO does not need margins


def test_nan_and_infinite_margins_are_rejected_with_row_ids(tmp_path):
    from madpo_ray.data.scored import load_policy_examples

    bad = {1: float("nan"), 4: float("inf")}
    path = _scored(tmp_path, margin=lambda i: bad.get(i, 0.5))
    with pytest.raises(DataValidationError) as e:
        load_policy_examples(path, "madpo")
    assert "margin: rows [101, 104]" in str(e.value) and "(2 total)" in str(e.value)


def test_reward_model_without_weights_fails_before_ray_starts(tiny_base_dir, tmp_path):
    """The score stage checks both model folders in the driver before it starts Ray (its workers or Ray Data)."""
    import ray

    from madpo_ray.config import load_config
    from madpo_ray.pipeline import Pipeline

    p = Pipeline(load_config("tiny", [f"runs_dir={tmp_path}", "name=norm"]))
    shutil.copytree(tiny_base_dir, p.layout.stage_dir("sft") / "model")
    shutil.copytree(tiny_base_dir, p.layout.stage_dir("reward") / "model")
    for f in (p.layout.stage_dir("reward") / "model").glob("*.safetensors"):
        f.unlink()
    assert not ray.is_initialized()
    with pytest.raises(ModelLoadError, match=r"reward/model: no weights"):
        p.stage_score()
    assert not ray.is_initialized()


def test_full_disk_fails_the_stage_cleanly_and_a_rerun_completes(tmp_path):
    """A 16 KiB file-size limit (writes past it fail with EFBIG, as ENOSPC would on a full disk)
    stops the data stage: one clear message, no DONE marker, no half-written file. The same
    command without the limit then completes the stage."""

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    runs = tmp_path / "runs"
    args = ["sft", f"runs_dir={runs}", "name=full", "data.num_documents=64", "data.num_eval_documents=8",
            "sft.optim.max_steps=1", "model.hidden_size=32", "model.num_heads=2", "model.num_layers=1",
            "model.intermediate_size=64", "model.vocab_size=512", "ray.num_workers=1"]
    # A narrow console: the message must come out whole, not wrapped at the width (it once split
    # "rerun the same command" across lines depending on the length of the temporary path).
    proc = _madpo(*args, preexec=small_disk, env={"COLUMNS": "40"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "File too large" in out and "rerun the same command" in out and "Traceback" not in out
    data = runs / "full" / "data"
    assert not (data / "DONE").exists()
    assert not list(data.glob("*.partial"))  # the failed write cleaned up after itself

    from madpo_ray.config import load_config
    from madpo_ray.pipeline import Pipeline

    p = Pipeline(load_config("tiny", args[1:]))
    p.run(("data",))
    assert (data / "DONE").exists() and len((data / "train_docs.jsonl").read_text().splitlines()) == 64


def test_cluster_address_prefers_config_then_ray_address_then_a_fresh_local_cluster(monkeypatch):
    from madpo_ray.runtime import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) == "local"
    assert cluster_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(None) == "10.0.0.1:6379"
    assert cluster_address("ray://head:10001") == "ray://head:10001"


@pytest.mark.ray
def test_a_stale_ray_start_address_file_does_not_stop_a_local_run(tmp_path):
    """A killed `ray start` leaves <tmp>/ray/ray_current_cluster behind; plain ray.init() would try to
    join that dead cluster and refuse num_cpus (the CI failure this guards). A short RAY_TMPDIR keeps
    Ray's socket paths under the Unix limit and the real /tmp/ray untouched."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens there
        script = ("from madpo_ray.config import RayConfig; from madpo_ray.runtime import init_ray; import ray; "
                  "init_ray(RayConfig(num_cpus=1)); print('cpus', ray.cluster_resources()['CPU']); ray.shutdown()")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             env=dict(env, RAY_TMPDIR=ray_tmp))
        assert out.returncode == 0, out.stderr[-3000:]
        assert "cpus 1.0" in out.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
