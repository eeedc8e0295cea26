"""beta-DPO over the whole optimiser step (spec: "on the (globally gathered) batch"): the filter,
beta_batch and the moving averages are those of all of a step's micro-batches on all workers,
updated once per step, and a resumed run draws as an uninterrupted one.

Each test names the wrong implementation it is there to catch."""

import math

import pytest
import torch

from madpo_ray import losses as L

BETA, ALPHA, RHO, MOMENTUM = 0.1, 0.6, 0.2, 0.9


def _reference_plan(a, mu, sigma, seed, beta=BETA, alpha=ALPHA, rho=RHO, momentum=MOMENTUM):
    """The spec's formulas written out again, independently of madpo_ray.losses."""
    a = a.double()
    mu = momentum * mu + (1 - momentum) * a.mean().item()
    sigma = momentum * sigma + (1 - momentum) * a.std().item()
    p = torch.exp(-0.5 * ((a - mu) / sigma) ** 2)
    k = int(len(a) * (1 - rho))
    idx = torch.multinomial(p, k, replacement=False, generator=torch.Generator().manual_seed(seed))
    beta_batch = max(beta * (1 + alpha * (a[idx].mean().item() - mu)), 1e-3)
    return sorted(idx.tolist()), beta_batch, mu, sigma


# ----------------------------------------------------------------------------- the plan (pure)
def test_filter_keeps_the_pairs_near_the_running_mean():
    """Kills: a uniform draw in place of the Gaussian weights. Two of ten margins lie ~7 sigma
    out; over 20 seeds the kept eight are always the near ones (a uniform draw keeps both far
    ones out with probability 1/45 per seed)."""
    a = torch.tensor([0.0] * 8 + [10.0, -10.0])
    for seed in range(20):
        state = L.BetaDPOState(mu=0.0, sigma=1.0, steps=3)
        plan = L.beta_dpo_plan(a, state, generator=torch.Generator().manual_seed(seed))
        assert plan.keep.tolist() == [1.0] * 8 + [0.0, 0.0], seed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_matches_an_independent_rewrite_of_the_spec(seed):
    """Kills: any other weighting, draw size, update order or generator use: same draw, same beta."""
    a = torch.randn(40, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64) * 4 + 1
    state = L.BetaDPOState(mu=0.7, sigma=2.5, steps=seed)
    plan = L.beta_dpo_plan(a, state, generator=torch.Generator().manual_seed(seed))
    kept, beta_batch, mu, sigma = _reference_plan(a, 0.7, 2.5, seed)
    assert torch.nonzero(plan.keep).flatten().tolist() == kept and len(kept) == 32
    assert plan.beta == pytest.approx(beta_batch, rel=1e-12)
    assert (state.mu, state.sigma, state.steps) == (pytest.approx(mu), pytest.approx(sigma), seed + 1)
    assert plan.metrics["beta_kept_share"] == pytest.approx(0.8)


def test_beta_batch_comes_from_the_kept_pairs_only():
    """Kills: beta from the mean of all pairs. By hand: mu' = 0.9 + 0.1 * 5.8 = 1.48; the two
    outliers (20, 30) are dropped, kept mean 1.0: beta = 0.1 (1 + 0.6 (1.0 - 1.48)) = 0.0712
    (all pairs would give 0.1 (1 + 0.6 (5.8 - 1.48)) = 0.3592)."""
    a = torch.tensor([1.0] * 8 + [20.0, 30.0])
    state = L.BetaDPOState(mu=1.0, sigma=1.0, steps=5)
    plan = L.beta_dpo_plan(a, state, generator=torch.Generator().manual_seed(0))
    assert state.mu == pytest.approx(1.48)
    assert plan.keep.tolist() == [1.0] * 8 + [0.0, 0.0]
    assert plan.beta == pytest.approx(0.0712)
    x = L.PolicyLossInputs(a.double(), torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64),
                           torch.zeros(10, dtype=torch.float64))
    out = L.get_policy_loss("beta_dpo")(x, state=L.BetaDPOState(mu=1.0, sigma=1.0, steps=5),
                                        generator=torch.Generator().manual_seed(0))
    assert out.metrics["beta_batch"] == pytest.approx(0.0712)
    assert out.losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.0712)))


def test_planned_micro_batches_reduce_to_the_kept_mean_of_the_whole_step():
    """Kills: dividing by a micro-batch's own kept count. Four micro-batches with their shares of
    one plan, each reduced and divided by 4 as the loop does: the sum and its gradient are those
    of the mean of -log sigmoid(beta_batch h) over the step's kept pairs."""
    h = (torch.randn(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3).requires_grad_(True)
    zeros = torch.zeros(8, dtype=torch.float64)
    loss = L.get_policy_loss("beta_dpo")
    plan = loss.plan(h.detach(), L.BetaDPOState(mu=0.5, sigma=2.0, steps=1), generator=torch.Generator().manual_seed(1))
    total = 0
    for m in range(4):
        share = plan.share(torch.arange(8 * m, 8 * m + 8), 4)
        out = loss(L.PolicyLossInputs(h[8 * m:8 * m + 8], zeros, zeros, zeros), state=None, share=share)
        total = total + loss.reduce(out, L.DataParallel()) / 4
    total.backward()
    grad = h.grad.clone()
    h.grad = None
    kept = plan.keep.bool()
    want = -torch.nn.functional.logsigmoid(plan.beta * h[kept]).mean()
    want.backward()
    assert total.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(grad, h.grad, rtol=1e-12, atol=1e-15)
    assert int(plan.keep.sum()) == 25  # int(32 * 0.8): not 4 x int(8 * 0.8) = 24


def test_step_order_is_the_samplers_slice_order_for_any_worker_count():
    """Kills: a rank-major order (2 workers x 2 micro-batches would then draw over another order
    than 1 worker x 4, and the same seed would keep other pairs)."""
    from madpo_ray.stages.policy import step_order, step_positions

    world, micro, size = 2, 2, 3
    # Slice s = m * world + r of the step batch holds values 10 s ... 10 s + 2.
    local = {r: torch.cat([torch.arange(3) + 10 * (m * world + r) for m in range(micro)]) for r in range(world)}
    gathered = torch.cat([local[0], local[1]])  # what all_gather concatenates: rank-major
    ordered = step_order(gathered, micro, world)
    assert ordered.tolist() == [10 * s + j for s in range(4) for j in range(3)]
    for r in range(world):
        for m in range(micro):
            assert ordered[step_positions(m, r, world, size)].tolist() == local[r][m * size:(m + 1) * size].tolist()


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def beta_examples(tiny_base_dir, corpus_docs, tiny_tokenizer):
    """64 pairs with reference log-probs of the tiny model plus noise, so that h varies from the
    first step on (with the model's own log-probs, h = 0 and every filter is uniform at step 1)."""
    from madpo_ray.data.collate import tokenize_pairs
    from madpo_ray.data.preference import ValidationReport
    from madpo_ray.models import load_causal_lm
    from madpo_ray.pair_forward import pair_collator, pair_response_logprobs

    rows = [{"prompt": d["document"][:120] + "\nTL;DR:", "chosen": " " + d["reference"],
             "rejected": " " + corpus_docs[(i + 5) % len(corpus_docs)]["reference"], "row_id": i}
            for i, d in enumerate(corpus_docs[:64])]
    exs = tokenize_pairs(tiny_tokenizer, rows, 40, 72, "truncate", ValidationReport(source="t"), False)
    assert len(exs) == 64
    model = load_causal_lm(str(tiny_base_dir)).eval()
    collate = pair_collator(model, tiny_tokenizer.pad_token_id, "shared_prompt")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 3
    out = []
    with torch.no_grad():
        for start in range(0, 64, 16):
            chosen, rejected = pair_response_logprobs(model, collate(exs[start:start + 16]))
            for j in range(16):
                i = start + j
                out.append({"prompt_ids": exs[i]["prompt_ids"], "chosen_ids": exs[i]["chosen_ids"],
                            "rejected_ids": exs[i]["rejected_ids"], "row_id": i,
                            "ref_logp_chosen": float(chosen.summed[j] + noise[i, 0]),
                            "ref_logp_rejected": float(rejected.summed[j] + noise[i, 1]),
                            "len_chosen": float(chosen.n_tokens[j]), "len_rejected": float(rejected.n_tokens[j])})
    return out


def beta_fit(examples, model_dir, pad_id, *, per_device, effective=32, steps=4, session=None, dp=None):
    """beta-DPO through the shared loop: (FitResult, the PolicyStep holding the loss state).

    The averages start warm (sigma near the spread of h): from the spec's cold start sigma is a
    tenth of the spread at step 1, the Gaussian weights then span dozens of orders of magnitude
    and the draw is all but deterministic, so it could not tell one pair order from another."""
    from madpo_ray.config import LossConfig, OptimConfig
    from madpo_ray.engine.loop import fit
    from madpo_ray.engine.sessions import LocalSession
    from madpo_ray.models import load_causal_lm
    from madpo_ray.pair_forward import pair_collator
    from madpo_ray.stages.policy import PolicyStep

    model = load_causal_lm(str(model_dir))
    step = PolicyStep(LossConfig(name="beta_dpo"), 0, dp or L.DataParallel())
    step.state.load_state_dict({"mu": 0.0, "sigma": 5.0, "steps": 0})
    optim = OptimConfig(lr=2e-3, warmup_ratio=0.0, per_device_batch_size=per_device, effective_batch_size=effective,
                        max_steps=steps, epochs=10, report_every=1, checkpoint_every=2, bf16="off")
    collate = pair_collator(model, pad_id, "shared_prompt")
    result = fit(model, [dict(e) for e in examples], collate, step, optim, stage="test/beta_dpo",
                 session=session or LocalSession(), extra_state=step.extra_state())
    return result, step


def _summary(result, step) -> dict:
    return {"history": result.loss_history, "state": step.state.state_dict(), "beta": result.metrics["beta_batch"],
            "params": {k: v.detach().clone() for k, v in result.model.state_dict().items()}}


def _assert_same_run(a: dict, b: dict, rel=1e-4, atol=1e-5):
    assert a["history"] == pytest.approx(b["history"], rel=rel)
    assert a["state"]["steps"] == b["state"]["steps"]
    assert a["state"]["mu"] == pytest.approx(b["state"]["mu"], rel=rel)
    assert a["state"]["sigma"] == pytest.approx(b["state"]["sigma"], rel=rel)
    assert a["beta"] == pytest.approx(b["beta"], rel=rel)
    for k, v in a["params"].items():
        assert torch.allclose(v, b["params"][k], rtol=rel, atol=atol), k


def test_accumulation_4x8_equals_one_batch_of_32(beta_examples, tiny_base_dir, tiny_tokenizer):
    """Kills: statistics, filter and averages per micro-batch. 4 micro-batches of 8 and one batch
    of 32 (the same 32 pairs per step): the same losses, averages, beta and weights after 4
    steps, and the averages updated once per optimiser step (state.steps == 4, not 16)."""
    pad = tiny_tokenizer.pad_token_id
    accum = _summary(*beta_fit(beta_examples, tiny_base_dir, pad, per_device=8))
    whole = _summary(*beta_fit(beta_examples, tiny_base_dir, pad, per_device=32))
    assert accum["state"]["steps"] == whole["state"]["steps"] == 4
    assert len(set(accum["history"])) == 4 and accum["state"]["sigma"] > 0.1  # it trained on varied margins
    _assert_same_run(accum, whole)


# ----------------------------------------------------------------------------- two workers
class _GlooSession:
    """A LocalSession on one of two gloo workers, with the model in DDP (as Ray Train prepares it)."""

    @staticmethod
    def make(rank: int, world: int):
        from torch.nn.parallel import DistributedDataParallel

        from madpo_ray.engine.sessions import LocalSession, WorkerInfo

        class Session(LocalSession):
            def prepare(self, model):
                return DistributedDataParallel(model)

        session = Session()
        session.info = WorkerInfo(rank, world, torch.device("cpu"))
        return session


def close_process_group() -> None:
    """Both ranks meet before the group goes, so neither exits while gloo still has work in flight
    for it (a rank leaving early has aborted its peer at teardown: "terminate called without an
    active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def ddp_worker(rank: int, world: int, init_file: str, examples, model_dir: str, pad_id: int, out: str):
    """One of two spawned workers: beta-DPO with per-device 8 and accumulation 2."""
    import torch.distributed as dist

    from madpo_ray.stages.policy import all_gather_1d

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result, step = beta_fit(examples, model_dir, pad_id, per_device=8, session=_GlooSession.make(rank, world),
                                dp=L.DataParallel(rank, world, all_gather_1d))
        if rank == 0:
            torch.save(_summary(result, step), out)
    finally:
        close_process_group()


@pytest.mark.slow
def test_two_workers_with_accumulation_2_equal_one_worker_with_accumulation_4(beta_examples, tiny_base_dir,
                                                                              tiny_tokenizer, tmp_path):
    """Kills: per-worker statistics (no gather), a gather without the micro-batches, or a pair order
    that depends on the worker count: 2 gloo workers x accumulation 2 (DDP) train exactly as
    1 worker x accumulation 4 on the same 32 pairs per step."""
    import torch.multiprocessing as mp

    pad = tiny_tokenizer.pad_token_id
    out = tmp_path / "rank0.pt"
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "pg"), beta_examples, str(tiny_base_dir), pad, str(out)),
             nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    one = _summary(*beta_fit(beta_examples, tiny_base_dir, pad, per_device=8))
    assert two["state"]["steps"] == 4
    _assert_same_run(two, one)


# ----------------------------------------------------------------------------- kill and resume
def resume_worker(examples, model_dir: str, pad_id: int, root: str, markers: str, out: str):
    """A training process that is SIGKILLed after step 3 on its first run (checkpoints every 2)."""
    from madpo_ray.engine.faults import FaultInjectingSession
    from madpo_ray.engine.sessions import LocalSession

    torch.set_num_threads(1)
    session = FaultInjectingSession(LocalSession(checkpoint_root=root), fail_at_step=3, marker_dir=markers)
    result, step = beta_fit(examples, model_dir, pad_id, per_device=8, effective=16, steps=6, session=session)
    torch.save(_summary(result, step), out)


@pytest.mark.slow
def test_killed_and_resumed_run_ends_as_the_uninterrupted_one(beta_examples, tiny_base_dir, tiny_tokenizer,
                                                              tmp_path):
    """Kills: a loss state or a filter seed that is not checkpointed: SIGKILL after step 3, resume
    from the step-2 checkpoint, and the 6-step run (accumulation 2) ends with the uninterrupted
    run's losses, weights, mu, sigma and step count."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    pad, out = tiny_tokenizer.pad_token_id, tmp_path / "resumed.pt"
    args = (beta_examples, str(tiny_base_dir), pad, str(tmp_path / "ckpt"), str(tmp_path / "markers"), str(out))
    first = ctx.Process(target=resume_worker, args=args)
    first.start()
    first.join(300)
    assert first.exitcode == -9 and (tmp_path / "markers" / "killed_at_3").exists() and not out.exists()
    second = ctx.Process(target=resume_worker, args=args)
    second.start()
    second.join(300)
    assert second.exitcode == 0
    resumed = torch.load(out, weights_only=True)
    straight = _summary(*beta_fit(beta_examples, tiny_base_dir, pad, per_device=8, effective=16, steps=6))
    assert straight["state"]["steps"] == resumed["state"]["steps"] == 6
    _assert_same_run(resumed, straight, rel=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- the loop's hook
class _DropoutStep:
    """A step_fn on a toy model with dropout that records what `begin_step` and the gradient
    passes compute."""

    def __init__(self, plan: bool):
        self.planned, self.trained = [], []
        if plan:
            self.begin_step = lambda model, batches: self.planned.extend(self.out(model, b) for b in batches)

    @staticmethod
    def out(model, batch):
        return model(batch["input_ids"]).sum(-1)

    def __call__(self, model, batch):
        y = self.out(model, batch)
        self.trained.append(y.detach().clone())
        return (y ** 2).mean(), {}


def _toy_fit(plan: bool):
    from madpo_ray.config import OptimConfig
    from madpo_ray.engine.loop import fit
    from madpo_ray.engine.sessions import LocalSession

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4))
    examples = [{"input_ids": [(7 * i + j) % 50 for j in range(5)]} for i in range(32)]

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.tensor([r["index"] for r in rows])}

    step = _DropoutStep(plan)
    optim = OptimConfig(lr=1e-2, per_device_batch_size=4, effective_batch_size=16, max_steps=2, bf16="off")
    result = fit(model, examples, collate, step, optim, stage="test/hook", session=LocalSession())
    return result, step


def test_begin_step_sees_the_gradient_passes_dropout_and_leaves_the_rng_alone():
    """Kills: a planning forward in eval mode or on the training's own RNG stream. `begin_step`
    runs in train mode on a forked RNG: it computes exactly what the gradient passes then compute
    (same dropout masks), and the run is the same as one without the hook."""
    planned, with_hook = _toy_fit(plan=True)
    plain, without = _toy_fit(plan=False)
    assert len(with_hook.planned) == len(with_hook.trained) == 8
    assert all(torch.equal(a, b) for a, b in zip(with_hook.planned, with_hook.trained))
    assert all(torch.equal(a, b) for a, b in zip(with_hook.trained, without.trained))
    assert planned.loss_history == plain.loss_history
