"""The shapes world states only true things: captions, spans, boxes, answers, edits, motion."""

import random

import numpy as np
import pytest

from emu.data.synth import world
from emu.data.synth.config import SynthConfig, sample_rng, size_to_scale
from emu.errors import ConfigError


def scenes(n=50, seed=0):
    rng = random.Random(seed)
    return [world.sample_scene(rng) for _ in range(n)]


def test_spans_name_each_shape_and_boxes_cover_its_pixels():
    for scene in scenes():
        text = world.caption(scene)
        image = np.asarray(world.render(scene))
        for shape, (start, end, box), (rs, re_, rbox) in zip(
                scene.shapes, world.noun_chunks(scene), world.referring_expressions(scene)):
            assert text[start:end].endswith(shape.name)
            assert text[rs:re_].startswith(text[start:end]) and shape.position.split()[-1] in text[rs:re_]
            assert box == rbox and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            x0, y0, x1, y1 = (round(v * scene.size) for v in box)
            inside = image[y0:y1, x0:x1].reshape(-1, 3)
            assert (inside == world.COLORS[shape.color]).all(axis=1).any(), "the shape is drawn inside its box"
        painted = (image != world.BACKGROUND).any(axis=2).sum()
        assert painted > 0


def test_answers_are_true_of_the_scene():
    rng = random.Random(1)
    for scene in scenes():
        for q in world.questions(scene, rng):
            if q.answer_type == "number":
                assert int(q.answer) == len(scene.shapes)
            elif q.question.startswith("what color is the"):
                kind = q.question.split()[-1].rstrip("?")
                assert [s.color for s in scene.shapes if s.kind == kind] == [q.answer]
            elif q.question.startswith("where is the"):
                name = q.question[len("where is the "):-1]
                assert [s.position for s in scene.shapes if s.name == name][0] == q.answer
            else:
                name = q.question.split(" ", 3)[-1].rstrip("?")
                assert (q.answer == "yes") == any(s.name == name for s in scene.shapes)
            answers = world.annotator_answers(q, rng)
            assert len(answers) == 10 and answers.count(q.answer) >= 4


def test_edits_change_the_scene_as_instructed():
    rng = random.Random(2)
    for scene in scenes():
        instruction, after = world.edit(scene, rng)
        assert after != scene
        if instruction.startswith("remove"):
            assert len(after.shapes) == len(scene.shapes) - 1
        elif instruction.startswith("add"):
            assert len(after.shapes) == len(scene.shapes) + 1
        elif instruction.startswith("make"):
            assert instruction.split()[-1] in [s.color for s in after.shapes]


@pytest.mark.parametrize("seed", range(8))
def test_motion_moves_one_shape_monotonically(seed):
    frames, text, subtitles = world.motion(random.Random(seed), 64, 8)
    assert len(frames) == len(subtitles) == 8 and "moves" in text
    assert all(len(f.shapes) == 1 for f in frames)
    positions = [(f.shapes[0].row, f.shapes[0].col) for f in frames]
    direction = text.split(" moves ")[1].rstrip(".")
    axis, sign = {"right": (1, 1), "left": (1, -1), "down": (0, 1), "up": (0, -1)}[direction]
    steps = [sign * (b[axis] - a[axis]) for a, b in zip(positions, positions[1:])]
    assert set(steps) <= {0, 1} and sum(steps) == world.GRID - 1, "one cell at a time, the stated way, edge to edge"
    assert all(a[1 - axis] == b[1 - axis] for a, b in zip(positions, positions[1:]))


def test_same_seed_same_world_and_streams_are_independent():
    cfg = SynthConfig(seed=7)
    a = world.sample_scene(sample_rng(cfg, "pairs", 5))
    assert a == world.sample_scene(sample_rng(cfg, "pairs", 5))
    assert world.encode(world.render(a), "png") == world.encode(world.render(a), "png")

    def scenes_of(config, stream):
        return [world.sample_scene(sample_rng(config, stream, i)) for i in range(20)]
    pairs = scenes_of(cfg, "pairs")
    assert pairs == scenes_of(SynthConfig(seed=7), "pairs")
    assert pairs != scenes_of(cfg, "vqa"), "each stream draws its own scenes"
    assert pairs != scenes_of(SynthConfig(seed=8), "pairs"), "another seed, another world"
    assert len(set(pairs)) > 10


def test_size_names_and_counts():
    assert size_to_scale("tiny") == 0.125 and size_to_scale("3") == 3.0
    with pytest.raises(ConfigError, match="--size"):
        size_to_scale("huge")
    cfg = SynthConfig(scale=0.001)
    assert cfg.count("pairs") == 1 and SynthConfig(pairs=0).count("pairs") == 0
    with pytest.raises(ConfigError, match="synth.image_size"):
        SynthConfig(image_size=8)


@pytest.mark.parametrize("size", ["nan", "inf", "-1", "0"])
def test_size_must_be_finite_and_positive(size):
    with pytest.raises(ConfigError, match="--size"):
        size_to_scale(size)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0])
def test_scale_must_be_finite_and_positive(scale):
    """NaN passed `scale <= 0` and crashed generation with a traceback (round(nan))."""
    with pytest.raises(ConfigError, match="synth.scale"):
        SynthConfig(scale=scale)


def test_evaluation_scenes_are_never_training_scenes():
    """Scenes split by world.held_out: eval draws only held-out scenes, every training draw
    (scenes, edits, video frames) avoids them, so no evaluation picture is trained on."""
    rng = random.Random(0)
    evals = [world.sample_scene(rng, split="eval") for _ in range(200)]
    trains = [world.sample_scene(rng) for _ in range(2000)]
    assert all(world.held_out(s) for s in evals) and not any(world.held_out(s) for s in trains)
    assert not {s.shapes for s in evals} & {s.shapes for s in trains}
    assert {len(s.shapes) for s in evals} == {1, 2, 3}
    assert not any(world.held_out(world.edit(s, rng)[1]) for s in trains[:300])
    assert not any(world.held_out(f) for _ in range(100) for f in world.motion(rng, 64, 8)[0])
