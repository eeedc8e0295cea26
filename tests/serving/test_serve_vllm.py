"""The vLLM backend on vLLM's async engine behind the real Ray Serve deployment, over HTTP:
tokens streamed as they are produced, every request scheduled with its own sampling settings
while others run (continuous batching), and a client that leaves freeing its slot in the engine.

The served model is a random one with head_dim 32 (vLLM's CPU attention has no kernel for the
CI fixture's head_dim 16). Its weights are drawn wide (std 0.3) so that greedy answers are varied
text rather than one repeated token, and its EOS embedding is zero, so the tied head never picks
EOS and answers run to max_tokens: long enough to disconnect in the middle of one."""

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from madpo_ray.generation import vllm_available

from helpers import SERVE_PORT as PORT
from helpers import sse_data

BASE = f"http://127.0.0.1:{PORT}"
PROMPTS = [f"Package {i} is a {lang} library for parsing {what} files.\nTL;DR:"
           for i, (lang, what) in enumerate([("Rust", "TOML"), ("Go", "YAML"), ("Lua", "JSON"), ("Perl", "INI")] * 16)]


def test_auto_backend_says_why_it_falls_back(tiny_base_dir):
    """`auto` is vLLM only where vLLM can run the model; asking for vLLM where it cannot is an
    error that names the reason, not a replica crash later."""
    from madpo_ray.serving.deployment import choose_backend

    assert choose_backend(str(tiny_base_dir), "transformers") == ("transformers", "asked for")
    engine, why = choose_backend(str(tiny_base_dir), "auto")  # the CI fixture has head_dim 16
    assert engine == "transformers"
    assert ("head_dim 16" in why) if vllm_available() else ("not installed" in why)
    with pytest.raises(ValueError, match="head_dim 16|not installed"):
        choose_backend(str(tiny_base_dir), "vllm")
    with pytest.raises(ValueError, match="auto, vllm, transformers"):
        choose_backend(str(tiny_base_dir), "tensorrt")


needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM not installed (the transformers backend is the fallback)")


def test_adapters_are_checked_before_anything_starts(tiny_base_dir, tmp_path):
    """Each way to get `--lora` wrong is refused with what was wrong, before a replica starts."""
    from madpo_ray.serving.deployment import choose_backend
    from madpo_ray.serving.folders import parse_adapter_specs, resolve_adapters

    assert parse_adapter_specs(["a=x", " b = y/z "]) == {"a": "x", "b": "y/z"}
    for bad in (["tuned"], ["=x"], ["a="]):
        with pytest.raises(ValueError, match="NAME=FOLDER"):
            parse_adapter_specs(bad)
    with pytest.raises(ValueError, match="given twice"):
        parse_adapter_specs(["a=x", "a=y"])
    stage = tmp_path / "policy"
    (stage / "adapter").mkdir(parents=True)
    with pytest.raises(ValueError, match="adapter 'a': no adapter_config.json"):
        resolve_adapters({"a": str(stage)}, "base")
    (stage / "adapter" / "adapter_config.json").write_text("{}")
    assert resolve_adapters({"a": str(stage)}, "base") == {"a": str((stage / "adapter").resolve())}  # a stage: its adapter/
    assert resolve_adapters({"a": str(stage / "adapter")}, "base") == {"a": str((stage / "adapter").resolve())}
    with pytest.raises(ValueError, match="base model's name"):
        resolve_adapters({"base": str(stage)}, "base")
    with pytest.raises(ValueError, match="unmerged needs the vLLM backend"):
        choose_backend(str(tiny_base_dir), "transformers", adapters=True)
    with pytest.raises(ValueError, match="unmerged needs the vLLM backend"):  # auto cannot fall back either
        choose_backend(str(tiny_base_dir), "auto", adapters=True)


def test_an_adapter_that_does_not_fit_the_base_is_refused_before_anything_starts(tiny_base_dir, tmp_path):
    """vLLM loads an adapter on its first request; a wrong one is refused up front instead, naming
    the layer and both sizes. An adapter fits the base it was trained on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from madpo_ray.serving.folders import adapter_shape_errors, resolve_adapters

    stage = make_lora_stage(tiny_base_dir, tmp_path / "policy")
    assert resolve_adapters({"a": str(stage)}, "base", str(tiny_base_dir)) == {"a": str((stage / "adapter").resolve())}
    config = AutoConfig.from_pretrained(tiny_base_dir)
    config.hidden_size, config.head_dim = 48, 24  # same layers, other widths
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wider")
    with pytest.raises(ValueError, match=r"adapter 'a' .* does not fit .*lora_A takes 32 inputs, the layer has 48"):
        resolve_adapters({"a": str(stage)}, "base", str(tmp_path / "wider"))
    problems = adapter_shape_errors(stage / "adapter", tmp_path / "wider")
    assert any(p.endswith("lora_B gives 32 outputs, the layer has 48") for p in problems), problems
    assert adapter_shape_errors(stage / "adapter", tiny_base_dir) == []
    config_path = stage / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        resolve_adapters({"a": str(stage)}, "base", str(tiny_base_dir))
    config_path.write_text(json.dumps(config))
    (stage / "adapter" / "adapter_model.safetensors").rename(stage / "adapter" / "adapter_model.bin")
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        resolve_adapters({"a": str(stage)}, "base", str(tiny_base_dir))


def test_the_shape_check_reads_fan_in_fan_out_layers_transposed(tiny_base_dir, tmp_path):
    """peft's fan_in_fan_out (GPT-2's Conv1D) stores a layer's weight as (in, out): on the test base's
    up_proj (64 out, 32 in), an r=2 lora_A takes 32 inputs normally and 64 when transposed."""
    import torch
    from safetensors.torch import save_file

    from madpo_ray.serving.folders import adapter_shape_errors

    layer = "base_model.model.model.layers.0.mlp.up_proj"
    for fan_in_fan_out, inputs, outputs in ((False, 32, 64), (True, 64, 32)):
        folder = tmp_path / str(fan_in_fan_out)
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "fan_in_fan_out": fan_in_fan_out}))
        save_file({f"{layer}.lora_A.weight": torch.zeros(2, inputs), f"{layer}.lora_B.weight": torch.zeros(outputs, 2)},
                  str(folder / "adapter_model.safetensors"))
        assert adapter_shape_errors(folder, tiny_base_dir) == []
        save_file({f"{layer}.lora_A.weight": torch.zeros(2, outputs), f"{layer}.lora_B.weight": torch.zeros(inputs, 2)},
                  str(folder / "adapter_model.safetensors"))
        assert adapter_shape_errors(folder, tiny_base_dir) == [
            f"model.layers.0.mlp.up_proj: lora_A takes {outputs} inputs, the layer has {inputs}",
            f"model.layers.0.mlp.up_proj: lora_B gives {inputs} outputs, the layer has {outputs}"]


def test_ingress_variables_are_serves_names_with_our_ports_and_a_private_folder():
    import stat

    from madpo_ray.serving import launch

    folder = "/tmp/madpo-hap-x"  # not created: ingress_env only names it

    direct = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "8001",
              "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "8100", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    assert launch.ingress_env("direct", 8000) == direct
    assert launch.ingress_env("haproxy", 8000, state_dir=folder) == {
        **direct, "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "8101",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "8102", "RAY_SERVE_HAPROXY_STATS_PORT": "8103",
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "100",  # the proxy actor's backstop: 60 + 10 + 30 s
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH":
        f"{folder}/admin.sock", "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{folder}/metrics.sock"}
    assert launch.ingress_env("haproxy", 8000, {"request_timeout_s": 5, "body_timeout_s": 2.5}, folder
                              )["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"] == "38"
    own = [launch.ingress_env("haproxy", 8000)["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] for _ in range(2)]
    try:
        assert own[0] != own[1] and all(stat.S_IMODE(os.stat(d).st_mode) == 0o700 for d in own)  # fresh, private
    finally:
        for folder in own:
            os.rmdir(folder)
    with pytest.raises(ValueError, match="too long a folder for HAProxy's sockets"):  # what pytest's tmp_path was
        launch.ingress_env("haproxy", 8000, state_dir="/tmp/pytest-of-root/pytest-42/haproxy0")
    assert launch.ingress_env("proxy", 8000) == launch.ingress_env(None, 8000) == {}


def test_ingress_is_chosen_for_a_local_cluster_only_and_leaves_the_environment_as_it_was(monkeypatch):
    import ray

    from madpo_ray.serving import launch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a local cluster about to start
    assert launch.haproxy_binary_available()  # ray[serve] bundles it on Linux: what CI and users get
    choose = launch.choose_ingress
    assert [choose("auto", h, 8000, None) for h in ("127.0.0.1", "0.0.0.0", "10.1.2.3", "::1")] == [
        "haproxy", "haproxy", "proxy", "proxy"]  # HAProxy dials local replicas at 127.0.0.1
    assert choose("direct", "127.0.0.1", 65435, None) == "direct"  # replicas only: 100 ports above
    assert choose("auto", "127.0.0.1", 65435, None) == choose("proxy", "127.0.0.1", 80, None) == "proxy"
    with pytest.raises(ValueError, match="--ingress haproxy: --port 65435: .* must be 1024 to 65432"):
        choose("haproxy", "127.0.0.1", 65435, None)
    with pytest.raises(ValueError, match="--ingress haproxy: --host 10.1.2.3"):
        choose("haproxy", "10.1.2.3", 8000, None)
    with pytest.raises(ValueError, match="one of auto, haproxy, proxy, direct"):
        choose("nginx", "127.0.0.1", 8000, None)
    for address in ("auto", "10.0.0.1:6379"):  # a cluster of someone else's: its nodes' environment decides
        assert choose("auto", "127.0.0.1", 8000, address) is None
        with pytest.raises(ValueError, match="RAY_SERVE_ENABLE_HA_PROXY=1 for HAProxy"):
            choose("proxy", "127.0.0.1", 8000, address)
    monkeypatch.setattr(launch, "haproxy_binary_available", lambda: False)
    assert choose("auto", "127.0.0.1", 8000, None) == "proxy"
    with pytest.raises(ValueError, match="no HAProxy binary"):
        choose("haproxy", "127.0.0.1", 8000, None)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # this process already joined a cluster
    assert choose("auto", "127.0.0.1", 8000, None) is None
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "9999")
    before = dict(os.environ)
    with launch.environ(launch.ingress_env("haproxy", 8000, state_dir="/tmp/madpo-hap-x")):
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert dict(os.environ) == before


@pytest.mark.parametrize("argv, ingress", [([], "auto"), (["--ingress", "proxy"], "proxy"),
                                           (["--direct-ingress"], "direct"), (["--ingress", "direct"], "direct")])
def test_madpo_serve_passes_the_ingress_on(tiny_base_dir, monkeypatch, argv, ingress):
    from typer.testing import CliRunner

    from madpo_ray.cli import app
    from madpo_ray.serving import launch

    calls = []
    monkeypatch.setattr(launch, "run_server", lambda model, **kw: calls.append(kw))
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_base_dir), *argv])
    assert result.exit_code == 0 and [c["ingress"] for c in calls] == [ingress], result.output


@pytest.mark.parametrize("ingress, expected", [
    ("auto", {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "38"}),
    ("proxy", {}),
    ("direct", {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "8301",
                "RAY_SERVE_ENABLE_HA_PROXY": None}),
])
def test_run_server_starts_its_cluster_with_the_chosen_ingress(tiny_base_dir, monkeypatch, ingress, expected):
    """What init_cluster is handed is what Serve's processes read when they start (the cluster and
    Serve are left out here; test_serve.py starts both)."""
    import ray

    from madpo_ray.serving import launch

    started = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(launch, "init_cluster", lambda address, env, **kw: started.append((address, env)))
    monkeypatch.setattr(launch, "deploy_apps", lambda *a, **kw: ["handle"])
    assert launch.run_server(str(tiny_base_dir), port=8300, backend="transformers", ingress=ingress,
                             request_timeout_s=5, body_timeout_s=2.5) == "handle"
    [(address, env)] = started
    assert address == "local" and {k: env.get(k) for k in expected} == expected and bool(env) == bool(expected)
    if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" in env:  # the private folder it made; no cluster ever used it
        os.rmdir(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])


def test_direct_ingress_alias_cannot_contradict_ingress(tiny_base_dir):
    from typer.testing import CliRunner

    from madpo_ray.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_base_dir), "--ingress", "proxy",
                                      "--direct-ingress"])
    assert result.exit_code == 2 and "--direct-ingress means --ingress direct, not proxy" in result.output


def test_lora_engine_settings_hold_every_adapter_at_the_smallest_rank_vllm_takes(tmp_path):
    """Room for all adapters (one more on CPU, left empty: see lora_settings) at the first rank in
    vLLM's list that holds the largest adapter's."""
    from madpo_ray.serving.vllm_engine import lora_settings

    def adapter(name, r):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": r}))
        return str(tmp_path / name)

    two = {"a": adapter("a", 4), "b": adapter("b", 9)}
    assert lora_settings(two, cpu=False) == {"enable_lora": True, "max_loras": 2, "max_lora_rank": 16}
    assert lora_settings(two, cpu=True)["max_loras"] == 3
    assert lora_settings({"c": adapter("c", 8)}, cpu=False)["max_lora_rank"] == 8  # exactly a listed rank
    assert lora_settings({}, cpu=True) == {}
    with pytest.raises(ValueError, match="rank 600 is above vLLM's largest, 512"):
        lora_settings({"d": adapter("d", 600)}, cpu=False)


@pytest.fixture(scope="module")
def hd32_model(corpus_docs, tmp_path_factory) -> Path:
    """A model vLLM's CPU attention can run, its weights scrambled (see the module docstring)."""
    from madpo_ray.config import ModelConfig
    from madpo_ray.models import build_tiny_base

    # Eight layers make a 256-token answer take about 2 s here: long enough to leave in the middle.
    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=8, num_heads=2, intermediate_size=128,
                      max_position_embeddings=2048)
    model = build_tiny_base([d["document"] for d in corpus_docs] + [d["reference"] for d in corpus_docs], cfg,
                            tmp_path_factory.mktemp("hd32") / "model", seed=1)
    scramble(model)
    return model


@pytest.fixture(scope="module")
def lora_stage(hd32_model, tmp_path_factory) -> Path:
    return make_lora_stage(hd32_model, tmp_path_factory.mktemp("lora") / "policy")


@pytest.fixture(scope="module")
def servers(hd32_model, lora_stage, ray_for_serving):
    """The model served by vLLM (at /vllm), chosen by `auto`, with the LoRA adapter of
    `lora_stage` beside it, unmerged, as model `tuned`."""
    from madpo_ray.serving.deployment import choose_backend
    from madpo_ray.serving.launch import run_server

    from ray import serve

    assert choose_backend(str(hd32_model), "auto")[0] == "vllm"
    yield hd32_model, run_server(str(hd32_model), port=PORT, num_cpus=0.5, app_name="vllm", route_prefix="/vllm",
                                 adapters={"tuned": str(lora_stage)})  # backend auto
    serve.delete("vllm")


def make_lora_stage(model_dir: Path, stage: Path) -> Path:
    """A stage folder as LoRA training leaves it (model/ merged, adapter/ beside it), through the
    same functions: an r=8 adapter on the attention projections of the served model, its B
    matrices drawn so that the adapter changes the greedy answers."""
    import torch

    from madpo_ray.config import LoraConfig, ModelConfig
    from madpo_ray.models import load_causal_lm, load_tokenizer, prepare_for_training, save_trained

    lm = prepare_for_training(load_causal_lm(str(model_dir)), ModelConfig(lora=LoraConfig(r=8, alpha=16, dropout=0)))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, weight in lm.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.3)
    save_trained(lm, load_tokenizer(str(model_dir)), stage / "model", stage / "adapter")
    return stage


def scramble(model_dir) -> None:
    import torch

    from madpo_ray.models import load_causal_lm, load_tokenizer

    lm, eos = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir)).eos_token_id
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in lm.parameters() if p.dim() == 2):
            weight.normal_(0, 0.3)
        lm.get_input_embeddings().weight[eos] = 0  # tied: EOS's logit is always 0, below the best of the rest
    lm.save_pretrained(model_dir)


def post(path, body):
    r = httpx.post(f"{BASE}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_vllm_gives_the_transformers_greedy_text(servers):
    """Same tokens in, same greedy tokens out, same text as the transformers engine (which drops a
    trailing incomplete UTF-8 character as vLLM's detokenizer does)."""
    from madpo_ray.serving.engine import GenParams, TransformersEngine

    model, _ = servers
    hf = TransformersEngine(str(model))
    for p in PROMPTS[:3]:
        ours = post("/vllm/v1/completions", {"prompt": p, "max_tokens": 12, "temperature": 0})
        [theirs] = hf.generate([p], GenParams(max_tokens=12))
        assert ours["usage"]["prompt_tokens"] == theirs.prompt_tokens
        assert ours["usage"]["completion_tokens"] == theirs.completion_tokens
        assert ours["choices"][0]["text"] == theirs.text
        assert len(set(ours["choices"][0]["text"])) > 4  # varied text, not one token repeated


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_streaming_sends_tokens_as_they_come_and_adds_up_to_the_greedy_text(servers):
    messages = [{"role": "user", "content": "Summarise: a Rust library for parsing TOML files."}]
    answer = post("/vllm/v1/chat/completions", {"messages": messages, "max_tokens": 24})["choices"][0]
    whole = answer["message"]["content"]
    with httpx.stream("POST", f"{BASE}/vllm/v1/chat/completions", timeout=120,
                      json={"messages": messages, "max_tokens": 24, "stream": True}) as r:
        chunks = sse_data(list(r.iter_lines()))
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert len(pieces) > 1 and all(pieces)  # one chunk per decoded delta, not one block at the end
    assert "".join(pieces) == whole and len(whole) > 10
    assert chunks[-1]["choices"][0]["finish_reason"] == answer["finish_reason"]
    # /v1/completions streams the same way, in the text_completion chunk format.
    with httpx.stream("POST", f"{BASE}/vllm/v1/completions", timeout=120,
                      json={"prompt": PROMPTS[0], "max_tokens": 16, "stream": True}) as r:
        texts = [c["choices"][0]["text"] for c in sse_data(list(r.iter_lines()))]
    assert len([t for t in texts if t]) > 1
    assert "".join(texts) == post("/vllm/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 16})["choices"][0]["text"]
    # A max_tokens cut ends the stream with "length", and the usage chunk counts what the non-streamed answer counts.
    short = {"messages": messages, "max_tokens": 3}
    whole = post("/vllm/v1/chat/completions", short)
    with httpx.stream("POST", f"{BASE}/vllm/v1/chat/completions", timeout=120,
                      json={**short, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = sse_data(list(r.iter_lines()))
    assert whole["choices"][0]["finish_reason"] == chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 3
    # A stop string ends it with "stop", counted as the non-streamed answer counts it.
    long = post("/vllm/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 16})["choices"][0]["text"]
    cut = {"prompt": PROMPTS[0], "max_tokens": 16, "stop": [long[6:9]]}
    whole = post("/vllm/v1/completions", cut)
    with httpx.stream("POST", f"{BASE}/vllm/v1/completions", timeout=120,
                      json={**cut, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = sse_data(list(r.iter_lines()))
    assert whole["choices"][0]["finish_reason"] == chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"] == long[:6]
    assert chunks[-1]["usage"] == whole["usage"] and whole["usage"]["completion_tokens"] < 16


async def post_all(bodies: list[dict]) -> list:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(f"{BASE}/vllm/v1/completions", json=b) for b in bodies))


def request_for(i: int, answer: str) -> dict:
    """Request i: its own max_tokens, and for every other request a stop string taken from the
    middle of its full answer, so stops really cut, at a different place per request."""
    body = {"prompt": PROMPTS[i], "max_tokens": 6 + i % 11, "temperature": 0}
    if i % 2 == 0:
        body["stop"] = [answer[4 + i % 7:7 + i % 7]]
    return body


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_64_concurrent_requests_each_get_their_solo_output(servers):
    answers = asyncio.run(post_all([{"prompt": p, "max_tokens": 16} for p in PROMPTS]))
    bodies = [request_for(i, r.json()["choices"][0]["text"]) for i, r in enumerate(answers)]
    solo = [post("/vllm/v1/completions", b) for b in bodies]  # one at a time
    concurrent = asyncio.run(post_all(bodies))
    assert [r.status_code for r in concurrent] == [200] * 64
    for i, (alone, r) in enumerate(zip(solo, concurrent)):
        got = r.json()
        assert got["choices"][0]["text"] == alone["choices"][0]["text"], (i, bodies[i])
        assert got["choices"][0]["finish_reason"] == alone["choices"][0]["finish_reason"]
        assert got["usage"]["completion_tokens"] == alone["usage"]["completion_tokens"]
    # The settings differed and mattered: some answers were cut by their stop string, others
    # ran to their own max_tokens.
    cut = [i for i, a in enumerate(solo) if a["choices"][0]["finish_reason"] == "stop" and "stop" in bodies[i]]
    assert len(cut) >= 8
    assert len({a["usage"]["completion_tokens"] for a in solo}) >= 5


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_engine_slot(servers):
    _, handle = servers
    assert handle.running_requests.remote().result() == 0  # also readies the handle: its first call is slow
    body = {"prompt": PROMPTS[1], "max_tokens": 256, "temperature": 0}
    t0 = time.perf_counter()
    assert post("/vllm/v1/completions", body)["usage"]["completion_tokens"] == 256
    engine_time = time.perf_counter() - t0  # the whole answer, without streaming's per-chunk cost
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{BASE}/vllm/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: dropping the iterator would already close the connection
        assert next(lines).startswith("data: ")  # the first token arrived
        assert handle.running_requests.remote().result() == 1
        left = time.perf_counter()
    while handle.running_requests.remote().result() != 0:
        assert time.perf_counter() - left < 10, "the engine still holds the request of a client that left"
        time.sleep(0.02)
    freed_after, rest = time.perf_counter() - left, engine_time - (left - t0)
    print(f"slot freed {freed_after:.2f}s after the client left; the engine needed {rest:.2f}s more to finish")
    # Freed by the abort, not by finishing the answer.
    assert freed_after < rest / 2, (freed_after, rest)
    assert post("/vllm/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 4})["usage"]["completion_tokens"] == 4


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_more_requests_than_serves_default_reach_the_engine_at_once(servers):
    """The vLLM replica takes up to 256 requests at once and lets the engine's scheduler queue
    them. With Serve's usual limit of 64 the rest waited in Serve's router, whose retry backoff
    cut throughput at 200 clients to a sixth (bench/README.md, serve_load.py)."""
    import threading

    _, handle = servers
    seen, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            seen[0] = max(seen[0], handle.running_requests.remote().result())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        replies = asyncio.run(post_all([{"prompt": PROMPTS[i % 64], "max_tokens": 64} for i in range(100)]))
    finally:
        done.set()
        watcher.join()
    assert [r.status_code for r in replies] == [200] * 100
    assert seen[0] > 64, seen[0]


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_a_lora_adapter_is_served_unmerged_beside_its_base(servers, lora_stage):
    """`adapters={"tuned": <stage>}`: a request for model `tuned` runs the base weights with the
    adapter applied inside the engine and gets the merged model's greedy answer; any other request
    gets the base's, also when both kinds run together; an unknown name is a 404 naming the served ones."""
    from madpo_ray.serving.engine import GenParams, TransformersEngine

    model, _ = servers
    listed = httpx.get(f"{BASE}/vllm/v1/models").json()["data"]
    base_name = listed[0]["id"]
    assert [(m["id"], m.get("parent")) for m in listed] == [(base_name, None), ("tuned", base_name)]
    merged, base = TransformersEngine(str(lora_stage / "model")), TransformersEngine(str(model))
    bodies = [{"model": name, "prompt": p, "max_tokens": 12} for p in PROMPTS[:4] for name in ("tuned", base_name)]
    together = [r.json() for r in asyncio.run(post_all(bodies))]
    for body, got in zip(bodies, together):
        [want] = (merged if body["model"] == "tuned" else base).generate([body["prompt"]], GenParams(max_tokens=12))
        assert got["model"] == body["model"]
        assert got["choices"][0]["text"] == want.text, body
    differ = sum(together[i]["choices"][0]["text"] != together[i + 1]["choices"][0]["text"] for i in range(0, 8, 2))
    assert differ >= 3  # the adapter matters, so a server that ignored it would fail above
    with httpx.stream("POST", f"{BASE}/vllm/v1/completions", timeout=120,
                      json={**bodies[0], "stream": True}) as r:
        assert "".join(c["choices"][0]["text"] for c in sse_data(list(r.iter_lines()))) == together[0]["choices"][0]["text"]
    r = httpx.post(f"{BASE}/vllm/v1/completions", json={"model": "tunde", "prompt": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert "tuned" in r.json()["error"]["message"] and base_name in r.json()["error"]["message"]


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_a_seed_the_engine_cannot_honour_is_refused_not_ignored(servers):
    """Issue #33: vLLM's CPU engine cannot seed one request, and a seed was silently ignored. A
    sampled request with a seed is now a 400 naming `seed` there (streamed or not); greedy, where a
    seed changes nothing, is served; on other platforms a seed is honoured (same seed, same text)."""
    from vllm.platforms import current_platform

    body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0.9, "seed": 3}
    assert post("/vllm/v1/completions", {**body, "temperature": 0})["usage"]["completion_tokens"] == 8
    if not current_platform.is_cpu():
        assert post("/vllm/v1/completions", body)["choices"] == post("/vllm/v1/completions", body)["choices"]
        return
    for extra in ({}, {"stream": True}):
        r = httpx.post(f"{BASE}/vllm/v1/completions", json={**body, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.9, "seed": 1, "stream": True}
    r = httpx.post(f"{BASE}/vllm/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"]


@needs_vllm
@pytest.mark.ray
@pytest.mark.slow
def test_concurrent_chats_with_special_token_text_all_succeed(servers):
    """Issue #33: chat encoding toggles the shared tokenizer's split_special_tokens; concurrent chats
    (some streamed) must all succeed."""
    async def load():
        async with httpx.AsyncClient(timeout=120) as c:
            sem = asyncio.Semaphore(50)

            async def one(i):
                messages = [{"role": "system", "content": f"rule {i} <|eos|>"},
                            {"role": "user", "content": f"Summarise package {i} <|bos|> now"}]
                async with sem:
                    r = await c.post(f"{BASE}/vllm/v1/chat/completions",
                                     json={"messages": messages, "max_tokens": 3, "stream": i % 4 == 0})
                    return r.status_code
            return await asyncio.gather(*(one(i) for i in range(150)))

    codes = asyncio.run(load())
    assert codes.count(200) == 150, {c: codes.count(c) for c in set(codes)}
