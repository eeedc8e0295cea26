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
from madpo_ray.io import atomic_folder, check_output_folder, mark_output_folder

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
        from madpo_ray.artifacts import verify_weights

        verify_weights(p)  # a truncated or corrupt file is one clear line, not a library traceback


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


def score_head(model) -> torch.nn.Module:
    """The linear head of a sequence-classification model (`score` in Llama, Qwen, Mistral...;
    with LoRA, peft's wrapper around it)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "score":
            return module
    raise ModelLoadError(f"{type(model).__name__} has no `score` head; not a reward model this project can read")


def per_position_scores(model, **inputs) -> torch.Tensor:
    """[B, L] head outputs at every position, before the model pools them at one token: what
    scoring several responses packed into one sequence needs."""
    captured: dict = {}
    handle = score_head(model).register_forward_hook(lambda module, args, out: captured.update(scores=out))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured["scores"].squeeze(-1).float()


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per sequence, from the last real token's hidden state (right padding). The
    last token is found from the attention mask, so a tokenizer whose pad token is its EOS
    (SmolLM2, Qwen) still scores the response's final token."""
    from madpo_ray.logprobs import position_ids_from_mask

    scores = per_position_scores(model, input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids_from_mask(attention_mask))
    last = attention_mask.long().sum(-1) - 1
    return scores[torch.arange(scores.shape[0], device=scores.device), last]


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


def save_model_atomically(model, tokenizer, out_dir: Path, meta: Optional[dict] = None,
                          marker: Optional[str] = None) -> None:
    """save_pretrained into a temp sibling, then rename: a crash never leaves a half model folder.

    `meta` goes to madpo.json (e.g. the prompt template, so a server formats prompts as in training).
    `marker` (a command's name) signs a folder the user named as that command's output (io.OUTPUT_MARKER).
    """
    import json

    with atomic_folder(Path(out_dir)) as tmp:  # fsynced; a reader sees the old model or the new, never half
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if meta:
            (tmp / "madpo.json").write_text(json.dumps(meta, indent=2))
        if marker:
            mark_output_folder(tmp, marker)


# --------------------------------------------------------------------------- training setup
def prepare_for_training(model, cfg: ModelConfig, task: str = "causal"):
    """Gradient checkpointing and LoRA as configured. task: "causal" (SFT, policy) or "reward"
    (the linear score head then trains in full beside the adapters)."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is None:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    check_lora_targets(model, cfg.lora.target_modules)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules),
                      task_type=TaskType.SEQ_CLS if task == "reward" else TaskType.CAUSAL_LM,
                      modules_to_save=["score"] if task == "reward" else None)
    model = get_peft_model(model, lora)
    trainable, total = trainable_parameters(model)
    log.info("LoRA r=%d on %s: %d of %d parameters trainable (%.2f%%)", cfg.lora.r, ",".join(cfg.lora.target_modules),
             trainable, total, 100.0 * trainable / total)
    return model


def check_lora_targets(model, targets: list[str]) -> None:
    """Every LoRA target names linear layers of this model, or an error that lists the names it has.
    The default (q/k/v/o_proj) fits Llama, Qwen, Mistral and Gemma; GPT-2, GPT-NeoX and Phi-3 fuse
    or rename the projections, and peft's own error would not say what to set instead."""
    linear = sorted({name.split(".")[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"} - {"score", "lm_head"})
    missing = [t for t in targets if t not in linear]
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ModelLoadError(f"LoRA target modules {missing} are not layers of this {model_type} model; its linear "
                             f"layers are named {linear}: set model.lora.target_modules to some of them "
                             f"(the attention projections, e.g. {suggested_targets(linear)})")


def suggested_targets(linear: list[str]) -> list[str]:
    """The attention projections among a model's linear layer names (the usual LoRA targets)."""
    attention = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "dense",
                 "Wqkv", "out_proj", "query", "key", "value"}
    return [n for n in linear if n in attention] or linear[:2]


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def is_adapter_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def save_trained(model, tokenizer, model_dir: Path, adapter_dir: Optional[Path], meta: Optional[dict] = None) -> None:
    """A normal HF folder every later stage, `madpo eval` and `madpo serve` can load; with LoRA,
    the adapter is saved beside it first and the folder holds the merged weights."""
    if is_adapter_model(model):
        if adapter_dir is not None:
            model.save_pretrained(str(adapter_dir))
        model = model.merge_and_unload()  # note: merges into `model` itself; the caller's handle is merged too
    elif adapter_dir is not None and Path(adapter_dir).exists():
        import shutil

        shutil.rmtree(adapter_dir)  # an adapter from an earlier LoRA run would not belong to these weights
    save_model_atomically(model, tokenizer, model_dir, meta)


# --------------------------------------------------------------------------- GGUF
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
