"""A plain webdataset (`--format webdataset`) -> image-text `pair` samples (docs/formats.md).

Many public image-text datasets are published as webdataset tar shards and nothing else: per
sample an image member `{key}.jpg|jpeg|png|webp` and its caption in `{key}.txt`, in a `{key}.json`
record, or both (`webdataset.TarWriter` output; the `*-wds` uploads of CC3M, CC12M, COCO or LAION
subsets). Members are grouped into samples as webdataset groups them: consecutive members whose
names agree up to the first dot of the file name.

The helpers below (`json_member`, `check_key`, `image_member`) are shared with the img2dataset
importer: its output is this layout with a fixed set of json fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.data.formats._files import json_type, natural_sorted
from emu.data.images import ImageProblem, inspect_image
from emu.data.reject import Reject
from emu.data.schema import Pair
from emu.data.shards import RawSample, SampleProblem, iter_raw_samples, sanitize_key
from emu.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

#: Image member extensions, in the order a sample's image is looked for (webdataset's decoders
#: know these names; `jpeg` is as common as `jpg` in published shards).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Options:
    """Settings of `--format webdataset` (the `import.webdataset` group)."""

    #: Extension of the member holding the caption (`{key}.txt`); "" = captions come from the json.
    text_member: str = "txt"
    #: Field of the `{key}.json` record holding the caption, used when a sample has no text member
    #: (LAION-style records call it `caption`; some uploads `text` or `alt`).
    caption_field: str = "caption"

    def __post_init__(self) -> None:
        if not self.text_member and not self.caption_field:
            raise ConfigError("import.webdataset.text_member and import.webdataset.caption_field are both empty: "
                              "name where the captions are (a member extension such as txt, or a json field)")
        if self.text_member in ("json", *IMAGE_EXTENSIONS):
            raise ConfigError(f"import.webdataset.text_member must name a text member, not {self.text_member!r} "
                              f"(the record or an image)")


def read(src: Path, config: ImportConfig) -> Iterator[Pair | Reject]:
    """Yield one `Pair` per sample of every shard, or a Reject naming the sample and the rule.
    SourceError when `src` is neither a `.tar` file nor a folder holding some."""
    shards = find_shards(src)
    return _samples(src, shards, config)


def find_shards(src: Path) -> list[Path]:
    """SRC itself when it is a tar, else every `*.tar` below it (published datasets nest shards in
    split folders such as `train/`), in shard order."""
    if src.is_file():
        if src.suffix != ".tar":
            raise SourceError(f"source {src} is not a .tar shard (expected a webdataset shard or a folder of them)")
        return [src]
    if not src.is_dir():
        raise SourceError(f"source {src} must be a .tar shard or a folder of webdataset shards")
    shards = natural_sorted(p for p in src.rglob("*.tar") if p.is_file())
    if not shards:
        raise SourceError(f"source {src} holds no webdataset shards (*.tar)")
    return shards


def _samples(src: Path, shards: list[Path], config: ImportConfig) -> Iterator[Pair | Reject]:
    options = config.webdataset
    for shard in shards:
        name = shard.name if shard == src else shard.relative_to(src).as_posix()
        for raw in iter_raw_samples(shard, check_keys=False):
            source = f"{name}:{raw.key}" if raw.key else name
            key = sanitize_key(raw.key) if raw.key else ""
            try:
                yield _sample(raw, key, source, options, config.max_image_pixels)
            except SampleProblem as exc:
                yield Reject(source, key, exc.problem.rule, exc.problem.message)


def _sample(raw: RawSample, key: str, source: str, options: Options, max_pixels: int) -> Pair:
    if raw.problems:
        raise SampleProblem(raw.problems[0].rule, raw.problems[0].message)
    fields = json_member(raw, required=False)
    if fields is not None:
        check_key(raw, fields)
    image = image_member(raw, IMAGE_EXTENSIONS, single=True)
    try:
        inspect_image(image, max_pixels=max_pixels, decode=False)  # header only; the runner decodes
    except ImageProblem as exc:
        raise SampleProblem(exc.rule, exc.message) from None
    meta = {k: v for k, v in (fields or {}).items() if k != "key"}
    return Pair(key=key, images=[image], text=_caption(raw, fields, options), source=source, meta=meta)


def json_member(raw: RawSample, required: bool) -> dict[str, Any] | None:
    """The `{key}.json` record as an object; None when absent and not `required`."""
    if "json" not in raw.members:
        if required:
            raise SampleProblem("record_missing", f"no {raw.key}.json member")
        return None
    try:
        # json.loads accepts NaN/Infinity (Python's json.dumps writes them for float NaN); the
        # importers that read numbers from the record check them.
        fields = json.loads(raw.members["json"].decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SampleProblem("record_not_utf8", f"{raw.key}.json is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SampleProblem("record_not_json", f"{raw.key}.json is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise SampleProblem("record_invalid", f"{raw.key}.json must hold an object, found a JSON {json_type(fields)}")
    return fields


def check_key(raw: RawSample, fields: dict[str, Any]) -> None:
    """A record that names a `key` (img2dataset and most webdataset writers store it) must name
    its own members' key: another one means members of two samples were packed together."""
    if "key" not in fields:
        return
    value = fields["key"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) != raw.key:
        raise SampleProblem("key_mismatch", f"{raw.key}.json names key {value!r}, but its tar members are "
                                            f"named {raw.key!r}")


def image_member(raw: RawSample, extensions: tuple[str, ...], single: bool = False) -> bytes:
    """The sample's image: the first of `extensions` present. With `single`, two image members
    are an error: which one the caption describes is unknown."""
    found = [ext for ext in extensions if ext in raw.members]
    if not found:
        names = ", ".join(sorted(raw.members)) or "none"
        raise SampleProblem("image_missing",
                            f"no {raw.key}.{'|'.join(extensions)} member (members: {names})")
    if single and len(found) > 1:
        raise SampleProblem("image_ambiguous",
                            f"{raw.key} has {len(found)} image members ({', '.join(found)}); a pair holds one image")
    return raw.members[found[0]]


def _caption(raw: RawSample, fields: dict[str, Any] | None, options: Options) -> str:
    """The text member when present, else the record's caption field."""
    if options.text_member and options.text_member in raw.members:
        try:
            return raw.members[options.text_member].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SampleProblem("text_not_utf8", f"{raw.key}.{options.text_member} is not UTF-8: {exc}") from None
    caption = (fields or {}).get(options.caption_field) if options.caption_field else None
    if isinstance(caption, str):
        return caption
    looked = [f"a {raw.key}.{options.text_member} member"] if options.text_member else []
    if options.caption_field:
        looked.append(f"a string {options.caption_field!r} in {raw.key}.json"
                      + ("" if fields is not None else " (the sample has no .json)"))
    raise SampleProblem("text_missing", f"no caption: looked for {' and '.join(looked)} "
                                        f"(import.webdataset.text_member / caption_field)")
