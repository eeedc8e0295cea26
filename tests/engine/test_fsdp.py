"""FSDP2 (ray.strategy=fsdp, engine/parallel.py) on CPU with gloo, two processes, through the
real policy-training entry point (`train_policy`, the loop, the checkpoint format), with LoRA
adapters on a sharded base: the loss trajectory equals DDP's; a sharded checkpoint written by
both workers resumes to the same next step; the consolidated folder (merged, with the adapter
beside it) loads with from_pretrained and gives DDP's logits. The processes join a plain torch
process group; full fine-tuning under FSDP through Ray Train is tested in test_pipeline_ray.py."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from madpo_ray.engine.sessions import LocalSession, WorkerInfo

from helpers import TINY_SETS, free_tcp_port

pytestmark = pytest.mark.slow  # two pairs of processes (every uninterrupted training in one), about 30 s


class ProcessGroupSession(LocalSession):
    """A worker of a plain torch process group: DDP or FSDP preparation, and checkpoints that
    every rank copies into one folder (as Ray merges the workers' checkpoint folders)."""

    def __init__(self, datasets, checkpoint_root, strategy):
        import torch.distributed as dist

        super().__init__(datasets, checkpoint_root=checkpoint_root)
        self.info = WorkerInfo(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
        self.strategy = strategy

    def prepare(self, model):
        from torch.nn.parallel import DistributedDataParallel

        from madpo_ray.engine.parallel import shard_model

        return shard_model(model, self.info.device) if self.strategy == "fsdp" else DistributedDataParallel(model)

    def report(self, metrics, checkpoint_dir=None):
        import torch.distributed as dist

        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.checkpoint_root:
            dest = Path(self.checkpoint_root) / f"checkpoint_{int(metrics['step']):06d}"
            dest.mkdir(parents=True, exist_ok=True)
            for f in Path(checkpoint_dir).iterdir():
                shutil.copy2(f, dest / f.name)
        dist.barrier()


# Big steps (a trajectory that moves), two micro-batches per step (gradient sync held back on the
# first), LoRA on the sharded base with its dropout on.
POLICY_SETS = ["policy.optim.checkpoint_every=2", "policy.loss.name=madpo", "policy.optim.lr=0.1", "model.lora.r=4",
               "policy.optim.per_device_batch_size=2"]
# The reward model with early stopping: evaluated every step, its best weights restored at the end.
REWARD_SETS = ["reward.optim.lr=0.05", "reward.optim.per_device_batch_size=4", "reward.optim.eval_every=1",
               "reward.optim.patience=5"]
PAIR_IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def worker(rank, port, jobs):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for job in jobs:
            run_training(rank, **job)
    finally:
        if dist.is_initialized():
            dist.barrier()  # neither rank leaves while gloo has work in flight for it (SIGABRT at teardown)
            dist.destroy_process_group()


def run_training(rank, strategy, steps, model_dir, scored, run_dir, root, stage):
    import pyarrow.parquet as pq

    from madpo_ray.config import load_config
    from madpo_ray.data.scored import load_policy_examples
    from madpo_ray.launcher import Training, launch
    from madpo_ray.stages.outputs import StageOutput

    sets = POLICY_SETS if stage == "policy" else REWARD_SETS
    cfg = load_config("tiny", TINY_SETS + [f"runs_dir={run_dir}", f"{stage}.optim.max_steps={steps}", *sets])
    if stage == "policy":
        datasets = {"train": load_policy_examples(scored, "madpo")}
    else:
        pairs = [{k: r[k] for k in PAIR_IDS} for r in pq.read_table(scored).to_pylist()]
        datasets = {"train": pairs, "validation": pairs[:8]}
    session = ProcessGroupSession(datasets, root, strategy)
    out = StageOutput(Path(run_dir) / "model", Path(run_dir) / "train_metrics.json", Path(run_dir) / "adapter")
    result = launch(Training(stage, cfg, model_dir, out), session)
    if rank == 0:
        (Path(run_dir) / "history.json").write_text(json.dumps(
            {"history": result.loss_history, "resumed_from": session.reports[0]["resumed_from_step"],
             "best_step": result.metrics.get("best_step")}))


def job(tmp_path, name, strategy, steps, model_dir, scored, root=None, stage="policy") -> dict:
    (tmp_path / name).mkdir(exist_ok=True)
    return {"strategy": strategy, "steps": steps, "model_dir": str(model_dir), "scored": str(scored),
            "run_dir": str(tmp_path / name), "root": str(root) if root else None, "stage": stage}


def spawn(jobs) -> None:
    """The jobs one after another in one pair of processes (one process group)."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_tcp_port(), jobs), nprocs=2, join=True)


def result(tmp_path, name, resumed_from=0, stage="policy"):
    """The loss history of a two-process training; `resumed_from`: the step it must have resumed at."""
    record = json.loads((tmp_path / name / "history.json").read_text())
    assert record["resumed_from"] == resumed_from
    return record["history"] if stage == "policy" else record


@pytest.fixture(scope="module")
def trainings(tmp_path_factory, tiny_base_dir, scored_train):
    """Every uninterrupted training of the module in one pair of processes, each from a fresh
    model and its own seed: policy under DDP and FSDP (3 steps), two FSDP steps with a sharded
    checkpoint at step 2 (in ckpt/), the reward model under both (4 steps)."""
    tmp = tmp_path_factory.mktemp("trainings")
    spawn([job(tmp, "ddp", "ddp", 3, tiny_base_dir, scored_train),
           job(tmp, "fsdp", "fsdp", 3, tiny_base_dir, scored_train),
           job(tmp, "first", "fsdp", 2, tiny_base_dir, scored_train, tmp / "ckpt"),
           *[job(tmp, f"reward_{s}", s, 4, tiny_base_dir, scored_train, stage="reward") for s in ("ddp", "fsdp")]])
    return tmp


def test_fsdp_trains_like_ddp_and_its_folder_gives_the_same_logits(trainings, tiny_base_dir):
    from transformers import AutoModelForCausalLM

    ddp_history, fsdp_history = result(trainings, "ddp"), result(trainings, "fsdp")
    assert fsdp_history == pytest.approx(ddp_history, abs=1e-4)
    assert max(ddp_history) - min(ddp_history) > 0.005  # the weights moved, 50x the tolerance
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fsdp = AutoModelForCausalLM.from_pretrained(trainings / "fsdp" / "model")(ids).logits
        ddp = AutoModelForCausalLM.from_pretrained(trainings / "ddp" / "model")(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)(ids).logits
    assert torch.allclose(fsdp, ddp, atol=1e-4)
    assert not torch.allclose(fsdp, base, atol=1e-4)  # the trained weights, not the base's
    assert (trainings / "fsdp" / "adapter" / "adapter_config.json").exists()


def test_a_sharded_checkpoint_resumes_to_the_same_next_step(tmp_path, trainings, tiny_base_dir, scored_train):
    """Two steps (under FSDP a sharded checkpoint at step 2: a shard file per worker), then a new
    pair of processes resumes it for step 3: the loss of step 3 is the uninterrupted run's. LoRA's
    dropout is on, so this also needs each worker's own random stream back, not rank 0's on both
    (DDP saves and restores the streams with the same code)."""
    from madpo_ray.engine.checkpoints import find_checkpoints

    straight = result(trainings, "ddp")
    root = tmp_path / "ckpt"
    shutil.copytree(trainings / "ckpt", root)
    folder = find_checkpoints(str(root))[-1]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["step"] == 2 and sorted(meta["shards"]) == ["shard_00000.pt", "shard_00001.pt"]
    spawn([job(tmp_path, "resumed", "fsdp", 3, tiny_base_dir, scored_train, root)])
    assert result(tmp_path, "resumed", resumed_from=2) == pytest.approx(straight, abs=1e-4)


def test_a_checkpoint_missing_or_cutting_short_a_workers_shard_is_never_resumed_from(tmp_path, trainings):
    from madpo_ray.engine.checkpoints import checkpoint_step, find_checkpoints

    shutil.copytree(trainings / "ckpt", tmp_path / "ckpt")
    last = find_checkpoints(str(tmp_path / "ckpt"))[-1]
    assert checkpoint_step(last) == 2
    data = (last / "shard_00001.pt").read_bytes()
    (last / "shard_00001.pt").write_bytes(data[:-1])
    assert checkpoint_step(last) is None
    (last / "shard_00001.pt").unlink()
    assert checkpoint_step(last) is None


def test_fsdp_early_stopping_restores_the_same_best_weights_as_ddp(trainings):
    """The reward stage under both strategies: same losses, same best evaluation, and the saved
    (consolidated, best) reward models score alike."""
    from madpo_ray.models import load_reward_model, reward_scores

    runs = {s: result(trainings, f"reward_{s}", stage="reward") for s in ("ddp", "fsdp")}
    assert runs["fsdp"]["history"] == pytest.approx(runs["ddp"]["history"], abs=1e-4)
    assert runs["fsdp"]["best_step"] == runs["ddp"]["best_step"] is not None
    ids = torch.randint(3, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    scores = {s: reward_scores(load_reward_model(str(trainings / f"reward_{s}" / "model")).eval(), ids, mask) for s in runs}
    assert torch.allclose(scores["fsdp"], scores["ddp"], atol=1e-4)


def test_fsdp_with_the_one_process_runtime_is_refused_by_name():
    from madpo_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="ray.strategy=fsdp"):
        load_config("tiny", ["ray.strategy=fsdp", "ray.backend=local"])
