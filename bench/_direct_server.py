"""Our HTTP app and request handler on the vLLM engine, under plain uvicorn without Ray Serve:
`serve_load.py` measures it to split the gap to `vllm serve` between Serve's proxy hop and our
own FastAPI layer and handler.

    python bench/_direct_server.py MODEL PORT
"""

import logging
import sys

import uvicorn

from _common import ROOT  # noqa: F401  (puts the project on sys.path)

if __name__ == "__main__":
    from madpo_ray.serving.deployment import PolicyServer

    model, port = sys.argv[1], int(sys.argv[2])
    handler_class = PolicyServer.func_or_class.__bases__[0]  # the class under Serve's ingress wrapper
    handler = handler_class(model, backend="vllm")
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    uvicorn.run(handler.__serve_build_asgi_app__(), host="127.0.0.1", port=port, log_level="warning")
