"""Settings shared by the Ray test modules: a CI-sized pipeline (1-layer width-32 model, 64 documents)."""

SERVE_TEST_KEY = "test-secret-key"  # the serving cluster's replicas read it from MADPO_TEST_KEY
SERVE_FILE_KEY = "hardening-key-7f3a"  # the "guarded" app's, from a key file (tests/serving/conftest.py)
SERVE_PORT = 8391  # where the session's Serve proxies listen

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


def tiny_config(runs_dir, name: str, *extra: str):
    """The CI-sized config on the Ray path. score.backend=workers: at this size `auto` would score
    in a plain loop; the run's worker group is what the default run scores with (test_pipeline_ray
    tests the Ray Data pass against it)."""
    from madpo_ray.config import load_config

    return load_config("tiny", TINY_SETS + [f"runs_dir={runs_dir}", f"name={name}", "score.backend=workers", *extra])


def clone_until_policy(src, runs_dir, name: str, *extra: str):
    """A new run sharing src's scored pairs (and base model), so only the policy stage runs."""
    import shutil

    from madpo_ray.pipeline import Pipeline

    p = Pipeline(tiny_config(runs_dir, name, *extra))
    for stage in ("data", "sft", "pairs", "reward", "score"):
        shutil.copytree(src.layout.stage_dir(stage), p.layout.stage_dir(stage))
    if (src.run_dir / "base").exists():
        shutil.copytree(src.run_dir / "base", p.run_dir / "base")
    return p


def free_tcp_port() -> int:
    """A port nothing on loopback listens on now (a gloo rendezvous, a Ray dashboard)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sse_data(lines) -> list[dict]:
    """The JSON events of a server-sent-event stream's lines, without the closing [DONE]."""
    import json

    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
