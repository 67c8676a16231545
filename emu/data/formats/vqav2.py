"""VQAv2 (`--format vqav2`) → `vqa` evaluation samples (docs/formats.md).

Per subtype (val2014, train2014 ...) the official downloads hold a questions file
`v2_OpenEnded_mscoco_{subtype}_questions.json`, its annotations file
`v2_mscoco_{subtype}_annotations.json`, and the COCO images `{subtype}/COCO_{subtype}_{image_id:012d}.jpg`
(the file name rule of the official VQA API demo). They are found in the layouts people unpack
them into (all files in SRC; the VQA API's `Questions/`, `Annotations/`, `Images/mscoco/{subtype}/`),
or named explicitly: SRC may be the questions file itself, and `vqav2.questions`,
`vqav2.annotations` and `vqav2.images_dir` name the three parts (`emu data import --questions
--annotations --images`). Images named as COCO 2017 names them (`{image_id:012d}.jpg`) are found too.

Questions and annotations are joined by `question_id`, in question order. Key: `q<question_id>`;
`source`: `<questions file>:<question_id>`. `meta` keeps `data_subtype` and the answers'
`answer_confidence`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.data.formats._files import ImageFiles, load_json, natural_sorted, reject, relative_name, resolve_dir
from emu.data.reject import Reject
from emu.data.schema import VQA
from emu.data.shards import SampleProblem, sanitize_key
from emu.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

QUESTIONS_FILE = re.compile(r"^v2_OpenEnded_mscoco_(?P<subtype>.+)_questions\.json$")
#: Folders (relative to SRC) the official files are unpacked into, searched in this order: SRC
#: itself, then the layout of the VQA API repository (github.com/GT-Vision-Lab/VQA).
QUESTION_FOLDERS = (".", "Questions", "questions")
ANNOTATION_FOLDERS = (".", "Annotations", "annotations")
#: Image folders relative to SRC ({subtype} filled in), in search order.
IMAGE_FOLDERS = ("{subtype}", "Images/mscoco/{subtype}", "Images/{subtype}", "images/{subtype}", "images")
#: The official files list an image's questions one after another: keep its bytes while they last.
RECENT_IMAGES = 8


@dataclass
class Options:
    """Settings of `--format vqav2` (the `import.vqav2` group). Paths are relative to SRC (to
    its folder when SRC is the questions file), or absolute."""

    #: The questions file; default: every v2_OpenEnded_mscoco_{subtype}_questions.json found.
    questions: str | None = None
    #: The annotations file of `questions`; default: v2_mscoco_{subtype}_annotations.json found
    #: next to the questions, in SRC or in SRC/Annotations.
    annotations: str | None = None
    #: Folder of the COCO images; default: the first of IMAGE_FOLDERS that holds the image.
    images_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("questions", "annotations", "images_dir"):
            if getattr(self, name) == "":
                raise ConfigError(f"import.vqav2.{name} must name a path, or be null to find it in SRC")


@dataclass
class Split:
    questions: Path
    annotations: Path
    subtype: str
    data: Any = field(default=None, repr=False)  # the questions file, when reading it named the subtype


def read(src: Path, config: ImportConfig) -> Iterator[VQA | Reject]:
    """Find every questions file and its annotations file (SourceError when there is none, or an
    annotations file is missing), then yield the joined questions subtype by subtype."""
    base = src if src.is_dir() else src.parent
    splits = _splits(src, base, config.vqav2)
    return _samples(base, splits, config.vqav2)


def _splits(src: Path, base: Path, options: Options) -> list[Split]:
    explicit = _explicit_questions(src, base, options)
    if explicit is not None:
        return [_split(explicit, base, options)]
    # dict.fromkeys: on a case-insensitive file system Questions/ and questions/ are one folder.
    found = natural_sorted({path.resolve(): path for folder in QUESTION_FOLDERS if (base / folder).is_dir()
                            for path in (base / folder).iterdir() if QUESTIONS_FILE.match(path.name)}.values())
    if not found:
        looked = ", ".join(str(base / folder) for folder in QUESTION_FOLDERS)
        raise SourceError(f"no v2_OpenEnded_mscoco_{{subtype}}_questions.json in {looked}; pass the questions "
                          f"file as --src or --questions")
    if options.annotations is not None and len(found) > 1:
        raise SourceError(f"import.vqav2.annotations names one annotations file but {base} holds {len(found)} "
                          f"questions files; name the questions file too (--questions, or as --src)")
    return [_split(path, base, options) for path in found]


def _explicit_questions(src: Path, base: Path, options: Options) -> Path | None:
    if src.is_file():
        if options.questions is not None:
            raise SourceError(f"SRC {src} is a questions file and import.vqav2.questions names "
                              f"{options.questions}: give the questions file once")
        return src
    if options.questions is None:
        return None
    path = resolve_dir(base, options.questions, base)
    if not path.is_file():
        raise SourceError(f"import.vqav2.questions: no file {path}")
    return path


def _split(questions: Path, base: Path, options: Options) -> Split:
    """The split of one questions file: its subtype (from the official name, else the file's own
    `data_subtype`) and its annotations file (the setting, else found by the subtype)."""
    match = QUESTIONS_FILE.match(questions.name)
    data = None
    if match:
        subtype = match["subtype"]
    else:
        data = _load(questions, "questions")
        subtype = data.get("data_subtype") if isinstance(data.get("data_subtype"), str) else questions.stem
    if options.annotations is not None:
        annotations = resolve_dir(base, options.annotations, base)
        if not annotations.is_file():
            raise SourceError(f"import.vqav2.annotations: no file {annotations}")
        return Split(questions, annotations, subtype, data)
    name = f"v2_mscoco_{subtype}_annotations.json"
    candidates = list(dict.fromkeys([questions.parent / name, questions.parent.parent / "Annotations" / name,
                                     *(base / folder / name for folder in ANNOTATION_FOLDERS)]))
    for candidate in candidates:
        if candidate.is_file():
            return Split(questions, candidate, subtype, data)
    raise SourceError(f"{questions.name} has no annotations file: looked for {', '.join(map(str, candidates))} "
                      f"(VQAv2 questions need their annotations, the test splits have none; name the file with "
                      f"--annotations)")


def _samples(base: Path, splits: list[Split], options: Options) -> Iterator[VQA | Reject]:
    for split in splits:
        data = split.data if split.data is not None else _load(split.questions, "questions")
        questions = data["questions"]
        annotations = _by_question_id(_load(split.annotations, "annotations")["annotations"])
        roots = ([resolve_dir(base, options.images_dir, base)] if options.images_dir is not None else
                 [base / folder.format(subtype=split.subtype) for folder in IMAGE_FOLDERS])
        images = ImageFiles(roots, keep=RECENT_IMAGES, hint="set import.vqav2.images_dir or --images")
        name = relative_name(base, split.questions)
        for index, question in enumerate(questions):
            yield _sample(question, index, annotations, images, split, name)


def _load(path: Path, section: str) -> dict[str, Any]:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(section), list):
        raise SourceError(f"{path} must hold a JSON object with a {section!r} list (the VQAv2 layout)")
    return data


def _by_question_id(annotations: list[Any]) -> dict[int, Any]:
    """Annotations by question_id; entries without an integer question_id can match no question."""
    return {a["question_id"]: a for a in annotations
            if isinstance(a, dict) and isinstance(a.get("question_id"), int)}


def _sample(question: Any, index: int, annotations: dict[int, Any], images: ImageFiles,
            split: Split, name: str) -> VQA | Reject:
    if not _valid_question(question):
        return reject(f"{name}:questions[{index}]", sanitize_key(f"{split.subtype}-question-{index}"), "record_invalid",
                      "a question must be an object with integer image_id and question_id and a string question")
    question_id, image_id = question["question_id"], question["image_id"]
    source, key = f"{name}:{question_id}", f"q{question_id}"
    annotation = annotations.get(question_id)
    if annotation is None:
        return reject(source, key, "annotation_missing",
                      f"{split.annotations.name} has no annotation for question_id {question_id}")
    try:
        answers = _answers(annotation, image_id)
        # The official 2014 name, else the COCO 2017 name of the same image.
        image = images.read(f"COCO_{split.subtype}_{image_id:012d}.jpg", f"{image_id:012d}.jpg")
    except SampleProblem as exc:
        return reject(source, key, exc.problem.rule, exc.problem.message)
    return VQA(key=key, source=source, images=[image], question_id=question_id, image_id=image_id,
               question=question["question"], answers=[a["answer"] for a in answers],
               multiple_choice_answer=annotation.get("multiple_choice_answer", ""),
               question_type=annotation.get("question_type", ""), answer_type=annotation.get("answer_type", ""),
               meta={"data_subtype": split.subtype,
                     "answer_confidence": [a.get("answer_confidence") for a in answers]})


def _valid_question(question: Any) -> bool:
    return (isinstance(question, dict) and isinstance(question.get("question"), str)
            and all(isinstance(question.get(f), int) and not isinstance(question.get(f), bool)
                    for f in ("question_id", "image_id")))


def _answers(annotation: Any, image_id: int) -> list[dict[str, Any]]:
    """The annotation's answer objects, after checking it belongs to the question's image."""
    answers = annotation.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str)
                                                for a in answers):
        raise SampleProblem("record_invalid", "annotation answers must be a list of objects with a string answer")
    if annotation.get("image_id") != image_id:
        raise SampleProblem("record_invalid", f"the annotation names image_id {annotation.get('image_id')} "
                                              f"but the question names {image_id}")
    for field_name in ("multiple_choice_answer", "question_type", "answer_type"):
        if not isinstance(annotation.get(field_name, ""), str):
            raise SampleProblem("record_invalid", f"annotation {field_name} must be a string")
    return answers
