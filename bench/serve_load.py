"""Serving load test, streamed: requests/s, output tokens/s, time to first token and inter-token
latency at several concurrencies, for servers of the same model measured in one run:

  ours-vllm          our Ray Serve deployment on vLLM's async engine, through Serve's HAProxy ingress
                     (madpo serve's defaults: --backend auto picks vLLM, --ingress auto picks HAProxy)
  ours-vllm-proxy    the same replica through Serve's proxy actor (`--ingress proxy`; here the proxy actor
                     that runs beside HAProxy as its fallback, on --port + 101)
  ours-transformers  our Ray Serve deployment on the transformers engine (@serve.batch), through HAProxy
  vllm-serve         vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`), the anchor
  ours-direct        our FastAPI app and handler on vLLM under plain uvicorn, no Serve (bench/_direct_server.py):
                     splits the gap to vllm-serve into Serve's share and our app's share
  ours-vllm-di       ours-vllm with Serve's direct ingress (`madpo serve --ingress direct`, experimental in Ray
                     2.60): requests go to the replica's own HTTP port, no proxy hop (its own process and cluster)
  ours-transformers-di  the same for the transformers backend, so the backends compare like with like

Every server gets the same prompts as the same token ids (ours encode the text with the policy's
own tokenizer; vllm-serve is sent those ids), greedy, the same max_tokens, so all three produce the
same tokens. Output tokens are counted once, the same way for all: the completion_tokens of a
non-streamed greedy answer per prompt from the first vLLM server measured (the EOS token included,
as vLLM counts it); each streamed answer is checked against that answer's text ("match").
Levels and servers are interleaved in each repeat, so drift on a shared machine hits all alike.

    python bench/serve_load.py [--model DIR] [--concurrency 1,16,64,200] [--repeats 3] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, default_model, percentile

import httpx

from madpo_ray.serving.launch import FALLBACK_PROXY_OFFSET, choose_ingress, ingress_env, remove_haproxy_files

PORT, ANCHOR_PORT, DIRECT_PORT = 8395, 8296, 8297  # ours takes PORT to PORT + 103 (launch.ingress_env)
DIRECT_INGRESS = {"ours-vllm-di": ("vllm", 30100), "ours-transformers-di": ("transformers", 30300)}  # backend, port
SERVERS = ("ours-vllm", "ours-vllm-proxy", "ours-transformers", "vllm-serve", "ours-direct", *DIRECT_INGRESS)


def prompts(n: int) -> list[str]:
    """Held-out documents of the generated corpus in the default prompt template."""
    from madpo_ray.config import DEFAULT_PROMPT_TEMPLATE
    from madpo_ray.data.corpus.generated import generate_corpus

    return [DEFAULT_PROMPT_TEMPLATE.format(document=d.document) for d in generate_corpus(n, seed=12345)]


async def one_stream(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed completion: when each content chunk arrived, and the text."""
    t0 = time.perf_counter()
    times, text = [], []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0].get("text") or ""
            if piece:
                times.append(time.perf_counter() - t0)
                text.append(piece)
    return {"ok": bool(times), "times": times, "text": "".join(text), "latency": time.perf_counter() - t0}


async def load(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[dict]]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def bounded(body):
            async with sem:
                try:
                    return await one_stream(client, url, body)
                except httpx.HTTPError as e:
                    return {"ok": False, "status": type(e).__name__}

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(b) for b in bodies))
        return time.perf_counter() - t0, results


def reference_answers(url: str, bodies: list[dict]) -> list[dict]:
    """Non-streamed greedy answers: their token counts are every server's output tokens."""
    async def run():
        async with httpx.AsyncClient(timeout=600) as client:
            sem = asyncio.Semaphore(16)

            async def one(body):
                async with sem:
                    r = (await client.post(url, json={**body, "stream": False})).json()
                    return {"text": r["choices"][0]["text"], "tokens": r["usage"]["completion_tokens"]}
            return await asyncio.gather(*(one(b) for b in bodies))
    return asyncio.run(run())


def summarise(wall: float, results: list[dict], reference: list[dict]) -> dict:
    """Results are in prompt order (gather keeps it), so result i is scored with reference i."""
    done = [(r, ref) for r, ref in zip(results, reference) if r["ok"]]
    ttft = [r["times"][0] for r, _ in done]
    itl = [b - a for r, _ in done for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(ref["tokens"] for _, ref in done)
    chunks = sum(len(r["times"]) for r, _ in done)
    ms = lambda xs, q: 1000 * percentile(xs, q)  # noqa: E731
    return {"failures": len(results) - len(done), "req_per_s": len(done) / wall, "tok_per_s": tokens / wall,
            "match": sum(r["text"] == ref["text"] for r, ref in done) / max(len(done), 1),
            "tokens_per_chunk": tokens / max(chunks, 1),
            **{f"ttft_p{q}": ms(ttft, q / 100) for q in (50, 95, 99)},
            **{f"itl_p{q}": ms(itl, q / 100) for q in (50, 95, 99)}}


def start_process(name: str, cmd: list[str], port: int) -> subprocess.Popen:
    """A server in its own process, returned once /healthz (ours) or /health (vLLM's) answers."""
    log = open(Path(tempfile.gettempdir()) / f"serve_load_{name}.log", "w")
    proc = subprocess.Popen(cmd, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT / "bench")
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}); see {log.name}")
        for path in ("/health", "/healthz"):
            try:
                if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
        time.sleep(2)
    proc.kill()
    raise RuntimeError(f"{name} did not become healthy in 600 s; see {log.name}")


def start_anchor(model: str, max_model_len: int) -> subprocess.Popen:
    """vLLM's own server on the same model, dtype, KV-cache size and eager mode as our engine."""
    return start_process("vllm-serve", [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
        "--enforce-eager", "--max-model-len", str(max_model_len), "--seed", "0", "--port", str(ANCHOR_PORT),
        "--host", "127.0.0.1", "--disable-log-stats", "--served-model-name", "anchor"], ANCHOR_PORT)


def start_ours(model: str, ingress: dict[str, str]) -> None:
    """Both backends in one Serve instance, one replica with 1 CPU each, behind HAProxy with Serve's
    proxy actor beside it (as `madpo serve`; `ingress`: ingress_env's variables for HAProxy)."""
    from madpo_ray.serving.launch import init_cluster, run_server

    # log_to_driver off: this process is also the load client, and relaying every replica's access
    # log into it would slow the instrument, not the servers.
    init_cluster("local", ingress, num_cpus=2, log_to_driver=False)
    run_server(model, port=PORT, num_cpus=1, app_name="vllm", route_prefix="/vllm", backend="vllm")
    # max_streams: the load test measures throughput at each concurrency, not admission control
    # (a replica's default of 4 streams at once would answer the rest 503).
    run_server(model, port=PORT, num_cpus=1, app_name="transformers", route_prefix="/transformers",
               backend="transformers", max_batch_size=16, max_streams=256)


def requests_for(server: str, texts: list[str], ids: list[list[int]], max_tokens: int) -> tuple[str, list[dict]]:
    if server == "vllm-serve":
        return (f"http://127.0.0.1:{ANCHOR_PORT}/v1/completions",
                [{"model": "anchor", "prompt": i, "max_tokens": max_tokens, "temperature": 0, "stream": True}
                 for i in ids])
    url = {"ours-vllm": f"http://127.0.0.1:{PORT}/vllm",
           "ours-vllm-proxy": f"http://127.0.0.1:{PORT + FALLBACK_PROXY_OFFSET}/vllm",
           "ours-transformers": f"http://127.0.0.1:{PORT}/transformers",
           "ours-direct": f"http://127.0.0.1:{DIRECT_PORT}",
           **{name: f"http://127.0.0.1:{port}" for name, (_, port) in DIRECT_INGRESS.items()}}[server]
    return (f"{url}/v1/completions",
            [{"prompt": t, "max_tokens": max_tokens, "temperature": 0, "stream": True} for t in texts])


def measure(args, texts: list[str], ids: list[list[int]]) -> list[dict]:
    levels = [int(x) for x in args.concurrency.split(",")]
    for server in args.servers:  # warm-up: first requests pay lazy set-up
        url, bodies = requests_for(server, texts[:8], ids[:8], args.max_tokens)
        asyncio.run(load(url, bodies, 4))
    counter = next(s for s in ("vllm-serve", "ours-vllm", "ours-transformers") if s in args.servers)
    reference = reference_answers(*requests_for(counter, texts, ids, args.max_tokens))
    rows = []
    for repeat in range(args.repeats):
        for c in levels:
            n = max(args.min_requests, 2 * c)
            for server in args.servers:
                url, bodies = requests_for(server, texts[:n], ids[:n], args.max_tokens)
                wall, results = asyncio.run(load(url, bodies, c))
                row = {"server": server, "concurrency": c, "repeat": repeat, "requests": n,
                       **summarise(wall, results, reference)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def median_of(rows: list[dict], server: str, c: int, key: str) -> float:
    return statistics.median(r[key] for r in rows if r["server"] == server and r["concurrency"] == c)


def report(rows: list[dict], servers: list[str]) -> None:
    levels = sorted({r["concurrency"] for r in rows})
    print(f"\n{'c':>4} {'server':>18} {'req/s':>7} {'tok/s (min-max)':>22} {'TTFT p50/95/99 ms':>20} "
          f"{'ITL p50/95/99 ms':>18} {'fail':>5} {'match':>6}")
    for c in levels:
        for s in servers:
            sel = [r for r in rows if r["server"] == s and r["concurrency"] == c]
            tok = [r["tok_per_s"] for r in sel]
            med = lambda k: median_of(rows, s, c, k)  # noqa: E731
            print(f"{c:>4} {s:>18} {med('req_per_s'):>7.1f} {statistics.median(tok):>8.0f} "
                  f"({min(tok):.0f}-{max(tok):.0f}){'':>2} {med('ttft_p50'):>6.0f}/{med('ttft_p95'):.0f}/"
                  f"{med('ttft_p99'):.0f} {med('itl_p50'):>6.0f}/{med('itl_p95'):.0f}/{med('itl_p99'):.0f} "
                  f"{sum(r['failures'] for r in sel):>5} {med('match'):>6.2f}")
    if "vllm-serve" in servers:
        print("\noutput tokens/s (medians) relative to vllm serve, c = " + " / ".join(map(str, levels)))
        for s in servers:
            ratios = [median_of(rows, s, c, "tok_per_s") / median_of(rows, "vllm-serve", c, "tok_per_s")
                      for c in levels]
            print(f"  {s:>20}: " + " / ".join(f"{r:.2f}x" for r in ratios))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="policy folder (default: runs/tiny's MADPO policy)")
    ap.add_argument("--concurrency", default="1,16,64,200")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-requests", type=int, default=32, help="requests per level: max(this, 2 x concurrency)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--servers", default=",".join(SERVERS))
    args = ap.parse_args()
    args.servers = args.servers.split(",")

    from madpo_ray.data.collate import encode_prompt
    from madpo_ray.models import load_tokenizer

    model = str(Path(args.model) if args.model else default_model(Path(tempfile.mkdtemp()) / "model"))
    tokenizer = load_tokenizer(model)
    texts = prompts(max(args.min_requests, 2 * max(int(x) for x in args.concurrency.split(","))))
    ids = [encode_prompt(tokenizer, t) for t in texts]
    positions = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings", 2048)
    others, ingress = [], {}
    try:
        if "vllm-serve" in args.servers:
            others.append(start_anchor(model, min(2048, positions)))  # the window our engine uses
        if "ours-direct" in args.servers:
            others.append(start_process("ours-direct", [sys.executable, "_direct_server.py", model, str(DIRECT_PORT)],
                                        DIRECT_PORT))
        for name, (backend, port) in DIRECT_INGRESS.items():
            if name in args.servers:  # the replica's port is --port + 1
                command = [sys.executable, "-m", "madpo_ray", "serve", "--model", model, "--backend", backend,
                           "--ingress", "direct", "--port", str(port - 1)]
                others.append(start_process(name, command, port))
        if {"ours-vllm", "ours-vllm-proxy", "ours-transformers"} & set(args.servers):
            ingress = ingress_env(choose_ingress("haproxy", "127.0.0.1", PORT, None), PORT)  # removed below
            start_ours(model, ingress)
        rows = measure(args, texts, ids)
    finally:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        remove_haproxy_files(ingress)
        for proc in others:
            proc.terminate()
            proc.wait(60)
    print(f"\nmodel: {model}   max_tokens: {args.max_tokens}   repeats: {args.repeats}   greedy, streamed")
    report(rows, args.servers)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
