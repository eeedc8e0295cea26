"""Every KubeRay manifest, rendered through each kustomize overlay, validates strictly
(unknown fields rejected) against the ray.io/v1 CRD schemas in tests/k8s_schemas/."""

import copy
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

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
    assert kinds == ["NetworkPolicy", "PersistentVolumeClaim", "RayJob", "RayJob", "RayService"]
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
def test_network_policy_admits_only_the_serve_port_from_outside():
    [policy] = [d for d in render("k8s/base") if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        sources = rule["from"]
        if sources == [{"podSelector": {}}]:
            continue  # same namespace
        ports = sorted(p["port"] for p in rule["ports"])
        broad = any(s.get("namespaceSelector") == {} or "ipBlock" in s for s in sources)
        assert ports == [8000] if broad else set(ports) <= {8265, 52365}, rule


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tune_cannot_race_the_pipeline_and_serve_reads_what_the_pipeline_writes(overlay):
    docs = {d["metadata"]["name"]: d for d in render(overlay)}
    assert docs["madpo-tune"]["spec"]["suspend"] is True and not docs["madpo-pipeline"]["spec"].get("suspend")
    entry = docs["madpo-pipeline"]["spec"]["entrypoint"]
    config = yaml.safe_load((ROOT / entry.split(" -c ")[1].split()[0]).read_text())
    serve_cfg = yaml.safe_load(docs["madpo-serve"]["spec"]["serveConfigV2"])
    model = serve_cfg["applications"][0]["args"]["model"]
    assert model == f"/runs/{config['name']}/policy/{config['policy']['loss']['name']}/model", (overlay, model)
