"""Base models this project makes itself: the tiny from-scratch Llama of the offline default,
and a GGUF checkpoint imported as a normal HF folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch

from madpo_ray.config import ModelConfig
from madpo_ray.io import check_output_folder
from madpo_ray.models.folders import ModelLoadError
from madpo_ray.models.loading import count_parameters
from madpo_ray.models.tokenizers import ensure_pad_token, train_tokenizer
from madpo_ray.models.training import save_model_atomically

log = logging.getLogger(__name__)


def build_tiny_causal_lm(tokenizer, cfg: ModelConfig, seed: int = 0):
    """A small Llama; with `sliding_window`, the same shape as a Mistral (every layer windowed),
    so the windowed attention path runs end to end without a download."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    shape = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if cfg.sliding_window:
        return MistralForCausalLM(MistralConfig(sliding_window=cfg.sliding_window, **shape))
    return LlamaForCausalLM(LlamaConfig(**shape))


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


def gguf_flag(gguf_path: Path, key: str) -> bool:
    """A boolean metadata field of a GGUF file (False when absent)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get(key)
    return bool(field is not None and field.data and field.parts[field.data[0]][0])


def import_gguf(gguf_path: Path, out_dir: Path, force: bool = False) -> dict:
    """A GGUF checkpoint (e.g. a llama.cpp quantisation) as a normal HF folder: tokenizer with its
    chat template, and the dequantised weights in float32 safetensors.

    transformers dequantises GGUF on load, but flags the model as GGUF-quantised and will not
    save it; a fresh model of the same config without the quantisation flag takes the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"{gguf_path}: no such GGUF file")
    check_output_folder(out_dir, force)  # before the minutes of dequantising, not after
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
    except ImportError as e:
        raise ModelLoadError(f"reading GGUF needs the `gguf` package: pip install 'madpo-ray[gguf]' ({e})") from e
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read {gguf_path} as a GGUF causal LM: {e}") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError as e:
        raise ModelLoadError(f"{gguf_path}: weights do not fit a {config.model_type} of this config: {e}") from e
    ensure_pad_token(tokenizer)
    if gguf_flag(gguf_path, "tokenizer.ggml.add_bos_token") and not getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = True  # transformers drops the flag; Gemma without <bos> writes gibberish
    save_model_atomically(model, tokenizer, Path(out_dir), meta={"source": str(gguf_path), "format": "gguf"},
                          marker="madpo model import-gguf")
    return {"parameters": count_parameters(model), "architecture": config.model_type,
            "vocab_size": len(tokenizer), "chat_template": bool(getattr(tokenizer, "chat_template", None))}
