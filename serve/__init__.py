"""The Ray Serve application (import path: serve.app:build_app)."""
