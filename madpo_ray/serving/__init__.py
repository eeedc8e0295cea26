"""Serving the trained policy: OpenAI-compatible request schemas, a batched generation engine
and the FastAPI routes. Ray Serve wraps these in serve/app.py; nothing here imports Ray."""
