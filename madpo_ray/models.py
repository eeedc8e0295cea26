"""Tokenizer and models: built from scratch for the offline default, or loaded by HF name/path.

Everything saves with `save_pretrained` (safetensors) and reloads with `from_pretrained`
from a local folder, so vLLM, Ray Serve and any HF tool can load our artifacts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional

import torch

from madpo_ray.config import ModelConfig

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# A minimal chat template so conversational datasets work with the tiny tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ModelLoadError(RuntimeError):
    """A model or tokenizer folder that cannot be loaded (missing weights, bad config)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Byte-level BPE trained on the corpus in seconds; wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def ensure_pad_token(tokenizer) -> None:
    """Many hub tokenizers have no pad token; reuse EOS, as TRL does."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def build_tiny_causal_lm(tokenizer, cfg: ModelConfig, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def check_model_folder(path: str) -> None:
    """Fail in the driver, with the folder named, before a Ray job would fail in a worker."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: model folder does not exist")
    check_model_files(path)


def check_model_files(path: str) -> None:
    """A local folder (hub names pass) must hold config.json and weights."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p}: no config.json; not a saved model folder")
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")) and not any(p.glob("*.gguf")):
            raise ModelLoadError(f"{p}: no weights (*.safetensors / *.bin) in the folder")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    ensure_pad_token(tok)
    return tok


def load_causal_lm(name_or_path: str, dtype: str = "float32"):
    """Any HF causal LM by hub name (needs a network) or local folder."""
    from transformers import AutoModelForCausalLM

    check_model_files(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_dtype(dtype))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load causal LM from {name_or_path!r}: {e}") from e


def load_reward_model(name_or_path: str, dtype: str = "float32", pad_token_id: Optional[int] = None):
    """A one-label AutoModelForSequenceClassification. From an LM folder the score head is new."""
    from transformers import AutoModelForSequenceClassification

    check_model_files(name_or_path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, dtype=_dtype(dtype))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load reward model from {name_or_path!r}: {e}") from e
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # the head scores the last non-pad token
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per sequence, from the last real token's hidden state (right padding)."""
    from madpo_ray.logprobs import position_ids_from_mask

    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask))
    return out.logits.squeeze(-1).float()


def build_tiny_base(texts: Iterable[str], cfg: ModelConfig, out_dir: Path, seed: int = 0) -> Path:
    """Train the tokenizer and build the from-scratch base LM into one HF folder."""
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    model = build_tiny_causal_lm(tokenizer, cfg, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    log.info("built tiny base model: %d parameters, vocab %d -> %s", count_parameters(model), len(tokenizer), out_dir)
    return out_dir


def save_model_atomically(model, tokenizer, out_dir: Path, meta: Optional[dict] = None) -> None:
    """save_pretrained into a temp sibling, then rename: a crash never leaves a half model folder.

    `meta` goes to madpo.json (e.g. the prompt template, so a server formats prompts as in training).
    """
    import json
    import os
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if meta:
        (tmp / "madpo.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
