"""Shared fixtures: offline env, one thread per test process, a tiny model built from scratch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # two cores shared with Ray workers: oversubscription is 10x slower

from madpo_ray.config import ModelConfig  # noqa: E402
from madpo_ray.data.corpus.generated import generate_corpus  # noqa: E402

from helpers import SERVE_PORT, SERVE_TEST_KEY, free_tcp_port  # noqa: E402

TINY = ModelConfig(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                   max_position_embeddings=256)


def pytest_collection_modifyitems(items):
    """Modules that take the session's Ray cluster down for a cluster of their own
    (`STOPS_SESSION_CLUSTER = True`: test_submit.py's `ray start --head`) run last, so that the
    modules after them need not start the session's cluster again. The sort keeps the order otherwise."""
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "STOPS_SESSION_CLUSTER", False))


@pytest.fixture(scope="session")
def corpus_docs():
    return [d.to_dict() for d in generate_corpus(64, seed=0, prefix="train")]


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, corpus_docs):
    from madpo_ray.models import build_tiny_base

    texts = [d["document"] for d in corpus_docs] + [d["reference"] for d in corpus_docs]
    return build_tiny_base(texts, TINY, tmp_path_factory.mktemp("tiny_base"), seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base_dir):
    from madpo_ray.models import load_tokenizer

    return load_tokenizer(str(tiny_base_dir))


@pytest.fixture()
def tiny_model(tiny_base_dir):
    from madpo_ray.models import load_causal_lm

    return load_causal_lm(str(tiny_base_dir)).eval()


@pytest.fixture(scope="session")
def scored_train(tiny_base_dir, corpus_docs, tmp_path_factory):
    """32 scored pairs of the tiny model (as reference and as an untrained reward model)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from madpo_ray.data.collate import tokenize_pairs
    from madpo_ray.data.preference import ValidationReport
    from madpo_ray.models import load_causal_lm, load_reward_model, load_tokenizer
    from madpo_ray.stages.score import score_examples

    tok = load_tokenizer(str(tiny_base_dir))
    rows = [{"prompt": d["document"][:200] + "\nTL;DR:", "chosen": " " + d["reference"],
             "rejected": " " + corpus_docs[(i + 1) % len(corpus_docs)]["reference"], "row_id": i}
            for i, d in enumerate(corpus_docs[:32])]
    exs = tokenize_pairs(tok, rows, 64, 96, "truncate", ValidationReport(source="t"), False)
    ref = load_causal_lm(str(tiny_base_dir)).eval()
    rm = load_reward_model(str(tiny_base_dir), pad_token_id=tok.pad_token_id).eval()
    scored = score_examples(ref, rm, exs, tok.pad_token_id)
    for i, row in enumerate(scored):  # each margin's uncertainty, as an ensemble would give it (madpo_expected)
        row["margin_std"] = 0.25 * (i % 5)
    path = tmp_path_factory.mktemp("scored") / "train.parquet"
    pq.write_table(pa.Table.from_pylist(scored), path)
    return path


# ----------------------------------------------------------------------------- Ray clusters
class RayClusters:
    """The test process's one Ray cluster, shared by every module that needs its kind.

    Two kinds, because a test needs one or the other: `two_nodes` (two raylets of one CPU on
    loopback, so a two-worker training places one worker per node: the pipeline, compare, study,
    Tune) and `one_node` (one node of two CPUs: Serve, whose proxies run on every node and would
    want one port twice on one machine, and a Tune trial that holds both CPUs). The live cluster stays up across modules and is replaced
    only when a module asks for the other kind, or when a test left a cluster of its own."""

    def __init__(self):
        self.ingress_env = {}  # the one-node cluster's ingress variables (its HAProxy files' folder among them)
        self.kind, self.cluster = None, None
        self.starts = 0  # clusters started so far: what a cached deployment on one is checked against

    def use(self, kind: str):
        import ray

        if self.kind == kind and ray.is_initialized():
            return self.cluster
        self.stop()
        if ray.is_initialized():  # started by a test itself (e.g. init_ray in a command)
            ray.shutdown()
        self.cluster = self.start_two_nodes() if kind == "two_nodes" else self.start_one_node()
        self.kind = kind
        self.starts += 1
        return self.cluster

    @staticmethod
    def start_two_nodes():
        import ray
        from ray.cluster_utils import Cluster

        from madpo_ray.runtime import worker_env

        # A free dashboard port: another Ray on this machine (a user's, a benchmark's) may hold 8265.
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                                "dashboard_host": "127.0.0.1",
                                                                "dashboard_port": free_tcp_port()})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": worker_env()})  # as runtime.init_ray does
        return cluster

    def start_one_node(self):
        import ray

        from madpo_ray.serving.launch import environ, ingress_env, serve_runtime_env

        self.ingress_env = ingress_env("haproxy", SERVE_PORT)  # madpo serve's default path: HAProxy in front
        with environ(self.ingress_env):
            ray.init(address="local", num_cpus=2, runtime_env=serve_runtime_env({"MADPO_TEST_KEY": SERVE_TEST_KEY}),
                     include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_tcp_port())
        return None

    def stop(self) -> None:
        import ray

        if self.kind == "one_node":
            from ray import serve

            serve.shutdown()
        if self.kind is not None:
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        if self.ingress_env:  # launch imports FastAPI: only the processes that started Serve pay for it
            from madpo_ray.serving.launch import remove_haproxy_files

            remove_haproxy_files(self.ingress_env)
        self.kind, self.cluster, self.ingress_env = None, None, {}


@pytest.fixture(autouse=True)
def only_ray_tests_start_ray(request):
    """`make test` runs the tests not marked ray beside the Ray tests: one that starts a Ray cluster
    there would race the Ray tests' cluster for the cores and ports, so it must say it is a Ray test."""
    import sys

    started_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if request.node.get_closest_marker("ray") is None:
        started = "ray" in sys.modules and sys.modules["ray"].is_initialized() and not started_before
        assert not started, "this test started Ray: mark it `ray` (see tests/conftest.py)"


@pytest.fixture(scope="session")
def ray_clusters():
    clusters = RayClusters()
    yield clusters
    clusters.stop()


@pytest.fixture(scope="module")
def ray_two_nodes(ray_clusters):
    """The session's two-node cluster (started, or kept from an earlier module)."""
    import ray

    cluster = ray_clusters.use("two_nodes")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
    return cluster


@pytest.fixture(scope="module")
def ray_one_node(ray_clusters):
    """The session's one-node cluster of two CPUs (started, or kept from an earlier module)."""
    return ray_clusters.use("one_node")


@pytest.fixture(scope="module")
def ray_for_serving(ray_one_node):
    """The one-node cluster for Serve. Serve stays up across modules (tests/serving/conftest.py's
    apps are deployed once for the session); a module deletes the apps it deploys itself."""
    return ray_one_node


@pytest.fixture(scope="session")
def full_run(ray_clusters, tmp_path_factory):
    """One CI-sized `madpo run` on the two-node cluster, every stage: the pipeline's tests read it,
    and compare, study and Tune tests start from copies of its scored pairs."""
    from helpers import tiny_config

    from madpo_ray.pipeline import Pipeline

    ray_clusters.use("two_nodes")
    tmp = tmp_path_factory.mktemp("runs")
    p = Pipeline(tiny_config(tmp, "full", "policy.optim.max_steps=6"))  # the DDP test's two-worker leg
    return p, p.run()
