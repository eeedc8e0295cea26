"""Settings shared by the Ray test modules: a CI-sized pipeline (1-layer width-32 model, 64 documents)."""

TINY_SETS = [
    "model.vocab_size=512", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
    "model.intermediate_size=64", "data.num_documents=64", "data.num_validation_documents=16",
    "data.num_eval_documents=16",
    "data.pairs_per_document=1", "sft.optim.epochs=4",  # the preset's 3 pairs and 12 epochs are sized for its models
    "data.max_prompt_length=96", "data.max_length=128", "eval.num_prompts=4", "eval.max_new_tokens=8",
    "sft.optim.per_device_batch_size=8", "sft.optim.effective_batch_size=16", "sft.optim.report_every=2",
    "reward.optim.per_device_batch_size=8", "reward.optim.effective_batch_size=16", "reward.optim.report_every=2",
    "reward.optim.epochs=3", "reward.optim.eval_every=4",  # the preset's 12 epochs (early-stopped) would cost CI minutes
    "policy.optim.per_device_batch_size=4", "policy.optim.effective_batch_size=8", "policy.optim.report_every=1",
    "policy.optim.checkpoint_every=2", "ray.num_workers=2", "score.num_actors=1", "score.batch_size=16",
]
