"""Per-shard manifest: one row per sample with the facts validation needs.

The row records facts (sizes, counts, hashes, booleans), never policy: thresholds such as the
minimum resolution live in the validation config, so one manifest serves any gate. Columns that do
not apply to a sample's kind hold 0 / null. A sample that could not even be decoded gets a row
whose `structure_error` names the rule and the problem.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pyarrow as pa

from emu.data.images import DEFAULT_MAX_PIXELS, ImageProblem, inspect_image
from emu.data.schema import IMAGE_PLACEHOLDER, Chat, Gen, Grounded, Interleaved, Pair, Sample, VideoText, VQA

SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("key", pa.string()),
    ("kind", pa.string()),
    ("source", pa.string()),
    ("structure_error", pa.string()),      # "rule: message" when the sample could not be decoded
    ("n_texts", pa.int32()),
    ("text_chars_min", pa.int64()),        # shortest text after stripping whitespace
    ("text_chars_max", pa.int64()),
    ("text_chars_total", pa.int64()),
    ("text_unicode_ok", pa.bool_()),       # every text encodes as strict UTF-8 (no lone surrogates)
    ("text_sha256", pa.string()),
    ("n_images", pa.int32()),
    ("image_error", pa.string()),          # "image i: rule: message" for the first bad image
    ("image_side_min", pa.int32()),
    ("image_aspect_max", pa.float64()),    # max(w/h, h/w) over the sample's images
    ("image_widths", pa.list_(pa.int32())),
    ("image_heights", pa.list_(pa.int32())),
    ("image_bytes", pa.list_(pa.int64())),
    ("image_sha256", pa.list_(pa.string())),
    ("n_frames", pa.int32()),              # video frames (video pairs and video_text), else 0
    ("n_subtitles", pa.int32()),
    ("n_boxes", pa.int32()),
    ("boxes_finite", pa.bool_()),
    ("box_coord_min", pa.float64()),
    ("box_coord_max", pa.float64()),
    ("box_extent_min", pa.float64()),      # min over boxes of min(x_max - x_min, y_max - y_min)
    ("phrase_spans_ok", pa.bool_()),       # 0 <= start < end <= len(text) for every phrase
    ("n_turns", pa.int32()),
    ("turns_alternate", pa.bool_()),       # [system] user assistant user assistant ... ending on assistant
    ("n_image_placeholders", pa.int32()),
    ("image_refs_ok", pa.bool_()),         # every image referenced exactly once, indices in range
    ("n_answers", pa.int32()),
])


def empty_row(shard: str, key: str) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in SCHEMA.names}
    row.update(shard=shard, key=key, kind="", source="")
    return row


def row_for_problem(shard: str, key: str, rule: str, message: str) -> dict[str, Any]:
    """The row of a sample that could not be decoded."""
    row = empty_row(shard, key)
    row["structure_error"] = f"{rule}: {message}"
    return row


def row_for_sample(shard: str, sample: Sample, max_pixels: int = DEFAULT_MAX_PIXELS,
                   decode_images: bool = True) -> dict[str, Any]:
    """Compute a decoded sample's manifest row. Images are inspected (and with `decode_images`
    fully decoded) here, so undecodable and oversized images are facts in the row."""
    row = empty_row(shard, sample.key)
    row.update(kind=sample.kind, source=sample.source)
    _text_facts(row, sample.texts())
    _image_facts(row, sample.images, max_pixels, decode_images)
    if isinstance(sample, (Pair, VideoText)):
        is_video = isinstance(sample, VideoText) or sample.media == "video"
        row["n_frames"] = len(sample.images) if is_video else 0
    if isinstance(sample, VideoText):
        row["n_subtitles"] = len(sample.subtitles)
    if isinstance(sample, Grounded):
        _box_facts(row, sample)
    if isinstance(sample, Chat):
        roles = [t.role for t in sample.turns]
        row["n_turns"] = len(roles)
        row["turns_alternate"] = turns_alternate(roles)
        row["n_image_placeholders"] = sum(t.content.count(IMAGE_PLACEHOLDER) for t in sample.turns)
    if isinstance(sample, Interleaved):
        refs = [s.image for s in sample.segments if s.image is not None]
        row["image_refs_ok"] = sorted(refs) == list(range(len(sample.images)))
    if isinstance(sample, Gen):
        refs = [s.image for s in sample.condition if s.image is not None] + [sample.target]
        row["image_refs_ok"] = sorted(refs) == list(range(len(sample.images)))
    if isinstance(sample, VQA):
        row["n_answers"] = len(sample.answers)
    return row


def turns_alternate(roles: list[str]) -> bool:
    """True for `[system] user assistant (user assistant)*`: at most one leading system message,
    then strict alternation starting with the user and ending with the assistant."""
    if roles and roles[0] == "system":
        roles = roles[1:]
    if not roles or len(roles) % 2:
        return False
    return all(role == ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(roles))


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _text_facts(row: dict[str, Any], texts: list[str]) -> None:
    row["n_texts"] = len(texts)
    lengths = [len(t.strip()) if isinstance(t, str) else 0 for t in texts]
    row["text_chars_min"] = min(lengths) if lengths else None
    row["text_chars_max"] = max(lengths) if lengths else None
    row["text_chars_total"] = sum(lengths)
    digest = hashlib.sha256()
    ok = True
    for t in texts:
        try:
            encoded = t.encode("utf-8")
        except (UnicodeEncodeError, AttributeError):
            ok = False
            continue
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    row["text_unicode_ok"] = ok
    row["text_sha256"] = digest.hexdigest()


def _image_facts(row: dict[str, Any], images: list[bytes], max_pixels: int, decode: bool) -> None:
    row["n_images"] = len(images)
    widths, heights = [], []
    for i, data in enumerate(images):
        try:
            info = inspect_image(data, max_pixels=max_pixels, decode=decode)
        except ImageProblem as exc:
            if row["image_error"] is None:
                row["image_error"] = f"image {i}: {exc.rule}: {exc.message}"
            widths.append(0)
            heights.append(0)
            continue
        widths.append(info.width)
        heights.append(info.height)
    row["image_widths"] = widths
    row["image_heights"] = heights
    row["image_bytes"] = [len(d) for d in images]
    row["image_sha256"] = [hashlib.sha256(d).hexdigest() for d in images]
    sizes = [(w, h) for w, h in zip(widths, heights) if w > 0 and h > 0]
    if sizes:
        row["image_side_min"] = min(min(w, h) for w, h in sizes)
        row["image_aspect_max"] = max(max(w / h, h / w) for w, h in sizes)


def _box_facts(row: dict[str, Any], sample: Grounded) -> None:
    phrases = list(sample.phrases) + list(sample.referring_expressions)
    boxes = [b for p in phrases for b in p.boxes]
    row["n_boxes"] = len(boxes)
    coords = [c for b in boxes for c in b.as_list()]
    row["boxes_finite"] = all(isinstance(c, (int, float)) and math.isfinite(c) for c in coords)
    if boxes and row["boxes_finite"]:
        row["box_coord_min"] = min(coords)
        row["box_coord_max"] = max(coords)
        row["box_extent_min"] = min(min(b.x_max - b.x_min, b.y_max - b.y_min) for b in boxes)
    n = len(sample.text)
    row["phrase_spans_ok"] = all(
        isinstance(p.start, int) and isinstance(p.end, int) and 0 <= p.start < p.end <= n for p in phrases)
