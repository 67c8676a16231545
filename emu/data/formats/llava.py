"""LLaVA instruction data (`--format llava`) → `chat`, or `gen` when the answer is an image
(docs/formats.md).

SRC is a JSON file holding a list of records (`llava_v1_5_mix665k.json`), or a folder holding
exactly one `*.json`. Image paths are relative to `llava.image_folder`, by default the JSON's
folder, then `images/` beside it; a missing image's reject names every path tried. A record has `id`, `image` (a path, a list of paths as in LLaVA-NeXT, or
absent for text-only records) and `conversations` [{"from": "human"|"gpt"|"system", "value"}].
Key: the sanitised `id`, else `<file stem>-<index>`; `source` is `<file>:<index>`, the record's
position in the JSON list counted from 0.

Roles map to user/assistant/system and `<image>` placeholders stay in the text. Whether turns
alternate and placeholders match the images is the validation gate's check (manifest facts
`turns_alternate`, `n_image_placeholders`). A record whose last turn is a `gpt` turn of exactly
`<image>` is a generation instruction: the condition is the preceding turns' text split at the
placeholders into text and image segments, the target is the last image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.data.formats._files import ImageFiles, iter_json_array, json_type, reject, resolve_dir, source_name
from emu.data.reject import Reject
from emu.data.schema import IMAGE_PLACEHOLDER, Chat, Gen, Segment, Turn
from emu.data.shards import SampleProblem, sanitize_key
from emu.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
#: Records reuse images (several instructions per COCO image); keep this many files read last.
RECENT_IMAGES = 16


@dataclass
class Options:
    """Settings of `--format llava` (the `import.llava` group)."""

    #: Folder the records' `image` paths are relative to (LLaVA's --image_folder), itself relative
    #: to the JSON file's folder (or absolute); default: the JSON file's folder, then an `images/`
    #: folder beside it (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json sits beside images/).
    image_folder: str | None = None
    #: The system-message family these chats train with in instruction tuning (Emu2 §2.3 gives
    #: each data category its own system message).
    category: str = "chat"

    def __post_init__(self) -> None:
        if self.image_folder == "":
            raise ConfigError("import.llava.image_folder must name a folder, or be null for the JSON file's folder")
        if not self.category.strip():
            raise ConfigError("import.llava.category must name a system-message family, got an empty string")


def read(src: Path, config: ImportConfig) -> Iterator[Chat | Gen | Reject]:
    """Stream the records of the JSON list one by one; SourceError when there is no JSON file, or
    it is not a JSON array (raised when iteration reaches the problem)."""
    path = _json_file(src)
    records = iter_json_array(path, what="a JSON array of LLaVA records")
    roots = ([resolve_dir(path.parent, config.llava.image_folder, path.parent)] if config.llava.image_folder
             else [path.parent, path.parent / "images"])
    images = ImageFiles(roots, keep=RECENT_IMAGES, hint="set import.llava.image_folder or --images")
    return _samples(records, source_name(src, path), sanitize_key(path.stem), images, config.llava.category)


def _json_file(src: Path) -> Path:
    if src.is_file():
        return src
    candidates = sorted(src.glob("*.json"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise SourceError(f"{src} must hold exactly one *.json file of LLaVA records (found {found}); "
                          f"pass the file itself as --src")
    return candidates[0]


def _samples(records: Iterator[Any], name: str, stem: str, images: ImageFiles,
             category: str) -> Iterator[Chat | Gen | Reject]:
    for index, record in enumerate(records):
        source = f"{name}:{index}"
        key = _key(record, f"{stem}-{index}")
        try:
            item = _sample(record, key, source, images, category)
        except SampleProblem as exc:
            item = reject(source, key, exc.problem.rule, exc.problem.message)
        yield item


def _key(record: Any, fallback: str) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or record_id == "":
        return fallback
    return sanitize_key(str(record_id))


def _sample(record: Any, key: str, source: str, images: ImageFiles, category: str) -> Chat | Gen:
    if not isinstance(record, dict):
        raise SampleProblem("record_invalid", f"record is a JSON {json_type(record)}, not an object")
    turns = _turns(record.get("conversations"))
    data = [images.read(path) for path in _image_paths(record)]
    meta = {name: value for name, value in record.items() if name != "conversations"}
    if turns[-1].role == "assistant" and turns[-1].content == IMAGE_PLACEHOLDER:
        return _gen(turns, data, key, source, meta)
    return Chat(key=key, source=source, images=data, turns=turns, category=category, meta=meta)


def _turns(conversations: Any) -> list[Turn]:
    if not isinstance(conversations, list) or not conversations:
        raise SampleProblem("conversations_invalid", "conversations must be a non-empty list of turns")
    turns = []
    for position, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise SampleProblem("conversations_invalid",
                                f"turn {position} must be {{\"from\": {'|'.join(ROLES)}, \"value\": string}}, "
                                f"found {str(turn)[:120]}")
        turns.append(Turn(role=ROLES[turn["from"]], content=turn["value"]))
    return turns


def _image_paths(record: dict[str, Any]) -> list[str]:
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) for p in image):
        return image
    raise SampleProblem("record_invalid", f"image must be a path or a list of paths, found a JSON {json_type(image)}")


def _gen(turns: list[Turn], images: list[bytes], key: str, source: str, meta: dict[str, Any]) -> Gen:
    """The condition is every turn before the final `<image>` answer, split at its placeholders.

    Whitespace around a placeholder is layout ("<image>\\n<instruction>" is LLaVA's convention),
    so text pieces are stripped and blank ones dropped. A system turn is not part of what the
    target is generated from; it is kept in meta["system"].
    """
    condition: list[Segment] = []
    used = 0
    for turn in turns[:-1]:
        if turn.role == "system":
            meta["system"] = turn.content
            continue
        for position, piece in enumerate(turn.content.split(IMAGE_PLACEHOLDER)):
            if position:
                condition.append(Segment(image=used))
                used += 1
            if piece.strip():
                condition.append(Segment(text=piece.strip()))
    if used + 1 != len(images):
        raise SampleProblem("conversations_invalid",
                            f"the answer is an image, so the record needs {used + 1} images "
                            f"({used} placeholders before the answer, plus the target), found {len(images)}")
    return Gen(key=key, source=source, images=images, condition=condition, target=used, meta=meta)
