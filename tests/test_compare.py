"""`madpo compare` end to end on the session's two-node cluster, from copies of the shared full
run's scored pairs: every method and seed trained, sampled at each temperature, judged, reported,
cached, and the sealed test split read once by the final step; the learning-rate grid."""

import json

import pytest

from madpo_ray.config import config_from_dict

from helpers import clone_until_policy

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_two_nodes")]


def test_compare_trains_every_method_and_seed_and_judges_each_temperature(full_run, tmp_path, caplog, monkeypatch):
    """`madpo compare` end to end (transformers backend, CI-sized): 2 methods x 2 seeds as Ray
    tasks, 2 temperatures, a table, a plot, and a rerun that redoes nothing."""
    from madpo_ray.compare import Comparison

    p, _ = full_run
    q = clone_until_policy(p, tmp_path, "cmp", "compare.methods=[{loss: dpo}, {loss: madpo}]",
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


def test_lr_grid_trains_every_method_at_each_lr_and_reports_one_family(full_run, tmp_path):
    """`madpo compare --lr-grid`: matched settings (every method at the reference beta and the grid's
    lr), a comparison per grid point sharing the run's stages, one Holm family over the grid."""
    from madpo_ray.compare import compare_lr_grid

    p, _ = full_run
    q = clone_until_policy(p, tmp_path, "grid", "compare.methods=[{loss: dpo}, {loss: madpo}]", "compare.seeds=[0]",
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
