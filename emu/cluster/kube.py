"""The Kubernetes side of the jobs pipeline tasks create (Kubeflow Trainer TrainJobs, KubeRay
RayJobs): the API client, the pod's namespace and ownership, and the loop that creates a job,
streams its pods' logs until it ends, maps its failure and deletes it. The only Kubernetes-client
import of the platform (DESIGN.md convention 5), with emu.cluster.trainjob and .rayjob.

A task's pod creates its job in its own namespace through the API (its service account may:
infra/k8s/base/rbac.yaml) with the pod as owner, so a task pod that is deleted (preempted, timed
out) takes its job with it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: Consecutive failed looks at a job (waiting poll_s, 2 x poll_s, ... between them) before the task gives up.
_API_RETRIES = 10


class JobFailed(RuntimeError):
    """The job ended failed (or one of its pods failed for good)."""


@dataclass(frozen=True)
class JobKind:
    """How to create and follow one kind of job."""

    kind: str
    group: str
    version: str
    plural: str
    #: label whose value is the job's name on the pods to follow
    pod_label: str
    #: the container of those pods whose log is streamed
    container: str
    #: ("Complete" | "Failed", reason) once the job has ended, else None
    outcome: Callable[[dict[str, Any]], tuple[str, str] | None]


def job_name(stage: str) -> str:
    """A fresh DNS-label name per attempt: a retried task must not collide with its last job."""
    return f"emu-{stage}-{uuid.uuid4().hex[:10]}"


def own_namespace() -> str:
    """The namespace this pod runs in (its service account's), else $POD_NAMESPACE, else default."""
    if _NAMESPACE_FILE.is_file():
        return _NAMESPACE_FILE.read_text(encoding="utf-8").strip()
    return os.environ.get("POD_NAMESPACE") or "default"


def metadata(name: str, namespace: str) -> dict[str, Any]:
    """A job's metadata: the platform's label and, inside a KFP task, the task's pod as owner."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": {"app.kubernetes.io/part-of": "emu-platform"}}
    pod, uid = os.environ.get("KFP_POD_NAME"), os.environ.get("KFP_POD_UID")
    if pod and uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}]
    return meta


def api_client():
    """In a pod: its service account; elsewhere: the kubeconfig ($KUBECONFIG, read now: the
    client reads it once, when first imported)."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    return client.ApiClient()


def run(kind: JobKind, body: dict[str, Any], note: str = "", client=None, poll_s: float = 5.0,
        stream: TextIO | None = None, delete: bool = True) -> dict[str, Any]:
    """Create the job, stream the logs of its pods to `stream` (lines prefixed with the pod's
    name) until it ends; return its final object, or raise JobFailed with the controller's reason
    and the failed pods' exit codes. The job is deleted afterwards (its logs are in ours)."""
    from kubernetes import client as k8s

    stream = stream or sys.stdout
    api = client or api_client()
    custom, core = k8s.CustomObjectsApi(api), k8s.CoreV1Api(api)
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    label = f"{kind.kind} {namespace}/{name}"
    custom.create_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, body)
    print(f"{label}: created{f' ({note})' if note else ''}", file=stream, flush=True)
    selector = f"{kind.pod_label}={name}"
    followers: dict[str, threading.Thread] = {}
    lock = threading.Lock()
    failures = 0
    try:
        while True:
            try:
                obj = custom.get_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, name)
                pods = core.list_namespaced_pod(namespace, label_selector=selector).items
                failures = 0
            except Exception as exc:  # an API server restart must not end (and delete) a week-long job
                failures += 1
                if failures > _API_RETRIES or getattr(exc, "status", 500) in (401, 403, 404):
                    raise
                reason = " ".join(str(exc).split())[:300]
                print(f"{label}: API call failed ({type(exc).__name__}: {reason}); retry {failures} of {_API_RETRIES}",
                      file=stream, flush=True)
                time.sleep(poll_s * failures)
                continue
            for pod in pods:
                if pod.metadata.name not in followers and pod.status.phase in ("Running", "Succeeded", "Failed"):
                    followers[pod.metadata.name] = thread = threading.Thread(
                        target=_follow, args=(core, namespace, pod.metadata.name, kind.container, selector, stream,
                                              lock, poll_s), daemon=True)
                    thread.start()
            ended = kind.outcome(obj)
            if ended is not None:
                for thread in followers.values():
                    thread.join(timeout=60)
                state, reason = ended
                if state == "Failed":
                    exits = _failed_pods(core, namespace, selector)
                    raise JobFailed(f"{label} failed: {reason or 'no reason given'}" + (f"; {exits}" if exits else ""))
                print(f"{label}: complete", file=stream, flush=True)
                return obj
            time.sleep(poll_s)
    finally:
        if delete:
            try:
                custom.delete_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, name,
                                                       propagation_policy="Background")
            except Exception as exc:  # the job's outcome matters more than its clean-up
                print(f"{label}: not deleted ({type(exc).__name__}: {exc})", file=stream)


def _follow(core, namespace: str, pod: str, container: str, selector: str, stream: TextIO, lock: threading.Lock,
            poll_s: float) -> None:
    """Copy one pod's log, line by line, as it is written. A stream that ends while the container
    still runs (an API server or kubelet restart, a dropped connection) is opened again where it
    stopped: the kubelet stamps each line (`timestamps=True`), a reopened stream starts five
    minutes before the last line printed (room for clock skew between this pod and the node), and
    lines up to that one are skipped. A stream that broke off is always read once more before the
    container's state is asked, so the last lines of a container that just exited (a failing
    node's traceback) are not lost."""
    last: tuple[str, int] | None = None
    failures = 0
    while True:
        window = {} if last is None else {"since_seconds": max(1, int(time.time() - _epoch(last)) + 300)}
        try:
            response = core.read_namespaced_pod_log(pod, namespace, container=container, follow=True, timestamps=True,
                                                    _preload_content=False, **window)
            for line in _lines(response):
                stamp, text = _split_stamp(line)
                if stamp is not None and last is not None and stamp <= last:
                    continue  # printed before the stream was reopened
                last = stamp or last
                with lock:
                    print(f"[{pod}] {text}", file=stream, flush=True)
            failures, ended = 0, True
        except Exception as exc:  # a dropped stream: the job's own watch decides whether it failed
            failures, ended = failures + 1, False
            if failures > _API_RETRIES:
                with lock:
                    print(f"[{pod}] log stream lost ({type(exc).__name__}: {exc}); the job goes on", file=stream,
                          flush=True)
                return
        try:
            if ended and not _still_running(core, namespace, pod, container, selector):
                return
        except Exception:  # the API is away: look again after the wait
            failures += 1
        time.sleep(poll_s * max(failures, 1))


def _lines(response):
    pending = b""
    for chunk in response.stream(4096):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line.decode("utf-8", "replace") for line in lines)
    if pending:
        yield pending.decode("utf-8", "replace")


def _split_stamp(line: str) -> tuple[tuple[str, int] | None, str]:
    """(("2026-12-07T11:57:13", 123456789), text) of a kubelet-stamped line (RFC 3339, nanoseconds
    with trailing zeros dropped, so the strings do not sort as times); (None, line) if unstamped."""
    stamp, _, text = line.partition(" ")
    whole, dot, fraction = stamp.rstrip("Z").partition(".")
    if len(whole) != 19 or whole[10:11] != "T" or not stamp.endswith("Z") or (dot and not fraction.isdigit()):
        return None, line
    return (whole, int((fraction or "0").ljust(9, "0")[:9])), text


def _epoch(stamp: tuple[str, int]) -> float:
    from datetime import datetime, timezone

    return datetime.strptime(stamp[0], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()


def _still_running(core, namespace: str, pod: str, container: str, selector: str) -> bool:
    """Whether `container` of `pod` runs, or waits to run again (a restart): its log goes on."""
    for item in core.list_namespaced_pod(namespace, label_selector=selector).items:
        if item.metadata.name != pod or item.status.phase in ("Succeeded", "Failed"):
            continue
        for status in item.status.container_statuses or []:
            if status.name == container and status.state is not None and status.state.terminated is None:
                return True
    return False


def _failed_pods(core, namespace: str, selector: str) -> str:
    """`pod exited 1 (Error)` for each of the job's pods whose container failed."""
    found = []
    for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
        for status in pod.status.container_statuses or []:
            ended = status.state.terminated if status.state else None
            if ended is not None and ended.exit_code:
                found.append(f"{pod.metadata.name} exited {ended.exit_code} ({ended.reason or 'no reason'})")
    return ", ".join(sorted(found))
