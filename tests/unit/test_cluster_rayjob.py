"""RayJobs the precompute task creates: valid for KubeRay's CRD, their entrypoint the precompute
driver with a self-contained job, their end read from KubeRay's status, a failure mapped to the
task's, through the real kubernetes client against a local server (tests/kube_api.py)."""

from __future__ import annotations

import io
import shlex

import pytest

from emu.cluster import kube, rayjob
from emu.cluster.ray_launch import remote_command
from emu.config import resolve, to_dict
from emu.errors import ConfigError
from emu.pipeline.config import PipelineConfig, StageResources
from emu.precompute.config import PrecomputeConfig
from emu.precompute.remote import PrecomputeJob
from tests import k8s_schema
from tests.kube_api import KubeRayAPI

pytestmark = pytest.mark.skipif(k8s_schema.crd_dir_missing() is not None, reason=str(k8s_schema.crd_dir_missing()))


def _job() -> PrecomputeJob:
    return PrecomputeJob(config=to_dict(resolve(PrecomputeConfig, "precompute", "tiny")), dataset="a" * 32 + ".dir",
                         sources=["img2dataset", "webvid"], model="b" * 32 + ".dir", out="s3://b/results/precompute-k")


def _body(monkeypatch, cluster: str = "emu-ray") -> dict:
    monkeypatch.setenv("KFP_POD_NAME", "emu-run-precompute-driver")
    monkeypatch.setenv("KFP_POD_UID", "0c2b7f0e-1111-2222-3333-444455556666")
    return rayjob.build(name=kube.job_name("precompute"), namespace="team-a", cluster=cluster,
                        entrypoint=remote_command(_job()))


def test_rayjob_validates_against_the_kuberay_crd_and_carries_the_whole_job(monkeypatch):
    body = _body(monkeypatch)
    assert k8s_schema.problems(body) == []
    assert body["spec"]["clusterSelector"] == {"ray.io/cluster": "emu-ray"}
    assert body["spec"]["backoffLimit"] == 0, "the KFP task is what retries"
    assert body["metadata"]["ownerReferences"][0]["name"] == "emu-run-precompute-driver"
    command = shlex.split(body["spec"]["entrypoint"])
    assert command[:4] == ["python", "-m", "emu.precompute.remote", "--job"]
    assert PrecomputeJob.from_json(command[4]) == _job()
    broken = {**body, "spec": {**body["spec"], "backoffLimit": "0"}}
    assert any("backoffLimit" in p for p in k8s_schema.problems(broken))


@pytest.mark.parametrize("status, ended", [
    ({}, None),
    ({"jobDeploymentStatus": "Initializing"}, None),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, None),
    ({"jobDeploymentStatus": "Running", "jobStatus": "SUCCEEDED"}, None),  # the submitter still reports
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, ("Complete", "")),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "message": "exit 2"}, ("Failed", "exit 2: Ray job FAILED")),
    ({"jobDeploymentStatus": "Running", "jobStatus": "STOPPED"}, ("Failed", "Ray job STOPPED")),
    ({"jobDeploymentStatus": "Failed", "reason": "ValidationFailed", "message": "no cluster"},
     ("Failed", "ValidationFailed: no cluster")),
])
def test_outcome_reads_kuberays_two_statuses(status, ended):
    assert rayjob.outcome({"status": status}) == ended


def test_a_missing_cluster_fails_the_task_before_any_rayjob_exists(monkeypatch, tmp_path):
    """KubeRay would leave such a RayJob Initializing for ever: the task checks first."""
    with KubeRayAPI(env={}, cwd=tmp_path) as api, pytest.raises(kube.JobFailed) as failed:
        rayjob.head_image("no-such-cluster", "team-a", client=_client(api))
    assert str(failed.value).startswith("RayCluster team-a/no-such-cluster does not exist (deploy infra/k8s/")
    assert api.created == []


def test_the_task_refuses_a_cluster_running_another_image(monkeypatch, tmp_path):
    from emu.cluster import ray_launch

    digest = "sha256:" + "1" * 64
    monkeypatch.setenv("EMU_IMAGE_DIGEST", digest)
    monkeypatch.setenv(ray_launch.RAY_CLUSTER_ENV, "emu-ray")
    monkeypatch.setenv("POD_NAMESPACE", "emu")
    with KubeRayAPI(env={}, cwd=tmp_path, image="reg.example/emu@sha256:" + "2" * 64) as api:
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
        with pytest.raises(RuntimeError, match=r"RayCluster emu/emu-ray runs the image reg.example/emu@sha256:2+, "
                                               r"not this task's \(sha256:1+\)"):
            ray_launch.precompute(resolve(PrecomputeConfig, "precompute", "tiny"), (tmp_path, "a" * 32 + ".dir"),
                                  (tmp_path / "m", "b" * 32 + ".dir"), [tmp_path / "img2dataset"], tmp_path / "out",
                                  in_process=lambda: pytest.fail("ran in process"))
    assert api.created == []


def test_a_failing_driver_fails_the_task_with_kuberays_reason_and_its_log_streamed(monkeypatch, tmp_path):
    body = _body(monkeypatch)
    body["spec"]["entrypoint"] = "echo reading shards; echo 'error: shard broken' >&2; exit 3"
    out = io.StringIO()
    with KubeRayAPI(env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path) as api, pytest.raises(kube.JobFailed) as failed:
        rayjob.run(body, client=_client(api), poll_s=0.05, stream=out)
    name = body["metadata"]["name"]
    assert str(failed.value) == f"RayJob team-a/{name} failed: AppFailed: job entrypoint exited 3: Ray job FAILED"
    assert f"[{name}-x7k2p] error: shard broken" in out.getvalue().splitlines()
    assert api.deleted == [name]


def test_an_unavailable_api_server_is_waited_out_not_fatal(monkeypatch, tmp_path):
    body = _body(monkeypatch)
    body["spec"]["entrypoint"] = "echo encoded 12 images"
    out = io.StringIO()
    with KubeRayAPI(env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, unavailable=2) as api:
        final = rayjob.run(body, client=_client(api), poll_s=0.05, stream=out)
    name = body["metadata"]["name"]
    assert final["status"]["jobStatus"] == "SUCCEEDED"
    lines = out.getvalue().splitlines()
    assert any(line.startswith(f"RayJob team-a/{name}: API call failed (ApiException") and line.endswith("retry 2 of 10")
               for line in lines), lines
    assert f"[{name}-x7k2p] encoded 12 images" in lines and lines[-1] == f"RayJob team-a/{name}: complete"


def test_only_precompute_runs_on_a_ray_cluster():
    assert PipelineConfig(resources={"precompute": StageResources(ray_cluster="emu-ray")})
    with pytest.raises(ConfigError, match=r"pipeline.resources.stage2.ray_cluster: only precompute"):
        PipelineConfig(resources={"stage2": StageResources(ray_cluster="emu-ray")})


def _client(api: KubeRayAPI):
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = api.url
    return client.ApiClient(configuration)
