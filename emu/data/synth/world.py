"""The shapes world: procedural scenes of coloured shapes whose every true statement is known.

A scene is up to `max_shapes` shapes (circle, square, triangle in one of six colours) placed in
distinct cells of a 3x3 grid on a light background. Because the generator knows the scene, it
can state exact captions, answer questions (colour, count, position, yes/no), give boxes, move
shapes through video frames and apply edits; a trained model can then be scored against chance.

Everything here is pure: randomness comes from the `random.Random` passed in, so one seed gives
one world, and no I/O happens (the writers live in emu.data.synth.web_writers and doc_writers).
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass, replace
from typing import Literal

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUND = (235, 235, 235)
GRID = 3
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    row: int  # 0..2, top to bottom
    col: int  # 0..2, left to right

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def position(self) -> str:
        """Position words: "top left", "top", "center", "bottom right" ..."""
        row, col = ROWS[self.row], COLS[self.col]
        if row == "middle" and col == "center":
            return "center"
        if row == "middle":
            return col
        if col == "center":
            return row
        return f"{row} {col}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    size: int = 64

    def box(self, shape: Shape) -> tuple[float, float, float, float]:
        """The drawn shape's box, normalised to [0, 1] (x_min, y_min, x_max, y_max)."""
        x0, y0, x1, y1 = _pixel_box(shape, self.size)
        return (x0 / self.size, y0 / self.size, x1 / self.size, y1 / self.size)


#: Share of all scenes (per mille) reserved for the evaluation sets. The world has few scenes with
#: one shape (3 kinds x 6 colours x 9 cells = 162), so independent draws put the same picture in
#: training and evaluation (a third of the VQA images at the tiny scale did): training scenes are
#: drawn outside this share, evaluation scenes inside it, so no evaluation picture is ever trained on.
HELD_OUT_PER_MILLE = 100


def held_out(scene: Scene) -> bool:
    """Whether `scene` belongs to the evaluation share: a stable hash of its shapes (not of the
    image size), the same in every process and Python version."""
    key = "|".join(f"{s.kind}:{s.color}:{s.row}:{s.col}" for s in sorted(scene.shapes, key=lambda s: (s.row, s.col)))
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 1000 < HELD_OUT_PER_MILLE


def sample_scene(rng: random.Random, size: int = 64, min_shapes: int = 1, max_shapes: int = 3,
                 split: Literal["train", "eval"] = "train") -> Scene:
    """A random scene of `split`: redrawn until it lies outside (train) or inside (eval) the
    held-out share."""
    while True:
        n = rng.randint(min_shapes, max_shapes)
        cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
        shapes = tuple(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), r, c) for r, c in sorted(cells))
        scene = Scene(shapes=shapes, size=size)
        if held_out(scene) == (split == "eval"):
            return scene


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0, y0, x1, y1 = _pixel_box(shape, scene.size)
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    """PNG, or JPEG at quality 95 (as img2dataset stores downloads); same pixels, same bytes."""
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, format="PNG", optimize=False)
    elif fmt == "jpg":
        image.save(out, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return out.getvalue()


def caption(scene: Scene) -> str:
    """The exact caption: "a red circle at the top left and a blue square at the center."."""
    return _join_clauses([f"{_article(s.name)} {s.name} {_at(s)}" for s in scene.shapes]) + "."


def noun_chunks(scene: Scene) -> list[tuple[int, int, tuple[float, float, float, float]]]:
    """(start, end, box) for each "a red circle" span of `caption(scene)` (GRIT noun_chunks)."""
    return [(start, start + len(f"{_article(s.name)} {s.name}"), scene.box(s))
            for s, start in zip(scene.shapes, _clause_starts(scene))]


def referring_expressions(scene: Scene) -> list[tuple[int, int, tuple[float, float, float, float]]]:
    """(start, end, box) for each "a red circle at the top left" span (GRIT ref_exps)."""
    return [(start, start + len(f"{_article(s.name)} {s.name} {_at(s)}"), scene.box(s))
            for s, start in zip(scene.shapes, _clause_starts(scene))]


@dataclass(frozen=True)
class Question:
    question: str
    answer: str            # the canonical answer
    question_type: str     # VQAv2-style question-type prefix
    answer_type: str       # "yes/no", "number" or "other"


def questions(scene: Scene, rng: random.Random) -> list[Question]:
    """One question of each family the scene supports: colour, count, position, yes/no."""
    out: list[Question] = []
    kinds = [s.kind for s in scene.shapes]
    unique = [s for s in scene.shapes if kinds.count(s.kind) == 1]
    if unique:
        s = rng.choice(unique)
        out.append(Question(f"what color is the {s.kind}?", s.color, "what color is the", "other"))
    out.append(Question("how many shapes are there?", str(len(scene.shapes)), "how many", "number"))
    names = [s.name for s in scene.shapes]
    nameable = [s for s in scene.shapes if names.count(s.name) == 1]  # "where is the red circle?" needs one
    if nameable:
        s = rng.choice(nameable)
        out.append(Question(f"where is the {s.name}?", s.position, "where is the", "other"))
    asked = rng.choice(scene.shapes) if rng.random() < 0.5 else Shape(
        rng.choice(SHAPES), rng.choice(list(COLORS)), 0, 0)
    present = any(x.kind == asked.kind and x.color == asked.color for x in scene.shapes)
    out.append(Question(f"is there {_article(asked.name)} {asked.name}?", "yes" if present else "no",
                        "is there a", "yes/no"))
    return out


def annotator_answers(question: Question, rng: random.Random, n: int = 10) -> list[str]:
    """Ten human-like answers: mostly the canonical one, some written differently ("two", "Red.")
    so that scoring must apply the official VQA normalisation, and rarely a wrong one."""
    answers = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.7:
            answers.append(question.answer)
        elif roll < 0.8 and question.answer_type == "number":
            answers.append(NUMBER_WORDS[int(question.answer)])
        elif roll < 0.9:
            answers.append(question.answer.capitalize() + ".")
        else:
            answers.append(question.answer if rng.random() < 0.5 else _wrong_answer(question, rng))
    return answers


def chat_turns(scene: Scene, rng: random.Random, max_turns: int = 3) -> list[tuple[str, str]]:
    """(question, answer) pairs about the scene, answered in full sentences."""
    pairs = []
    for q in questions(scene, rng)[:max_turns]:
        if q.answer_type == "number":
            n = int(q.answer)
            answer = f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} shape{'s' if n != 1 else ''}."
        elif q.question.startswith("what color"):
            answer = f"The {q.question.split()[-1].rstrip('?')} is {q.answer}."
        elif q.question.startswith("where"):
            answer = f"It is {_at_words(q.answer)}."
        else:
            answer = "Yes." if q.answer == "yes" else "No."
        pairs.append((q.question[0].upper() + q.question[1:], answer))
    pairs.append(("Describe the image.", caption(scene)[0].upper() + caption(scene)[1:]))
    return pairs


def edit(scene: Scene, rng: random.Random) -> tuple[str, Scene]:
    """An instruction and the scene it produces: recolour, move, remove or add a shape; the
    result, a training picture, is never a held-out scene (redrawn until it is not)."""
    while True:
        text, edited = _edit(scene, rng)
        if not held_out(edited):
            return text, edited


def _edit(scene: Scene, rng: random.Random) -> tuple[str, Scene]:
    shapes = list(scene.shapes)
    free = [(r, c) for r in range(GRID) for c in range(GRID) if not any(s.row == r and s.col == c for s in shapes)]
    ops = ["recolor", "move"] + (["remove"] if len(shapes) > 1 else []) + (["add"] if free else [])
    op = rng.choice(ops)
    names = [s.name for s in shapes]
    target = rng.choice([s for s in shapes if names.count(s.name) == 1] or shapes)  # name it unambiguously
    if op == "recolor":
        color = rng.choice([c for c in COLORS if c != target.color])
        shapes[shapes.index(target)] = replace(target, color=color)
        text = f"make the {target.name} {color}"
    elif op == "move" and free:
        r, c = rng.choice(free)
        moved = replace(target, row=r, col=c)
        shapes[shapes.index(target)] = moved
        text = f"move the {target.name} to the {moved.position}"
    elif op == "remove":
        shapes.remove(target)
        text = f"remove the {target.name}"
    else:
        r, c = rng.choice(free)
        added = Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), r, c)
        shapes.append(added)
        text = f"add {_article(added.name)} {added.name} {_at(added)}"
    shapes.sort(key=lambda s: (s.row, s.col))
    return text, Scene(shapes=tuple(shapes), size=scene.size)


def motion(rng: random.Random, size: int, frames: int) -> tuple[list[Scene], str, list[str]]:
    """A single shape gliding across the canvas: per-frame scenes, a caption, per-frame subtitles.
    Videos are training data: redrawn until no frame is a held-out scene."""
    while True:
        scenes, text, subtitles = _motion(rng, size, frames)
        if not any(held_out(s) for s in scenes):
            return scenes, text, subtitles


def _motion(rng: random.Random, size: int, frames: int) -> tuple[list[Scene], str, list[str]]:
    shape = Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randrange(GRID), 0)
    direction = rng.choice(("right", "left", "down", "up"))
    scenes, subtitles = [], []
    for t in range(frames):
        step = round(t * (GRID - 1) / max(frames - 1, 1))
        if direction == "right":
            s = replace(shape, row=shape.row, col=step)
        elif direction == "left":
            s = replace(shape, row=shape.row, col=GRID - 1 - step)
        elif direction == "down":
            s = replace(shape, row=step, col=shape.row)
        else:
            s = replace(shape, row=GRID - 1 - step, col=shape.row)
        scenes.append(Scene(shapes=(s,), size=size))
        subtitles.append(f"the {s.name} is {_at_words(s.position)}")
    text = f"{_article(shape.name)} {shape.name} moves {direction}."
    return scenes, text, subtitles


def paragraph(rng: random.Random, sentences: int = 4) -> str:
    """Language-only text about the shapes world (facts that hold in every scene)."""
    facts = [
        "A square has four corners and four equal sides.",
        "A triangle has three corners.",
        "A circle has no corners.",
        "There are six colors: red, green, blue, yellow, purple and orange.",
        "Each picture shows between one and three shapes on a grey background.",
        "The picture is divided into a grid of three rows and three columns.",
        "No two shapes share a cell of the grid.",
        "Shapes in a video move one cell at a time.",
    ]
    return " ".join(rng.sample(facts, min(sentences, len(facts))))


def _pixel_box(shape: Shape, size: int) -> tuple[int, int, int, int]:
    cell = size / GRID
    margin = round(cell * 0.15)
    x0, y0 = round(shape.col * cell) + margin, round(shape.row * cell) + margin
    x1, y1 = round((shape.col + 1) * cell) - margin, round((shape.row + 1) * cell) - margin
    return x0, y0, x1, y1


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def _at(shape: Shape) -> str:
    return _at_words(shape.position)


def _at_words(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def _join_clauses(clauses: list[str]) -> str:
    if len(clauses) == 1:
        return clauses[0]
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _clause_starts(scene: Scene) -> list[int]:
    clauses = [f"{_article(s.name)} {s.name} {_at(s)}" for s in scene.shapes]
    starts, pos = [], 0
    for i, clause in enumerate(clauses):
        starts.append(pos)
        sep = "" if i == len(clauses) - 1 else (" and " if i == len(clauses) - 2 else ", ")
        pos += len(clause) + len(sep)
    return starts


def _wrong_answer(question: Question, rng: random.Random) -> str:
    if question.answer_type == "yes/no":
        return "no" if question.answer == "yes" else "yes"
    if question.answer_type == "number":
        return str(int(question.answer) % 3 + 1)
    if question.question.startswith("what color"):
        return rng.choice([c for c in COLORS if c != question.answer])
    return rng.choice([p for p in ("top left", "top", "center", "bottom right") if p != question.answer])
