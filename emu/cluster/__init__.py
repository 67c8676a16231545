"""The cluster path: which image tasks run in, torchrun over a pod's GPUs, Kubeflow Trainer
TrainJobs for several nodes (emu.cluster.trainjob, the only Kubernetes-client import)."""
