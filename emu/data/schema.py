"""The one internal sample schema every importer produces and every stage reads.

A sample is a typed record plus its images as encoded bytes (PNG/JPEG exactly as the source had
them, so import is lossless). Video frames are images in time order. The kinds cover what Emu2
trains and evaluates on (Emu2 §2.2, §2.3, §4):

  pair         image-text or video-text pair (captioning; text-to-image)
  interleaved  ordered text and images (MMC4-style web documents)
  video_text   video frames with a subtitle per frame (YT-Storyboard)
  grounded     caption whose phrases carry normalised boxes (GRIT)
  text         language-only text
  chat         multi-turn conversation with `<image>` placeholders (LLaVA), optional system message
  gen          generation instruction: condition text/images -> one target image (edits, T2I)
  vqa          evaluation question with its 10 annotator answers (VQAv2)
  captions     evaluation image with its reference captions (COCO)

Images are referenced by index into `images`; no field stores image bytes twice.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

#: The placeholder an image takes inside chat text, as in LLaVA's JSON and Emu2's chat template.
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in coordinates normalised to [0, 1] by image width and height."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    def as_list(self) -> list[float]:
        return [self.x_min, self.y_min, self.x_max, self.y_max]


@dataclass(frozen=True)
class Phrase:
    """A span `text[start:end]` of a caption grounded to one or more boxes (GRIT noun chunk)."""

    start: int
    end: int
    boxes: tuple[Box, ...]
    score: float | None = None


@dataclass(frozen=True)
class Segment:
    """One element of an ordered multimodal sequence: either text or a reference to an image."""

    text: str | None = None
    image: int | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.image is None):
            raise ValueError("a segment holds exactly one of text or image")


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; images appear in `content` as IMAGE_PLACEHOLDER, in order."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(kw_only=True)
class Sample:
    """Fields common to every kind. `source` says where the sample came from (file and position),
    so every later error can name it; `meta` keeps source fields we do not model (url, scores)."""

    kind: ClassVar[str] = ""
    key: str
    images: list[bytes] = field(default_factory=list, repr=False)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def texts(self) -> list[str]:
        """Every text of the sample, for length and encoding checks."""
        return []


@dataclass(kw_only=True)
class Pair(Sample):
    """An image (one entry in `images`) or a video (frames in `images`) with its caption."""

    kind: ClassVar[str] = "pair"
    text: str
    media: Literal["image", "video"] = "image"

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(kw_only=True)
class Interleaved(Sample):
    """A document of text and images in reading order; each image index appears exactly once."""

    kind: ClassVar[str] = "interleaved"
    segments: list[Segment]

    def texts(self) -> list[str]:
        return [s.text for s in self.segments if s.text is not None]


@dataclass(kw_only=True)
class VideoText(Sample):
    """Video frames (`images`, time order); `subtitles[i]` is the text spoken before frame i (may be
    empty, as in YT-Storyboard's `{i}.txt`), `trailing_text` what is spoken after the last frame."""

    kind: ClassVar[str] = "video_text"
    subtitles: list[str]
    trailing_text: str = ""

    def texts(self) -> list[str]:
        # Silent stretches are normal in video; only the spoken texts are checked.
        return [t for t in [*self.subtitles, self.trailing_text] if t]


@dataclass(kw_only=True)
class Grounded(Sample):
    """An image, its caption, and caption phrases with boxes (noun chunks and referring expressions)."""

    kind: ClassVar[str] = "grounded"
    text: str
    phrases: list[Phrase]
    referring_expressions: list[Phrase] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(kw_only=True)
class TextOnly(Sample):
    kind: ClassVar[str] = "text"
    text: str

    def texts(self) -> list[str]:
        return [self.text]


@dataclass(kw_only=True)
class Chat(Sample):
    """A conversation; `category` selects the system message family in instruction tuning (Emu2 §2.3)."""

    kind: ClassVar[str] = "chat"
    turns: list[Turn]
    category: str = ""

    def texts(self) -> list[str]:
        return [t.content for t in self.turns]


@dataclass(kw_only=True)
class Gen(Sample):
    """Generate `images[target]` from the condition sequence (text and the other images)."""

    kind: ClassVar[str] = "gen"
    condition: list[Segment]
    target: int

    def texts(self) -> list[str]:
        return [s.text for s in self.condition if s.text is not None]


@dataclass(kw_only=True)
class VQA(Sample):
    """A VQAv2 question about `images[0]` with its annotator answers."""

    kind: ClassVar[str] = "vqa"
    question_id: int
    image_id: int
    question: str
    answers: list[str]
    multiple_choice_answer: str = ""
    question_type: str = ""
    answer_type: str = ""

    def texts(self) -> list[str]:
        return [self.question]


@dataclass(kw_only=True)
class Captions(Sample):
    """A COCO image (`images[0]`) with its reference captions."""

    kind: ClassVar[str] = "captions"
    image_id: int
    captions: list[str]

    def texts(self) -> list[str]:
        return list(self.captions)


SAMPLE_TYPES: dict[str, type[Sample]] = {
    cls.kind: cls for cls in (Pair, Interleaved, VideoText, Grounded, TextOnly, Chat, Gen, VQA, Captions)
}
KINDS = tuple(SAMPLE_TYPES)
#: Kinds that are meaningless without at least one image (chat may be text-only, as ShareGPT is).
KINDS_NEEDING_IMAGES = ("pair", "interleaved", "video_text", "grounded", "gen", "vqa", "captions")


def to_record(sample: Sample) -> dict[str, Any]:
    """The JSON-serialisable record of a sample, without image bytes (those are separate members)."""
    record: dict[str, Any] = {"kind": sample.kind}
    for f in dataclasses.fields(sample):
        if f.name != "images":
            record[f.name] = _plain(getattr(sample, f.name))
    return record


def from_record(record: dict[str, Any], images: list[bytes]) -> Sample:
    """Inverse of `to_record`. Raises KeyError/TypeError/ValueError on a malformed record (a field
    missing, unknown or of the wrong JSON type); callers turn those into per-sample problems.

    Every field is checked against its annotation, so code reading a Sample (manifest facts,
    sequence building) can trust the types of a shard written by anyone, not only our importers.
    """
    kind = record.get("kind")
    cls = SAMPLE_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown sample kind {kind!r}; known kinds: {', '.join(KINDS)}")
    values = {k: v for k, v in record.items() if k != "kind"}
    if "segments" in values:
        values["segments"] = [Segment(**s) for s in values["segments"]]
    if "condition" in values:
        values["condition"] = [Segment(**s) for s in values["condition"]]
    if "turns" in values:
        values["turns"] = [Turn(**t) for t in values["turns"]]
    for name in ("phrases", "referring_expressions"):
        if name in values:
            values[name] = [_phrase(p) for p in values[name]]
    sample = cls(images=images, **values)
    _check_types(sample)
    return sample


def _check_types(obj: Any) -> None:
    """Raise TypeError naming the first field of a (nested) schema dataclass whose value does not
    match its annotation."""
    for f in dataclasses.fields(obj):
        value, annotation = getattr(obj, f.name), _hints(type(obj))[f.name]
        if not _conforms(value, annotation):
            raise TypeError(f"field {f.name!r} must be {_type_name(annotation)}, got {value!r:.80}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _conforms(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arm) for arm in args)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin in (list, tuple):  # list[X] and tuple[X, ...]
        return isinstance(value, origin) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:  # meta: any JSON values under string keys
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            return False
        try:
            _check_types(value)
        except TypeError:
            return False
        return True
    if tp in (int, float):  # JSON true/false are not numbers; an int is a valid float
        return not isinstance(value, bool) and isinstance(value, int if tp is int else (int, float))
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    name = tp.__name__ if isinstance(tp, type) else str(tp)
    return name.replace("typing.", "").replace(f"{__name__}.", "")


def _phrase(data: dict[str, Any]) -> Phrase:
    return Phrase(start=data["start"], end=data["end"], score=data.get("score"),
                  boxes=tuple(Box(*b) if isinstance(b, list) else Box(**b) for b in data["boxes"]))


def _plain(value: Any) -> Any:
    if isinstance(value, Box):
        return value.as_list()
    if isinstance(value, Segment):
        return {"text": value.text} if value.text is not None else {"image": value.image}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
