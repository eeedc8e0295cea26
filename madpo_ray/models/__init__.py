"""Tokenizers and models: built from scratch for the offline default, imported from GGUF, or
loaded by HF name or path. Everything saves with `save_pretrained` (safetensors) and reloads with
`from_pretrained` from a local folder, so vLLM, Ray Serve and any HF tool can load what we make.

The public names are re-exported here; each lives in the module of its one concern:
folders (checks before loading), tokenizers, loading (models and the reward head), training
(LoRA set-up and saving what trained), building (the tiny base, GGUF import)."""

from madpo_ray.models.building import build_tiny_base, build_tiny_causal_lm, gguf_flag, import_gguf
from madpo_ray.models.folders import ModelLoadError, check_model_files, check_model_folder, verify_weights
from madpo_ray.models.loading import (count_parameters, load_causal_lm, load_reward_model, mean_over_heads,
                                      per_position_scores, reward_scores, saved_heads, score_head, torch_dtype)
from madpo_ray.models.tokenizers import CHAT_TEMPLATE, ensure_pad_token, load_tokenizer, train_tokenizer
from madpo_ray.models.training import (check_lora_targets, is_adapter_model, prepare_for_training, save_model_atomically,
                                       save_trained, suggested_targets, trainable_parameters)

__all__ = ["CHAT_TEMPLATE", "ModelLoadError", "build_tiny_base", "build_tiny_causal_lm", "check_lora_targets",
           "check_model_files", "check_model_folder", "count_parameters", "ensure_pad_token", "gguf_flag",
           "import_gguf", "is_adapter_model", "load_causal_lm", "load_reward_model", "load_tokenizer",
           "mean_over_heads", "per_position_scores", "prepare_for_training", "reward_scores", "save_model_atomically",
           "save_trained", "saved_heads", "score_head", "suggested_targets", "torch_dtype", "train_tokenizer",
           "trainable_parameters", "verify_weights"]
