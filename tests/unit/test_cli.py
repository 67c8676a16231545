"""The `emu` console script's exit contract for usage errors: one readable message, exit 2.

Typer vendors click (`typer._click`), so its usage errors are not `click.ClickException`; they used
to escape `emu.cli.main` as a traceback with exit 1, which `emu validate` documents as "the gate
failed".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EMU = Path(sys.executable).parent / "emu"


@pytest.mark.parametrize("args, message", [
    (["validate", "--data", "x"], "Missing option '--report'"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["data", "synth", "--out", "x", "--seed", "abc"], "Invalid value for '--seed'"),
    (["data", "import", "--format", "text", "--src", "x", "--out", "y", "--bogus"], "No such option: --bogus"),
])
def test_usage_errors_exit_2_without_a_traceback(tmp_path, args, message):
    proc = subprocess.run([str(EMU), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_exits_0():
    proc = subprocess.run([str(EMU), "data", "import", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--format" in proc.stdout
