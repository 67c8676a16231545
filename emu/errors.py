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


def os_error_line(exc: OSError) -> str:
    """One line for an OSError (disk full, read-only folder, permission, a file where a folder
    belongs): the path(s) and the cause, as the `emu` entry point reports it."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, getattr(exc, "filename2", None)) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause
