"""Data types: the units Emu2 gives its own global batch size (Emu2 §2.2.2: 12,800 image-text pairs,
6,400 video-text pairs, 3,200 interleaved, 800 language-only per step in stage 2).

A sample's data type follows from its kind (and, for pairs, whether it is a video), so it can be
read from a manifest row as well as from a decoded sample. Stage configs key their
`batch_sizes` by these names.
"""

from __future__ import annotations

from emu.data.schema import Pair, Sample

DATA_TYPES = (
    "image_text",         # image-text pairs (LAION, CapsFusion; img2dataset)
    "video_text",         # video-text pairs (WebVid)
    "interleaved",        # interleaved image-text documents (MMC4)
    "video_interleaved",  # video frames interleaved with subtitles (YT-Storyboard)
    "grounded",           # grounded image-text pairs (GRIT)
    "text",               # language-only text (Pile)
    "chat",               # multimodal conversations (LLaVA)
    "academic",           # academic task data as instructions (VQAv2, COCO captions)
    "edit",               # generation instructions: condition -> target image (edits)
)

_BY_KIND = {"interleaved": "interleaved", "video_text": "video_interleaved", "grounded": "grounded",
            "text": "text", "chat": "chat", "vqa": "academic", "captions": "academic", "gen": "edit"}


def data_type(kind: str, is_video: bool = False) -> str:
    """The data type of a sample kind; pairs split into image_text and video_text."""
    if kind == "pair":
        return "video_text" if is_video else "image_text"
    try:
        return _BY_KIND[kind]
    except KeyError:
        raise ValueError(f"unknown sample kind {kind!r}") from None


def data_type_of(sample: Sample) -> str:
    return data_type(sample.kind, isinstance(sample, Pair) and sample.media == "video")


def data_type_of_row(row: dict) -> str:
    """From a manifest row (emu.data.manifest): video pairs have n_frames > 0."""
    return data_type(row["kind"], bool(row.get("n_frames")))
