"""docker/k8s/: every manifest against the Kubernetes schemas (the pinned
``kubernetes-validate``, strict: unknown fields fail), KEDA's ScaledObjects against
docker/schemas/keda-scaledobject.json, and what the manifests promise: the workers scale on
their own model's stream and consumer group (inference/protocol.py), probes hit endpoints
that exist, the drain fits the grace period, secrets come from the Secret, and only the
platform reaches PostgreSQL and Redis.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from inference.protocol import GROUP, KeySpace

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.31.0"
KEDA_SCHEMA = json.loads((ROOT / "docker" / "schemas" / "keda-scaledobject.json").read_text())


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _f, doc in manifests() if doc["kind"] == kind}


def _id(item: tuple[str, dict]) -> str:
    return f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}"


@pytest.mark.parametrize(
    "item", [m for m in manifests() if m[1]["kind"] != "ScaledObject"], ids=_id
)
def test_each_manifest_follows_the_kubernetes_schema(item):
    _file, doc = item
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "item", [m for m in manifests() if m[1]["kind"] == "ScaledObject"], ids=_id
)
def test_each_scaled_object_follows_the_keda_schema(item):
    jsonschema.validate(item[1], KEDA_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_the_validators_reject_a_broken_manifest():
    deployment = json.loads(json.dumps(by_kind("Deployment")["platform-web"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = json.loads(json.dumps(by_kind("ScaledObject")["inference-worker-glm-4-6v-flash"]))
    scaled["spec"]["triggers"][0]["metadata"]["streamLength"] = "10"  # two modes at once
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, KEDA_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_kustomization_lists_every_manifest_but_the_migration_job():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "migrate-job.yaml"}
    assert sorted(listed) == sorted(files)


def _container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _model_of(deployment: dict) -> str:
    command = _container(deployment)["command"]
    return command[command.index("--model") + 1]


def test_each_worker_scales_on_its_own_models_stream_and_group():
    deployments = by_kind("Deployment")
    workers = {n: d for n, d in deployments.items() if n.startswith("inference-worker-")}
    scaled = by_kind("ScaledObject")
    models = json.loads(by_kind("ConfigMap")["platform-config"]["data"]["INFERENCE_MODELS"])
    assert {_model_of(d) for d in workers.values()} == set(models)
    keys = KeySpace()  # INFERENCE_KEY_PREFIX is left at its default in platform-config
    assert "INFERENCE_KEY_PREFIX" not in by_kind("ConfigMap")["platform-config"]["data"]
    for name, deployment in workers.items():
        target = scaled[name]
        assert target["spec"]["scaleTargetRef"]["name"] == name
        modes = set()
        for trigger in target["spec"]["triggers"]:
            metadata = trigger["metadata"]
            assert metadata["stream"] == keys.requests(_model_of(deployment))
            assert metadata["consumerGroup"] == GROUP
            assert metadata["address"] == "redis:6379"
            modes |= {"lagCount", "pendingEntriesCount"} & set(metadata)
        assert modes == {"lagCount", "pendingEntriesCount"}  # the queue and the load


def test_probes_use_the_real_endpoints_and_the_drain_fits_the_grace_period():
    deployments = by_kind("Deployment")
    web = _container(deployments["platform-web"])
    assert web["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert web["livenessProbe"]["httpGet"]["path"] == "/health/live"
    from webplatform import urls

    routes = {str(p.pattern) for p in urls.urlpatterns}
    assert {"health/ready", "health/live", "metrics"} <= routes
    for name, deployment in deployments.items():
        if not name.startswith("inference-worker-"):
            continue
        container = _container(deployment)
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
        assert container["ports"] == [{"name": "metrics", "containerPort": 9400}]
        command = container["command"]
        drain = float(command[command.index("--drain-seconds") + 1])
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert drain + 10 <= grace, name
    assert by_kind("ConfigMap")["platform-config"]["data"]["INFERENCE_METRICS_PORT"] == "9400"


def test_web_is_autoscaled_and_every_deployment_has_a_disruption_budget():
    hpa = by_kind("HorizontalPodAutoscaler")["platform-web"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "platform-web"
    budgets = by_kind("PodDisruptionBudget")
    for name in ("platform-web", "inference-worker-glm-4-6v-flash", "inference-worker-ocr-lite"):
        deployment = by_kind("Deployment")[name]
        assert budgets[name]["spec"]["selector"] == deployment["spec"]["selector"]
    beat = by_kind("Deployment")["platform-beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    job = by_kind("Job")["platform-migrate"]
    assert _container(job)["command"][-2:] == ["migrate", "--no-input"]


def test_secrets_are_files_from_the_secret_and_no_value_is_in_the_manifests():
    config = by_kind("ConfigMap")["platform-config"]["data"]
    for variable, value in config.items():
        if re.search(r"SECRET|PASSWORD|DATABASE_URL", variable):
            assert variable.endswith("_FILE") and value.startswith("/run/secrets/platform/")
    assert by_kind("Secret") == {}  # created out of band (docs/operations.md)
    for name, deployment in by_kind("Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        if name.startswith("inference-worker-") or name == "clamav":
            assert "volumes" not in spec or all("secret" not in v for v in spec["volumes"])
            continue  # a worker needs no secret at all
        secret_volumes = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
        assert secret_volumes == ["platform-secrets"], name
        assert spec["securityContext"]["runAsNonRoot"] is True


def test_only_the_platform_reaches_postgres_and_redis():
    policies = by_kind("NetworkPolicy")
    clients = {
        name
        for name, d in {**by_kind("Deployment"), **by_kind("Job")}.items()
        if d["spec"]["template"]["metadata"]["labels"].get("platform/data-client") == "true"
    }
    assert clients == {
        "platform-web", "platform-celery", "platform-beat", "platform-migrate",
        "inference-worker-glm-4-6v-flash", "inference-worker-ocr-lite",
    }  # fmt: skip
    for store, port in (("postgres", 5432), ("redis", 6379)):
        policy = policies[f"{store}-platform-only"]
        assert policy["spec"]["podSelector"] == {"matchLabels": {"app": store}}
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = policy["spec"]["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": port}]
        peers = rule["from"]
        assert {"podSelector": {"matchLabels": {"platform/data-client": "true"}}} in peers
        for peer in peers:  # nothing else, but KEDA's operator on Redis
            if peer.get("namespaceSelector"):
                assert store == "redis"
                assert peer["namespaceSelector"]["matchLabels"] == {
                    "kubernetes.io/metadata.name": "keda"
                }
