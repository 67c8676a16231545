"""Where the platform keeps its local state ($EMU_HOME), and how to call `emu` again.

One rule for every command, process and shell, read at call time (never at import):
`$EMU_HOME` when set; else, when emu runs from a source checkout (the package sits beside
`scripts/main`, as `scripts/setup` installs it), the checkout's `outputs/emu-home`; else `~/.emu`
(an installed package, the container image). So `scripts/main`, `emu run` and a later
`emu lineage show` in a new shell find the same runs without anyone exporting anything.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

#: The source checkout this package was imported from, if it is one.
CHECKOUT = Path(__file__).resolve().parents[1]


def default_home() -> Path:
    """`<checkout>/outputs/emu-home` for a source checkout, else `~/.emu`."""
    if (CHECKOUT / "scripts" / "main").is_file() and (CHECKOUT / "pyproject.toml").is_file():
        return CHECKOUT / "outputs" / "emu-home"
    return Path.home() / ".emu"


def emu_home() -> Path:
    """`$EMU_HOME`, else `default_home()`."""
    return Path(os.environ.get("EMU_HOME") or default_home()).expanduser()


def emu_command() -> str:
    """A command line that runs this `emu` from a new shell in the working directory: `emu` when
    that is what PATH finds, else this installation's script (relative to the working directory
    when inside it, as `.venv/bin/emu` after scripts/setup), prefixed with EMU_HOME=... when this
    process was given a home a new shell would not have."""
    script = Path(sys.executable).with_name("emu")
    found = shutil.which("emu")
    if found and Path(found).resolve() == script.resolve():
        command = "emu"
    elif script.is_file():
        command = _relative(script)
    else:  # no console script (python -m emu.cli from a bare interpreter)
        command = f"{shlex.quote(_relative(Path(sys.executable)))} -m emu.cli"
    home = os.environ.get("EMU_HOME")
    if home and Path(home).expanduser().absolute() != default_home():
        command = f"EMU_HOME={shlex.quote(str(Path(home).expanduser().absolute()))} {command}"
    return command


def _relative(path: Path) -> str:
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path.absolute())
