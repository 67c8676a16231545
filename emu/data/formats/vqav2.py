"""VQAv2 (`--format vqav2`) → `vqa` evaluation samples (docs/formats.md).

SRC holds, per subtype (val2014, train2014 ...), the questions file
`v2_OpenEnded_mscoco_{subtype}_questions.json`, its annotations file
`v2_mscoco_{subtype}_annotations.json`, and the images `{subtype}/COCO_{subtype}_{image_id:012d}.jpg`
(the file name rule of the official VQA API demo). Questions and annotations are joined by
`question_id`, in question order. Key: `q<question_id>`; `source`: `<questions file>:<question_id>`.
`meta` keeps `data_subtype` and the answers' `answer_confidence`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.data.formats._files import ImageFiles, load_json, natural_sorted, reject, resolve_dir
from emu.data.reject import Reject
from emu.data.schema import VQA
from emu.data.shards import SampleProblem, sanitize_key
from emu.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

QUESTIONS_FILE = re.compile(r"^v2_OpenEnded_mscoco_(?P<subtype>.+)_questions\.json$")
#: The official files list an image's questions one after another: keep its bytes while they last.
RECENT_IMAGES = 8


@dataclass
class Options:
    """Settings of `--format vqav2` (the `import.vqav2` group)."""

    #: Folder of the COCO images, relative to SRC (or absolute); default: SRC/{subtype}.
    images_dir: str | None = None

    def __post_init__(self) -> None:
        if self.images_dir == "":
            raise ConfigError("import.vqav2.images_dir must name a folder, or be null for SRC/{subtype}")


@dataclass(frozen=True)
class Split:
    subtype: str
    questions: Path
    annotations: Path


def read(src: Path, config: ImportConfig) -> Iterator[VQA | Reject]:
    """Find every questions file and its annotations file (SourceError when there is none, or an
    annotations file is missing), then yield the joined questions subtype by subtype."""
    splits = _splits(src)
    return _samples(src, splits, config.vqav2)


def _splits(src: Path) -> list[Split]:
    if not src.is_dir():
        raise SourceError(f"{src} must be a folder holding v2_OpenEnded_mscoco_{{subtype}}_questions.json "
                          f"and v2_mscoco_{{subtype}}_annotations.json")
    splits = []
    for questions in natural_sorted(p for p in src.iterdir() if QUESTIONS_FILE.match(p.name)):
        subtype = QUESTIONS_FILE.match(questions.name)["subtype"]
        annotations = src / f"v2_mscoco_{subtype}_annotations.json"
        if not annotations.is_file():
            raise SourceError(f"{src} has {questions.name} but not {annotations.name}: VQAv2 questions "
                              f"need their annotations (the test splits have none)")
        splits.append(Split(subtype, questions, annotations))
    if not splits:
        raise SourceError(f"{src} holds no v2_OpenEnded_mscoco_{{subtype}}_questions.json")
    return splits


def _samples(src: Path, splits: list[Split], options: Options) -> Iterator[VQA | Reject]:
    for split in splits:
        questions = _section(split.questions, "questions")
        annotations = _by_question_id(_section(split.annotations, "annotations"))
        images = ImageFiles(resolve_dir(src, options.images_dir, src / split.subtype), keep=RECENT_IMAGES)
        for index, question in enumerate(questions):
            yield _sample(question, index, annotations, images, split)


def _section(path: Path, name: str) -> list[Any]:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(name), list):
        raise SourceError(f"{path} must hold a JSON object with a {name!r} list (the VQAv2 layout)")
    return data[name]


def _by_question_id(annotations: list[Any]) -> dict[int, Any]:
    """Annotations by question_id; entries without an integer question_id can match no question."""
    return {a["question_id"]: a for a in annotations
            if isinstance(a, dict) and isinstance(a.get("question_id"), int)}


def _sample(question: Any, index: int, annotations: dict[int, Any], images: ImageFiles,
            split: Split) -> VQA | Reject:
    name = split.questions.name
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
        image = images.read(f"COCO_{split.subtype}_{image_id:012d}.jpg")
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
    for field in ("multiple_choice_answer", "question_type", "answer_type"):
        if not isinstance(annotation.get(field, ""), str):
            raise SampleProblem("record_invalid", f"annotation {field} must be a string")
    return answers
