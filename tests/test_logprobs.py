"""The shared log-prob implementation against a brute-force token-by-token loop."""

import torch

from madpo_ray.data.collate import PairCollator, encode_prompt, encode_response
from madpo_ray.logprobs import sequence_logprobs


def brute_force_logprob(model, prompt_ids, response_ids):
    """Sum over response tokens of log p(token | all previous tokens), one unpadded forward each."""
    total = 0.0
    ids = list(prompt_ids)
    with torch.no_grad():
        for tok in response_ids:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            total += torch.log_softmax(logits.double(), -1)[tok].item()
            ids.append(tok)
    return total


def _examples(tok):
    rows = [("Zorblex is a Rust library.\nTL;DR:", " Rust library"),
            ("A much longer document about a Go daemon that monitors disk usage and more.\nTL;DR:",
             " Go daemon for monitoring disk usage")]
    return [(encode_prompt(tok, p), encode_response(tok, r)) for p, r in rows]


def test_right_padding_matches_brute_force(tiny_model, tiny_tokenizer):
    exs = _examples(tiny_tokenizer)
    batch = PairCollator(tiny_tokenizer.pad_token_id)(
        [{"prompt_ids": p, "chosen_ids": r, "rejected_ids": r[:-1] + [r[0]]} for p, r in exs])
    with torch.no_grad():
        out = sequence_logprobs(tiny_model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    assert out.summed.shape == (4,)
    for i, (p, r) in enumerate(exs):
        assert abs(out.summed[i].item() - brute_force_logprob(tiny_model, p, r)) < 1e-4
        assert out.n_tokens[i].item() == len(r)
        assert abs(out.mean[i].item() - out.summed[i].item() / len(r)) < 1e-6


def test_left_padding_matches_brute_force(tiny_model, tiny_tokenizer):
    exs = _examples(tiny_tokenizer)
    seqs = [p + r for p, r in exs]
    width = max(map(len, seqs))
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    resp = torch.tensor([[0] * (width - len(s)) + [0] * len(p) + [1] * len(r) for s, (p, r) in zip(seqs, exs)])
    with torch.no_grad():
        out = sequence_logprobs(tiny_model, ids, attn, resp)
    for i, (p, r) in enumerate(exs):
        assert abs(out.summed[i].item() - brute_force_logprob(tiny_model, p, r)) < 1e-4
