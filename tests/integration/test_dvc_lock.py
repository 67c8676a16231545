"""dvc.lock is committed and is exactly what `dvc repro` writes on a clean checkout: the same code
and parameter hashes (so a change to a stage's code or settings without re-running fails here) and
the same dataset md5s (the synthetic world, its shards and the validation results are reproducible
bit for bit). After such a change: `dvc repro`, then commit dvc.lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_committed_dvc_lock_is_what_dvc_repro_writes(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    checkout = tmp_path / "checkout"
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    (checkout / "dvc.lock").unlink(missing_ok=True)  # written afresh
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)  # the project's DVC repository lives in git
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "EMU_HOME": str(tmp_path / "home")}
    done = subprocess.run([str(bin_dir / "dvc"), "repro"], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fresh = yaml.safe_load((checkout / "dvc.lock").read_text())
    committed = yaml.safe_load((ROOT / "dvc.lock").read_text())
    assert fresh == committed, "dvc.lock is stale: run `dvc repro` and commit dvc.lock"
    assert committed["stages"]["prepare"]["outs"][0]["md5"].endswith(".dir")
