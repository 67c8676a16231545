"""MMC4 (`--format mmc4`) → `interleaved` documents (docs/formats.md).

SRC holds `docs_shard_{N}_v2.jsonl` (or `docs_no_face_shard_{N}_v2.jsonl`, or the `.jsonl.zip`
downloads) and `images/{image_name}` as mmc4's `download_images.py` leaves them. Shards are
streamed line by line; one line is one document. Key: `<file stem>-<line>`.

Each image goes right BEFORE the sentence its `matched_text_index` points at, as OpenFlamingo does
(`sentences[ix] = f"<|endofchunk|><image>{sentences[ix]}"`); several images on one sentence keep
`image_info` order. Images below `mmc4.sim_threshold` are left out and counted. `meta` keeps `url`,
`could_have_url_duplicate`, the kept images' `image_info` entries (in `images` order) and the counts
`dropped_images` / `missing_images`; `similarity_matrix` is not kept (`matched_sim` carries the
score the threshold used).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from emu.data.formats._files import ImageFiles, Line, iter_jsonl, json_type, jsonl_files, reject, source_name
from emu.data.reject import Reject
from emu.data.schema import Interleaved, Segment
from emu.data.shards import SampleProblem
from emu.errors import ConfigError

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

LAYOUT = "MMC4 docs_shard_{N}_v2.jsonl[.zip] and images/"
MISSING_IMAGE_POLICIES = ("reject", "drop")


@dataclass
class Options:
    """Settings of `--format mmc4` (the `import.mmc4` group)."""

    #: Images whose CLIP ViT-L/14 similarity to their matched sentence (`matched_sim`) is below
    #: this are left out. 0.24 is OpenFlamingo's documented value; its code default of 30 drops
    #: every image, since the similarities lie around 0.2-0.35.
    sim_threshold: float = 0.24
    #: Folder of the downloaded images, relative to SRC (or absolute).
    images_dir: str = "images"
    #: A document naming an image file that is not there: `reject` the document, or `drop` the
    #: image (web downloads routinely fail) and keep the rest, counted in meta["missing_images"].
    missing_images: Literal["reject", "drop"] = "reject"

    def __post_init__(self) -> None:
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise ConfigError(f"import.mmc4.sim_threshold must be a cosine similarity in [-1, 1] "
                              f"(OpenFlamingo uses 0.24), got {self.sim_threshold}")
        if not self.images_dir:
            raise ConfigError("import.mmc4.images_dir must name a folder, got an empty string")
        if self.missing_images not in MISSING_IMAGE_POLICIES:
            raise ConfigError(f"import.mmc4.missing_images must be one of {', '.join(MISSING_IMAGE_POLICIES)}, "
                              f"got {self.missing_images!r}")


def read(src: Path, config: ImportConfig) -> Iterator[Interleaved | Reject]:
    """Stream `interleaved` documents from SRC; SourceError when SRC holds no MMC4 shard."""
    files = jsonl_files(src, LAYOUT)
    root = src if src.is_dir() else src.parent
    images = ImageFiles(root / config.mmc4.images_dir)  # an absolute images_dir replaces root
    return _documents(src, files, images, config.mmc4)


def _documents(src: Path, files: list[Path], images: ImageFiles, options: Options) -> Iterator[Interleaved | Reject]:
    for path in files:
        for line in iter_jsonl(path, source_name(src, path)):
            yield _document(line, images, options) if isinstance(line, Line) else line


def _document(line: Line, images: ImageFiles, options: Options) -> Interleaved | Reject:
    doc = line.value
    invalid = _structure_problem(doc)
    if invalid:
        return reject(line.source, line.key, "record_invalid", invalid)
    text_list, image_info = doc["text_list"], doc["image_info"]
    for info in image_info:
        if not 0 <= info["matched_text_index"] < len(text_list):
            return reject(line.source, line.key, "matched_text_index_in_range",
                          f"image {info['image_name']!r} has matched_text_index {info['matched_text_index']} "
                          f"but text_list holds {len(text_list)} sentences")
    above = [info for info in image_info if info["matched_sim"] >= options.sim_threshold]
    try:
        kept, missing = _read_images(above, images, options.missing_images)
    except SampleProblem as exc:
        return reject(line.source, line.key, exc.problem.rule, exc.problem.message)
    if not kept:
        return reject(line.source, line.key, "no_images",
                      f"none of {len(image_info)} images is left: {len(image_info) - len(above)} below "
                      f"sim_threshold {options.sim_threshold}, {missing} missing")
    segments, ordered = _interleave(text_list, kept)
    meta = {"url": doc.get("url"), "could_have_url_duplicate": doc.get("could_have_url_duplicate"),
            "image_info": [info for info, _ in ordered], "dropped_images": len(image_info) - len(above),
            "missing_images": missing}
    return Interleaved(key=line.key, source=line.source, images=[data for _, data in ordered],
                       segments=segments, meta=meta)


def _read_images(infos: list[dict[str, Any]], images: ImageFiles, missing_images: str
                 ) -> tuple[list[tuple[dict[str, Any], bytes]], int]:
    """(image_info entry, bytes) of each image, and how many were missing and dropped; raises
    SampleProblem for an image that cannot be read (a missing one only with `reject`)."""
    kept, missing = [], 0
    for info in infos:
        try:
            kept.append((info, images.read(info["image_name"])))
        except SampleProblem as exc:
            if exc.problem.rule != "image_file_missing" or missing_images != "drop":
                raise
            missing += 1
    return kept, missing


def _interleave(text_list: list[str], kept: list[tuple[dict[str, Any], bytes]]
                ) -> tuple[list[Segment], list[tuple[dict[str, Any], bytes]]]:
    """Segments with each image before its matched sentence, and the images in that order."""
    by_sentence: dict[int, list[tuple[dict[str, Any], bytes]]] = defaultdict(list)
    for info, data in kept:
        by_sentence[info["matched_text_index"]].append((info, data))
    segments: list[Segment] = []
    ordered: list[tuple[dict[str, Any], bytes]] = []
    for index, sentence in enumerate(text_list):
        for image in by_sentence.get(index, ()):
            segments.append(Segment(image=len(ordered)))
            ordered.append(image)
        segments.append(Segment(text=sentence))
    return segments, ordered


def _structure_problem(doc: Any) -> str | None:
    """What makes a line not an MMC4 document, or None."""
    if not isinstance(doc, dict):
        return f"line holds a JSON {json_type(doc)}, not a document object"
    text_list, image_info = doc.get("text_list"), doc.get("image_info")
    if not isinstance(text_list, list) or not all(isinstance(t, str) for t in text_list):
        return "text_list must be a list of strings"
    if not isinstance(image_info, list) or not all(isinstance(i, dict) for i in image_info):
        return "image_info must be a list of objects"
    for position, info in enumerate(image_info):
        if not isinstance(info.get("image_name"), str):
            return f"image_info[{position}].image_name must be a string"
        index = info.get("matched_text_index")
        if isinstance(index, bool) or not isinstance(index, int):
            return f"image_info[{position}].matched_text_index must be an integer, found {index!r}"
        sim = info.get("matched_sim")
        if isinstance(sim, bool) or not isinstance(sim, (int, float)) or not math.isfinite(sim):
            return f"image_info[{position}].matched_sim must be a finite number, found {sim!r}"
    return None
