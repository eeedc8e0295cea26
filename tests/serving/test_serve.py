"""The policy server on a real Ray Serve application over loopback HTTP: every route, streaming,
auth, bad input answered with 4xx (never 500), and a concurrent burst with zero failures."""

import asyncio
import importlib.util
import json
import stat
import time
from pathlib import Path

import httpx
import pytest

from helpers import SERVE_PORT as PORT
from helpers import SERVE_TEST_KEY as KEY
from helpers import sse_data

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BASE = f"http://127.0.0.1:{PORT}"


def test_serve_app_is_the_packaged_deployment():
    """serve/config.yaml and the KubeRay RayService name `serve.app:build_app`: that path must
    give the deployment from the installed package, not a second copy."""
    from madpo_ray.serving import deployment

    path = Path(__file__).resolve().parents[2] / "serve" / "app.py"
    spec = importlib.util.spec_from_file_location("serve_app_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build_app is deployment.build_app and module.PolicyServer is deployment.PolicyServer


def post(path, body=None, **kw):
    return httpx.post(f"{BASE}{path}", json=body, timeout=60, **kw)


def test_health_and_models(server):
    assert httpx.get(f"{BASE}/healthz").json()["status"] == "ok"
    models = httpx.get(f"{BASE}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"


def test_completions_batch_of_prompts_and_n(server):
    r = post("/v1/completions", {"prompt": ["Rust library for", "A Go daemon"], "max_tokens": 6, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 4 and body["usage"]["completion_tokens"] > 0
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    # Greedy decoding is deterministic: the two samples of one prompt agree.
    assert body["choices"][0]["text"] == body["choices"][1]["text"]


def test_openai_client_works_unchanged(server):
    import openai

    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused")
    out = client.completions.create(model="any", prompt="Zorblex is a Rust library.\nTL;DR:", max_tokens=5)
    assert isinstance(out.choices[0].text, str)
    chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Summarise: a Go tool"}],
                                          max_tokens=5, temperature=0.7, seed=3)
    assert chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    *chunks, last = chunks
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    full = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert streamed == full.choices[0].message.content  # greedy stream == greedy non-stream
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert last.choices == [] and last.usage == full.usage  # the usage chunk, as the client parses it


def test_sse_wire_format(server):
    with httpx.stream("POST", f"{BASE}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def listening(low: int, high: int) -> dict:
    """{port: the psutil.Process listening there} for the TCP ports low..high."""
    import psutil

    return {c.laddr.port: psutil.Process(c.pid) for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and low <= c.laddr.port <= high}


def listeners(low: int, high: int) -> dict[int, str]:
    """{port: name of the process listening there} for the TCP ports low..high."""
    return {port: process.name() for port, process in listening(low, high).items()}


def streamed_text(url: str, body: dict) -> str:
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        pieces = [c["choices"][0]["text"] for c in sse_data(list(r.iter_lines()))]
    assert len([p for p in pieces if p]) > 1, pieces  # streamed token by token, not in one piece
    return "".join(pieces)


def haproxy_files(port: int) -> Path:
    """The folder of the config file that the HAProxy listening on `port` was started with."""
    args = listening(port, port)[port].cmdline()
    return Path(args[args.index("-f") + 1]).parent.parent  # <folder>/<node id>/haproxy.cfg


def replica_sessions(port: int, backend: str) -> int:
    """Requests HAProxy has sent to the replicas (not to its fallback, the proxy actor) of a backend,
    from its stats page."""
    rows = httpx.get(f"http://127.0.0.1:{port}/stats;csv", timeout=10).text.lstrip("# ").splitlines()
    header = rows[0].split(",")
    cells = [dict(zip(header, row.split(","))) for row in rows[1:]]
    return sum(int(c["stot"]) for c in cells if c["pxname"] == backend and c["svname"].startswith("SERVE_REPLICA"))


def test_the_port_is_haproxys_and_every_door_streams_the_same_answer(server):
    """madpo serve's default ingress: HAProxy on the port, in front of each replica's own HTTP
    server (port + 1 and up); Serve's proxy actor, HAProxy's fallback and `--ingress proxy`'s only
    door, on port + 101. Each streams the same greedy answer."""
    from madpo_ray.serving.launch import FALLBACK_PROXY_OFFSET, HAPROXY_STATS_OFFSET, REPLICA_PORTS

    ports = listeners(PORT, PORT + HAPROXY_STATS_OFFSET)
    assert ports.pop(PORT + FALLBACK_PROXY_OFFSET).startswith("ray::ProxyActor"), ports
    # HAProxy on the port, its metrics and stats page on ours above it (not Serve's fixed 9101 and 8404)
    assert [ports.pop(p) for p in (PORT, PORT + 102, PORT + 103)] == ["haproxy"] * 3
    replicas = list(ports)
    assert replicas and all(PORT < p <= PORT + REPLICA_PORTS and ports[p].startswith("ray::ServeReplica")
                            for p in replicas), ports
    assert stat.S_IMODE(haproxy_files(PORT).stat().st_mode) == 0o700  # its admin socket is mode 666 inside
    body = {"prompt": "Zorblex is", "max_tokens": 12}
    before = replica_sessions(PORT + HAPROXY_STATS_OFFSET, "http-madpo")
    expected = post("/v1/completions", body).json()["choices"][0]["text"]
    assert streamed_text(f"{BASE}/v1/completions", body) == expected
    assert replica_sessions(PORT + HAPROXY_STATS_OFFSET, "http-madpo") >= before + 2  # not the fallback's
    assert streamed_text(f"http://127.0.0.1:{PORT + FALLBACK_PROXY_OFFSET}/v1/completions", body) == expected
    keyless = [p for p in replicas if httpx.get(f"http://127.0.0.1:{p}/v1/models", timeout=10).status_code == 200]
    assert expected in [streamed_text(f"http://127.0.0.1:{p}/v1/completions", body) for p in keyless]


def test_summarize_uses_the_training_prompt(server):
    r = post("/v1/summarize", {"document": "Zorblex is a Rust library for parsing TOML files.", "max_tokens": 8})
    assert r.status_code == 200 and isinstance(r.json()["summary"], str)


BAD = [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, "malformed JSON"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 1e9}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1000000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 100}, 400, "n"),
    ("/v1/completions", {"prompt": "   "}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x" * 9000}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["x", "y"], "stream": True}, 400, "stream"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", [1, 2, 3], 400, ""),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True, "n": 2}, 400, "n"),
    ("/v1/summarize", {"document": ""}, 400, "document"),
    ("/v1/summarize", {"document": "x", "surprise": 1}, 400, "surprise"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD)
def test_bad_requests_get_4xx_with_a_message(server, path, body, status, needle):
    if isinstance(body, bytes):
        r = httpx.post(f"{BASE}{path}", content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and "Traceback" not in r.text
    assert httpx.get(f"{BASE}/healthz").status_code == 200  # still serving


def test_body_size_limit_and_unknown_route(server):
    r = httpx.post(f"{BASE}/v1/completions", content=b'{"prompt": "' + b"a" * 100_000 + b'"}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    assert httpx.get(f"{BASE}/v1/nothing").status_code == 404


def test_api_key_when_configured(server):
    body = {"prompt": "x", "max_tokens": 2}
    assert httpx.post(f"{BASE}/secured/v1/completions", json=body, timeout=30).status_code == 401
    wrong = httpx.post(f"{BASE}/secured/v1/completions", json=body, timeout=30, headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    ok = httpx.post(f"{BASE}/secured/v1/completions", json=body, timeout=30, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    assert httpx.get(f"{BASE}/secured/healthz").status_code == 200  # probes need no key


def test_concurrent_burst_has_zero_failures(server):
    async def burst():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i):
                async with sem:
                    r = await client.post(f"{BASE}/v1/completions",
                                          json={"prompt": f"Package {i} is a Rust library.\nTL;DR:", "max_tokens": 8,
                                                "temperature": 0.0 if i % 2 else 0.8})
                    return r.status_code
            return await asyncio.gather(*(one(i) for i in range(200)))

    codes = asyncio.run(burst())
    assert codes.count(200) == 200, {c: codes.count(c) for c in set(codes)}


def wait_healthy(url: str, proc, deadline_s: float = 300) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        assert proc.poll() is None, f"madpo serve exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not healthy in {deadline_s} s")


@pytest.mark.ray
@pytest.mark.slow
def test_madpo_serve_puts_haproxy_in_front_and_sigterm_stops_everything_it_started(tiny_base_dir, tmp_path):
    """`madpo serve` with its defaults on a cluster of its own: HAProxy on --port answers as the
    replica's own port does, with the same auth and streaming; SIGTERM stops Serve, HAProxy and the
    cluster it started."""
    import os
    import signal
    import subprocess
    import sys

    from madpo_ray.serving.launch import FALLBACK_PROXY_OFFSET, HAPROXY_STATS_OFFSET

    port, key = 8600, "haproxy-key-5e1"
    (tmp_path / "key").write_text(key)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "madpo_ray", "serve", "--model", str(tiny_base_dir),
                             "--port", str(port), "--backend", "transformers"],
                            env={**env, "MADPO_API_KEY_FILE": str(tmp_path / "key")}, stdout=log,
                            stderr=subprocess.STDOUT)
    doors = (port, port + 1, port + FALLBACK_PROXY_OFFSET)  # HAProxy, the replica, Serve's proxy actor
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        deadline = time.time() + 60  # the replica answers before Serve calls the app running
        while "ingress: haproxy on port 8600" not in (tmp_path / "serve.log").read_text():
            assert time.time() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        assert listeners(port, port)[port] == "haproxy"
        files = haproxy_files(port)
        assert stat.S_IMODE(files.stat().st_mode) == 0o700
        auth, body = {"Authorization": f"Bearer {key}"}, {"prompt": "Zorblex is", "max_tokens": 12}
        answers = [httpx.post(f"http://127.0.0.1:{p}/v1/completions", json=body, headers=auth, timeout=60)
                   for p in doors]
        assert [a.status_code for a in answers] == [200] * 3, answers[0].text
        text = answers[0].json()["choices"][0]["text"]
        assert text and all(a.json()["choices"][0]["text"] == text for a in answers)
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).status_code == 401
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json={**body, "stream": True},
                          headers=auth, timeout=60) as r:
            pieces = [c["choices"][0]["text"] for c in sse_data(list(r.iter_lines()))]
        assert len([p for p in pieces if p]) > 1 and "".join(pieces) == text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output[-3000:]
    assert listeners(port, port + HAPROXY_STATS_OFFSET) == {}  # HAProxy and Serve went down with it
    assert not files.exists()  # and the private folder madpo serve made for HAProxy's files
