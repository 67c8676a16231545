"""Kubeflow Trainer TrainJobs from a pipeline task: build, create, watch to the end, stream the
nodes' logs, map failure to the task's (the only Kubernetes-client import, DESIGN.md convention 5).

The task's pod creates the TrainJob in its own namespace through the API (its service account may:
infra/k8s/base/rbac.yaml) with the pod as owner, so a task pod that is deleted (preempted, timed
out) takes its TrainJob with it. Pods of a TrainJob are the JobSet's, which the Trainer names like
the TrainJob: they carry `jobset.sigs.k8s.io/jobset-name=<name>`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
POD_LABEL = "jobset.sigs.k8s.io/jobset-name"
#: The container the Trainer runs the TrainJob's command in (the runtime's `node` container).
CONTAINER = "node"
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class TrainJobFailed(RuntimeError):
    """The TrainJob ended in its Failed condition (or one of its pods failed for good)."""


def job_name(stage: str) -> str:
    """A fresh DNS-label name per attempt: a retried task must not collide with its last TrainJob."""
    return f"emu-{stage}-{uuid.uuid4().hex[:10]}"


def own_namespace() -> str:
    """The namespace this pod runs in (its service account's), else $POD_NAMESPACE, else default."""
    if _NAMESPACE_FILE.is_file():
        return _NAMESPACE_FILE.read_text(encoding="utf-8").strip()
    return os.environ.get("POD_NAMESPACE") or "default"


def build(*, name: str, namespace: str, runtime: str, image: str, command: list[str], nodes: int,
          procs_per_node: int, resources: dict[str, str], env: dict[str, str]) -> dict[str, Any]:
    """The TrainJob object (checked against the Trainer's CRD in tests)."""
    trainer: dict[str, Any] = {"command": list(command), "numNodes": nodes, "numProcPerNode": procs_per_node,
                               "env": [{"name": k, "value": v} for k, v in sorted(env.items())]}
    if image:
        trainer["image"] = image
    if resources:
        trainer["resourcesPerNode"] = {"requests": dict(resources), "limits": dict(resources)}
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": {"app.kubernetes.io/part-of": "emu-platform"}}
    pod, uid = os.environ.get("KFP_POD_NAME"), os.environ.get("KFP_POD_UID")
    if pod and uid:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob", "metadata": metadata,
            "spec": {"runtimeRef": {"apiGroup": GROUP, "kind": "TrainingRuntime", "name": runtime},
                     "trainer": trainer}}


def api_client():
    """In a pod: its service account; elsewhere: the kubeconfig."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


def outcome(obj: dict[str, Any]) -> tuple[str, str] | None:
    """("Complete" | "Failed", message) once the TrainJob has ended, else None."""
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            text = ": ".join(x for x in (condition.get("reason"), condition.get("message")) if x)
            return condition["type"], text
    return None


def run(body: dict[str, Any], client=None, poll_s: float = 5.0, stream: TextIO | None = None,
        delete: bool = True) -> dict[str, Any]:
    """Create the TrainJob, stream every node pod's log to `stream` (lines prefixed with the pod's
    name) until it ends; return its final object, or raise TrainJobFailed with the Trainer's reason
    and the failed pods' exit codes. The TrainJob is deleted afterwards (its logs are in ours)."""
    from kubernetes import client as k8s

    stream = stream or sys.stdout
    api = client or api_client()
    custom, core = k8s.CustomObjectsApi(api), k8s.CoreV1Api(api)
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    print(f"TrainJob {namespace}/{name}: created ({body['spec']['trainer']['numNodes']} nodes)", file=stream, flush=True)
    followers: dict[str, threading.Thread] = {}
    lock = threading.Lock()
    try:
        while True:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            pods = core.list_namespaced_pod(namespace, label_selector=f"{POD_LABEL}={name}").items
            for pod in pods:
                if pod.metadata.name not in followers and pod.status.phase in ("Running", "Succeeded", "Failed"):
                    followers[pod.metadata.name] = thread = threading.Thread(
                        target=_follow, args=(core, namespace, pod.metadata.name, stream, lock), daemon=True)
                    thread.start()
            ended = outcome(obj)
            if ended is not None:
                for thread in followers.values():
                    thread.join(timeout=60)
                state, reason = ended
                if state == "Failed":
                    exits = _failed_pods(core, namespace, name)
                    raise TrainJobFailed(f"TrainJob {namespace}/{name} failed: {reason or 'no reason given'}"
                                         + (f"; {exits}" if exits else ""))
                print(f"TrainJob {namespace}/{name}: complete", file=stream, flush=True)
                return obj
            time.sleep(poll_s)
    finally:
        if delete:
            try:
                custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                       propagation_policy="Background")
            except Exception as exc:  # the job's outcome matters more than its clean-up
                print(f"TrainJob {namespace}/{name}: not deleted ({type(exc).__name__}: {exc})", file=stream)


def _follow(core, namespace: str, pod: str, stream: TextIO, lock: threading.Lock) -> None:
    """Copy one pod's log, line by line, as it is written."""
    response = core.read_namespaced_pod_log(pod, namespace, container=CONTAINER, follow=True,
                                            _preload_content=False)
    pending = b""
    for chunk in response.stream(4096):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        with lock:
            for line in lines:
                print(f"[{pod}] {line.decode('utf-8', 'replace')}", file=stream, flush=True)
    if pending:
        with lock:
            print(f"[{pod}] {pending.decode('utf-8', 'replace')}", file=stream, flush=True)


def _failed_pods(core, namespace: str, name: str) -> str:
    """`pod exited 1 (Error)` for each node pod whose container failed."""
    found = []
    for pod in core.list_namespaced_pod(namespace, label_selector=f"{POD_LABEL}={name}").items:
        for status in pod.status.container_statuses or []:
            ended = status.state.terminated if status.state else None
            if ended is not None and ended.exit_code:
                found.append(f"{pod.metadata.name} exited {ended.exit_code} ({ended.reason or 'no reason'})")
    return ", ".join(sorted(found))
