"""Every bad input is a clear refusal: exit 2, one `error:` line naming what is wrong, no
traceback, and nothing started. Settings, paths and disks; the full and read-only disks are
small tmpfs mounts (this needs root and mount rights; without them RLIMIT_FSIZE stands in for a
full disk and the read-only case is skipped)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EMU = Path(sys.executable).parent / "emu"


def _mount(folder: Path, *options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """{"full": a 64 KiB tmpfs, "readonly": a read-only tmpfs} (None where mounting is refused)."""
    root = tmp_path_factory.mktemp("disks")
    full, readonly = root / "full", root / "readonly"
    mounted = {"full": full if _mount(full, "size=64k") else None,
               "readonly": readonly if _mount(readonly, "size=64k", "ro") else None}
    yield mounted
    for folder in mounted.values():
        if folder is not None:
            subprocess.run(["umount", str(folder)], capture_output=True)


def _fsize_limit():  # a stand-in for a full disk: writes past 64 KiB fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


CASES = {
    "bad override value": (["run", "stage1.steps=abc"], "stage1.steps", {}),
    "unknown section": (["run", "nosuch.steps=1"], "must be section.key=value", {}),
    "unknown preset": (["run", "--preset", "nosuch"], "unknown preset 'nosuch'", {}),
    "missing data path": (["run", "--data", "/nonexistent/shards"], "/nonexistent/shards does not exist", {}),
    "unknown data md5": (["run", "--data", "ab" * 16], "no artifact with this DVC md5", {}),
    "unusable remote": (["run"], "the DVC remote EMU_DVC_REMOTE={file} is not usable", {"EMU_DVC_REMOTE": "{file}"}),
    "negative steps": (["config", "show", "stage1", "steps=-1"], "stage1.steps must be >= 1", {}),
    "huge number": (["config", "show", "stage1", "lr_lm=1e999"], "stage1.lr_lm", {}),
    "--out is a file": (["data", "synth", "--out", "{file}"], "{file} is not an empty folder", {}),
    "schedule with bad cron": (["schedule", "create", "--cron", "61 * * * *"], "minute field '61'", {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_settings_and_paths_exit_2_with_one_line(name, tmp_path):
    args, message, env = CASES[name]
    file = tmp_path / "a-file"
    file.write_text("x")
    fill = {"{file}": str(file)}

    def sub(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    environ = {**os.environ, "EMU_HOME": str(tmp_path / "home"), **{k: sub(v) for k, v in env.items()}}
    environ.pop("EMU_RUN_ID", None)
    done = subprocess.run([str(EMU), *[sub(a) for a in args]], capture_output=True, text=True, env=environ,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and sub(message) in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    home = tmp_path / "home"
    assert not (home / "lineage.db").exists() or "run" not in args[:1] or not _runs(home), "nothing started"


def _runs(home: Path) -> list:
    from emu.lineage.store import LineageStore

    return LineageStore(f"sqlite:///{home / 'lineage.db'}").list_runs()


def test_a_full_disk_is_one_line_naming_where_it_was_writing(disks, tmp_path):
    out = (disks["full"] or tmp_path) / "synth"
    limit = None if disks["full"] else _fsize_limit
    done = subprocess.run([str(EMU), "data", "synth", "--out", str(out)], capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and ("No space left on device" in line or "File too large" in line), line
    assert str(out) in line, line
    assert "Traceback" not in done.stderr


def test_a_read_only_disk_is_one_line_naming_the_path(disks):
    if disks["readonly"] is None:
        pytest.skip("cannot mount a read-only tmpfs here (needs root and mount rights)")
    out = disks["readonly"] / "synth"
    done = subprocess.run([str(EMU), "data", "synth", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "Read-only file system" in line and str(out) in line, line
    assert not out.exists()
