"""Settings of `emu data synth`, and the per-sample random streams that make it deterministic."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields

from emu.errors import ConfigError

#: Named sizes for `--size`: multipliers of the default counts (about 3,000 samples at 1.0).
SIZE_NAMES = {"tiny": 0.125, "small": 0.5, "default": 1.0, "large": 100.0}


@dataclass
class SynthConfig:
    """How much of the shapes world to write, per public format. Every count is multiplied by
    `scale`, so one code path writes a test-sized world or millions of samples."""

    seed: int = 0
    scale: float = 1.0
    image_size: int = 64        # square scene side in pixels
    max_shapes: int = 3         # shapes per scene (1..3 cells of the 3x3 grid)
    pairs: int = 512            # img2dataset image-text pairs
    grounded: int = 256         # GRIT grounded pairs
    videos: int = 32            # WebVid mp4 videos with captions
    video_frames: int = 16      # frames per WebVid video (the importer samples webvid.num_frames)
    storyboards: int = 32       # YT-Storyboard videos with per-frame subtitles
    storyboard_frames: int = 8
    documents: int = 128        # MMC4 interleaved documents
    images_per_document: int = 3
    chats: int = 256            # LLaVA conversations
    edits: int = 128            # LLaVA-format edit instructions (generation targets)
    texts: int = 256            # plain-text jsonl paragraphs
    vqa_images: int = 64        # VQAv2 evaluation images (up to 4 questions each)
    caption_images: int = 64    # COCO captions evaluation images
    vqa_train_images: int = 256      # VQAv2-layout training split (academic instruction data)
    caption_train_images: int = 128  # COCO-layout training split (academic instruction data)
    captions_per_image: int = 5
    records_per_file: int = 1000  # records per tar / jsonl file in the sharded public formats

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"synth.scale must be a finite number > 0, got {self.scale}")
        if self.image_size < 24:
            raise ConfigError(f"synth.image_size must be >= 24 pixels to draw shapes, got {self.image_size}")
        if not 1 <= self.max_shapes <= 9:
            raise ConfigError(f"synth.max_shapes must be in 1..9, got {self.max_shapes}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and f.name != "seed" and value < 0:
                raise ConfigError(f"synth.{f.name} must be >= 0, got {value}")
        for name in ("video_frames", "storyboard_frames", "images_per_document", "captions_per_image",
                     "records_per_file"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synth.{name} must be >= 1, got {getattr(self, name)}")

    def count(self, name: str) -> int:
        """The scaled count of one source (a non-zero count never scales below 1)."""
        base = getattr(self, name)
        return 0 if base == 0 else max(1, round(base * self.scale))


def size_to_scale(size: str) -> float:
    """`--size` as a name (tiny, small, default, large) or a positive number."""
    if size in SIZE_NAMES:
        return SIZE_NAMES[size]
    try:
        value = float(size)
    except ValueError:
        raise ConfigError(f"--size must be one of {', '.join(SIZE_NAMES)} or a positive number, got {size!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--size must be a finite positive number, got {size!r}")
    return value


def sample_rng(config: SynthConfig, stream: str, index: int) -> random.Random:
    """The random stream of one sample: independent of every other sample and of generation
    order, so any slice of the world can be regenerated (or generated in parallel) identically."""
    return random.Random(f"{config.seed}:{stream}:{index}")
