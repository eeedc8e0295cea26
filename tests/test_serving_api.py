"""The FastAPI routes without Ray: a backend slower than the request timeout gets a 504 with an
OpenAI-style body on every generating route, and the app keeps answering."""

import asyncio

from fastapi.testclient import TestClient

from madpo_ray.serving.api import ServeSettings, create_app, set_backend
from madpo_ray.serving.engine import GenResult


class SlowBackend:
    async def generate(self, prompt, params):
        await asyncio.sleep(1.0)
        return GenResult("late", "stop", 1, 1)

    def chat_prompt(self, messages):
        return messages[-1]["content"]


def test_timeouts_are_504_on_every_route():
    set_backend(SlowBackend(), ServeSettings(request_timeout_s=0.05))
    client = TestClient(create_app())
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/summarize", {"document": "x"})):
        r = client.post(path, json=body)
        assert r.status_code == 504, (path, r.text)
        assert r.json()["error"]["type"] == "timeout" and "0.05s" in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200
