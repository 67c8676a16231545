"""The image is a setting: scripts/build-image records the pushed digest, the compiled pipeline runs
every task in the recorded (or configured) image and hands each its digest; the compiled YAML
carries the cluster settings (layout, retries, timeouts, secrets)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from emu.cluster.image import digest_of, image_reference
from emu.errors import ConfigError
from emu.pipeline.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "ab" * 32


def test_image_reference_is_the_setting_else_the_record_else_the_default(tmp_path):
    from components import IMAGE

    record = tmp_path / "image.ref"
    assert image_reference("", record) == IMAGE and digest_of(IMAGE) is None
    record.write_text(f"registry.example.com/emu@{DIGEST}\n")
    assert image_reference("", record) == f"registry.example.com/emu@{DIGEST}"
    assert image_reference("mine:1", record) == "mine:1"
    assert digest_of(image_reference("", record)) == DIGEST
    record.write_text("registry.example.com/emu:latest\n")
    with pytest.raises(ConfigError, match="not a repo@sha256"):
        image_reference("", record)


def test_build_image_records_the_pushed_digest(tmp_path):
    """scripts/build-image against a docker CLI stand-in (no daemon here) that logs its calls."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "infra").mkdir()
    shutil.copy(ROOT / "scripts" / "build-image", checkout / "scripts")
    shutil.copy(ROOT / "pyproject.toml", checkout)
    docker = tmp_path / "docker"
    docker.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n"
                      f"[ \"$1\" = image ] && echo other/repo@sha256:{'0' * 64} && echo reg.example/emu@{DIGEST}\n"
                      "exit 0\n")
    docker.chmod(0o755)
    done = subprocess.run([str(checkout / "scripts" / "build-image")], capture_output=True, text=True,
                          env={**os.environ, "EMU_IMAGE_REPO": "reg.example/emu", "DOCKER": str(docker)})
    assert done.returncode == 0, done.stderr
    assert (checkout / "infra" / "image.ref").read_text() == f"reg.example/emu@{DIGEST}\n"
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("build -f infra/Dockerfile -t reg.example/emu:0.1.0-")
    assert calls[1].startswith("push reg.example/emu:0.1.0-")
    docker.write_text("#!/bin/sh\nexit 0\n")   # a push that reports no digest must not record one
    (checkout / "infra" / "image.ref").unlink()
    failed = subprocess.run([str(checkout / "scripts" / "build-image")], capture_output=True, text=True,
                            env={**os.environ, "EMU_IMAGE_REPO": "reg.example/emu", "DOCKER": str(docker)})
    assert failed.returncode == 1 and "did not report a registry digest" in failed.stderr
    assert not (checkout / "infra" / "image.ref").exists()


def test_pipeline_runs_tasks_in_the_configured_image_with_its_digest(tmp_path):
    from kfp import compiler

    from pipelines.emu_pipeline import build_pipeline

    image = f"reg.example/emu@{DIGEST}"
    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(build_pipeline(PipelineConfig(image=image)), str(out))
    executors = next(yaml.safe_load_all(out.read_text()))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {image}
    for executor in executors.values():
        env = {v["name"]: v["value"] for v in executor["container"].get("env", [])}
        assert env["EMU_IMAGE_DIGEST"] == DIGEST


def test_committed_pipeline_carries_layout_retries_timeouts_and_secrets():
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / "emu_pipeline.yaml").read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    launch = {s: json.loads({v["name"]: v["value"] for v in executors[f"exec-{s}"]["container"]["env"]}["EMU_LAUNCH"])
              for s in ("stage1", "stage2", "decoder", "instruct")}
    assert launch["stage2"]["nodes"] == 4 and launch["stage1"]["nodes"] == 1
    assert launch["stage2"]["procs_per_node"] == 8 and launch["stage2"]["resources"]["nvidia.com/gpu"] == "8"
    precompute = executors["exec-precompute"]["container"]
    assert {v["name"]: v["value"] for v in precompute["env"]}["EMU_RAY_CLUSTER"] == "emu-ray"
    assert "accelerator" not in precompute["resources"], "precompute's GPUs are the RayCluster's, not its pod's"
    tasks = docs[0]["components"]["comp-exit-handler-1"]["dag"]["tasks"]  # every task runs in the exit handler
    assert tasks["stage2"]["retryPolicy"]["maxRetryCount"] == 3
    kubernetes = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert kubernetes["exec-stage2"]["activeDeadlineSeconds"] == "604800"
    secrets = {s["secretName"]: s["keyToEnv"] for s in kubernetes["exec-stage2"]["secretAsEnv"]}
    assert secrets["emu-lineage"] == [{"envVar": "PGPASSWORD", "secretKey": "password"}]
    assert {k["envVar"] for k in secrets["emu-s3"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
