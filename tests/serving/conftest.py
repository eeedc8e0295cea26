"""The transformers apps that test_serve.py and test_serve_hardening.py send HTTP to, deployed once
for both on the session's one-node cluster, in one step so that their replicas start side by side."""

import pytest

from helpers import SERVE_FILE_KEY, SERVE_PORT


@pytest.fixture(scope="session")
def transformers_apps(tiny_base_dir, ray_clusters, tmp_path_factory) -> int:
    """/ (batched; deployed first, so its timeouts set the proxies'), /secured (key from the
    cluster's environment), /guarded (key from a file, short body deadlines, two slow bodies at
    most), /narrow (unbatched, one request in flight and one queued). Returns the cluster start
    they were deployed on."""
    from madpo_ray.serving.launch import app_spec, deploy_apps

    ray_clusters.use("one_node")
    key_file = tmp_path_factory.mktemp("secret") / "api_key"
    key_file.write_text(SERVE_FILE_KEY)
    model = str(tiny_base_dir)
    deploy_apps([app_spec(model, num_cpus=0.5, max_batch_size=16, batch_wait_timeout_s=0.05),
                 app_spec(model, num_cpus=0.25, app_name="secured", route_prefix="/secured",
                          api_key_env="MADPO_TEST_KEY"),
                 app_spec(model, num_cpus=0.25, app_name="guarded", route_prefix="/guarded",
                          api_key_file=str(key_file), body_timeout_s=3, body_grace_s=0.5, max_slow_bodies=2),
                 app_spec(model, num_cpus=0.25, app_name="narrow", route_prefix="/narrow", batching=False,
                          max_ongoing_requests=1, max_queued_requests=1)], port=SERVE_PORT)
    return ray_clusters.starts


@pytest.fixture(scope="module")
def server(transformers_apps, ray_clusters) -> str:
    ray_clusters.use("one_node")
    assert ray_clusters.starts == transformers_apps, \
        "the session's serving apps went with the cluster they ran on: run the serving modules together"
    return f"http://127.0.0.1:{SERVE_PORT}"
