"""bench/gpu_check.py's dry mode: the GPU check's whole code path on CPU with a tiny model, so the
script that runs when a GPU is lent cannot rot between such sessions."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def test_dry_mode_runs_every_measurement_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # from another folder: the script finds the package itself
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu (dry)" and r["parameters"] > r["non_embedding_parameters"] > 0
    for mode in ("lora", "full"):
        assert r["sft"][mode]["tokens_per_s"] > 0 and r["sft"][mode]["mfu"] is None  # no peak off a GPU
    assert r["sft"]["lora"]["trainable"] < r["sft"]["full"]["trainable"]
    pf = r["pair_forward"]
    assert pf["max_abs_logprob_difference"] < 1e-4 * max(1.0, pf["max_abs_logprob"])
    assert set(pf["step_s"]) == {"two_sequences", "shared_prompt"} and pf["speedup_shared_over_two"] > 0
    assert set(r["gradient_checkpointing"]) == {"plain", "checkpointing"}
    assert r["fsdp_world_size_1"]["backend"] == "gloo" and r["fsdp_world_size_1"]["finite"]


def test_a_model_is_required_outside_dry_mode(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--model is required unless --dry" in proc.stderr
