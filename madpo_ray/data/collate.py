"""Tokenisation, truncation, padding and response masks.

Truncation policy (the same for SFT, reward, scoring and policy training):
1. The prompt keeps its *last* `max_prompt_length` tokens (left truncation: the end of
   the prompt, e.g. "TL;DR:", is what the response follows).
2. Each response gets EOS appended and keeps its *first* `max_length - len(prompt)`
   tokens (right truncation).
3. With `overlong="skip"` a row needing either cut is skipped instead, and reported.
4. A pair whose chosen and rejected token sequences are identical after truncation is
   skipped and reported (it carries no preference signal).

Sequences are right-padded; `response_mask` marks response tokens (EOS included), so
log-probs and rewards never read the prompt or the padding.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from madpo_ray.data.chat import render_chat
from madpo_ray.data.preference import ValidationReport, is_messages
from madpo_ray.data.scored import OPTIONAL_POLICY_COLUMNS, POLICY_VALUE_COLUMNS

# Per-pair numbers a batch carries as float tensors: what policy training reads, and testbed scores.
FLOAT_COLUMNS = POLICY_VALUE_COLUMNS + OPTIONAL_POLICY_COLUMNS + ("gold_chosen", "gold_rejected", "true_margin")


def prompt_text(tokenizer, prompt: Any) -> str:
    """A prompt as text. Messages are rendered with the chat template into a text that remembers
    which parts are message content, so encode_prompt splits special-token strings only there
    (the template's own markup stays special)."""
    if is_messages(prompt):
        return render_chat(tokenizer, prompt)
    return prompt


def response_text(response: Any) -> str:
    if is_messages(response):
        return "".join(m["content"] for m in response if m.get("role") == "assistant") or \
            "".join(m["content"] for m in response)
    return response


def left_pad(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left, so every row's next token is at
    the last column: what batched `generate` needs (evaluation and the serving engine alike)."""
    width = max(map(len, sequences))
    input_ids = torch.tensor([[pad_token_id] * (width - len(x)) + list(x) for x in sequences])
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in sequences])
    return input_ids, attention_mask


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Text to ids with special-token strings split: a document or user message that contains
    "<|eos|>" is text, not an end marker (the same rule in training and serving). A rendered chat
    that carries `segments` ([(text, is_user_content)], madpo_ray.serving.engine.render_chat)
    keeps its template's own special tokens and splits only the messages' content."""
    segments = getattr(text, "segments", None) or [(text, True)]
    ids = [i for part, user in segments if part
           for i in tokenizer(part, add_special_tokens=False, split_special_tokens=user)["input_ids"]]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_response(tokenizer, text: str) -> list[int]:
    """The response's own text never ends it early: only the appended EOS id is the end marker."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]


def truncate(prompt_ids: list[int], responses: Sequence[list[int]], max_prompt_length: int,
             max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Apply steps 1-2 of the policy; also say whether anything was cut."""
    cut = len(prompt_ids) > max_prompt_length
    prompt_ids = prompt_ids[-max_prompt_length:]
    budget = max_length - len(prompt_ids)
    out = []
    for r in responses:
        cut = cut or len(r) > budget
        out.append(r[:budget])
    return prompt_ids, out, cut


def tokenize_pairs(tokenizer, rows: Sequence[dict], max_prompt_length: int, max_length: int,
                   overlong: str = "truncate", report: Optional[ValidationReport] = None,
                   strict: bool = False) -> list[dict]:
    """Token ids per pair, plus every float column present (margins, reference log-probs...)."""
    report = report or ValidationReport(source="tokenize")
    out = []
    for i, row in enumerate(rows):
        row_id = row.get("row_id", i)
        p = encode_prompt(tokenizer, prompt_text(tokenizer, row["prompt"]))
        c = encode_response(tokenizer, response_text(row["chosen"]))
        r = encode_response(tokenizer, response_text(row["rejected"]))
        p2, (c2, r2), cut = truncate(p, (c, r), max_prompt_length, max_length)
        if cut and overlong == "skip":
            report.add(row_id, "prompt" if len(p) > max_prompt_length else "chosen",
                       f"over-long: prompt {len(p)} + responses {len(c)}/{len(r)} tokens exceed "
                       f"max_prompt_length={max_prompt_length}/max_length={max_length}", strict)
            continue
        if c2 == r2:
            report.add(row_id, "rejected", "over-long: identical to chosen after truncation", strict)
            continue
        ex = {"row_id": row_id, "prompt_ids": p2, "chosen_ids": c2, "rejected_ids": r2}
        report.truncated += int(cut)
        for col in FLOAT_COLUMNS:
            if row.get(col) is not None:
                ex[col] = float(row[col])
        out.append(ex)
    report.total += len(rows)
    report.kept += len(out)
    return out


def tokenize_sft(tokenizer, rows: Sequence[dict], max_prompt_length: int, max_length: int) -> list[dict]:
    """(prompt, response) rows for supervised fine-tuning, same truncation policy."""
    out = []
    for row in rows:
        p = encode_prompt(tokenizer, prompt_text(tokenizer, row["prompt"]))
        resp = encode_response(tokenizer, response_text(row["response"]))
        p2, (r2,), _ = truncate(p, (resp,), max_prompt_length, max_length)
        out.append({"prompt_ids": p2, "response_ids": r2})
    return out


def _pad(seqs: Sequence[list[int]], masks: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        resp[i, :len(s)] = torch.tensor(m)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


class PairCollator:
    """Stacks chosen then rejected sequences of B pairs into one [2B, T] batch (one forward pass)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                seqs.append(ex["prompt_ids"] + ex[key])
                masks.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[key]))
        batch = _pad(seqs, masks, self.pad_token_id)
        for col in FLOAT_COLUMNS:
            if all(col in ex for ex in examples):
                batch[col] = torch.tensor([ex[col] for ex in examples], dtype=torch.float32)
        batch["index"] = torch.tensor([ex.get("index", -1) for ex in examples], dtype=torch.long)
        return batch


class SFTCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        seqs = [ex["prompt_ids"] + ex["response_ids"] for ex in examples]
        masks = [[0] * len(ex["prompt_ids"]) + [1] * len(ex["response_ids"]) for ex in examples]
        return _pad(seqs, masks, self.pad_token_id)
