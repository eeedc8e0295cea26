"""`madpo export` and `madpo --version`: a run's model as a hub-ready folder with a model card."""

import json
import subprocess
import sys

import pytest
import torch

from madpo_ray.config import load_config, save_config
from madpo_ray.export import base_license, export_run, read_front_matter
from madpo_ray.io import OUTPUT_MARKER, OutputExistsError
from madpo_ray.layout import RunLayout
from madpo_ray.models import ModelLoadError, build_tiny_base

SETS = ["model.vocab_size=300", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
        "model.intermediate_size=64", "policy.loss.name=madpo", "policy.loss.beta=0.3", "policy.loss.tau=3.0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as the pipeline leaves it: config.yaml, summary.json and a policy model."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = load_config("tiny", SETS + [f"runs_dir={tmp}", "name=exp"])
    lay = RunLayout.of(cfg)
    texts = ["a small tool written in Rust", "a library for parsing logs"] * 20
    build_tiny_base(texts, cfg.model, lay.model_dir("policy"))
    save_config(cfg, lay.config_path)
    lay.summary_json.write_text(json.dumps({"policy_greedy_gold_reward": 1.25, "pairs": 7,
                                            "margins": {"validation": {"spearman_rm_vs_true": 0.5},
                                                        "test": {"spearman_rm_vs_true": 0.9}}}))
    return lay


def test_export_loads_with_from_pretrained_and_gives_the_same_logits(run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_run(run.run_dir, out=tmp_path / "exp")
    ids = torch.tensor([[1, 5, 7, 9]])
    a = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    b = AutoModelForCausalLM.from_pretrained(run.model_dir("policy"))(ids).logits
    assert torch.equal(a, b) and not list(tmp_path.glob(".exp.*"))  # no temp folder left behind


def test_model_card_names_loss_parameters_metrics_and_license(run, tmp_path):
    card = (export_run(run.run_dir, out=tmp_path / "c") / "README.md").read_text()
    meta = read_front_matter(tmp_path / "c" / "README.md")
    assert meta["license"] == "apache-2.0" and "madpo" in meta["tags"]
    assert "`madpo` with beta = 0.3, c_max = 4, lam = 1, tau = 3" in card  # the run's beta and tau, the loss defaults
    assert "| policy_greedy_gold_reward | 1.2500 |" in card and "| validation_spearman_rm_vs_true | 0.5000 |" in card
    assert "0.9000" not in card  # a test-split figure in a summary is never carried onto the card
    assert "```yaml" in card and "name: exp" in card


def test_base_license_from_the_base_cards_front_matter(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    cfg = load_config("tiny", [f"model.name_or_path={base}"])
    assert base_license(cfg) == "other"  # no card: say so, never guess
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert base_license(cfg) == "mit"
    (base / "README.md").write_text("---\n!!python/object:os.system x\n---\n")
    assert base_license(cfg) == "other"  # safe_load refuses tags; nothing is run


def test_export_errors_name_what_is_wrong(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        export_run(tmp_path)
    with pytest.raises(ValueError, match="--stage 'eval'"):
        export_run(run.run_dir, stage="eval")
    with pytest.raises(ModelLoadError, match="does not exist"):
        export_run(run.run_dir, stage="reward")


def test_export_never_replaces_a_folder_it_did_not_write(run, tmp_path):
    """The user's folder and its backup beside it survive; an export replaces only its own output."""
    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    backup = tmp_path / "mine.old"
    backup.mkdir()
    (backup / "b.txt").write_text("backup")
    with pytest.raises(OutputExistsError, match="not written by madpo.*--force"):
        export_run(run.run_dir, out=theirs)
    assert (theirs / "notes.txt").read_text() == "keep me" and (backup / "b.txt").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        export_run(run.run_dir, out=tmp_path / "afile", force=True)
    ours = export_run(run.run_dir, out=tmp_path / "ours")
    assert (ours / OUTPUT_MARKER).is_file()
    assert export_run(run.run_dir, out=ours) == ours  # its own output: replaced without --force
    export_run(run.run_dir, out=theirs, force=True)  # the user said so
    assert not (theirs / "notes.txt").exists() and (backup / "b.txt").read_text() == "backup"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine", "mine.old", "ours"]  # no temp left


def test_a_base_models_terms_travel_with_the_export(run, tmp_path):
    """A model derived from Gemma comes with Gemma's terms: the base folder's terms files are copied
    beside the card, and the card says so and carries the license its front matter declares."""
    base = tmp_path / "gemma-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: gemma\n---\n")
    (base / "GEMMA_TERMS.html").write_text("<html>Gemma Terms of Use</html>")
    cfg = load_config(run.run_dir / "config.yaml", [f"model.name_or_path={base}"])
    save_config(cfg, run.config_path)
    try:
        out = export_run(run.run_dir, out=tmp_path / "derived")
    finally:
        save_config(load_config(run.run_dir / "config.yaml", ["model.name_or_path=null"]), run.config_path)
    card = (out / "README.md").read_text()
    assert (out / "GEMMA_TERMS.html").read_text() == "<html>Gemma Terms of Use</html>"
    assert read_front_matter(out / "README.md")["license"] == "gemma"
    assert "comes with the base model's terms, carried beside this card: GEMMA_TERMS.html" in card


def test_export_refuses_symlinks_in_the_model_folder(run, tmp_path):
    link = run.model_dir("policy") / "extra.json"
    link.symlink_to(tmp_path)
    try:
        with pytest.raises(ValueError, match="symbolic links"):
            export_run(run.run_dir, out=tmp_path / "x")
    finally:
        link.unlink()
    assert not (tmp_path / "x").exists()


def test_cli_version_and_export(run, tmp_path):
    v = subprocess.run([sys.executable, "-m", "madpo_ray", "--version"], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and v.stdout.startswith("madpo-ray ")
    e = subprocess.run([sys.executable, "-m", "madpo_ray", "export", str(run.run_dir), "--loss", "nosuch"],
                       capture_output=True, text=True, timeout=120)
    assert e.returncode == 1 and "unknown loss 'nosuch'" in e.stdout + e.stderr and "Traceback" not in e.stdout + e.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("a")
    r = subprocess.run([sys.executable, "-m", "madpo_ray", "export", str(run.run_dir), "--out", str(tmp_path / "full")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--force" in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
    assert (tmp_path / "full" / "a").read_text() == "a"
