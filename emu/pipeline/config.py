"""Pipeline settings (the `pipeline` section of a preset): where tasks run and what they may use.

Resources apply only on a cluster (kfp.local ignores them): CPU/memory, accelerator type and
count, a node selector and tolerations for the GPU node pool, and a memory-backed /dev/shm
(DeepSpeed and Ray exchange tensors through shared memory; a pod's default 64 MiB is too small).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from emu.errors import ConfigError

STAGES = ("prepare", "validate", "stage1", "precompute", "stage2", "decoder", "instruct", "evaluate", "register")


@dataclass
class Toleration:
    key: str = ""
    operator: str = "Exists"   # Exists | Equal
    value: str = ""
    effect: str = ""           # NoSchedule | PreferNoSchedule | NoExecute | "" (all)


@dataclass
class StageResources:
    """What one task's pod gets. Empty strings / zero mean "the cluster default"."""

    cpu: str = ""                # e.g. "16"
    memory: str = ""             # e.g. "120Gi"
    accelerator: str = ""        # e.g. "nvidia.com/gpu"
    accelerators: int = 0        # how many
    node_selector: dict[str, str] = field(default_factory=dict)  # e.g. {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    tolerations: list[Toleration] = field(default_factory=list)
    shm: str = ""                # size of the memory emptyDir on /dev/shm, e.g. "64Gi"
    #: Training stages: nodes of `accelerators` GPUs each. 1 = torchrun over the task pod's own
    #: GPUs; more = a Kubeflow Trainer TrainJob of that many nodes (emu/cluster/trainjob.py).
    nodes: int = 1
    #: Times KFP retries a failed task (a preempted node, a lost pod); a retried training task
    #: resumes from its last checkpoint in S3 (EMU_CHECKPOINT_REMOTE).
    retries: int = 0
    #: Seconds the task's pod may run (0 = no limit): a hung task fails, and is retried.
    timeout_s: int = 0
    #: precompute only: the KubeRay RayCluster (in the run's namespace) to run on, as a RayJob
    #: reading the shards from the DVC remote (emu.precompute.remote); empty = Ray in the task's pod.
    ray_cluster: str = ""

    def __post_init__(self) -> None:
        if self.accelerators < 0:
            raise ConfigError("pipeline.resources.<stage>.accelerators must be >= 0")
        if self.nodes < 1 or self.retries < 0 or self.timeout_s < 0:
            raise ConfigError("pipeline.resources.<stage>: nodes must be >= 1, retries and timeout_s >= 0")
        if self.accelerators and not self.accelerator:
            raise ConfigError("pipeline.resources.<stage>.accelerator must name the resource "
                              "(e.g. nvidia.com/gpu) when accelerators > 0")


@dataclass
class PipelineConfig:
    """How the pipeline is compiled and run."""

    #: Dataset folders held out of training: the benchmarks evaluate on them.
    eval_sources: list[str] = field(default_factory=lambda: ["vqav2", "coco"])
    #: Kubernetes secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the S3 DVC remote.
    s3_secret: str = "emu-s3"
    #: Kubernetes config map with EMU_LINEAGE_URL, EMU_DVC_REMOTE, AWS_ENDPOINT_URL.
    settings_config_map: str = "emu-settings"
    #: Kubernetes secret whose key `password` is the lineage database's password (PGPASSWORD in
    #: the tasks; EMU_LINEAGE_URL holds no password).
    lineage_secret: str = "emu-lineage"
    #: The service account the run's pods use (infra/k8s: may create TrainJobs and RayJobs).
    service_account: str = "emu-pipeline"
    #: The Kubeflow Trainer TrainingRuntime multi-node stages run on (infra/k8s/base).
    trainer_runtime: str = "emu-torch"
    #: The project image every task runs in. Empty: the reference scripts/build-image recorded
    #: (infra/image.ref, `repo@sha256:...`), else components.IMAGE. A digest reference is
    #: recorded as each run's image_digest.
    image: str = ""
    resources: dict[str, StageResources] = field(default_factory=dict)
    #: Metrics the promotion gate compares (names as in the evaluation's kfp_metrics.json). With no
    #: production model yet each must beat its chance level; after that none may fall more than
    #: `gate_tolerance` below production.
    gate_metrics: list[str] = field(default_factory=lambda: ["vqav2_accuracy", "coco_captions_cider"])
    gate_tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.gate_tolerance < 0:
            raise ConfigError(f"pipeline.gate_tolerance must be >= 0, got {self.gate_tolerance}")
        unknown = [s for s in self.resources if s not in STAGES]
        if unknown:
            raise ConfigError(f"pipeline.resources: unknown stages {unknown}; stages: {', '.join(STAGES)}")
        misplaced = [s for s, r in self.resources.items() if r.ray_cluster and s != "precompute"]
        if misplaced:
            raise ConfigError(f"pipeline.resources.{misplaced[0]}.ray_cluster: only precompute runs on a RayCluster")
