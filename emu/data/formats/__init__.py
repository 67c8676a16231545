"""Importers for public data formats (docs/formats.md). Each module knows one layout only: it yields
Samples, or Rejects for records it cannot use; emu.data.importing does the common checks and writing.

Every module exports `Options` (its settings, the `import.<format>` group of a preset) and
`read(src, config) -> Iterator[Sample | Reject]`, raising SourceError when SRC cannot be read at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from emu.data.formats import coco, grit, img2dataset, llava, mmc4, text, vqav2, webvid, ytsb
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
    img2dataset: img2dataset.Options = field(default_factory=img2dataset.Options)
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


Reader = Callable[[Path, ImportConfig], Iterator[Sample | Reject]]

IMPORTERS: dict[str, Reader] = {
    "img2dataset": img2dataset.read,
    "mmc4": mmc4.read,
    "webvid": webvid.read,
    "ytsb": ytsb.read,
    "grit": grit.read,
    "llava": llava.read,
    "text": text.read,
    "vqav2": vqav2.read,
    "coco": coco.read,
}
