"""The validation gate: Great Expectations suites over per-sample manifest facts (DESIGN.md, `validate`).

`emu validate --data DIR --report OUT` scans every shard dataset under DIR into one manifest of
per-sample facts (emu.validate.scan), checks them against the rules in emu.validate.rules with
Great Expectations (emu.validate.suites, the only GX import) and writes a report that names the
dataset, shard, key and rule of every failing sample (emu.validate.gate).

This module holds only the config, so `emu config show validate` imports nothing heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from emu.data.images import DEFAULT_MAX_PIXELS
from emu.errors import ConfigError

__all__ = ["ValidateConfig"]


@dataclass
class ValidateConfig:
    """Thresholds of the validation gate. The manifest records facts; these settings are the policy."""

    #: Tolerated fraction of failing samples per rule and sample kind, in [0, 1]. Each expectation
    #: runs with GX `mostly = 1 - max_failure_fraction`; 0 means every sample must pass every rule.
    #: Shard checksums are never tolerated: a changed shard is not the data dataset.json describes.
    max_failure_fraction: float = 0.0
    #: Shortest text (characters after stripping whitespace) a sample may hold; 1 rejects empty and
    #: whitespace-only captions, questions and turns. Video subtitles may be silent (empty) by design.
    min_text_chars: int = 1
    #: Longest single text in characters; longer ones are scraping accidents (whole pages, base64).
    max_text_chars: int = 100_000
    #: Smallest image side in pixels. Emu2's encoder reads 448 px; far smaller images are icons,
    #: tracking pixels or thumbnails that add nothing but noise.
    min_image_side: int = 32
    #: Largest aspect ratio max(w/h, h/w); banners and strips are mostly cropped away by resizing.
    max_aspect_ratio: float = 4.0
    #: Pixel budget per image: a larger declared size is reported as a decompression bomb without
    #: decoding a pixel (emu.data.images).
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    #: Fewest frames a video (video pair or video_text sample) may have; one frame is no video.
    min_frames: int = 2
    #: Most frames a video may have (Emu2 samples 8 per clip, App. B.1; 64 leaves ample margin).
    max_frames: int = 64
    #: Annotator answers every VQA question must carry (VQAv2 has exactly 10; the official
    #: accuracy min(#matches / 3, 1) averaged over 10-choose-9 subsets assumes it).
    vqa_answers: int = 10
    #: Fewest boxes a grounded sample must carry; one without boxes teaches no grounding.
    min_boxes: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.max_failure_fraction, (int, float))
                and 0.0 <= self.max_failure_fraction <= 1.0):
            raise ConfigError(f"validate.max_failure_fraction must be a number in [0, 1], "
                              f"got {self.max_failure_fraction!r}")
        _at_least("min_text_chars", self.min_text_chars, 0)
        _at_least("max_text_chars", self.max_text_chars, max(self.min_text_chars, 1))
        _at_least("min_image_side", self.min_image_side, 1)
        if not (isinstance(self.max_aspect_ratio, (int, float)) and math.isfinite(self.max_aspect_ratio)
                and self.max_aspect_ratio >= 1.0):
            raise ConfigError(f"validate.max_aspect_ratio must be a finite number >= 1 "
                              f"(max(w/h, h/w) is never below 1), got {self.max_aspect_ratio!r}")
        _at_least("max_image_pixels", self.max_image_pixels, self.min_image_side ** 2)
        _at_least("min_frames", self.min_frames, 1)
        _at_least("max_frames", self.max_frames, self.min_frames)
        _at_least("vqa_answers", self.vqa_answers, 1)
        _at_least("min_boxes", self.min_boxes, 0)


def _at_least(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"validate.{name} must be an integer >= {minimum}, got {value!r}")
