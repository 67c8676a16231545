"""LR schedules (warmup shapes, decay ends, restarts) and crash-safe checkpoint pointers."""

import math

import pytest

from emu.train import checkpoint as ckpt
from emu.train.config import ScheduleConfig
from emu.train.schedule import multiplier, segmented_multiplier, warmup_steps


def test_linear_warmup_then_cosine_to_floor():
    cfg = ScheduleConfig(decay="cosine", warmup_steps=4, min_lr_ratio=0.1)
    values = [multiplier(s, 20, cfg) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:])), "cosine decay is monotone"
    mid = 4 + (20 - 4 - 1) / 2
    assert multiplier(int(mid), 20, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 4) / 15)))


def test_log_warmup_and_linear_decay_emu2_decoder():
    cfg = ScheduleConfig(decay="linear", warmup="log", warmup_steps=10)
    warm = [multiplier(s, 30, cfg) for s in range(10)]
    assert warm[-1] == pytest.approx(1.0) and all(0 < a < b for a, b in zip(warm, warm[1:]))
    assert warm[0] > 0.25, "a log warm-up rises fast at first"
    assert multiplier(29, 30, cfg) == pytest.approx(0.0)
    assert multiplier(19, 30, cfg) == pytest.approx(1 - 9 / 19)


def test_warmup_ratio_and_constant():
    assert warmup_steps(ScheduleConfig(warmup_ratio=0.1), 100) == 10
    assert warmup_steps(ScheduleConfig(warmup_ratio=0.1, warmup_steps=3), 100) == 3
    assert multiplier(50, 100, ScheduleConfig(decay="constant")) == 1.0


def test_segments_restart_warmup_and_decay():
    """Emu2 restarts stage 1 at 448 px: the schedule starts over at the boundary."""
    cfg = ScheduleConfig(decay="linear", warmup_steps=2)
    assert segmented_multiplier(0, [10], 14, cfg) == 0.5
    assert segmented_multiplier(9, [10], 14, cfg) == pytest.approx(0.0)
    assert segmented_multiplier(10, [10], 14, cfg) == 0.5
    assert segmented_multiplier(11, [10], 14, cfg) == 1.0
    assert segmented_multiplier(13, [10], 14, cfg) == pytest.approx(0.0)


def test_latest_pointer_only_moves_to_complete_tags(tmp_path):
    assert ckpt.latest_tag(tmp_path) is None
    (tmp_path / "step-00000002").mkdir()
    ckpt.point_latest(tmp_path, "step-00000002")
    (tmp_path / "step-00000004").mkdir()  # written but never pointed at: a crash mid-save
    assert ckpt.latest_tag(tmp_path) == "step-00000002"
    assert not (tmp_path / "latest.tmp").exists()
    (tmp_path / "latest").write_text("step-00000009\n")
    with pytest.raises(FileNotFoundError, match="step-00000009"):
        ckpt.latest_tag(tmp_path)


def test_prune_keeps_the_newest_and_the_pointed_one(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / ckpt.tag_of(step)).mkdir()
    ckpt.point_latest(tmp_path, ckpt.tag_of(4))
    removed = ckpt.prune(tmp_path, keep=1)
    assert removed == [ckpt.tag_of(2), ckpt.tag_of(6)]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [ckpt.tag_of(4), ckpt.tag_of(8)]


def test_rank_state_restores_rng(tmp_path):
    import random

    import torch

    random.seed(1)
    torch.manual_seed(1)
    ckpt.save_rank_state(tmp_path / "t", 0, {"step": 3, "data": {"x": 1}})
    expected = (random.random(), float(torch.rand(1)))
    random.random(), torch.rand(1)
    state = ckpt.load_rank_state(tmp_path / "t", 0)
    assert state == {"step": 3, "data": {"x": 1}}
    assert (random.random(), float(torch.rand(1))) == expected
    with pytest.raises(FileNotFoundError, match="trainer-rank1.json is missing"):
        ckpt.load_rank_state(tmp_path / "t", 1)
