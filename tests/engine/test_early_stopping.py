"""Early stopping in the shared training loop (the reward-model recipe: held-out loss every N
updates, patience 3, best checkpoint kept): the patience counter on scripted values, the loop
stopping and handing back the best evaluation's weights, resume, and the reward stage's
Bradley-Terry validation on a tiny model that overfits."""

import math

import pytest
import torch

from madpo_ray.engine.early_stopping import EarlyStopping

from helpers import TINY_SETS


# ----------------------------------------------------------------------------- the counter
def test_patience_counts_evaluations_in_a_row_without_improvement():
    stopper = EarlyStopping(patience=3)
    script = [(5.0, True, False), (4.0, True, False), (4.5, False, False), (4.2, False, False),
              (3.9, True, False),  # an improvement resets the count
              (3.9, False, False),  # equal is not better
              (float("nan"), False, False), (4.1, False, True)]
    for step, (value, improved, stop) in enumerate(script, start=1):
        assert stopper.update(value, step) == (improved, stop), (step, value)
    assert (stopper.best, stopper.best_step, stopper.stopped) == (3.9, 5, True)


def test_a_nan_first_value_is_not_a_best_and_state_round_trips():
    stopper = EarlyStopping(patience=2)
    assert stopper.update(float("nan"), 1) == (False, False) and stopper.best is None
    assert stopper.update(2.0, 2) == (True, False)
    stopper.weights = {"w": torch.ones(2)}
    stopper.history = [{"step": 2, "eval_loss": 2.0}]
    again = EarlyStopping(patience=2)
    again.load_state_dict(stopper.state_dict())
    assert again.state_dict()["best"] == 2.0 and again.best_step == 2 and again.bad == 0
    assert torch.equal(again.weights["w"], torch.ones(2)) and again.history == stopper.history


# ----------------------------------------------------------------------------- the loop
def _pairs(tok, docs, start, n, flip=False):
    from madpo_ray.data.collate import tokenize_pairs
    from madpo_ray.data.preference import ValidationReport

    rows = [{"prompt": d["document"][:100] + "\nTL;DR:", "chosen": " " + d["reference"],
             "rejected": " " + docs[(start + i + 7) % len(docs)]["reference"], "row_id": start + i}
            for i, d in enumerate(docs[start:start + n])]
    exs = tokenize_pairs(tok, rows, 40, 64, "truncate", ValidationReport(source="t"), False)
    keys = ("prompt_ids", "rejected_ids", "chosen_ids") if flip else ("prompt_ids", "chosen_ids", "rejected_ids")
    return [{"prompt_ids": ex[keys[0]], "chosen_ids": ex[keys[1]], "rejected_ids": ex[keys[2]]} for ex in exs]


class StepSession:
    """A LocalSession that remembers the last optimiser step (a scripted validation reads it) and
    can fail once after a given step, as a killed worker would."""

    @staticmethod
    def make(root=None, fail_after=None):
        from madpo_ray.engine.sessions import LocalSession

        class Session(LocalSession):
            step = 0

            def after_step(self, step, batches=()):
                self.step = step
                if fail_after is not None and step == fail_after:
                    raise KeyboardInterrupt("interrupted")

        return Session({}, checkpoint_root=root, keep=100)


def _fit(model_dir, pad_id, examples, session, validate, **optim):
    from madpo_ray.config import OptimConfig
    from madpo_ray.engine.loop import fit
    from madpo_ray.models import load_reward_model
    from madpo_ray.pair_forward import pair_collator
    from madpo_ray.stages.reward import reward_step

    torch.manual_seed(0)
    model = load_reward_model(str(model_dir), pad_token_id=pad_id)
    settings = dict(lr=1e-3, warmup_ratio=0.0, per_device_batch_size=4, effective_batch_size=4, epochs=50,
                    eval_every=2, patience=3, checkpoint_every=2, report_every=2, bf16="off")
    settings.update(optim)
    return fit(model, examples, pair_collator(model, pad_id, "shared_prompt"), reward_step, OptimConfig(**settings),
               stage="test/early", session=session, validate=validate)


def _checkpoint_model(root, step):
    from madpo_ray.engine.checkpoints import read_checkpoint

    return read_checkpoint(root / f"checkpoint_{step:06d}")["model"]


SCRIPT = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.1, 10: 2.2, 12: 1.0}  # best at 4; the third miss in a row at 10


def test_loop_stops_after_patience_and_returns_the_best_evaluations_weights(tiny_base_dir, tiny_tokenizer,
                                                                            corpus_docs, tmp_path):
    """Scripted held-out losses by step: evaluated every 2 steps, stopped at step 10 (not 12),
    and the model handed back is the step-4 checkpoint's, not the last one's."""
    pairs = _pairs(tiny_tokenizer, corpus_docs, 0, 16)
    session = StepSession.make(tmp_path)
    result = _fit(tiny_base_dir, tiny_tokenizer.pad_token_id, pairs, session,
                  lambda model: {"eval_loss": SCRIPT[session.step], "eval_accuracy": 0.5})
    m = result.metrics
    assert result.steps == 10 and m["stopped_early"] is True
    assert (m["best_step"], m["best_eval_loss"]) == (4, 2.0)
    assert [(h["step"], h["eval_loss"]) for h in m["eval_history"]] == [(s, SCRIPT[s]) for s in (2, 4, 6, 8, 10)]
    assert m["eval_loss"] == 2.2 and session.reports[-1]["step"] == 10  # the stop step is reported
    best, last = _checkpoint_model(tmp_path, 4), _checkpoint_model(tmp_path, 10)
    state = result.model.state_dict()
    assert all(torch.equal(state[k], best[k]) for k in best)
    assert any(not torch.equal(best[k], last[k]) for k in best)  # training did move on after step 4


def test_without_eval_every_there_is_no_evaluation(tiny_base_dir, tiny_tokenizer, corpus_docs):
    def never(model):
        raise AssertionError("validate must not run without optim.eval_every")

    result = _fit(tiny_base_dir, tiny_tokenizer.pad_token_id, _pairs(tiny_tokenizer, corpus_docs, 0, 8),
                  StepSession.make(), never, eval_every=None, max_steps=3)
    assert result.steps == 3 and "best_step" not in result.metrics


def test_interrupted_run_resumes_with_its_patience_and_best_weights(tiny_base_dir, tiny_tokenizer, corpus_docs,
                                                                    tmp_path):
    """Interrupted after step 7 (checkpoint at 6, best at 4): the resumed run keeps counting from
    the checkpoint's patience, stops at 10 like the uninterrupted run and restores the step-4
    weights kept in the checkpoint."""
    pairs, pad = _pairs(tiny_tokenizer, corpus_docs, 0, 16), tiny_tokenizer.pad_token_id
    straight_session = StepSession.make()
    straight = _fit(tiny_base_dir, pad, pairs, straight_session,
                    lambda model: {"eval_loss": SCRIPT[straight_session.step]})
    root = tmp_path / "ckpt"
    killed = StepSession.make(root, fail_after=7)
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_base_dir, pad, pairs, killed, lambda model: {"eval_loss": SCRIPT[killed.step]})
    again = StepSession.make(root)
    resumed = _fit(tiny_base_dir, pad, pairs, again, lambda model: {"eval_loss": SCRIPT[again.step]})
    assert resumed.steps == straight.steps == 10 and resumed.metrics["stopped_early"]
    assert resumed.metrics["eval_history"] == straight.metrics["eval_history"]
    assert resumed.loss_history == pytest.approx(straight.loss_history, rel=1e-6)
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)
    # A run resumed from the stop step's checkpoint trains no further and hands back the same.
    done = _fit(tiny_base_dir, pad, pairs, StepSession.make(root), lambda model: {"eval_loss": 0.0})
    assert done.steps == 10 and done.metrics["best_step"] == 4
    assert all(torch.allclose(done.model.state_dict()[k], b[k], rtol=1e-6, atol=1e-7) for k in b)


# ----------------------------------------------------------------------------- the reward stage
def test_reward_stage_stops_when_the_held_out_loss_rises_and_keeps_the_best(tiny_base_dir, tiny_tokenizer,
                                                                            corpus_docs, tmp_path):
    """A validation split whose labels are the training pairs' reversed: the more the reward
    model fits its training pairs, the higher the held-out Bradley-Terry loss. Training stops
    after `patience` worse evaluations and the model handed back scores the validation split
    exactly as the best evaluation recorded (and as that step's checkpoint)."""
    from madpo_ray.config import load_config
    from madpo_ray.engine.sessions import LocalSession, WorkerInfo
    from madpo_ray.pair_forward import pair_collator
    from madpo_ray.stages.reward import reward_validator, train_reward

    train = _pairs(tiny_tokenizer, corpus_docs, 0, 16)
    validation = _pairs(tiny_tokenizer, corpus_docs, 0, 8, flip=True)
    cfg = load_config("tiny", TINY_SETS + [
        "reward.optim.lr=3e-3", "reward.optim.epochs=30", "reward.optim.per_device_batch_size=8",
        "reward.optim.effective_batch_size=8", "reward.optim.eval_every=2", "reward.optim.patience=2",
        "reward.optim.checkpoint_every=2", "reward.optim.warmup_ratio=0"])
    root = tmp_path / "ckpt"
    session = LocalSession({"train": train, "validation": validation}, checkpoint_root=str(root), keep=100)
    result = train_reward(cfg, session, model_dir=str(tiny_base_dir))
    m = result.metrics
    history = [h["eval_loss"] for h in m["eval_history"]]
    assert m["stopped_early"] and result.steps < 30 * 2 and len(history) == result.steps // 2
    assert m["best_eval_loss"] == min(history) and history[-1] > m["best_eval_loss"]
    assert all(math.isfinite(h) and 0 <= e["eval_accuracy"] <= 1 for h, e in zip(history, m["eval_history"]))
    model = result.model.eval()
    collate = pair_collator(model, tiny_tokenizer.pad_token_id, cfg.model.pair_forward)
    with torch.no_grad():
        again = reward_validator(validation, collate, 8, WorkerInfo())(model)
    assert again["eval_loss"] == pytest.approx(m["best_eval_loss"], rel=1e-5)
    best = _checkpoint_model(root, m["best_step"])
    assert all(torch.equal(result.model.state_dict()[k], best[k]) for k in best)


def test_workers_score_disjoint_shares_of_the_validation_split_in_as_many_forwards(tiny_base_dir, tiny_tokenizer,
                                                                                 corpus_docs):
    """9 held-out pairs, batches of 4, 2 workers: rank 0 scores pairs 0, 2, ..., 8 (2 batches),
    rank 1 the other 4 (1 batch, then one it does not count, so both run 2 forwards, as a sharded
    model's gathers need). Their counts and sums add up to the one-worker figures, which equal a
    hand computation of the Bradley-Terry loss from single-pair forwards."""
    from madpo_ray.engine.sessions import WorkerInfo
    from madpo_ray.models import load_reward_model
    from madpo_ray.pair_forward import pair_collator, pair_rewards
    from madpo_ray.stages.reward import reward_validator

    pad = tiny_tokenizer.pad_token_id
    validation = _pairs(tiny_tokenizer, corpus_docs, 0, 9)
    torch.manual_seed(0)
    model = load_reward_model(str(tiny_base_dir), pad_token_id=pad).eval()
    collate = pair_collator(model, pad, "shared_prompt")
    forwards = []
    model.register_forward_hook(lambda module, args, out: forwards.append(1))
    with torch.no_grad():
        one = reward_validator(validation, collate, 4, WorkerInfo())(model)
        assert len(forwards) == 3
        halves = []
        for rank in (0, 1):
            forwards.clear()
            halves.append(reward_validator(validation, collate, 4, WorkerInfo(rank, 2))(model))
            assert len(forwards) == 2, rank
        singles = [pair_rewards(model, collate([pair])) for pair in validation]
    hand = [-math.log(1 / (1 + math.exp(-(float(c) - float(r))))) for c, r in singles]
    assert one["eval_loss"] == pytest.approx(sum(hand) / 9, rel=1e-5)
    assert one["eval_accuracy"] == sum(float(c) > float(r) for c, r in singles) / 9
    for key in ("eval_loss", "eval_accuracy"):
        assert (5 * halves[0][key] + 4 * halves[1][key]) / 9 == pytest.approx(one[key], rel=1e-6)
    assert halves[0]["eval_loss"] == pytest.approx(sum(hand[0::2]) / 5, rel=1e-5)


def test_sessions_name_a_missing_split_and_offer_it_as_optional():
    from madpo_ray.engine.faults import FaultInjectingSession
    from madpo_ray.engine.sessions import LocalSession, MissingSplit

    session = LocalSession({"train": [{"a": 1}]})
    with pytest.raises(MissingSplit, match=r"'validation'.*\['train'\]"):
        session.examples("validation")
    assert session.optional_examples("validation") is None
    assert FaultInjectingSession(session).optional_examples("train") == [{"a": 1}]
