"""Import path for the Ray Serve application: `serve run serve.app:build_app model=...`,
`serve deploy serve/config.yaml` and the KubeRay RayService name `serve.app:build_app`.

The deployment itself lives in the package (madpo_ray/serving/deployment.py), so replicas
import it from the installed package; this module only keeps the documented path working.
"""

from madpo_ray.serving.deployment import PolicyServer, build_app  # noqa: F401
