"""The project image a pipeline's tasks run in, and its digest.

scripts/build-image builds infra/Dockerfile, pushes it and writes the pushed reference, pinned by
digest (`repo@sha256:...`), to infra/image.ref. Compiling the pipeline takes `pipeline.image`
when set, else that record, else the default tag (components.IMAGE), which has no digest.
"""

from __future__ import annotations

import re
from pathlib import Path

from emu.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
#: Where scripts/build-image records the reference it pushed.
RECORD = ROOT / "infra" / "image.ref"
#: Name of the environment variable a task reads its image digest from (emu.pipeline.tasks).
DIGEST_ENV = "EMU_IMAGE_DIGEST"

_DIGEST_RE = re.compile(r"@(sha256:[0-9a-f]{64})$")


def image_reference(setting: str = "", record: Path = RECORD) -> str:
    """The image for every task: the setting, else the recorded build, else the default tag."""
    if setting:
        return setting
    if record.is_file():
        reference = record.read_text(encoding="utf-8").strip()
        if digest_of(reference) is None:
            raise ConfigError(f"{record} holds {reference!r}, not a repo@sha256:<64 hex> reference; "
                              f"re-run scripts/build-image")
        return reference
    from components import IMAGE

    return IMAGE


def digest_of(reference: str) -> str | None:
    """`sha256:...` of a digest-pinned reference, else None (a tag names no fixed content)."""
    match = _DIGEST_RE.search(reference)
    return match.group(1) if match else None
