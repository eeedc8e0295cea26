"""The architecture matrix: tiny random models of every family users bring (Llama, Qwen2 with and
without a sliding window, Qwen3, Mistral, Gemma-2, Gemma-3, Phi-3, GPT-NeoX, GPT-2). For each,
the shared-prompt pair forward equals two separate sequences (log-probs and reward scores), LoRA's
default targets resolve or the error names the layers to set, the reward head reads the last real
token, and a policy step saves a folder that reloads. Sequences are longer than the 8-token
windows, and each windowed case is checked to fail with the window left out of the mask."""

import logging
import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

import madpo_ray.pair_forward as PF
from madpo_ray.config import LoraConfig, ModelConfig
from madpo_ray.data.collate import PairCollator
from madpo_ray.losses import PolicyLossInputs, get_policy_loss
from madpo_ray.models import (ModelLoadError, load_causal_lm, prepare_for_training, reward_scores,
                              save_model_atomically)

VOCAB, WINDOW = 96, 8
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=4, max_position_embeddings=128, pad_token_id=0)
FAMILIES = {  # name: (model_type, config kwargs, windowed, default LoRA targets fit)
    "llama": ("llama", DECODER, False, True),
    "qwen2": ("qwen2", DECODER, False, True),
    "qwen2_window": ("qwen2", {**DECODER, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
                     True, True),
    "qwen3": ("qwen3", {**DECODER, "head_dim": 8}, False, True),
    "mistral": ("mistral", {**DECODER, "sliding_window": WINDOW}, True, True),
    "gemma2": ("gemma2", {**DECODER, "sliding_window": WINDOW, "head_dim": 8}, True, True),
    "gemma3": ("gemma3_text", {**DECODER, "sliding_window": WINDOW, "head_dim": 8, "sliding_window_pattern": 2},
               True, True),
    "phi3": ("phi3", {**DECODER, "sliding_window": WINDOW, "bos_token_id": 1, "eos_token_id": 2}, True, False),
    "gpt_neox": ("gpt_neox", {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                              "num_hidden_layers": 2, "max_position_embeddings": 128, "pad_token_id": 0}, False, False),
    "gpt2": ("gpt2", {"vocab_size": VOCAB, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 128, "pad_token_id": 0,
                      "bos_token_id": 1, "eos_token_id": 2}, False, False),
}


def config_of(family: str):
    model_type, kwargs, _, _ = FAMILIES[family]
    return AutoConfig.for_model(model_type, **kwargs)


def models_of(family: str):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config_of(family)).eval()
    torch.manual_seed(0)
    cfg = config_of(family)
    cfg.num_labels = 1
    return lm, AutoModelForSequenceClassification.from_config(cfg).eval()


@pytest.fixture(scope="module")
def examples():
    """Prompts of 12-20 tokens and responses of 3-9: every sequence runs past an 8-token window."""
    rng = random.Random(0)
    draw = lambda lo, hi: [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [{"prompt_ids": draw(12, 20), "chosen_ids": draw(3, 9), "rejected_ids": draw(3, 9)} for _ in range(4)]


def differences(lm, rm, examples) -> tuple[float, float]:
    """Largest |shared - two sequences| of the summed log-probs and of the reward scores."""
    two, shared = PairCollator(0)(examples), PF.SharedPairCollator(0)(examples)
    with torch.no_grad():
        lp = max((a.summed - b.summed).abs().max().item()
                 for a, b in zip(PF.pair_response_logprobs(lm, two), PF.pair_response_logprobs(lm, shared)))
        rw = max((a - b).abs().max().item() for a, b in zip(PF.pair_rewards(rm, two), PF.pair_rewards(rm, shared)))
    return lp, rw


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shared_prompt_forward_equals_two_sequences(family, examples):
    lm, rm = models_of(family)
    assert PF.uses_shared_prompt(lm, "shared_prompt") and PF.uses_shared_prompt(rm, "shared_prompt")
    lp, rw = differences(lm, rm, examples)
    assert lp < 1e-4 and rw < 1e-4, (lp, rw)


@pytest.mark.parametrize("family", [f for f, spec in FAMILIES.items() if spec[2]])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_windowed_models_need_the_window_in_the_mask(family, attention, examples, monkeypatch):
    """The check above is not vacuous: with the window left out of the mask (the old behaviour),
    the windowed families' log-probs leave the two-sequence forward's."""
    lm, rm = models_of(family)
    for m in (lm, rm):
        m.config._attn_implementation = attention
    assert PF.attention_layout(lm).window == WINDOW
    lp, rw = differences(lm, rm, examples)
    assert lp < 1e-4 and rw < 1e-4, (lp, rw)
    real = PF.attention_layout
    monkeypatch.setattr(PF, "attention_layout", lambda model: replace(real(model), window=None,
                                                                      layer_types=(PF.FULL_LAYER,)))
    lp, _ = differences(lm, rm, examples)
    assert lp > 1e-3, lp


def test_a_layout_the_mask_cannot_express_falls_back_by_name(caplog, monkeypatch):
    lm, _ = models_of("qwen2_window")
    monkeypatch.setattr(PF, "MASK_MAPPING_MODELS", ())
    with caplog.at_level(logging.WARNING, logger=PF.log.name):
        assert not PF.uses_shared_prompt(lm, "shared_prompt")
    assert "'qwen2' mixes full and sliding-window layers" in caplog.text and "two sequences" in caplog.text
    assert isinstance(PF.pair_collator(lm, 0, "shared_prompt"), PairCollator)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_lora_targets_resolve_or_the_error_names_the_layers(family):
    lm, _ = models_of(family)
    cfg = ModelConfig(lora=LoraConfig())
    if FAMILIES[family][3]:
        wrapped = prepare_for_training(lm, cfg)
        assert any("lora_A" in n for n, _ in wrapped.named_parameters())
        return
    with pytest.raises(ModelLoadError, match="set model.lora.target_modules") as err:
        prepare_for_training(lm, cfg)
    assert "are not layers of this" in str(err.value) and "linear layers are named" in str(err.value)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reward_head_reads_the_last_real_token(family, examples):
    """Right-padded sequences: our score equals the model's own pooled output (last non-pad token)."""
    _, rm = models_of(family)
    seqs = [ex["prompt_ids"] + ex["chosen_ids"] for ex in examples]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        ours = reward_scores(rm, ids, mask)
        theirs = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_policy_step_saves_a_folder_that_reloads(family, examples, tmp_path):
    lm, _ = models_of(family)
    lm.train()
    batch = PF.pair_collator(lm, 0, "shared_prompt")(examples)
    chosen, rejected = PF.pair_response_logprobs(lm, batch)
    zeros = torch.zeros_like(chosen.summed)
    inputs = PolicyLossInputs(chosen.summed, rejected.summed, zeros - 30, zeros - 31)
    loss = get_policy_loss("dpo")(inputs, beta=0.1).losses.mean()
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    loss.backward()
    torch.optim.SGD(lm.parameters(), lr=0.5).step()
    assert any(not torch.equal(before[n], p) for n, p in lm.named_parameters())
    save_model_atomically(lm.eval(), None, tmp_path / "model")
    again = load_causal_lm(str(tmp_path / "model")).eval()
    ids = torch.tensor([examples[0]["prompt_ids"]])
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, lm(ids).logits, atol=1e-5)
