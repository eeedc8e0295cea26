"""One module per pipeline stage. The training stages (sft, reward, policy) each expose
`train_<stage>(cfg, session, *, model_dir, out)`: the same function runs in a Ray Train worker
(`worker.train_loop_per_worker`) and in one process (the local runtime, compare, tune)."""


def stage_trainer(stage: str):
    """The training function of a training stage."""
    from madpo_ray.stages.policy import train_policy
    from madpo_ray.stages.reward import train_reward
    from madpo_ray.stages.sft import train_sft

    return {"sft": train_sft, "reward": train_reward, "policy": train_policy}[stage]
