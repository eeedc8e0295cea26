"""One policy-training path: `train_policy` (what the pipeline's Ray Train workers, Tune trials and
`madpo compare` tasks call) honours model.dtype, trains every registered loss through the loss's
own contract, and resumes exactly; checkpoints load as data, never as code. In one process
(LocalSession): no cluster needed."""

import json

import pytest
import torch

from madpo_ray.config import load_config
from madpo_ray.losses import POLICY_LOSSES

from helpers import TINY_SETS


def _cfg(tmp_path, *extra):
    return load_config("tiny", TINY_SETS + [f"runs_dir={tmp_path}", "policy.optim.max_steps=2",
                                            "policy.optim.checkpoint_every=1", *extra])


def _train(cfg, scored_train, model_dir, root=None):
    from madpo_ray.data.scored import load_policy_examples
    from madpo_ray.engine.sessions import LocalSession
    from madpo_ray.stages.policy import train_policy

    session = LocalSession({"train": load_policy_examples(scored_train, cfg.policy.loss.name)},
                           checkpoint_root=root)
    return train_policy(cfg, session, model_dir=str(model_dir))


def test_bfloat16_config_trains_in_bfloat16(tmp_path, tiny_base_dir, scored_train):
    result = _train(_cfg(tmp_path, "model.dtype=bfloat16"), scored_train, tiny_base_dir)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert result.metrics["param_dtype"] == "torch.bfloat16"
    fp32 = _train(_cfg(tmp_path), scored_train, tiny_base_dir)
    assert fp32.metrics["param_dtype"] == "torch.float32"


def test_compare_training_task_trains_in_the_configured_dtype(tmp_path, tiny_base_dir, scored_train):
    """`madpo compare`'s task body, in this process: bf16 weights saved, settings recorded."""
    from safetensors import safe_open

    from madpo_ray.compare import train_method
    from madpo_ray.provenance import StageRecord

    cfg = _cfg(tmp_path, "model.dtype=bfloat16")
    out = tmp_path / "dpo" / "seed0"
    m = train_method(cfg.model_dump(mode="json"), {"loss": "dpo", "overrides": {"beta": 0.2}}, 0, str(scored_train),
                     str(tiny_base_dir), str(out), upstream="score-record")
    assert m["param_dtype"] == "torch.bfloat16" and m["policy"]["loss"]["beta"] == 0.2
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    rec = StageRecord.read(out)
    assert rec.upstream == "score-record" and rec.settings["model.dtype"] == "bfloat16"
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("loss", sorted(POLICY_LOSSES))
def test_every_registered_loss_trains_and_moves_the_weights(tmp_path, tiny_base_dir, scored_train, loss):
    from safetensors.torch import load_file

    result = _train(_cfg(tmp_path, f"policy.loss.name={loss}"), scored_train, tiny_base_dir)
    assert result.steps == 2 and len(result.loss_history) == 2
    before = load_file(str(tiny_base_dir / "model.safetensors"))
    after = result.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    if loss == "beta_dpo":
        assert {"beta_batch", "beta_mu", "beta_sigma"} <= set(result.metrics)
        assert result.metrics["beta_kept_share"] == pytest.approx(6 / 8)


def test_resume_continues_the_same_trajectory_including_loss_state(tmp_path, tiny_base_dir, scored_train):
    """3 steps straight vs 2 steps, then a new process-like run resuming from the step-2
    checkpoint: the same 3-step loss history (beta-DPO's moving averages included)."""
    straight = _train(_cfg(tmp_path, "policy.loss.name=beta_dpo", "policy.optim.max_steps=3"), scored_train,
                      tiny_base_dir)
    root = tmp_path / "ckpt"
    _train(_cfg(tmp_path, "policy.loss.name=beta_dpo", "policy.optim.max_steps=2"), scored_train, tiny_base_dir, root)
    resumed = _train(_cfg(tmp_path, "policy.loss.name=beta_dpo", "policy.optim.max_steps=3"), scored_train,
                     tiny_base_dir, root)
    assert resumed.loss_history == pytest.approx(straight.loss_history, rel=1e-6)
    assert resumed.metrics["beta_mu"] == pytest.approx(straight.metrics["beta_mu"], rel=1e-6)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """state.pt is loaded with weights_only: a pickle that calls a function on load fails instead."""
    import pickle

    from madpo_ray.engine.checkpoints import read_checkpoint

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "state.pt").write_bytes(pickle.dumps({"model": Payload()}))
    (tmp_path / "meta.json").write_text(json.dumps({"step": 1, "bytes": (tmp_path / "state.pt").stat().st_size}))
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(tmp_path)
