"""TrainJobs the training tasks create: valid for the Trainer's CRD, created, watched to the end,
their nodes' logs streamed and their failure mapped, through the real kubernetes client against a
local server that speaks the API (tests/kube_api.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from emu.cluster import kube, trainjob
from emu.cluster.launch import Launch, node_command
from emu.cluster.node import NodeJob, for_paths
from tests import k8s_schema
from tests.kube_api import KubeAPI

pytestmark = pytest.mark.skipif(k8s_schema.crd_dir_missing() is not None, reason=str(k8s_schema.crd_dir_missing()))


def _job(tmp_path: Path) -> NodeJob:
    dataset = tmp_path / "dataset"
    init = tmp_path / "stage1" / "model"
    configs = {"stage2": {"init": str(init), "precomputed": str(tmp_path / "emb"), "steps": 3}}
    inputs = {"dataset": (dataset, "a" * 32 + ".dir"), "init": (init, "b" * 32 + ".dir"),
              "embeddings": (tmp_path / "emb", "c" * 32 + ".dir")}
    return for_paths("stage2", configs, inputs, [dataset / "webvid", dataset / "mmc4"], "s3://b/results/x", by_md5=True)


def _body(tmp_path, monkeypatch, nodes=2):
    monkeypatch.setenv("KFP_POD_NAME", "emu-run-stage2-driver")
    monkeypatch.setenv("KFP_POD_UID", "0c2b7f0e-1111-2222-3333-444455556666")
    return trainjob.build(name=kube.job_name("stage2"), namespace="team-a", runtime="emu-torch",
                          image="registry.example.com/emu@sha256:" + "0" * 64, command=node_command(_job(tmp_path)),
                          nodes=nodes, procs_per_node=8,
                          resources={"nvidia.com/gpu": "8", "cpu": "96", "memory": "1500Gi"},
                          env={"NCCL_DEBUG": "WARN"})


def test_node_job_names_inputs_by_md5_not_by_the_task_pods_paths(tmp_path):
    job = _job(tmp_path)
    assert str(tmp_path) not in job.to_json()
    assert job.configs["stage2"]["init"] == "{input:init}"
    assert job.inputs["dataset"] == "md5:" + "a" * 32 + ".dir"
    assert job.sources == ["webvid", "mmc4"]
    assert NodeJob.from_json(job.to_json()) == job


def test_trainjob_validates_against_the_trainer_crd(tmp_path, monkeypatch):
    body = _body(tmp_path, monkeypatch)
    assert k8s_schema.problems(body) == []
    assert body["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                          "name": "emu-torch"}
    assert body["metadata"]["ownerReferences"][0]["kind"] == "Pod"
    assert body["spec"]["trainer"]["command"][:4] == ["torchrun", "-m", "emu.cluster.node", "--job"]
    broken = {**body, "spec": {**body["spec"], "trainer": {**body["spec"]["trainer"], "numNodes": "2"}}}
    assert any("numNodes" in p for p in k8s_schema.problems(broken))


def test_trainjob_is_created_watched_and_its_logs_streamed(tmp_path, monkeypatch):
    body = _body(tmp_path, monkeypatch)
    out = io.StringIO()
    with KubeAPI(outcome="Complete", lines=3) as api:
        final = trainjob.run(body, client=api.client(), poll_s=0.05, stream=out)
    assert api.created[0]["spec"] == body["spec"]
    assert final["status"]["conditions"][0]["type"] == "Complete"
    name = body["metadata"]["name"]
    lines = out.getvalue().splitlines()
    for node in (0, 1):
        pod = f"{name}-node-0-{node}"
        assert [ln for ln in lines if ln.startswith(f"[{pod}]")] == [f"[{pod}] step {i} on {pod}" for i in range(3)]
    assert lines[-1] == f"TrainJob team-a/{name}: complete"
    assert api.deleted == [name]


def test_a_failed_trainjob_fails_the_task_with_the_reason_and_exit_code(tmp_path, monkeypatch):
    body = _body(tmp_path, monkeypatch)
    with KubeAPI(outcome="Failed", exit_code=137, reason="FailedPolicy") as api:
        with pytest.raises(kube.JobFailed) as failed:
            trainjob.run(body, client=api.client(), poll_s=0.05, stream=io.StringIO())
    name = body["metadata"]["name"]
    assert str(failed.value) == (f"TrainJob team-a/{name} failed: FailedPolicy: jobset failed; "
                                 f"{name}-node-0-1 exited 137 (Error)")
    assert api.deleted == [name]


def test_an_invalid_trainjob_is_refused_by_the_server(tmp_path, monkeypatch):
    from kubernetes.client.exceptions import ApiException

    body = _body(tmp_path, monkeypatch)
    body["spec"]["trainer"]["numProcsPerNode"] = 8
    with KubeAPI() as api, pytest.raises(ApiException) as refused:
        trainjob.run(body, client=api.client(), poll_s=0.05, stream=io.StringIO(), delete=False)
    assert refused.value.status == 422 and "numProcsPerNode" in refused.value.body


def test_launch_layout_round_trips_through_the_environment(monkeypatch):
    launch = Launch(nodes=4, procs_per_node=8, image="emu@sha256:" + "1" * 64, resources={"nvidia.com/gpu": "8"})
    monkeypatch.setenv("EMU_LAUNCH", launch.to_env())
    assert Launch.from_env() == launch
    monkeypatch.delenv("EMU_LAUNCH")
    assert Launch.from_env() == Launch()


@pytest.mark.parametrize("exits", [False, True], ids=["pod-runs-on", "container-exits"])
def test_a_dropped_log_stream_is_reopened_where_it_stopped(tmp_path, monkeypatch, exits):
    """An API server restart breaks the log stream of a pod: it is opened again and every line is
    printed once, in order (the kubelet's stamps, not their string order, say which lines were
    printed), also when the container exited as the stream broke (its last lines: a traceback)."""
    body = _body(tmp_path, monkeypatch)
    out = io.StringIO()
    with KubeAPI(outcome="Complete", lines=9, drop_after=5, exit_on_drop=exits) as api:
        trainjob.run(body, client=api.client(), poll_s=0.05, stream=out)
    name = body["metadata"]["name"]
    lines = out.getvalue().splitlines()
    for node in (0, 1):
        pod = f"{name}-node-0-{node}"
        assert [ln for ln in lines if ln.startswith(f"[{pod}]")] == [f"[{pod}] step {i} on {pod}" for i in range(9)]
        requests = [query for p, query in api.log_requests if p == pod]
        # At least one reopening; a loaded machine may see the pod still running when the second
        # stream ends and open a third, which must print nothing again (checked above).
        assert 2 <= len(requests) <= 3 and all(q["timestamps"][0].lower() == "true" for q in requests)
        assert "sinceSeconds" not in requests[0] and all(int(q["sinceSeconds"][0]) >= 300 for q in requests[1:])
