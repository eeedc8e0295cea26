"""The shared-prompt pair forward equals the two-sequence forward: log-probs, reward scores, a DPO
and a MADPO step's loss and gradients, for truncated prompts, truncated and uneven responses and a
padded batch. Length-grouped batches cover every example once and agree across worker counts."""

import logging

import pytest
import torch

from madpo_ray.config import LossConfig
from madpo_ray.data.collate import PairCollator, tokenize_pairs
from madpo_ray.data.preference import ValidationReport
from madpo_ray.losses import DataParallel
from madpo_ray.pair_forward import (SharedPairCollator, pair_attention_mask, pair_response_logprobs, pair_rewards,
                                    uses_shared_prompt)


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer, corpus_docs):
    """Prompts cut from the left (max_prompt_length 40 < most documents), responses of different
    lengths, some cut on the right (max_length 70), margins and reference log-probs attached."""
    rows = [{"prompt": d["document"], "chosen": " " + d["reference"],
             "rejected": " " + corpus_docs[(i + 5) % len(corpus_docs)]["reference"] + " and more words" * (i % 4),
             "row_id": i} for i, d in enumerate(corpus_docs[:12])]
    report = ValidationReport(source="t")
    exs = tokenize_pairs(tiny_tokenizer, rows, 40, 70, "truncate", report, False)
    assert report.truncated > 0 and len({len(e["rejected_ids"]) for e in exs}) > 3
    for i, ex in enumerate(exs):
        ex.update(margin=float(i % 5) - 2.0, ref_logp_chosen=-30.0 - i, ref_logp_rejected=-35.0 + i,
                  len_chosen=float(len(ex["chosen_ids"])), len_rejected=float(len(ex["rejected_ids"])))
    return exs


def _both(pairs, pad):
    return PairCollator(pad)(pairs), SharedPairCollator(pad)(pairs)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_logprobs_and_rewards_equal_the_two_sequence_forward(tiny_base_dir, tiny_tokenizer, pairs, attention):
    """Every attention implementation the shared path accepts (eager adds its mask: a boolean one
    would mask nothing)."""
    from madpo_ray.models import load_causal_lm, load_reward_model
    from madpo_ray.pair_forward import MASKABLE_ATTENTION

    assert attention in MASKABLE_ATTENTION
    two, shared = _both(pairs, tiny_tokenizer.pad_token_id)
    assert (shared["attention_mask"].sum(-1) < shared["attention_mask"].shape[1]).any()  # a padded batch
    lm = load_causal_lm(str(tiny_base_dir)).eval()
    torch.manual_seed(0)
    rm = load_reward_model(str(tiny_base_dir), pad_token_id=tiny_tokenizer.pad_token_id).eval()
    for m in (lm, rm):
        m.config._attn_implementation = attention
    with torch.no_grad():
        for a, b in zip(pair_response_logprobs(lm, two), pair_response_logprobs(lm, shared)):
            assert torch.equal(a.n_tokens, b.n_tokens)
            assert torch.allclose(a.summed, b.summed, rtol=1e-5, atol=1e-5)
        for a, b in zip(pair_rewards(rm, two), pair_rewards(rm, shared)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rejected_tokens_never_see_the_chosen_ones(tiny_base_dir, tiny_tokenizer, pairs):
    """Replace every chosen token: the rejected log-probs do not move (the chosen ones do)."""
    from madpo_ray.models import load_causal_lm

    lm = load_causal_lm(str(tiny_base_dir)).eval()
    other = [dict(ex, chosen_ids=[7] * len(ex["chosen_ids"])) for ex in pairs]
    collate = SharedPairCollator(tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        c1, r1 = pair_response_logprobs(lm, collate(pairs))
        c2, r2 = pair_response_logprobs(lm, collate(other))
    assert torch.allclose(r1.summed, r2.summed, atol=1e-5)
    assert not torch.allclose(c1.summed, c2.summed, atol=1e-2)


def test_mask_by_hand():
    m = pair_attention_mask(2, 2, 2, 7).int()  # prompt p0 p1, chosen c0 c1, rejected r0 r1, one pad
    assert m[4].tolist() == [1, 1, 0, 0, 1, 0, 0]  # r0: the prompt and itself
    assert m[5].tolist() == [1, 1, 0, 0, 1, 1, 0]  # r1
    assert m[3].tolist() == [1, 1, 1, 1, 0, 0, 0]  # c1: plain causal
    assert m[6].tolist() == [0, 0, 0, 0, 0, 0, 1]  # padding sees only itself (no empty softmax rows)


@pytest.mark.parametrize("loss", ["dpo", "madpo"])
def test_training_step_gives_the_same_loss_and_gradients(tiny_base_dir, tiny_tokenizer, pairs, loss):
    from madpo_ray.models import load_causal_lm
    from madpo_ray.stages.policy import PolicyStep

    results = []
    for batch in _both(pairs, tiny_tokenizer.pad_token_id):
        model = load_causal_lm(str(tiny_base_dir))
        value, _ = PolicyStep(LossConfig(name=loss), 0, DataParallel())(model, batch)
        value.backward()
        results.append((value.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-5) and torch.allclose(g1, g2, rtol=1e-4, atol=1e-6)


def test_attention_that_cannot_take_a_mask_falls_back_and_says_so(caplog):
    class Config:
        _attn_implementation = "flash_attention_2"

    class Model:
        config = Config()

    caplog.set_level(logging.WARNING)
    assert not uses_shared_prompt(Model(), "shared_prompt") and "two sequences" in caplog.text
    assert not uses_shared_prompt(Model(), "two_sequence")


def test_length_grouped_batches_cover_each_example_once_and_match_across_worker_counts():
    from madpo_ray.engine.batching import LengthGroupedSampler

    lengths = [int(x) for x in torch.randint(10, 200, (103,), generator=torch.Generator().manual_seed(0))]

    def steps(workers, accum, per_device):
        """The example sets of each optimiser step, 1 worker x accum 4 vs 2 workers x accum 2 etc."""
        per_rank = [list(LengthGroupedSampler(lengths, per_device, workers, r, seed=3, accum=accum))
                    for r in range(workers)]
        step = per_device * accum
        return [sorted(i for r in per_rank for i in r[k:k + step]) for k in range(0, len(per_rank[0]), step)]

    one = steps(1, 4, 8)
    assert one == steps(2, 2, 8) == steps(4, 1, 8)  # effective batch 32 three ways
    flat = [i for s in one for i in s]
    assert len(flat) == len(set(flat)) == 96  # 3 whole steps of 32
    micro = list(LengthGroupedSampler(lengths, 8, 1, 0, seed=3))
    spread = [max(lengths[i] for i in micro[k:k + 8]) - min(lengths[i] for i in micro[k:k + 8]) for k in range(0, 96, 8)]
    assert sum(spread) / len(spread) < 40  # random batches of 8 from 10..200 spread ~150
    s = LengthGroupedSampler(lengths, 8, 1, 0, seed=3)
    s.set_epoch(1)
    assert list(s) != micro  # another epoch, another order


def test_too_little_data_for_one_effective_batch_is_a_named_data_error(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "madpo_ray", "sft", f"runs_dir={tmp_path}", "ray.backend=local",
                           "data.num_documents=8", "data.num_validation_documents=4", "data.num_eval_documents=4", "model.hidden_size=32",
                           "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=64",
                           "model.vocab_size=512"], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "sft: 8 examples is less than one effective batch" in out and "Traceback" not in out
