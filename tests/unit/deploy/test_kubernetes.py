"""Kubernetes manifests (``deploy/kubernetes``): valid offline, and consistent with the worker.

Every built-in kind is validated against the Kubernetes OpenAPI schemas that the PyPI package
``kubernetes-validate`` ships (strict: an unknown field is an error, where ``kubectl apply``
might drop it), for the oldest Kubernetes the manifests support and the newest the package
knows. KEDA's ``ScaledObject`` is validated with ``jsonschema`` against the copy of KEDA's
CRD schema in ``deploy/kubernetes/schemas`` (see its README), made as strict. No cluster and no
network: the validating tests run with sockets refused.

The rest checks what no schema can: that the manifests agree with the worker's code and with
each other (settings names and values, the web port and probe paths, the partition count
capping KEDA, the grace period against Faust's stop timeout, secret keys, selectors).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from mode.services import Service

from stream.settings.worker import WorkerSettings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "kubernetes"
KEDA_SCHEMA = K8S / "schemas" / "keda-scaledobject-v1alpha1.json"
#: Oldest Kubernetes the manifests use fields of (PDB unhealthyPodEvictionPolicy: 1.27), and
#: the newest the installed kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
#: Settings the manifests already set that issue 21 (section 2) adds to WorkerSettings; until
#: then the worker ignores them (extra="ignore") and binds every interface, as Faust does.
PENDING_SETTINGS: set[str] = set()
Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _all_docs() -> list[Doc]:
    return [doc for path in _manifests() for doc in _load(path)]


def _one(kind: str, name: str | None = None) -> Doc:
    found = [
        d
        for d in _all_docs()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def _is_keda(doc: Doc) -> bool:
    return str(doc["apiVersion"]).startswith("keda.sh/")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every connection: the validation must work on a machine without network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _strict(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` wherever it lists ``properties``.

    KEDA's CRD schema (like the API server's pruning) lets unknown fields through; strict,
    a misspelt field is an error here rather than silently dropped at apply time.
    """
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _keda_validator() -> jsonschema.Draft7Validator:
    # An OpenAPI v3 schema object is (a subset of) JSON Schema draft 4-7 without `$schema`.
    schema = _strict(json.loads(KEDA_SCHEMA.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# --- offline schema validation --------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _manifests())
    images = {image["name"] for image in kustomization["images"]}
    used = {
        c["image"].rsplit(":", 1)[0]
        for d in _all_docs()
        if d["kind"] in ("Deployment", "Job")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert used == images == {"trendcast/worker", "trendcast/trainer"}


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_match_kubernetes_schemas(version: str) -> None:
    docs = [d for d in _all_docs() if not _is_keda(d)]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret", "Job"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.usefixtures("no_network")
def test_kubernetes_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(_one("Deployment"))
    spec = deployment["spec"]["template"]["spec"]
    spec["terminationGracePeriod"] = spec.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.usefixtures("no_network")
def test_scaledobject_matches_keda_crd_schema() -> None:
    scaled = _one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    _keda_validator().validate(scaled)
    broken = copy.deepcopy(scaled)
    broken["spec"]["maxReplicaCounts"] = broken["spec"].pop("maxReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        _keda_validator().validate(broken)
    broken = copy.deepcopy(scaled)
    broken["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 100_000  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        _keda_validator().validate(broken)


def test_trigger_authentication_is_well_formed() -> None:
    # No CRD schema is kept for it: its shape is small enough to check here.
    auth = _one("TriggerAuthentication")
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    assert set(auth["spec"]) == {"secretTargetRef"}
    refs = auth["spec"]["secretTargetRef"]
    assert all(set(ref) == {"parameter", "name", "key"} for ref in refs), refs
    assert {ref["parameter"] for ref in refs} == {"sasl", "tls", "username", "password"}


def test_kustomize_build_validates() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the manifests themselves are validated above)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(_all_docs())
    for doc in built:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "trendcast"
        if not _is_keda(doc):
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
        elif doc["kind"] == "ScaledObject":
            _keda_validator().validate(doc)


# --- consistency with the worker -----------------------------------------------------------


def _worker_env() -> dict[str, str]:
    """The TRENDCAST_* environment the worker container gets (ConfigMap + Secret refs)."""
    config = _one("ConfigMap", "trendcast-worker")["data"]
    secret = _one("Secret", "trendcast-worker")["stringData"]
    container = _worker_container()
    env = {}
    for source in container["envFrom"]:
        assert source["configMapRef"]["name"] == "trendcast-worker"
        env.update(config)
    for var in container["env"]:
        ref = var["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "trendcast-worker"
        env[var["name"]] = secret[ref["key"]]
    return env


def _worker_container() -> Doc:
    containers = _one("Deployment", "trendcast-worker")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Doc = containers[0]
    return container


def test_settings_build_from_configmap_and_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TRENDCAST_"):
            monkeypatch.delenv(name)
    env = _worker_env()
    unknown = {
        name
        for name in env
        if name.removeprefix("TRENDCAST_").lower() not in WorkerSettings.model_fields
    }
    assert unknown <= PENDING_SETTINGS, f"not WorkerSettings fields: {unknown - PENDING_SETTINGS}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = WorkerSettings()  # every value parses and the combination validates
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_password is not None
    assert str(settings.bundle) == "/bundles"
    assert settings.log_format == "json"


def test_worker_probes_ports_and_service_agree() -> None:
    config = _one("ConfigMap", "trendcast-worker")["data"]
    port = int(config["TRENDCAST_WEB_PORT"])
    container = _worker_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}
    # /ready answers readiness (dependencies + bundle), /health liveness (failing components).
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    liveness = container["livenessProbe"]
    # The worker recovers from outages by itself: only minutes of failure restart it.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 300
    service = _one("Service", "trendcast-worker")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}
    ]
    notes = service["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == port
    assert notes["prometheus.io/path"] == "/metrics"
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_selectors_match_the_worker_pods() -> None:
    deployment = _one("Deployment", "trendcast-worker")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _one("Service")["spec"]["selector"].items() <= labels.items()
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_grace_period_covers_a_clean_stop() -> None:
    spec = _one("Deployment", "trendcast-worker")["spec"]
    # KEDA owns the replica count; an applied `replicas` would reset it.
    assert "replicas" not in spec
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    # Faust (mode) gives each service this long to stop; the kubelet must wait longer.
    assert grace > Service.shutdown_timeout
    assert grace <= 2 * Service.shutdown_timeout


def test_resources_follow_the_readme_sizing() -> None:
    resources = _worker_container()["resources"]
    assert resources["requests"]["cpu"] == "1"  # one core: the worker's Python is one GIL
    assert "cpu" not in resources["limits"]  # throttling would only stall batches
    assert resources["requests"]["memory"] == "512Mi"
    assert resources["limits"]["memory"] == "1Gi"


def test_scaledobject_scales_the_worker_on_sales_lag() -> None:
    config = _one("ConfigMap", "trendcast-worker")["data"]
    scaled = _one("ScaledObject", "trendcast-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == _one("Deployment")["metadata"]["name"]
    # More workers than partitions idle: the cap is the partition count.
    assert scaled["maxReplicaCount"] == int(config["TRENDCAST_TOPIC_PARTITIONS"])
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == config["TRENDCAST_CONSUMER_GROUP"]
    assert meta["topic"] == config["TRENDCAST_SALES_TOPIC"]
    assert meta["offsetResetPolicy"] == "earliest"
    faust_hosts = re.findall(r"kafka://([^;]+)", config["TRENDCAST_KAFKA_BROKERS"])
    assert meta["bootstrapServers"].split(",") == faust_hosts
    assert int(meta["lagThreshold"]) > 0
    auth = _one("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_secret_keys_are_the_ones_referenced() -> None:
    secret = _one("Secret", "trendcast-worker")["stringData"]
    container = _worker_container()
    worker_keys = {v["valueFrom"]["secretKeyRef"]["key"] for v in container["env"]}
    keda_keys = {ref["key"] for ref in _one("TriggerAuthentication")["spec"]["secretTargetRef"]}
    assert {ref["name"] for ref in _one("TriggerAuthentication")["spec"]["secretTargetRef"]} == {
        "trendcast-worker"
    }
    assert worker_keys | keda_keys == set(secret)
    # Every TRENDCAST_* key of the Secret reaches the worker under its own name.
    assert {k for k in secret if k.startswith("TRENDCAST_")} == worker_keys
    assert all(v["name"] == v["valueFrom"]["secretKeyRef"]["key"] for v in container["env"])
    # Placeholders only: nothing that could be a real credential is committed.
    assert "CHANGE-ME" in secret["TRENDCAST_KAFKA_SASL_PASSWORD"]
    assert "CHANGE-ME" in secret["TRENDCAST_REDIS_URL"]
    assert "CHANGE-ME" in secret["TRENDCAST_WEB_TOKEN"]
    # Secrets never sit in the ConfigMap.
    config = _one("ConfigMap", "trendcast-worker")["data"]
    assert not set(config) & set(secret)


def test_worker_reads_bundles_the_trainer_writes() -> None:
    config = _one("ConfigMap", "trendcast-worker")["data"]
    worker_pod = _one("Deployment", "trendcast-worker")["spec"]["template"]["spec"]
    job_pod = _one("Job", "trendcast-trainer")["spec"]["template"]["spec"]

    def bundles(pod: Doc) -> tuple[str, str, bool]:
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "bundles"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "bundles"]
        claim = volume["persistentVolumeClaim"]["claimName"]
        return claim, mount["mountPath"], bool(mount.get("readOnly"))

    assert bundles(worker_pod) == ("trendcast-bundles", config["TRENDCAST_BUNDLE"], True)
    assert bundles(job_pod) == ("trendcast-bundles", config["TRENDCAST_BUNDLE"], False)
    (trainer,) = job_pod["containers"]
    assert trainer["image"].startswith("trendcast/trainer:")
    script = " ".join(trainer["command"] + trainer["args"])
    assert "trendcast train" in script and '--bundle "/bundles/$version"' in script
    assert 'trendcast promote "$version" --bundles /bundles' in script
    assert worker_pod["securityContext"]["runAsUser"] == job_pod["securityContext"]["runAsUser"]
    # The image the Job runs is the Dockerfile's TensorFlow stage.
    assert re.search(r"^FROM \S+ AS trainer$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    pvc = _one("PersistentVolumeClaim", "trendcast-bundles")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # workers on every node read it
