"""Real pretrained models, on tiny stand-ins: LoRA trains only adapters (and the reward head) and its
merged folder equals base + adapter; gradient checkpointing leaves gradients unchanged; with bf16
the step-0 implicit margin is zero because scoring and training share one dtype policy; a GGUF
written here round-trips through `madpo model import-gguf`; the local runtime runs every stage
without Ray."""

import json
import subprocess
import sys

import pytest
import torch

from madpo_ray.config import LoraConfig, ModelConfig, load_config

from helpers import TINY_SETS

LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


def _examples(tok, docs, n=8):
    from madpo_ray.data.collate import tokenize_pairs
    from madpo_ray.data.preference import ValidationReport

    rows = [{"prompt": d["document"][:160] + "\nTL;DR:", "chosen": " " + d["reference"],
             "rejected": " " + docs[(i + 3) % len(docs)]["reference"], "row_id": i} for i, d in enumerate(docs[:n])]
    return tokenize_pairs(tok, rows, 48, 80, "truncate", ValidationReport(source="t"), False)


def test_lora_trains_only_adapters_and_the_reward_head(tiny_base_dir):
    from madpo_ray.models import load_causal_lm, load_reward_model, prepare_for_training

    causal = prepare_for_training(load_causal_lm(str(tiny_base_dir)), ModelConfig(lora=LORA))
    names = [n for n, p in causal.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names if "lora_A" in n} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    reward = prepare_for_training(load_reward_model(str(tiny_base_dir), pad_token_id=0), ModelConfig(lora=LORA),
                                  task="reward")
    trainable = [n for n, p in reward.named_parameters() if p.requires_grad]
    assert any("score" in n and "lora_" not in n for n in trainable)  # the head trains in full
    assert all("lora_" in n or "score" in n for n in trainable)


def test_lora_policy_training_moves_only_adapters_and_merged_folder_equals_base_plus_adapter(
        tmp_path, tiny_base_dir, tiny_tokenizer, corpus_docs):
    from peft import PeftModel

    from madpo_ray.engine.sessions import LocalSession
    from madpo_ray.models import load_causal_lm, load_reward_model
    from madpo_ray.stages.policy import train_policy
    from madpo_ray.stages.score import score_examples
    from madpo_ray.stages.outputs import StageOutput

    ref = load_causal_lm(str(tiny_base_dir)).eval()
    rm = load_reward_model(str(tiny_base_dir), pad_token_id=tiny_tokenizer.pad_token_id).eval()
    scored = score_examples(ref, rm, _examples(tiny_tokenizer, corpus_docs, 16), tiny_tokenizer.pad_token_id)
    cfg = load_config("tiny", TINY_SETS + ["model.lora={r: 4, alpha: 8, dropout: 0.0}", "policy.optim.max_steps=2",
                                           "policy.optim.lr=0.01"])
    out = StageOutput(tmp_path / "model", tmp_path / "metrics.json", tmp_path / "adapter")
    train_policy(cfg, LocalSession({"train": scored}), model_dir=str(tiny_base_dir), out=out)
    metrics = json.loads(out.metrics_path.read_text())
    assert 0 < metrics["trainable_share"] < 0.2 and metrics["trainable_parameters"] > 0
    ids = torch.tensor([scored[0]["prompt_ids"] + scored[0]["chosen_ids"]])
    merged = load_causal_lm(str(out.model_dir)).eval()
    adapted = PeftModel.from_pretrained(load_causal_lm(str(tiny_base_dir)), str(out.adapter_dir)).eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-4)  # the adapter did learn
    base_sd, merged_sd = ref.state_dict(), merged.state_dict()
    untouched = [k for k in base_sd if not any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    assert untouched and all(torch.equal(base_sd[k], merged_sd[k]) for k in untouched)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base_dir, tiny_tokenizer, corpus_docs):
    from madpo_ray.data.collate import PairCollator
    from madpo_ray.logprobs import sequence_logprobs
    from madpo_ray.models import load_causal_lm, prepare_for_training

    batch = PairCollator(tiny_tokenizer.pad_token_id)(_examples(tiny_tokenizer, corpus_docs, 4))
    grads = []
    for checkpointing in (False, True):
        model = prepare_for_training(load_causal_lm(str(tiny_base_dir)), ModelConfig(gradient_checkpointing=checkpointing))
        model.train()
        sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]).summed.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert model.is_gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bfloat16_step_zero_implicit_margin_is_zero(tiny_base_dir, tiny_tokenizer, corpus_docs):
    """Reference log-probs scored under the run's dtype policy equal the policy's own at step 0; scored
    in float32 (the old behaviour) they are off by far more than bf16 noise."""
    from madpo_ray.losses import DataParallel
    from madpo_ray.pair_forward import pair_collator
    from madpo_ray.models import load_causal_lm
    from madpo_ray.stages.policy import PolicyStep
    from madpo_ray.stages.score import ComputePolicy, PairScorer

    cfg = load_config("tiny", TINY_SETS + ["model.dtype=bfloat16"])
    examples = _examples(tiny_tokenizer, corpus_docs, 8)
    step = PolicyStep(cfg.policy.loss, 0, DataParallel())
    policy = load_causal_lm(str(tiny_base_dir), cfg.model.dtype).eval()  # what train_policy loads

    def margins(precision):
        """Scored 8 pairs at a time, trained 4 at a time (other padding), as in a run."""
        rows = PairScorer(str(tiny_base_dir), str(tiny_base_dir), precision=precision).score(examples)
        collate = pair_collator(policy, tiny_tokenizer.pad_token_id, cfg.model.pair_forward)
        with torch.no_grad():
            return torch.cat([step.inputs(policy, collate(rows[i:i + 4])).implicit_margin() for i in (0, 4)])

    same = margins(ComputePolicy.of(cfg)).abs().max().item()
    mixed = margins(ComputePolicy("float32", "off", cfg.model.pair_forward)).abs().max().item()
    assert same <= 1e-3 and mixed > 1e-3 and mixed > 5 * same, (same, mixed)


def test_import_gguf_round_trips_a_gguf_written_here(tmp_path, tiny_base_dir, tiny_tokenizer, corpus_docs):
    from gguf_writer import write_llama_gguf

    from madpo_ray.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(tiny_base_dir)).eval()
    write_llama_gguf(model, tiny_tokenizer, tmp_path / "tiny.gguf")
    proc = subprocess.run([sys.executable, "-m", "madpo_ray", "model", "import-gguf", str(tmp_path / "tiny.gguf"),
                           str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    imported, tok = load_causal_lm(str(tmp_path / "hf")).eval(), load_tokenizer(str(tmp_path / "hf"))
    text = corpus_docs[0]["document"][:300]
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.chat_template == tiny_tokenizer.chat_template
    with torch.no_grad():
        assert torch.allclose(imported(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits, atol=1e-5)
    bad = subprocess.run([sys.executable, "-m", "madpo_ray", "model", "import-gguf", str(tmp_path / "nope.gguf"),
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "no such GGUF file" in bad.stdout + bad.stderr and "Traceback" not in bad.stderr
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "weights.bin").write_text("someone's")
    refused = subprocess.run([sys.executable, "-m", "madpo_ray", "model", "import-gguf", str(tmp_path / "tiny.gguf"),
                              str(theirs)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "--force" in refused.stdout + refused.stderr
    assert (theirs / "weights.bin").read_text() == "someone's"
    assert (tmp_path / "hf" / ".madpo-output").is_file()  # its own output: a second import may replace it


@pytest.mark.slow
def test_local_runtime_runs_every_stage_without_ray(tmp_path):
    """ray.backend=local: the same stages in this process (LoRA on, to run that path end to end too)."""
    import ray

    from madpo_ray.pipeline import Pipeline

    cfg = load_config("tiny", TINY_SETS + [f"runs_dir={tmp_path}", "ray.backend=local", "sft.optim.max_steps=2",
                                           "reward.optim.max_steps=2", "policy.optim.max_steps=2",
                                           "model.lora={r: 4, alpha: 8}"])
    p = Pipeline(cfg)
    results = p.run()
    assert not ray.is_initialized()
    assert list(results) == ["data", "sft", "pairs", "reward", "score", "policy", "eval"]
    for stage in ("sft", "reward", "policy"):
        assert results[stage]["steps"] == 2 and 0 < results[stage]["trainable_share"] < 1
        assert (p.layout.adapter_dir(stage) / "adapter_config.json").exists()
    assert "policy_greedy_gold_reward" in results["eval"]


def test_reward_head_initialisation_follows_the_seed(tiny_base_dir, tiny_tokenizer, corpus_docs):
    """The score head is new weights: without seeding before the model is built, two runs of the same
    config started from different heads (the first loss differed run to run)."""
    from madpo_ray.engine.sessions import LocalSession
    from madpo_ray.stages.reward import train_reward

    pairs = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
             for ex in _examples(tiny_tokenizer, corpus_docs, 16)]

    def first_losses(process_state):
        cfg = load_config("tiny", TINY_SETS + ["reward.optim.max_steps=2"])
        torch.manual_seed(process_state)  # whatever state the process is in must not matter
        return train_reward(cfg, LocalSession({"train": pairs}), model_dir=str(tiny_base_dir)).loss_history

    assert first_losses(1) == first_losses(2)


def test_chat_prompts_keep_template_markup_special_and_document_text_plain(tiny_base_dir):
    """data.chat: the template's own special tokens stay single ids; "<|eos|>" typed inside a
    document is text, in training rows and in generation prompts alike."""
    from madpo_ray.data.collate import encode_prompt, prompt_text, tokenize_sft
    from madpo_ray.data.prompts import generation_prompts, prompt_for
    from madpo_ray.models import load_tokenizer

    tok = load_tokenizer(str(tiny_base_dir))
    tok.chat_template = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
    data = load_config("tiny", ["data.chat=true"]).data
    doc = "A tool that prints <|eos|> markers."
    row = tokenize_sft(tok, [{"prompt": prompt_for(data, doc), "response": " a tool"}], 200, 256)[0]
    ids = row["prompt_ids"]
    assert ids.count(tok.bos_token_id) == 2 and ids.count(tok.eos_token_id) == 1  # markup only
    assert encode_prompt(tok, generation_prompts(data, tok, [doc])[0]) == ids  # generation sees the same ids
    plain = load_config("tiny").data
    assert prompt_for(plain, doc) == doc + "\nTL;DR:" and tok.eos_token_id not in encode_prompt(tok, prompt_text(tok, doc))


@pytest.mark.slow
def test_a_run_with_a_windowed_model_scores_as_two_separate_sequences_would(tmp_path):
    """`madpo run` with sliding-window attention (a Mistral-shaped tiny model, window 16 < the
    96-token prompts): the reference log-probs the score stage stored through the shared-prompt
    forward equal those of two separate sequences."""
    from madpo_ray.data.collate import PairCollator
    from madpo_ray.data.scored import load_policy_examples
    from madpo_ray.models import load_causal_lm
    from madpo_ray.pair_forward import attention_layout, pair_response_logprobs, uses_shared_prompt
    from madpo_ray.pipeline import Pipeline

    cfg = load_config("tiny", TINY_SETS + [f"runs_dir={tmp_path}", "ray.backend=local", "sft.optim.max_steps=2",
                                           "reward.optim.max_steps=2", "policy.optim.max_steps=2",
                                           "model.sliding_window=16"])
    p = Pipeline(cfg)
    p.run(("data", "sft", "pairs", "reward", "score"))
    sft = load_causal_lm(str(p.layout.model_dir("sft"))).eval()
    assert attention_layout(sft).window == 16 and uses_shared_prompt(sft, cfg.model.pair_forward)
    rows = load_policy_examples(str(p.layout.scored_path("train")), "dpo")[:16]
    assert max(len(r["prompt_ids"]) for r in rows) > 16  # the window matters
    with torch.no_grad():
        chosen, rejected = pair_response_logprobs(sft, PairCollator(0)(rows))
    stored = torch.tensor([[r["ref_logp_chosen"], r["ref_logp_rejected"]] for r in rows])
    assert torch.allclose(torch.stack([chosen.summed, rejected.summed], 1), stored, atol=1e-3)
