"""PLACEHOLDER: being written; see docs/formats.md."""
from dataclasses import dataclass


@dataclass
class Options:
    pass


def read(src, config):
    raise NotImplementedError("img2dataset importer")
