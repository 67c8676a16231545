"""Kubeflow Trainer TrainJobs from a pipeline task: the object a multi-node training task creates
(emu.cluster.launch), and how it is followed to its end (emu.cluster.kube).

Pods of a TrainJob are the JobSet's, which the Trainer names like the TrainJob: they carry
`jobset.sigs.k8s.io/jobset-name=<name>`; the command runs in their `node` container.
"""

from __future__ import annotations

from typing import Any, TextIO

from emu.cluster import kube

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"


def outcome(obj: dict[str, Any]) -> tuple[str, str] | None:
    """("Complete" | "Failed", message) once the TrainJob has ended, else None."""
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            text = ": ".join(x for x in (condition.get("reason"), condition.get("message")) if x)
            return condition["type"], text
    return None


KIND = kube.JobKind(kind="TrainJob", group=GROUP, version=VERSION, plural=PLURAL,
                    pod_label="jobset.sigs.k8s.io/jobset-name", container="node", outcome=outcome)


def build(*, name: str, namespace: str, runtime: str, image: str, command: list[str], nodes: int,
          procs_per_node: int, resources: dict[str, str], env: dict[str, str]) -> dict[str, Any]:
    """The TrainJob object (checked against the Trainer's CRD in tests)."""
    trainer: dict[str, Any] = {"command": list(command), "numNodes": nodes, "numProcPerNode": procs_per_node,
                               "env": [{"name": k, "value": v} for k, v in sorted(env.items())]}
    if image:
        trainer["image"] = image
    if resources:
        trainer["resourcesPerNode"] = {"requests": dict(resources), "limits": dict(resources)}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob", "metadata": kube.metadata(name, namespace),
            "spec": {"runtimeRef": {"apiGroup": GROUP, "kind": "TrainingRuntime", "name": runtime},
                     "trainer": trainer}}


def run(body: dict[str, Any], client=None, poll_s: float = 5.0, stream: TextIO | None = None,
        delete: bool = True) -> dict[str, Any]:
    """Create the TrainJob and follow it to its end (emu.cluster.kube.run); kube.JobFailed when it fails."""
    return kube.run(KIND, body, note=f"{body['spec']['trainer']['numNodes']} nodes", client=client, poll_s=poll_s,
                    stream=stream, delete=delete)
