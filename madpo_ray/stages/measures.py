"""What the eval stage and Tune's objectives measure of a policy, defined once so both prompt,
truncate, generate and score alike: implicit margins and preference accuracy on held-out pairs, the reward
model's score of generated text, and the testbed's gold reward of generated summaries."""

from __future__ import annotations

import torch

from madpo_ray.data.collate import SFTCollator, encode_prompt, encode_response
from madpo_ray.data.prompts import generation_prompts
from madpo_ray.data.testbed import document_gold
from madpo_ray.generation import Generator, SampleSpec
from madpo_ray.models import mean_over_heads, reward_scores
from madpo_ray.pair_forward import pair_collator, pair_response_logprobs
from madpo_ray.stages.score import ComputePolicy


@torch.no_grad()
def pair_logprobs(model, rows: list[dict], pad_token_id: int, batch_size: int = 32,
                  policy=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of held-out pairs, computed as scoring computed the references
    (`policy`: the run's ComputePolicy: dtype autocast and pair layout), so h compares like with like."""
    policy = policy or ComputePolicy()
    model.eval()
    chosen, rejected = [], []
    collate = pair_collator(model, pad_token_id, policy.pair_forward)
    for i in range(0, len(rows), batch_size):
        with policy.autocast():
            c, r = pair_response_logprobs(model, collate(rows[i:i + batch_size]))
        chosen.append(c.summed.float())
        rejected.append(r.summed.float())
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def reward_model_scores(reward_model, tokenizer, prompts: list[str], responses: list[str],
                        batch_size: int = 32) -> list[float]:
    """The frozen reward model's score of each (prompt, response), tokenised as in training (an
    ensemble's: the mean of its heads)."""
    collate = SFTCollator(tokenizer.pad_token_id)
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        exs = [{"prompt_ids": encode_prompt(tokenizer, p), "response_ids": encode_response(tokenizer, " " + r.strip())}
               for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        b = collate(exs)
        out += mean_over_heads(reward_scores(reward_model, b["input_ids"], b["attention_mask"])).tolist()
    return out


def greedy_gold_reward(generator: Generator, docs: list[dict], cfg) -> tuple[float, list[str]]:
    """Mean testbed gold reward of greedy summaries of `docs` by the generator's model, and the summaries.

    One definition for the eval stage and the Tune objectives, so both prompt and truncate alike."""
    return mean_gold_reward(generator, docs, cfg, temperature=0.0)


def mean_gold_reward(generator: Generator, docs: list[dict], cfg, temperature: float) -> tuple[float, list[str]]:
    """Mean testbed gold reward of one summary per document at `temperature` (seeded by
    eval.seed above 0), and the summaries."""
    prompts = generation_prompts(cfg.data, generator.tokenizer, [d["document"] for d in docs])
    texts = generator.texts(prompts, temperature, SampleSpec.from_config(cfg), seed=cfg.eval.seed)
    golds = [document_gold(t, d) for t, d in zip(texts, docs)]
    return sum(golds) / len(golds), texts


def gold_reward_by_temperature(generator: Generator, docs: list[dict], cfg) -> dict[str, float]:
    """Mean gold reward at each of eval.temperatures (`gold_reward_t<T>`), their mean
    (`gold_reward_temperatures`) and their lowest (`gold_reward_worst_temperature`): Tune objectives
    for a policy that must hold up sampled as well as greedy, as `madpo compare` judges it at every
    temperature (one summary per document and temperature here)."""
    out = {f"gold_reward_t{t:g}": mean_gold_reward(generator, docs, cfg, t)[0] for t in cfg.eval.temperatures}
    by_temperature = list(out.values())
    out["gold_reward_temperatures"] = sum(by_temperature) / len(by_temperature)
    out["gold_reward_worst_temperature"] = min(by_temperature)
    return out


def mean_reward_model_score(generator: Generator, reward_model, prompts: list[str], cfg) -> float:
    """The frozen reward model's mean score of the generator's greedy answers to `prompts`."""
    texts = generator.texts(prompts, 0.0, SampleSpec.from_config(cfg))
    scores = reward_model_scores(reward_model, generator.tokenizer, prompts, texts)
    return sum(scores) / len(scores)


def preference_metrics(rows: list[dict], pol_c: torch.Tensor, pol_r: torch.Tensor) -> dict:
    ref_c = torch.tensor([r["ref_logp_chosen"] for r in rows])
    ref_r = torch.tensor([r["ref_logp_rejected"] for r in rows])
    h = (pol_c - ref_c) - (pol_r - ref_r)
    out = {
        # Does the model's likelihood rank the labelled-chosen response higher? (comparable for SFT and policy)
        "sft_preference_accuracy": float((ref_c > ref_r).float().mean()),
        "policy_preference_accuracy": float((pol_c > pol_r).float().mean()),
        # DPO's implicit reward: beta * h; accuracy = share of pairs with h > 0.
        "policy_implicit_reward_accuracy": float((h > 0).float().mean()),
        "policy_implicit_margin_mean": float(h.mean()),
    }
    if rows and "true_margin" in rows[0]:
        gold = torch.tensor([r["true_margin"] > 0 for r in rows])
        out["sft_gold_preference_accuracy"] = float(((ref_c > ref_r) == gold).float().mean())
        out["policy_gold_preference_accuracy"] = float(((pol_c > pol_r) == gold).float().mean())
    return out
