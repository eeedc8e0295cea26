"""Tiny models build from scratch, save as safetensors and reload through the HF loading paths."""

import pytest
import torch

from madpo_ray.models import (ModelLoadError, count_parameters, load_causal_lm, load_reward_model,
                              load_tokenizer, reward_scores)


def test_tiny_base_reloads_with_auto_classes(tiny_base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert any(tiny_base_dir.glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(str(tiny_base_dir))  # same call as a hub name
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir))
    assert tok.pad_token_id != tok.eos_token_id
    assert count_parameters(model) < 100_000
    ids = tok("Rust library for parsing", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "Rust library for parsing"


def test_reward_model_from_lm_folder_scores_last_real_token(tiny_base_dir, tiny_tokenizer, tmp_path):
    rm = load_reward_model(str(tiny_base_dir), pad_token_id=tiny_tokenizer.pad_token_id).eval()
    assert rm.config.num_labels == 1
    ids = tiny_tokenizer(["Rust library", "Go"], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = reward_scores(rm, ids["input_ids"], ids["attention_mask"])
        single = reward_scores(rm, ids["input_ids"][1:, :int(ids["attention_mask"][1].sum())],
                               ids["attention_mask"][1:, :int(ids["attention_mask"][1].sum())])
    assert padded.shape == (2,)
    assert padded[1].item() == pytest.approx(single[0].item(), abs=1e-5)  # padding does not change the score
    rm.save_pretrained(tmp_path / "rm")
    again = load_reward_model(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        assert torch.allclose(reward_scores(again, ids["input_ids"], ids["attention_mask"]), padded, atol=1e-6)


def test_missing_weights_fail_clearly(tiny_base_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_base_dir, broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_causal_lm(str(broken))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_reward_model(str(tmp_path))
    assert load_tokenizer(str(tiny_base_dir)).pad_token is not None
