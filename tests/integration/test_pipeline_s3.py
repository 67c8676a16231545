"""The pipeline with its DVC remote on a real S3 server (SeaweedFS on loopback): every artifact
of a run restores bit-identical into an empty folder from the run id alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

from emu.lineage.store import LineageStore
from emu.pipeline.runner import RunRequest, run_local
from tests.integration.test_pipeline import fast_preset

EMU = Path(sys.executable).parent / "emu"
PIPELINE_ENV = ("EMU_HOME", "EMU_LINEAGE_URL", "EMU_DVC_REMOTE", "EMU_RUN_ID")


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_with_s3_remote_restores_bit_identical(s3_server, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("EMU_HOME", str(home))
    monkeypatch.setenv("EMU_DVC_REMOTE", f"s3://{s3_server.bucket}/dvc")
    monkeypatch.delenv("EMU_LINEAGE_URL", raising=False)
    monkeypatch.delenv("EMU_RUN_ID", raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    outcome = run_local(RunRequest(preset=str(fast_preset(tmp_path))))
    assert outcome.status == "succeeded", outcome.error

    # Every output artifact of the run, where the task wrote it.
    store = LineageStore()
    graph = json.loads(subprocess.run([str(EMU), "lineage", "show", outcome.run_id, "--format", "json"],
                                      capture_output=True, text=True, timeout=120, env=dict(os.environ)).stdout)
    outputs = {e["artifact_id"] for e in graph["edges"] if e["direction"] == "out"}
    originals = {a["md5"]: Path(a["uri"]) for a in graph["artifacts"] if a["id"] in outputs}
    assert {a["type"] for a in graph["artifacts"] if a["id"] in outputs} >= {"dataset", "model", "embeddings",
                                                                           "decoder", "metrics", "report"}

    # A fresh folder, a fresh DVC workdir: only the run id, the lineage DB and the S3 remote.
    env = {**os.environ, "EMU_HOME": str(tmp_path / "elsewhere"),
           "EMU_LINEAGE_URL": store.url, "EMU_DVC_REMOTE": f"s3://{s3_server.bucket}/dvc"}
    restored = tmp_path / "restored"
    pull = subprocess.run([str(EMU), "artifacts", "pull", outcome.run_id, "--out", str(restored)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    manifest = json.loads((restored / "manifest.json").read_text())
    by_md5 = {entry["md5"]: restored / entry["path"] for entry in manifest["artifacts"]}
    assert set(originals) <= set(by_md5), "every output of the run is restored"
    for md5, original in originals.items():
        copy = by_md5[md5]
        if original.is_dir():
            assert files_of(copy) == files_of(original), f"{md5} differs after the round trip"
        else:
            assert copy.read_bytes() == original.read_bytes()

    # The S3 credentials reach the tasks as environment (on a cluster: from the emu-s3 Secret) and
    # nothing writes their value down: not the run's log, the tasks' KFP files, the lineage store
    # (runs, executions, configs, audit entries), the restore's output.
    secret = s3_server.secret_key.encode()
    written = [p for p in home.rglob("*") if p.is_file() and "dvc-remote" not in p.parts]
    assert any(p.suffix == ".log" for p in written) and any(p.name == "lineage.db" for p in written)
    leaks = [str(p) for p in written if secret in p.read_bytes()]
    assert leaks == [], f"the S3 secret key is written in {leaks}"
    assert secret.decode() not in pull.stdout + pull.stderr
