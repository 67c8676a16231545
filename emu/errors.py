"""Exceptions shared across the platform. Each carries a message a user can act on."""


class EmuError(Exception):
    """Base class: an error the CLI reports as one line, without a traceback."""


class ConfigError(EmuError):
    """A setting is unknown, of the wrong type, or out of range. The message names the setting."""


class SourceError(EmuError):
    """A data source cannot be read at all (missing, wrong layout). Per-sample problems are not
    raised: they are recorded as rejects or validation failures."""


class DatasetError(EmuError):
    """A shard dataset is unusable as a whole (no dataset.json, no shards, unknown format version)."""


def os_error_line(exc: OSError, writing_under: str | None = None) -> str:
    """One line for an OSError (disk full, read-only folder, permission, a file where a folder
    belongs): the path(s) and the cause, as the `emu` entry point reports it. A failed write
    names no file (a full disk): `writing_under` (e.g. "--out DIR") says where it was writing."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, getattr(exc, "filename2", None)) if p is not None]
    if paths:
        return f"{' -> '.join(paths)}: {cause}"
    return f"{cause} (writing under {writing_under})" if writing_under else cause
