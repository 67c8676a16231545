"""KubeRay RayJobs from the precompute task: the object it creates to run the precompute driver
(emu.precompute.remote) on a named RayCluster, and how it is followed to its end (emu.cluster.kube).

With `clusterSelector` the RayJob runs on an existing RayCluster (infra/k8s/components/ray-cluster)
instead of creating one: its GPU workers stay up between runs, and no run waits for a cluster to
start. KubeRay submits the entrypoint from a Kubernetes Job named like the RayJob
(`ray job submit`, then `ray job logs --follow`), so the task streams that Job's pod; the
submitter exits 0 however the Ray job ends, so the outcome is read from the RayJob's status only.
"""

from __future__ import annotations

import shlex
from typing import Any, TextIO

from emu.cluster import kube

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
#: Ray job statuses after which the driver runs no more (KubeRay's status.jobStatus).
_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


def outcome(obj: dict[str, Any]) -> tuple[str, str] | None:
    """("Complete" | "Failed", reason) once the RayJob has ended, else None. Complete means the Ray
    job SUCCEEDED; a deployment that failed (the cluster not found, the submitter crashed) or a
    job that FAILED or was STOPPED is a failure."""
    status = obj.get("status") or {}
    deployment, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
    if job == "SUCCEEDED" and deployment == "Complete":
        return "Complete", ""
    if deployment in ("Complete", "Failed", "ValidationFailed") or job in _ENDED[1:]:
        parts = [status.get("reason"), status.get("message"), f"Ray job {job}" if job else ""]
        return "Failed", ": ".join(p for p in parts if p)
    return None


KIND = kube.JobKind(kind="RayJob", group=GROUP, version=VERSION, plural=PLURAL,
                    pod_label="batch.kubernetes.io/job-name", container="ray-job-submitter", outcome=outcome)


def build(*, name: str, namespace: str, cluster: str, entrypoint: list[str]) -> dict[str, Any]:
    """The RayJob running `entrypoint` on the RayCluster `cluster` (checked against KubeRay's CRD
    in tests). No retries of its own (backoffLimit 0): the KFP task is what is retried, and the
    driver resumes from the parts an earlier attempt uploaded. No deadline either: the task pod's
    timeout (pipeline.resources.precompute.timeout_s) deletes the pod, and with it the RayJob."""
    spec: dict[str, Any] = {"entrypoint": shlex.join(entrypoint), "clusterSelector": {"ray.io/cluster": cluster},
                            "submissionMode": "K8sJobMode", "backoffLimit": 0}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "metadata": kube.metadata(name, namespace),
            "spec": spec}


def head_image(cluster: str, namespace: str, client=None) -> str:
    """The image of the RayCluster's head (the code a RayJob on it runs). KubeRay leaves a RayJob
    whose cluster does not exist waiting in Initializing for ever, so a missing cluster is an
    error here, before anything is created."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    try:
        obj = k8s.CustomObjectsApi(client or kube.api_client()).get_namespaced_custom_object(
            GROUP, VERSION, namespace, "rayclusters", cluster)
    except ApiException as exc:
        if exc.status == 404:
            raise kube.JobFailed(f"RayCluster {namespace}/{cluster} does not exist (deploy infra/k8s/components/"
                                 f"ray-cluster, or name another in pipeline.resources.precompute.ray_cluster)") from None
        raise
    containers = obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return next((c.get("image", "") for c in containers if c.get("name") == "ray-head"), containers[0].get("image", ""))


def run(body: dict[str, Any], client=None, poll_s: float = 5.0, stream: TextIO | None = None,
        delete: bool = True) -> dict[str, Any]:
    """Create the RayJob and follow it to its end (emu.cluster.kube.run); kube.JobFailed when it fails."""
    return kube.run(KIND, body, note=f"on RayCluster {body['spec']['clusterSelector']['ray.io/cluster']}",
                    client=client, poll_s=poll_s, stream=stream, delete=delete)
