"""Importers for public data formats (docs/formats.md). Each module knows one layout only: it yields
Samples, or Rejects for records it cannot use; emu.data.importing does the common checks and writing.

Every module exports `Options` (its settings, the `import.<format>` group of a preset) and
`read(src, config) -> Iterator[Sample | Reject]`, raising SourceError when SRC cannot be read at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from emu.data.formats import coco, grit, img2dataset, llava, mmc4, text, vqav2, webdataset, webvid, ytsb
from emu.data.images import DEFAULT_MAX_PIXELS
from emu.data.reject import Reject
from emu.data.schema import Sample
from emu.errors import ConfigError


@dataclass
class ImportConfig:
    """Settings of `emu data import`: shard sizes, image limits, and one option group per format."""

    samples_per_shard: int = 1000      # a shard closes at this many samples ...
    max_shard_bytes: int = 1 << 30     # ... or at this many bytes, whichever comes first
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # larger declared images are rejected as decompression bombs
    #: The import fails (no dataset.json; rejects.jsonl says why) when it keeps less than this
    #: fraction of the source's records, and always when it keeps none: an empty or mostly rejected
    #: dataset must stop a pipeline, not train on nothing. Downloads the source itself lists as
    #: failed (img2dataset's `source_failed` rows) are not counted: web crawls lose 10-50% of
    #: their URLs, and the downloader's stats already report it.
    min_kept_fraction: float = 0.0
    img2dataset: img2dataset.Options = field(default_factory=img2dataset.Options)
    webdataset: webdataset.Options = field(default_factory=webdataset.Options)
    mmc4: mmc4.Options = field(default_factory=mmc4.Options)
    webvid: webvid.Options = field(default_factory=webvid.Options)
    ytsb: ytsb.Options = field(default_factory=ytsb.Options)
    grit: grit.Options = field(default_factory=grit.Options)
    llava: llava.Options = field(default_factory=llava.Options)
    text: text.Options = field(default_factory=text.Options)
    vqav2: vqav2.Options = field(default_factory=vqav2.Options)
    coco: coco.Options = field(default_factory=coco.Options)

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ConfigError(f"import.samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_shard_bytes < 1:
            raise ConfigError(f"import.max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.max_image_pixels < 1:
            raise ConfigError(f"import.max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if not 0.0 <= self.min_kept_fraction <= 1.0:  # also false for NaN
            raise ConfigError(f"import.min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}")


Reader = Callable[[Path, ImportConfig], Iterator[Sample | Reject]]

IMPORTERS: dict[str, Reader] = {
    "img2dataset": img2dataset.read,
    "webdataset": webdataset.read,
    "mmc4": mmc4.read,
    "webvid": webvid.read,
    "ytsb": ytsb.read,
    "grit": grit.read,
    "llava": llava.read,
    "text": text.read,
    "vqav2": vqav2.read,
    "coco": coco.read,
}

#: `emu data import` flags naming a source's parts, and the setting each sets per format.
PATH_FLAGS: dict[str, dict[str, str]] = {
    "questions": {"vqav2": "vqav2.questions"},
    "annotations": {"vqav2": "vqav2.annotations", "coco": "coco.annotations"},
    "images": {"vqav2": "vqav2.images_dir", "coco": "coco.images_dir", "llava": "llava.image_folder",
               "mmc4": "mmc4.images_dir"},
}


def path_overrides(fmt: str, paths: dict[str, Path | None]) -> list[str]:
    """`key=value` overrides for the path flags given (`--images DIR` ...). A flag's path is as
    typed on the command line, relative to the working directory, so it is made absolute (the
    settings themselves are relative to SRC). ConfigError for a flag the format has no use for."""
    overrides = []
    for flag, path in paths.items():
        if path is None:
            continue
        setting = PATH_FLAGS[flag].get(fmt)
        if setting is None:
            raise ConfigError(f"--{flag} is for --format {' or '.join(PATH_FLAGS[flag])}, not {fmt}")
        overrides.append(f"{setting}={Path(path).absolute()}")
    return overrides
