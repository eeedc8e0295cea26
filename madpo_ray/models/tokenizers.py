"""Tokenizers: the byte-level BPE the offline default trains in seconds, or any HF tokenizer,
always with a pad token."""

from __future__ import annotations

from typing import Iterable


PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"

# A minimal chat template so conversational datasets work with the tiny tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


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


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    ensure_pad_token(tok)
    return tok
