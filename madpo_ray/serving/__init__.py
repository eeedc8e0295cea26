"""Serving the trained policy: OpenAI-compatible request schemas, a batched generation engine
and the FastAPI routes (no Ray in those). deployment.py wraps them in a Ray Serve deployment;
serve/app.py re-exports it under the import path that serve config files name."""
