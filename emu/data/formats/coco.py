"""COCO captions (`--format coco`) → `captions` evaluation samples (docs/formats.md).

SRC holds `annotations/captions_{split}.json` ({info, images, licenses, annotations}) and the images
`{split}/{file_name}`. One sample per `images` entry, in file order, with its captions in annotation
order. Key: `coco<image_id>`; `source`: `annotations/captions_{split}.json:<image_id>`. `meta` keeps
the image entry's other fields (file_name, width, height, coco_url ...), `split` and `caption_ids`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.data.formats._files import ImageFiles, load_json, natural_sorted, reject, resolve_dir, source_name
from emu.data.reject import Reject
from emu.data.schema import Captions
from emu.data.shards import SampleProblem, sanitize_key
from emu.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

ANNOTATIONS_GLOB = "captions_*.json"


@dataclass
class Options:
    """Settings of `--format coco` (the `import.coco` group)."""

    #: Folder of the images, relative to SRC (or absolute); default: SRC/{split}.
    images_dir: str | None = None

    def __post_init__(self) -> None:
        if self.images_dir == "":
            raise ConfigError("import.coco.images_dir must name a folder, or be null for SRC/{split}")


@dataclass(frozen=True)
class CaptionEntry:
    id: Any
    caption: Any


def read(src: Path, config: ImportConfig) -> Iterator[Captions | Reject]:
    """Find the caption files (SourceError when there is none), then yield their images' samples."""
    files = natural_sorted((src / "annotations").glob(ANNOTATIONS_GLOB)) if src.is_dir() else []
    if not files:
        raise SourceError(f"{src} must be a folder holding annotations/captions_{{split}}.json (COCO layout)")
    return _samples(src, files, config.coco)


def _samples(src: Path, files: list[Path], options: Options) -> Iterator[Captions | Reject]:
    for path in files:
        split = path.name[len("captions_"):-len(".json")]
        name = source_name(src, path)
        data = load_json(path)
        if not isinstance(data, dict) or not all(isinstance(data.get(f), list) for f in ("images", "annotations")):
            raise SourceError(f"{path} must hold a JSON object with 'images' and 'annotations' lists (COCO layout)")
        captions, invalid = _captions_by_image(data["annotations"], name)
        yield from invalid
        images = ImageFiles(resolve_dir(src, options.images_dir, src / split))
        for index, image in enumerate(data["images"]):
            yield _sample(image, index, captions, images, name, split)
        listed = {_int_field(image, "id") for image in data["images"]}
        for image_id in sorted(captions.keys() - listed):
            yield reject(f"{name}:{image_id}", f"coco{image_id}", "image_missing",
                         f"{len(captions[image_id])} captions name image_id {image_id}, which images does not list")


def _captions_by_image(annotations: list[Any], name: str) -> tuple[dict[int, list[CaptionEntry]], list[Reject]]:
    """Caption entries by image_id in annotation order, and rejects for entries without an integer
    image_id (they belong to no image)."""
    captions: dict[int, list[CaptionEntry]] = defaultdict(list)
    invalid = []
    for index, entry in enumerate(annotations):
        image_id = _int_field(entry, "image_id")
        if image_id is None:
            invalid.append(reject(f"{name}:annotations[{index}]", sanitize_key(f"annotation-{index}"),
                                  "record_invalid", "a caption annotation must be an object with an integer image_id"))
            continue
        captions[image_id].append(CaptionEntry(entry.get("id"), entry.get("caption")))
    return captions, invalid


def _sample(image: Any, index: int, captions: dict[int, list[CaptionEntry]], images: ImageFiles,
            name: str, split: str) -> Captions | Reject:
    image_id = _int_field(image, "id")
    if image_id is None or not isinstance(image.get("file_name"), str):
        return reject(f"{name}:images[{index}]", sanitize_key(f"{split}-image-{index}"), "record_invalid",
                      "an images entry must be an object with an integer id and a string file_name")
    source, key = f"{name}:{image_id}", f"coco{image_id}"
    entries = captions.get(image_id, [])
    if not entries:
        return reject(source, key, "captions_missing", f"no annotation has image_id {image_id}")
    if not all(isinstance(e.caption, str) for e in entries):
        return reject(source, key, "record_invalid", "every caption must be a string")
    try:
        data = images.read(image["file_name"])
    except SampleProblem as exc:
        return reject(source, key, exc.problem.rule, exc.problem.message)
    meta = {field: value for field, value in image.items() if field != "id"}
    meta.update(split=split, caption_ids=[e.id for e in entries])
    return Captions(key=key, source=source, images=[data], image_id=image_id,
                    captions=[e.caption for e in entries], meta=meta)


def _int_field(entry: Any, name: str) -> int | None:
    """entry[name] when entry is an object and that field an integer, else None."""
    value = entry.get(name) if isinstance(entry, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
