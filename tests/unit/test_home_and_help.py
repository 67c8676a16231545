"""One $EMU_HOME default for every command and shell, commands printed so that they work pasted
into a new shell, and a help text on every option and argument of the `emu` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
from typer.main import get_command

from emu import home
from emu.cli import app

CHECKOUT = Path(__file__).resolve().parents[2]
VENV_EMU = Path(sys.executable).with_name("emu")


def fresh_env(**extra: str) -> dict[str, str]:
    """A new shell's environment: no EMU_* settings, the venv not on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMU_")}
    env["PATH"] = "/usr/bin:/bin"
    return {**env, **extra}


def test_the_default_home_is_the_checkouts_from_any_directory(tmp_path):
    """scripts/main no longer exports EMU_HOME: `emu` itself finds the same folder from any
    working directory, so a later `emu lineage show` in a new shell reads the run's database."""
    assert home.default_home() == CHECKOUT / "outputs" / "emu-home"
    code = "from emu.lineage.store import default_url; from emu.artifacts.dvc import default_remote; " \
           "print(default_url()); print(default_remote())"
    for cwd in (CHECKOUT, tmp_path):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=fresh_env(),
                             timeout=120, check=True).stdout.split()
        assert out == [f"sqlite:///{CHECKOUT / 'outputs' / 'emu-home' / 'lineage.db'}",
                       str(CHECKOUT / "outputs" / "emu-home" / "dvc-remote")]
    assert "EMU_HOME" not in (CHECKOUT / "scripts" / "main").read_text().replace("$EMU_HOME", "")


def test_printed_commands_run_from_a_new_shell(tmp_path, monkeypatch):
    monkeypatch.delenv("EMU_HOME", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(CHECKOUT)
    assert home.emu_command() == ".venv/bin/emu"  # not on PATH: the path that works from here
    monkeypatch.chdir(tmp_path)
    assert home.emu_command() == str(VENV_EMU)
    monkeypatch.setenv("EMU_HOME", str(tmp_path / "my home"))
    command = home.emu_command()
    assert command == f"EMU_HOME='{tmp_path / 'my home'}' {VENV_EMU}"
    done = subprocess.run(["bash", "-c", f"{command} lineage runs"], capture_output=True, text=True, cwd=tmp_path,
                          env=fresh_env(), timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "no runs", done.stderr
    assert (tmp_path / "my home" / "lineage.db").is_file()  # the home the command named, not the default
    monkeypatch.setenv("PATH", f"{VENV_EMU.parent}:/usr/bin:/bin")
    assert home.emu_command().endswith(" emu")


def _parameters(command: click.Command, path: list[str]):
    for name, sub in getattr(command, "commands", {}).items():
        yield from _parameters(sub, path + [name])
    for parameter in command.params:
        yield " ".join(path), parameter


def test_every_option_and_argument_has_a_help_text():
    missing = [f"{path} {p.name}" for path, p in _parameters(get_command(app), ["emu"])
               if p.name != "help" and not (getattr(p, "help", None) or "").strip()]
    assert missing == []
