"""Provenance: a stage records the settings it was made with and the upstream record it was built
on; an unchanged rerun skips it, a changed setting redoes it (saying which), and a redone stage
makes everything downstream stale. On the data stage alone, so no cluster is needed."""

import logging
import subprocess
import sys

import pytest

from madpo_ray.config import load_config
from madpo_ray.layout import STAGES, RunLayout
from madpo_ray.pipeline import Pipeline
from madpo_ray.provenance import STAGE_SETTINGS, StageRecord, settings_of

from helpers import TINY_SETS


def _pipeline(tmp_path, *extra):
    return Pipeline(load_config("tiny", TINY_SETS + [f"runs_dir={tmp_path}", "name=prov", *extra]))


def test_every_stage_declares_settings_that_exist_in_the_config():
    raw = load_config("tiny").model_dump(mode="json")
    assert set(STAGE_SETTINGS) == set(STAGES)
    for stage, keys in STAGE_SETTINGS.items():
        settings_of(raw, keys)  # a misspelt key raises KeyError here


def test_every_data_setting_belongs_to_a_stage():
    """A data key no stage lists would let a changed corpus or label setting reuse stale stages."""
    listed = {key for keys in STAGE_SETTINGS.values() for key in keys}
    unlisted = [f"data.{name}" for name in load_config("tiny").data.model_dump()
                if f"data.{name}" not in listed and "data" not in listed]
    assert unlisted == []


def test_unchanged_rerun_skips_changed_setting_redoes_and_names_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="madpo_ray.pipeline")
    p = _pipeline(tmp_path)
    p.run(("data",))
    first = p.layout.record("data")
    assert first is not None and first.settings["data.num_documents"] == 64
    caplog.clear()
    _pipeline(tmp_path).run(("data",))
    assert "data: up to date, skipping" in caplog.text
    assert p.layout.record("data").record_id == first.record_id

    caplog.clear()
    _pipeline(tmp_path, "policy.loss.beta=0.3").run(("data",))  # not a data setting
    assert "data: up to date" in caplog.text

    caplog.clear()
    _pipeline(tmp_path, "data.num_documents=72").run(("data",))
    assert "data: running (settings changed (data.num_documents: 64 -> 72))" in caplog.text
    assert len((p.layout.docs_path("train")).read_text().splitlines()) == 72
    assert p.layout.record("data").record_id != first.record_id


def test_a_redone_stage_makes_downstream_stale_and_force_redoes(tmp_path):
    p = _pipeline(tmp_path)
    p.run(("data",))
    p.finish_stage("sft", {"note": "as if sft had run on this data"})  # the driver's own bookkeeping
    assert p.why_stale("sft") is None
    p.run(("data",), force=("data",))  # forced: a new record, same settings
    assert p.why_stale("sft") == "data was redone since"
    q = _pipeline(tmp_path, "sft.optim.lr=0.01")
    q.finish_stage("sft", {})
    assert q.why_stale("sft") is None
    assert _pipeline(tmp_path).why_stale("sft").startswith("settings changed (sft.optim.lr: 0.01 -> 0.002)")


def test_policy_folders_and_layout_paths():
    lay = RunLayout("/tmp/x", loss="dpo")
    assert lay.stage_dir("policy").parts[-2:] == ("policy", "dpo")
    assert lay.model_dir("sft").parts[-2:] == ("sft", "model")
    assert lay.scored_path("test").name == "split=test"
    assert lay.trainer_name("policy") == "policy-dpo" and lay.trainer_name("sft") == "sft"
    with pytest.raises(ValueError, match="unknown stage 'polcy'"):
        lay.stage_dir("polcy")


def test_record_from_an_older_version_is_not_trusted(tmp_path):
    (tmp_path / "DONE").write_text("2026-01-01T00:00:00")  # the format before provenance
    assert StageRecord.read(tmp_path) is None


def test_force_names_an_unknown_stage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "madpo_ray", "run", "--force", "polcy", f"runs_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--force 'polcy': not a stage" in proc.stdout + proc.stderr
