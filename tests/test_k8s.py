"""Every KubeRay manifest, rendered through each kustomize overlay, validates strictly
(unknown fields rejected) against the ray.io/v1 CRD schemas in tests/k8s_schemas/."""

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from madpo_ray.config import resolve_preset

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "k8s_schemas"
KIND_TO_SCHEMA = {"RayJob": "rayjob_v1.json", "RayService": "rayservice_v1.json", "RayCluster": "raycluster_v1.json"}
OVERLAYS = ["k8s/base", "k8s/overlays/cpu", "k8s/overlays/gpu"]

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")


def strict(schema: dict) -> dict:
    """additionalProperties: false wherever an object lists properties and allows nothing extra
    (what kubeconform -strict does): a misspelt field then fails validation."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


VALIDATORS = {kind: jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / f).read_text())))
              for kind, f in KIND_TO_SCHEMA.items()}


def validate(doc: dict) -> list[str]:
    v = VALIDATORS.get(doc.get("kind"))
    if v is None:
        return []
    assert doc["apiVersion"] == "ray.io/v1"
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / overlay)], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate_strictly(overlay):
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["NetworkPolicy"] * 3 + ["PersistentVolumeClaim", "RayJob", "RayJob", "RayService"]
    for doc in docs:
        assert validate(doc) == [], f"{overlay} {doc['kind']}/{doc['metadata']['name']}"


@needs_kubectl
def test_lifecycle_security_and_probes_are_set():
    for overlay in OVERLAYS:
        for doc in render(overlay):
            if doc["kind"] == "RayJob":
                spec = doc["spec"]
                assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
                assert spec["activeDeadlineSeconds"] > 0 and spec["preRunningDeadlineSeconds"] > 0
                assert spec["submissionMode"] == "HTTPMode"  # no submitter pod an eviction could kill
                cluster = spec["rayClusterSpec"]
            elif doc["kind"] == "RayService":
                cluster = doc["spec"]["rayClusterConfig"]
                workers = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                assert workers["readinessProbe"]["httpGet"]["path"] == "/healthz"
            else:
                continue
            pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
            for pod in pods:
                assert pod["securityContext"]["runAsNonRoot"] is True
                for c in pod["containers"]:
                    assert c["resources"]["requests"] and c["resources"]["limits"]
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "madpo-runs" for v in pod["volumes"])
    gpu = {d["metadata"]["name"]: d for d in render("k8s/overlays/gpu")}
    worker = gpu["madpo-pipeline"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_misspelt_field_is_rejected():
    doc = yaml.safe_load((Path(__file__).parent / "fixtures" / "rayjob_misspelt.yaml").read_text())
    errors = validate(doc)
    assert any("shutdownAfterJobFinish" in e for e in errors), errors
    fixed = copy.deepcopy(doc)
    fixed["spec"]["shutdownAfterJobFinishes"] = fixed["spec"].pop("shutdownAfterJobFinish")
    assert validate(fixed) == []


def test_base_files_validate_without_kustomize():
    """The raw base files validate too, so the check runs even where kubectl is missing."""
    for f in sorted((ROOT / "k8s" / "base").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") in KIND_TO_SCHEMA:
                assert validate(doc) == [], f.name


def test_dockerfile_matches_the_pinned_ray_and_ignores_local_state():
    """The image's Ray must be the Ray the project pins, or jobs fail on version mismatch."""
    import re

    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    docker = (ROOT / "Dockerfile").read_text()
    assert f"rayproject/ray:{pinned}-" in docker
    for doc in render("k8s/base") if shutil.which("kubectl") else []:
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") if "spec" in doc else None
        if cluster:
            assert cluster["rayVersion"] == pinned
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)


def ray_clusters(docs):
    for doc in docs:
        if doc["kind"] in ("RayJob", "RayService"):
            yield doc, doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def pods_of(cluster):
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_head_has_token_auth_and_pods_are_locked_down(overlay):
    for doc, cluster in ray_clusters(render(overlay)):
        assert cluster["authOptions"]["mode"] == "token", doc["metadata"]["name"]
        for tpl in pods_of(cluster):
            pod = tpl["spec"]
            assert tpl["metadata"]["labels"]["app.kubernetes.io/name"] == "madpo-ray"  # the NetworkPolicy's selector
            assert pod["automountServiceAccountToken"] is False
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            tmp = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            for c in pod["containers"]:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True
                assert any(m["mountPath"] == "/tmp" and m["name"] in tmp for m in c["volumeMounts"])
                assert c["resources"]["limits"]["ephemeral-storage"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_serve_pod_reads_its_api_key_from_a_secret(overlay):
    [(svc, cluster)] = [(d, c) for d, c in ray_clusters(render(overlay)) if d["kind"] == "RayService"]
    for tpl in pods_of(cluster):
        secrets = {v["name"]: v["secret"] for v in tpl["spec"]["volumes"] if "secret" in v}
        for c in tpl["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert "MADPO_API_KEY" not in env  # a value in the manifest would be a committed secret
            path = env["MADPO_API_KEY_FILE"]["value"]
            [mount] = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
            assert mount["name"] in secrets and secrets[mount["name"]]["optional"] is False
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["livenessProbe"]["httpGet"]["port"] == 8000


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_serve_pod_puts_haproxy_in_front_of_its_replicas(overlay):
    """Serve reads RAY_SERVE_ENABLE_HA_PROXY when its processes start, on every node: a pod without
    it would serve its share of the Service through the slower proxy actor."""
    [(svc, cluster)] = [(d, c) for d, c in ray_clusters(render(overlay)) if d["kind"] == "RayService"]
    timeout = yaml.safe_load(svc["spec"]["serveConfigV2"])["http_options"]["request_timeout_s"]
    containers = [c for tpl in pods_of(cluster) for c in tpl["spec"]["containers"]]
    assert len(containers) == 2
    for c in containers:
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", c["name"]
        assert env.get("RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S") == str(timeout), c["name"]  # HAProxy sets none itself


# A small NetworkPolicy evaluator (the API's semantics: a pod selected by no policy of a direction
# is open in that direction; otherwise the union of the selecting policies' rules applies).
NAMESPACE = "madpo"


def selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok:
            return False
    return True


def pod(labels: dict, namespace: str = NAMESPACE) -> dict:
    return {"labels": labels, "ns_labels": {"kubernetes.io/metadata.name": namespace}}


def peer_matches(peer: dict, end: dict) -> bool:
    import ipaddress

    if "ipBlock" in peer:
        if "ip" not in end:
            return False
        ip, block = ipaddress.ip_address(end["ip"]), peer["ipBlock"]
        inside = lambda cidr: ip.version == ipaddress.ip_network(cidr).version and ip in ipaddress.ip_network(cidr)
        return inside(block["cidr"]) and not any(inside(c) for c in block.get("except", []))
    if "ip" in end:
        return False  # an address outside the cluster is no pod and in no namespace
    if "namespaceSelector" in peer:
        in_ns = selects(peer["namespaceSelector"], end["ns_labels"])
    else:
        in_ns = end["ns_labels"]["kubernetes.io/metadata.name"] == NAMESPACE
    return in_ns and selects(peer.get("podSelector", {}), end["labels"])


def allowed(policies: list[dict], direction: str, labels: dict, end: dict, port: int, proto: str = "TCP") -> bool:
    """Whether a pod with `labels` accepts (Ingress) or may open (Egress) this connection."""
    key, peers_key = direction.lower(), "from" if direction == "Ingress" else "to"
    selecting = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], labels)
                 and direction in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for rule in (r for spec in selecting for r in spec.get(key, [])):
        ports = rule.get("ports")
        port_ok = not ports or any(p.get("protocol", "TCP") == proto and p.get("port") in (None, port) for p in ports)
        if port_ok and (peers_key not in rule or any(peer_matches(x, end) for x in rule[peers_key])):
            return True
    return False


def app_pod_labels(docs) -> dict[str, dict]:
    """Every Ray pod template's labels, by component (pipeline, tune, serve)."""
    return {tpl["metadata"]["labels"]["app.kubernetes.io/component"]: tpl["metadata"]["labels"]
            for _, cluster in ray_clusters(docs) for tpl in pods_of(cluster)}


# GCS, dashboard, client, agent, object manager, workers; then Serve's under HAProxy: the first replica's
# own port, the proxy actor (HAProxy's fallback), HAProxy's metrics and stats page
RAY_PORTS = [6379, 8265, 10001, 52365, 8076, 10002, 19999, 30000, 8500, 9101, 8404]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_ports_admit_only_the_apps_own_pods_and_serve_stays_public(overlay):
    docs = render(overlay)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = app_pod_labels(docs)
    assert set(pods) == {"pipeline", "tune", "serve"}
    neighbour = pod({"app": "something-else"})  # another workload in the same namespace
    operator = pod({"app.kubernetes.io/name": "kuberay-operator"}, namespace="kuberay-operator")
    for component, labels in pods.items():
        for port in RAY_PORTS:
            assert not allowed(policies, "Ingress", labels, neighbour, port), (component, port)
            assert not allowed(policies, "Ingress", labels, {"ip": "203.0.113.7"}, port), (component, port)
            assert allowed(policies, "Ingress", labels, pod(pods["serve"]), port), (component, port)
            assert allowed(policies, "Ingress", labels, operator, port) == (port in (8265, 52365)), (component, port)
        public = component == "serve"  # the Serve HTTP port, API key required
        for source in (neighbour, pod({"x": "y"}, namespace="ingress-nginx"), {"ip": "203.0.113.7"}):
            assert allowed(policies, "Ingress", labels, source, 8000) == public, (component, source)


METADATA = ["169.254.169.254", "fd00:ec2::254", "100.100.100.200"]  # AWS/GCP/Azure, AWS IPv6, Alibaba


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_egress_reaches_dns_ray_and_storage_but_never_the_metadata_address(overlay):
    docs = render(overlay)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    dns = pod({"k8s-app": "kube-dns"}, namespace="kube-system")
    for component, labels in app_pod_labels(docs).items():
        for ip in METADATA:
            for port in (80, 443, 53, 8080):
                assert not allowed(policies, "Egress", labels, {"ip": ip}, port), (component, ip, port)
        assert allowed(policies, "Egress", labels, dns, 53, "UDP") and allowed(policies, "Egress", labels, dns, 53)
        assert not allowed(policies, "Egress", labels, dns, 443)
        for port in RAY_PORTS:
            assert allowed(policies, "Egress", labels, pod(labels), port), (component, port)
            assert not allowed(policies, "Egress", labels, pod({"app": "something-else"}), port), (component, port)
        assert not allowed(policies, "Egress", labels, {"ip": "10.96.0.1"}, 443)  # the API server's Service IP
        assert not allowed(policies, "Egress", labels, {"ip": "52.216.8.8"}, 80)  # plain HTTP nowhere
        # HTTPS to public object stores / the Hugging Face Hub for the training jobs only; the
        # replica facing the internet reaches nothing outside the app.
        training = component in ("pipeline", "tune")
        for ip in ("52.216.8.8", "2600:1f18::1"):
            assert allowed(policies, "Egress", labels, {"ip": ip}, 443) == training, (component, ip)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tune_cannot_race_the_pipeline_and_serve_reads_what_the_pipeline_writes(overlay):
    docs = {d["metadata"]["name"]: d for d in render(overlay)}
    assert docs["madpo-tune"]["spec"]["suspend"] is True and not docs["madpo-pipeline"]["spec"].get("suspend")
    entry = docs["madpo-pipeline"]["spec"]["entrypoint"]
    config = yaml.safe_load(resolve_preset(entry.split(" -c ")[1].split()[0]).read_text())  # a shipped preset's name
    serve_cfg = yaml.safe_load(docs["madpo-serve"]["spec"]["serveConfigV2"])
    model = serve_cfg["applications"][0]["args"]["model"]
    assert model == f"/runs/{config['name']}/policy/{config['policy']['loss']['name']}/model", (overlay, model)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_shipped_serve_config_keeps_the_deployment_s_router_backoff(overlay):
    """A serve config that sets any `request_router_config` key replaces the code's whole router config,
    back to Serve's 0.5-s retry backoff (serving/deployment.py, ROUTER_BACKOFF): neither the RayService
    nor the config `madpo init` writes may set one."""
    docs = {d["metadata"]["name"]: d for d in render(overlay)}
    shipped = (ROOT / "madpo_ray" / "serving" / "config.yaml").read_text()
    for text in (docs["madpo-serve"]["spec"]["serveConfigV2"], shipped):
        for app in yaml.safe_load(text)["applications"]:
            for deployment in app.get("deployments", []):
                assert "request_router_config" not in deployment, (overlay, app["name"], deployment)


CACHE_ENV = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "MPLCONFIGDIR")


def writable_emptydir_at(pod_spec: dict, container: dict, path: str) -> bool:
    """Whether `path` lies under a writable emptyDir mount of the container (the root filesystem is read-only)."""
    empty = {v["name"] for v in pod_spec["volumes"] if "emptyDir" in v}
    return any(m["name"] in empty and not m.get("readOnly") and (path + "/").startswith(m["mountPath"].rstrip("/") + "/")
               for m in container["volumeMounts"])


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_container_caches_under_tmp_and_has_a_memory_dev_shm(overlay):
    for doc, cluster in ray_clusters(render(overlay)):
        for tpl in pods_of(cluster):
            spec = tpl["spec"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            for c in spec["containers"]:
                where = f"{overlay} {doc['metadata']['name']} {c['name']}"
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                for name in CACHE_ENV:
                    assert name in env and env[name].startswith("/tmp"), (where, name)
                    assert writable_emptydir_at(spec, c, env[name]), (where, name)
                [shm] = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
                assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory", where
        runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}") or {}
        hf = runtime_env.get("env_vars", {}).get("HF_HOME")
        for tpl in pods_of(cluster) if hf else []:  # a job's own HF cache must be writable on every node
            for c in tpl["spec"]["containers"]:
                assert any(hf.startswith(m["mountPath"] + "/") and not m.get("readOnly") for m in c["volumeMounts"])


# The distribution spec's reference grammar (lower-case path components, optional host[:port], tag, digest).
IMAGE_REFERENCE = re.compile(r"^(?:(?P<host>[a-zA-Z0-9.-]+(?::\d+)?)/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*"
                             r"(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")


def rendered_images(docs) -> set[str]:
    return {c["image"] for _, cluster in ray_clusters(docs) for tpl in pods_of(cluster) for c in tpl["spec"]["containers"]}


def check_images(overlay: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ROOT / "k8s" / "apply.sh"), "--check", str(overlay)], capture_output=True,
                          text=True, timeout=120)


@needs_kubectl
def test_overlay_images_fail_closed_until_the_registry_is_set(tmp_path):
    """As shipped, the overlays' image cannot be pulled (an invalid reference in the reserved .invalid
    domain: nobody can publish it) and k8s/apply.sh refuses it; set, it passes."""
    for overlay in ("k8s/overlays/cpu", "k8s/overlays/gpu"):
        [image] = rendered_images(render(overlay))
        assert ".invalid/" in image and not IMAGE_REFERENCE.match(image), image
    for overlay in OVERLAYS:  # the base's bare name would be pulled from Docker Hub's library/
        out = check_images(ROOT / overlay)
        assert out.returncode == 2 and out.stderr.startswith(f"refusing {ROOT / overlay}: image not set"), out.stderr
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    kust = tmp_path / "k8s" / "overlays" / "gpu" / "kustomization.yaml"
    text = kust.read_text()
    kust.write_text(re.sub(r"newName: \S+", "newName: registry.example.com:5000/ml/madpo-ray", text))
    out = check_images(kust.parent)
    assert out.returncode == 0 and "registry.example.com:5000/ml/madpo-ray:0.1.0-gpu" in out.stdout, out.stderr
    assert IMAGE_REFERENCE.match("registry.example.com:5000/ml/madpo-ray:0.1.0-gpu")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_image_code_is_root_owned_and_the_image_runs_unprivileged():
    """The runtime user cannot rewrite the code it runs, and the image ends as that user."""
    steps = dockerfile_instructions()
    copies = [args for op, args in steps if op in ("COPY", "ADD")]
    assert copies
    for args in copies:
        chown = re.search(r"--chown=(\S+)", args)
        assert chown is None or chown.group(1) in ("0:0", "root:root", "0", "root"), args
        assert re.sub(r"--\S+", "", args).split()[:-1] != ["."], f"copies the whole build folder: {args}"
    users = [i for i, (op, _) in enumerate(steps) if op == "USER"]
    last = steps[users[-1]][1].split(":")[0]
    assert last not in ("0", "root") and users[-1] > max(i for i, (op, _) in enumerate(steps) if op in ("RUN", "COPY"))
    workdir = [args for op, args in steps if op == "WORKDIR"][-1]
    assert not workdir.startswith("/home/"), workdir  # a folder the runtime user's home could swap out
    assert any(op == "RUN" and "chown -R 0:0" in args and "go=rX" in args for op, args in steps)
