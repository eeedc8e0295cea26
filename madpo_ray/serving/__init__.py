"""Serving the trained policy: OpenAI-compatible request schemas, a batched generation engine
and the FastAPI routes (no Ray in those). deployment.py wraps them in a Ray Serve deployment;
the shipped Serve config (serving/config.yaml) names it as madpo_ray.serving.deployment:build_app."""
