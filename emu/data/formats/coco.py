"""COCO captions (`--format coco`) → `captions` evaluation samples (docs/formats.md).

The official downloads hold `annotations/captions_{split}.json` ({info, images, licenses,
annotations}) and the images `{split}/{file_name}`. The captions file is found there (or in SRC
itself), or named explicitly: SRC may be the captions file, `coco.annotations` names it, and
`coco.images_dir` the image folder (`emu data import --annotations --images`); images are looked
for in `{split}/` and `images/{split}/` beside `annotations/` and in SRC. One sample per `images`
entry, in file order, with its captions in annotation order. Key: `coco<image_id>`; `source`:
`<captions file relative to SRC>:<image_id>`. `meta` keeps the image entry's other fields
(file_name, width, height, coco_url ...), `split` and `caption_ids`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.data.formats._files import ImageFiles, load_json, natural_sorted, reject, relative_name, resolve_dir
from emu.data.reject import Reject
from emu.data.schema import Captions
from emu.data.shards import SampleProblem, sanitize_key
from emu.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

ANNOTATIONS_GLOB = "captions_*.json"
#: Folders (relative to SRC) searched for the captions files: the official layout, then SRC.
ANNOTATION_FOLDERS = ("annotations", ".")
#: Image folders relative to the folder holding `annotations/` (or SRC), {split} filled in.
IMAGE_FOLDERS = ("{split}", "images/{split}", "images", ".")


@dataclass
class Options:
    """Settings of `--format coco` (the `import.coco` group). Paths are relative to SRC (to its
    folder when SRC is the captions file), or absolute."""

    #: The captions file; default: every annotations/captions_{split}.json (or SRC/captions_*.json).
    annotations: str | None = None
    #: Folder of the images; default: the first of IMAGE_FOLDERS that holds the image.
    images_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("annotations", "images_dir"):
            if getattr(self, name) == "":
                raise ConfigError(f"import.coco.{name} must name a path, or be null to find it in SRC")


@dataclass(frozen=True)
class CaptionEntry:
    id: Any
    caption: Any


def read(src: Path, config: ImportConfig) -> Iterator[Captions | Reject]:
    """Find the caption files (SourceError when there is none), then yield their images' samples."""
    base = src if src.is_dir() else src.parent
    return _samples(base, _caption_files(src, base, config.coco), config.coco)


def _caption_files(src: Path, base: Path, options: Options) -> list[Path]:
    if src.is_file():
        if options.annotations is not None:
            raise SourceError(f"SRC {src} is a captions file and import.coco.annotations names "
                              f"{options.annotations}: give the captions file once")
        return [src]
    if options.annotations is not None:
        path = resolve_dir(base, options.annotations, base)
        if not path.is_file():
            raise SourceError(f"import.coco.annotations: no file {path}")
        return [path]
    for folder in ANNOTATION_FOLDERS:
        files = natural_sorted((base / folder).glob(ANNOTATIONS_GLOB)) if (base / folder).is_dir() else []
        if files:
            return files
    looked = " or ".join(str(base / folder / ANNOTATIONS_GLOB) for folder in ANNOTATION_FOLDERS)
    raise SourceError(f"no COCO captions file: looked for {looked}; pass the file as --src or --annotations")


def _split_of(path: Path) -> str:
    """`val2014` of captions_val2014.json; any other name's stem."""
    return path.name[len("captions_"):-len(".json")] if path.match(ANNOTATIONS_GLOB) else path.stem


def _image_roots(base: Path, path: Path, split: str, options: Options) -> list[Path]:
    if options.images_dir is not None:
        return [resolve_dir(base, options.images_dir, base)]
    # The folder the official zips unpack into holds annotations/ beside the image folders.
    top = path.parent.parent if path.parent.name == "annotations" else path.parent
    return [folder / pattern.format(split=split) for folder in (top, base) for pattern in IMAGE_FOLDERS]


def _samples(base: Path, files: list[Path], options: Options) -> Iterator[Captions | Reject]:
    for path in files:
        split = _split_of(path)
        name = relative_name(base, path)
        data = load_json(path)
        if not isinstance(data, dict) or not all(isinstance(data.get(f), list) for f in ("images", "annotations")):
            raise SourceError(f"{path} must hold a JSON object with 'images' and 'annotations' lists (COCO layout)")
        captions, invalid = _captions_by_image(data["annotations"], name)
        yield from invalid
        images = ImageFiles(_image_roots(base, path, split, options), hint="set import.coco.images_dir or --images")
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
