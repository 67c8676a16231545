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
