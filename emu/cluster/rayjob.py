"""KubeRay RayJobs from the precompute task: the object it creates to run the precompute driver
(emu.precompute.remote) on a named RayCluster, and how it is followed to its end (emu.cluster.kube).

With `clusterSelector` the RayJob runs on an existing RayCluster (infra/k8s/components/ray-cluster)
instead of creating one: the GPU workers stay up between runs and autoscale, and no run waits for
a cluster to start. KubeRay submits the entrypoint from a Kubernetes Job named like the RayJob
(`ray job submit`, which follows the driver's log), so the task streams that Job's pod.
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


def build(*, name: str, namespace: str, cluster: str, entrypoint: list[str], deadline_s: int = 0) -> dict[str, Any]:
    """The RayJob running `entrypoint` on the RayCluster `cluster` (checked against KubeRay's CRD
    in tests). No retries of its own (backoffLimit 0): the KFP task is what is retried, and the
    driver resumes from the parts an earlier attempt uploaded."""
    spec: dict[str, Any] = {"entrypoint": shlex.join(entrypoint), "clusterSelector": {"ray.io/cluster": cluster},
                            "submissionMode": "K8sJobMode", "backoffLimit": 0}
    if deadline_s:
        spec["activeDeadlineSeconds"] = deadline_s
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "metadata": kube.metadata(name, namespace),
            "spec": spec}


def run(body: dict[str, Any], client=None, poll_s: float = 5.0, stream: TextIO | None = None,
        delete: bool = True) -> dict[str, Any]:
    """Create the RayJob and follow it to its end (emu.cluster.kube.run); kube.JobFailed when it fails."""
    return kube.run(KIND, body, note=f"on RayCluster {body['spec']['clusterSelector']['ray.io/cluster']}",
                    client=client, poll_s=poll_s, stream=stream, delete=delete)
