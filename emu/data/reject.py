"""A source record that could not become a sample: what every importer yields instead of raising."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reject:
    """Written as one line of rejects.jsonl: which file, which record, which rule, what exactly."""

    source: str
    key: str
    rule: str
    message: str
